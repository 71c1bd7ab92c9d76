/**
 * The health guard and the divergence warning on runs that go bad: Affine
 * (`psgd/tfjs`'s `AffineOptimizer`) on a small tanh MLP (8-32-1, full-batch mean squared
 * error), from the same start, under `onUnhealthy: 'throw'` (the default), `'reset'` and
 * `'skip'`, each with an `onWarning` hook that records the step the divergence warning
 * fired at. Two learning rates: 0.5, far too large, where the weights grow by orders of
 * magnitude with no error (the factors stay well conditioned and the updates finite, so
 * the guard never acts and the three modes take the same steps: the warning is what
 * catches it), and 8, where the updates overflow float32 within a few steps (the default
 * refuses that step with a `RangeError`; `'reset'` resets the factors and `'skip'` drops
 * the fits, but the next gradient of the MLP itself is no longer finite). Every step reads
 * `opt.stats()` and the params' norm; plots, per learning rate, the norm (with the warning
 * and the thrown steps), the loss, the guard's counts and the factors' largest condition
 * estimate.
 *
 * `npm run example -- guard [--steps N] [--lr X] [--lr-high X] [--seed N] [--out FILE]`
 */
import * as tf from '@tensorflow/tfjs-core'
import type { PsgdWarning } from '../index'
import { AffineOptimizer } from '../tfjs'
import { num, parseFlags } from './lib/cli'
import { consoleIO, type ExampleIO, type ExampleResult } from './lib/example'
import { ProgressBar } from './lib/progress'
import { Rng } from './lib/rng'
import { svgFigure, writeSvg, type Panel, type Series } from './lib/svg-plot'
import { terminalChart } from './lib/terminal-chart'
import { useCpuBackend } from './lib/tfjs-cpu'

/** The three settings of `onUnhealthy` the example compares. */
export const MODES = ['throw', 'reset', 'skip'] as const
export type Mode = (typeof MODES)[number]

/** What one run records after each step it took. */
export interface GuardTrace {
  mode: Mode
  learningRate: number
  loss: number[]
  /** the params' global L2 norm */
  norm: number[]
  /** factor resets so far (summed over the leaves) */
  resets: number[]
  /** steps skipped so far */
  skipped: number[]
  /** fits dropped so far (summed over the leaves) */
  dropped: number[]
  maxCondition: number[]
  /** the step at which `onWarning` fired, and its message */
  warning: { step: number; message: string } | null
  /** the step that threw (the default mode refuses a step whose updates are not finite), and the error */
  thrown: { step: number; message: string } | null
}

/** The MLP's data and initial weights (8 → 32 → 1, tanh): the same for every run. */
interface Setup {
  x: Float32Array
  y: Float32Array
  init: Record<string, { data: Float32Array; shape: number[] }>
}

const N = 64
const D = 8
const H = 32

function setup(seed: number): Setup {
  const rng = new Rng(seed)
  const x = rng.normals(N * D)
  const a = rng.normals(D)
  const y = Float32Array.from({ length: N }, (_, n) => Math.sin(a.reduce((s, v, j) => s + v * x[n * D + j], 0)))
  return {
    x,
    y,
    init: {
      w1: { data: rng.normals(D * H, 1 / Math.sqrt(D)), shape: [D, H] },
      b1: { data: new Float32Array(H), shape: [H] },
      w2: { data: rng.normals(H, 1 / Math.sqrt(H)), shape: [H, 1] },
      b2: { data: new Float32Array(1), shape: [1] },
    },
  }
}

let uid = 0

/** `steps` full-batch steps of Affine under `mode` from the setup's start (stops at a step that throws). */
export function trainGuarded(mode: Mode, steps: number, learningRate: number, seed: number, onStep?: () => void): GuardTrace {
  const s = setup(seed)
  const id = uid++
  const vars = Object.fromEntries(Object.entries(s.init).map(([k, l]) => [k, tf.variable(tf.tensor(l.data, l.shape), true, `guard_${id}_${k}`)]))
  const xs = tf.tensor(s.x, [N, D])
  const ys = tf.tensor(s.y, [N, 1])
  const lossOf = (): tf.Scalar => tf.mean(tf.square(tf.sub(tf.add(tf.matMul(tf.tanh(tf.add(tf.matMul(xs, vars.w1), vars.b1)), vars.w2), vars.b2), ys)))
  const trace: GuardTrace = { mode, learningRate, loss: [], norm: [], resets: [], skipped: [], dropped: [], maxCondition: [], warning: null, thrown: null }
  const opt = new AffineOptimizer({
    learningRate,
    onUnhealthy: mode,
    seed,
    onWarning: (w: PsgdWarning) => {
      trace.warning = { step: w.step, message: w.message }
    },
  })
  for (let t = 1; t <= steps; t++) {
    const { value, grads } = tf.variableGrads(lossOf)
    try {
      opt.applyGradients(grads)
    } catch (e) {
      trace.thrown = { step: t, message: e instanceof Error ? e.message : String(e) }
    } finally {
      tf.dispose([value, ...Object.values(grads)])
    }
    if (trace.thrown) break
    const st = opt.stats()
    const loss = tf.tidy(() => lossOf().dataSync()[0])
    let sq = 0 // in float64: the norm outgrows float32's sums
    for (const v of Object.values(vars)) for (const x of v.dataSync()) sq += x * x
    trace.loss.push(loss)
    trace.norm.push(Math.sqrt(sq))
    trace.resets.push(st.leaves.reduce((a, l) => a + l.resets, 0))
    trace.skipped.push(st.skipped)
    trace.dropped.push(st.leaves.reduce((a, l) => a + l.dropped, 0))
    trace.maxCondition.push(st.maxCondition)
    onStep?.()
  }
  opt.dispose()
  tf.dispose([xs, ys, ...Object.values(vars)])
  return trace
}

/** The finite values of `ys` (only the positive ones for a log axis) with their steps (from 1). */
function points(ys: readonly number[], log: boolean): { x: number[]; y: number[] } {
  const x: number[] = []
  const y: number[] = []
  ys.forEach((v, i) => {
    if (Number.isFinite(v) && (v > 0 || !log)) {
      x.push(i + 1)
      y.push(v)
    }
  })
  return { x, y }
}

/** One curve per run: colour by mode; the modes' curves can coincide, so 'reset' is dashed and 'skip' pale. */
function curves(traces: readonly GuardTrace[], pick: (tr: GuardTrace) => readonly number[], label = '', log = true): Series[] {
  return traces.map((tr) => ({
    name: `${label}'${tr.mode}'`,
    colorKey: tr.mode,
    dashed: tr.mode === 'reset',
    opacity: tr.mode === 'skip' ? 0.55 : undefined,
    ...points(pick(tr), log),
  }))
}

/** A marker at `step` on a run's norm curve. */
function marker(tr: GuardTrace, name: string, step: number): Series {
  const v = tr.norm[Math.min(step, tr.norm.length) - 1]
  return { name, colorKey: tr.mode, x: [step, step], y: [v, v], markers: true }
}

/** The warning (once when every run warned at the same step) and each thrown step, as markers on the norm curves. */
function events(runs: readonly GuardTrace[]): Series[] {
  const warned = runs.filter((tr) => tr.warning)
  const same = warned.length === runs.length && warned.every((tr) => tr.warning!.step === warned[0].warning!.step)
  const out = (same ? warned.slice(0, 1) : warned).map((tr) =>
    marker(tr, `warning: ${same ? 'every mode' : `'${tr.mode}'`}, step ${tr.warning!.step}`, tr.warning!.step),
  )
  for (const tr of runs) if (tr.thrown && tr.norm.length > 0) out.push(marker(tr, `threw: '${tr.mode}', step ${tr.thrown.step}`, tr.norm.length))
  return out
}

/** The four panels of one learning rate's runs. */
function panelsOf(runs: readonly GuardTrace[]): Panel[] {
  const lr = `lr ${runs[0].learningRate}`
  const counts = (mode: Mode, label: string, pick: (tr: GuardTrace) => number[]) =>
    curves(
      runs.filter((tr) => tr.mode === mode),
      pick,
      label,
      false,
    )
  return [
    {
      title: `${lr}: params' L2 norm (dots: warning, thrown step)`,
      xLabel: 'step',
      yLabel: 'norm',
      logY: true,
      series: [...curves(runs, (tr) => tr.norm), ...events(runs)],
    },
    { title: `${lr}: loss (full batch)`, xLabel: 'step', yLabel: 'mean squared error', logY: true, series: curves(runs, (tr) => tr.loss) },
    {
      title: `${lr}: the guard's counts so far (stats())`,
      xLabel: 'step',
      yLabel: 'count',
      series: [
        ...counts('reset', 'factor resets: ', (tr) => tr.resets),
        ...counts('skip', 'skipped steps + dropped fits: ', (tr) => tr.skipped.map((v, i) => v + tr.dropped[i])),
      ],
    },
    {
      title: `${lr}: largest condition estimate of the factors`,
      xLabel: 'step',
      yLabel: 'max|diag| / min|diag|',
      logY: true,
      series: curves(runs, (tr) => tr.maxCondition),
    },
  ]
}

export async function main(argv: readonly string[], io: ExampleIO = consoleIO): Promise<ExampleResult> {
  const flags = parseFlags(argv, 'examples/out/guard.svg', ['steps', 'lr', 'lr-high'])
  await useCpuBackend()
  const steps = num(flags, 'steps', flags.smoke ? 120 : 400)
  const rates = [num(flags, 'lr', 0.5), num(flags, 'lr-high', 8)]
  const bar = new ProgressBar(steps * MODES.length * rates.length, 'Affine under three guards', io.progress)
  const byRate = rates.map((lr) =>
    MODES.map((mode) => {
      const tr = trainGuarded(mode, steps, lr, flags.seed, () => bar.tick(1, `lr ${lr}, '${mode}'`))
      bar.tick(steps - tr.norm.length)
      return tr
    }),
  )
  bar.finish()
  const traces = byRate.flat()
  // one row per quantity, one column per learning rate
  const [left, right] = byRate.map(panelsOf)
  const panels = left.flatMap((p, i) => [p, right[i]])
  for (const p of panels.slice(0, 2)) io.print(terminalChart(p.series.slice(0, MODES.length), { title: p.title, logY: true }))
  const cols = ['lr', 'mode', 'steps', 'warning', 'threw', 'norm', 'loss', 'resets', 'skipped', 'dropped', 'condition']
  const widths = [6, 8, 6, 8, 6, 10, 10, 7, 8, 8, 10]
  const row = (cells: readonly string[]) => cells.map((c, i) => c.padStart(widths[i])).join(' ')
  const lines = traces.map((tr) => {
    const last = tr.norm.length - 1
    const at = (ys: readonly number[], f: (v: number) => string) => (last >= 0 ? f(ys[last]) : '—')
    return row([
      String(tr.learningRate),
      `'${tr.mode}'`,
      String(tr.norm.length),
      tr.warning ? String(tr.warning.step) : '—',
      tr.thrown ? String(tr.thrown.step) : '—',
      at(tr.norm, (v) => v.toExponential(2)),
      at(tr.loss, (v) => v.toExponential(2)),
      at(tr.resets, String),
      at(tr.skipped, String),
      at(tr.dropped, String),
      at(tr.maxCondition, (v) => v.toFixed(2)),
    ])
  })
  const warned = traces.find((tr) => tr.warning)
  const start = traces[0].norm.length > 0 ? `, params' norm after step 1: ${traces[0].norm[0].toExponential(2)}` : ''
  io.print(
    [
      `Affine on an 8-32-1 tanh MLP, ${steps} full-batch steps from the same start${start}`,
      row(cols),
      ...lines,
      ...(warned ? [`the warning (lr ${warned.learningRate}, '${warned.mode}'): ${warned.warning!.message}`] : []),
      ...traces.filter((tr) => tr.thrown).map((tr) => `lr ${tr.learningRate}, '${tr.mode}' threw at step ${tr.thrown!.step}: ${tr.thrown!.message}`),
    ].join('\n'),
  )
  writeSvg(flags.out, svgFigure(panels, { title: `The health guard: Affine at learning rates ${rates.join(' and ')} on a small tanh MLP`, columns: 2 }))
  io.print(`wrote ${flags.out}`)
  return {
    file: flags.out,
    curves: panels.reduce((a, p) => a + p.series.length, 0),
    runs: traces.map((tr) => ({ label: `${tr.mode}, lr ${tr.learningRate}`, firstLoss: tr.loss[0], lastLoss: tr.loss[tr.loss.length - 1] })),
  }
}
