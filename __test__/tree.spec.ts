import test from 'ava'
import { applyUpdates, flatten, kron, Tensor, unflatten } from '../index'
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
