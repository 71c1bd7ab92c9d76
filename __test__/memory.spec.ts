import test from 'ava'
import { Affine, applyUpdates, Kron, liveTensorBytes, LRA, Tensor, xmat, XMat, type PyTree } from '../index'
import { values } from './helpers'

// liveTensorBytes() is per process: these tests run one at a time, in this file alone.

const tensor = (shape: number[], seed: number) =>
  Tensor.fromArray(
    Float32Array.from(
      values(
        shape.reduce((a, b) => a * b, 1),
        seed,
      ),
    ),
    shape,
  )

const tree = (seed: number) => ({ w: tensor([32, 16], seed), b: tensor([16], seed + 1), deep: [tensor([4, 4, 4], seed + 2)] })

const classes = { Kron, XMat, LRA, Affine } as const

for (const [name, Ctor] of Object.entries(classes)) {
  test.serial(`${name}: a synchronous loop of steps holds no more native memory at its end than at its start`, (t) => {
    const params = tree(1)
    const grads = tree(7)
    const opt = new Ctor(params, { learningRate: 0.01, preconditionerUpdateProbability: 1 })
    const before = Array.from(params.w.toArray())
    const start = liveTensorBytes()
    // no collection is forced in here: whatever the steps did not dispose would still count
    for (let i = 0; i < 20; i++) opt.step(grads)
    t.is(liveTensorBytes() - start, 0)
    t.notDeepEqual(Array.from(params.w.toArray()), before, 'the steps changed the params')
    t.is(opt.count, 20)
  })
}

test.serial('the functional update and applyUpdates return tensors that count until disposed', (t) => {
  const params = tree(3)
  const grads = tree(4)
  const opt = xmat({ learningRate: 0.01 })
  const state = opt.init(params)
  const start = liveTensorBytes()
  const [updates] = opt.update(grads, state, params)
  const leafBytes = (32 * 16 + 16 + 64) * 4
  t.is(liveTensorBytes() - start, leafBytes)
  const next = applyUpdates(params, updates) as { w: Tensor; b: Tensor; deep: Tensor[] }
  t.is(liveTensorBytes() - start, 2 * leafBytes)
  const all = (x: PyTree): Tensor[] =>
    x instanceof Tensor ? [x] : Array.isArray(x) ? x.flatMap(all) : typeof x === 'object' && x !== null ? Object.values(x).flatMap((v) => all(v as PyTree)) : []
  for (const u of [...all(updates), ...all(next)]) u.dispose()
  t.is(liveTensorBytes() - start, 0)
})

test.serial('a disposed tensor throws a TypeError when used, naming the leaf, and changes no state', (t) => {
  const params = tree(5)
  const grads = tree(6)
  const opt = xmat({ learningRate: 0.01 })
  const state = opt.init(params)
  grads.deep[0].dispose()
  grads.deep[0].dispose() // idempotent
  t.true(grads.deep[0].disposed)
  t.false(grads.w.disposed)
  t.throws(() => grads.deep[0].toArray(), { instanceOf: TypeError, message: /disposed/ })
  t.throws(() => grads.deep[0].dtype, { instanceOf: TypeError, message: /disposed/ })
  t.throws(() => opt.update(grads, state, params), { instanceOf: TypeError, message: /grads 'deep\.0': the tensor was disposed/ })
  t.is(state.count, 0)
  t.throws(() => applyUpdates(params, grads), { instanceOf: TypeError, message: /updates 'deep\.0': the tensor was disposed/ })
})
