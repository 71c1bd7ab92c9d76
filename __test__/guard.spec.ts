import '@tensorflow/tfjs-backend-cpu'
import * as tf from '@tensorflow/tfjs-core'
import test from 'ava'
import { Affine, kron, Kron, Tensor, XMat, type PsgdWarning } from '../index'
import { diverging, WATCH_EVERY } from '../src/guard'
import { KronOptimizer } from '../tfjs'
import { leaf, snapshot, values } from './helpers'
import { mlpLossAndGrad, mlpParams, type Mlp } from './mlp'
import { parse, write } from './safetensors'

test.before(async () => {
  await tf.setBackend('cpu')
})

/** `steps` steps of `opt` on the MLP; returns the warnings its hook got. */
function train(make: (p: Mlp, onWarning: (w: PsgdWarning) => void) => { step(g: Mlp): void }, steps: number): PsgdWarning[] {
  const p = mlpParams()
  const got: PsgdWarning[] = []
  const opt = make(p, (w) => got.push(w))
  for (let t = 0; t < steps; t++) opt.step(mlpLossAndGrad(p).grads)
  return got
}

/** Process warnings emitted while `f` runs (a microtask later, as Node emits them). */
async function processWarnings(f: () => void | Promise<void>): Promise<Error[]> {
  const got: Error[] = []
  const on = (w: Error) => got.push(w)
  process.on('warning', on)
  try {
    await f()
    await new Promise((r) => setImmediate(r))
  } finally {
    process.off('warning', on)
  }
  return got
}

test('the divergence warning fires once on a diverging run (Affine, XMat at a far too large learning rate) and never on healthy ones', (t) => {
  for (const [name, make] of [
    ['affine', (p: Mlp, onWarning: (w: PsgdWarning) => void) => new Affine(p, { learningRate: 0.5, onWarning })],
    ['xmat', (p: Mlp, onWarning: (w: PsgdWarning) => void) => new XMat(p, { learningRate: 0.5, onWarning })],
  ] as const) {
    const got = train(make, 300)
    t.is(got.length, 1, name)
    const w = got[0]
    t.is(w.code, 'PSGD_DIVERGING')
    t.is(w.optimizer, name)
    t.is(w.step % WATCH_EVERY, 0)
    t.true(w.step <= 100, `${name}: warned at step ${w.step}`)
    t.true(w.norm >= 100 * w.reference, `${w.norm} vs ${w.reference}`)
    t.regex(w.message, /diverging.*Lower learningRate.*clip the steps.*onUnhealthy: 'reset' resets such factors/s)
  }
  // healthy: the same MLP at usual learning rates
  t.deepEqual(
    train((p, onWarning) => new Affine(p, { learningRate: 0.01, onWarning }), 400),
    [],
  )
  t.deepEqual(
    train((p, onWarning) => new Kron(p, { learningRate: 0.003, onWarning }), 400),
    [],
  )
})

test('the divergence rule: steady multiplying growth warns; a fast rise that settles (zero-initialised params) and noise do not', (t) => {
  const exp = Array.from({ length: 12 }, (_, i) => 2 * 1.8 ** i)
  t.true(diverging(exp))
  t.false(diverging(exp.slice(0, 5)), 'too few samples')
  t.true(diverging([1, 2, NaN]))
  // linear regression from zero: 0, then up to the solution and flat
  const settle = Array.from({ length: 60 }, (_, i) => 10 * (1 - 0.93 ** i))
  t.false(diverging(settle))
  // linear growth from a tiny first sample: far above it, but no longer multiplying
  const linear = Array.from({ length: 200 }, (_, i) => 0.01 * (i + 1))
  t.false(diverging(linear))
  // large but oscillating
  t.false(diverging(Array.from({ length: 40 }, (_, i) => (i < 10 ? 1 : 500 + (i % 2) * 100))))
})

test.serial('the default hook is process.emitWarning with type PsgdWarning and code PSGD_DIVERGING; onWarning: null silences it', async (t) => {
  const noisy = await processWarnings(() => {
    const p = mlpParams()
    const opt = new Affine(p, { learningRate: 0.5 })
    for (let i = 0; i < 120; i++) opt.step(mlpLossAndGrad(p).grads)
  })
  const ours = noisy.filter((w) => w.name === 'PsgdWarning' && (w as Error & { code?: string }).code === 'PSGD_DIVERGING')
  t.is(ours.length, 1)
  t.regex(ours[0].message, /^affine: the params' L2 norm grew/)
  const quiet = await processWarnings(() => {
    const p = mlpParams()
    const opt = new Affine(p, { learningRate: 0.5, onWarning: null })
    for (let i = 0; i < 120; i++) opt.step(mlpLossAndGrad(p).grads)
  })
  t.deepEqual(
    quiet.filter((w) => w.name === 'PsgdWarning'),
    [],
  )
})

test.serial('a throwing onWarning hook does not break the step: the step stands and the failure is a process warning', async (t) => {
  const p = mlpParams()
  let calls = 0
  const opt = new Affine(p, {
    learningRate: 0.5,
    onWarning: () => {
      calls++
      throw new Error('hook broke')
    },
  })
  const got = await processWarnings(() => {
    for (let i = 0; i < 120; i++) opt.step(mlpLossAndGrad(p).grads)
  })
  t.is(calls, 1)
  t.is(opt.count, 120)
  const failed = got.filter((w) => (w as Error & { code?: string }).code === 'PSGD_WARNING_HOOK_FAILED')
  t.is(failed.length, 1)
  t.regex(failed[0].message, /hook broke/)
})

test('the warning works under stepAsync and on the TensorFlow.js optimizer', async (t) => {
  const p = mlpParams()
  const got: PsgdWarning[] = []
  const opt = new Affine(p, { learningRate: 0.5, onWarning: (w) => got.push(w) })
  for (let i = 0; i < 120; i++) await opt.stepAsync(mlpLossAndGrad(p).grads)
  t.is(got.length, 1)

  const start = mlpParams()
  const vars = Object.fromEntries(Object.entries(start).map(([k, l]) => [k, tf.variable(tf.tensor(l.data, l.shape), true, `guard_${k}`)]))
  const seen: PsgdWarning[] = []
  const tfOpt = new KronOptimizer({ learningRate: 1, onWarning: (w) => seen.push(w) })
  t.notThrows(() => tfOpt.getConfig(), 'a hook is left out of the config')
  for (let i = 0; i < 300 && seen.length === 0; i++) {
    const now = Object.fromEntries(Object.entries(vars).map(([k, v]) => [k, { data: v.dataSync() as Float32Array, shape: v.shape }])) as Mlp
    const { grads } = mlpLossAndGrad(now)
    tfOpt.applyGradients(Object.entries(grads).map(([k, g]) => ({ name: `guard_${k}`, tensor: tf.tensor(g.data, g.shape) })))
  }
  t.is(seen.length, 1)
  t.is(seen[0].optimizer, 'kron')
  tfOpt.dispose()
  Object.values(vars).forEach((v) => v.dispose())
})

const overflow = { learningRate: 3e38, preconditionerUpdateProbability: 1 }
const bigGrads = () => ({
  w: leaf(
    values(12, 3).map((x) => x * 1e3),
    [4, 3],
  ),
  b: leaf(values(5, 4).map((x) => x * 1e3)),
})
const someParams = () => ({ w: leaf(values(12, 1), [4, 3]), b: leaf(values(5, 2)) })

test("onUnhealthy: 'throw' (default) refuses a step whose updates overflow; 'skip' and 'reset' leave the params as they were and count the step", (t) => {
  const p = someParams()
  const thrower = new Kron(p, overflow)
  t.throws(() => thrower.step(bigGrads()), { instanceOf: RangeError, message: /would hold NaN or Inf/ })
  t.is(thrower.count, 0)
  for (const onUnhealthy of ['skip', 'reset'] as const) {
    const q = someParams()
    const before = snapshot(q)
    const opt = new Kron(q, { ...overflow, onUnhealthy })
    opt.step(bigGrads())
    t.deepEqual(snapshot(q), before, onUnhealthy)
    t.is(opt.count, 1)
    // Tensor params, written natively
    const tp = { w: Tensor.fromArray(someParams().w.data, [4, 3]), b: Tensor.fromArray(someParams().b.data, [5]) }
    const tBefore = snapshot(tp)
    const tOpt = new Kron(tp, { ...overflow, onUnhealthy })
    tOpt.step(bigGrads())
    t.deepEqual(snapshot(tp), tBefore, `${onUnhealthy}: Tensor params`)
    t.is(tOpt.count, 1)
    // the functional API gives zero updates
    const f = kron({ ...overflow, onUnhealthy })
    const [u] = f.update(bigGrads(), f.init(someParams()), someParams())
    t.true(
      Object.values(u as Record<string, { data: Float32Array }>).every((l) => l.data.every((x) => x === 0)),
      onUnhealthy,
    )
  }
})

test("a NaN factor loaded with allowNonFinite: 'throw' lets NaN into the params, 'reset' recovers and steps on", (t) => {
  const grads = () => ({ w: leaf(values(12, 5), [4, 3]), b: leaf(values(5, 6)) })
  const base = new Kron(someParams(), { allowNonFinite: true })
  base.step(grads())
  const f = parse(base.stateDict())
  new Float32Array(f.tensors.get('Q.0.0')!.data.buffer).fill(NaN, 0, 1)
  const sick = write(f)
  for (const onUnhealthy of ['throw', 'reset'] as const) {
    const p = someParams()
    const opt = new Kron(p, { allowNonFinite: true, onUnhealthy })
    opt.loadStateDict(sick)
    for (let i = 0; i < 5; i++) opt.step(grads())
    const finite = [...p.w.data, ...p.b.data].every(Number.isFinite)
    // 'throw' with allowNonFinite lets NaN through (psgd-jax's behaviour); 'reset' does not
    t.is(finite, onUnhealthy === 'reset', onUnhealthy)
  }
  const checked = new Kron(someParams(), { allowNonFinite: false })
  t.throws(() => checked.loadStateDict(sick), { instanceOf: RangeError })
})

test('bad guard options are typed errors naming the option', (t) => {
  const p = someParams()
  t.throws(() => new Kron(p, { onUnhealthy: 'retry' as never }), { instanceOf: TypeError, message: /onUnhealthy.*'throw', 'reset', 'skip'/ })
  t.throws(() => new Affine(p, { maxCondition: 1 }), { instanceOf: RangeError, message: /maxCondition.*> 1/ })
  t.throws(() => kron({ maxCondition: 'big' as never }), { instanceOf: TypeError, message: /maxCondition/ })
  t.throws(() => new Kron(p, { onWarning: 5 as never }), { instanceOf: TypeError, message: /onWarning.*function/ })
  t.notThrows(() => new Kron(p, { onUnhealthy: 'skip', maxCondition: null, onWarning: null }))
})
