import { makeTransformation, PsgdOptimizer, type BaseOptions, type GradientTransformation, type VariantSpec } from './core'
import { precondUpdateProbSchedule } from './schedule'
import type { Mask, PyTree } from './tree'

/** Options of {@link kron} and {@link Kron}: psgd-jax 0.2.9's `kron` arguments, camelCased, with its defaults. */
export interface KronOptions extends BaseOptions {
  /** Which leaves get weight decay: a tree of booleans or `(path, leaf) => boolean`. Default: all. */
  weightDecayMask?: Mask
  /** Axes longer than this get a diagonal factor instead of a triangular one. Default 8192. */
  maxSizeTriangular?: number
  /** Leaves with fewer axes than this get only diagonal factors. Default 2. */
  minNdimTriangular?: number
  /**
   * `null` (default): every axis may be triangular; `'one_diag'`: the largest axis of each
   * leaf is diagonal; `'all_diag'`: every axis is diagonal.
   */
  memorySaveMode?: null | 'one_diag' | 'all_diag'
  /** Fit the preconditioner to the momentum rather than the raw gradient. Default true. */
  momentumIntoPrecondUpdate?: boolean
  /** Step size of the preconditioner fit. Default 0.1. */
  preconditionerLr?: number
  /** Initial scale of the preconditioner. Default 1. */
  preconditionerInitScale?: number
  /** Dtype of the momentum buffer; null keeps each param's dtype. */
  muDtype?: null | 'float32' | 'bfloat16' | 'float16' | 'float64'
  /** Dtype of the preconditioner factors; null is float32. */
  precondDtype?: null | 'float32' | 'bfloat16' | 'float16' | 'float64'
  /**
   * Matmul precision of the preconditioner fit. Default `'tensorfloat32'` (computed in
   * float32: candle has no TF32 switch); `'bfloat16'` rounds the operands to bfloat16.
   */
  precondUpdatePrecision?: null | 'bfloat16' | 'tensorfloat32' | 'float32'
  /** Matmul precision when applying the preconditioner. Default null (float32). */
  precondGradsPrecision?: null | 'bfloat16' | 'tensorfloat32' | 'float32'
  /**
   * Leaves whose leading axis is a stack of layers (a tree of booleans or a predicate):
   * each layer gets its own preconditioner. Default: none.
   */
  scannedLayers?: Mask
  /** Process scanned layers in batches of `laxMapBatchSize` layers, bounding memory. Default false. */
  laxMapScannedLayers?: boolean
  /** Layers per batch with `laxMapScannedLayers`. Default 8. */
  laxMapBatchSize?: number
}

/** @internal */
export const KRON: VariantSpec = {
  name: 'kron',
  variant: 'kron',
  scannedLayers: true,
  maskOption: 'weightDecayMask',
  precondLrSchedule: false,
  hessian: false,
  defaultLearningRate: 0.001,
  defaultUpdateProbability: () => precondUpdateProbSchedule(),
  nativeOptions: {
    b1: { snake: 'b1', kind: 'number' },
    weightDecay: { snake: 'weight_decay', kind: 'number' },
    maxSizeTriangular: { snake: 'max_size_triangular', kind: 'integer' },
    minNdimTriangular: { snake: 'min_ndim_triangular', kind: 'integer' },
    memorySaveMode: { snake: 'memory_save_mode', kind: { oneOf: [null, 'one_diag', 'all_diag'] } },
    momentumIntoPrecondUpdate: { snake: 'momentum_into_precond_update', kind: 'boolean' },
    preconditionerLr: { snake: 'preconditioner_lr', kind: 'number' },
    preconditionerInitScale: { snake: 'preconditioner_init_scale', kind: 'number' },
    muDtype: { snake: 'mu_dtype', kind: 'dtype' },
    precondDtype: { snake: 'precond_dtype', kind: 'dtype' },
    precondUpdatePrecision: { snake: 'precond_update_precision', kind: 'precision' },
    precondGradsPrecision: { snake: 'precond_grads_precision', kind: 'precision' },
    laxMapScannedLayers: { snake: 'lax_map_scanned_layers', kind: 'boolean' },
    laxMapBatchSize: { snake: 'lax_map_batch_size', kind: 'integer' },
    seed: { snake: 'seed', kind: 'seed' },
  },
}

/**
 * PSGD Kron (optax style): Kronecker-factored preconditioners, one factor per axis of each
 * leaf, triangular or diagonal. Matches psgd-jax 0.2.9's `kron`.
 *
 * ```ts
 * const optimizer = kron({ learningRate: 3e-4 })
 * let state = optimizer.init(params)
 * const [updates, next] = optimizer.update(grads, state, params)
 * params = applyUpdates(params, updates)
 * ```
 * @throws TypeError for an unknown option or one of the wrong type; RangeError for a value out of range.
 */
export function kron(options: KronOptions = {}): GradientTransformation {
  return makeTransformation(KRON, options)
}

/**
 * PSGD Kron as a class that updates its params in place (PyTorch style).
 *
 * ```ts
 * const opt = new Kron(params, { learningRate: 3e-4 })
 * opt.step(grads)
 * ```
 */
export class Kron<P extends PyTree = PyTree> extends PsgdOptimizer<P> {
  /** An optimizer for `params` (updated in place by {@link PsgdOptimizer.step}). */
  constructor(params: P, options: KronOptions = {}) {
    super(KRON, params, options)
  }
}
