import { makeTransformation, PsgdOptimizer, type GradientTransformation, type VariantSpec } from './core'
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
