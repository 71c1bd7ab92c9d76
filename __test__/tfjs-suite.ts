/**
 * The TensorFlow.js adapter's tests, run once per backend (`tfjs-cpu.spec.ts`,
 * `tfjs-wasm.spec.ts`: ava gives each file its own process, and a tfjs backend is global
 * to a process). Tiny models only: these check the glue, not PSGD.
 */
import * as tf from '@tensorflow/tfjs-core'
import * as tfl from '@tensorflow/tfjs-layers'
import type { TestFn } from 'ava'
import { liveTensorBytes } from '../index'
import { AffineOptimizer, KronOptimizer, LRAOptimizer, psgdStatsCallback, statsSummary, XMatOptimizer } from '../tfjs'
import { values } from './helpers'
import { saveAndLoad } from './tfjs-contracts'

const classes = { KronOptimizer, XMatOptimizer, LRAOptimizer, AffineOptimizer } as const

/** A fresh variable of deterministic values (names are unique per process, so prefixed by the caller). */
function variable(name: string, shape: number[], seed: number): tf.Variable {
  const n = shape.reduce((a, b) => a * b, 1)
  return tf.variable(tf.tensor(Float32Array.from(values(n, seed)), shape), true, name)
}

/** Deterministic gradients for `vars`, keyed by name (a stand-in for a loss's gradients at step `k`). */
function gradsFor(vars: tf.Variable[], k: number): tf.NamedTensorMap {
  return Object.fromEntries(vars.map((v, i) => [v.name, tf.tensor(Float32Array.from(values(v.size, 1000 * k + i + 1)), v.shape)]))
}

/**
 * A 4-8-1 tanh MLP compiled with `optimizer` (mean squared error) and 64 samples of a
 * linear target; the kernels are drawn from `seed` and `seed + 1`, the inputs from `seed + 4`.
 */
function tinyRegression(optimizer: tf.Optimizer, seed: number): { model: tfl.Sequential; x: tf.Tensor2D; y: tf.Tensor2D } {
  const model = tfl.sequential()
  model.add(tfl.layers.dense({ units: 8, activation: 'tanh', inputShape: [4], kernelInitializer: tfl.initializers.glorotUniform({ seed }) }))
  model.add(tfl.layers.dense({ units: 1, kernelInitializer: tfl.initializers.glorotUniform({ seed: seed + 1 }) }))
  model.compile({ optimizer, loss: 'meanSquaredError' })
  const x = tf.tensor2d(Float32Array.from(values(64 * 4, seed + 4)), [64, 4])
  const y = tf.tidy(() => tf.sum(tf.mul(x, tf.tensor([0.5, -1, 2, 0.25])), 1, true) as tf.Tensor2D)
  return { model, x, y }
}

const bits = (v: tf.Tensor) => Array.from(new Uint32Array((v.dataSync() as Float32Array).slice().buffer))

export function tfjsSuite(test: TestFn, backend: string): void {
  let uid = 0
  const fresh = (prefix: string) => `${backend}_${prefix}_${uid++}`

  test.serial(`${backend}: the backend is active`, (t) => {
    t.is(tf.getBackend(), backend)
  })

  for (const [name, Ctor] of Object.entries(classes)) {
    test.serial(`${backend}: ${name}.minimize lowers a quadratic loss`, (t) => {
      const w = variable(fresh('q'), [4, 3], 1)
      const target = tf.tensor(Float32Array.from(values(12, 2)), [4, 3])
      const opt = new Ctor({ learningRate: 0.05, preconditionerUpdateProbability: 1, seed: 3 })
      const loss = () => tf.sum(tf.square(tf.sub(w, target))) as tf.Scalar
      const first = tf.tidy(() => loss().dataSync()[0])
      for (let i = 0; i < 30; i++) opt.minimize(loss)
      const last = tf.tidy(() => loss().dataSync()[0])
      t.true(last < first / 4, `loss ${first} → ${last}`)
      t.is(opt.iterations, 30)
      // dispose frees the native states at once, and the optimizer refuses further use
      const states = [
        ...(opt as unknown as { book: { groups: Map<string, { state: { disposed: boolean; handle: { disposed: boolean } } }> } }).book.groups.values(),
      ].map((g) => g.state)
      opt.dispose()
      t.true(states.length > 0 && states.every((s) => s.disposed && s.handle.disposed))
      t.throws(() => opt.minimize(loss), { instanceOf: TypeError, message: /disposed/ })
      tf.dispose([w, target])
    })
  }

  test.serial(`${backend}: model.compile + model.fit trains a small MLP with KronOptimizer`, async (t) => {
    const { model, x, y } = tinyRegression(new KronOptimizer({ learningRate: 0.01, seed: 1 }), 1)
    const h = await model.fit(x, y, { epochs: 15, batchSize: 16, shuffle: false, verbose: 0 })
    const losses = h.history.loss as number[]
    t.true(losses[losses.length - 1] < losses[0] / 2, `loss ${losses[0]} → ${losses[losses.length - 1]}`)
    model.optimizer.dispose()
    model.dispose()
    tf.dispose([x, y])
  })

  test.serial(`${backend}: model.fitDataset trains with AffineOptimizer, and its batches leave no tensor behind`, async (t) => {
    const { model, x, y } = tinyRegression(new AffineOptimizer({ learningRate: 0.01, seed: 1 }), 3)
    // What tfjs-layers reads of a tf.data.Dataset: `iterator()` and its `next()`, one
    // `{xs, ys}` batch per call (fitDataset disposes each batch after its step); a
    // stand-in keeps tfjs-data out of the dev dependencies.
    const batches = 4
    const dataset = {
      size: batches,
      iterator: async () => {
        let i = 0
        return {
          next: async () =>
            i < batches
              ? { done: false, value: { xs: tf.slice(x, [16 * i, 0], [16, 4]), ys: tf.slice(y, [16 * i++, 0], [16, 1]) } }
              : { done: true, value: null },
        }
      },
    }
    const before = tf.memory().numTensors
    const h = await model.fitDataset(dataset as never, { epochs: 15, verbose: 0 })
    const losses = h.history.loss as number[]
    t.is(losses.length, 15)
    t.true(losses[losses.length - 1] < losses[0] / 2, `loss ${losses[0]} → ${losses[losses.length - 1]}`)
    t.is((model.optimizer as AffineOptimizer).iterations, 15 * batches)
    // the optimizer's own variables (none: its state is native) and the batches are gone
    t.is(tf.memory().numTensors, before)
    model.optimizer.dispose()
    model.dispose()
    tf.dispose([x, y])
  })

  test.serial(`${backend}: the map and list forms of applyGradients, in any order, give the same step`, (t) => {
    const a = [variable(fresh('a'), [5, 4], 1), variable(fresh('b'), [4], 2)]
    const b = [variable(fresh('a'), [5, 4], 1), variable(fresh('b'), [4], 2)]
    const optA = new KronOptimizer({ learningRate: 0.1, seed: 7 })
    const optB = new KronOptimizer({ learningRate: 0.1, seed: 7 })
    for (let k = 0; k < 5; k++) {
      const ga = gradsFor(a, k)
      const gb = gradsFor(b, k)
      optA.applyGradients(ga)
      // the list form, in reverse order: the leaves are in creation order either way
      optB.applyGradients(b.map((v) => ({ name: v.name, tensor: gb[v.name] })).reverse())
      tf.dispose([ga, gb])
    }
    a.forEach((v, i) => t.deepEqual(bits(v), bits(b[i])))
    t.notDeepEqual(bits(a[0]), bits(variable(fresh('c'), [5, 4], 1)), 'the steps changed the variable')
    optA.dispose()
    optB.dispose()
  })

  for (const [name, Ctor] of Object.entries(classes)) {
    test.serial(`${backend}: ${name} getWeights/setWeights continues bit-for-bit like an uninterrupted run`, async (t) => {
      // stochastic preconditioner updates: the saved state must carry the random stream too
      const options = { learningRate: 0.05, preconditionerUpdateProbability: 0.5, seed: 11 }
      const whole = [variable(fresh('w'), [6, 3], 1), variable(fresh('v'), [3], 2)]
      const split = [variable(fresh('w'), [6, 3], 1), variable(fresh('v'), [3], 2)]
      const run = (opt: tf.Optimizer, vars: tf.Variable[], from: number, to: number) => {
        for (let k = from; k < to; k++) {
          const g = gradsFor(vars, k)
          opt.applyGradients(g)
          tf.dispose(g)
        }
      }
      const uninterrupted = new Ctor(options)
      run(uninterrupted, whole, 0, 10)

      const first = new Ctor(options)
      run(first, split, 0, 4)
      const saved = await first.getWeights()
      t.deepEqual(
        saved.map((w) => w.name),
        ['iter', 'psgd_state/0'],
      )
      const second = new Ctor(options)
      await second.setWeights(saved)
      // the weights are the optimizer's (as tfjs's optimizers' own): its dispose frees them
      first.dispose()
      t.true(saved.every((w) => w.tensor.isDisposed))
      t.is(second.iterations, 4)
      run(second, split, 4, 10)
      whole.forEach((v, i) => t.deepEqual(bits(v), bits(split[i])))
      uninterrupted.dispose()
      second.dispose()
    })
  }

  test.serial(`${backend}: a restored state that does not fit the variables is a RangeError at their first step, and stays pending`, async (t) => {
    const small = variable(fresh('s'), [3], 1)
    const big = variable(fresh('s'), [4], 1)
    const first = new KronOptimizer({ seed: 1 })
    first.applyGradients({ [small.name]: tf.ones([3]) })
    const saved = await first.getWeights()
    const second = new KronOptimizer({ seed: 1 })
    await second.setWeights(saved)
    const before = bits(big)
    t.throws(() => second.applyGradients({ [big.name]: tf.ones([4]) }), {
      instanceOf: RangeError,
      message: new RegExp(`${small.name}.*does not fit.*${big.name}`),
    })
    t.deepEqual(bits(big), before)
    // the saved state is still there for the variable it was saved for
    second.applyGradients({ [small.name]: tf.ones([3]) })
    t.is(second.iterations, 2)
    tf.dispose(saved.map((w) => w.tensor))
  })

  test.serial(`${backend}: a model saved with its optimizer loads (registered class) and continues bit-for-bit`, async (t) => {
    const build = () => {
      const m = tfl.sequential()
      m.add(tfl.layers.dense({ units: 3, inputShape: [2], kernelInitializer: tfl.initializers.glorotUniform({ seed: 4 }) }))
      m.compile({ optimizer: new AffineOptimizer({ learningRate: 0.02, seed: 5 }), loss: 'meanSquaredError' })
      return m
    }
    const x = tf.tensor(Float32Array.from(values(8 * 2, 6)), [8, 2])
    const y = tf.tensor(Float32Array.from(values(8 * 3, 7)), [8, 3])
    const fit = (m: tfl.LayersModel) => m.fit(x, y, { epochs: 3, batchSize: 4, shuffle: false, verbose: 0 })
    const whole = build()
    await fit(whole)
    await fit(whole)

    const part = build()
    await fit(part)
    const loaded = await saveAndLoad(part)
    t.true(loaded.optimizer instanceof AffineOptimizer)
    t.deepEqual((loaded.optimizer as AffineOptimizer).getConfig(), { learningRate: 0.02, seed: 5 })
    await fit(loaded)
    whole.getWeights().forEach((w, i) => t.deepEqual(bits(w), bits(loaded.getWeights()[i])))
    for (const m of [whole, part, loaded]) {
      m.optimizer.dispose()
      m.dispose()
    }
    tf.dispose([x, y])
  })

  test.serial(`${backend}: getConfig/fromConfig round-trip, and the classes are registered with tf.serialization`, (t) => {
    const opt = new LRAOptimizer({ learningRate: 0.003, uvdRankOfApproximation: 4, weightDecay: 0.1 })
    const again = LRAOptimizer.fromConfig(LRAOptimizer, opt.getConfig()) as LRAOptimizer
    t.true(again instanceof LRAOptimizer)
    t.deepEqual(again.getConfig(), opt.getConfig())
    const map = tf.serialization.SerializationMap.getMap().classNameMap
    for (const cls of Object.values(classes)) t.is(map[cls.className][0], cls)
    const scheduled = new KronOptimizer({ learningRate: (step: number) => 0.01 / (1 + step) })
    t.throws(() => scheduled.getConfig(), { instanceOf: TypeError, message: /learningRate/ })
  })

  test.serial(`${backend}: bad options are TypeError/RangeError naming the option, at construction`, (t) => {
    t.throws(() => new KronOptimizer({ learningRat: 0.1 } as never), { instanceOf: TypeError, message: /learningRat/ })
    t.throws(() => new XMatOptimizer({ learningRate: -1 }), { instanceOf: RangeError, message: /learningRate/ })
    // 0 is allowed (a frozen phase), a negative rate is not (it would ascend)
    t.notThrows(() => new XMatOptimizer({ learningRate: 0 }).dispose())
    t.throws(() => new AffineOptimizer({ b1: 'x' } as never), { instanceOf: TypeError, message: /b1/ })
  })

  test.serial(`${backend}: bad gradients are TypeError/RangeError naming the variable, and change nothing`, (t) => {
    const w = variable(fresh('bad'), [3, 2], 1)
    const before = bits(w)
    const opt = new KronOptimizer()
    t.throws(() => opt.applyGradients({ [w.name]: tf.zeros([2, 3]) }), { instanceOf: RangeError, message: new RegExp(w.name) })
    t.throws(() => opt.applyGradients({ no_such_variable: tf.zeros([2]) }), { instanceOf: TypeError, message: /no_such_variable/ })
    // found by the native core, which knows the leaf by its index: the error names the variable
    t.throws(() => opt.applyGradients({ [w.name]: tf.fill([3, 2], NaN) }), { instanceOf: RangeError, message: new RegExp(`'${w.name}'.*NaN`) })
    t.deepEqual(bits(w), before)
    t.is(opt.iterations, 0)
  })

  test.serial(`${backend}: dispose frees the state; the optimizer then refuses to step`, async (t) => {
    const w = variable(fresh('d'), [3], 1)
    const opt = new XMatOptimizer()
    opt.applyGradients({ [w.name]: tf.ones([3]) })
    opt.dispose()
    t.throws(() => opt.applyGradients({ [w.name]: tf.ones([3]) }), { instanceOf: TypeError, message: /disposed/ })
    await t.throwsAsync(() => opt.getWeights(), { instanceOf: TypeError, message: /disposed/ })
  })

  test.serial(`${backend}: a variable appearing later joins the state of the others; null gradients are skipped`, async (t) => {
    const a = variable(fresh('early'), [4], 1)
    const b = variable(fresh('late'), [2, 2], 2)
    const opt = new KronOptimizer({ learningRate: 0.1 })
    opt.applyGradients({ [a.name]: tf.ones([4]) })
    const bBefore = bits(b)
    opt.applyGradients([
      { name: a.name, tensor: tf.ones([4]) },
      { name: b.name, tensor: null as unknown as tf.Tensor },
    ])
    t.deepEqual(bits(b), bBefore, 'a null gradient leaves its variable alone')
    opt.applyGradients({ [a.name]: tf.ones([4]), [b.name]: tf.ones([2, 2]) })
    t.notDeepEqual(bits(b), bBefore)
    const weights = await opt.getWeights()
    // one state, for both variables, at the optimizer's count
    t.deepEqual(
      weights.map((w) => w.name),
      ['iter', 'psgd_state/0'],
    )
    t.is(opt.iterations, 3)
    const groups = [...(opt as unknown as { book: { groups: Map<string, { names: string[]; state: { count: number } }> } }).book.groups.values()]
    t.deepEqual(
      groups.map((g) => [g.names, g.state.count]),
      [[[a.name, b.name], 3]],
    )
    opt.dispose()
  })

  test.serial(`${backend}: a loop of steps leaves no native tensor and no tfjs tensor behind`, (t) => {
    const vars = [variable(fresh('m'), [8, 4], 1), variable(fresh('n'), [4], 2)]
    const grads = gradsFor(vars, 0)
    for (const Ctor of Object.values(classes)) {
      const opt = new Ctor({ learningRate: 0.01, weightDecay: 0.1 })
      opt.applyGradients(grads)
      const native = liveTensorBytes()
      const tensors = tf.memory().numTensors
      for (let i = 0; i < 10; i++) opt.applyGradients(grads)
      t.is(liveTensorBytes(), native, `${Ctor.name}: native bytes`)
      t.is(tf.memory().numTensors, tensors, `${Ctor.name}: tfjs tensors`)
      opt.dispose()
    }
  })

  test.serial(`${backend}: stats() reports per variable name; the update's RMS is the variable's change`, (t) => {
    const vars = [variable(fresh('sa'), [6, 4], 1), variable(fresh('sb'), [4], 2)]
    for (const Ctor of Object.values(classes)) {
      const opt = new Ctor({ learningRate: 0.01, preconditionerUpdateProbability: 1 })
      t.like(opt.stats(), { count: 0, fitted: false, leaves: [], factors: [], clip: null, times: null })
      opt.applyGradients(gradsFor(vars, 1))
      const before = vars.map((v) => Float32Array.from(v.dataSync() as Float32Array))
      opt.applyGradients(gradsFor(vars, 2))
      const s = opt.stats()
      t.like(s, { count: 2, fitted: true, fits: 2 }, Ctor.name)
      t.deepEqual(
        s.leaves.map((l) => l.path),
        vars.map((v) => v.name),
      )
      vars.forEach((v, i) => {
        const after = v.dataSync() as Float32Array
        const want = Math.sqrt(after.reduce((a, x, j) => a + (x - before[i][j]) ** 2, 0) / after.length)
        const got = s.leaves[i].updateRms as number
        t.true(Math.abs(got - want) <= 1e-3 * want, `${Ctor.name} ${v.name}: ${got} vs ${want}`)
      })
      t.true(s.whitening !== null && s.maxCondition >= 1 && s.times !== null)
      t.deepEqual(opt.stats(), s)
      opt.dispose()
      t.throws(() => opt.stats(), { instanceOf: TypeError, message: /disposed/ })
    }
  })

  test.serial(`${backend}: psgdStatsCallback adds the PSGD summaries to model.fit's batch and epoch logs`, async (t) => {
    const opt = new KronOptimizer({ learningRate: 0.01, seed: 1, preconditionerUpdateProbability: 0.5 })
    const { model, x, y } = tinyRegression(opt, 11)
    const batches: Record<string, unknown>[] = []
    const h = await model.fit(x, y, {
      epochs: 2,
      batchSize: 16,
      shuffle: false,
      verbose: 0,
      callbacks: [psgdStatsCallback(opt, { every: 2 }), { onBatchEnd: (_b: number, logs?: Record<string, unknown>) => void batches.push({ ...logs }) }],
    })
    // 4 batches per epoch: every second one carries the summaries
    t.is(batches.length, 8)
    t.deepEqual(
      batches.map((b) => 'psgd_fitted' in b),
      [false, true, false, true, false, true, false, true],
    )
    const keys = ['psgd_fitted', 'psgd_pre_rms', 'psgd_update_rms', 'psgd_clipped', 'psgd_whitening', 'psgd_max_condition', 'psgd_fit_ms', 'psgd_step_ms']
    for (const k of keys) {
      const v = h.history[k] as number[]
      t.is(v.length, 2, k)
      t.true(
        v.every((n) => Number.isFinite(n)),
        `${k}: ${v}`,
      )
    }
    // the counter fits every second step: the epoch ends (steps 4 and 8) fitted
    t.deepEqual(h.history.psgd_fitted, [1, 1])
    t.deepEqual(statsSummary(opt.stats()).psgd_update_rms, (h.history.psgd_update_rms as number[])[1])
    t.throws(() => psgdStatsCallback(opt, { every: 0 }), { instanceOf: RangeError, message: /every/ })
    model.optimizer.dispose()
    model.dispose()
    tf.dispose([x, y])
  })
}
