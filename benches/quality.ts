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
 *
 * The whitening table (`whitening`, no tfjs): Kron's preconditioner fitted on gradients of a
 * known Kronecker covariance `C = C₁ ⊗ C₂` under each update rule (EQ, PRO, QUAD), and how
 * close `P·C·P` gets to `I` (see {@link whiteningDistance}) after a number of fits, at
 * psgd-jax's preconditioner lr 0.1 and at each rule's best lr of a small grid.
 *
 * The overlap table (`overlap`): Kron in psgd-jax's order, in the delayed order
 * (`updatePreconditionerFirst: false`) and with `overlapFit: true` (the delayed order's
 * numbers, its fit run on a native worker while the next gradient is computed) on the two
 * tasks with a gradient to overlap with (MNIST's tfjs MLP, XOR's hand-written RNN), at one
 * learning rate: wall time per step, gradient and optimizer. The delayed and overlapped
 * runs must give the same losses, which the bench checks.
 *
 * Flags: --quick, --out DIR, --only regression,xor,mnist,whitening,overlap (default: all five),
 * --optimizers NAME,… (run only these optimizers of the tasks' grids).
 */
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { parseArgs } from 'node:util'
import { kron, Tensor } from '../index'
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
  whitening: Whitening
}

/** The whitening table's plan: leaf shapes, fits per run, checkpoints, the lr grid, seeds. */
interface Whitening {
  shapes: [number, number][]
  /** The condition number of each `Cᵢ` (so `C` has its square). */
  cond: number
  fits: number
  checkpoints: number[]
  lrs: number[]
  /** The lr every rule is shown at side by side (psgd-jax's default). */
  equalLr: number
  seeds: number[]
}

const RULES = ['EQ', 'PRO', 'QUAD'] as const

const entries = (g: Grid): [OptimizerName, number[]][] => Object.entries(g) as [OptimizerName, number[]][]

/** The same learning rates for each Kron setting (default, auto-scale, PRO, QUAD). */
const kronGrid = (lrs: number[]): Grid => ({ kron: lrs, 'kron-auto': lrs, 'kron-pro': lrs, 'kron-quad': lrs })

const WHITENING: Whitening = {
  shapes: [
    [8, 4],
    [32, 16],
    [64, 64],
  ],
  cond: 10,
  fits: 300,
  checkpoints: [10, 30, 100, 300],
  lrs: [0.03, 0.1, 0.3, 1],
  equalLr: 0.1,
  seeds: [1, 2, 3],
}
const FULL: Plan = {
  seeds: [1, 2],
  regression: {
    steps: 2000,
    cond: 1e4,
    lrs: { adam: [0.3, 1, 3], ...kronGrid([0.003, 0.01, 0.03]), affine: [0.01, 0.03, 0.1] },
  },
  xor: {
    lengths: [20, 30],
    steps: 2000,
    seeds: [1, 2, 3],
    lrs: { adam: [3e-4, 1e-3, 3e-3], ...kronGrid([3e-4, 1e-3, 3e-3]) },
  },
  mnist: {
    epochs: 2,
    train: 6000,
    test: 2000,
    batch: 64,
    lrs: { adam: [3e-3, 1e-2, 3e-2], ...kronGrid([1e-3, 3e-3, 1e-2]), affine: [3e-3, 1e-2, 3e-2] },
  },
  whitening: WHITENING,
}

const QUICK: Plan = {
  seeds: [1, 2],
  regression: { steps: 400, cond: 1e4, lrs: FULL.regression.lrs },
  xor: { lengths: [10], steps: 400, lrs: FULL.xor.lrs },
  mnist: { epochs: 1, train: 2000, test: 1000, batch: 64, lrs: FULL.mnist.lrs },
  whitening: { ...WHITENING, shapes: [[8, 4]], fits: 100, checkpoints: [10, 30, 100] },
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

/** The overlap table's optimizers: the order of the fit, then the same numbers overlapped. */
const OVERLAP: OptimizerName[] = ['kron', 'kron-delayed', 'kron-overlap']

async function overlap(plan: Plan, out: string[]): Promise<void> {
  const rows: string[] = []
  const seed = plan.seeds[0]
  const { train, test } = split(seed, plan.mnist.train, plan.mnist.test)
  const length = plan.xor.lengths[0]
  const tasks: [string, (name: OptimizerName) => Promise<{ losses: number[]; gradMs: number; optMs: number }>][] = [
    [
      `MNIST MLP (tfjs cpu, batch ${plan.mnist.batch})`,
      (name) => trainMnist({ optimizer: name, learningRate: 3e-3, seed, epochs: plan.mnist.epochs, batchSize: plan.mnist.batch, train, test }),
    ],
    // every step runs (no stop once solved), so the three runs take the same steps
    [`XOR RNN, length ${length}`, async (name) => trainXor(length, name, 1e-3, seed, plan.xor.steps, { stopWhenSolved: false })],
  ]
  for (const [task, train1] of tasks) {
    // two rounds, the three optimizers in turn; the second is reported (the first warms
    // up the JIT, the tfjs kernels and the native thread pool)
    for (const round of [1, 2]) {
      const losses = new Map<OptimizerName, number[]>()
      for (const name of OVERLAP) {
        const t0 = performance.now()
        const r = await train1(name)
        process.stderr.write(`overlap ${task} ${LABELS[name]} round ${round}: ${r.losses.length} steps, ${formatDuration(performance.now() - t0)}\n`)
        losses.set(name, r.losses)
        const steps = r.losses.length
        const total = perStep(r.gradMs + r.optMs, steps)
        if (round === 2) rows.push(`| ${task} | ${LABELS[name]} | ${timeCells([r], steps)} | ${total} | ${r.losses[steps - 1].toFixed(4)} |`)
      }
      const [a, b] = [losses.get('kron-delayed')!, losses.get('kron-overlap')!]
      if (a.length !== b.length || a.some((v, i) => v !== b[i]))
        throw new Error(`overlap: ${task}: the overlapped run's losses differ from the delayed order's`)
    }
  }
  out.push(
    `### Overlapped fit (seed ${seed}; Kron at lr 3e-3 on MNIST, 1e-3 on XOR; ${os.cpus().length} CPU cores)
`,
    `The delayed and overlapped runs gave the same losses at every step (checked).
`,
    `| task | optimizer | gradient / step | optimizer / step | total / step | last loss |`,
    `|---|---|---:|---:|---:|---:|`,
    ...rows,
    ``,
  )
}

/** Row-major float64 square matrices (the whitening table's are at most 64×64). */
type Mat = Float64Array

function matmul(a: Mat, b: Mat, n: number, transA = false): Mat {
  const c = new Float64Array(n * n)
  for (let i = 0; i < n; i++)
    for (let k = 0; k < n; k++) {
      const aik = transA ? a[k * n + i] : a[i * n + k]
      if (aik === 0) continue
      for (let j = 0; j < n; j++) c[i * n + j] += aik * b[k * n + j]
    }
  return c
}

/** Standard normal draws (Box-Muller on a 32-bit LCG), reproducible from `seed`. */
function normalStream(seed: number): () => number {
  let s = (seed * 2654435761) >>> 0
  const u = () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0
    return (s + 0.5) / 4294967296
  }
  return () => Math.sqrt(-2 * Math.log(u())) * Math.cos(2 * Math.PI * u())
}

/** `A = U·diag(s)·Uᵀ`: `U` a random rotation (Gram-Schmidt), `s` log-spaced from 1 to √cond, so `C = AAᵀ` has condition number `cond`. */
function covarianceRoot(n: number, cond: number, draw: () => number): Mat {
  const u = new Float64Array(n * n)
  for (let i = 0; i < n; i++) {
    const row = u.subarray(i * n, (i + 1) * n)
    for (let j = 0; j < n; j++) row[j] = draw()
    for (let k = 0; k < i; k++) {
      const prev = u.subarray(k * n, (k + 1) * n)
      let dot = 0
      for (let j = 0; j < n; j++) dot += row[j] * prev[j]
      for (let j = 0; j < n; j++) row[j] -= dot * prev[j]
    }
    let norm = 0
    for (let j = 0; j < n; j++) norm += row[j] * row[j]
    for (let j = 0; j < n; j++) row[j] /= Math.sqrt(norm)
  }
  const a = new Float64Array(n * n)
  for (let k = 0; k < n; k++) {
    const s = n === 1 ? 1 : Math.pow(cond, (0.5 * k) / (n - 1))
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) a[i * n + j] += u[k * n + i] * s * u[k * n + j]
  }
  return a
}

/**
 * The distance of `P·C·P` from `I` for `C = C₁ ⊗ C₂` and `P = P₁ ⊗ P₂`:
 * `‖(P₁C₁P₁) ⊗ (P₂C₂P₂) − I‖_F / √n` (n = d₁·d₂; 0 when white, 1 for `P·C·P = 0`), computed
 * from the two small factors as `√((‖M₁‖²‖M₂‖² − 2·tr M₁·tr M₂ + n)/n)`.
 */
function whiteningDistance(ps: Mat[], cs: Mat[], dims: number[]): number {
  const ms = ps.map((p, i) => matmul(matmul(p, cs[i], dims[i]), p, dims[i]))
  const fro2 = (m: Mat) => m.reduce((a, x) => a + x * x, 0)
  const trace = (m: Mat, n: number) => {
    let t = 0
    for (let i = 0; i < n; i++) t += m[i * n + i]
    return t
  }
  const n = dims[0] * dims[1]
  const d2 = fro2(ms[0]) * fro2(ms[1]) - 2 * trace(ms[0], dims[0]) * trace(ms[1], dims[1]) + n
  return Math.sqrt(Math.max(d2, 0) / n)
}

/** The factors of a saved Kron state with one leaf (`Q.0.0`, `Q.0.1`, float32) as `Pᵢ = QᵢᵀQᵢ`. */
function gramsOfState(bytes: Uint8Array, dims: number[]): Mat[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const headerLen = Number(view.getBigUint64(0, true))
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLen))) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >
  return dims.map((d, i) => {
    const t = header[`Q.0.${i}`]
    if (!t || t.dtype !== 'F32' || t.shape.join() !== `${d},${d}`) throw new Error(`whitening: the state has no dense float32 Q.0.${i} of ${d}×${d}`)
    const start = 8 + headerLen + t.data_offsets[0]
    const q = new Float64Array(d * d)
    for (let k = 0; k < d * d; k++) q[k] = view.getFloat32(start + 4 * k, true)
    return matmul(q, q, d, true)
  })
}

/** The whitening distance after each fit of one run (`fits` long). */
function whiteningRun(shape: [number, number], rule: string, lr: number, seed: number, w: Whitening): number[] {
  const draw = normalStream(1000 * seed + shape[0] + shape[1])
  const roots = shape.map((d) => covarianceRoot(d, w.cond, draw))
  // Cᵢ = AᵢAᵢᵀ (Aᵢ is symmetric)
  const cs = roots.map((a, i) => matmul(a, a, shape[i]))
  const [m, n] = shape
  const opt = kron({ updateRule: rule as 'EQ', preconditionerLr: lr, b1: 0, learningRate: 0, preconditionerUpdateProbability: 1, seed })
  const params = { w: Tensor.fromArray(new Float32Array(m * n), shape) }
  const state = opt.init(params)
  const dists: number[] = []
  for (let t = 0; t < w.fits; t++) {
    // G = A₁·Z·A₂ᵀ has covariance C₁ ⊗ C₂ (row-major vec)
    const z = new Float64Array(m * n).map(() => draw())
    const az = new Float64Array(m * n)
    for (let i = 0; i < m; i++) for (let k = 0; k < m; k++) for (let j = 0; j < n; j++) az[i * n + j] += roots[0][i * m + k] * z[k * n + j]
    const g = new Float32Array(m * n)
    for (let i = 0; i < m; i++)
      for (let j = 0; j < n; j++) {
        let v = 0
        for (let k = 0; k < n; k++) v += az[i * n + k] * roots[1][j * n + k]
        g[i * n + j] = v
      }
    const grads = { w: Tensor.fromArray(g, shape) }
    const [updates] = opt.update(grads, state, params)
    for (const u of Object.values(updates as Record<string, Tensor>)) u.dispose()
    grads.w.dispose()
    dists.push(whiteningDistance(gramsOfState(state.toBytes(), shape), cs, shape))
  }
  state.dispose()
  params.w.dispose()
  return dists
}

function whitening(plan: Plan, out: string[]): void {
  const w = plan.whitening
  const equal: string[] = []
  const bestRows: string[] = []
  const sweep: string[] = []
  // the distance moves from fit to fit with the sampled gradients: each figure is the mean
  // over the seeds and over the last `WINDOW` fits up to that point
  const WINDOW = 10
  const smooth = (curves: number[][]) => curves[0].map((_, i) => mean(curves.flatMap((c) => c.slice(Math.max(0, i + 1 - WINDOW), i + 1))))
  const cells = (curves: number[][]) => {
    const m = smooth(curves)
    const firstBelow = (x: number) => {
      const i = m.findIndex((d) => d < x)
      return i < 0 ? '—' : String(i + 1)
    }
    return `${w.checkpoints.map((k) => m[k - 1].toFixed(3)).join(' | ')} | ${firstBelow(1)} | ${firstBelow(0.5)}`
  }
  for (const shape of w.shapes) {
    for (const rule of RULES) {
      const byLr = new Map<number, number[][]>()
      for (const lr of w.lrs) {
        const bar = new ProgressBar(w.seeds.length, `whitening ${shape.join('×')} ${rule} preconditionerLr ${lr}`)
        const curves = w.seeds.map((seed) => {
          const c = whiteningRun(shape, rule, lr, seed, w)
          bar.tick()
          return c
        })
        bar.finish(`after ${w.fits} fits ${mean(curves.map((c) => c[c.length - 1])).toFixed(3)}`)
        byLr.set(lr, curves)
        sweep.push(`| ${shape.join('×')} | ${rule} | ${lr} | ${mean(curves.map((c) => mean(c))).toFixed(3)} | ${cells(curves)} |`)
      }
      equal.push(`| ${shape.join('×')} | ${rule} | ${cells(byLr.get(w.equalLr)!)} |`)
      const [lr, curves] = best(byLr, (c) => mean(c.map((x) => mean(x))))
      bestRows.push(`| ${shape.join('×')} | ${rule} | ${lr} | ${cells(curves)} |`)
    }
  }
  const head = `${w.checkpoints.map((k) => `after ${k}`).join(' | ')} | first below 1 | first below 0.5`
  const align = `${w.checkpoints.map(() => '---:').join('|')}|---:|---:`
  out.push(
    `### Whitening (gradients of covariance C = C₁ ⊗ C₂, each Cᵢ of condition number ${w.cond}; distance ‖P·C·P − I‖_F/√n, 1 at P = 0 and 0 when white, each figure the mean over seeds ${w.seeds.join(', ')} and the last 10 fits; one fit per step, learningRate 0, b1 0)\n`,
    `At the same preconditionerLr (${w.equalLr}, the default):\n`,
    `| leaf | rule | ${head} |`,
    `|---|---|${align}|`,
    ...equal,
    ``,
    `Each rule at its best preconditionerLr of ${w.lrs.join(', ')} (lowest mean distance over the ${w.fits} fits):\n`,
    `| leaf | rule | best lr | ${head} |`,
    `|---|---|---:|${align}|`,
    ...bestRows,
    ``,
    `Sweep (score: mean distance over the run):\n`,
    `| leaf | rule | lr | score | ${head} |`,
    `|---|---|---:|---:|${align}|`,
    ...sweep,
    ``,
  )
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { quick: { type: 'boolean' }, out: { type: 'string' }, only: { type: 'string' }, optimizers: { type: 'string' } } })
  const base = values.quick ? QUICK : FULL
  const pick = values.optimizers ? new Set(values.optimizers.split(',')) : null
  const keep = (g: Grid): Grid => (pick ? Object.fromEntries(Object.entries(g).filter(([k]) => pick.has(k))) : g)
  const plan: Plan = {
    ...base,
    regression: { ...base.regression, lrs: keep(base.regression.lrs) },
    xor: { ...base.xor, lrs: keep(base.xor.lrs) },
    mnist: { ...base.mnist, lrs: keep(base.mnist.lrs) },
  }
  const dir = values.out ?? path.join(__dirname, '..', 'docs', 'quality')
  const only = new Set((values.only ?? 'regression,xor,mnist,whitening,overlap').split(','))
  await useCpuBackend()
  const t0 = performance.now()
  const out: string[] = []
  const took: string[] = []
  for (const [task, run] of [
    ['regression', () => regression(plan, out, dir)],
    ['xor', () => xor(plan, out, dir)],
    ['mnist', () => mnist(plan, out, dir)],
    ['whitening', () => whitening(plan, out)],
    ['overlap', () => overlap(plan, out)],
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
