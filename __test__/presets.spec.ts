import test from 'ava'
import * as tf from '@tensorflow/tfjs-core'
import '@tensorflow/tfjs-backend-cpu'
import '@tensorflow/tfjs-core/dist/register_all_gradients'
import { kron, kronPresets, Kron, type ArrayLeaf, type KronOptions } from '../index'
import * as tfl from '@tensorflow/tfjs-layers'
import { KronOptimizer } from '../tfjs'
import { saveAndLoad } from './tfjs-contracts'

// Kron's presets: plain frozen option objects that set the same options, usable by the
// functional API, the class and the TensorFlow.js optimizer (whose config keeps them).

const names = ['psgdJax', 'psgdTorch', 'distributedKronPro', 'heavyballPro'] as const

// a small ill-conditioned quadratic: loss = ½ Σ h·(w − target)² over a 6×4 matrix and a bias
const h = Float32Array.from({ length: 24 }, (_, i) => Math.exp(((i % 7) - 3) * 0.6))
const target = Float32Array.from({ length: 24 }, (_, i) => Math.sin(i + 1))
const loss = (w: Float32Array): number => w.reduce((s, x, i) => s + 0.5 * h[i] * (x - target[i]) ** 2, 0)
const grad = (w: Float32Array): ArrayLeaf => ({ data: w.map((x, i) => h[i] * (x - target[i])), shape: [6, 4] })

test('kronPresets holds the four presets, each frozen and setting the same options', (t) => {
  t.deepEqual(Object.keys(kronPresets).sort(), [...names].sort())
  t.true(Object.isFrozen(kronPresets))
  const keys = Object.keys(kronPresets.psgdJax).sort()
  t.true(keys.includes('updateRule') && keys.includes('learningRate'))
  for (const n of names) {
    t.true(Object.isFrozen(kronPresets[n]), n)
    t.deepEqual(Object.keys(kronPresets[n]).sort(), keys, n)
  }
  t.is(kronPresets.psgdTorch.updateRule, 'Q0.5EQ1.5')
  t.is(typeof kronPresets.heavyballPro.preconditionerUpdateProbability, 'function')
})

test('psgdJax is the defaults: the same updates as kron() with no options', (t) => {
  const params = (): { w: ArrayLeaf } => ({ w: { data: new Float32Array(24), shape: [6, 4] } })
  const a = kron({ ...kronPresets.psgdJax })
  const b = kron()
  const sa = a.init(params())
  const sb = b.init(params())
  const w = new Float32Array(24)
  for (let i = 0; i < 5; i++) {
    const [ua] = a.update({ w: grad(w) }, sa)
    const [ub] = b.update({ w: grad(w) }, sb)
    t.deepEqual((ua as { w: ArrayLeaf }).w.data, (ub as { w: ArrayLeaf }).w.data)
    w.set((ua as { w: ArrayLeaf }).w.data.map((u, j) => w[j] + u))
  }
  t.deepEqual(Buffer.from(sa.toBytes()), Buffer.from(sb.toBytes()))
})

for (const n of names) {
  test(`${n}: the class trains with the preset and a learning rate of the user's`, (t) => {
    const w = new Float32Array(24)
    const params = { w: { data: w, shape: [6, 4] } }
    const opt = new Kron(params, { ...kronPresets[n], learningRate: 0.05, weightDecay: 0 })
    const start = loss(w)
    for (let i = 0; i < 60; i++) opt.step({ w: grad(w) })
    t.true(w.every(Number.isFinite))
    t.true(loss(w) < 0.5 * start, `${n}: loss ${start} → ${loss(w)}`)
    opt.dispose()
  })
}

test('a preset spread over another replaces it whole: the same steps as the later preset alone', (t) => {
  const run = (o: KronOptions): Buffer => {
    const w = new Float32Array(24)
    const opt = new Kron({ w: { data: w, shape: [6, 4] } }, o)
    for (let i = 0; i < 4; i++) opt.step({ w: grad(w) })
    const bytes = Buffer.from(opt.state.toBytes())
    opt.dispose()
    return bytes
  }
  for (const [a, b] of [
    ['heavyballPro', 'psgdTorch'],
    ['psgdTorch', 'psgdJax'],
    ['distributedKronPro', 'heavyballPro'],
  ] as const) {
    t.deepEqual(run({ ...kronPresets[a], ...kronPresets[b] }), run({ ...kronPresets[b] }), `${a} then ${b}`)
  }
})

test('the TensorFlow.js optimizer takes a preset, and its config (with the annealed fit probability) round-trips', (t) => {
  const opt = new KronOptimizer({ ...kronPresets.heavyballPro, learningRate: 0.01 })
  const config = JSON.parse(JSON.stringify(opt.getConfig())) as tf.serialization.ConfigDict
  t.deepEqual(config.preconditionerUpdateProbability, {
    precondUpdateProbSchedule: { maxProb: 1, minProb: 0.03, decay: -Math.log(0.999), flatStart: 1000 },
  })
  const back = KronOptimizer.fromConfig(KronOptimizer, config) as unknown as KronOptimizer
  const again = JSON.parse(JSON.stringify(back.getConfig())) as tf.serialization.ConfigDict
  t.deepEqual(again, config)
  // both train a variable the same way
  const train = (o: KronOptimizer): number[] => {
    const v = tf.variable(
      tf.tensor2d(
        Array.from({ length: 24 }, (_, i) => Math.cos(i)),
        [6, 4],
      ),
      true,
      'w',
    )
    for (let i = 0; i < 3; i++) o.minimize(() => tf.sum(tf.square(v)) as tf.Scalar)
    const out = Array.from(v.dataSync())
    v.dispose()
    return out
  }
  t.deepEqual(train(opt), train(back))
  opt.dispose()
  back.dispose()
})

test('a tfjs model compiled with each preset saves with its optimizer and loads with the same options', async (t) => {
  for (const n of names) {
    const model = tfl.sequential()
    model.add(tfl.layers.dense({ units: 2, inputShape: [3], kernelInitializer: tfl.initializers.glorotUniform({ seed: 1 }) }))
    model.compile({ optimizer: new KronOptimizer({ ...kronPresets[n], learningRate: 0.01 }), loss: 'meanSquaredError' })
    const config = (model.optimizer as unknown as KronOptimizer).getConfig()
    const loaded = await saveAndLoad(model)
    t.true(loaded.optimizer instanceof KronOptimizer, n)
    t.deepEqual((loaded.optimizer as unknown as KronOptimizer).getConfig(), config, n)
    for (const m of [model, loaded]) {
      m.optimizer.dispose()
      m.dispose()
    }
  }
})
