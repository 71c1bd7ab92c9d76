import test from 'ava'
import { applyUpdates, hessianHelper, kron, Kron, kronStateSize, precondUpdateProbSchedule, Tensor, type ArrayLeaf, type PyTree } from '../index'
import { leaf, snapshot, sumSquares, twice, values } from './helpers'

test("the seed's quadratic toy problem converges below 1e-4 (the README's code)", (t) => {
  const console = { log: (x: number) => losses.push(x) }
  const losses: number[] = []
  // --- README: the seed's toy problem (keep in sync) ---
  let params = { data: Float32Array.from([1, 2, 3]), shape: [3] }
  const opt = kron({ learningRate: 0.1, b1: 0, preconditionerUpdateProbability: 1 })
  let optState = opt.init(params)
  for (;;) {
    const loss = params.data.reduce((s, x) => s + x * x, 0)
    console.log(loss)
    if (loss < 1e-4) break
    const grad = { data: params.data.map((x) => 2 * x), shape: [3] }
    let updates
    ;[updates, optState] = opt.update(grad, optState)
    params = applyUpdates(params, updates)
  }
  // --- end ---
  t.is(losses[0], 14)
  t.true(losses[losses.length - 1] < 1e-4)
  t.true(losses.length < 200, `${losses.length} steps`)
  t.is(optState.count, losses.length - 1)
})

test("the README's class example runs as written", async (t) => {
  // --- README: class style (keep in sync) ---
  const params = { w: Tensor.fromArray(new Float32Array(64 * 64).fill(0.1), [64, 64]), b: { data: new Float32Array(64), shape: [64] } }
  const grads = { w: Tensor.fromArray(new Float32Array(64 * 64).fill(0.01), [64, 64]), b: { data: new Float32Array(64).fill(0.01), shape: [64] } }
  const opt = new Kron(params, { learningRate: 3e-4 })
  const w = params.w
  opt.step(grads) // params.w and params.b now hold the new values
  await opt.stepAsync(grads) // the same work off the JS main thread
  const bytes = opt.stateDict() // safetensors bytes
  opt.loadStateDict(bytes)
  // --- end ---
  t.is(params.w, w)
  t.is(opt.count, 2)
  t.true(params.b.data.every((x) => x < 0))
  t.true(params.w.toArray().every((x) => x < 0.1))
})

test('the quadratic converges with the default options and a Tensor leaf (class style)', (t) => {
  const params = { p: Tensor.fromArray([1, 2, 3], [3]) }
  const opt = new Kron(params, { learningRate: 0.01 })
  let loss = sumSquares(params)
  for (let i = 0; i < 1000 && loss >= 1e-4; i++) {
    opt.step(twice(params))
    loss = sumSquares(params)
  }
  t.true(loss < 1e-4, `loss ${loss}`)
  t.true(opt.params.p instanceof Tensor)
})

test("the README's quick start runs as written", (t) => {
  // --- README quick start (keep in sync) ---
  const params = {
    dense: { w: { data: new Float32Array(64 * 32).fill(0.01), shape: [64, 32] }, b: { data: new Float32Array(32), shape: [32] } },
    scale: 1.0,
  }
  const grads = {
    dense: { w: { data: new Float32Array(64 * 32).fill(0.1), shape: [64, 32] }, b: { data: new Float32Array(32).fill(0.1), shape: [32] } },
    scale: 0.5,
  }
  const optimizer = kron({ learningRate: 3e-4, weightDecay: 1e-4 })
  let optState = optimizer.init(params)
  let updates
  ;[updates, optState] = optimizer.update(grads, optState, params)
  const newParams = applyUpdates(params, updates)
  // --- end ---
  t.is(optState.count, 1)
  t.deepEqual((newParams.dense.w as { shape: number[] }).shape, [64, 32])
  t.is(typeof newParams.scale, 'number')
  t.not(newParams.scale, 1.0)
})

test('every leaf rank works: 0-d, 1-d, 2-d, 3-d, 4-d, and a dim above maxSizeTriangular', (t) => {
  const shapes = [[], [5], [4, 3], [3, 2, 4], [2, 3, 2, 2], [40, 3]]
  const params: Record<string, PyTree> = {}
  shapes.forEach((s, i) => {
    const n = s.reduce((a, b) => a * b, 1)
    params[`l${i}`] = leaf(values(n, i + 1), s)
  })
  const opt = new Kron(params, { learningRate: 0.05, maxSizeTriangular: 16, preconditionerUpdateProbability: 1 })
  const start = sumSquares(params)
  for (let i = 0; i < 30; i++) opt.step(twice(params))
  const end = sumSquares(params)
  t.true(end < start * 0.5, `${start} -> ${end}`)
  for (const [k, v] of Object.entries(params)) t.deepEqual((v as { shape: number[] }).shape, shapes[Number(k.slice(1))])
})

test('updates mirror the leaf kinds of the grads', (t) => {
  const params = { a: Tensor.fromArray([1, 2], [2]), b: leaf([1, 2]), c: 3 }
  const opt = kron()
  const state = opt.init(params)
  const [u] = opt.update({ a: leaf([1, 1]), b: Tensor.fromArray([1, 1], [2]), c: 1 }, state) as [Record<string, unknown>, unknown]
  t.false(u.a instanceof Tensor)
  t.true(u.b instanceof Tensor)
  t.is(typeof u.c, 'number')
})

test('the same seed gives the same run; another seed another one', (t) => {
  const run = (seed: number) => {
    const params = { w: leaf(values(12, 7), [3, 4]) }
    const opt = new Kron(params, { seed, learningRate: 0.1, preconditionerUpdateProbability: 1 })
    for (let i = 0; i < 5; i++) opt.step({ w: leaf(values(12, 100 + i), [3, 4]) })
    return Array.from(params.w.data)
  }
  t.deepEqual(run(1), run(1))
  t.notDeepEqual(run(1), run(2))
})

test('state.clone() is independent of the original', (t) => {
  const opt = kron({ learningRate: 0.1 })
  const params = { w: leaf(values(6, 3), [2, 3]) }
  const s1 = opt.init(params)
  opt.update({ w: leaf(values(6, 4), [2, 3]) }, s1)
  const s2 = s1.clone()
  const before = s1.toBytes()
  const [u2] = opt.update({ w: leaf(values(6, 5), [2, 3]) }, s2)
  t.is(s1.count, 1)
  t.is(s2.count, 2)
  t.deepEqual(s1.toBytes(), before)
  // the original, stepped the same way, gives the same updates
  const [u1] = opt.update({ w: leaf(values(6, 5), [2, 3]) }, s1)
  t.deepEqual(snapshot(u1), snapshot(u2))
})

test('stepAsync gives exactly what step gives', async (t) => {
  const make = () => ({ w: leaf(values(20, 9), [4, 5]), b: leaf(values(5, 10)) })
  const p1 = make()
  const p2 = make()
  const o1 = new Kron(p1, { learningRate: 0.1, preconditionerUpdateProbability: 1 })
  const o2 = new Kron(p2, { learningRate: 0.1, preconditionerUpdateProbability: 1 })
  for (let i = 0; i < 4; i++) {
    o1.step(twice(p1))
    await o2.stepAsync(twice(p2))
  }
  t.deepEqual(snapshot(p1), snapshot(p2))
  t.is(o2.count, 4)
})

test('a second step while stepAsync runs is refused and changes nothing', async (t) => {
  const params = { w: leaf(values(20, 9), [4, 5]) }
  const opt = new Kron(params)
  const pending = opt.stepAsync(twice(params))
  t.throws(() => opt.step(twice(params)), { message: /stepAsync is still running/ })
  await pending
  t.is(opt.count, 1)
})

test('stateDict / loadStateDict round-trip continues the run exactly', (t) => {
  const grads = (i: number) => ({ w: leaf(values(12, 50 + i), [3, 4]), s: 0.1 * i })
  const params = { w: leaf(values(12, 1), [3, 4]), s: 0.5 }
  const opt = new Kron(params, { learningRate: 0.1, preconditionerUpdateProbability: 0.5 })
  for (let i = 0; i < 3; i++) opt.step(grads(i))
  const bytes = opt.stateDict()
  t.true(bytes instanceof Uint8Array)
  const saved = snapshot(params) as { w: { data: number[] }; s: number }

  for (let i = 3; i < 6; i++) opt.step(grads(i))
  const direct = snapshot(params)

  const params2 = { w: leaf(saved.w.data, [3, 4]), s: saved.s }
  const opt2 = new Kron(params2, { learningRate: 0.1, preconditionerUpdateProbability: 0.5 })
  opt2.loadStateDict(bytes)
  t.is(opt2.count, 3)
  for (let i = 3; i < 6; i++) opt2.step(grads(i))
  t.deepEqual(snapshot(params2), direct)
})

test('schedules: learningRate sees the count before the step, the probability the count after', (t) => {
  const lrSteps: number[] = []
  const probSteps: number[] = []
  const opt = kron({
    learningRate: (n) => (lrSteps.push(n), 0.01),
    preconditionerUpdateProbability: (n) => (probSteps.push(n), 1),
  })
  const params = leaf([1, 2])
  const s = opt.init(params)
  for (let i = 0; i < 3; i++) opt.update(twice(params), s)
  t.deepEqual(lrSteps, [0, 1, 2])
  t.deepEqual(probSteps, [1, 2, 3])
})

test('precondUpdateProbSchedule follows psgd-jax', (t) => {
  const f = precondUpdateProbSchedule()
  t.is(f(0), 1)
  t.is(f(500), 1)
  t.true(Math.abs(f(1500) - Math.exp(-1)) < 1e-6)
  t.is(f(100000), Math.fround(0.03))
  const g = precondUpdateProbSchedule({ maxProb: 0.5, minProb: 0.1, decay: 0.01, flatStart: 0 })
  t.is(g(0), 0.5)
  t.true(Math.abs(g(100) - Math.fround(0.5 * Math.exp(-1))) < 1e-6)
  t.is(g(1000), Math.fround(0.1))
})

test('weight decay follows the mask (tree and predicate)', (t) => {
  const zeros = { a: leaf([0, 0]), b: leaf([0, 0]) }
  for (const weightDecayMask of [{ a: true, b: false }, (path: string) => path === 'a']) {
    const params = { a: leaf([1, 2]), b: leaf([1, 2]) }
    const opt = kron({ learningRate: 0.1, weightDecay: 0.5, weightDecayMask })
    const s = opt.init(params)
    const [u] = opt.update(zeros, s, params) as [Record<string, { data: Float32Array }>, unknown]
    t.deepEqual(Array.from(u.a.data), [-0.05, -0.1].map(Math.fround))
    t.deepEqual(Array.from(u.b.data), [0, 0])
  }
})

test('scanned layers: one preconditioner per layer, with and without laxMap batching', (t) => {
  const run = (opts: object) => {
    const params = { stack: leaf(values(3 * 4 * 5, 11), [3, 4, 5]), b: leaf(values(5, 12)) }
    const opt = new Kron(params, { learningRate: 0.1, preconditionerUpdateProbability: 1, scannedLayers: { stack: true, b: false }, ...opts })
    for (let i = 0; i < 3; i++) opt.step(twice(params))
    return { params: snapshot(params), bytes: opt.stateDict().length }
  }
  const plain = run({})
  const batched = run({ laxMapScannedLayers: true, laxMapBatchSize: 2 })
  const unscanned = run({ scannedLayers: () => false })
  t.deepEqual(plain.params, batched.params)
  t.notDeepEqual(plain.params, unscanned.params)
})

test('bfloat16 factors and momentum, bfloat16 matmul precision, and the memory modes all train', (t) => {
  const variants: object[] = [
    { precondDtype: 'bfloat16' },
    { muDtype: 'bfloat16' },
    { precondUpdatePrecision: 'bfloat16', precondGradsPrecision: 'bfloat16' },
    { precondUpdatePrecision: 'float32', precondGradsPrecision: 'tensorfloat32' },
    { memorySaveMode: 'one_diag' },
    { memorySaveMode: 'all_diag' },
    { momentumIntoPrecondUpdate: false, preconditionerLr: 0.2, preconditionerInitScale: 0.5 },
  ]
  for (const v of variants) {
    const params = { w: leaf(values(24, 3), [4, 6]), b: leaf(values(6, 4)) }
    const opt = new Kron(params, { learningRate: 0.02, preconditionerUpdateProbability: 1, ...v })
    const start = sumSquares(params)
    for (let i = 0; i < 40; i++) opt.step(twice(params))
    const end = sumSquares(params)
    t.true(end < 0.5 * start, `${JSON.stringify(v)}: ${start} -> ${end}`)
  }
})

test('bfloat16 option choices change the numbers (they are not ignored)', (t) => {
  const run = (v: object) => {
    const params = { w: leaf(values(24, 3), [4, 6]) }
    const opt = new Kron(params, { learningRate: 0.02, preconditionerUpdateProbability: 1, ...v })
    for (let i = 0; i < 3; i++) opt.step(twice(params))
    return Array.from(params.w.data)
  }
  const base = run({})
  t.notDeepEqual(run({ precondDtype: 'bfloat16' }), base)
  t.notDeepEqual(run({ precondUpdatePrecision: 'bfloat16' }), base)
  t.deepEqual(run({ precondUpdatePrecision: 'float32' }), base)
})

test('a leaf with 14 axes gets one factor per axis (no axis limit)', (t) => {
  const shape = new Array(14).fill(2)
  const params = { t: leaf(values(2 ** 14, 21), shape) }
  const opt = new Kron(params, { learningRate: 0.05, preconditionerUpdateProbability: 1 })
  const start = sumSquares(params)
  for (let i = 0; i < 5; i++) opt.step(twice(params))
  t.true(sumSquares(params) < start)
  t.deepEqual(params.t.shape, shape)
  // 14 triangular 2×2 factors and the momentum in the state
  const header = JSON.parse(
    Buffer.from(opt.stateDict())
      .subarray(8, 8 + Number(Buffer.from(opt.stateDict()).readBigUInt64LE(0)))
      .toString(),
  )
  t.is(Object.keys(header).filter((k) => k.startsWith('Q.0.')).length, 14)
})

test('preconditionerInitScale: null takes the initial scale from the first gradient, so the first update does not depend on the gradient scale', (t) => {
  const first = (k: number, preconditionerInitScale: number | null | undefined) => {
    const opt = kron({ learningRate: 0.1, preconditionerUpdateProbability: 0, preconditionerInitScale })
    const params = { w: leaf(values(24, 3), [4, 6]) }
    const st = opt.init(params)
    const [u] = opt.update(
      {
        w: leaf(
          values(24, 5).map((v) => v * k),
          [4, 6],
        ),
      },
      st,
      params,
    ) as [{ w: ArrayLeaf }, unknown]
    return Array.from(u.w.data)
  }
  const unit = first(1, null)
  for (const k of [1e-4, 1e3]) {
    const scaled = first(k, null)
    scaled.forEach((v, i) => t.true(Math.abs(v - unit[i]) <= 1e-5 * Math.abs(unit[i]) + 1e-9, `k=${k}, [${i}]: ${v} vs ${unit[i]}`))
  }
  // psgd-jax's default (scale 1): a small gradient gives a proportionally small first update
  const plain = first(1, undefined)
  const small = first(1e-4, undefined)
  t.true(Math.abs(small[0]) < 1e-3 * Math.abs(plain[0]), `${small[0]} vs ${plain[0]}`)
  // the automatic scale trains, and a string is still a TypeError
  const params = { w: leaf(values(24, 3), [4, 6]), b: leaf(values(6, 4)) }
  const opt = new Kron(params, { learningRate: 0.02, preconditionerInitScale: null })
  const start = sumSquares(params)
  for (let i = 0; i < 40; i++) opt.step(twice(params))
  t.true(sumSquares(params) < 0.5 * start)
  t.throws(() => kron({ preconditionerInitScale: 'auto' as unknown as number }), { instanceOf: TypeError, message: /preconditionerInitScale/ })
})

test('preconditionerInitScale: null after a tiny first gradient: later ordinary steps are accepted, finite and train', (t) => {
  const tiny: [string, (i: number) => number][] = [
    ['1e-33', () => 1e-33],
    ['1e-38', (i) => (i % 2 ? -1e-38 : 1e-38)],
    ['subnormal 1e-44', () => 1e-44],
    ['one entry of 1e-40, the rest 0', (i) => (i === 5 ? 1e-40 : 0)],
    ['one entry of 1e-30, the rest 0', (i) => (i === 0 ? 1e-30 : 0)],
  ]
  for (const [name, g] of tiny) {
    for (const momentumIntoPrecondUpdate of [true, false]) {
      const params = { w: leaf(values(24, 3), [4, 6]), b: leaf(values(6, 4)), s: 0.5 }
      const opt = new Kron(params, { learningRate: 0.01, preconditionerInitScale: null, momentumIntoPrecondUpdate })
      opt.step({
        w: leaf(
          Array.from({ length: 24 }, (_, i) => g(i)),
          [4, 6],
        ),
        b: leaf(Array.from({ length: 6 }, (_, i) => g(i))),
        s: g(0),
      })
      const start = sumSquares(params)
      for (let i = 0; i < 60; i++) t.notThrows(() => opt.step(twice(params)), `${name}, step ${i + 1}`)
      t.is(opt.count, 61)
      const flat = [...params.w.data, ...params.b.data, params.s]
      t.true(
        flat.every((v) => Number.isFinite(v)),
        name,
      )
      t.true(sumSquares(params) < 0.9 * start, `${name}: ${sumSquares(params)} vs ${start}`)
    }
  }
})

test('a refused non-finite step says where float32 overflowed, not "an extreme option"', (t) => {
  // an initial scale of 1e-20 overflows float32 in the preconditioner fit
  const params = { w: leaf(values(30, 1), [6, 5]) }
  const opt = kron({ learningRate: 0.01, preconditionerUpdateProbability: 1, preconditionerInitScale: 1e-20 })
  const st = opt.init(params)
  const err = t.throws(() => opt.update({ w: leaf(values(30, 2), [6, 5]) }, st, params), { instanceOf: RangeError })
  t.regex(
    err.message,
    /the updates of 'w' would hold NaN or Inf: the preconditioned gradient overflowed float32 \(largest \|gradient\| [0-9.e+-]+\): the preconditioner's scale does not suit gradients of this size.*allowNonFinite/,
  )
  t.notRegex(err.message, /extreme option/)
  t.is(st.count, 0)
})

test("updateRule: every rule solves the seed's toy problem and trains a 2-D leaf with finite updates", (t) => {
  for (const updateRule of ['EQ', 'Q0.5EQ1.5', 'PRO', 'QUAD', 'QEQ', 'QEP', 'PRO4P', 'QUAD4P'] as const) {
    let params = { data: Float32Array.from([1, 2, 3]), shape: [3] }
    const opt = kron({ learningRate: 0.1, b1: 0, preconditionerUpdateProbability: 1, updateRule })
    let state = opt.init(params)
    let steps = 0
    for (; steps < 500; steps++) {
      if (params.data.reduce((s, x) => s + x * x, 0) < 1e-4) break
      let updates
      ;[updates, state] = opt.update({ data: params.data.map((x) => 2 * x), shape: [3] }, state)
      params = applyUpdates(params, updates)
    }
    t.true(steps < 500, `${updateRule}: ${steps} steps`)
    // a 2-D leaf (two dense factors) on a badly scaled quadratic, class style
    const w = {
      w: Tensor.fromArray(
        Float32Array.from({ length: 24 }, (_, i) => Math.sin(i + 1)),
        [6, 4],
      ),
    }
    const cls = new Kron(w, { learningRate: 0.02, updateRule, preconditionerUpdateProbability: 1 })
    const loss = () => w.w.toArray().reduce((s, x, i) => s + (1 + (i % 4)) * x * x, 0)
    const start = loss()
    for (let i = 0; i < 100; i++) {
      const g = w.w.toArray().map((x, i) => 2 * (1 + (i % 4)) * x)
      cls.step({ w: Tensor.fromArray(g, [6, 4]) })
      t.true(w.w.toArray().every(Number.isFinite))
    }
    t.true(loss() < 0.1 * start, `${updateRule}: ${start} -> ${loss()}`)
    // the rule's state (the Lipschitz bounds under the inverse-free rules) round-trips
    const bytes = cls.stateDict()
    cls.loadStateDict(bytes)
    t.deepEqual(cls.stateDict(), bytes)
  }
})

test('updateRule: an unknown rule is a TypeError naming the option and the valid rules; lipschitzBeta out of [0, 1) a RangeError', (t) => {
  const params = { data: Float32Array.from([1, 2, 3]), shape: [3] }
  for (const make of [() => kron({ updateRule: 'pro' as never }).init(params), () => new Kron(params, { updateRule: 'Q0p5EQ1p5' as never })]) {
    const err = t.throws(make)
    t.true(err instanceof TypeError || err instanceof RangeError, String(err))
    t.regex(err.message, /updateRule/)
    t.regex(err.message, /'Q0\.5EQ1\.5'/)
    t.regex(err.message, /'QUAD'/)
  }
  t.throws(() => kron({ updateRule: 'QUAD', lipschitzBeta: 1 }).init(params), { instanceOf: RangeError, message: /lipschitzBeta/ })
})

test("updateDecision: 'draw' fits on a random subset of steps, 'counter' on every 1/p-th; a bad value is a TypeError", (t) => {
  // with b1 0 and a fixed gradient, a step's update changes from the last one exactly when
  // the preconditioner was fitted
  const fitted = (updateDecision: 'counter' | 'draw', p: number, steps = 21) => {
    const opt = kron({ learningRate: 0.01, b1: 0, updateRule: 'PRO', preconditionerUpdateProbability: p, updateDecision, seed: 3 })
    const params = { data: new Float32Array(12), shape: [3, 4] }
    const grad = { data: Float32Array.from({ length: 12 }, (_, i) => Math.sin(i + 1)), shape: [3, 4] }
    let state = opt.init(params)
    let last: Float32Array | undefined
    const out: boolean[] = []
    for (let i = 0; i < steps; i++) {
      let u
      ;[u, state] = opt.update(grad, state)
      const d = (u as ArrayLeaf).data as Float32Array
      if (last) {
        const prev = last
        const diff = Math.max(...d.map((x, k) => Math.abs(x - prev[k])))
        out.push(diff > 1e-4 * Math.max(...d.map(Math.abs)))
      }
      last = Float32Array.from(d)
    }
    return out
  }
  const counter = fitted('counter', 0.5)
  t.deepEqual(
    counter,
    counter.map((_, i) => i % 2 === 0),
    'the counter fits every second step',
  )
  const draw = fitted('draw', 0.5)
  const n = draw.filter(Boolean).length
  t.true(n > 3 && n < 17, `${n} of 20 steps fitted`)
  t.notDeepEqual(draw, counter)
  t.true(fitted('draw', 1, 8).every(Boolean), "'draw' at probability 1 fits every step")
  const params = { data: Float32Array.from([1, 2, 3]), shape: [3] }
  t.throws(() => kron({ updateDecision: 'random' as never }).init(params), { instanceOf: TypeError, message: /updateDecision.*'draw'/ })
})

const RULES = ['EQ', 'Q0.5EQ1.5', 'QUAD', 'QEQ', 'QEP', 'PRO4P', 'QUAD4P'] as const

/** A badly scaled quadratic `Σ hᵢ xᵢ²` over a 2-D leaf, a 1-D leaf and a scalar. */
function scaledQuadratic(p: PyTree) {
  const t = p as { w: ArrayLeaf; b: ArrayLeaf; s: number }
  const hw = (i: number) => 1 + 3 * (i % 4) + (i >> 2)
  const hb = (i: number) => 0.5 + i
  const loss = t.w.data.reduce((a, x, i) => a + hw(i) * x * x, 0) + t.b.data.reduce((a, x, i) => a + hb(i) * x * x, 0) + 4 * t.s * t.s
  return {
    loss,
    grads: {
      w: { data: t.w.data.map((x, i) => 2 * hw(i) * x), shape: t.w.shape },
      b: { data: t.b.data.map((x, i) => 2 * hb(i) * x), shape: t.b.shape },
      s: 8 * t.s,
    },
  }
}

test('Hessian mode: kron({ updateRule }) with a hessianHelper loop trains a badly scaled quadratic under every rule', async (t) => {
  for (const updateRule of RULES) {
    let params: PyTree = { w: leaf(values(12, 3), [3, 4]), b: leaf(values(3, 4)), s: 0.7 }
    const opt = kron({ learningRate: 0.1, b1: 0, updateRule })
    let state = opt.init(params)
    const start = scaledQuadratic(params).loss
    for (let step = 0; step < 60; step++) {
      const r = await hessianHelper(scaledQuadratic, params, { step, seed: 5 })
      let updates
      ;[updates, state] = opt.update(r.grads, state, params, r)
      params = applyUpdates(params, updates)
    }
    const end = scaledQuadratic(params).loss
    t.true(Number.isFinite(end) && end < 0.01 * start, `${updateRule}: ${start} -> ${end}`)
    // the class: step(grads, extra) with the helper's result passed whole, same numbers
    const cls = new Kron({ w: leaf(values(12, 3), [3, 4]), b: leaf(values(3, 4)), s: 0.7 } as PyTree, { learningRate: 0.1, b1: 0, updateRule })
    let fn: PyTree = { w: leaf(values(12, 3), [3, 4]), b: leaf(values(3, 4)), s: 0.7 }
    let fnState = opt.init(fn)
    for (let step = 0; step < 3; step++) {
      const r = await hessianHelper(scaledQuadratic, cls.params, { step, seed: 5 })
      cls.step(r.grads, r)
      let u
      ;[u, fnState] = opt.update(r.grads, fnState, fn, r)
      fn = applyUpdates(fn, u)
    }
    t.deepEqual(snapshot(cls.params), snapshot(fn), updateRule)
    // the fitted state round-trips
    const bytes = state.toBytes()
    state.loadBytes(bytes)
    t.deepEqual(state.toBytes(), bytes)
  }
})

test('Hessian mode: a Kron hvp of the wrong shape is a RangeError naming the leaf; the state is untouched', (t) => {
  const params = { w: leaf(values(12, 1), [3, 4]), b: leaf(values(3, 2)) }
  for (const updateRule of ['EQ', 'PRO4P'] as const) {
    const opt = kron({ updateRule })
    const st = opt.init(params)
    const before = st.toBytes()
    const bad = { w: leaf(values(12, 1), [4, 3]), b: leaf(values(3, 2)) }
    t.throws(() => opt.update(params, st, params, { hvp: bad, vector: params, updatePreconditioner: true }), {
      instanceOf: RangeError,
      message: /hvp.*'w'.*\[4,3\]|hvp.*'w'.*shape/,
    })
    t.throws(() => opt.update(params, st, params, { hvp: params, vector: { w: params.w }, updatePreconditioner: true }), {
      message: /vector.*'b'/,
    })
    t.is(st.count, 0)
    t.deepEqual(st.toBytes(), before)
  }
})

test('mergeDims and blockSize: every rule trains merged and blocked (and scanned) leaves; the state round-trips and refuses another layout', (t) => {
  const shapes: Record<string, number[]> = { conv: [2, 3, 4, 5], w: [11, 7], layers: [2, 6, 5], b: [9] }
  const grad = (k: number) =>
    Object.fromEntries(
      Object.entries(shapes).map(([p, s], i) => [
        p,
        leaf(
          values(
            s.reduce((a, b) => a * b, 1),
            10 * k + i,
          ),
          s,
        ),
      ]),
    )
  for (const updateRule of ['EQ', 'PRO', 'QUAD'] as const) {
    for (const layout of [{ mergeDims: 'twoD', blockSize: 4 }, { mergeDims: 'small', targetMergedDimSize: 16, blockSize: 3 }, { blockSize: 5 }] as const) {
      const opt = kron({ ...layout, updateRule, preconditionerUpdateProbability: 1, scannedLayers: { conv: false, w: false, layers: true, b: false } })
      let state = opt.init(grad(0))
      for (let k = 0; k < 3; k++) {
        let u
        ;[u, state] = opt.update(grad(k), state)
        for (const [p, s] of Object.entries(shapes)) {
          const l = (u as Record<string, ArrayLeaf>)[p]
          t.deepEqual([...l.shape], s)
          t.true([...(l.data as Float32Array)].every(Number.isFinite), `${updateRule} ${JSON.stringify(layout)} ${p}`)
        }
      }
    }
  }
  // class style: stateDict round-trips; a state of another layout is refused naming the options
  const params = { w: Tensor.fromArray(new Float32Array(24).fill(0.5), [2, 3, 4]) }
  const merged = new Kron(params, { mergeDims: 'twoD' })
  merged.step({
    w: Tensor.fromArray(
      Float32Array.from({ length: 24 }, (_, i) => Math.cos(i)),
      [2, 3, 4],
    ),
  })
  const bytes = merged.stateDict()
  merged.loadStateDict(bytes)
  t.deepEqual(merged.stateDict(), bytes)
  const plain = new Kron(params)
  const before = plain.stateDict()
  t.throws(() => plain.loadStateDict(bytes), { message: /mergeDims.*blockSize/ })
  t.deepEqual(plain.stateDict(), before)
})

test('blockSize above every axis changes nothing: blocks of 4 and 256 give the same run on a [4, 3] leaf', (t) => {
  const run = (blockSize: number | null) => {
    const opt = kron({ blockSize, updateRule: 'PRO', preconditionerUpdateProbability: 1 })
    let state = opt.init(leaf(new Array<number>(12).fill(0), [4, 3]))
    const out: number[][] = []
    for (let k = 0; k < 3; k++) {
      let u
      ;[u, state] = opt.update(leaf(values(12, k), [4, 3]), state)
      out.push([...((u as ArrayLeaf).data as Float32Array)])
    }
    return out
  }
  t.deepEqual(run(4), run(256))
  t.deepEqual(run(4), run(null))
})

test('kronStateSize reports the factor shapes and bytes per leaf before anything is made', (t) => {
  const params = {
    w: { data: new Float32Array(4096 * 64), shape: [4096, 64] },
    layers: { data: new Float32Array(3 * 60), shape: [3, 10, 6] },
    b: { data: new Float32Array(5), shape: [5] },
  }
  const plain = kronStateSize(params, { scannedLayers: { w: false, layers: true, b: false } })
  t.deepEqual(
    plain.leaves.map((l) => [l.path, l.factors]),
    [
      ['b', [[5]]],
      [
        'layers',
        [
          [3, 10, 10],
          [3, 6, 6],
        ],
      ],
      [
        'w',
        [
          [4096, 4096],
          [64, 64],
        ],
      ],
    ],
  )
  t.is(plain.leaves[2].bytes, 4 * (4096 * 4096 + 64 * 64))
  t.is(
    plain.bytes,
    plain.leaves.reduce((a, l) => a + l.bytes, 0),
  )
  const blocked = kronStateSize(params, { blockSize: 256, mergeDims: 'twoD' })
  t.deepEqual(blocked.leaves[2].factors, [
    [16, 256, 256],
    [16, 64, 64],
  ])
  t.is(blocked.leaves[2].bytes, 4 * 16 * (256 * 256 + 64 * 64))
  // 'twoD' merges the unscanned [3, 10, 6] into [30, 6], its most balanced split
  t.deepEqual(blocked.leaves[1].factors, [
    [30, 30],
    [6, 6],
  ])
  t.true(blocked.bytes < plain.bytes)
  // bfloat16 factors halve the bytes
  t.is(kronStateSize(params, { precondDtype: 'bfloat16' }).leaves[2].bytes, 2 * (4096 * 4096 + 64 * 64))
  // the same sizes as a real state holds
  const small = { w: { data: new Float32Array(60), shape: [10, 6] } }
  const opt = new Kron(small, { blockSize: 4, updateRule: 'PRO' })
  t.is(kronStateSize(small, { blockSize: 4, updateRule: 'PRO' }).leaves[0].factors.length, 8)
  t.true(opt.stateDict().byteLength > kronStateSize(small, { blockSize: 4, updateRule: 'PRO' }).bytes)
})

test('mergeDims, targetMergedDimSize and blockSize are checked: typed errors naming the option, from kron, Kron and kronStateSize', (t) => {
  const params = { data: new Float32Array(12), shape: [4, 3] }
  const cases: [object, typeof TypeError | typeof RangeError, RegExp][] = [
    [{ blockSize: 0 }, RangeError, /blockSize.*>= 1/],
    [{ blockSize: -3 }, RangeError, /blockSize/],
    [{ blockSize: 2.5 }, RangeError, /blockSize/],
    [{ blockSize: '4' }, TypeError, /blockSize/],
    [{ targetMergedDimSize: 0 }, RangeError, /targetMergedDimSize/],
    [{ mergeDims: 'two_d' }, TypeError, /mergeDims.*'small'.*'twoD'/],
    [{ mergeDims: true }, TypeError, /mergeDims/],
  ]
  for (const [o, Cls, message] of cases) {
    t.throws(() => kron(o as never), { instanceOf: Cls, message }, JSON.stringify(o))
    t.throws(() => new Kron({ p: params }, o as never), { instanceOf: Cls, message }, JSON.stringify(o))
    t.throws(() => kronStateSize({ p: params }, o as never), { instanceOf: Cls, message }, JSON.stringify(o))
  }
})
