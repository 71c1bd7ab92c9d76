import { makeTransformation, PsgdOptimizer, type GradientTransformation } from './core'
import { psgdSpec, type PsgdOptions } from './psgd'
import type { PyTree } from './tree'

/** Options of {@link affine} and {@link Affine}: psgd-jax 0.2.9's `affine` arguments, camelCased, with its defaults. */
export interface AffineOptions extends PsgdOptions {
  /** A side of the matrix longer than this gets a diagonal factor. Default 4096. */
  maxSizeTriangular?: number
  /** A side more than this many times longer than the other gets a diagonal factor. Default 128. */
  maxSkewTriangular?: number
}

/** @internal */
export const AFFINE = psgdSpec('affine', 'affine', {
  maxSizeTriangular: { snake: 'max_size_triangular', kind: 'integer' },
  maxSkewTriangular: { snake: 'max_skew_triangular', kind: 'integer' },
})

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
