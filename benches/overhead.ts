/**
 * `npm run bench:overhead`: where a small model's Node step spends the time that the Rust
 * step does not. For each variant on the `mlp` workload (benches/workloads.json), apply
 * steps only, each figure the median of many calls taken in turn in this one process:
 *
 * - `class step`: `opt.step(grads)` on Tensor params (the in-place class API);
 * - `update`: `transformation.update(grads, state, params)` with its updates disposed;
 * - `Rust step`: the same step in a Rust loop (`timeSteps`, timed in Rust), with the
 *   `params + updates` the class step adds;
 * - `N-API call`: `timeSteps` asked for no steps: converting the arguments (the leaves, the
 *   state, the step's numbers) and returning, which every step pays;
 * - `TS layer`: class step − Rust step − N-API call (flattening and checking the trees,
 *   the schedules, building the step's inputs).
 *
 * Flags: --calls N (timed calls per figure, default 20000).
 */
import { readFileSync } from 'node:fs'
import * as path from 'node:path'
import { Affine, Kron, LRA, XMat, Tensor, type PsgdOptimizer } from '../index'

interface Workload {
  name: string
  leaves: { path: string; shape: number[] }[]
}

const spec = JSON.parse(readFileSync(path.join(__dirname, 'workloads.json'), 'utf8')) as {
  variants: Record<string, Record<string, unknown>>
  workloads: Workload[]
}
const calls = (() => {
  const i = process.argv.indexOf('--calls')
  const n = i >= 0 ? Number(process.argv[i + 1]) : 20000
  if (!(n > 0)) throw new Error('overhead: --calls needs a positive number')
  return n
})()
const mlp = spec.workloads.find((w) => w.name === 'mlp')
if (!mlp) throw new Error('overhead: benches/workloads.json has no mlp workload')

const camel = (s: string) => s.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase())
const classes: Record<string, new (params: Record<string, Tensor>, o: object) => PsgdOptimizer> = {
  kron: Kron,
  xmat: XMat,
  lra: LRA,
  affine: Affine,
}

function tree(seed: number, scale: number): Record<string, Tensor> {
  const out: Record<string, Tensor> = {}
  for (const l of mlp!.leaves) {
    const n = l.shape.reduce((a, b) => a * b, 1)
    out[l.path] = Tensor.fromArray(
      Float32Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898 + seed * 78.233) * scale),
      l.shape,
    )
  }
  return out
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[s.length >> 1]
}

/** Median µs of `f` over `calls` calls, in batches of 100 (one clock read per batch). */
function micros(f: () => void): number {
  for (let i = 0; i < Math.min(calls, 2000); i++) f()
  const batches: number[] = []
  for (let b = 0; b < calls / 100; b++) {
    const t0 = process.hrtime.bigint()
    for (let i = 0; i < 100; i++) f()
    batches.push(Number(process.hrtime.bigint() - t0) / 100 / 1e3)
  }
  return median(batches)
}

console.log(`mlp (${mlp.leaves.length} leaves), apply steps, median µs of ${calls} calls each\n`)
console.log('| variant | class step | update | Rust step | N-API call | TS layer | class step / Rust step |')
console.log('|---|---|---|---|---|---|---|')
for (const [variant, Cls] of Object.entries(classes)) {
  let prob = 1
  const o: Record<string, unknown> = { preconditionerUpdateProbability: () => prob }
  for (const [k, v] of Object.entries(spec.variants[variant] ?? {})) o[camel(k)] = v
  const params = tree(1, 0.02)
  const grads = tree(2, 1)
  const opt = new Cls(params, o)
  // past the forced first fits, then apply-only
  for (let i = 0; i < 3; i++) opt.step(grads)
  prob = 0
  const state = opt.state
  const paths = state.layout.paths
  const ng = paths.map((p) => grads[p].native)
  const np = paths.map((p) => params[p].native)
  const step = { learningRate: Number(spec.variants[variant]?.learning_rate ?? 0.001), updateProbability: 0 }
  const fn = opt.transformation
  const classStep = micros(() => opt.step(grads))
  const update = micros(() => {
    const [u] = fn.update(grads, state, params)
    for (const t of Object.values(u as Record<string, Tensor>)) t.dispose()
  })
  const inner = state.optimizer.timeSteps!(ng, state.handle, np, step, calls, true)
  const rust = median(inner) * 1e6
  const napi = micros(() => state.optimizer.timeSteps!(ng, state.handle, np, step, 0, true))
  const ts = classStep - rust - napi
  const f = (x: number) => x.toFixed(1)
  console.log(`| ${variant} | ${f(classStep)} | ${f(update)} | ${f(rust)} | ${f(napi)} | ${f(ts)} | ${(classStep / rust).toFixed(2)} |`)
}
