/**
 * PSGD's telemetry while it trains: Kron (`psgd/tfjs`'s `KronOptimizer`, defaults) on
 * mini-batch least squares for a 32×4 weight whose inputs are rotated and ill-conditioned
 * (the regression example's problem, batches of 32, so the gradient is noisy), reading
 * `opt.stats()` after every step. Plots the loss, the whitening estimate against its
 * target 1 (with the step's own pre-clip RMS), the update's RMS, the factors' largest
 * condition estimate and the number of fits so far (the default update probability
 * decays from 1).
 *
 * `npm run example -- telemetry [--steps N] [--lr X] [--cond C] [--out FILE]`
 */
import * as tf from '@tensorflow/tfjs-core'
import { KronOptimizer, statsSummary } from '../tfjs'
import { num, parseFlags } from './lib/cli'
import { thin } from './lib/curves'
import { consoleIO, type ExampleIO, type ExampleResult } from './lib/example'
import { ProgressBar } from './lib/progress'
import { Rng } from './lib/rng'
import { svgFigure, writeSvg, type Panel } from './lib/svg-plot'
import { terminalChart } from './lib/terminal-chart'
import { useCpuBackend } from './lib/tfjs-cpu'
import { makeProblem } from './regression'

/** What the example records after each step. */
export interface TelemetryTrace {
  loss: number[]
  whitening: (number | null)[]
  preRms: number[]
  updateRms: number[]
  maxCondition: number[]
  fits: number[]
  fitMs: number[]
}

let uid = 0

/** `steps` mini-batch steps of Kron from W = 0, its stats read after each. */
export function trainWithTelemetry(steps: number, learningRate: number, cond: number, seed: number, onStep?: (loss: number) => void): TelemetryTrace {
  const { x, wStar, n, d, k } = makeProblem({ rotated: true, cond, seed })
  const batch = 32
  const rng = new Rng(seed + 1)
  const opt = new KronOptimizer({ learningRate, seed })
  const xs = tf.tensor(x, [n, d])
  const ws = tf.tensor(wStar, [d, k])
  const w = tf.variable(tf.zeros([d, k]), true, `telemetry_w_${uid++}`)
  const full = (): number => tf.tidy(() => tf.mean(tf.sum(tf.square(tf.sub(tf.matMul(xs, w), tf.matMul(xs, ws))), 1)).dataSync()[0] * 0.5)
  const l0 = full()
  const trace: TelemetryTrace = { loss: [], whitening: [], preRms: [], updateRms: [], maxCondition: [], fits: [], fitMs: [] }
  for (let t = 0; t < steps; t++) {
    const rows = Array.from({ length: batch }, () => rng.int(n))
    tf.tidy(() => {
      const xb = tf.gather(xs, rows)
      const yb = tf.matMul(xb, ws)
      const { grads } = tf.variableGrads(() => tf.mul(0.5, tf.mean(tf.sum(tf.square(tf.sub(tf.matMul(xb, w), yb)), 1))) as tf.Scalar)
      opt.applyGradients(grads)
    })
    const s = opt.stats()
    const summary = statsSummary(s)
    const loss = full() / l0
    trace.loss.push(loss)
    trace.whitening.push(s.whitening)
    trace.preRms.push(summary.psgd_pre_rms)
    trace.updateRms.push(summary.psgd_update_rms)
    trace.maxCondition.push(s.maxCondition)
    trace.fits.push(s.fits)
    trace.fitMs.push(s.times?.fitMs ?? 0)
    onStep?.(loss)
  }
  opt.dispose()
  tf.dispose([xs, ws, w])
  return trace
}

export async function main(argv: readonly string[], io: ExampleIO = consoleIO): Promise<ExampleResult> {
  const flags = parseFlags(argv, 'examples/out/telemetry.svg', ['steps', 'lr', 'cond'])
  await useCpuBackend()
  const steps = num(flags, 'steps', flags.smoke ? 300 : 1500)
  const lr = num(flags, 'lr', 0.003)
  const cond = num(flags, 'cond', 1e3)
  const bar = new ProgressBar(steps, 'Kron + stats()', io.progress)
  const tr = trainWithTelemetry(steps, lr, cond, flags.seed, (l) => bar.tick(1, `loss ratio ${l.toExponential(2)}`))
  bar.finish()
  const at = (ys: readonly (number | null)[]) => {
    const x: number[] = []
    const y: number[] = []
    ys.forEach((v, i) => {
      if (v !== null) {
        x.push(i + 1)
        y.push(v)
      }
    })
    return thin(y, 400, x)
  }
  const one = at(tr.loss.map(() => 1))
  const panels: Panel[] = [
    { title: 'loss (full batch)', xLabel: 'step', yLabel: 'loss / initial loss', logY: true, series: [{ name: 'loss', ...at(tr.loss) }] },
    {
      title: 'whitening: RMS of P·m (target 1)',
      xLabel: 'step',
      yLabel: 'RMS',
      logY: true,
      legend: 'bottom-right',
      series: [
        { name: 'pre-clip RMS, each step', ...at(tr.preRms), opacity: 0.35 },
        { name: 'whitening estimate', ...at(tr.whitening) },
        { name: 'target 1', ...one, dashed: true },
      ],
    },
    { title: "update's RMS", xLabel: 'step', yLabel: 'RMS of the update', logY: true, series: [{ name: 'update RMS', ...at(tr.updateRms) }] },
    {
      title: 'largest condition estimate of the factors',
      xLabel: 'step',
      yLabel: 'max|diag| / min|diag|',
      logY: true,
      series: [{ name: 'condition', ...at(tr.maxCondition) }],
    },
    { title: 'fits so far', xLabel: 'step', yLabel: 'fits', series: [{ name: 'fits', ...at(tr.fits) }] },
  ]
  for (const p of panels.slice(0, 2)) io.print(terminalChart(p.series, { title: p.title, logY: p.logY }))
  const last = tr.loss.length - 1
  const fitSteps = tr.fitMs.filter((v) => v > 0)
  io.print(
    [
      `steps ${steps}, fits ${tr.fits[last]}, final loss ratio ${tr.loss[last].toExponential(2)}`,
      `whitening estimate ${tr.whitening[last]?.toFixed(3) ?? '—'} (target 1), update RMS ${tr.updateRms[last].toExponential(2)}, largest condition ${tr.maxCondition[last].toFixed(1)}`,
      `mean fit time ${(fitSteps.reduce((a, b) => a + b, 0) / Math.max(1, fitSteps.length)).toFixed(3)} ms`,
    ].join('\n'),
  )
  writeSvg(flags.out, svgFigure(panels, { title: `Kron's telemetry: rotated least squares (condition ${cond.toExponential(0)}), batches of 32`, columns: 3 }))
  io.print(`wrote ${flags.out}`)
  return { file: flags.out, curves: panels.reduce((a, p) => a + p.series.length, 0), runs: [{ label: 'Kron', firstLoss: 1, lastLoss: tr.loss[last] }] }
}
