/**
 * The delayed-XOR model: a one-layer tanh RNN, h_t = tanh(x_t·Wx + h_{t−1}·Wh + b), and a
 * logistic read-out of the last state, loss = mean softplus(−y·(h_T·Wo + bo)).
 *
 * Its gradient is computed here by hand (backpropagation through time on Float64Arrays):
 * on tfjs's `cpu` backend the same graph costs about 45 ms a step at length 32 (hundreds of
 * tiny ops, each with its bookkeeping), several times the arithmetic. `tfjsLoss` is the same
 * model in tfjs-core ops; a test checks the hand-written gradient against tfjs's autodiff.
 */
import * as tf from '@tensorflow/tfjs-core'

export interface RnnParams {
  /** [2, H] */
  wx: Float32Array
  /** [H, H] */
  wh: Float32Array
  /** [H] */
  b: Float32Array
  /** [H, 1] */
  wo: Float32Array
  /** [1] */
  bo: Float32Array
}

export type RnnGrads = RnnParams

export const SHAPES = (h: number): Record<keyof RnnParams, number[]> => ({ wx: [2, h], wh: [h, h], b: [h], wo: [h, 1], bo: [1] })

/**
 * Loss and gradient for inputs `x` [length, batch, 2] and labels `y` [batch] (±1);
 * `hidden` is H. With `withGrad: false`, the loss alone (and the logits, for accuracy).
 */
export function lossAndGrad(
  p: RnnParams,
  x: Float32Array,
  y: Float32Array,
  length: number,
  hidden: number,
  withGrad = true,
): { loss: number; logits: Float64Array; grads: RnnGrads | null } {
  const H = hidden
  const B = y.length
  const hs = new Float64Array(length * B * H)
  const wh = Float64Array.from(p.wh)
  for (let t = 0; t < length; t++) {
    for (let b = 0; b < B; b++) {
      const x0 = x[(t * B + b) * 2]
      const x1 = x[(t * B + b) * 2 + 1]
      const out = (t * B + b) * H
      for (let j = 0; j < H; j++) hs[out + j] = p.b[j] + x0 * p.wx[j] + x1 * p.wx[H + j]
      if (t > 0) {
        // row-major Wh: accumulate h_{t-1}[i]·Wh[i, :] row by row (contiguous reads)
        const prev = ((t - 1) * B + b) * H
        for (let i = 0; i < H; i++) {
          const hp = hs[prev + i]
          const row = i * H
          for (let j = 0; j < H; j++) hs[out + j] += hp * wh[row + j]
        }
      }
      for (let j = 0; j < H; j++) hs[out + j] = Math.tanh(hs[out + j])
    }
  }
  const last = (length - 1) * B * H
  const logits = new Float64Array(B)
  let loss = 0
  const dlogit = new Float64Array(B)
  for (let b = 0; b < B; b++) {
    let z = p.bo[0]
    for (let j = 0; j < H; j++) z += hs[last + b * H + j] * p.wo[j]
    logits[b] = z
    const m = -y[b] * z
    // softplus(m), stable
    loss += m > 0 ? m + Math.log1p(Math.exp(-m)) : Math.log1p(Math.exp(m))
    // d softplus(m)/dz = sigmoid(m)·(−y)
    dlogit[b] = -y[b] / (1 + Math.exp(-m)) / B
  }
  loss /= B
  if (!withGrad) return { loss, logits, grads: null }
  const g: RnnGrads = { wx: new Float32Array(2 * H), wh: new Float32Array(H * H), b: new Float32Array(H), wo: new Float32Array(H), bo: new Float32Array(1) }
  const gwx = new Float64Array(2 * H)
  const gwh = new Float64Array(H * H)
  const gb = new Float64Array(H)
  const gwo = new Float64Array(H)
  let gbo = 0
  // dh: the gradient w.r.t. h_t, [B, H]
  let dh = new Float64Array(B * H)
  for (let b = 0; b < B; b++) {
    gbo += dlogit[b]
    for (let j = 0; j < H; j++) {
      gwo[j] += hs[last + b * H + j] * dlogit[b]
      dh[b * H + j] = p.wo[j] * dlogit[b]
    }
  }
  const da = new Float64Array(H)
  for (let t = length - 1; t >= 0; t--) {
    const next = new Float64Array(B * H)
    for (let b = 0; b < B; b++) {
      const cur = (t * B + b) * H
      for (let j = 0; j < H; j++) {
        const h = hs[cur + j]
        da[j] = dh[b * H + j] * (1 - h * h)
      }
      const x0 = x[(t * B + b) * 2]
      const x1 = x[(t * B + b) * 2 + 1]
      for (let j = 0; j < H; j++) {
        gb[j] += da[j]
        gwx[j] += x0 * da[j]
        gwx[H + j] += x1 * da[j]
      }
      if (t > 0) {
        const prev = ((t - 1) * B + b) * H
        for (let i = 0; i < H; i++) {
          const hp = hs[prev + i]
          let s = 0
          const row = i * H
          for (let j = 0; j < H; j++) {
            gwh[row + j] += hp * da[j]
            s += wh[row + j] * da[j]
          }
          next[b * H + i] = s
        }
      }
    }
    dh = next
  }
  g.wx.set(gwx)
  g.wh.set(gwh)
  g.b.set(gb)
  g.wo.set(gwo)
  g.bo[0] = gbo
  return { loss, logits, grads: g }
}

/** The same loss in tfjs-core ops (the reference the test checks the hand-written gradient against). */
export function tfjsLoss(p: Record<keyof RnnParams, tf.Tensor>, x: tf.Tensor, y: tf.Tensor, length: number, hidden: number): tf.Scalar {
  const B = y.shape[0]
  const proj = tf.unstack(tf.reshape(tf.matMul(tf.reshape(x, [length * B, 2]), p.wx), [length, B, hidden]))
  let h: tf.Tensor = tf.tanh(tf.add(proj[0], p.b))
  for (let t = 1; t < length; t++) h = tf.tanh(tf.add(tf.add(tf.matMul(h, p.wh), proj[t]), p.b))
  const logits = tf.reshape(tf.add(tf.matMul(h, p.wo), p.bo), [B])
  return tf.mean(tf.softplus(tf.neg(tf.mul(y, logits))))
}
