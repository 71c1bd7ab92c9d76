import test from 'ava'
import { applyUpdates, flatten, kron, Tensor, unflatten } from '../index'
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
