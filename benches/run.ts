/**
 * `npm run bench`: the side-by-side benchmark suite. For every workload and variant of
 * benches/workloads.json it runs, one case after another in this one run:
 *
 * 1. the Rust bench binary (crates/psgd/benches/psgd.rs) in its own process: our step
 *    (update and apply-only), candle-nn AdamW, candle's matmul on the step's products,
 *    state bytes and peak RSS;
 * 2. the same steps through the Node API (this process), for the binding overhead;
 * 3. psgd-jax under jax.jit on the CPU (benches/psgd_jax_bench.py, its own process), when a
 *    reference environment is there or `--jax` asks to make one (benches/setup-reference.sh);
 * 4. with `--torch`: psgd_torch's `KronWhiten` (the same update rule) and heavyball's
 *    `PSGDPRO` on the same trees, torch on the CPU with our thread count
 *    (benches/psgd_torch_bench.py in the venv of benches/setup-torch.sh; psgd_torch's
 *    psgd.py from `--psgd-torch PATH`). `--torch` runs the Kron variants only (kron,
 *    kron-pro, kron-quad) unless `--variant` names one.
 *
 * and prints every figure as a ratio of two timings taken in this run.
 *
 * Flags: --jax, --no-jax, --torch, --psgd-torch PATH, --no-node (skip the Node API case:
 * its Node / Rust columns read —), --workload NAME, --variant NAME, --repeats N,
 * --warmup N, --json FILE (write every record).
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { affine, kron, lra, xmat, Affine, Kron, LRA, XMat, Tensor, type GradientTransformation, type PsgdOptimizer } from '../index'

const root = path.resolve(__dirname, '..')
const workloadsFile = path.join(root, 'benches', 'workloads.json')

interface LeafDef {
  path: string
  shape: number[]
  scanned?: boolean
}
interface Workload {
  name: string
  about: string
  variants: string[]
  leaves: LeafDef[]
  /** Per-workload counts (tiny workloads need more steps for a steady figure). */
  warmup?: number
  repeats?: number
}
interface Spec {
  warmup: number
  repeats: number
  variants: Record<string, Record<string, unknown>>
  workloads: Workload[]
}
interface Timing {
  times_s: number[]
  min: number
  median: number
}
interface Record_ {
  kinds: { update: Timing; apply: Timing }
  [k: string]: unknown
}

function parseArgs(argv: string[]) {
  const a = {
    jax: 'auto' as 'auto' | 'yes' | 'no',
    torch: false,
    node: true,
    psgdTorch: process.env.PSGD_TORCH_PY ?? '',
    workload: '',
    variant: '',
    repeats: 0,
    warmup: -1,
    json: '',
  }
  for (let i = 0; i < argv.length; i++) {
    const next = () => {
      const v = argv[++i]
      if (v === undefined) throw new Error(`bench: ${argv[i - 1]} needs a value`)
      return v
    }
    switch (argv[i]) {
      case '--jax':
        a.jax = 'yes'
        break
      case '--no-jax':
        a.jax = 'no'
        break
      case '--torch':
        a.torch = true
        break
      case '--no-node':
        a.node = false
        break
      case '--psgd-torch':
        a.psgdTorch = next()
        break
      case '--workload':
        a.workload = next()
        break
      case '--variant':
        a.variant = next()
        break
      case '--repeats':
        a.repeats = Number(next())
        break
      case '--warmup':
        a.warmup = Number(next())
        break
      case '--json':
        a.json = next()
        break
      default:
        throw new Error(`bench: unknown flag ${argv[i]}`)
    }
  }
  return a
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((x, y) => x - y)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}
const timing = (xs: number[]): Timing => ({ times_s: xs, min: Math.min(...xs), median: median(xs) })

/** The Rust bench executable, built with the addon's target and profile (one candle build). */
function rustBench(): string {
  const host = /^host: (\S+)$/m.exec(execFileSync('rustc', ['-vV'], { encoding: 'utf8' }))![1]
  const args = ['bench', '--no-run', '--message-format=json', '-p', 'psgd', '--bench', 'psgd', '--target', host]
  const r = spawnSync('cargo', args, { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 28 })
  if (r.status !== 0) throw new Error('bench: cargo bench --no-run failed')
  for (const line of r.stdout.split('\n')) {
    if (!line.startsWith('{')) continue
    const m = JSON.parse(line)
    if (m.reason === 'compiler-artifact' && m.target?.kind?.includes('bench') && m.executable) return m.executable
  }
  throw new Error('bench: no bench executable in cargo output')
}

/** The reference interpreter, or null when psgd-jax is not to be run. */
function referencePython(mode: 'auto' | 'yes' | 'no'): string | null {
  if (mode === 'no') return null
  const venv = process.env.PSGD_BENCH_VENV ?? path.join(root, '.venv-bench')
  const py = path.join(venv, 'bin', 'python')
  if (mode === 'auto') return existsSync(py) ? py : null
  const out = execFileSync('bash', [path.join(root, 'benches', 'setup-reference.sh')], {
    cwd: root,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  return out.trim().split('\n').pop() || py
}

/**
 * The torch interpreter for `--torch` (the venv of benches/setup-torch.sh, or
 * PSGD_TORCH_VENV) and psgd_torch's psgd.py, or a thrown error saying what to run.
 */
function torchReference(psgdTorch: string): { py: string; psgd: string } {
  const venv = process.env.PSGD_TORCH_VENV ?? path.join(root, '.venv-torch')
  const py = path.join(venv, 'bin', 'python')
  if (!existsSync(py)) throw new Error(`bench: --torch needs a venv with torch and heavyball at ${venv} (run benches/setup-torch.sh, or set PSGD_TORCH_VENV)`)
  const psgd = psgdTorch || path.join(venv, 'psgd.py')
  if (!existsSync(psgd)) throw new Error(`bench: --torch needs psgd_torch's psgd.py: --psgd-torch PATH (benches/setup-torch.sh fetches it)`)
  return { py, psgd }
}

/** The update rule a Kron workload variant runs ('EQ' for plain kron), or null for the other variants. */
function kronRule(name: string, entry: Record<string, unknown>): string | null {
  const { variant, options } = baseOf(name, entry)
  if (variant !== 'kron') return null
  return typeof options.update_rule === 'string' ? options.update_rule : 'EQ'
}

/** Every JSON line a bench process prints on stdout. */
function runJson(cmd: string, args: string[]): Record_[] {
  const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 26 })
  if (r.status !== 0) throw new Error(`bench: ${path.basename(cmd)} ${args.join(' ')} failed (exit ${r.status})`)
  return r.stdout
    .trim()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l))
}

/** Deterministic normal draws (Box-Muller on a small LCG): the values do not matter, only the shapes. */
function normals(n: number, std: number, seed: number): Float32Array {
  const out = new Float32Array(n)
  let s = seed >>> 0
  const u = () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0
    return (s + 0.5) / 4294967296
  }
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(u()))
    const t = 2 * Math.PI * u()
    out[i] = r * Math.cos(t) * std
    if (i + 1 < n) out[i + 1] = r * Math.sin(t) * std
  }
  return out
}

const camel = (s: string) => s.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase())
const constructors: Record<string, (o: object) => GradientTransformation> = { kron, xmat, lra, affine }
const classes: Record<string, new (params: Record<string, Tensor>, o: object) => PsgdOptimizer> = {
  kron: Kron,
  xmat: XMat,
  lra: LRA,
  affine: Affine,
}

/**
 * A workload variant's constructor name and options: an entry with a `base` (kron-pro) is
 * that variant with the entry's options (Kron's `update_rule`).
 */
function baseOf(name: string, entry: Record<string, unknown>): { variant: string; options: Record<string, unknown> } {
  const { base, ...options } = entry
  return { variant: typeof base === 'string' ? base : name, options }
}

interface Problem {
  params: Record<string, Tensor>
  grads: Record<string, Tensor>
}

/** A workload's params and grads as Tensors (the steps read them and never change them). */
function problemOf(w: Workload): Problem {
  const params: Record<string, Tensor> = {}
  const grads: Record<string, Tensor> = {}
  w.leaves.forEach((l, i) => {
    const n = l.shape.reduce((a, b) => a * b, 1)
    params[l.path] = Tensor.fromArray(normals(n, 0.02, 2 * i + 1), l.shape)
    grads[l.path] = Tensor.fromArray(normals(n, 1, 2 * i + 2), l.shape)
  })
  return { params, grads }
}

/**
 * The same steps as the Rust bench, through the public Node API, alternating step by step
 * with the same step run by a Rust loop inside this process (`timeSteps`): the binding
 * overhead is their ratio, free of the differences between two processes' allocator and
 * page state (which move a step by 10 to 15 % from one process to the next). Both APIs:
 * the functional `update` (against the Rust step), and, on the apply steps, the in-place
 * class `step` (against the Rust step plus forming `params + updates`, the work it adds).
 */
function nodeCase(w: Workload, problem: Problem, name: string, entry: Record<string, unknown>, warmup: number, repeats: number) {
  const { params, grads } = problem
  const { variant, options } = baseOf(name, entry)
  let prob = 1
  const o: Record<string, unknown> = { preconditionerUpdateProbability: () => prob }
  for (const [k, v] of Object.entries(options)) o[camel(k)] = v
  if (variant === 'kron' && w.leaves.some((l) => l.scanned)) {
    o.scannedLayers = Object.fromEntries(w.leaves.map((l) => [l.path, !!l.scanned]))
  }
  const opt = constructors[variant](o)
  const state = opt.init(params)
  // the class steps its own copy of the params in place
  const own: Record<string, Tensor> = {}
  for (const [k, t] of Object.entries(params)) own[k] = Tensor.fromArray(t.toArray(), t.shape)
  const cls = new classes[variant](own, o)
  const paths = state.layout.paths
  const nativeGrads = paths.map((p) => grads[p].native)
  const nativeParams = paths.map((p) => params[p].native)
  const ownNative = paths.map((p) => own[p].native)
  const learningRate = Number(options.learning_rate ?? 0.001)
  // `withClass`: the class step and its Rust twin run too (the apply phase only: the fit
  // steps are long, and their per-call overhead is the apply step's)
  const steps = (n: number, alternate = true, withClass = true) => {
    const node: number[] = []
    const rust: number[] = []
    const nodeStep: number[] = []
    const rustStep: number[] = []
    for (let i = 0; i < n; i++) {
      let t0 = performance.now()
      const [updates] = opt.update(grads, state, params)
      node.push((performance.now() - t0) / 1e3)
      // as the README asks of a synchronous loop (the leaves are flat: paths are keys)
      for (const u of Object.values(updates as Record<string, Tensor>)) u.dispose()
      if (withClass) {
        t0 = performance.now()
        cls.step(grads)
        nodeStep.push((performance.now() - t0) / 1e3)
      }
      if (!alternate) continue
      const step = { learningRate, updateProbability: prob }
      rust.push(...state.optimizer.timeSteps!(nativeGrads, state.handle, nativeParams, step, 1))
      if (withClass) rustStep.push(...cls.state.optimizer.timeSteps!(nativeGrads, cls.state.handle, ownNative, step, 1, true))
    }
    return { node, rust, nodeStep, rustStep }
  }
  // the order of the Rust bench: update steps (past the forced first updates), then apply;
  // the warm-up steps go through the Node API only
  steps(warmup, false, false)
  const update = steps(repeats, true, false)
  // the class optimizer's forced first fits (XMat, LRA, Affine), outside the apply phase
  for (let i = 0; i < 2; i++) cls.step(grads)
  prob = 0
  steps(warmup, false)
  const apply = steps(repeats)
  for (const t of Object.values(own)) t.dispose()
  return {
    update: timing(update.node),
    apply: timing(apply.node),
    inProcessRust: { update: timing(update.rust), apply: timing(apply.rust) },
    classStep: { apply: timing(apply.nodeStep) },
    inProcessRustAdd: { apply: timing(apply.rustStep) },
  }
}

const fmtMs = (s: number | undefined) => (s === undefined || !Number.isFinite(s) ? '—' : (s * 1e3).toFixed(s < 0.01 ? 3 : 1))
const ratio = (a: number | undefined, b: number | undefined, digits = 2) => (a === undefined || b === undefined || !(b > 0) ? '—' : (a / b).toFixed(digits))
/** A ratio to two significant digits where it is below 0.1 (ours against torch's steps can be 0.003). */
const ratioSig = (a: number | undefined, b: number | undefined) =>
  a === undefined || b === undefined || !(b > 0) ? '—' : a / b < 0.1 ? (a / b).toPrecision(2) : (a / b).toFixed(2)
const mib = (b: unknown) => (typeof b === 'number' ? (b / 1048576).toFixed(1) : '—')

function main() {
  const args = parseArgs(process.argv.slice(2))
  const spec: Spec = JSON.parse(readFileSync(workloadsFile, 'utf8'))
  // the command line, else the workload's own entry, else the file's top level
  const counts = (w: Workload) => ({
    warmup: args.warmup >= 0 ? args.warmup : (w.warmup ?? spec.warmup),
    repeats: args.repeats > 0 ? args.repeats : (w.repeats ?? spec.repeats),
  })
  const bin = rustBench()
  const py = referencePython(args.jax)
  const cpu = os.cpus()
  console.log(
    `machine: ${cpu[0]?.model ?? '?'} × ${cpu.length} threads, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, ${os.platform()} ${os.release()}, node ${process.version}`,
  )
  const torch = args.torch ? torchReference(args.psgdTorch) : null
  const perWorkload = spec.workloads.map((w) => `${w.name} ${counts(w).warmup}/${counts(w).repeats}`).join(', ')
  console.log(`psgd-jax: ${py ? py : 'not run (pass --jax to set up benches/setup-reference.sh)'}; warmup/repeats: ${perWorkload}`)

  const rows: string[] = []
  const torchRows: string[] = []
  const memRows: string[] = []
  const records: unknown[] = []
  const started = Date.now()
  const spent = { rust: 0, node: 0, jax: 0, torch: 0 }
  const timed = <T>(part: keyof typeof spent, f: () => T): T => {
    const t0 = Date.now()
    try {
      return f()
    } finally {
      spent[part] += (Date.now() - t0) / 1000
    }
  }
  for (const w of spec.workloads) {
    if (args.workload && args.workload !== w.name) continue
    const variants = w.variants.filter((v) => (args.variant ? args.variant === v : !args.torch || kronRule(v, spec.variants[v] ?? {}) !== null))
    if (variants.length === 0) continue
    const { warmup, repeats } = counts(w)
    const common = ['--workload', w.name, '--warmup', String(warmup), '--repeats', String(repeats)]
    const problem = timed('node', () => problemOf(w))
    for (const v of variants) {
      const rust = timed('rust', () => runJson(bin, [...common, '--variant', v, '--json'])[0])
      const node = args.node ? timed('node', () => nodeCase(w, problem, v, spec.variants[v] ?? {}, warmup, repeats)) : null
      // one process per case, so that its peak resident memory is its own
      // psgd-jax has only its own variants (not kron-pro, kron-quad)
      const jax =
        py && baseOf(v, spec.variants[v] ?? {}).variant === v
          ? timed('jax', () => runJson(py, [path.join(root, 'benches', 'psgd_jax_bench.py'), ...common, '--variant', v])[0])
          : null
      const rule = kronRule(v, spec.variants[v] ?? {})
      const torchArgs = [path.join(root, 'benches', 'psgd_torch_bench.py'), ...common, '--threads', String(rust.threads ?? os.cpus().length)]
      const psgdTorch =
        torch && rule ? timed('torch', () => runJson(torch.py, [...torchArgs, '--impl', 'psgd-torch', '--rule', rule, '--psgd-torch', torch.psgd])[0]) : null
      // heavyball has PSGDPRO only: beside our PRO
      const heavyball = torch && rule === 'PRO' ? timed('torch', () => runJson(torch.py, [...torchArgs, '--impl', 'heavyball'])[0]) : null
      records.push({ workload: w.name, variant: v, rust, node, jax, psgdTorch, heavyball })
      if (psgdTorch) {
        for (const kind of ['update', 'apply'] as const) {
          const ours = rust.kinds[kind].median
          const pt = psgdTorch.kinds[kind].median
          const hb = heavyball?.kinds[kind].median
          const row = [
            w.name,
            rule,
            kind,
            `${fmtMs(ours)} / ${fmtMs(rust.kinds[kind].min)}`,
            `${fmtMs(pt)} / ${fmtMs(psgdTorch.kinds[kind].min)}`,
            `**${ratioSig(ours, pt)}**`,
            heavyball ? `${fmtMs(hb)} / ${fmtMs(heavyball.kinds[kind].min)}` : '—',
            heavyball ? `**${ratioSig(ours, hb)}**` : '—',
          ]
          torchRows.push(`| ${row.join(' | ')} |`)
          console.log(['torch:', ...row].join('  '))
        }
        for (const [name, r] of [
          ['psgd_torch', psgdTorch],
          ['heavyball', heavyball],
        ] as const) {
          const differs = (r?.structure_differs as string[] | undefined) ?? []
          if (differs.length) console.log(`  ${w.name} ${rule} ${name}: structure differs from ours on ${differs.length} axes: ${differs.join('; ')}`)
        }
      }
      const lim = rust.matmul_limit as Record<string, { seconds: number }>
      const adam = (rust.adamw as Timing).median
      for (const kind of ['update', 'apply'] as const) {
        const ours = rust.kinds[kind].median
        const row = [
          w.name,
          v,
          kind,
          `${fmtMs(ours)} / ${fmtMs(rust.kinds[kind].min)}`,
          jax ? `${fmtMs(jax.kinds[kind].median)} / ${fmtMs(jax.kinds[kind].min)}` : '—',
          jax ? `**${ratio(ours, jax.kinds[kind].median)}**` : '—',
          node ? ratio(node[kind].median, node.inProcessRust[kind].median) : '—',
          node && kind === 'apply' ? ratio(node.classStep.apply.median, node.inProcessRustAdd.apply.median) : '—',
          lim[kind] ? `${((100 * lim[kind].seconds) / ours).toFixed(0)}%` : 'n/a',
          ratio(ours, adam, 1),
        ]
        rows.push(`| ${row.join(' | ')} |`)
        console.log(row.join('  '))
      }
      memRows.push(
        `| ${w.name} | ${v} | ${mib(rust.state_bytes)} | ${jax ? mib(jax.state_bytes) : '—'} | ${mib(rust.peak_rss_bytes)} | ${jax ? mib(jax.peak_rss_bytes) : '—'} | ${((rust.rss_growth_bytes as number) / 1024).toFixed(0)} |`,
      )
    }
    for (const t of [...Object.values(problem.params), ...Object.values(problem.grads)]) t.dispose()
  }
  const secs = (Date.now() - started) / 1000
  console.log(
    `\nsuite: ${secs.toFixed(0)} s (Rust ${spent.rust.toFixed(0)} s, Node ${spent.node.toFixed(0)} s, psgd-jax ${spent.jax.toFixed(0)} s${torch ? `, torch ${spent.torch.toFixed(0)} s` : ''})\n`,
  )
  console.log(
    '| workload | variant | step | ours ms (median / min) | psgd-jax ms (median / min) | ours / psgd-jax | Node / Rust (update) | Node / Rust (class step) | matmul limit / ours | ours / AdamW |',
  )
  console.log('|---|---|---|---|---|---|---|---|---|---|')
  for (const r of rows) console.log(r)
  console.log('\n| workload | variant | state MiB (ours) | state MiB (psgd-jax) | peak RSS MiB (ours) | peak RSS MiB (psgd-jax) | RSS growth KiB (ours) |')
  console.log('|---|---|---|---|---|---|---|')
  for (const r of memRows) console.log(r)
  if (torch) {
    const r0 = records.find((r) => (r as { psgdTorch?: unknown }).psgdTorch) as
      { psgdTorch: Record<string, unknown>; rust: Record<string, unknown> } | undefined
    console.log(
      `\npsgd_torch ${torch.psgd} (KronWhiten, the same rule), heavyball PSGDPRO (eager); torch ${r0?.psgdTorch.torch ?? '?'} on the CPU, ${r0?.psgdTorch.threads ?? '?'} threads; ours ${r0?.rust.threads ?? '?'} threads`,
    )
    console.log(
      '\n| workload | rule | step | ours ms (median / min) | psgd_torch ms (median / min) | ours / psgd_torch | heavyball PSGDPRO ms (median / min) | ours / heavyball |',
    )
    console.log('|---|---|---|---|---|---|---|---|')
    for (const r of torchRows) console.log(r)
  }
  if (args.json) writeFileSync(args.json, JSON.stringify(records, null, 1))
}

main()
