/**
 * `npm run bench:tfjs`: wall time per training step in TensorFlow.js, PSGD Kron against
 * tfjs's Adam, as a user trains: `model.trainOnBatch` (forward, backward, the optimizer's
 * step and the loss read back) on a `tfjs-layers` model, on the `cpu` and `wasm` backends.
 *
 * Models: `mlp`, the examples' MNIST MLP (784-128-10, ReLU then softmax, 102 k
 * parameters), and `wide`, a wider and deeper MLP on the same input (784-512-256-10,
 * 535 k parameters); batch 64. The data are random, of MNIST's shape (timing only). (A
 * CNN is left out: tfjs 4.22's `wasm` backend has no `Conv2DBackpropFilter` kernel, and
 * its `cpu` backend takes seconds per step for a small one.)
 *
 * Rows: tfjs Adam; Kron (default options: the default `precondUpdateProbSchedule` fits
 * the preconditioner at every one of the first 500 steps, which is every step timed
 * here); Kron with `updatePreconditionerFirst: false` (the fit after the update);
 * Kron with `overlapFit: true` (the fit on a native worker while the next gradient is
 * computed); and Kron at the schedule's floor
 * (`preconditionerUpdateProbability: 0.03`, a fit every 33 steps, what a long run costs
 * once the schedule has annealed), without and with `overlapFit`.
 *
 * Every row of a model is built from the same seeded weights, warmed up, and then timed
 * in rounds that take each row in turn (so load on a shared machine falls on every row
 * alike; in a round, a row takes one untimed step, then its timed steps, then waits
 * untimed for any fit still running); a row's figure is the median over the rounds of its
 * ms per step. Printed per row:
 * ms/step, the ratio to Adam's ms/step in this run, and the breakdown: `applyGradients`
 * (the optimizer's whole step), the native PSGD step inside it (the calls into the
 * binding's optimizer: the Rust step and the N-API call that carries its tensors), the
 * glue (their difference: reading the gradients, the TypeScript layer's checks and copies
 * to and from native memory, writing the variables), and the rest of the step (forward,
 * backward, the loss read; the step less `applyGradients`).
 *
 * Then, per model, the native Kron step alone on plain leaves of the model's weight
 * shapes (no tfjs): a step that fits first and applies with the factors (the default
 * order), one that applies with the grams `QᵀQ` and then fits and forms the grams again
 * (`updatePreconditionerFirst: false`), and one that only applies (probability 0); the
 * fit's cost is about the first less the last.
 *
 * Flags: `--quick` (few rounds and steps: a smoke run), `--backend cpu|wasm`,
 * `--model mlp|wide`, `--rounds N`, `--json FILE` (every figure). Measured and printed,
 * never asserted.
 */
import '@tensorflow/tfjs-backend-cpu'
import '@tensorflow/tfjs-core/dist/register_all_gradients'
import { setWasmPaths } from '@tensorflow/tfjs-backend-wasm'
import * as tf from '@tensorflow/tfjs-core'
import * as tfl from '@tensorflow/tfjs-layers'
import { writeFileSync } from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { KronOptimizer } from '../tfjs'
import { kron, type KronOptions } from '../index'
import { native } from '../src/native'

const BACKENDS = ['cpu', 'wasm'] as const
const MODELS = ['mlp', 'wide'] as const
type Backend = (typeof BACKENDS)[number]
type ModelName = (typeof MODELS)[number]
const BATCH = 64

interface Flags {
  quick: boolean
  backends: Backend[]
  models: ModelName[]
  rounds: number | null
  json: string | null
}

function parseArgs(argv: readonly string[]): Flags {
  const f: Flags = { quick: false, backends: [...BACKENDS], models: [...MODELS], rounds: null, json: null }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const value = (): string => {
      const v = argv[++i]
      if (v === undefined) throw new Error(`bench:tfjs: ${a} needs a value`)
      return v
    }
    if (a === '--quick') f.quick = true
    else if (a === '--backend') f.backends = [oneOf(value(), BACKENDS, a)]
    else if (a === '--model') f.models = [oneOf(value(), MODELS, a)]
    else if (a === '--rounds') f.rounds = Math.max(1, Number.parseInt(value(), 10) || 1)
    else if (a === '--json') f.json = value()
    else throw new Error(`bench:tfjs: unknown flag ${a} (known: --quick, --backend cpu|wasm, --model mlp|wide, --rounds N, --json FILE)`)
  }
  return f
}

function oneOf<T extends string>(v: string, allowed: readonly T[], flag: string): T {
  if (!(allowed as readonly string[]).includes(v)) throw new Error(`bench:tfjs: ${flag} must be one of ${allowed.join(', ')}, got ${v}`)
  return v as T
}

/** The rows: a label and the optimizer (null options: tfjs Adam). */
const ROWS: { label: string; kron: KronOptions | null }[] = [
  { label: 'tfjs Adam', kron: null },
  { label: 'Kron (default)', kron: {} },
  { label: 'Kron, updatePreconditionerFirst: false', kron: { updatePreconditionerFirst: false } },
  { label: 'Kron, overlapFit: true', kron: { overlapFit: true } },
  { label: 'Kron, preconditionerUpdateProbability: 0.03', kron: { preconditionerUpdateProbability: 0.03 } },
  { label: 'Kron, overlapFit: true, preconditionerUpdateProbability: 0.03', kron: { overlapFit: true, preconditionerUpdateProbability: 0.03 } },
]

function makeModel(name: ModelName): tfl.Sequential {
  const model = tfl.sequential()
  const init = (seed: number) => tfl.initializers.glorotUniform({ seed })
  if (name === 'mlp') {
    model.add(tfl.layers.dense({ units: 128, activation: 'relu', inputShape: [784], kernelInitializer: init(1) }))
    model.add(tfl.layers.dense({ units: 10, activation: 'softmax', kernelInitializer: init(2) }))
    return model
  }
  model.add(tfl.layers.dense({ units: 512, activation: 'relu', inputShape: [784], kernelInitializer: init(1) }))
  model.add(tfl.layers.dense({ units: 256, activation: 'relu', kernelInitializer: init(2) }))
  model.add(tfl.layers.dense({ units: 10, activation: 'softmax', kernelInitializer: init(3) }))
  return model
}

/** A PSGD optimizer's own timers: its whole `applyGradients` and the native step inside it. */
interface Probe {
  apply: number
  native: number
}

/** The probe of the `applyGradients` running now (native calls are added to it). */
let active: Probe | null = null

/**
 * Times every call into the binding's optimizer (the native step: the Rust step and the
 * N-API call that carries its tensors) into the running `applyGradients`'s probe, whatever
 * method a step calls.
 */
function timeNativeCalls(): void {
  const proto = native.NativeOptimizer.prototype as unknown as Record<string, unknown>
  for (const name of Object.getOwnPropertyNames(proto)) {
    const f = proto[name]
    if (name === 'constructor' || typeof f !== 'function') continue
    proto[name] = function (this: unknown, ...a: unknown[]) {
      const t0 = performance.now()
      try {
        return (f as (...b: unknown[]) => unknown).apply(this, a)
      } finally {
        if (active !== null) active.native += performance.now() - t0
      }
    }
  }
}

/** Times `opt.applyGradients` into `probe`, and the native calls made inside it. */
function instrument(opt: tf.Optimizer, probe: Probe): void {
  const apply = opt.applyGradients.bind(opt)
  opt.applyGradients = (g) => {
    const t0 = performance.now()
    active = probe
    try {
      apply(g)
    } finally {
      active = null
      probe.apply += performance.now() - t0
    }
  }
}

interface Row {
  label: string
  model: tfl.Sequential
  opt: tf.Optimizer
  probe: Probe
  /** Per round: ms per step, and the breakdown's ms per step. */
  step: number[]
  apply: number[]
  native: number[]
}

function makeRow(model: ModelName, spec: (typeof ROWS)[number]): Row {
  const opt: tf.Optimizer = spec.kron === null ? tf.train.adam(1e-3) : new KronOptimizer({ learningRate: 1e-3, seed: 1, ...spec.kron })
  const row: Row = { label: spec.label, model: makeModel(model), opt, probe: { apply: 0, native: 0 }, step: [], apply: [], native: [] }
  row.model.compile({ optimizer: opt, loss: 'categoricalCrossentropy' })
  instrument(opt, row.probe)
  return row
}

const median = (xs: number[]): number => {
  if (xs.length === 0) return NaN
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

async function steps(row: Row, x: tf.Tensor, y: tf.Tensor, n: number): Promise<number> {
  const model = row.model
  const t0 = performance.now()
  for (let i = 0; i < n; i++) await model.trainOnBatch(x, y)
  return performance.now() - t0
}

/**
 * Waits, untimed, for any work a PSGD step left running (an overlapped fit), so that it
 * does not run into the next row's time: saving the state waits for it.
 */
async function settle(r: Row): Promise<void> {
  if (r.opt instanceof KronOptimizer) await r.opt.getWeights()
}

interface Result {
  backend: Backend
  model: ModelName
  label: string
  stepsPerRound: number
  rounds: number
  msPerStep: number
  ratioToAdam: number
  applyGradients: number
  native: number | null
}

async function benchModel(backend: Backend, model: ModelName, flags: Flags): Promise<Result[]> {
  const x = tf.randomUniform([BATCH, 784], 0, 1, 'float32', 7)
  const y = tf.cast(
    tf.oneHot(
      tf.tensor1d(
        Array.from({ length: BATCH }, (_, i) => (i * 7) % 10),
        'int32',
      ),
      10,
    ),
    'float32',
  )
  const rows = ROWS.map((r) => makeRow(model, r))
  // warm-up: the first steps build the states, compile the wasm kernels, fill tfjs's caches
  const warm = flags.quick ? 2 : 5
  for (const r of rows) await steps(r, x, y, warm)
  // steps per round: about 0.8 s of Adam's steps (0.15 s with --quick), at least 2
  const adamMs = await steps(rows[0], x, y, 1)
  const perRound = Math.max(2, Math.min(60, Math.round((flags.quick ? 150 : 800) / Math.max(adamMs, 0.1))))
  const rounds = flags.rounds ?? (flags.quick ? 2 : 9)
  for (let k = 0; k < rounds; k++) {
    for (const r of rows) {
      // one step untimed first, so the first timed step finds the state as every later
      // one does (with an overlapped fit: a fit in flight to wait for)
      await steps(r, x, y, 1)
      r.probe.apply = 0
      r.probe.native = 0
      const ms = await steps(r, x, y, perRound)
      r.step.push(ms / perRound)
      r.apply.push(r.probe.apply / perRound)
      r.native.push(r.probe.native / perRound)
      await settle(r)
    }
  }
  const adam = median(rows[0].step)
  const out = rows.map((r): Result => {
    const ms = median(r.step)
    return {
      backend,
      model,
      label: r.label,
      stepsPerRound: perRound,
      rounds,
      msPerStep: ms,
      ratioToAdam: ms / adam,
      applyGradients: median(r.apply),
      // Adam makes no native call
      native: r.native.some((v) => v > 0) ? median(r.native) : null,
    }
  })
  for (const r of rows) {
    r.opt.dispose()
    r.model.dispose()
  }
  tf.dispose([x, y])
  return out
}

const fmt = (v: number | null, digits = 2): string => (v === null || !Number.isFinite(v) ? '—' : v.toFixed(digits))

function table(results: Result[]): string {
  const head = ['optimizer', 'ms/step', '× Adam', 'applyGradients', 'native step', 'glue', 'rest (fwd+bwd, loss read)']
  const lines = [`| ${head.join(' | ')} |`, `|${head.map((_, i) => (i === 0 ? ' --- ' : ' ---: ')).join('|')}|`]
  for (const r of results) {
    const glue = r.native === null ? null : r.applyGradients - r.native
    const rest = r.msPerStep - r.applyGradients
    lines.push(`| ${r.label} | ${fmt(r.msPerStep)} | **${fmt(r.ratioToAdam)}** | ${fmt(r.applyGradients)} | ${fmt(r.native)} | ${fmt(glue)} | ${fmt(rest)} |`)
  }
  return lines.join('\n')
}

/** The native Kron step alone (no tfjs), on plain leaves of the model's weight shapes: where its time goes. */
const NATIVE_ROWS: { label: string; options: KronOptions }[] = [
  { label: 'fit, then apply with the factors (default order, p = 1)', options: { preconditionerUpdateProbability: 1 } },
  {
    label: 'apply with the grams, then fit and form the grams (fit last, p = 1)',
    options: { preconditionerUpdateProbability: 1, updatePreconditionerFirst: false },
  },
  { label: 'apply with the grams only (p = 0)', options: { preconditionerUpdateProbability: 0 } },
]

interface NativeResult {
  model: ModelName
  label: string
  msPerStep: number
}

function nativeAlone(model: ModelName, flags: Flags): NativeResult[] {
  const m = makeModel(model)
  const shapes = m.trainableWeights.map((w) => [...w.shape] as number[])
  m.dispose()
  const leaves = shapes.map((shape, i) => ({ data: tf.randomNormal(shape, 0, 0.01, 'float32', 50 + i).dataSync() as Float32Array, shape }))
  const steps = flags.quick ? 3 : 15
  return NATIVE_ROWS.map(({ label, options }) => {
    const t = kron({ learningRate: 1e-3, seed: 1, ...options })
    const state = t.init(leaves)
    for (let i = 0; i < 3; i++) t.update(leaves, state)
    const ms: number[] = []
    for (let i = 0; i < steps; i++) {
      const t0 = performance.now()
      t.update(leaves, state)
      ms.push(performance.now() - t0)
    }
    state.dispose()
    return { model, label, msPerStep: median(ms) }
  })
}

async function useBackend(backend: Backend): Promise<void> {
  if (backend === 'wasm') setWasmPaths(path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm')) + path.sep)
  if (!(await tf.setBackend(backend))) throw new Error(`bench:tfjs: the tfjs ${backend} backend did not start`)
}

async function main(): Promise<void> {
  const flags = parseArgs(process.argv.slice(2))
  tf.env().set('PROD', true)
  timeNativeCalls()
  const all: Result[] = []
  const started = performance.now()
  console.log(
    `bench:tfjs: tfjs-core ${tf.version_core}, ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, load ${os.loadavg()[0].toFixed(1)}, batch ${BATCH}${flags.quick ? ', --quick' : ''}`,
  )
  const natives: NativeResult[] = []
  for (const backend of flags.backends) {
    await useBackend(backend)
    for (const model of flags.models) {
      const results = await benchModel(backend, model, flags)
      all.push(...results)
      const r = results[0]
      console.log(`\n### ${model}, ${backend} backend (${r.rounds} rounds of ${r.stepsPerRound} steps per row; medians, ms per step)\n`)
      console.log(table(results))
    }
  }
  for (const model of flags.models) {
    const rows = nativeAlone(model, flags)
    natives.push(...rows)
    console.log(`\n### ${model}: the native Kron step alone, on plain leaves of its weights' shapes (median ms per step)\n`)
    console.log(['| step | ms |', '| --- | ---: |', ...rows.map((r) => `| ${r.label} | ${fmt(r.msPerStep)} |`)].join('\n'))
  }
  console.log(`\nbench:tfjs: ${((performance.now() - started) / 1000).toFixed(0)} s, load ${os.loadavg()[0].toFixed(1)} at the end`)
  if (flags.json) writeFileSync(flags.json, JSON.stringify({ tfjs: all, native: natives }, null, 2) + '\n')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
