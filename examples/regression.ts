/**
 * Ill-conditioned linear regression: fit W (32×4) to noiseless targets Y = X·W* by full-
 * batch least squares, where the inputs' covariance XᵀX/n has eigenvalues spread
 * log-uniformly over [1/cond, 1] (cond = 1e4 by default). Two versions of the same spectrum:
 * axis-aligned (the eigenvectors are the coordinate axes, which a diagonal preconditioner
 * such as Adam's matches exactly) and rotated (a random rotation of the inputs: only a
 * preconditioner with off-diagonal terms, such as Kron's 32×32 factor, can undo it).
 * Reports the steps to reach loss/initial-loss ratios 1e-3 … 1e-6.
 *
 * `npm run example -- regression [--steps N] [--cond C] [--lr-adam X] [--lr-kron X] [--lr-kron-auto X] [--lr-affine X] [--out FILE]`
 */
import * as tf from '@tensorflow/tfjs-core'
import { parseFlags, num } from './lib/cli'
import { stepsToReach, thin } from './lib/curves'
import { consoleIO, type ExampleIO, type ExampleResult } from './lib/example'
import { LABELS, LR_FLAGS, makeOptimizer, type OptimizerName } from './lib/optimizers'
import { ProgressBar } from './lib/progress'
import { orthonormalColumns, Rng } from './lib/rng'
import { svgFigure, writeSvg, type Panel } from './lib/svg-plot'
import { terminalChart } from './lib/terminal-chart'
import { Stopwatch } from './lib/timing'
import { useCpuBackend } from './lib/tfjs-cpu'

export const TARGETS = [1e-3, 1e-4, 1e-5, 1e-6]

export interface RegressionProblem {
  rotated: boolean
  cond: number
  seed: number
  samples?: number
  dim?: number
  outputs?: number
}

export interface RegressionRun {
  /** loss / initial loss after each step */
  ratios: number[]
  gradMs: number
  optMs: number
}

/**
 * The data: X = √n · Z · diag(√s) · Rᵀ with Z's columns orthonormal, so XᵀX/n = R·diag(s)·Rᵀ
 * exactly (R = I when axis-aligned); W* normal; Y = X·W*.
 */
export function makeProblem(p: RegressionProblem): { x: Float32Array; wStar: Float32Array; n: number; d: number; k: number } {
  const n = p.samples ?? 512
  const d = p.dim ?? 32
  const k = p.outputs ?? 4
  const rng = new Rng(p.seed)
  const z = orthonormalColumns(rng, n, d)
  const s = Array.from({ length: d }, (_, i) => p.cond ** (-i / (d - 1)))
  const r = p.rotated ? orthonormalColumns(rng, d, d) : null
  const x = new Float32Array(n * d)
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < d; j++) {
      let v = 0
      if (r) for (let l = 0; l < d; l++) v += z[i * d + l] * Math.sqrt(s[l]) * r[j * d + l]
      else v = z[i * d + j] * Math.sqrt(s[j])
      x[i * d + j] = Math.sqrt(n) * v
    }
  }
  return { x, wStar: rng.normals(d * k), n, d, k }
}

let uid = 0

/**
 * One run: `steps` full-batch steps from W = 0, the learning rate decayed to 0 by a cosine
 * over the run (the same schedule for every optimizer: without a decay, an optimizer whose
 * step has a fixed size, as Adam's and Kron's have, stalls at a floor set by the rate).
 */
export function trainRegression(
  problem: RegressionProblem,
  optimizer: OptimizerName,
  learningRate: number,
  steps: number,
  onStep?: (ratio: number) => void,
): RegressionRun {
  const { x, wStar, n, d, k } = makeProblem(problem)
  const watch = new Stopwatch()
  const schedule = (t: number): number => learningRate * 0.5 * (1 + Math.cos((Math.PI * Math.min(t, steps)) / steps))
  const opt = makeOptimizer(optimizer, schedule, problem.seed)
  const xs = tf.tensor(x, [n, d])
  const ys = tf.tidy(() => tf.matMul(xs, tf.tensor(wStar, [d, k])))
  const w = tf.variable(tf.zeros([d, k]), true, `regression_w_${uid++}`)
  const loss = (): tf.Scalar => tf.tidy(() => tf.mul(0.5, tf.mean(tf.sum(tf.square(tf.sub(tf.matMul(xs, w), ys)), 1))))
  const l0 = tf.tidy(() => loss().dataSync()[0])
  const ratios: number[] = []
  for (let t = 0; t < steps; t++) {
    const { value, grads } = watch.time('grad', () => {
      const r = tf.variableGrads(loss)
      for (const g of Object.values(r.grads)) g.dataSync() // the backward pass is done here, not in the step
      return r
    })
    const ratio = value.dataSync()[0] / l0
    watch.time('opt', () => opt.applyGradients(grads))
    tf.dispose([value, grads])
    ratios.push(ratio)
    onStep?.(ratio)
  }
  // the loss after the last step
  ratios.push(tf.tidy(() => loss().dataSync()[0]) / l0)
  opt.dispose()
  tf.dispose([xs, ys, w])
  return { ratios: ratios.slice(1), gradMs: watch.get('grad'), optMs: watch.get('opt') }
}

export async function main(argv: readonly string[], io: ExampleIO = consoleIO): Promise<ExampleResult> {
  const flags = parseFlags(argv, 'examples/out/regression.svg', ['steps', 'cond', ...LR_FLAGS])
  await useCpuBackend()
  const steps = num(flags, 'steps', flags.smoke ? 200 : 2000)
  const cond = num(flags, 'cond', 1e4)
  // each optimizer's best rate on the rotated problem in `npm run bench:quality` (three tried each)
  const lrs: Record<OptimizerName, number> = {
    adam: num(flags, 'lr-adam', 1),
    kron: num(flags, 'lr-kron', 0.01),
    'kron-auto': num(flags, 'lr-kron-auto', 0.01),
    'kron-pro': num(flags, 'lr-kron-pro', 0.01),
    'kron-quad': num(flags, 'lr-kron-quad', 0.01),
    'kron-delayed': num(flags, 'lr-kron-delayed', 0.01),
    'kron-overlap': num(flags, 'lr-kron-overlap', 0.01),
    affine: num(flags, 'lr-affine', 0.03),
  }
  const optimizers: OptimizerName[] = ['adam', 'kron', 'kron-auto', 'affine']
  const panels: Panel[] = []
  const runs: ExampleResult['runs'] = []
  const rows: string[] = []
  for (const rotated of [false, true]) {
    const kind = rotated ? 'rotated' : 'axis-aligned'
    const series = []
    for (const name of optimizers) {
      const bar = new ProgressBar(steps, `${kind} ${LABELS[name].padEnd(11)}`, io.progress)
      const run = trainRegression({ rotated, cond, seed: flags.seed }, name, lrs[name], steps, (r) => bar.tick(1, `loss ratio ${r.toExponential(2)}`))
      bar.finish()
      const label = `${LABELS[name]} lr ${lrs[name]}`
      runs.push({ label: `${kind} ${label}`, firstLoss: 1, lastLoss: run.ratios[run.ratios.length - 1] })
      series.push({ name: label, colorKey: name, ...thin(run.ratios, 400) })
      const reach = TARGETS.map((t) => stepsToReach(run.ratios, t) ?? '—')
      rows.push(`| ${kind} | ${label} | ${reach.join(' | ')} | ${run.ratios[run.ratios.length - 1].toExponential(1)} |`)
    }
    panels.push({ title: `${kind}, condition number ${cond.toExponential(0)}`, xLabel: 'step', yLabel: 'loss / initial loss', logY: true, series })
    io.print(terminalChart(series, { title: `${kind}: loss / initial loss`, logY: true }))
  }
  io.print(`| problem | optimizer | steps to 1e-3 | 1e-4 | 1e-5 | 1e-6 | final ratio |\n|---|---|---:|---:|---:|---:|---:|\n${rows.join('\n')}`)
  writeSvg(flags.out, svgFigure(panels, { title: 'Ill-conditioned least squares (32×4 weight, full batch)' }))
  io.print(`wrote ${flags.out}`)
  return { file: flags.out, curves: panels.reduce((a, p) => a + p.series.length, 0), runs }
}
