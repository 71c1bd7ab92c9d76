/**
 * psgd/tfjs: the PSGD optimizers as TensorFlow.js optimizers (`tf.train.Optimizer`
 * subclasses), for `model.compile`/`model.fit` and `optimizer.minimize`. Needs
 * `@tensorflow/tfjs-core` ≥ 4 (an optional peer dependency of psgd; without it, importing
 * this entry throws an Error that says what to install); importing this entry registers the
 * four classes with `tf.serialization`.
 * @packageDocumentation
 */
// first, so that a missing @tensorflow/tfjs-core is reported with what to install
import './src/tfjs-peer'
export type { PsgdWarning, WarningHook } from './src/guard'
export { KronOptimizer, XMatOptimizer, LRAOptimizer, AffineOptimizer, PsgdTfjsOptimizer, type NamedTensor } from './src/tfjs'
export {
  psgdStatsCallback,
  statsSummary,
  type PsgdStatsCallbackOptions,
  type PsgdStats,
  type PsgdLeafStats,
  type PsgdFactorStats,
  type PsgdStepTimes,
} from './src/stats'
