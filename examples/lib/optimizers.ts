/**
 * The optimizers the examples compare, by name: PSGD Kron (with psgd-jax's initial
 * preconditioner scale 1, and with `preconditionerInitScale: null`, the scale taken from
 * the first gradient), Kron with psgd_torch's inverse-free update rules (`updateRule:
 * 'PRO'` and `'QUAD'`), Kron in the delayed order (`updatePreconditionerFirst: false`)
 * and with that order's fit overlapped with the next gradient (`overlapFit: true`, the same
 * numbers), Affine through the `psgd/tfjs` adapter, and TensorFlow.js's own Adam. Every
 * other option is the default.
 */
import * as tf from '@tensorflow/tfjs-core'
import { AffineOptimizer, KronOptimizer } from '../../tfjs'

export type OptimizerName = 'adam' | 'kron' | 'kron-auto' | 'kron-pro' | 'kron-quad' | 'kron-delayed' | 'kron-overlap' | 'affine'

export const LABELS: Record<OptimizerName, string> = {
  adam: 'Adam (tfjs)',
  kron: 'Kron',
  'kron-auto': 'Kron auto-scale',
  'kron-pro': 'Kron PRO',
  'kron-quad': 'Kron QUAD',
  'kron-delayed': 'Kron delayed',
  'kron-overlap': 'Kron overlapFit',
  affine: 'Affine',
}

/** The examples' learning-rate flags, one per optimizer (`--lr-kron-pro`). */
export const LR_FLAGS = Object.keys(LABELS).map((n) => `lr-${n}`)

/** A learning rate, or a schedule of the number of steps already taken (0 at the first). */
export type LearningRate = number | ((step: number) => number)

/**
 * A fresh optimizer; `seed` seeds PSGD's probe vectors (Adam draws nothing). PSGD takes a
 * schedule as it is; tfjs's Adam has no schedule, so its learning rate is set before each
 * step.
 */
export function makeOptimizer(name: OptimizerName, learningRate: LearningRate, seed = 0): tf.Optimizer {
  switch (name) {
    case 'adam':
      return typeof learningRate === 'number' ? tf.train.adam(learningRate) : scheduled(tf.train.adam(learningRate(0)), learningRate)
    case 'kron':
      return new KronOptimizer({ learningRate, seed })
    case 'kron-auto':
      return new KronOptimizer({ learningRate, seed, preconditionerInitScale: null })
    case 'kron-pro':
      return new KronOptimizer({ learningRate, seed, updateRule: 'PRO' })
    case 'kron-quad':
      return new KronOptimizer({ learningRate, seed, updateRule: 'QUAD' })
    case 'kron-delayed':
      return new KronOptimizer({ learningRate, seed, updatePreconditionerFirst: false })
    case 'kron-overlap':
      return new KronOptimizer({ learningRate, seed, overlapFit: true })
    case 'affine':
      return new AffineOptimizer({ learningRate, seed })
  }
}

/** Parse a comma-separated list of optimizer names (as given to `--optimizers`). */
export function parseOptimizerNames(list: string): OptimizerName[] {
  const names = list.split(',').map((s) => s.trim())
  for (const n of names) if (!(n in LABELS)) throw new Error(`unknown optimizer '${n}' (known: ${Object.keys(LABELS).join(', ')})`)
  return names as OptimizerName[]
}

/** `opt` with its `learningRate` field set from `schedule` before each step. */
function scheduled(opt: tf.AdamOptimizer, schedule: (step: number) => number): tf.Optimizer {
  const apply = opt.applyGradients.bind(opt)
  let step = 0
  opt.applyGradients = (grads) => {
    // tfjs's optimizers read this (protected) field at each step
    ;(opt as unknown as { learningRate: number }).learningRate = schedule(step++)
    apply(grads)
  }
  return opt
}
