/**
 * psgd: PSGD optimizers for Node.js on a Rust/candle core.
 * @packageDocumentation
 */
export { kron, Kron, kronStateSize, type KronOptions, type KronStateSize, type KronLeafStateSize } from './src/kron'
export { kronPresets, type KronPresets } from './src/presets.generated'
export { xmat, XMat, type XMatOptions } from './src/xmat'
export { lra, LRA, type LRAOptions } from './src/lra'
export { affine, Affine, type AffineOptions } from './src/affine'
export type { PsgdOptions } from './src/xmat'
export { applyUpdates, OptimizerState, PsgdOptimizer, stats, type BaseOptions, type GradientTransformation, type UpdateExtra } from './src/core'
export type { PsgdStats, PsgdLeafStats, PsgdFactorStats, PsgdStepTimes } from './src/stats'
export { type PsgdWarning, type WarningHook } from './src/guard'
export { hessianHelper, type HessianHelperOptions, type HessianHelperResult, type LossAndGrad } from './src/hessian'
export { precondUpdateProbSchedule, type Schedule, type PrecondUpdateProbScheduleOptions } from './src/schedule'
export { Tensor, liveTensorBytes, type DType, type DeviceName, type TensorOptions } from './src/tensor'
export { flatten, unflatten, isLeaf, type ArrayLeaf, type Leaf, type Mask, type PyTree, type TreeDef, type Flat } from './src/tree'
export type { PsgdNativeOptions, KronNativeOptions, XMatNativeOptions, LRANativeOptions, AffineNativeOptions } from './src/options.generated'
