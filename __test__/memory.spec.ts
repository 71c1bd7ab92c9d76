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

test.serial('OptimizerState.dispose frees the native state at once; any later use is a TypeError; refused while a step is in flight', async (t) => {
  const params = tree(8)
  const grads = tree(9)
  const opt = xmat({ learningRate: 0.01 })
  const state = opt.init(params)
  opt.update(grads, state, params)
  // refused while updateAsync runs, and the state stays usable
  const pending = opt.updateAsync(grads, state, params)
  t.throws(() => state.dispose(), { instanceOf: Error, message: /still running/ })
  await pending
  t.is(state.count, 2)
  t.false(state.disposed)
  state.dispose()
  state.dispose() // idempotent
  t.true(state.disposed)
  t.true(state.handle.disposed, 'the native tensors were dropped')
  t.throws(() => opt.update(grads, state, params), { instanceOf: TypeError, message: /the state was disposed/ })
  t.throws(() => state.toBytes(), { instanceOf: TypeError, message: /the state was disposed/ })
  t.throws(() => state.clone(), { instanceOf: TypeError, message: /the state was disposed/ })
  t.throws(() => state.count, { instanceOf: TypeError, message: /the state was disposed/ })
  await t.throwsAsync(() => opt.updateAsync(grads, state, params), { instanceOf: TypeError, message: /the state was disposed/ })
  // the native side refuses too, should anything reach it
  t.throws(() => state.handle.count, { message: /disposed/ })
})

test.serial('PsgdOptimizer.dispose frees its state and keeps the params; later steps are a TypeError', async (t) => {
  const params = tree(10)
  const grads = tree(11)
  const opt = new Kron(params, { learningRate: 0.01 })
  opt.step(grads)
  const after = Array.from(params.w.toArray())
  const pending = opt.stepAsync(grads)
  t.throws(() => opt.dispose(), { instanceOf: Error, message: /still running/ })
  await pending
  const now = Array.from(params.w.toArray())
  t.notDeepEqual(now, after)
  opt.dispose()
  t.true(opt.state.disposed)
  t.throws(() => opt.step(grads), { instanceOf: TypeError, message: /the state was disposed/ })
  await t.throwsAsync(() => opt.stepAsync(grads), { instanceOf: TypeError, message: /the state was disposed/ })
  t.throws(() => opt.stateDict(), { instanceOf: TypeError, message: /the state was disposed/ })
  t.deepEqual(Array.from(params.w.toArray()), now, 'the params stay as the last step left them')
  t.false(params.w.disposed)
})
