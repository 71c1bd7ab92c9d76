import { makeTransformation, PsgdOptimizer, type GradientTransformation, type VariantSpec } from './core'
import type { AffineNativeOptions } from './options.generated'
import type { PyTree } from './tree'

/** Options of {@link affine} and {@link Affine}: psgd-jax 0.2.9's `affine` arguments, camelCased, with its defaults. */
export type AffineOptions = AffineNativeOptions

/** @internal */
export const AFFINE: VariantSpec = { name: 'affine' }

/**
 * PSGD Affine (optax style): each leaf reshaped to a matrix (as psgd-jax does: vectors and
 * scalars to one row, higher-rank tensors by the split that minimises the factor sizes)
 * with a left and a right factor, each triangular or diagonal. Fitted by gradient
 * whitening, or from Hessian-vector products passed to
 * `update(grads, state, params, { hvp, vector, updatePreconditioner })`.
 * @throws TypeError for an unknown option or one of the wrong type; RangeError for a value out of range.
 */
export function affine(options: AffineOptions = {}): GradientTransformation {
  return makeTransformation(AFFINE, options)
}

/** PSGD Affine as a class that updates its params in place (see {@link affine}). */
export class Affine<P extends PyTree = PyTree> extends PsgdOptimizer<P> {
  /** An optimizer for `params` (updated in place by {@link PsgdOptimizer.step}). */
  constructor(params: P, options: AffineOptions = {}) {
    super(AFFINE, params, options)
  }
}
