/**
 * Model-based probes of the TensorFlow.js optimizers (fast-check, seeded): random sequences
 * of what a training program does to an optimizer — steps on changing subsets of its
 * variables (null gradients), in either form tfjs passes them; learning-rate changes;
 * saving and restoring through getWeights/getConfig into a new optimizer; steps refused
 * for a NaN gradient; reading getWeights — are replayed against a twin run that does only
 * the successful steps and the rate changes, on one optimizer that is never saved. The
 * variables must end bit-for-bit equal (a restore continues exactly, a refused step
 * changes nothing), `iterations` must count the successful steps, `learningRate` must read
 * what was set, and no tfjs tensor may be left behind.
 */
import '@tensorflow/tfjs-backend-cpu'
import * as tf from '@tensorflow/tfjs-core'
import test from 'ava'
import fc from 'fast-check'
import { AffineOptimizer, KronOptimizer, LRAOptimizer, XMatOptimizer, type PsgdTfjsOptimizer } from '../tfjs'
import { values } from './helpers'

/** Sequences per variant. */
const RUNS = 60
const SEED = 29

const classes = { KronOptimizer, XMatOptimizer, LRAOptimizer, AffineOptimizer } as const
type ClassName = keyof typeof classes
type Opt = PsgdTfjsOptimizer<object>

const SHAPES = [[3, 4], [4], [2, 3, 2], [5, 2]]

type Op =
  | { kind: 'step'; use: boolean[]; list: boolean }
  | { kind: 'rate'; lr: number }
  | { kind: 'restore' }
  | { kind: 'refused'; use: boolean[]; bad: number }
  | { kind: 'getWeights' }

const subset = fc.array(fc.boolean(), { minLength: SHAPES.length, maxLength: SHAPES.length })
const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('step' as const), use: subset, list: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('rate' as const), lr: fc.constantFrom(0, 1e-3, 3e-3, 0.01, 0.05) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('restore' as const) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('refused' as const), use: subset, bad: fc.nat(SHAPES.length - 1) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('getWeights' as const) }) },
)

let run = 0

/** Fresh variables of deterministic values, named uniquely in this process. */
function makeVariables(tag: string): tf.Variable[] {
  const id = run++
  return SHAPES.map((shape, i) => {
    const n = shape.reduce((a, b) => a * b, 1)
    // in a tidy: the initial tensor is the variable's own copy's source, freed here
    return tf.tidy(() => tf.variable(tf.tensor(Float32Array.from(values(n, 7 + i)), shape), true, `probe${id}_${tag}/w${i}`))
  })
}

/** The gradients of successful step `k` for the variables `use` selects (NaN in `bad`). */
function grads(vars: tf.Variable[], use: boolean[], k: number, bad = -1): [string, tf.Tensor][] {
  return vars.flatMap((v, i) => {
    if (!use[i] && i !== bad) return []
    const data = Float32Array.from(values(v.size, 1000 * k + i + 1))
    if (i === bad) data[0] = NaN
    return [[v.name, tf.tensor(data, v.shape)] as [string, tf.Tensor]]
  })
}

function apply(opt: Opt, pairs: [string, tf.Tensor][], list: boolean): void {
  try {
    opt.applyGradients(list ? pairs.map(([name, tensor]) => ({ name, tensor })) : Object.fromEntries(pairs))
  } finally {
    tf.dispose(pairs.map(([, t]) => t))
  }
}

const bits = (v: tf.Tensor) => Array.from(new Uint32Array((v.dataSync() as Float32Array).slice().buffer))

/** Plays `ops` on an optimizer and its twin: null when every check holds, else what failed. */
async function play(name: ClassName, ops: Op[]): Promise<string | null> {
  const Cls = classes[name]
  const make = () => new Cls({ learningRate: 0.01, seed: 3 }) as unknown as Opt
  const vars = makeVariables('a')
  const twinVars = makeVariables('b')
  let opt = make()
  const twin = make()
  let steps = 0
  let lr = 0.01
  const fail = (why: string) => `${name}: ${why} after ${JSON.stringify(ops)}`
  try {
    for (const o of ops) {
      if (o.kind === 'step') {
        if (!o.use.some(Boolean)) continue
        apply(opt, grads(vars, o.use, steps), o.list)
        apply(twin, grads(twinVars, o.use, steps), !o.list)
        steps++
      } else if (o.kind === 'rate') {
        opt.learningRate = o.lr
        twin.learningRate = o.lr
        lr = o.lr
      } else if (o.kind === 'restore') {
        const config = opt.getConfig()
        const saved = await opt.getWeights()
        const next = (Cls as unknown as { fromConfig: (c: unknown, d: unknown) => Opt }).fromConfig(Cls, config)
        await next.setWeights(saved)
        opt.dispose()
        opt = next
      } else if (o.kind === 'refused') {
        const snapshot = vars.map(bits)
        const iterations = opt.iterations
        try {
          apply(opt, grads(vars, o.use, steps, o.bad), false)
          return fail('a NaN gradient was accepted')
        } catch (e) {
          if (!(e instanceof RangeError || e instanceof TypeError)) return fail(`a NaN gradient threw ${String(e)}`)
        }
        if (opt.iterations !== iterations) return fail('a refused step counted')
        if (vars.some((v, i) => bits(v).join() !== snapshot[i].join())) return fail('a refused step wrote a variable')
      } else {
        await opt.getWeights()
      }
      if (opt.iterations !== steps) return fail(`iterations ${opt.iterations}, expected ${steps}`)
      if (opt.learningRate !== lr) return fail(`learningRate reads ${opt.learningRate}, expected ${lr}`)
    }
    for (let i = 0; i < vars.length; i++) {
      if (bits(vars[i]).join() !== bits(twinVars[i]).join()) return fail(`variable ${i} differs from the twin run's`)
    }
    return null
  } finally {
    opt.dispose()
    twin.dispose()
    tf.dispose([...vars, ...twinVars])
  }
}

/** {@link play}'s verdict, or that it left tfjs tensors behind. */
async function probe(name: ClassName, ops: Op[]): Promise<string | null> {
  const before = tf.memory().numTensors
  const why = await play(name, ops)
  const left = tf.memory().numTensors - before
  return why ?? (left === 0 ? null : `${name}: ${left} tfjs tensors left behind after ${JSON.stringify(ops)}`)
}

test.before(async () => {
  await tf.setBackend('cpu')
})

for (const name of Object.keys(classes) as ClassName[]) {
  test.serial(`${name}: random step/rate/restore/refused sequences continue bit-for-bit like an uninterrupted twin and leave no tensor`, async (t) => {
    await t.notThrowsAsync(
      fc.assert(
        fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 20 }), async (ops) => {
          const why = await probe(name, ops)
          if (why !== null) throw new Error(why)
        }),
        { numRuns: RUNS, seed: SEED },
      ),
    )
  })
}
