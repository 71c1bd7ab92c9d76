import test from 'ava'
import { affine, Affine, kron, Kron, lra, LRA, xmat, XMat, type ArrayLeaf, type PyTree } from '../index'

// The step options from TypeScript: updatePreconditionerFirst on every variant (functional
// API and class), Kron's update decision 'cumulative', momentum warm-up, update clip,
// initial-scale scope and power and maxSkew, and their bad values.

const tree = (k: number) => ({
  b: { data: Float32Array.from([0.3, -0.2, 0.5].map((x) => x * k)), shape: [3] },
  w: { data: Float32Array.from({ length: 12 }, (_, i) => Math.sin(i * k + 1)), shape: [3, 4] },
})
const zeros = () => ({ b: { data: new Float32Array(3), shape: [3] }, w: { data: new Float32Array(12), shape: [3, 4] } })
const flat = (t: PyTree): number[] => {
  const o = t as Record<string, ArrayLeaf>
  return [...o.b.data, ...o.w.data]
}

type Functional = typeof kron | typeof xmat | typeof lra | typeof affine
type Class = typeof Kron | typeof XMat | typeof LRA | typeof Affine
const variants: [string, Functional, Class][] = [
  ['kron', kron, Kron],
  ['xmat', xmat, XMat],
  ['lra', lra, LRA],
  ['affine', affine, Affine],
]

for (const [name, fn, Cls] of variants) {
  test(`${name}: updatePreconditionerFirst false preconditions with the old preconditioner and fits after, in the functional API and the class`, (t) => {
    const base = { learningRate: 0.1, b1: 0, seed: 1, ...(name === 'kron' ? { preconditionerUpdateProbability: 1 } : {}) }
    const first = (fn as typeof kron)(base)
    const last = (fn as typeof kron)({ ...base, updatePreconditionerFirst: false })
    const [uf, sf] = first.update(tree(1), first.init(zeros()))
    const [ul, sl] = last.update(tree(1), last.init(zeros()))
    t.notDeepEqual(flat(uf), flat(ul), 'the first step preconditions with the initial preconditioner')
    // the same fit, with the same draws, in either order
    t.deepEqual(Buffer.from(sf.toBytes()), Buffer.from(sl.toBytes()))
    // the class takes the option too: its first step moves the params by the same update
    const params = zeros()
    const opt = new (Cls as typeof Kron)(params, { ...base, updatePreconditionerFirst: false })
    opt.step(tree(1))
    t.deepEqual(flat(params), flat(ul))
    opt.dispose()
    t.throws(() => (fn as typeof kron)({ updatePreconditionerFirst: 'no' as never }).init(zeros()), {
      instanceOf: TypeError,
      message: /updatePreconditionerFirst/,
    })
  })
}

test("Kron updateDecision 'cumulative' fits where floor(Σp) grows, and its state loads only under 'cumulative'", (t) => {
  // with b1 0 and a fixed gradient, a step's update changes exactly when it fitted
  const opt = kron({ learningRate: 0.01, b1: 0, updateRule: 'PRO', preconditionerUpdateProbability: 0.4, updateDecision: 'cumulative' })
  let state = opt.init(zeros())
  let last: number[] | undefined
  const fitted: number[] = []
  let bytes: Uint8Array | undefined
  for (let step = 1; step <= 12; step++) {
    let u
    ;[u, state] = opt.update(tree(1), state)
    const d = flat(u)
    if (last && d.some((x, k) => Math.abs(x - last![k]) > 1e-6 * Math.max(...d.map(Math.abs)))) fitted.push(step)
    last = d
    if (step === 6) bytes = state.toBytes()
  }
  // the formula in float64: the sums 0.4, 0.8, 1.2, 1.6, 2.0, …, 3.9999999999999996, …
  const want: number[] = []
  for (let step = 1, c = 0; step <= 12; step++, c += 0.4) if (Math.floor(c + 0.4) > Math.floor(c)) want.push(step)
  t.deepEqual(want, [3, 5, 8, 11])
  t.deepEqual(fitted, want)
  const counter = kron({ learningRate: 0.01, b1: 0, updateRule: 'PRO', preconditionerUpdateProbability: 0.4 })
  const other = counter.init(zeros())
  t.throws(() => other.loadBytes(bytes!), { instanceOf: RangeError, message: /updateDecision 'cumulative'.*updateDecision 'counter'/ })
  const same = opt.init(zeros())
  same.loadBytes(bytes!)
  t.is(same.count, 6)
})

test('Kron step options: the clip, the warm-up, the initial scale and maxSkew are accepted; bad values are typed errors naming the option', (t) => {
  const opt = kron({
    learningRate: 0.05,
    updateRule: 'QUAD',
    momentumWarmup: 'psgdTorch',
    updateClipRms: 2,
    updateClipElement: 0.01,
    preconditionerInitScale: null,
    initScaleScope: 'global',
    initScalePower: 0.5,
    maxSkew: 1,
  })
  const [u] = opt.update(tree(1), opt.init(zeros()))
  // the element clamp bounds every update by lr · 0.01
  t.true(flat(u).every((x) => Math.abs(x) <= 0.05 * 0.01 * (1 + 1e-6)))
  t.true(flat(u).some((x) => Math.abs(x) > 0.05 * 0.01 * 0.999))
  const bad: [object, typeof TypeError | typeof RangeError, RegExp][] = [
    [{ updateClipRms: 0 }, RangeError, /updateClipRms/],
    [{ updateClipElement: -1 }, RangeError, /updateClipElement/],
    [{ momentumWarmup: 'adam' }, TypeError, /momentumWarmup.*'psgdTorch'/],
    [{ initScaleScope: 'layer' }, TypeError, /initScaleScope.*'global'/],
    [{ initScalePower: 0 }, RangeError, /initScalePower/],
    [{ maxSkew: -2 }, RangeError, /maxSkew/],
    [{ updateDecision: 'sometimes' }, TypeError, /updateDecision.*'cumulative'/],
  ]
  for (const [options, instanceOf, message] of bad) {
    t.throws(() => kron(options as never).init(zeros()), { instanceOf, message }, JSON.stringify(options))
  }
})
