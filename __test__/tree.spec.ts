import test from 'ava'
import * as vm from 'node:vm'
import { applyUpdates, flatten, kron, Kron, Tensor, unflatten, type ArrayLeaf } from '../index'
import { leavesLike } from '../src/tree'
import { leaf } from './helpers'

test('flatten visits object keys in sorted order with dotted paths', (t) => {
  const a = { z: leaf([1]), a: { y: [leaf([2]), 3], b: null }, m: undefined }
  const b = { m: undefined, a: { b: null, y: [leaf([2]), 3] }, z: leaf([1]) }
  const fa = flatten(a)
  const fb = flatten(b)
  t.deepEqual(fa.paths, ['a.y.0', 'a.y.1', 'z'])
  t.deepEqual(fb.paths, fa.paths)
  t.deepEqual(fa.treedef, fb.treedef)
})

test('unflatten rebuilds the structure, keeping null and undefined', (t) => {
  const tree = { b: [1, { c: 2 }], a: null, d: leaf([4]) }
  const f = flatten(tree)
  const out = unflatten(f.treedef, f.leaves) as typeof tree
  t.deepEqual(out, { a: null, b: [1, { c: 2 }], d: tree.d })
  t.throws(() => unflatten(f.treedef, [1]), { instanceOf: RangeError })
})

test('a single leaf is a tree', (t) => {
  const f = flatten(Tensor.fromArray([1, 2], [2]))
  t.deepEqual(f.paths, [''])
  const u: number = applyUpdates<number>(5, 1)
  t.is(u, 6)
})

test('trees in different key order step identically', (t) => {
  const p1 = { w: leaf([1, 2, 3, 4], [2, 2]), b: leaf([1, 2]) }
  const p2 = { b: leaf([1, 2]), w: leaf([1, 2, 3, 4], [2, 2]) }
  const opt = kron({ learningRate: 0.1 })
  const s1 = opt.init(p1)
  const s2 = opt.init(p2)
  const [u1] = opt.update({ b: leaf([1, 1]), w: leaf([1, 0, 0, 1], [2, 2]) }, s1)
  const [u2] = opt.update({ w: leaf([1, 0, 0, 1], [2, 2]), b: leaf([1, 1]) }, s2)
  t.deepEqual(flatten(u1).leaves, flatten(u2).leaves)
  t.deepEqual(s1.toBytes(), s2.toBytes())
})

test('cycles and non-leaf objects are rejected with the path', (t) => {
  const a: Record<string, unknown> = { x: leaf([1]) }
  a.self = a
  t.throws(() => flatten(a), { instanceOf: TypeError, message: /'self' is a cycle/ })
  t.throws(() => flatten({ d: new Date() }), { instanceOf: TypeError, message: /'d' is not a leaf/ })
})

test('leavesLike takes the leaves of a tree of exactly the given structure, else null', (t) => {
  const params = { z: leaf([1]), a: { y: [leaf([2]), 3], b: null }, m: undefined }
  const def = flatten(params).treedef
  // another tree of the same structure, keys in another order: the leaves in flatten order
  const same = { m: undefined, a: { b: null, y: [leaf([5]), 6] }, z: leaf([4]) }
  t.deepEqual(leavesLike(same, def), flatten(same).leaves)
  const differ: [string, unknown][] = [
    ['an extra key', { ...same, extra: 1 }],
    ['a missing key', { a: same.a, z: same.z }],
    ['a leaf where a container was', { ...same, a: leaf([1]) }],
    ['a container where a leaf was', { ...same, z: { q: leaf([1]) } }],
    ['null for undefined', { ...same, m: null }],
    ['a longer array', { ...same, a: { b: null, y: [leaf([5]), 6, 7] } }],
    ['an array for an object', { ...same, a: [null, [leaf([5]), 6]] }],
    ['a class instance for an object', { ...same, a: Object.assign(Object.create({}), same.a) }],
    ['a non-leaf where a leaf was', { ...same, z: 'x' }],
  ]
  for (const [what, tree] of differ) t.is(leavesLike(tree, def), null, what)
  t.is(leavesLike({ ...same, m: 1 }, def), null, 'a value where none was')
  // a non-enumerable key is not one Object.keys (and so flatten) sees
  const hidden = { a: same.a, z: same.z, n: undefined }
  Object.defineProperty(hidden, 'm', { value: undefined, enumerable: false })
  t.is(leavesLike(hidden, def), null, 'a non-enumerable key')
})

test('grads of another structure than the params still get the full check and its message', (t) => {
  const params = { a: { w: leaf([1, 2]) }, b: leaf([3]) }
  const opt = kron({ learningRate: 0.1 })
  const state = opt.init(params)
  t.throws(() => opt.update({ a: { w: leaf([1, 2]), x: leaf([1]) }, b: leaf([3]) }, state, params), {
    instanceOf: RangeError,
    message: /grads: leaf 'a\.x' is not in the params/,
  })
  t.throws(() => opt.update({ a: { w: leaf([1, 2, 3]) }, b: leaf([3]) }, state, params), {
    instanceOf: RangeError,
    message: /grads 'a\.w' has shape \[3\], expected \[2\]/,
  })
  t.is(state.count, 0)
  const [u] = opt.update({ b: leaf([1]), a: { w: leaf([1, 2]) } }, state, params)
  t.deepEqual(flatten(u).paths, ['a.w', 'b'])
  t.is(state.count, 1)
})

/** The updates of one kron step on `params` with `grads`, as plain numbers by path. */
function oneStep(params: unknown, grads: unknown): Record<string, number[]> {
  const opt = kron({ learningRate: 0.1, preconditionerUpdateProbability: 1 })
  const st = opt.init(params as never)
  const [u] = opt.update(grads as never, st, params as never)
  const f = flatten(u)
  return Object.fromEntries(
    f.paths.map((p, i) => [
      p,
      Array.from(f.leaves[i] instanceof Tensor ? f.leaves[i].toArray() : typeof f.leaves[i] === 'number' ? [f.leaves[i]] : f.leaves[i].data),
    ]),
  )
}

test('odd but valid trees work and give the same numbers as plain ones: null prototypes, Proxies, frozen grads, structuredClone copies, other-realm and offset Float32Arrays', (t) => {
  const params = () => ({ w: leaf([1, 2, 3, 4, 5, 6], [2, 3]), b: [0.5, leaf([1, -1])] })
  const grads = () => ({ w: leaf([0.1, -0.2, 0.3, 0.4, -0.5, 0.6], [2, 3]), b: [0.25, leaf([0.5, 0.5])] })
  const want = oneStep(params(), grads())
  const nullProto = Object.assign(Object.create(null) as object, grads())
  t.deepEqual(oneStep(params(), nullProto), want)
  t.deepEqual(oneStep(params(), new Proxy(grads(), {})), want)
  t.deepEqual(oneStep(params(), Object.freeze(grads())), want)
  t.deepEqual(oneStep(structuredClone(params()), structuredClone(grads())), want)
  // a Float32Array from another realm (a vm context) and one at an offset in a larger buffer
  const other = vm.runInNewContext('new Float32Array([0.1, -0.2, 0.3, 0.4, -0.5, 0.6])') as Float32Array
  t.false(other instanceof Float32Array)
  t.deepEqual(oneStep(params(), { ...grads(), w: { data: other, shape: [2, 3] } }), want)
  const wide = new Float32Array([9, 9, 0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 9])
  t.deepEqual(oneStep(params(), { ...grads(), w: { data: wide.subarray(2, 8), shape: [2, 3] } }), want)
  // values built by JSON.parse, converted as the message says
  const parsed = JSON.parse(JSON.stringify({ data: Array.from(grads().w.data), shape: [2, 3] })) as { data: number[]; shape: number[] }
  t.deepEqual(oneStep(params(), { ...grads(), w: { data: Float32Array.from(parsed.data), shape: parsed.shape } }), want)
})

test('odd trees that cannot work are a TypeError/RangeError naming the path and the fix', (t) => {
  const g = { w: leaf([1, 2]) }
  class Layer {
    w = leaf([1, 2])
  }
  const tensor = Tensor.fromArray([1, 2], [2])
  let deep: unknown = leaf([1])
  for (let i = 0; i < 5000; i++) deep = { a: deep }
  const named = Object.assign([leaf([1])], { extra: leaf([2]) })
  const cases: [unknown, typeof TypeError | typeof RangeError, RegExp][] = [
    [{ a: [leaf([1]), , leaf([2])] }, TypeError, /'a\.1' is a hole in a sparse array: fill it/], // eslint-disable-line no-sparse-arrays
    [{ ...g, [Symbol('s')]: leaf([1]) }, TypeError, /'\(root\)' has symbol keys.*use string keys/],
    [{ m: new Map([['w', leaf([1])]]) }, TypeError, /'m' is not a leaf.*a Map of 1 entries: use a plain object \(Object\.fromEntries\(map\)\)/],
    [{ s: new Set([1]) }, TypeError, /'s' is not a leaf.*a Set of 1 entries: use an array/],
    [{ l: new Layer() }, TypeError, /'l' is not a leaf.*a Layer with keys \{w\}: trees are built from plain objects and arrays/],
    [{ n: new Number(3) }, TypeError, /'n' is not a leaf.*primitive number/],
    [{ n: 3n }, TypeError, /'n' is not a leaf.*3n is a bigint: use Number\(x\)/],
    [{ s: 'abc' }, TypeError, /'s' is not a leaf.*a string 'abc'/],
    [{ p: Promise.resolve(1) }, TypeError, /'p' is not a leaf.*await it first/],
    [{ f: new Float32Array(2) }, TypeError, /'f' is not a leaf.*Float32Array of 2 values \[0, 0\] on its own: wrap it as \{ data, shape: \[data\.length\] \}/],
    [{ f: new Float64Array(2) }, TypeError, /'f' is not a leaf.*wrap it as \{ data: Float32Array\.from\(x\), shape: \[x\.length\] \}/],
    [{ t: structuredClone(tensor) }, TypeError, /'t' is not a leaf: it is a plain copy of a Tensor.*Tensor\.fromArray/],
    [
      { d: { data: new Float32Array(2), shape: new Int32Array([2]) } },
      TypeError,
      /'d': shape must be an array of non-negative integers, got an Int32Array.*Array\.from\(shape\)/,
    ],
    [
      { d: { data: new DataView(new ArrayBuffer(8)), shape: [2] } },
      TypeError,
      /'d': data must be a Float32Array \(float32\), got DataView of 8 bytes: use new Float32Array\(view\.buffer/,
    ],
    [{ d: { data: new BigInt64Array(2), shape: [2] } }, TypeError, /'d': data must be .*got BigInt64Array.*Float32Array\.from\(data, Number\)/],
    [{ d: { data: Buffer.alloc(8), shape: [2] } }, TypeError, /'d': data must be .*got Buffer of 8 values.*Float32Array\.from\(data\)/],
    [{ d: { data: new ArrayBuffer(8), shape: [2] } }, TypeError, /'d': data must be .*got ArrayBuffer of 8 bytes: view it with new Float32Array\(buffer\)/],
    [{ d: { data: null, shape: [2] } }, TypeError, /'d': data must be a Float32Array \(float32\), got null/],
    [deep, RangeError, /'a\.a\.a.*…(a\.)+a' is nested more than 1000 levels deep/],
    [{ named }, TypeError, /'named' is an array with a named property 'extra'/],
  ]
  for (const [tree, Cls, message] of cases) {
    const err = t.throws(() => flatten(tree), undefined, String(message))
    t.true(err instanceof Cls, `${String(message)}: ${err?.constructor.name} ${err?.message}`)
    t.regex(err?.message ?? '', message)
    t.true((err?.message.length ?? 0) < 500, err?.message.slice(0, 100))
  }
  tensor.dispose()
})

test('a number leaf in a read-only property is refused when the optimizer is made, not after a step', (t) => {
  const frozen = Object.freeze({ a: 1, b: leaf([1, 2]) })
  t.throws(() => new Kron(frozen), { instanceOf: TypeError, message: /params 'a' is a number in a read-only property.*\{ data: Float32Array, shape: \[\] \}/ })
  const getter = { b: leaf([1, 2]) } as { b: ArrayLeaf; c?: number }
  Object.defineProperty(getter, 'c', { get: () => 2, enumerable: true })
  t.throws(() => new Kron(getter), { instanceOf: TypeError, message: /params 'c' is a number in a read-only property/ })
  t.throws(() => new Kron({ l: Object.freeze([1, 2]) as number[] }), { instanceOf: TypeError, message: /params 'l\.0' is a number in a read-only property/ })
  // frozen containers of array leaves are fine: their data is written in place
  const p = Object.freeze({ b: leaf([1, 2]) })
  const opt = new Kron(p, { learningRate: 0.1 })
  opt.step({ b: leaf([1, 1]) })
  t.notDeepEqual(Array.from(p.b.data), [1, 2])
})

test("unflatten keeps a key '__proto__' (as JSON.parse makes it) as an own key: a functional update answers such a tree whole", (t) => {
  const params = JSON.parse('{"__proto__": {"data": [0], "shape": [1]}, "b": 1}') as Record<string, unknown>
  params.__proto__ = { data: Float32Array.of(0.5), shape: [1] }
  t.true(Object.prototype.hasOwnProperty.call(params, '__proto__'))
  const { leaves, treedef } = flatten(params)
  const back = unflatten<Record<string, unknown>>(treedef, leaves)
  t.true(Object.prototype.hasOwnProperty.call(back, '__proto__'))
  t.is(Object.getPrototypeOf(back), Object.prototype)
  t.deepEqual(Object.keys(back).sort(), ['__proto__', 'b'])
})
