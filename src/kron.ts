import { describeLeaves, makeTransformation, PsgdOptimizer, type GradientTransformation, type VariantSpec } from './core'
import { call, native } from './native'
import type { KronNativeOptions } from './options.generated'
import type { PyTree } from './tree'

/**
 * Options of {@link kron} and {@link Kron}: psgd-jax 0.2.9's `kron` arguments, camelCased,
 * with its defaults (declared in Rust; see `options.generated.ts`).
 */
export type KronOptions = KronNativeOptions

/** @internal */
export const KRON: VariantSpec = { name: 'kron' }

/**
 * PSGD Kron (optax style): Kronecker-factored preconditioners, one factor per axis of each
 * leaf, triangular or diagonal. Matches psgd-jax 0.2.9's `kron`; `updateRule` picks
 * psgd_torch's other fits. Fitted by gradient whitening, or from Hessian-vector products
 * passed to `update` (the Newton form of the rule; `hessianHelper` makes them).
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

/** What Kron's state holds for one leaf (see {@link kronStateSize}). */
export interface KronLeafStateSize {
  /** The leaf's path. */
  path: string
  /**
   * The shapes of its factors, in the saved state's order: per part (the leaf, or its
   * blocks of one shape under `blockSize`) a factor per merged axis, `[d, d]` dense or
   * `[d]` diagonal, with a leading axis that stacks the layers of a scanned leaf and the
   * blocks.
   */
  factors: number[][]
  /** Bytes of those factors (in `precondDtype`) and of their Lipschitz bounds (float32, under the inverse-free rules). */
  bytes: number
}

/** What {@link kronStateSize} reports. */
export interface KronStateSize {
  /** Per leaf, in the tree's order. */
  leaves: KronLeafStateSize[]
  /** The preconditioner's bytes over all leaves (the momentum adds each leaf's own size, in `muDtype`). */
  bytes: number
}

/**
 * The factor shapes and bytes Kron's state would hold for `params` under `options`,
 * from the leaves' shapes alone (no state is made; `params` is the tree `init` would get):
 * how `mergeDims`, `blockSize`, `maxSizeTriangular` and `memorySaveMode` change the state
 * before making one.
 *
 * ```ts
 * kronStateSize({ w: { data: new Float32Array(24), shape: [2, 3, 4] } }, { mergeDims: 'twoD' })
 * // { leaves: [{ path: 'w', factors: [[6, 6], [4, 4]], bytes: 208 }], bytes: 208 }
 * ```
 * @throws TypeError or RangeError for bad options, as {@link kron}.
 */
export function kronStateSize(params: PyTree, options: KronOptions = {}): KronStateSize {
  const { leaves, json } = describeLeaves(KRON, params, options)
  const sizes = call(() => native.kronStateSize(leaves, json), 'kronStateSize')
  return { leaves: sizes, bytes: sizes.reduce((a, s) => a + s.bytes, 0) }
}
