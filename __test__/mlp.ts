import type { ArrayLeaf } from '../index'
import { values } from './helpers'

/** A small tanh MLP (8 → 16 → 1) on a fixed regression batch, with its gradient written out. */
export interface Mlp {
  [k: string]: ArrayLeaf
  w1: ArrayLeaf
  b1: ArrayLeaf
  w2: ArrayLeaf
  b2: ArrayLeaf
}

const N = 64
const D = 8
const H = 16
const X = Float32Array.from(values(N * D, 11))
const A = values(D, 12)
const Y = Float32Array.from({ length: N }, (_, n) => Math.sin(A.reduce((s, a, j) => s + a * X[n * D + j], 0)))

/** The MLP's initial params (scaled like a usual init). */
export function mlpParams(): Mlp {
  const scaled = (n: number, seed: number, s: number) => Float32Array.from(values(n, seed), (v) => v * s)
  return {
    w1: { data: scaled(D * H, 13, 1 / Math.sqrt(D)), shape: [D, H] },
    b1: { data: new Float32Array(H), shape: [H] },
    w2: { data: scaled(H, 14, 1 / Math.sqrt(H)), shape: [H, 1] },
    b2: { data: new Float32Array(1), shape: [1] },
  }
}

/** The mean squared error and its gradient at `p`. */
export function mlpLossAndGrad(p: Mlp): { loss: number; grads: Mlp } {
  const g: Mlp = {
    w1: { data: new Float32Array(D * H), shape: [D, H] },
    b1: { data: new Float32Array(H), shape: [H] },
    w2: { data: new Float32Array(H), shape: [H, 1] },
    b2: { data: new Float32Array(1), shape: [1] },
  }
  let loss = 0
  const h = new Float64Array(H)
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < H; k++) {
      let z = p.b1.data[k]
      for (let j = 0; j < D; j++) z += X[n * D + j] * p.w1.data[j * H + k]
      h[k] = Math.tanh(z)
    }
    let y = p.b2.data[0]
    for (let k = 0; k < H; k++) y += h[k] * p.w2.data[k]
    const e = y - Y[n]
    loss += (e * e) / N
    const dy = (2 * e) / N
    g.b2.data[0] += dy
    for (let k = 0; k < H; k++) {
      g.w2.data[k] += dy * h[k]
      const dz = dy * p.w2.data[k] * (1 - h[k] * h[k])
      g.b1.data[k] += dz
      for (let j = 0; j < D; j++) g.w1.data[j * H + k] += dz * X[n * D + j]
    }
  }
  return { loss, grads: g }
}
