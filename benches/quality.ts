/**
 * `npm run bench:quality [-- --quick] [--out DIR]`: optimisation quality, not speed. The
 * three example tasks (examples/: ill-conditioned regression, delayed XOR, MNIST), each
 * optimizer given the same tuning effort: the same number of learning rates (three, ×3
 * apart, placed per optimizer after a first, wider sweep so that its best rate is not at
 * an end of its grid where that could be had) and the same seeds (three for XOR's success
 * rates); the best learning rate of each is picked by one criterion per task (below) and
 * reported, with every run of the sweep.
 * Prints markdown tables (also written to DIR/results.md) and writes the plots as SVG
 * (DIR/regression.svg, xor.svg, mnist.svg; DIR defaults to docs/quality).
 *
 * Wall time is split into the gradient (tfjs's forward and backward, or the hand-written
 * RNN gradient) and the optimizer's step (`applyGradients`), per step.
 *
 * Criteria: regression, the mean over the run of log10(loss ratio) (the area under the
 * log-loss curve: fast and deep both count); XOR, the most seeds solved, then the smallest
 * median step to solve; MNIST, the lowest mean training loss over the last epoch.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { parseArgs } from 'node:util'
import { ema, geomeanCurve, mean, median, stepsToReach, thin } from '../examples/lib/curves'
import { split } from '../examples/lib/mnist-data'
import { LABELS, type OptimizerName } from '../examples/lib/optimizers'
import { ProgressBar } from '../examples/lib/progress'
import { svgFigure, writeSvg, type Panel, type Series } from '../examples/lib/svg-plot'
import { formatDuration } from '../examples/lib/timing'
import { useCpuBackend } from '../examples/lib/tfjs-cpu'
import { trainMnist, type MnistRun } from '../examples/mnist'
import { TARGETS, trainRegression, type RegressionRun } from '../examples/regression'
import { trainXor, type XorRun } from '../examples/xor'

/** The learning rates tried per optimizer (the same count for each), in the order run. */
type Grid = Partial<Record<OptimizerName, number[]>>

interface Plan {
  seeds: number[]
  regression: { steps: number; cond: number; lrs: Grid }
  /** `seeds`: the XOR runs' own seeds (a success rate wants more than two), else the plan's. */
  xor: { lengths: number[]; steps: number; lrs: Grid; seeds?: number[] }
  mnist: { epochs: number; train: number; test: number; batch: number; lrs: Grid }
}

const entries = (g: Grid): [OptimizerName, number[]][] => Object.entries(g) as [OptimizerName, number[]][]

const FULL: Plan = {
  seeds: [1, 2],
  regression: { steps: 2000, cond: 1e4, lrs: { adam: [0.3, 1, 3], kron: [0.003, 0.01, 0.03], 'kron-auto': [0.003, 0.01, 0.03], affine: [0.01, 0.03, 0.1] } },
  xor: { lengths: [20, 30], steps: 2000, seeds: [1, 2, 3], lrs: { adam: [3e-4, 1e-3, 3e-3], kron: [3e-4, 1e-3, 3e-3], 'kron-auto': [3e-4, 1e-3, 3e-3] } },
  mnist: {
    epochs: 2,
    train: 6000,
    test: 2000,
    batch: 64,
    lrs: { adam: [3e-3, 1e-2, 3e-2], kron: [1e-3, 3e-3, 1e-2], 'kron-auto': [1e-3, 3e-3, 1e-2], affine: [3e-3, 1e-2, 3e-2] },
  },
}

const QUICK: Plan = {
  seeds: [1, 2],
  regression: { steps: 400, cond: 1e4, lrs: FULL.regression.lrs },
  xor: { lengths: [10], steps: 400, lrs: FULL.xor.lrs },
  mnist: { epochs: 1, train: 2000, test: 1000, batch: 64, lrs: FULL.mnist.lrs },
}

const fmtExp = (v: number): string => v.toExponential(1)
const perStep = (ms: number, steps: number): string => `${(ms / steps).toFixed(2)} ms`
/** The two timing cells of a results row: gradient and optimizer milliseconds per step, over all `steps` of `runs`. */
function timeCells(runs: { gradMs: number; optMs: number }[], steps: number): string {
  const total = (key: 'gradMs' | 'optMs'): number => runs.reduce((a, r) => a + r[key], 0)
  return `${perStep(total('gradMs'), steps)} | ${perStep(total('optMs'), steps)}`
}

/** The learning rate whose runs score lowest (`score` of the runs of one lr over the seeds). */
function best<R>(byLr: Map<number, R[]>, score: (runs: R[]) => number): [number, R[]] {
  let pick: [number, R[]] | null = null
  let bestScore = Infinity
  for (const [lr, runs] of byLr) {
    const s = score(runs)
    if (s < bestScore) {
      bestScore = s
      pick = [lr, runs]
    }
  }
  return pick!
}

function regression(plan: Plan, out: string[], dir: string): void {
  const p = plan.regression
  const panels: Panel[] = []
  const rows: string[] = []
  const sweep: string[] = []
  const score = (runs: RegressionRun[]): number => mean(runs.map((r) => mean(r.ratios.map((v) => Math.log10(Math.max(v, 1e-12))))))
  for (const rotated of [false, true]) {
    const kind = rotated ? 'rotated' : 'axis-aligned'
    const series: Series[] = []
    for (const [name, lrs] of entries(p.lrs)) {
      const byLr = new Map<number, RegressionRun[]>()
      for (const lr of lrs) {
        const runs = plan.seeds.map((seed) => {
          const bar = new ProgressBar(p.steps, `regression ${kind} ${LABELS[name]} lr ${lr} seed ${seed}`)
          const r = trainRegression({ rotated, cond: p.cond, seed }, name, lr, p.steps, () => bar.tick())
          bar.finish(`final ratio ${fmtExp(r.ratios[r.ratios.length - 1])}`)
          return r
        })
        byLr.set(lr, runs)
        sweep.push(`| ${kind} | ${LABELS[name]} | ${lr} | ${score(runs).toFixed(2)} | ${runs.map((r) => fmtExp(r.ratios[r.ratios.length - 1])).join(' / ')} |`)
      }
      const [lr, runs] = best(byLr, score)
      const reach = TARGETS.map((t) => runs.map((r) => stepsToReach(r.ratios, t) ?? '—').join(' / '))
      const steps = runs.length * p.steps
      rows.push(
        `| ${kind} | ${LABELS[name]} | ${lr} | ${reach.join(' | ')} | ${runs.map((r) => fmtExp(r.ratios[r.ratios.length - 1])).join(' / ')} | ${timeCells(runs, steps)} |`,
      )
      series.push({ name: `${LABELS[name]} (lr ${lr})`, colorKey: name, ...thin(geomeanCurve(runs.map((r) => r.ratios)), 400) })
    }
    panels.push({
      title: `${kind}, condition number ${p.cond.toExponential(0)}`,
      xLabel: 'step',
      yLabel: 'loss / initial loss',
      logY: true,
      series,
      yRange: [1e-15, 2],
    })
  }
  writeSvg(
    path.join(dir, 'regression.svg'),
    svgFigure(panels, { title: `Least squares, 32×4 weight, full batch, cosine-decayed lr; geometric mean of ${plan.seeds.length} seeds` }),
  )
  out.push(
    `### Ill-conditioned regression (${p.steps} steps, seeds ${plan.seeds.join(', ')}; one value per seed)\n`,
    `| problem | optimizer | best lr | steps to 1e-3 | 1e-4 | 1e-5 | 1e-6 | final loss ratio | gradient / step | optimizer / step |`,
    `|---|---|---:|---:|---:|---:|---:|---:|---:|---:|`,
    ...rows,
    ``,
    `Learning-rate sweep (score: mean log10 loss ratio over the run, lower is better):\n`,
    `| problem | optimizer | lr | score | final ratio per seed |`,
    `|---|---|---:|---:|---|`,
    ...sweep,
    ``,
  )
}

function xor(plan: Plan, out: string[], dir: string): void {
  const p = plan.xor
  const seeds = p.seeds ?? plan.seeds
  const panels: Panel[] = []
  const rows: string[] = []
  const sweep: string[] = []
  const score = (runs: XorRun[]): number => {
    const solved = runs.filter((r) => r.solvedAt !== null)
    return -solved.length * 1e6 + (solved.length ? median(solved.map((r) => r.solvedAt!)) : 0)
  }
  for (const length of p.lengths) {
    const series: Series[] = []
    for (const [name, lrs] of entries(p.lrs)) {
      const byLr = new Map<number, XorRun[]>()
      for (const lr of lrs) {
        const runs = seeds.map((seed) => {
          const bar = new ProgressBar(p.steps, `xor length ${length} ${LABELS[name]} lr ${lr} seed ${seed}`)
          const r = trainXor(length, name, lr, seed, p.steps, { onStep: () => bar.tick() })
          bar.finish(r.solvedAt !== null ? `solved at ${r.solvedAt}` : 'not solved')
          return r
        })
        byLr.set(lr, runs)
        sweep.push(
          `| ${length} | ${LABELS[name]} | ${lr} | ${runs.filter((r) => r.solvedAt !== null).length}/${runs.length} | ${runs.map((r) => r.solvedAt ?? '—').join(' / ')} |`,
        )
      }
      const [lr, runs] = best(byLr, score)
      const steps = runs.reduce((a, r) => a + r.losses.length, 0)
      rows.push(
        `| ${length} | ${LABELS[name]} | ${lr} | ${runs.filter((r) => r.solvedAt !== null).length}/${runs.length} | ${runs.map((r) => r.solvedAt ?? '—').join(' / ')} | ${runs.map((r) => (100 * r.accuracy).toFixed(1)).join(' / ')} | ${timeCells(runs, steps)} |`,
      )
      runs.forEach((r, i) =>
        series.push({ name: `${LABELS[name]} (lr ${lr})`, colorKey: name, ...thin(ema(r.losses, 0.95), 300), opacity: i === 0 ? 1 : 0.45, noLegend: i > 0 }),
      )
    }
    panels.push({ title: `sequence length ${length}`, xLabel: 'step', yLabel: 'training loss (EMA)', logY: true, series, legend: 'bottom-left' })
  }
  writeSvg(path.join(dir, 'xor.svg'), svgFigure(panels, { title: `Delayed XOR, tanh RNN (30 units), batch 128; every seed drawn (stops when solved)` }))
  out.push(
    `### Delayed XOR (at most ${p.steps} steps, seeds ${seeds.join(', ')}; solved = held-out loss < 0.1, checked every 50 steps)\n`,
    `| length | optimizer | best lr | solved | step solved, per seed | held-out accuracy %, per seed | gradient / step | optimizer / step |`,
    `|---:|---|---:|---:|---|---|---:|---:|`,
    ...rows,
    ``,
    `Learning-rate sweep:\n`,
    `| length | optimizer | lr | solved | step solved, per seed |`,
    `|---:|---|---:|---:|---|`,
    ...sweep,
    ``,
  )
}

async function mnist(plan: Plan, out: string[], dir: string): Promise<void> {
  const p = plan.mnist
  const rows: string[] = []
  const sweep: string[] = []
  const lossSeries: Series[] = []
  const accSeries: Series[] = []
  const score = (runs: MnistRun[]): number => mean(runs.map((r) => r.epochLoss[r.epochLoss.length - 1]))
  const data = new Map(plan.seeds.map((seed) => [seed, split(seed, p.train, p.test)]))
  const stepsPerRun = p.epochs * Math.ceil(p.train / p.batch)
  for (const [name, lrs] of entries(p.lrs)) {
    const byLr = new Map<number, MnistRun[]>()
    for (const lr of lrs) {
      const runs: MnistRun[] = []
      for (const seed of plan.seeds) {
        const bar = new ProgressBar(stepsPerRun, `mnist ${LABELS[name]} lr ${lr} seed ${seed}`)
        const { train, test } = data.get(seed)!
        const r = await trainMnist({ optimizer: name, learningRate: lr, seed, epochs: p.epochs, batchSize: p.batch, train, test, onBatch: () => bar.tick() })
        bar.finish(`test accuracy ${(100 * r.testAccuracy[r.testAccuracy.length - 1]).toFixed(2)}%`)
        runs.push(r)
      }
      byLr.set(lr, runs)
      sweep.push(
        `| ${LABELS[name]} | ${lr} | ${runs.map((r) => r.epochLoss.map((l) => l.toFixed(3)).join(' → ')).join('; ')} | ${runs.map((r) => (100 * r.testAccuracy[r.testAccuracy.length - 1]).toFixed(2)).join(' / ')} |`,
      )
    }
    const [lr, runs] = best(byLr, score)
    const label = `${LABELS[name]} (lr ${lr})`
    const last = (a: number[]): number => a[a.length - 1]
    const steps = runs.length * stepsPerRun
    rows.push(
      `| ${LABELS[name]} | ${lr} | ${mean(runs.map((r) => r.epochLoss[0])).toFixed(3)} | ${mean(runs.map((r) => last(r.epochLoss))).toFixed(3)} | ${mean(runs.map((r) => r.testLoss)).toFixed(3)} | ${runs.map((r) => (100 * last(r.testAccuracy)).toFixed(2)).join(' / ')} | ${timeCells(runs, steps)} |`,
    )
    lossSeries.push({ name: label, colorKey: name, ...thin(ema(geomeanCurve(runs.map((r) => r.losses)), 0.9), 400) })
    accSeries.push({
      name: label,
      colorKey: name,
      x: runs[0].testAccuracy.map((_, i) => i + 1),
      y: runs[0].testAccuracy.map((_, i) => 100 * mean(runs.map((r) => r.testAccuracy[i]))),
      markers: true,
    })
  }
  writeSvg(
    path.join(dir, 'mnist.svg'),
    svgFigure(
      [
        { title: 'training loss (EMA of batches, geometric mean of seeds)', xLabel: 'step', yLabel: 'cross-entropy', logY: true, series: lossSeries },
        {
          title: `test accuracy (${p.test} digits, mean of seeds)`,
          xLabel: 'epoch',
          yLabel: 'accuracy %',
          series: accSeries,
          xIntegers: true,
          legend: 'bottom-right',
        },
      ],
      { title: `MNIST, 784-128-10 MLP (tfjs-layers, cpu backend), ${p.train} training digits, batch ${p.batch}` },
    ),
  )
  out.push(
    `### MNIST (${p.epochs} epochs of ${p.train} digits, batch ${p.batch}, test on ${p.test}; seeds ${plan.seeds.join(', ')}, means over seeds)\n`,
    `| optimizer | best lr | epoch-1 train loss | last-epoch train loss | test loss | test accuracy %, per seed | gradient / step | optimizer / step |`,
    `|---|---:|---:|---:|---:|---|---:|---:|`,
    ...rows,
    ``,
    `Learning-rate sweep (train loss by epoch, per seed; test accuracy per seed):\n`,
    `| optimizer | lr | train loss by epoch | test accuracy % |`,
    `|---|---:|---|---|`,
    ...sweep,
    ``,
  )
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { quick: { type: 'boolean' }, out: { type: 'string' }, only: { type: 'string' } } })
  const plan = values.quick ? QUICK : FULL
  const dir = values.out ?? path.join(__dirname, '..', 'docs', 'quality')
  const only = new Set((values.only ?? 'regression,xor,mnist').split(','))
  await useCpuBackend()
  const t0 = performance.now()
  const out: string[] = []
  const took: string[] = []
  for (const [task, run] of [
    ['regression', () => regression(plan, out, dir)],
    ['xor', () => xor(plan, out, dir)],
    ['mnist', () => mnist(plan, out, dir)],
  ] as const) {
    if (!only.has(task)) continue
    const s = performance.now()
    await run()
    took.push(`${task} ${formatDuration(performance.now() - s)}`)
  }
  out.push(`Wall time: ${formatDuration(performance.now() - t0)} (${took.join(', ')})${values.quick ? ', --quick' : ''}.`)
  const md = out.join('\n') + '\n'
  fs.mkdirSync(dir, { recursive: true })
  fs.writeFileSync(path.join(dir, 'results.md'), md)
  process.stdout.write('\n' + md)
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
