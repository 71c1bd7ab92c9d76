/**
 * The TensorFlow.js adapter's state (on the `cpu` backend): which saved state lands on
 * which variables, the names masks see, a changing trainable set, and the memory of saves.
 */
import '@tensorflow/tfjs-backend-cpu'
import * as tf from '@tensorflow/tfjs-core'
import * as tfl from '@tensorflow/tfjs-layers'
import test from 'ava'
import { liveTensorBytes } from '../index'
import { AffineOptimizer, KronOptimizer, LRAOptimizer, XMatOptimizer, type NamedTensor, type PsgdTfjsOptimizer } from '../tfjs'
import { values } from './helpers'
import { parse } from './safetensors'
import { saveWithOptimizer } from './tfjs-contracts'
import { Draft } from '../src/tfjs'

const classes = { KronOptimizer, XMatOptimizer, LRAOptimizer, AffineOptimizer } as const
type Ctor = (typeof classes)[keyof typeof classes]
type Opt = PsgdTfjsOptimizer<object>

test.before(async () => {
  await tf.setBackend('cpu')
})

let uid = 0
/** A fresh prefix for names: names are unique per process. */
const fresh = (prefix: string) => `st${uid++}_${prefix}`

const bits = (v: tf.Tensor) => Array.from(new Uint32Array((v.dataSync() as Float32Array).slice().buffer))

function variable(name: string, shape: number[], seed: number): tf.Variable {
  const n = shape.reduce((a, b) => a * b, 1)
  return tf.variable(tf.tensor(Float32Array.from(values(n, seed)), shape), true, name)
}

/** Deterministic gradient of `v` at step `k` (`i` tells variables apart). */
const gradOf = (v: tf.Variable, k: number, i: number) => tf.tensor(Float32Array.from(values(v.size, 1000 * k + i + 1)), v.shape)

/** One step on `vars` (null: that variable gets a null gradient), in the list form; the gradients are freed. */
function step(opt: tf.Optimizer, vars: (tf.Variable | null)[], k: number, like: tf.Variable[] = vars as tf.Variable[]): void {
  const list = vars.map((v, i) => ({ name: v?.name ?? like[i].name, tensor: v ? gradOf(v, k, i) : (null as unknown as tf.Tensor) }))
  opt.applyGradients(list)
  tf.dispose(list.map((g) => g.tensor).filter((g) => g !== null))
}

/** The live states of an optimizer: their variable names, counts and parsed bytes. */
function states(opt: tf.Optimizer) {
  const groups = (opt as unknown as { book: { groups: Map<string, { names: string[]; state: { count: number; toBytes(): Uint8Array } }> } }).book.groups
  return [...groups.values()].map((g) => ({ names: g.names, count: g.state.count, file: parse(g.state.toBytes()) }))
}

/** The tensors of leaf `l` of a parsed state (`mu.<l>`, `Q.<l>.<i>`, `Ql.<l>`…), by name without the leaf index. */
function leafTensors(file: ReturnType<typeof parse>, l: number): Record<string, number[]> {
  const out: Record<string, number[]> = {}
  for (const [name, e] of file.tensors) {
    const [kind, index, ...more] = name.split('.')
    if (Number(index) === l) out[[kind, ...more].join('.')] = Array.from(e.data)
  }
  return out
}

/** The tensors spanning all leaves (XMat's `a`, `b`; LRA's `U`, `V`, `d`). */
function spanning(file: ReturnType<typeof parse>): Record<string, number[]> {
  return Object.fromEntries([...file.tensors].filter(([name]) => !name.includes('.')).map(([name, e]) => [name, Array.from(e.data)]))
}

/** A `units`-wide dense stack (input 4) whose layers are named `names`, kernels drawn from `seed + i`. */
function stack(names: string[], seed: number, optimizer: tf.Optimizer): tfl.Sequential {
  const m = tfl.sequential()
  names.forEach((name, i) => {
    m.add(
      tfl.layers.dense({
        name,
        units: 4,
        activation: i < names.length - 1 ? 'tanh' : 'linear',
        kernelInitializer: tfl.initializers.glorotUniform({ seed: seed + i }),
        ...(i === 0 ? { inputShape: [4] } : {}),
      }),
    )
  })
  m.compile({ optimizer, loss: 'meanSquaredError' })
  return m
}

const data = () => ({
  x: tf.tensor(Float32Array.from(values(16 * 4, 91)), [16, 4]),
  y: tf.tensor(Float32Array.from(values(16 * 4, 92)), [16, 4]),
})

const fit = (m: tfl.LayersModel, x: tf.Tensor, y: tf.Tensor, epochs = 2) => m.fit(x, y, { epochs, batchSize: 8, shuffle: false, verbose: 0 })

const sameModelBits = (t: import('ava').ExecutionContext, a: tfl.LayersModel, b: tfl.LayersModel) =>
  a.getWeights().forEach((w, i) => t.deepEqual(bits(w), bits(b.getWeights()[i]), `weight ${i}`))

function freeModels(...ms: tfl.LayersModel[]): void {
  for (const m of ms) {
    m.optimizer.dispose()
    m.dispose()
  }
}

const options = { learningRate: 0.02, preconditionerUpdateProbability: 0.5, seed: 3 }

for (const [name, Ctor] of Object.entries(classes)) {
  test.serial(`${name}: a state restored into a model rebuilt under names that sort differently continues bit-for-bit`, async (t) => {
    const { x, y } = data()
    const p = fresh('')
    // layers 8, 9, 10 sort as 10, 8, 9; the rebuilt 11, 12, 13 sort in order: same shapes
    // everywhere, so matching by sorted name would swap the layers' states silently
    const first = [`${p}L8`, `${p}L9`, `${p}L10`]
    const whole = stack(
      first.map((n) => `${n}w`),
      5,
      new Ctor(options),
    )
    await fit(whole, x, y)
    await fit(whole, x, y)

    const part = stack(first, 5, new Ctor(options))
    await fit(part, x, y)
    const saved = await part.optimizer.getWeights()
    const rebuilt = stack([`${p}L11`, `${p}L12`, `${p}L13`], 50, new Ctor(options))
    rebuilt.setWeights(part.getWeights())
    await (rebuilt.optimizer as Opt).setWeights(saved)
    await fit(rebuilt, x, y)
    sameModelBits(t, whole, rebuilt)
    freeModels(whole, part, rebuilt)
    tf.dispose([x, y])
  })
}

for (const [name, Ctor] of Object.entries(classes)) {
  test.serial(`${name}: two models sharing one optimizer, saved and loaded, each get their own state`, async (t) => {
    const { x, y } = data()
    const p = fresh('')
    // the same architecture: only the names can tell the two states apart
    const pair = (tag: string) => {
      const optimizer = new Ctor(options)
      return [stack([`${p}${tag}a1`, `${p}${tag}a2`], 7, optimizer), stack([`${p}${tag}b1`, `${p}${tag}b2`], 17, optimizer)]
    }
    const [a, b] = pair('s')
    await fit(a, x, y)
    await fit(b, x, y)
    const savedA = await saveWithOptimizer(a)
    const savedB = await saveWithOptimizer(b)
    // uninterrupted references that go on with A, or with B, after the same two fits
    const [refA, refAb] = pair('ra')
    const [refBa, refB] = pair('rb')
    for (const [m1, m2, m3] of [
      [refA, refAb, refA],
      [refBa, refB, refB],
    ]) {
      for (const m of [m1, m2, m3]) await fit(m, x, y)
    }
    // loaded in this process: tfjs-layers gives the variables other names (a `_1` suffix)
    const loadedB = await tfl.loadLayersModel(tf.io.fromMemory(savedB))
    const loadedA = await tfl.loadLayersModel(tf.io.fromMemory(savedA))
    t.true(loadedA.weights[0].name !== a.weights[0].name, loadedA.weights[0].name)
    await fit(loadedB, x, y)
    await fit(loadedA, x, y)
    sameModelBits(t, refA, loadedA)
    sameModelBits(t, refB, loadedB)
    freeModels(loadedA, loadedB, a, refA, refB)
    for (const m of [b, refAb, refBa]) m.dispose()
    tf.dispose([x, y])
  })
}

test.serial('a restored state that several sets of variables fit by shape alone is a RangeError, and nothing changes', async (t) => {
  const { x, y } = data()
  const p = fresh('')
  const shared = new KronOptimizer(options)
  const a = stack([`${p}a1`, `${p}a2`], 7, shared)
  const b = stack([`${p}b1`, `${p}b2`], 17, shared)
  await fit(a, x, y, 1)
  await fit(b, x, y, 1)
  const saved = await shared.getWeights()
  const restored = new KronOptimizer(options)
  await restored.setWeights(saved)
  // a third model of the same shapes under new names: A's state or B's? never a guess
  const c = stack([`${p}c1`, `${p}c2`], 27, restored)
  const before = c.getWeights().map(bits)
  await t.throwsAsync(() => fit(c, x, y, 1), { instanceOf: RangeError, message: /all fit the variables .* by shape, and no names decide/ })
  t.deepEqual(c.getWeights().map(bits), before)
  t.is(restored.iterations, 4)
  // both states are still there, and saved again
  const again = await restored.getWeights()
  t.deepEqual(
    again.map((w) => w.name),
    ['iter', 'psgd_state/0', 'psgd_state/1'],
  )
  freeModels(a, c)
  b.dispose()
  tf.dispose([x, y])
})

for (const [name, Ctor] of Object.entries(classes)) {
  // Kron's options are weightDecayMask and scannedLayers; the others' weight-decay mask is `mask` (psgd-jax's)
  test.serial(`${name}: mask functions see the variable's name and shape; the mask decays only what it names`, (t) => {
    const kernel = variable(fresh('dense/kernel'), [4, 3], 1)
    const bias = variable(fresh('dense/bias'), [3], 2)
    const seen: [string, number[]][] = []
    const mask = (path: string, leaf: unknown) => {
      seen.push([path, [...(leaf as { shape: number[] }).shape]])
      return !path.includes('bias')
    }
    const scanned: string[] = []
    const base = { learningRate: 0.1, weightDecay: 0.5, seed: 4 }
    const copies = (tag: string) => [variable(fresh(`${tag}/kernel`), [4, 3], 1), variable(fresh(`${tag}/bias`), [3], 2)]
    const masks = Ctor === KronOptimizer ? { weightDecayMask: mask, scannedLayers: (path: string) => (scanned.push(path), false) } : { mask }
    const masked = new Ctor({ ...base, ...masks })
    const all = copies('all')
    const none = copies('none')
    const decayAll = new Ctor(base)
    const decayNone = new Ctor({ ...base, weightDecay: 0 })
    for (let k = 0; k < 3; k++) {
      step(masked, [kernel, bias], k)
      step(decayAll, all, k)
      step(decayNone, none, k)
    }
    t.deepEqual(seen, [
      [kernel.name, [4, 3]],
      [bias.name, [3]],
    ])
    t.deepEqual(scanned, Ctor === KronOptimizer ? [kernel.name, bias.name] : [])
    // the kernel decays as with no mask, the bias as with no weight decay
    t.deepEqual(bits(kernel), bits(all[0]))
    t.deepEqual(bits(bias), bits(none[1]))
    t.notDeepEqual(bits(bias), bits(all[1]))
    for (const o of [masked, decayAll, decayNone]) o.dispose()
    tf.dispose([kernel, bias, ...all, ...none])
  })
}

test.serial('errors raised while a state is made name the variable', (t) => {
  const w = variable(fresh('scalar'), [], 1)
  const v = variable(fresh('vector'), [3], 1)
  const scanned = new KronOptimizer({ scannedLayers: (path: string) => path === w.name })
  t.throws(() => step(scanned, [v, w], 0), { instanceOf: RangeError, message: new RegExp(`'${w.name}' is 0-d`) })
  const badMask = new XMatOptimizer({ weightDecay: 0.1, mask: ((path: string) => (path === v.name ? 1 : true)) as never })
  t.throws(() => step(badMask, [w, v], 0), { instanceOf: TypeError, message: new RegExp(`predicate returned 1 for '${v.name}'`) })
  t.is(scanned.iterations + badMask.iterations, 0)
  tf.dispose([w, v])
})

/** Three variables, created in this order (their leaf order), each with a twin for a reference run. */
function trio(tag: string) {
  return [variable(fresh(`${tag}a`), [4, 3], 1), variable(fresh(`${tag}b`), [3], 2), variable(fresh(`${tag}c`), [3, 2], 3)]
}

/**
 * The states a step on `vars` would run on, as the optimizer plans them for a step, then
 * dropped (its own planning without the step): what a change of the set carries over,
 * seen before any step changes it.
 */
function planned(opt: tf.Optimizer, vars: tf.Variable[]) {
  const o = opt as unknown as {
    book: ConstructorParameters<typeof Draft>[0]
    groupFor(d: Draft, names: string[], vars: Map<string, tf.Variable>): unknown
    iterations: number
  }
  const draft = new Draft(o.book)
  o.groupFor(
    draft,
    vars.map((v) => v.name),
    new Map(vars.map((v) => [v.name, v])),
  )
  const out = [...draft.book.groups.values()].map((g) => ({ names: g.names, count: g.state.count, file: parse(g.state.toBytes()) }))
  draft.abandon()
  return out
}

/** A step whose gradients are all NaN (refused by the core: it changes nothing). */
function refusedStep(opt: tf.Optimizer, vars: (tf.Variable | null)[], like: tf.Variable[]): void {
  const list = vars.map((v, i) => ({ name: like[i].name, tensor: v ? tf.fill(v.shape, NaN) : (null as unknown as tf.Tensor) }))
  try {
    opt.applyGradients(list)
  } finally {
    tf.dispose(list.map((g) => g.tensor).filter((g) => g !== null))
  }
}

for (const [name, Ctor] of Object.entries(classes)) {
  const perVariable = Ctor === KronOptimizer || Ctor === AffineOptimizer
  test.serial(`${name}: freezing and unfreezing a variable (null gradients) continues the count and keeps each variable's state`, (t) => {
    const [a, b, c] = trio('f')
    const opt = new Ctor(options)
    for (let k = 0; k < 3; k++) step(opt, [a, b, c], k)
    const [before] = states(opt)
    // c frozen: a null gradient for it (as a GAN's or a conditional branch's step gives).
    // A refused step on {a, b} changes nothing; the plan of a step on them shows the
    // state made for {a, b}, before any step changes it.
    t.throws(() => refusedStep(opt, [a, b, null], [a, b, c]), { instanceOf: RangeError, message: /NaN/ })
    t.deepEqual(states(opt), [before])
    const [ab, rest] = planned(opt, [a, b])
    t.deepEqual(
      [ab, rest].map((s) => [s.names, s.count]),
      [
        [[a.name, b.name], 3],
        [[c.name], 3],
      ],
    )
    t.deepEqual(leafTensors(rest.file, 0), leafTensors(before.file, 2), "c's state waits, as it was")
    if (perVariable) {
      // momentum and factors of a and b carried over
      t.deepEqual(leafTensors(ab.file, 0), leafTensors(before.file, 0))
      t.deepEqual(leafTensors(ab.file, 1), leafTensors(before.file, 1))
    } else {
      // the momentum carried over; the preconditioner over {a, b} starts anew
      t.deepEqual(leafTensors(ab.file, 0).mu, leafTensors(before.file, 0).mu)
      t.deepEqual(leafTensors(ab.file, 1).mu, leafTensors(before.file, 1).mu)
      const [a2, b2] = trio('fn')
      const other = new Ctor(options)
      t.throws(() => refusedStep(other, [a2, b2], [a2, b2]), { instanceOf: RangeError })
      t.deepEqual(states(other), [])
      t.deepEqual(spanning(ab.file), spanning(planned(other, [a2, b2])[0].file))
      t.notDeepEqual(spanning(ab.file), spanning(before.file))
      other.dispose()
      tf.dispose([a2, b2])
    }
    for (let k = 3; k < 5; k++) step(opt, [a, b, null], k, [a, b, c])
    t.is(opt.iterations, 5)
    t.deepEqual(
      states(opt).map((s) => [s.names, s.count]),
      [
        [[a.name, b.name], 5],
        [[c.name], 3],
      ],
    )
    if (perVariable) {
      // a and b step as if c had never been there (c is last in leaf order: no draw of its comes before theirs)
      const [a2, b2] = trio('fr')
      const ref = new Ctor(options)
      for (let k = 0; k < 5; k++) step(ref, [a2, b2], k)
      t.deepEqual(bits(a), bits(a2))
      t.deepEqual(bits(b), bits(b2))
      ref.dispose()
      tf.dispose([a2, b2])
    }
    const [abAfter, cAfter] = states(opt)
    // c unfrozen: its state comes back (and a's and b's go on), at the optimizer's count
    t.throws(() => refusedStep(opt, [a, b, c], [a, b, c]), { instanceOf: RangeError })
    t.is(states(opt).length, 2)
    const plan = planned(opt, [a, b, c])
    const [all] = plan
    t.deepEqual([all.names, all.count, plan.length], [[a.name, b.name, c.name], 5, 1])
    t.deepEqual(leafTensors(all.file, 2), leafTensors(cAfter.file, 0))
    t.deepEqual(leafTensors(all.file, 0).mu, leafTensors(abAfter.file, 0).mu)
    if (perVariable) t.deepEqual(leafTensors(all.file, 1), leafTensors(abAfter.file, 1))
    step(opt, [a, b, c], 5)
    t.is(states(opt)[0].count, 6)
    opt.dispose()
    tf.dispose([a, b, c])
  })
}

for (const [name, Ctor] of Object.entries(classes)) {
  test.serial(`${name}: sets that alternate without sharing variables (a GAN) each keep their state, at the optimizer's count`, (t) => {
    const [g, , d] = trio('gan')
    const [g2] = trio('ganref')
    const opt = new Ctor(options)
    // the reference steps g2 alone at the counts g steps at (0, 2, 4, …)
    const ref = new Ctor(options)
    for (let k = 0; k < 4; k++) {
      step(opt, [g], k)
      step(opt, [d], k)
      step(ref, [g2], k)
      ;(ref as unknown as { iterations_: number }).iterations_ += 1
    }
    t.is(opt.iterations, 8)
    t.deepEqual(
      states(opt).map((s) => [s.names, s.count]),
      [
        [[g.name], 7],
        [[d.name], 8],
      ],
    )
    t.deepEqual(bits(g), bits(g2))
    for (const o of [opt, ref]) o.dispose()
    tf.dispose([g, d, g2])
  })
}

test.serial('a layer frozen and the model compiled again: the learning-rate schedule and the count go on', async (t) => {
  const { x, y } = data()
  const p = fresh('')
  const seen: number[] = []
  const opt = new KronOptimizer({ learningRate: (s: number) => (seen.push(s), 0.01), seed: 2 })
  const m = stack([`${p}l1`, `${p}l2`], 3, opt)
  await fit(m, x, y, 1)
  m.layers[0].trainable = false
  m.compile({ optimizer: opt, loss: 'meanSquaredError' })
  const frozen = m.layers[0].getWeights().map(bits)
  await fit(m, x, y, 1)
  t.deepEqual(m.layers[0].getWeights().map(bits), frozen)
  m.layers[0].trainable = true
  m.compile({ optimizer: opt, loss: 'meanSquaredError' })
  await fit(m, x, y, 1)
  t.deepEqual(seen, [0, 1, 2, 3, 4, 5])
  t.is(opt.iterations, 6)
  t.deepEqual(
    states(opt).map((s) => s.count),
    [6],
  )
  freeModels(m)
  tf.dispose([x, y])
})

test.serial('setWeights checks the whole list first: no iter, a foreign weight, another variant or a bad count is an error and changes nothing', async (t) => {
  const [a, b] = trio('sw')
  const opt = new KronOptimizer(options)
  for (let k = 0; k < 3; k++) step(opt, [a, b], k)
  const good = await opt.getWeights()
  const copy = good.map((w) => ({ name: w.name, tensor: w.tensor.clone() }))
  const xmat = new XMatOptimizer(options)
  step(xmat, [a, b], 0)
  const [, xmatState] = await xmat.getWeights()
  const before = states(opt)
  const cases: [string, NamedTensor[], ErrorConstructor, RegExp][] = [
    ['no iter', copy.slice(1), TypeError, /first weight must be the scalar 'iter'.*psgd_state\/0/],
    ['a foreign weight', [...copy, { name: 'dense/kernel', tensor: tf.zeros([2]) }], TypeError, /unexpected weight 'dense\/kernel'/],
    ['another variant', [copy[0], { name: 'psgd_state/0', tensor: xmatState.tensor }], RangeError, /holds a 'xmat' state, this is KronOptimizer/],
    ['a bad count', [{ name: 'iter', tensor: tf.scalar(-1, 'int32') }, copy[1]], RangeError, /'iter' must be a step count/],
    ['a float state', [copy[0], { name: 'psgd_state/0', tensor: tf.zeros([4]) }], TypeError, /must be int32/],
    ['no state', [copy[0], { name: 'psgd_state/0', tensor: tf.zeros([4], 'int32') }], RangeError, /is not a PSGD state/],
    ['a variable twice', [copy[0], copy[1], { name: 'psgd_state/1', tensor: copy[1].tensor }], RangeError, /in two saved states/],
  ]
  for (const [what, list, type, message] of cases) {
    await t.throwsAsync(() => opt.setWeights(list), { instanceOf: type, message }, what)
    t.is(opt.iterations, 3, what)
    t.deepEqual(states(opt), before, what)
  }
  // the whole list restores exactly: the next step is the one the optimizer would take
  const restored = new KronOptimizer(options)
  await restored.setWeights(copy)
  const [a2, b2] = [variable(fresh('swa'), [4, 3], 0), variable(fresh('swb'), [3], 0)]
  a2.assign(a)
  b2.assign(b)
  step(opt, [a, b], 3)
  step(restored, [a2, b2], 3)
  t.deepEqual([bits(a2), bits(b2)], [bits(a), bits(b)])
  for (const o of [opt, xmat, restored]) o.dispose()
  tf.dispose([a, b, a2, b2, ...copy.map((w) => w.tensor)])
})

test.serial('getWeights and model.save in a loop keep tfjs memory flat; the handed-out weights are freed at the next call', async (t) => {
  const { x, y } = data()
  for (const Ctor of Object.values(classes) as Ctor[]) {
    const m = stack([fresh('mem1'), fresh('mem2')], 3, new Ctor(options))
    await fit(m, x, y, 1)
    const first = await m.optimizer.getWeights()
    await saveWithOptimizer(m)
    const base = tf.memory()
    const native = liveTensorBytes()
    for (let i = 0; i < 20; i++) {
      await m.optimizer.getWeights()
      await saveWithOptimizer(m)
    }
    t.true(
      first.every((w) => w.tensor.isDisposed),
      `${Ctor.name}: earlier weights freed`,
    )
    t.is(tf.memory().numTensors, base.numTensors, `${Ctor.name}: tensors`)
    t.is(tf.memory().numBytes, base.numBytes, `${Ctor.name}: bytes`)
    t.is(liveTensorBytes(), native, `${Ctor.name}: native tensor bytes`)
    const tensors = base.numTensors
    freeModels(m)
    t.true(tf.memory().numTensors < tensors)
  }
  tf.dispose([x, y])
})

for (const [name, Ctor] of Object.entries(classes)) {
  test.serial(
    `${name}: a refused step makes no state, and a step after a restore on some of a saved state's variables takes it by name; both continue bit-for-bit`,
    async (t) => {
      const [a, b, c] = trio('r')
      const [a2, b2, c2] = trio('r2')
      const opt = new Ctor(options)
      const twin = new Ctor(options)
      // a refused first step on {b, c}: no state is made for it
      t.throws(() => refusedStep(opt, [null, b, c], [a, b, c]), { instanceOf: RangeError })
      t.deepEqual(states(opt), [])
      for (let k = 0; k < 3; k++) {
        step(opt, [a, b, c], k)
        step(twin, [a2, b2, c2], k)
      }
      const saved = await opt.getWeights()
      const restored = new Ctor(options) as unknown as Opt
      await restored.setWeights(saved)
      opt.dispose()
      // c frozen right after the restore: a and b take their restored state (by name), c's waits
      step(restored, [a, b, null], 3, [a, b, c])
      step(twin, [a2, b2, null], 3, [a2, b2, c2])
      t.deepEqual(
        states(restored).map((s) => [s.names, s.count]),
        [
          [[a.name, b.name], 4],
          [[c.name], 3],
        ],
      )
      step(restored, [a, b, c], 4)
      step(twin, [a2, b2, c2], 4)
      for (const [x, y] of [
        [a, a2],
        [b, b2],
        [c, c2],
      ]) {
        t.deepEqual(bits(x), bits(y))
      }
      restored.dispose()
      twin.dispose()
      tf.dispose([a, b, c, a2, b2, c2])
    },
  )
}
