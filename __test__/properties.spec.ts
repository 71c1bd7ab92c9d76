/**
 * Property-based tests (fast-check) over random trees, shapes, leaf kinds, variants and
 * options: what holds for every input, not only the hand-picked ones. Seeded, so a run is
 * reproducible; the case counts (`RUNS`) are the README's Reliability table.
 */
import test from 'ava'
import fc from 'fast-check'
import { affine, kron, lra, Tensor, xmat, type GradientTransformation, type Leaf, type PyTree } from '../index'
import { optionKinds } from '../src/options'
import { snapshot, values } from './helpers'

/** Cases per property (the README's table quotes these). */
export const RUNS = { trees: 60, badInput: 80, oddInput: 40, checkpoints: 150, options: 200, fromArray: 200 } as const

const SEED = 13
const variants = { kron, xmat, lra, affine } as const
type VariantName = keyof typeof variants

interface LeafSpec {
  kind: 'plain' | 'tensor' | 'number'
  shape: number[]
}

const leafSpec: fc.Arbitrary<LeafSpec> = fc.oneof(
  fc.record({ kind: fc.constantFrom<'plain' | 'tensor'>('plain', 'tensor'), shape: fc.array(fc.integer({ min: 1, max: 4 }), { maxLength: 3 }) }),
  fc.constant<LeafSpec>({ kind: 'number', shape: [] }),
)

/** A tree of 1–4 leaves, some top-level and some in a nested list. */
const treeSpec = fc.record({ top: fc.array(leafSpec, { minLength: 1, maxLength: 3 }), nested: fc.array(leafSpec, { maxLength: 2 }) })
type TreeSpec = { top: LeafSpec[]; nested: LeafSpec[] }

const count = (shape: number[]) => shape.reduce((a, b) => a * b, 1)

function makeLeaf(s: LeafSpec, seed: number): Leaf {
  const v = values(count(s.shape), seed)
  if (s.kind === 'number') return v[0]
  if (s.kind === 'tensor') return Tensor.fromArray(v, s.shape)
  return { data: Float32Array.from(v), shape: [...s.shape] }
}

function makeTree(spec: TreeSpec, seed: number): Record<string, PyTree> {
  const tree: Record<string, PyTree> = {}
  spec.top.forEach((s, i) => (tree[`l${i}`] = makeLeaf(s, seed + i)))
  if (spec.nested.length > 0) tree.nest = spec.nested.map((s, i) => makeLeaf(s, seed + 100 + i))
  return tree
}

/** The leaf paths of a tree made by `makeTree`, with their specs. */
function leafPaths(spec: TreeSpec): [string, LeafSpec][] {
  return [...spec.top.map((s, i): [string, LeafSpec] => [`l${i}`, s]), ...spec.nested.map((s, i): [string, LeafSpec] => [`nest.${i}`, s])]
}

function leafAt(tree: Record<string, PyTree>, path: string): Leaf {
  const [a, b] = path.split('.')
  return (b === undefined ? tree[a] : (tree[a] as PyTree[])[Number(b)]) as Leaf
}

function setLeaf(tree: Record<string, PyTree>, path: string, v: unknown): void {
  const [a, b] = path.split('.')
  if (b === undefined) tree[a] = v as PyTree
  else (tree[a] as unknown[])[Number(b)] = v
}

const isFiniteLeaf = (l: Leaf) => (typeof l === 'number' ? Number.isFinite(l) : (l instanceof Tensor ? l.toArray() : l.data).every(Number.isFinite))

const sameKind = (a: Leaf, b: Leaf) => typeof a === typeof b && a instanceof Tensor === b instanceof Tensor

const variant = fc.constantFrom<VariantName>('kron', 'xmat', 'lra', 'affine')

test('any tree, leaf kinds and variant: two steps give finite updates of the grads’ kinds and shapes, and the state round-trips byte for byte', (t) => {
  fc.assert(
    fc.property(treeSpec, variant, fc.constantFrom(0, 0.9), fc.constantFrom(0, 0.01), (spec, name, b1, weightDecay) => {
      const params = makeTree(spec, 1)
      const opt: GradientTransformation = variants[name]({ learningRate: 0.01, b1, weightDecay, preconditionerUpdateProbability: 1 })
      const state = opt.init(params)
      for (let step = 0; step < 2; step++) {
        const grads = makeTree(spec, 50 + step)
        const [updates] = opt.update(grads, state, params)
        for (const [path] of leafPaths(spec)) {
          const u = leafAt(updates as Record<string, PyTree>, path)
          const g = leafAt(grads, path)
          if (!sameKind(u, g) || !isFiniteLeaf(u)) return false
          if (
            typeof u !== 'number' &&
            JSON.stringify(u instanceof Tensor ? u.shape : u.shape) !== JSON.stringify(g instanceof Tensor ? g.shape : (g as { shape: number[] }).shape)
          )
            return false
        }
      }
      const bytes = state.toBytes()
      const copy = opt.init(params)
      copy.loadBytes(bytes)
      return state.count === 2 && Buffer.compare(Buffer.from(copy.toBytes()), Buffer.from(bytes)) === 0
    }),
    { numRuns: RUNS.trees, seed: SEED },
  )
  t.pass()
})

test('a bad grads tree (wrong shape, NaN/Inf, wrong type, missing or extra leaf) throws a TypeError/RangeError naming the leaf and changes nothing', (t) => {
  const corruption = fc.constantFrom('shape', 'nan', 'inf', 'type', 'missing', 'extra')
  fc.assert(
    fc.property(treeSpec, variant, corruption, fc.nat(), (spec, name, how, pick) => {
      const params = makeTree(spec, 1)
      const opt = variants[name]({ learningRate: 0.01, preconditionerUpdateProbability: 1 })
      const state = opt.init(params)
      opt.update(makeTree(spec, 7), state, params)
      const before = { bytes: state.toBytes(), params: snapshot(params) }
      const paths = leafPaths(spec)
      const [path, ls] = paths[pick % paths.length]
      const grads = makeTree(spec, 9)
      let named = path
      if (how === 'shape') setLeaf(grads, path, { data: new Float32Array(count(ls.shape) * 2), shape: [...ls.shape, 2] })
      else if (how === 'nan' || how === 'inf') {
        const bad = how === 'nan' ? NaN : -Infinity
        if (ls.kind === 'number') setLeaf(grads, path, bad)
        else setLeaf(grads, path, makeLeaf({ kind: ls.kind, shape: ls.shape }, 3))
        const l = leafAt(grads, path)
        if (l instanceof Tensor) setLeaf(grads, path, Tensor.fromArray([...values(count(ls.shape) - 1, 4), bad], ls.shape))
        else if (typeof l !== 'number') l.data[l.data.length - 1] = bad
      } else if (how === 'type') setLeaf(grads, path, 'not a leaf')
      else if (how === 'missing') {
        if (path.startsWith('nest')) (grads.nest as unknown[]).splice(Number(path.split('.')[1]), 1)
        else delete grads[path]
      } else {
        grads.extra = 1
        named = 'extra'
      }
      try {
        opt.update(grads, state, params)
        return false
      } catch (e) {
        if (!(e instanceof TypeError || e instanceof RangeError)) return false
        // a missing list item shifts the later ones: the message names the first path that differs
        if (how !== 'missing' && !e.message.includes(named)) return false
      }
      return (
        Buffer.compare(Buffer.from(state.toBytes()), Buffer.from(before.bytes)) === 0 &&
        JSON.stringify(snapshot(params)) === JSON.stringify(before.params) &&
        state.count === 1
      )
    }),
    { numRuns: RUNS.badInput, seed: SEED },
  )
  t.pass()
})

/**
 * Odd values for one grads leaf of `n` values and shape `shape`: each either works (and
 * gives the numbers of the plain Float32Array leaf) or must be refused naming the leaf.
 */
const oddLeaves: Record<string, { works: boolean; make: (v: number[], shape: number[]) => unknown }> = {
  plainCopy: { works: true, make: (v, shape) => ({ data: Float32Array.from(v), shape: [...shape] }) },
  structuredClone: { works: true, make: (v, shape) => structuredClone({ data: Float32Array.from(v), shape: [...shape] }) },
  nullPrototype: { works: true, make: (v, shape) => Object.assign(Object.create(null) as object, { data: Float32Array.from(v), shape: [...shape] }) },
  proxy: { works: true, make: (v, shape) => new Proxy({ data: Float32Array.from(v), shape: [...shape] }, {}) },
  frozen: { works: true, make: (v, shape) => Object.freeze({ data: Float32Array.from(v), shape: Object.freeze([...shape]) }) },
  offsetView: { works: true, make: (v, shape) => ({ data: Float32Array.from([7, ...v, 7]).subarray(1, v.length + 1), shape: [...shape] }) },
  float64: { works: false, make: (v, shape) => ({ data: Float64Array.from(v), shape }) },
  int32: { works: false, make: (v, shape) => ({ data: Int32Array.from(v), shape }) },
  uint8: { works: false, make: (v, shape) => ({ data: Uint8Array.from(v), shape }) },
  buffer: { works: false, make: (v, shape) => ({ data: Buffer.from(Float32Array.from(v).buffer), shape }) },
  bigint64: { works: false, make: (v, shape) => ({ data: BigInt64Array.from(v, (x) => BigInt(Math.round(x))), shape }) },
  dataView: { works: false, make: (v, shape) => ({ data: new DataView(Float32Array.from(v).buffer), shape }) },
  arrayBuffer: { works: false, make: (v, shape) => ({ data: Float32Array.from(v).buffer, shape }) },
  numberArray: { works: false, make: (v, shape) => JSON.parse(JSON.stringify({ data: v, shape })) as unknown },
  jsonTypedArray: { works: false, make: (v, shape) => JSON.parse(JSON.stringify({ data: Float32Array.from(v), shape })) as unknown },
  clonedTensor: { works: false, make: (v, shape) => structuredClone(Tensor.fromArray(v, shape)) },
  bareFloat32Array: { works: false, make: (v) => Float32Array.from(v) },
  typedShape: { works: false, make: (v, shape) => ({ data: Float32Array.from(v), shape: Int32Array.from(shape) }) },
  fractionalShape: { works: false, make: (v, shape) => ({ data: Float32Array.from(v), shape: [...shape, 0.5] }) },
  negativeShape: { works: false, make: (v, shape) => ({ data: Float32Array.from(v), shape: [-1, ...shape] }) },
  hugeShape: { works: false, make: (v) => ({ data: Float32Array.from(v), shape: Array.from({ length: 100_000 }, () => 1.5) }) },
  shortData: { works: false, make: (v, shape) => ({ data: Float32Array.from(v).subarray(1), shape }) },
  nullData: { works: false, make: (_v, shape) => ({ data: null, shape }) },
  map: {
    works: false,
    make: (v, shape) =>
      new Map<string, unknown>([
        ['data', Float32Array.from(v)],
        ['shape', shape],
      ]),
  },
  set: { works: false, make: (v) => new Set(v) },
  sparse: { works: false, make: (v) => [v[0], , v[0]] }, // eslint-disable-line no-sparse-arrays
  date: { works: false, make: () => new Date(0) },
  string: { works: false, make: (v) => String(v) },
  bigint: { works: false, make: () => 1n },
  boolean: { works: false, make: () => true },
  symbol: { works: false, make: () => Symbol('leaf') },
  func: { works: false, make: () => () => 1 },
  promise: { works: false, make: (v, shape) => Promise.resolve({ data: Float32Array.from(v), shape }) },
  symbolKeys: { works: false, make: (v, shape) => ({ [Symbol('k')]: 1, x: { data: Float32Array.from(v), shape } }) },
}

test('odd grads leaves (typed arrays of every dtype, JSON.parse and structuredClone copies, exotic objects): a right result, or a short TypeError/RangeError naming the leaf with nothing changed', (t) => {
  const kinds = Object.keys(oddLeaves)
  let cases = 0
  fc.assert(
    fc.property(treeSpec, variant, fc.nat(), (spec, name, pick) => {
      const arrays = leafPaths(spec).filter(([, s]) => s.kind === 'plain')
      if (arrays.length === 0) return true
      const params = makeTree(spec, 1)
      const opt = variants[name]({ learningRate: 0.01, preconditionerUpdateProbability: 1 })
      const state = opt.init(params)
      opt.update(makeTree(spec, 7), state, params)
      const [path, ls] = arrays[pick % arrays.length]
      const [want] = opt.update(makeTree(spec, 9), state.clone(), params)
      const before = { bytes: state.toBytes(), params: JSON.stringify(snapshot(params)) }
      // every kind of odd leaf at this path, each on the same state
      return kinds.every((kind) => {
        cases++
        const odd = oddLeaves[kind]
        const grads = makeTree(spec, 9)
        setLeaf(grads, path, odd.make(Array.from((leafAt(grads, path) as { data: Float32Array }).data), ls.shape))
        const st = state.clone()
        let got: PyTree
        try {
          ;[got] = opt.update(grads, st, params)
        } catch (e) {
          const ok =
            !odd.works &&
            (e instanceof TypeError || e instanceof RangeError) &&
            e.message.includes(`'${path}`) &&
            e.message.length < 500 &&
            Buffer.compare(Buffer.from(st.toBytes()), Buffer.from(before.bytes)) === 0 &&
            JSON.stringify(snapshot(params)) === before.params &&
            st.count === 1
          if (!ok) t.log(kind, path, e instanceof Error ? `${e.constructor.name}: ${e.message.slice(0, 300)}` : e)
          return ok
        }
        if (!odd.works) t.log(kind, path, 'accepted')
        return odd.works && JSON.stringify(snapshot(got)) === JSON.stringify(snapshot(want)) && st.count === 2
      })
    }),
    { numRuns: RUNS.oddInput, seed: SEED },
  )
  t.true(cases >= kinds.length * 10, `${cases} cases`)
})

test('a checkpoint with any one bit flipped is refused with a RangeError/TypeError, and the state is unchanged', (t) => {
  const params = { w: { data: Float32Array.from(values(12, 1)), shape: [4, 3] }, b: { data: Float32Array.from(values(3, 2)), shape: [3] } }
  const states = Object.entries(variants).map(([name, make]) => {
    const opt = make({ learningRate: 0.01, preconditionerUpdateProbability: 1 })
    const state = opt.init(params)
    opt.update({ w: { data: Float32Array.from(values(12, 3)), shape: [4, 3] }, b: { data: Float32Array.from(values(3, 4)), shape: [3] } }, state, params)
    return { name, state, bytes: state.toBytes() }
  })
  fc.assert(
    fc.property(fc.nat({ max: states.length - 1 }), fc.nat(), fc.integer({ min: 0, max: 7 }), (which, at, bit) => {
      const { state, bytes } = states[which]
      const bad = Uint8Array.from(bytes)
      bad[at % bad.length] ^= 1 << bit
      try {
        state.loadBytes(bad)
        return false
      } catch (e) {
        if (!(e instanceof TypeError || e instanceof RangeError)) return false
      }
      return Buffer.compare(Buffer.from(state.toBytes()), Buffer.from(bytes)) === 0
    }),
    { numRuns: RUNS.checkpoints, seed: SEED },
  )
  t.pass()
})

const anyValue = fc.oneof(
  fc.double(),
  fc.integer({ min: -10, max: 10000 }),
  fc.constantFrom(2 ** 40, 2 ** 53, 1e300, -1e300, 1e-300, 0.5, NaN, Infinity),
  fc.boolean(),
  fc.constant(null),
  fc.string({ maxLength: 6 }),
  fc.constantFrom('1st', '2nd', 'float32', 'bfloat16', 'float16', 'one_diag', 'all_diag', 'tensorfloat32'),
  fc.constant([1, 2]),
  fc.constant({}),
)

test('any option values: the factory, init and a step either work or throw a TypeError/RangeError, never anything else', (t) => {
  const params = { w: { data: Float32Array.from(values(6, 1)), shape: [3, 2] }, b: 0.5 }
  const grads = { w: { data: Float32Array.from(values(6, 2)), shape: [3, 2] }, b: 0.1 }
  const settable = (name: VariantName) => Object.entries(optionKinds(name)).filter(([, k]) => k !== 'mask')
  fc.assert(
    fc.property(variant, fc.array(fc.tuple(fc.nat(), anyValue), { maxLength: 4 }), (name, picks) => {
      const names = settable(name)
      const options: Record<string, unknown> = {}
      for (const [i, v] of picks) options[names[i % names.length][0]] = v
      try {
        const opt = variants[name](options)
        const state = opt.init(params)
        opt.update(grads, state, params)
      } catch (e) {
        return e instanceof TypeError || e instanceof RangeError
      }
      return true
    }),
    { numRuns: RUNS.options, seed: SEED },
  )
  t.pass()
})

test('Tensor.fromArray on arbitrary values and shapes: a tensor holding exactly Math.fround of each value, or a TypeError/RangeError', (t) => {
  fc.assert(
    fc.property(
      fc.array(fc.oneof(fc.double(), fc.integer(), fc.string({ maxLength: 2 }), fc.constant(undefined), fc.constant(null)), { maxLength: 6 }),
      fc.array(fc.oneof(fc.integer({ min: 0, max: 6 }), fc.constantFrom(-1, 1.5, 2 ** 32, 2 ** 53)), { maxLength: 3 }),
      (data, shape) => {
        let tensor: Tensor
        try {
          tensor = Tensor.fromArray(data as number[], shape)
        } catch (e) {
          return e instanceof TypeError || e instanceof RangeError
        }
        const got = tensor.toArray()
        return data.every((v) => typeof v === 'number') && got.length === data.length && data.every((v, i) => Object.is(got[i], Math.fround(v as number)))
      },
    ),
    { numRuns: RUNS.fromArray, seed: SEED },
  )
  t.pass()
})
