/**
 * `npm run bench:tfjs-glue -- [cpu|wasm]`: what the `psgd/tfjs` adapter costs per step on
 * top of the native step, on a 784-128-10 MLP (batch 64) with Kron and Affine updating the
 * preconditioner every step. Per step it prints tfjs's forward+backward, the whole
 * `applyGradients`, the native step inside it, and the glue (their difference: reading the
 * gradients, building the tree, writing the variables); then the native update alone on
 * plain leaves of the same shapes. Measured and printed, never asserted.
 */
import '@tensorflow/tfjs-backend-cpu'
import '@tensorflow/tfjs-core/dist/register_all_gradients'
import { setWasmPaths } from '@tensorflow/tfjs-backend-wasm'
import * as tf from '@tensorflow/tfjs-core'
import * as path from 'node:path'
import { kron, affine } from '../index'
import { KronOptimizer, AffineOptimizer } from '../tfjs'

const STEPS = 60
const WARMUP = 5

async function main(): Promise<void> {
  const backend = process.argv[2] ?? 'cpu'
  if (backend === 'wasm') setWasmPaths(path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm')) + path.sep)
  if (!['cpu', 'wasm'].includes(backend) || !(await tf.setBackend(backend))) throw new Error(`bench:tfjs-glue: backend must be cpu or wasm, got ${backend}`)
  const shapes = [[784, 128], [128], [128, 10], [10]]
  const vars = shapes.map((s, i) => tf.variable(tf.randomNormal(s, 0, 0.05, 'float32', i + 1), true, `mlp_${i}`))
  const x = tf.randomNormal([64, 784], 0, 1, 'float32', 9)
  const y = tf.oneHot(
    tf.tensor1d(
      Array.from({ length: 64 }, (_, i) => i % 10),
      'int32',
    ),
    10,
  )
  const loss = (): tf.Scalar =>
    tf.tidy(() => {
      const h = tf.tanh(tf.add(tf.matMul(x, vars[0]), vars[1]))
      return tf.losses.softmaxCrossEntropy(y, tf.add(tf.matMul(h, vars[2]), vars[3])) as tf.Scalar
    })
  for (const [name, Ctor, make] of [
    ['Kron', KronOptimizer, kron],
    ['Affine', AffineOptimizer, affine],
  ] as const) {
    const options = { learningRate: 1e-3, preconditionerUpdateProbability: 1 }
    const opt = new Ctor(options)
    // time the native step inside applyGradients by wrapping the adapter's transformation
    const tr = (opt as unknown as { transformation: { update: (...a: unknown[]) => unknown } }).transformation
    const update = tr.update.bind(tr)
    let inStep = 0
    tr.update = (...a: unknown[]) => {
      const s = performance.now()
      const r = update(...a)
      inStep = performance.now() - s
      return r
    }
    let tGrad = 0
    let tApply = 0
    let tIn = 0
    for (let i = 0; i < STEPS + WARMUP; i++) {
      const t0 = performance.now()
      const { value, grads } = tf.variableGrads(loss)
      // the backward pass finishes before applyGradients is timed
      for (const g of Object.values(grads)) g.dataSync()
      const t1 = performance.now()
      opt.applyGradients(grads)
      const t2 = performance.now()
      tf.dispose([value, grads])
      if (i >= WARMUP) {
        tGrad += t1 - t0
        tApply += t2 - t1
        tIn += inStep
      }
    }
    opt.dispose()
    const t = make(options)
    const leaves = shapes.map((s) => ({ data: new Float32Array(s.reduce((a, b) => a * b, 1)).map(() => Math.random() - 0.5), shape: s }))
    const st = t.init(leaves)
    let tNative = 0
    for (let i = 0; i < STEPS + WARMUP; i++) {
      const t0 = performance.now()
      t.update(leaves, st)
      if (i >= WARMUP) tNative += performance.now() - t0
    }
    const ms = (v: number): string => `${(v / STEPS).toFixed(2)} ms`
    console.log(
      `${name}, ${backend} backend, per step: tfjs forward+backward ${ms(tGrad)}, applyGradients ${ms(tApply)}, native step inside it ${ms(tIn)}, glue ${ms(tApply - tIn)}; native update alone ${ms(tNative)}`,
    )
  }
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
