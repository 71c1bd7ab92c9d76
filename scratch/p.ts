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
import { AffineOptimizer, KronOptimizer, LRAOptimizer, XMatOptimizer, type PsgdTfjsOptimizer } from '../tfjs'
import { values } from '../__test__/helpers'

/** Sequences per variant. */
const RUNS = 25
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

const subset0 = 0 as any; //(fc.boolean(), { minLength: SHAPES.length, maxLength: SHAPES.length })

let run = 0

/** Fresh variables of deterministic values, named uniquely in this process. */
function makeVariables(tag: string): tf.Variable[] {
  const id = run++
  return SHAPES.map((shape, i) => {
    const n = shape.reduce((a, b) => a * b, 1)
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

async function probe(name: ClassName, ops: Op[]): Promise<string | null> {
  const Cls = classes[name]
  const before = tf.memory().numTensors
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
    const after = tf.memory().numTensors
    if (after !== before) throw new Error(`${name}: ${after - before} tfjs tensors left behind after ${JSON.stringify(ops)}`)
  }
}


;(async () => {
  await tf.setBackend('cpu')
  for (const n of ['KronOptimizer','XMatOptimizer','LRAOptimizer','AffineOptimizer'] as const) {
    console.log(await probe(n, [{"kind":"refused","use":[false,false,true,false],"bad":1},{"kind":"restore"},{"kind":"step","use":[false,true,false,false],"list":false},{"kind":"step","use":[false,true,true,false],"list":false}] as any))
    console.log(await probe(n, [{"kind":"step","use":[false,true,false,false],"list":false},{"kind":"step","use":[false,true,true,false],"list":false}] as any))
    console.log(await probe(n, [{"kind":"restore"},{"kind":"step","use":[false,true,false,false],"list":false},{"kind":"step","use":[false,true,true,false],"list":false}] as any))
  }
})()
