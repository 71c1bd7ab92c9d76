import test from 'ava'
import { Kron, liveTensorBytes, Tensor } from '../index'

test.serial('Tensor.set copies new values in place: same object, shape and dtype, no native memory left behind', (t) => {
  const x = Tensor.fromArray([1, 2, 3, 4, 5, 6], [2, 3])
  const start = liveTensorBytes()
  x.set(Float32Array.of(6, 5, 4, 3, 2, 1))
  t.deepEqual(Array.from(x.toArray()), [6, 5, 4, 3, 2, 1])
  t.deepEqual(x.shape, [2, 3])
  t.is(x.dtype, 'float32')
  t.is(liveTensorBytes(), start)
  const h = Tensor.fromArray([1, 2], [2], { dtype: 'float16' })
  h.set(Float32Array.of(0.5, -2))
  t.is(h.dtype, 'float16')
  t.deepEqual(Array.from(h.toArray()), [0.5, -2])
})

test.serial('an optimizer holding a Tensor sees the values Tensor.set wrote', (t) => {
  const w = Tensor.fromArray([0, 0, 0], [3])
  const opt = new Kron({ w }, { learningRate: 0.1, b1: 0 })
  w.set(Float32Array.of(10, 10, 10))
  opt.step({ w: Tensor.fromArray([1, 1, 1], [3]) })
  for (const v of w.toArray()) t.true(v < 10 && v > 9, `value ${v} is 10 minus one step`)
})

test('Tensor.set rejects a wrong length (RangeError), a non-Float32Array (TypeError) and a disposed tensor, changing nothing', (t) => {
  const x = Tensor.fromArray([1, 2, 3], [3])
  t.throws(() => x.set(Float32Array.of(1, 2)), { instanceOf: RangeError, message: /3 values/ })
  t.throws(() => x.set([1, 2, 3] as unknown as Float32Array), { instanceOf: TypeError, message: /Float32Array/ })
  t.deepEqual(Array.from(x.toArray()), [1, 2, 3])
  x.dispose()
  t.throws(() => x.set(Float32Array.of(1, 2, 3)), { instanceOf: TypeError, message: /disposed/ })
})

test('Tensor.toArray(into) fills and returns the caller’s buffer; a wrong length is a RangeError', (t) => {
  const x = Tensor.fromArray([1, 2, 3, 4], [2, 2])
  const buf = new Float32Array(4)
  t.is(x.toArray(buf), buf)
  t.deepEqual(Array.from(buf), [1, 2, 3, 4])
  t.throws(() => x.toArray(new Float32Array(3)), { instanceOf: RangeError, message: /4 values/ })
  t.throws(() => x.toArray([0, 0, 0, 0] as unknown as Float32Array), { instanceOf: TypeError, message: /Float32Array/ })
})
