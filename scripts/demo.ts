/**
 * `npm run demo`: minimises a built-in, badly conditioned problem with Kron and with AdamW
 * side by side and prints the loss of both by step.
 *
 * The problem has four parameter tensors of different ranks:
 * - `w` [16, 8] and `b` [8]: least squares `½·mean‖X·w + b − Y‖²` where the columns of
 *   X are scaled from 0.03 to 30 (the Hessian's condition number is about 10⁶);
 * - `k` [4, 5, 6]: `½·Σ aᵢ·bⱼ·cₖ·(k − 1)²` with per-axis scales spanning 10⁴ overall,
 *   a Kronecker-structured curvature;
 * - `r` [6]: the Rosenbrock chain `Σ 100·(rᵢ₊₁ − rᵢ²)² + (1 − rᵢ)²`, a curved valley.
 *
 * Usage: `npm run demo [-- --steps N]`.
 */
import { Kron } from '../index'

type Params = { w: Float32Array; b: Float32Array; k: Float32Array; r: Float32Array }
const SHAPES = { w: [16, 8], b: [8], k: [4, 5, 6], r: [6] } as const
const ROWS = 256

function rng(seed: number) {
  let s = seed >>> 0
  return () => {
    s = (s + 0x6d2b79f5) >>> 0
    let t = s
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return (((t ^ (t >>> 14)) >>> 0) / 4294967296) * 2 - 1
  }
}

/** The fixed data of the problem. */
function makeProblem() {
  const rand = rng(42)
  const [n, m] = SHAPES.w
  const x = new Float32Array(ROWS * n)
  for (let i = 0; i < ROWS; i++) for (let j = 0; j < n; j++) x[i * n + j] = rand() * 10 ** (-1.5 + (3 * j) / (n - 1))
  const wTrue = Float32Array.from({ length: n * m }, rand)
  const bTrue = Float32Array.from({ length: m }, rand)
  const y = new Float32Array(ROWS * m)
  for (let i = 0; i < ROWS; i++)
    for (let c = 0; c < m; c++) {
      let s = bTrue[c]
      for (let j = 0; j < n; j++) s += x[i * n + j] * wTrue[j * m + c]
      y[i * m + c] = s
    }
  const logspace = (len: number, lo: number, hi: number) => Float32Array.from({ length: len }, (_, i) => 10 ** (lo + ((hi - lo) * i) / (len - 1)))
  return { x, y, ka: logspace(4, -2, 0), kb: logspace(5, -1, 0), kc: logspace(6, -1, 1) }
}

type Problem = ReturnType<typeof makeProblem>

/** The loss and its gradient. */
function lossAndGrad(p: Params, d: Problem): { loss: number; grads: Params } {
  const [n, m] = SHAPES.w
  const g: Params = { w: new Float32Array(p.w.length), b: new Float32Array(p.b.length), k: new Float32Array(p.k.length), r: new Float32Array(p.r.length) }
  let loss = 0
  for (let i = 0; i < ROWS; i++)
    for (let c = 0; c < m; c++) {
      let s = p.b[c] - d.y[i * m + c]
      for (let j = 0; j < n; j++) s += d.x[i * n + j] * p.w[j * m + c]
      loss += (0.5 * s * s) / ROWS
      g.b[c] += s / ROWS
      for (let j = 0; j < n; j++) g.w[j * m + c] += (s * d.x[i * n + j]) / ROWS
    }
  const [ka, kb, kc] = SHAPES.k
  for (let i = 0; i < ka; i++)
    for (let j = 0; j < kb; j++)
      for (let l = 0; l < kc; l++) {
        const idx = (i * kb + j) * kc + l
        const scale = d.ka[i] * d.kb[j] * d.kc[l]
        const e = p.k[idx] - 1
        loss += 0.5 * scale * e * e
        g.k[idx] = scale * e
      }
  for (let i = 0; i + 1 < p.r.length; i++) {
    const a = p.r[i + 1] - p.r[i] * p.r[i]
    const bb = 1 - p.r[i]
    loss += 100 * a * a + bb * bb
    g.r[i] += -400 * a * p.r[i] - 2 * bb
    g.r[i + 1] += 200 * a
  }
  return { loss, grads: g }
}

function initParams(): Params {
  const rand = rng(7)
  return {
    w: Float32Array.from({ length: 16 * 8 }, () => 0.1 * rand()),
    b: new Float32Array(8),
    k: Float32Array.from({ length: 4 * 5 * 6 }, () => 0.1 * rand()),
    r: Float32Array.from({ length: 6 }, () => -1 + 0.1 * rand()),
  }
}

const tree = (p: Params) => ({
  w: { data: p.w, shape: [...SHAPES.w] },
  b: { data: p.b, shape: [...SHAPES.b] },
  k: { data: p.k, shape: [...SHAPES.k] },
  r: { data: p.r, shape: [...SHAPES.r] },
})

/** Textbook AdamW (decoupled weight decay 0 here), the familiar baseline. */
class AdamW {
  private m: Float32Array[]
  private v: Float32Array[]
  private t = 0
  constructor(
    private params: Float32Array[],
    private lr: number,
    private b1 = 0.9,
    private b2 = 0.999,
    private eps = 1e-8,
  ) {
    this.m = params.map((p) => new Float32Array(p.length))
    this.v = params.map((p) => new Float32Array(p.length))
  }
  step(grads: Float32Array[]) {
    this.t++
    const c1 = 1 - this.b1 ** this.t
    const c2 = 1 - this.b2 ** this.t
    this.params.forEach((p, i) => {
      const g = grads[i]
      const m = this.m[i]
      const v = this.v[i]
      for (let j = 0; j < p.length; j++) {
        m[j] = this.b1 * m[j] + (1 - this.b1) * g[j]
        v[j] = this.b2 * v[j] + (1 - this.b2) * g[j] * g[j]
        p[j] -= (this.lr * (m[j] / c1)) / (Math.sqrt(v[j] / c2) + this.eps)
      }
    })
  }
}

function bar(done: number, total: number, label: string) {
  if (!process.stderr.isTTY) return
  const width = 30
  const fill = Math.round((done / total) * width)
  process.stderr.write(`\r${label} [${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${done}/${total}`)
  if (done === total) process.stderr.write('\n')
}

function main() {
  const at = process.argv.indexOf('--steps')
  const steps = at > 0 ? Number(process.argv[at + 1]) : 2000
  if (!Number.isInteger(steps) || steps < 1) throw new RangeError(`--steps must be a positive integer, got ${process.argv[at + 1]}`)
  const d = makeProblem()
  const marks = [0, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10000].filter((s) => s <= steps)
  if (marks[marks.length - 1] !== steps) marks.push(steps)

  const run = (name: string, make: (p: Params) => (g: Params) => void) => {
    const p = initParams()
    const step = make(p)
    const losses = new Map<number, number>()
    const t0 = performance.now()
    for (let s = 0; s <= steps; s++) {
      const { loss, grads } = lossAndGrad(p, d)
      if (marks.includes(s)) losses.set(s, loss)
      if (s === steps) break
      step(grads)
      if (s % 20 === 0 || s === steps - 1) bar(s + 1, steps, name.padEnd(5))
    }
    return { losses, ms: performance.now() - t0 }
  }

  console.log('psgd demo: an ill-conditioned problem (w [16,8], b [8], k [4,5,6], r [6]), loss by step\n')
  const kron = run('Kron', (p) => {
    const opt = new Kron(tree(p), { learningRate: 0.01, seed: 0 })
    return (g) => opt.step(tree(g))
  })
  const adam = run('AdamW', (p) => {
    const opt = new AdamW([p.w, p.b, p.k, p.r], 0.01)
    return (g) => opt.step([g.w, g.b, g.k, g.r])
  })
  const fmt = (x: number) => x.toExponential(3).padStart(12)
  console.log(`${'step'.padStart(7)} ${'Kron'.padStart(12)} ${'AdamW'.padStart(12)}`)
  for (const s of marks) console.log(`${String(s).padStart(7)} ${fmt(kron.losses.get(s)!)} ${fmt(adam.losses.get(s)!)}`)
  console.log(`\nboth with learning rate 0.01 and b1 0.9; Kron with psgd-jax's default options otherwise.`)
  console.log(`wall time: Kron ${(kron.ms / 1000).toFixed(2)} s, AdamW ${(adam.ms / 1000).toFixed(2)} s (gradients included)`)
}

main()
