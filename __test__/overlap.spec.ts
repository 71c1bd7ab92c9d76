/**
 * `overlapFit`: the fit of a step runs on a native worker thread after the step returned.
 * Its numbers are those of `updatePreconditionerFirst: false` run in order, bit for bit
 * (every variant and Kron rule; class `step` and `stepAsync`, the functional API, the
 * TensorFlow.js optimizers on the `cpu` backend); saves, copies, `dispose` and errors
 * behave as if the step were synchronous.
 */
import '@tensorflow/tfjs-backend-cpu'
import * as tf from '@tensorflow/tfjs-core'
import * as tfl from '@tensorflow/tfjs-layers'
import test from 'ava'
import { affine, Affine, kron, Kron, liveTensorBytes, lra, LRA, Tensor, xmat, XMat, type ArrayLeaf } from '../index'
import { AffineOptimizer, KronOptimizer, LRAOptimizer, XMatOptimizer } from '../tfjs'
import { child, values } from './helpers'
import { parse } from './safetensors'

test.before(async () => {
  await tf.setBackend('cpu')
})

type Options = Record<string, unknown>
type Tree = { w: ArrayLeaf; b: ArrayLeaf }

const arrays = (seed: number, scale = 1): Tree => ({
  w: { data: Float32Array.from(values(24, seed), (v) => v * scale), shape: [6, 4] },
  b: { data: Float32Array.from(values(5, seed + 1), (v) => v * scale), shape: [5] },
})
const tensors = (seed: number) => {
  const a = arrays(seed)
  return { w: Tensor.fromArray(a.w.data, a.w.shape), b: Tensor.fromArray(a.b.data, a.b.shape) }
}
const bitsOf = (data: Float32Array) => Array.from(new Uint32Array(data.slice().buffer))
const treeBits = (t: { w: ArrayLeaf | Tensor; b: ArrayLeaf | Tensor }) =>
  [t.w, t.b].map((l) => bitsOf(l instanceof Tensor ? Float32Array.from(l.toArray()) : l.data))

const classes = { kron: Kron, xmat: XMat, lra: LRA, affine: Affine } as const
const functional = { kron, xmat, lra, affine } as const
const rules = ['EQ', 'Q0.5EQ1.5', 'QUAD', 'QEQ', 'QEP', 'PRO4P', 'QUAD4P']

/** Every variant and Kron rule, each with a fit on every step and with the default schedule. */
const configs: [keyof typeof classes, Options][] = [
  ...rules.flatMap((updateRule): [keyof typeof classes, Options][] => [
    ['kron', { updateRule, preconditionerUpdateProbability: 1 }],
    ['kron', { updateRule }],
  ]),
  ['kron', { updateDecision: 'draw', preconditionerUpdateProbability: 0.6 }],
  ...(['xmat', 'lra', 'affine'] as const).flatMap((v): [keyof typeof classes, Options][] => [
    [v, { preconditionerUpdateProbability: 1 }],
    [v, {}],
  ]),
]
const N = 12
const base = { learningRate: 0.01, seed: 3 }
const overlapped = (o: Options) => ({ ...base, ...o, overlapFit: true })
const sequential = (o: Options) => ({ ...base, ...o, updatePreconditionerFirst: false })

for (const [name, extra] of configs) {
  const label = `${name} ${JSON.stringify(extra)}`
  const Cls = classes[name] as typeof Kron

  test(`${label}: class step with overlapFit equals updatePreconditionerFirst: false bit for bit, a save mid-run included`, (t) => {
    const [po, ps] = [tensors(1), tensors(1)]
    const [a, b] = [new Cls(po, overlapped(extra)), new Cls(ps, sequential(extra))]
    for (let k = 1; k <= N; k++) {
      const g = tensors(100 + k)
      a.step(g)
      b.step(g)
      // count does not wait for the fit in flight, and is already the step's
      t.is(a.count, k)
      if (k === N / 2) t.deepEqual(Buffer.from(a.stateDict()), Buffer.from(b.stateDict()), 'the save at step 6')
    }
    t.deepEqual(treeBits(po), treeBits(ps))
    t.deepEqual(Buffer.from(a.stateDict()), Buffer.from(b.stateDict()))
    a.dispose()
    b.dispose()
  })

  test(`${label}: class stepAsync and the functional update with overlapFit equal the sequential order bit for bit`, async (t) => {
    const [po, ps] = [arrays(1), arrays(1)]
    const [a, b] = [new Cls(po, overlapped(extra)), new Cls(ps, sequential(extra))]
    const fn = (functional[name] as typeof kron)(overlapped(extra))
    const st = fn.init(arrays(1))
    for (let k = 1; k <= N; k++) {
      const g = arrays(100 + k)
      await a.stepAsync(g)
      await b.stepAsync(g)
      fn.update(g, st, arrays(1))
    }
    t.deepEqual(treeBits(po), treeBits(ps))
    t.deepEqual(Buffer.from(a.stateDict()), Buffer.from(b.stateDict()))
    t.deepEqual(Buffer.from(st.toBytes()), Buffer.from(b.stateDict()))
    a.dispose()
    b.dispose()
    st.dispose()
  })
}

test('a loaded state, a clone and copies made with a fit in flight see the fit (every call that reads the state waits for it)', (t) => {
  const o = { preconditionerUpdateProbability: 1 }
  const [po, ps] = [tensors(1), tensors(1)]
  const [a, b] = [new Kron(po, overlapped(o)), new Kron(ps, sequential(o))]
  for (let k = 1; k <= 3; k++) {
    a.step(tensors(10 + k))
    b.step(tensors(10 + k))
  }
  // a state loaded into an optimizer with a fit in flight replaces the fitted one
  const saved = b.stateDict()
  a.step(tensors(50))
  a.loadStateDict(saved)
  t.is(a.count, 3)
  t.deepEqual(Buffer.from(a.stateDict()), Buffer.from(saved))
  // the functional state: clone with a fit in flight, then both go on alike
  const fn = kron(overlapped(o))
  const st = fn.init(arrays(1))
  fn.update(arrays(2), st)
  const copy = st.clone()
  fn.update(arrays(3), st)
  fn.update(arrays(3), copy)
  t.deepEqual(Buffer.from(copy.toBytes()), Buffer.from(st.toBytes()))
  const seq = kron(sequential(o))
  const ss = seq.init(arrays(1))
  seq.update(arrays(2), ss)
  seq.update(arrays(3), ss)
  t.deepEqual(Buffer.from(st.toBytes()), Buffer.from(ss.toBytes()))
  // loadBytes into a state with a fit in flight
  fn.update(arrays(4), st)
  st.loadBytes(ss.toBytes())
  t.deepEqual(Buffer.from(st.toBytes()), Buffer.from(ss.toBytes()))
  for (const x of [st, copy, ss]) x.dispose()
  a.dispose()
  b.dispose()
})

test('overlapFit with an explicit updatePreconditionerFirst: true is a RangeError naming both; false or absent is its order', (t) => {
  for (const [name, Cls] of Object.entries(classes)) {
    const fn = functional[name as keyof typeof functional] as typeof kron
    const both = { overlapFit: true, updatePreconditionerFirst: true }
    const message = /overlapFit.*updatePreconditionerFirst/
    t.throws(() => fn(both), { instanceOf: RangeError, message }, name)
    t.throws(() => new (Cls as typeof Kron)(arrays(1), both), { instanceOf: RangeError, message }, name)
    t.throws(() => new KronOptimizer(both), { instanceOf: RangeError, message })
    t.notThrows(() => fn({ overlapFit: true, updatePreconditionerFirst: false }).init(arrays(1)).dispose())
    t.throws(() => fn({ overlapFit: 1 as never }), { instanceOf: TypeError, message: /overlapFit/ })
  }
})

test('dispose with a fit in flight waits for it and frees the state; a dropped optimizer with a fit in flight is harmless', (t) => {
  const params = tensors(1)
  const opt = new Kron(params, overlapped({ preconditionerUpdateProbability: 1 }))
  opt.step(tensors(2))
  opt.dispose()
  t.throws(() => opt.step(tensors(3)), { instanceOf: TypeError, message: /disposed/ })
  opt.dispose() // idempotent
  for (let i = 0; i < 20; i++) new Kron(tensors(1), overlapped({ preconditionerUpdateProbability: 1 })).step(tensors(2))
  t.pass()
})

test('memory: a loop of overlapped steps holds no more native tensors at its end than at its start', (t) => {
  const params = tensors(1)
  const grads = tensors(2)
  const opt = new Kron(params, overlapped({ preconditionerUpdateProbability: 1 }))
  opt.step(grads)
  const start = liveTensorBytes()
  for (let i = 0; i < 50; i++) opt.step(grads)
  t.is(liveTensorBytes() - start, 0)
  t.is(opt.count, 51)
  opt.dispose()
})

test('RSS stays flat over 3000 overlapped steps (child process)', (t) => {
  const out = child(`
    const tree = (k) => ({ w: { data: new Float32Array(64 * 32).map((_, i) => Math.sin(i * k)), shape: [64, 32] }, b: { data: new Float32Array(32).fill(0.1 * k), shape: [32] } })
    const params = tree(1)
    const grads = tree(2)
    const opt = new p.Kron(params, { learningRate: 1e-4, preconditionerUpdateProbability: 1, overlapFit: true })
    for (let i = 0; i < 500; i++) opt.step(grads)
    global.gc()
    const before = process.memoryUsage().rss
    for (let i = 0; i < 3000; i++) opt.step(grads)
    global.gc()
    console.log(JSON.stringify({ growth: process.memoryUsage().rss - before, count: opt.count }))
  `)
  const { growth, count } = JSON.parse(out) as { growth: number; count: number }
  t.is(count, 3500)
  t.true(growth < 32 * 2 ** 20, `RSS grew ${(growth / 2 ** 20).toFixed(1)} MiB over 3000 steps`)
})

// PSGD_TEST_FAIL_FIT=n makes the overlapped fit of step n fail (a test-only switch of the
// binding: a fit checks nothing its step has not, so nothing else reaches this path)
test('an error in an overlapped fit is raised by the next call that waits for it, which does nothing else, with the state as the step left it; the call after works', (t) => {
  const out = child(
    `
    const tree = (k) => ({ w: { data: Float32Array.from({ length: 24 }, (_, i) => Math.sin(i * k + 1)), shape: [6, 4] }, b: { data: new Float32Array(5).fill(0.1 * k), shape: [5] } })
    const bytes = (x) => Buffer.from(x).toString('base64')
    const result = {}
    const catching = (f) => { try { f(); return null } catch (e) { return { cls: e.constructor.name, message: e.message } } }
    // the error raised by the next step, which takes no step
    const draw = { learningRate: 0.01, updateDecision: 'draw' }
    const params = tree(1)
    const a = new p.Kron(params, { ...draw, preconditionerUpdateProbability: 1, overlapFit: true })
    a.step(tree(2))
    result.count = a.count
    const after1 = JSON.stringify(Array.from(params.w.data))
    result.stepError = catching(() => a.step(tree(3)))
    result.countAfterError = a.count
    result.paramsKept = JSON.stringify(Array.from(params.w.data)) === after1
    // the state is the one a step that did not fit leaves (same draws, same momentum)
    const ref = new p.Kron(tree(1), { ...draw, preconditionerUpdateProbability: 0, updatePreconditionerFirst: false })
    ref.step(tree(2))
    result.stateAsStepLeft = bytes(a.stateDict()) === bytes(ref.stateDict())
    result.nextStep = catching(() => a.step(tree(3)))
    result.countAtEnd = a.count
    // raised by a save, then by stepAsync, then by a clone of the functional state
    const b = new p.Kron(tree(1), { ...draw, preconditionerUpdateProbability: 1, overlapFit: true })
    b.step(tree(2))
    result.saveError = catching(() => b.stateDict())
    result.saveAfter = catching(() => b.stateDict())
    const c = new p.Kron(tree(1), { ...draw, preconditionerUpdateProbability: 1, overlapFit: true })
    c.step(tree(2))
    c.stepAsync(tree(3)).then(
      () => { result.asyncError = null },
      (e) => { result.asyncError = { cls: e.constructor.name, message: e.message } },
    ).then(() => {
      result.asyncCount = c.count
      c.dispose()
      const fn = p.kron({ ...draw, preconditionerUpdateProbability: 1, overlapFit: true })
      const st = fn.init(tree(1))
      fn.update(tree(2), st)
      const copy = st.clone()
      result.cloneSharesError = catching(() => copy.toBytes())
      result.originalError = catching(() => st.toBytes())
      // dispose drops a failed fit without raising it
      const d = new p.Kron(tree(1), { ...draw, preconditionerUpdateProbability: 1, overlapFit: true })
      d.step(tree(2))
      result.disposeError = catching(() => d.dispose())
      console.log(JSON.stringify(result))
    })
  `,
    { PSGD_TEST_FAIL_FIT: '1' },
  )
  const r = JSON.parse(out) as Record<string, unknown>
  const failed = { cls: 'Error', message: 'kron: the preconditioner fit failed (PSGD_TEST_FAIL_FIT)' }
  t.is(r.count, 1)
  t.deepEqual(r.stepError, failed)
  t.is(r.countAfterError, 1)
  t.true(r.paramsKept)
  t.true(r.stateAsStepLeft)
  t.is(r.nextStep, null)
  t.is(r.countAtEnd, 2)
  t.deepEqual(r.saveError, failed)
  t.is(r.saveAfter, null)
  t.deepEqual(r.asyncError, failed)
  t.is(r.asyncCount, 1)
  t.deepEqual(r.cloneSharesError, failed)
  t.deepEqual(r.originalError, failed)
  t.is(r.disposeError, null)
})

// the TensorFlow.js optimizers on the cpu backend: model.fit and minimize

const tfjsClasses = { kron: KronOptimizer, xmat: XMatOptimizer, lra: LRAOptimizer, affine: AffineOptimizer } as const
let uid = 0

/** A 4-8-1 tanh MLP compiled with a new `Opt(options)`, and 64 samples of a linear target. */
function tinyModel(Opt: typeof KronOptimizer, options: Options): { model: tfl.Sequential; opt: KronOptimizer; x: tf.Tensor2D; y: tf.Tensor2D } {
  const model = tfl.sequential()
  model.add(
    tfl.layers.dense({ units: 8, activation: 'tanh', inputShape: [4], kernelInitializer: tfl.initializers.glorotUniform({ seed: 1 }), name: `ov_d1_${uid}` }),
  )
  model.add(tfl.layers.dense({ units: 1, kernelInitializer: tfl.initializers.glorotUniform({ seed: 2 }), name: `ov_d2_${uid++}` }))
  const opt = new Opt(options)
  model.compile({ optimizer: opt, loss: 'meanSquaredError' })
  const x = tf.tensor2d(Float32Array.from(values(64 * 4, 5)), [64, 4])
  const y = tf.tidy(() => tf.sum(tf.mul(x, tf.tensor([0.5, -1, 2, 0.25])), 1, true) as tf.Tensor2D)
  return { model, opt, x, y }
}

/** The tensors of a TensorFlow.js optimizer's live states (by tensor name, as bytes), and their counts. */
function states(opt: tf.Optimizer) {
  const groups = (opt as unknown as { book: { groups: Map<string, { state: { count: number; toBytes(): Uint8Array } }> } }).book.groups
  return [...groups.values()].map((g) => ({ count: g.state.count, tensors: [...parse(g.state.toBytes()).tensors.values()].map((e) => Buffer.from(e.data)) }))
}

for (const [name, Opt] of Object.entries(tfjsClasses)) {
  test.serial(`tfjs cpu: ${name} model.fit and minimize with overlapFit equal the sequential order bit for bit, getWeights included`, async (t) => {
    const o = { learningRate: 0.01, preconditionerUpdateProbability: 1 }
    const runs = []
    for (const options of [overlapped(o), sequential(o)]) {
      const { model, opt, x, y } = tinyModel(Opt as typeof KronOptimizer, options)
      await model.fit(x, y, { epochs: 3, batchSize: 16, shuffle: false, verbose: 0 })
      const w = tf.variable(tf.tensor(Float32Array.from(values(6, 9)), [2, 3]), true, `ov_w_${uid++}`)
      for (let i = 0; i < 5; i++) opt.minimize(() => tf.sum(tf.square(w)) as tf.Scalar)
      const weights = model.getWeights().map((v) => bitsOf(v.dataSync() as Float32Array))
      // getWeights waits for the fit in flight; the states' tensors (their names differ by run)
      const packed = await opt.getWeights()
      t.is(packed.length, 3)
      const saved = states(opt)
      runs.push({ weights: [...weights, bitsOf(w.dataSync() as Float32Array)], saved })
      opt.dispose()
    }
    t.deepEqual(runs[0].weights, runs[1].weights)
    t.deepEqual(runs[0].saved, runs[1].saved)
    t.is(runs[0].saved.length, 2)
  })
}

test.serial('tfjs cpu: setWeights into an optimizer with a fit in flight restores the saved state', async (t) => {
  const o = overlapped({ learningRate: 0.01, preconditionerUpdateProbability: 1 })
  const opt = new KronOptimizer(o)
  const w = tf.variable(tf.tensor(Float32Array.from(values(6, 9)), [2, 3]), true, `ov_w_${uid++}`)
  const loss = () => tf.sum(tf.square(w)) as tf.Scalar
  opt.minimize(loss)
  const saved = await opt.getWeights()
  const before = saved.map((v) => bitsOf(Float32Array.from(v.tensor.dataSync() as Float32Array)))
  opt.minimize(loss)
  await opt.setWeights(saved)
  const after = (await opt.getWeights()).map((v) => bitsOf(Float32Array.from(v.tensor.dataSync() as Float32Array)))
  t.deepEqual(after, before)
  opt.dispose()
})

test("stats() with a fit in flight waits for it: the fit is counted and timed, and the counts (the health guard's too) are the sequential order's", (t) => {
  for (const extra of [{ preconditionerUpdateProbability: 1 }, { preconditionerUpdateProbability: 1, onUnhealthy: 'reset', maxCondition: 1.0001 }]) {
    const o = new Kron(arrays(1), overlapped(extra))
    const s = new Kron(arrays(1), sequential(extra))
    for (let n = 0; n < 6; n++) {
      o.step(arrays(10 + n))
      s.step(arrays(10 + n))
      // read right after the step returned, while its fit may still run on the worker
      const [so, ss] = [o.stats(), s.stats()]
      const label = `${JSON.stringify(extra)} step ${n + 1}`
      t.true(so.fitted, label)
      t.true((so.times?.fitMs ?? 0) > 0, `${label}: the worker's fit time`)
      t.is(so.fits, ss.fits, label)
      t.deepEqual(
        so.leaves.map((l) => [l.resets, l.dropped]),
        ss.leaves.map((l) => [l.resets, l.dropped]),
        label,
      )
      t.deepEqual(
        so.factors.map((f) => [f.condition, f.normaliser]),
        ss.factors.map((f) => [f.condition, f.normaliser]),
        label,
      )
    }
    if ('onUnhealthy' in extra)
      t.true(
        o.stats().leaves.some((l) => l.resets > 0),
        'the guard acted on the worker',
      )
    t.deepEqual(treeBits(o.params), treeBits(s.params))
  }
})
