import { makeTransformation, PsgdOptimizer, type GradientTransformation, type VariantSpec } from './core'
import type { LRANativeOptions } from './options.generated'
import type { PyTree } from './tree'

/** Options of {@link lra} and {@link LRA}: psgd-jax 0.2.9's `low_rank_approximation` arguments, camelCased, with its defaults. */
export type LRAOptions = LRANativeOptions

/** @internal */
export const LRA_SPEC: VariantSpec = { name: 'lra' }

/**
 * PSGD LRA (optax style; psgd-jax's `low_rank_approximation`): one global preconditioner
 * `Q = (I + U·Vᵀ)·diag(d)` with `U`, `V` of rank `uvdRankOfApproximation` (random initial
 * factors from `seed`). Fitted by gradient whitening, or from Hessian-vector products
 * passed to `update(grads, state, params, { hvp, vector, updatePreconditioner })`.
 * @throws TypeError for an unknown option or one of the wrong type; RangeError for a value out of range.
 */
export function lra(options: LRAOptions = {}): GradientTransformation {
  return makeTransformation(LRA_SPEC, options)
}

/** PSGD LRA as a class that updates its params in place (see {@link lra}). */
export class LRA<P extends PyTree = PyTree> extends PsgdOptimizer<P> {
  /** An optimizer for `params` (updated in place by {@link PsgdOptimizer.step}). */
  constructor(params: P, options: LRAOptions = {}) {
    super(LRA_SPEC, params, options)
  }
}
