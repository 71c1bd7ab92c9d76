/**
 * psgd/tfjs: the PSGD optimizers as TensorFlow.js optimizers (`tf.train.Optimizer`
 * subclasses), for `model.compile`/`model.fit` and `optimizer.minimize`. Needs
 * `@tensorflow/tfjs-core` ≥ 4 (an optional peer dependency of psgd); importing this entry
 * registers the four classes with `tf.serialization`.
 * @packageDocumentation
 */
export { KronOptimizer, XMatOptimizer, LRAOptimizer, AffineOptimizer, PsgdTfjsOptimizer, type NamedTensor } from './src/tfjs'
