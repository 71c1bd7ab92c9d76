import test, { type ExecutionContext } from 'ava'
import { applyUpdates, kron, Kron, Tensor, type PyTree } from '../index'
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
