import { makeTransformation, PsgdOptimizer, type GradientTransformation, type VariantSpec } from './core'
import type { XMatNativeOptions } from './options.generated'
import type { PyTree } from './tree'

/** Options of {@link xmat} and {@link XMat}: psgd-jax 0.2.9's `xmat` arguments, camelCased, with its defaults. */
export type XMatOptions = XMatNativeOptions

/** The options XMat, LRA and Affine share (psgd-jax gives the three the same arguments; XMat has no others). */
export type PsgdOptions = XMatNativeOptions

/** @internal */
export const XMAT: VariantSpec = { name: 'xmat' }

/**
 * PSGD XMat (optax style): one global preconditioner `Q = diag(a) + adiag(b)` over all
 * parameters flattened into one vector (memory about 3 × the parameter count with
 * momentum). Fitted by gradient whitening, or from Hessian-vector products passed to
 * `update(grads, state, params, { hvp, vector, updatePreconditioner })`.
 * @throws TypeError for an unknown option or one of the wrong type; RangeError for a value out of range.
 */
export function xmat(options: XMatOptions = {}): GradientTransformation {
  return makeTransformation(XMAT, options)
}

/** PSGD XMat as a class that updates its params in place (see {@link xmat}). */
export class XMat<P extends PyTree = PyTree> extends PsgdOptimizer<P> {
  /** An optimizer for `params` (updated in place by {@link PsgdOptimizer.step}). */
  constructor(params: P, options: XMatOptions = {}) {
    super(XMAT, params, options)
  }
}
