/**
 * What XMat, LRA and Affine share: psgd-jax 0.2.9 gives the three the same arguments
 * (besides each one's own), the same defaults and the same Hessian-based mode.
 */
import type { BaseOptions, VariantSpec } from './core'
import type { NativeOption } from './options'
import type { Mask } from './tree'
import type { Schedule } from './schedule'

/** Options of {@link xmat}, {@link lra} and {@link affine} (psgd-jax's names, camelCased, and defaults). */
export interface PsgdOptions extends BaseOptions {
  /** Nesterov momentum (with bias correction). Default false. */
  nesterov?: boolean
  /** Which leaves get weight decay: a tree of booleans or `(path, leaf) => boolean` (psgd-jax's `mask`). Default: all. */
  mask?: Mask
  /** Step size of the preconditioner fit, or a schedule of the 1-based step count. Default 0.1. */
  precondLr?: number | Schedule
  /**
   * Initial scale of the preconditioner. Default null: chosen on the first fit from its
   * inputs, `(Σv²/Σh²)^¼` with Hessian-vector products, `(n/Σg²)^¼` when whitening.
   */
  precondInitScale?: number | null
  /** Clip the updates to this global L2 norm. Default null (no clip). */
  updateGlobalNormClip?: number | null
  /** How the preconditioner step is normalised: `'1st'` or `'2nd'` (default). */
  stepNormalizerOrder?: '1st' | '2nd'
  /** Dtype of the momentum buffer; null keeps each param's dtype. */
  muDtype?: null | 'float32' | 'bfloat16' | 'float16' | 'float64'
  /**
   * Matmul precision of the fit: `'bfloat16'`, `'tensorfloat32'` (default; computed in
   * float32, as candle has no TF32 switch) or `'float32'`.
   */
  precision?: 'bfloat16' | 'tensorfloat32' | 'float32'
}

const SHARED: Record<string, NativeOption> = {
  b1: { snake: 'b1', kind: 'number' },
  nesterov: { snake: 'nesterov', kind: 'boolean' },
  weightDecay: { snake: 'weight_decay', kind: 'number' },
  precondInitScale: { snake: 'precond_init_scale', kind: 'numberOrNull' },
  updateGlobalNormClip: { snake: 'update_global_norm_clip', kind: 'numberOrNull' },
  stepNormalizerOrder: { snake: 'step_normalizer_order', kind: { oneOf: ['1st', '2nd'] } },
  seed: { snake: 'seed', kind: 'seed' },
  muDtype: { snake: 'mu_dtype', kind: 'dtype' },
  precision: { snake: 'precision', kind: { oneOf: ['bfloat16', 'tensorfloat32', 'float32'] } },
}

/** The spec of one of XMat, LRA, Affine, with its own native options. */
export function psgdSpec(name: string, variant: string, own: Record<string, NativeOption> = {}): VariantSpec {
  return {
    name,
    variant,
    scannedLayers: false,
    maskOption: 'mask',
    precondLrSchedule: true,
    hessian: true,
    defaultLearningRate: 0.01,
    defaultUpdateProbability: () => () => 1,
    nativeOptions: { ...SHARED, ...own },
  }
}
