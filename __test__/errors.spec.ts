import test, { type ExecutionContext } from 'ava'
import { affine, applyUpdates, hessianHelper, kron, Kron, lra, Tensor, xmat, type GradientTransformation, type PyTree } from '../index'

type GradientTransformationFactory = (options?: object) => GradientTransformation
import { leaf, snapshot, values } from './helpers'

/** Fresh params (plain, Tensor and number leaves) and an optimizer that has taken 2 steps. */
function setup(options: object = {}) {
  const params = {
    layers: [{ weight: leaf(values(12, 1), [3, 4]), bias: leaf(values(4, 2)) }],
    emb: Tensor.fromArray(values(6, 3), [2, 3]),
    scale: 0.5,
  }
  const good = () => ({
    layers: [{ weight: leaf(values(12, 4), [3, 4]), bias: leaf(values(4, 5)) }],
    emb: Tensor.fromArray(values(6, 6), [2, 3]),
    scale: 0.1,
  })
  const opt = new Kron(params, { learningRate: 0.1, weightDecay: 0.01, preconditionerUpdateProbability: 1, ...options })
  opt.step(good())
  opt.step(good())
  return { params, opt, good }
}

/** Asserts that `f` throws `Cls` with a message matching `message`, and that nothing changed. */
function throwsUnchanged(t: ExecutionContext, s: ReturnType<typeof setup>, f: () => unknown, Cls: typeof TypeError | typeof RangeError, message: RegExp) {
  const before = { params: snapshot(s.params), state: s.opt.stateDict(), count: s.opt.count }
  const err = t.throws(f)
  t.true(err instanceof Cls, `expected ${Cls.name}, got ${err?.constructor.name}: ${err?.message}`)
  t.regex(err?.message ?? '', message)
  t.deepEqual(snapshot(s.params), before.params)
  t.deepEqual(s.opt.stateDict(), before.state)
  t.is(s.opt.count, before.count)
  // and the optimizer still works
  s.opt.step(s.good())
  t.is(s.opt.count, before.count + 1)
}

test('grads with a wrong shape: RangeError naming the leaf, nothing changed', (t) => {
  const s = setup()
  const g = s.good()
  g.layers[0].weight = leaf(values(12, 4), [4, 3])
  throwsUnchanged(t, s, () => s.opt.step(g), RangeError, /grads 'layers\.0\.weight' has shape \[4,3\], expected \[3,4\]/)
})

test('a Tensor grad with a wrong shape: RangeError naming the leaf', (t) => {
  const s = setup()
  const g = s.good()
  g.emb = Tensor.fromArray(values(6, 3), [3, 2])
  throwsUnchanged(t, s, () => s.opt.step(g), RangeError, /grads 'emb' has shape \[3,2\]/)
})

test('a missing leaf and an extra leaf: RangeError naming it', (t) => {
  const s = setup()
  const g1: Record<string, unknown> = s.good()
  delete g1.scale
  throwsUnchanged(t, s, () => s.opt.step(g1 as PyTree), RangeError, /leaf 'scale' is missing/)
  const g2: Record<string, unknown> = { ...s.good(), extra: 1 }
  throwsUnchanged(t, s, () => s.opt.step(g2 as PyTree), RangeError, /leaf 'extra' is not in the params/)
})

test('data length that does not fit the shape: RangeError naming the leaf', (t) => {
  const s = setup()
  const g = s.good()
  g.layers[0].bias = { data: new Float32Array(3), shape: [4] }
  throwsUnchanged(t, s, () => s.opt.step(g), RangeError, /grads 'layers\.0\.bias' has 3 values/)
})

test('wrong dtype: Float64Array data or a non-numeric leaf is a TypeError naming the leaf', (t) => {
  const s = setup()
  const g1 = s.good() as Record<string, unknown>
  ;(g1.layers as Record<string, unknown>[])[0].bias = { data: new Float64Array(4), shape: [4] }
  throwsUnchanged(t, s, () => s.opt.step(g1 as PyTree), TypeError, /grads 'layers\.0\.bias': data must be a Float32Array \(float32\), got Float64Array/)
  const g2 = s.good() as Record<string, unknown>
  g2.scale = 'x'
  throwsUnchanged(t, s, () => s.opt.step(g2 as PyTree), TypeError, /'scale' is not a leaf/)
})

test('NaN or Inf in grads: RangeError naming the leaf', (t) => {
  const s = setup()
  const g1 = s.good()
  g1.layers[0].weight.data[5] = NaN
  throwsUnchanged(t, s, () => s.opt.step(g1), RangeError, /grads 'layers\.0\.weight' contains NaN or Inf/)
  const g2 = s.good()
  g2.emb = Tensor.fromArray([1, 2, Infinity, 4, 5, 6], [2, 3])
  throwsUnchanged(t, s, () => s.opt.step(g2), RangeError, /grads 'emb' contains NaN or Inf/)
  const g3 = s.good()
  g3.scale = NaN
  throwsUnchanged(t, s, () => s.opt.step(g3), RangeError, /grads 'scale' contains NaN or Inf/)
})

test('NaN in params with weight decay: RangeError naming the leaf', (t) => {
  const s = setup()
  const saved = s.params.layers[0].bias.data[0]
  s.params.layers[0].bias.data[0] = NaN
  const before = { state: s.opt.stateDict(), params: snapshot(s.params) }
  const err = t.throws(() => s.opt.step(s.good()), { instanceOf: RangeError })
  t.regex(err.message, /params 'layers\.0\.bias' contains NaN or Inf/)
  t.deepEqual(s.opt.stateDict(), before.state)
  t.deepEqual(snapshot(s.params), before.params)
  s.params.layers[0].bias.data[0] = saved
  s.opt.step(s.good())
  t.is(s.opt.count, 3)
})

test('unknown option, wrong option type, option out of range: errors naming the option', (t) => {
  t.throws(() => kron({ learningrate: 0.1 } as object), { instanceOf: TypeError, message: /kron: unknown option 'learningrate'/ })
  t.throws(() => kron({ b1: '0.9' } as object), { instanceOf: TypeError, message: /option 'b1' must be a number/ })
  t.throws(() => kron({ b1: 1.5 }), { instanceOf: RangeError, message: /option 'b1'/ })
  t.throws(() => kron({ memorySaveMode: 'some_diag' } as object), { instanceOf: TypeError, message: /option 'memorySaveMode'/ })
  t.throws(() => kron({ precondDtype: 'int8' } as object), { instanceOf: TypeError, message: /option 'precondDtype'/ })
  t.throws(() => kron({ maxSizeTriangular: 2.5 }), { instanceOf: RangeError, message: /option 'maxSizeTriangular'/ })
  t.throws(() => kron({ preconditionerUpdateProbability: 2 }), { instanceOf: RangeError, message: /'preconditionerUpdateProbability' must be in \[0, 1\]/ })
  t.throws(() => kron({ learningRate: NaN }), { instanceOf: RangeError, message: /option 'learningRate'/ })
  t.throws(() => kron({ preconditionerInitScale: 0 }), { instanceOf: RangeError, message: /option 'preconditionerInitScale'/ })
  t.throws(() => kron({ weightDecayMask: 3 } as object), { instanceOf: TypeError, message: /option 'weightDecayMask'/ })
})

test('a schedule returning a bad value: RangeError, nothing changed', (t) => {
  let bad = false
  const s = setup({ learningRate: () => (bad ? NaN : 0.1) })
  bad = true
  throwsUnchanged(
    t,
    { ...s, good: () => ((bad = false), s.good()) } as ReturnType<typeof setup>,
    () => s.opt.step(s.good()),
    RangeError,
    /'learningRate' must be a finite number >= 0, got NaN \(schedule at step 2\)/,
  )
})

test('a mask without a boolean for a leaf: TypeError naming the leaf', (t) => {
  const params = { a: leaf([1]), b: leaf([2]) }
  t.throws(() => kron({ weightDecayMask: { a: true } }).init(params), { instanceOf: TypeError, message: /weightDecayMask: no boolean for leaf 'b'/ })
  t.throws(() => kron({ scannedLayers: () => 1 as unknown as boolean }).init(params), { instanceOf: TypeError, message: /scannedLayers: .*'a'/ })
})

test('a scanned leaf without a leading axis: RangeError naming the leaf', (t) => {
  t.throws(() => kron({ scannedLayers: { s: true } }).init({ s: 1.5 }), { instanceOf: RangeError, message: /'s'/ })
})

test('an unknown or unavailable device: RangeError naming it', (t) => {
  t.throws(() => Tensor.fromArray([1], [1], { device: 'tpu' }), { instanceOf: RangeError, message: /device 'tpu' is unknown/ })
  t.throws(() => Tensor.fromArray([1], [1], { device: 'cuda:7' }), { instanceOf: RangeError, message: /device 'cuda:7' is not available/ })
  t.throws(() => Tensor.fromArray([1], [1], { dtype: 'int8' as 'float32' }), { instanceOf: TypeError, message: /dtype 'int8'/ })
})

test('a state from another optimizer or bytes of another tree: error, nothing changed', (t) => {
  const s = setup()
  const other = new Kron({ w: leaf([1, 2, 3]) })
  throwsUnchanged(t, s, () => s.opt.loadStateDict(other.stateDict()), RangeError, /state/)
  throwsUnchanged(t, s, () => s.opt.loadStateDict(new Uint8Array([1, 2, 3])), RangeError, /state/)
  const opt = kron()
  const st = opt.init({ w: leaf([1, 2, 3]) })
  const err = t.throws(() => opt.update({ w: leaf([1, 2, 3]) }, {} as never))
  t.true(err instanceof TypeError)
  t.is(st.count, 0)
})

test('weight decay without params in update: error naming params, state unchanged', (t) => {
  const opt = kron({ weightDecay: 0.1 })
  const params = { w: leaf([1, 2]) }
  const st = opt.init(params)
  const before = st.toBytes()
  t.throws(() => opt.update({ w: leaf([1, 1]) }, st), { instanceOf: RangeError, message: /params/ })
  t.deepEqual(st.toBytes(), before)
})

test('applyUpdates with a mismatched tree: RangeError naming the leaf, inputs unchanged', (t) => {
  const params = { a: leaf([1, 2]), b: leaf([3]) }
  const before = snapshot(params)
  t.throws(() => applyUpdates(params, { a: leaf([1, 2]) }), { instanceOf: RangeError, message: /leaf 'b' is missing/ })
  t.throws(() => applyUpdates(params, { a: leaf([1, 2, 3]), b: leaf([1]) }), { instanceOf: RangeError, message: /updates 'a' has shape \[3\]/ })
  t.deepEqual(snapshot(params), before)
})

test('stepAsync with bad grads rejects with the same error and changes nothing', async (t) => {
  const s = setup()
  const before = { params: snapshot(s.params), state: s.opt.stateDict() }
  const g = s.good()
  g.layers[0].weight.data[0] = Infinity
  await t.throwsAsync(() => s.opt.stepAsync(g), { instanceOf: RangeError, message: /grads 'layers\.0\.weight' contains NaN or Inf/ })
  t.deepEqual(snapshot(s.params), before.params)
  t.deepEqual(s.opt.stateDict(), before.state)
  await s.opt.stepAsync(s.good())
  t.is(s.opt.count, 3)
})

test('a negative precondLr / preconditionerLr or weightDecay is refused up front in every variant; a negative schedule value at its step, nothing changed', (t) => {
  for (const v of [-0.1, -1e-30]) {
    t.throws(() => kron({ preconditionerLr: v }), { instanceOf: RangeError, message: /kron: option 'preconditionerLr' must be a finite number >= 0, got -/ })
    t.throws(() => kron({ weightDecay: v }), { instanceOf: RangeError, message: /kron: option 'weightDecay' must be a finite number >= 0/ })
    for (const [name, make] of [
      ['xmat', xmat],
      ['lra', lra],
      ['affine', affine],
    ] as const) {
      t.throws(() => make({ precondLr: v }), { instanceOf: RangeError, message: new RegExp(`${name}: option 'precondLr' must be a finite number >= 0, got -`) })
      t.throws(() => make({ weightDecay: v }), { instanceOf: RangeError, message: new RegExp(`${name}: option 'weightDecay' must be a finite number >= 0`) })
    }
  }
  // 0 is allowed: the preconditioner stays as it is
  t.notThrows(() => kron({ preconditionerLr: 0 }))
  t.notThrows(() => xmat({ precondLr: 0 }))
  for (const [name, make] of [
    ['xmat', xmat],
    ['lra', lra],
    ['affine', affine],
  ] as const) {
    const opt = make({ learningRate: 0.01, precondLr: (step: number) => (step >= 3 ? -0.05 : 0.1) })
    const params = { w: leaf(values(12, 1), [3, 4]) }
    const st = opt.init(params)
    opt.update({ w: leaf(values(12, 2), [3, 4]) }, st, params)
    opt.update({ w: leaf(values(12, 3), [3, 4]) }, st, params)
    const before = st.toBytes()
    t.throws(() => opt.update({ w: leaf(values(12, 4), [3, 4]) }, st, params), {
      instanceOf: RangeError,
      message: new RegExp(`${name}: option 'precondLr' must be a finite number >= 0, got -0.05 \\(schedule at step 3\\)`),
    })
    t.is(st.count, 2)
    t.deepEqual(st.toBytes(), before)
  }
})

test('an unknown option suggests the name it most likely means', (t) => {
  const cases: [GradientTransformationFactory, string, string][] = [
    [kron, 'lr', 'learningRate'],
    [kron, 'learning_rate', 'learningRate'],
    [kron, 'LearningRate', 'learningRate'],
    [kron, 'learningrate', 'learningRate'],
    [kron, 'beta1', 'b1'],
    [kron, 'beta', 'b1'],
    [kron, 'momentum', 'b1'],
    [xmat, 'weight_decay', 'weightDecay'],
    [kron, 'wd', 'weightDecay'],
    [kron, 'precond_lr', 'preconditionerLr'],
    [kron, 'precondLr', 'preconditionerLr'],
    [xmat, 'preconditioner_lr', 'precondLr'],
    [lra, 'preconditionerLr', 'precondLr'],
    [affine, 'preconditionerInitScale', 'precondInitScale'],
    [kron, 'precond_init_scale', 'preconditionerInitScale'],
    [kron, 'max_size_triangular', 'maxSizeTriangular'],
    [kron, 'learningRat', 'learningRate'],
    [kron, 'weightDecai', 'weightDecay'],
    [xmat, 'weightDecayMask', 'mask'],
    [kron, 'mask', 'weightDecayMask'],
    [lra, 'rank', 'uvdRankOfApproximation'],
    [kron, 'max_grad_norm', 'gradClip'],
  ]
  for (const [make, wrong, right] of cases) {
    const err = t.throws(() => make({ [wrong]: 0.1 } as object), { instanceOf: TypeError })
    t.regex(err.message, new RegExp(`unknown option '${wrong}' \\(did you mean '${right}'\\?\\)`), `${wrong} → ${right}`)
  }
  // nothing close: no guess
  t.throws(() => kron({ zzzzzzzz: 1 } as object), { instanceOf: TypeError, message: /unknown option 'zzzzzzzz'; see the options of kron$/ })
  // a name of Object.prototype is not an option either
  t.throws(() => kron({ toString: 1 } as object), { instanceOf: TypeError, message: /unknown option 'toString'/ })
  t.throws(() => kron(JSON.parse('{"__proto__": 1}') as object), { instanceOf: TypeError, message: /unknown option '__proto__'/ })
  t.throws(() => kron(new Map([['learningRate', 0.1]]) as object), { instanceOf: TypeError, message: /Object\.fromEntries/ })
})

test('error messages preview values: a million-element argument gives a short message', (t) => {
  const big = new Float64Array(1_000_000).fill(0.25)
  const bigArray = Array.from({ length: 1_000_000 }, () => 1.5)
  const w = Tensor.fromArray(new Float32Array(4), [2, 2])
  const s = setup()
  const messages = [
    t.throws(() => w.toArray(big as unknown as Float32Array)),
    t.throws(() => w.set(big as unknown as Float32Array)),
    t.throws(() => Tensor.fromArray(new Float32Array(4), bigArray)),
    t.throws(() => Tensor.fromArray({ length: 2, 0: 1n, 1: 2n } as unknown as number[], [2])),
    t.throws(() => kron({ b1: bigArray } as object)),
    t.throws(() => kron(bigArray as object)),
    t.throws(() => kron({ [`x${'y'.repeat(1_000_000)}`]: 1 } as object)),
    t.throws(() => s.opt.step({ ...s.good(), scale: { data: big, shape: [1_000_000] } } as unknown as PyTree)),
    t.throws(() => s.opt.step({ ...s.good(), scale: { data: bigArray, shape: bigArray } } as unknown as PyTree)),
    t.throws(() => s.opt.step({ ...s.good(), scale: 'x'.repeat(1_000_000) } as unknown as PyTree)),
  ].map((e) => e.message)
  const f = kron({ learningRate: () => bigArray } as object)
  const st = f.init({ w: leaf([1, 2]) })
  messages.push(t.throws(() => f.update({ w: leaf([1, 2]) }, st)).message)
  for (const m of messages) t.true(m.length < 400, `${m.length} characters: ${m.slice(0, 200)}`)
  t.regex(messages[0], /into must be a Float32Array, got a Float64Array of 1000000 values \[0\.25, 0\.25, 0\.25, 0\.25, …\]/)
  t.regex(messages[4], /option 'b1' must be a number, got \[1\.5,1\.5.*… \(an array of 1000000 items\)/)
  t.regex(messages[7], /grads 'scale': data must be a Float32Array \(float32\), got Float64Array of 1000000 values.*Float32Array\.from\(data\)/)
})

test('hessianHelper checks what lossAndGrad and hvp give back: the params tree, shapes and float32, naming the leaf', async (t) => {
  const params = { w: leaf(values(6, 1), [2, 3]), b: leaf(values(3, 2)) }
  const good = (p: typeof params) => ({ loss: 0, grads: { w: leaf(Array.from(p.w.data), [2, 3]), b: leaf(Array.from(p.b.data)) } })
  const cases: [string, (p: typeof params) => unknown, typeof TypeError | typeof RangeError, RegExp][] = [
    [
      'shape',
      (p) => ({ loss: 0, grads: { ...good(p).grads, w: leaf(values(6, 1), [3, 2]) } }),
      RangeError,
      /hessianHelper: grads 'w' has shape \[3,2\], the param has \[2,3\]/,
    ],
    [
      'length',
      (p) => ({ loss: 0, grads: { ...good(p).grads, b: leaf(values(4, 1)) } }),
      RangeError,
      /hessianHelper: grads 'b' has shape \[4\], the param has \[3\]/,
    ],
    ['missing', (p) => ({ loss: 0, grads: { w: good(p).grads.w } }), RangeError, /hessianHelper: grads: leaf 'b' is missing/],
    ['extra', (p) => ({ loss: 0, grads: { ...good(p).grads, c: 1 } }), RangeError, /hessianHelper: grads: leaf 'c' is not in the params/],
    [
      'float64',
      (p) => ({ loss: 0, grads: { ...good(p).grads, b: { data: Float64Array.from(p.b.data), shape: [3] } } }),
      TypeError,
      /hessianHelper: grads 'b': data must be a Float32Array \(float32\), got Float64Array.*Float32Array\.from/,
    ],
    ['not an object', () => 3, TypeError, /hessianHelper: lossAndGrad must return \{ loss, grads \}, got 3/],
    [
      'number for an array leaf',
      (p) => ({ loss: 0, grads: { ...good(p).grads, b: 0.5 } }),
      RangeError,
      /hessianHelper: grads 'b' has shape \[\], the param has \[3\]/,
    ],
  ]
  for (const [name, lossAndGrad, Cls, message] of cases) {
    const before = snapshot(params)
    const err = await t.throwsAsync(hessianHelper(lossAndGrad as never, params, { step: 0 }), undefined, name)
    t.true(err instanceof Cls, `${name}: ${err?.constructor.name} ${err?.message}`)
    t.regex(err?.message ?? '', message, name)
    t.deepEqual(snapshot(params), before, name)
  }
  // the gradient calls at the shifted points are checked too
  let calls = 0
  const late = (p: typeof params) => (calls++ === 0 ? good(p) : { loss: 0, grads: { ...good(p).grads, w: leaf(values(6, 1), [6]) } })
  await t.throwsAsync(hessianHelper(late, params, { step: 0 }), { instanceOf: RangeError, message: /grads 'w' has shape \[6\], the param has \[2,3\]/ })
  // and the result of an hvp callback
  const hvps: [unknown, typeof TypeError | typeof RangeError, RegExp][] = [
    [{ w: leaf(values(6, 1), [2, 3]), b: leaf(values(2, 1)) }, RangeError, /hessianHelper: hvp 'b' has shape \[2\], the param has \[3\]/],
    [{ w: leaf(values(6, 1), [2, 3]) }, RangeError, /hessianHelper: hvp: leaf 'b' is missing/],
    [
      { w: { data: new Int32Array(6), shape: [2, 3] }, b: leaf(values(3, 1)) },
      TypeError,
      /hessianHelper: hvp 'w': data must be a Float32Array \(float32\), got Int32Array/,
    ],
    [new Map(), TypeError, /hessianHelper: hvp: '\(root\)' is not a leaf.*Map/],
  ]
  for (const [h, Cls, message] of hvps) {
    await t.throwsAsync(hessianHelper(good, params, { step: 0, hvp: () => h as PyTree }), { instanceOf: Cls, message })
  }
  // Tensor params: a grad of another dtype is named
  const tp = { w: Tensor.fromArray(values(4, 1), [2, 2]) }
  await t.throwsAsync(
    hessianHelper(() => ({ loss: 0, grads: { w: Tensor.fromArray(values(4, 1), [2, 2], { dtype: 'float64' }) } }), tp, { step: 0 }),
    {
      instanceOf: TypeError,
      message: /hessianHelper: grads 'w' has dtype float64, the param has float32/,
    },
  )
  // the right shapes work
  const r = await hessianHelper(good, params, { step: 0 })
  t.true(r.updatePreconditioner)
})
