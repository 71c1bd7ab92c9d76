/**
 * The native addon (built by `@napi-rs/cli` from `crates/psgd-node`), typed by hand so the
 * TypeScript layer type-checks before the addon is built.
 */
import * as path from 'node:path'
import * as fs from 'node:fs'

/** A tensor in native memory (candle), CPU or GPU. */
export interface NativeTensor {
  readonly shape: number[]
  readonly dtype: string
  readonly device: string
  readonly disposed: boolean
  dispose(): void
  /** Copies the values (as float32) into `out`, which has the element count. */
  copyTo(out: Float32Array): void
  add(other: NativeTensor): NativeTensor
  assign(other: NativeTensor): void
  to(dtype: string, device: string): NativeTensor
}

/** An optimizer state handle; advanced in place by `update`. */
export interface NativeState {
  clone(): NativeState
  readonly count: number
  /** Sets the step count (a state continuing another count; see the TensorFlow.js adapter). */
  setCount(count: number): void
  dispose(): void
  readonly disposed: boolean
}

/** One leaf as the native optimizer sees it. */
export interface LeafInfo {
  path: string
  shape: number[]
  scanned: boolean
  weightDecay: boolean
}

/**
 * One step's hyperparameters that come from schedules given as JS functions (their values
 * at this step); what is absent the native core takes from the options.
 */
export interface StepInput {
  learningRate?: number
  updateProbability?: number
  /** XMat/LRA/Affine: the preconditioner step size this step. */
  precondLr?: number
  /** Hessian mode: whether to update the preconditioner this step. */
  updatePreconditioner?: boolean
}

/** The draws of one Hessian-mode step (see `hessianHelper`), held natively. */
export interface NativeProbe {
  readonly updatePreconditioner: boolean
  vector(): NativeTensor[]
  /** `[params + δ·v, params − δ·v]`. */
  points(): NativeTensor[][]
  /** `[hvp, vector]` from the gradients at the two points. */
  difference(gradsPlus: NativeTensor[], gradsMinus: NativeTensor[]): NativeTensor[][]
}

/** A native optimizer of one variant for a fixed list of leaves. */
export interface NativeOptimizer {
  init(params: NativeTensor[]): NativeState
  update(
    grads: NativeTensor[],
    state: NativeState,
    params: NativeTensor[] | null,
    step: StepInput,
    hvp?: NativeTensor[] | null,
    vector?: NativeTensor[] | null,
  ): NativeTensor[]
  updateAsync(
    grads: NativeTensor[],
    state: NativeState,
    params: NativeTensor[] | null,
    step: StepInput,
    hvp?: NativeTensor[] | null,
    vector?: NativeTensor[] | null,
  ): Promise<NativeTensor[]>
  /** `update` with the updates added into `params` natively (each param keeps its object). */
  step(grads: NativeTensor[], state: NativeState, params: NativeTensor[], step: StepInput, hvp?: NativeTensor[] | null, vector?: NativeTensor[] | null): void
  /**
   * Benchmarks only (an addon built with the `bench` feature, as `npm run bench` does):
   * `n` steps run by a Rust loop, each timed there (seconds).
   */
  timeSteps?(grads: NativeTensor[], state: NativeState, params: NativeTensor[] | null, step: StepInput, n: number, add?: boolean): number[]
  /** The state as safetensors bytes, in memory V8 allocates (and counts). */
  stateToBytes(state: NativeState): Uint8Array
  stateFromBytes(bytes: Uint8Array, device: string): NativeState
  copyState(source: NativeState, target: NativeState): void
}

interface Binding {
  NativeTensor: {
    fromArray(data: Float32Array, shape: number[], dtype: string, device: string): NativeTensor
  }
  NativeOptimizer: new (variant: string, leaves: LeafInfo[], optionsJson: string) => NativeOptimizer
  liveTensorBytes(): number
  /** Checks a variant's options (camelCase JSON) as the optimizer will read them. */
  checkOptions(variant: string, optionsJson: string): void
  /** psgd-jax's update-probability schedule at 1-based step `n`. */
  precondUpdateProb(schedule: { maxProb?: number; minProb?: number; decay?: number; flatStart?: number }, n: number): number
  /**
   * A state for a new set of leaves: `fresh` (its `init` state, as bytes) with each picked
   * leaf's per-leaf tensors (momentum; Kron's and Affine's factors) from a leaf of one of
   * `sources`, the tensors spanning all leaves from `sources[spanning]` when given (else
   * `fresh`'s), and the step count `count`; as bytes for `loadBytes`.
   */
  regroupState(
    fresh: Uint8Array,
    sources: Uint8Array[],
    picks: { leaf: number; source: number; sourceLeaf: number }[],
    spanning: number | null,
    count: number,
  ): Buffer
  /** Draws a Hessian-mode step's decision and probe for `params`. */
  hessianProbe(params: NativeTensor[], seed: number, step: number, updateProbability: number): NativeProbe
}

/** This process's platform as the napi-rs package names spell it, e.g. `linux-x64-gnu`. */
function platformName(): string {
  const base = `${process.platform}-${process.arch}`
  if (process.platform === 'win32') return `${base}-msvc`
  if (process.platform !== 'linux') return base
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined
  return `${base}-${report?.header?.glibcVersionRuntime ? 'gnu' : 'musl'}`
}

/** The platforms with a prebuilt package, from the published package.json (none in a clone). */
function prebuiltPlatforms(root: string): string[] {
  try {
    const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { name: string; optionalDependencies?: Record<string, string> }
    return Object.keys(pkg.optionalDependencies ?? {}).map((name) => name.slice(pkg.name.length + 1))
  } catch {
    return []
  }
}

/** Whether `name` resolves from the package's directory. */
function resolves(name: string, root: string): boolean {
  try {
    require.resolve(name, { paths: [root] })
    return true
  } catch {
    return false
  }
}

function load(): Binding {
  // from the sources (src/) and from the compiled package (dist/src/)
  for (const up of ['..', path.join('..', '..')]) {
    const root = path.join(__dirname, up)
    const file = path.join(root, 'native', 'index.js')
    if (!fs.existsSync(file)) continue
    try {
      // napi-rs's generated loader: a `.node` built here (native/), else the platform package
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      return require(file) as Binding
    } catch (e) {
      // The loader's own message blames npm's optional-dependency bug, which is rarely the
      // cause here: most often no package was published for this platform. Say which
      // platform it is and how to get an addon for it; the loader's attempts stay in `cause`.
      const platform = platformName()
      const prebuilt = prebuiltPlatforms(root)
      let why: string
      if (!prebuilt.includes(platform)) {
        why = prebuilt.length > 0 ? `There is no prebuilt addon for it (only for ${prebuilt.join(', ')}).` : 'No addon was built here.'
      } else if (resolves(`psgd-${platform}`, root)) {
        const first = (e as { cause?: { message?: string } }).cause?.message
        why = `Its prebuilt package psgd-${platform} is installed but did not load${first ? `: ${first}` : '.'}`
      } else {
        why = `Its prebuilt package psgd-${platform} is not installed: install again without --omit=optional (or --no-optional).`
      }
      throw new Error(
        `psgd: no native addon loads on this platform (${platform}, Node ${process.version}). ${why} ` +
          'To build one from source (needs Rust): clone the repository, run `npm ci && npm run build` there, ' +
          'then install that directory (`npm install <path to the clone>`).',
        { cause: e },
      )
    }
  }
  throw new Error("psgd: the native addon is not built. Run 'npm run build:native' (needs Rust and cargo).")
}

/** The loaded addon. */
export const native: Binding = load()

/**
 * Re-throws an error from the native core (already a `TypeError`, `RangeError` or `Error`,
 * by the core's error kind) with `context` (the optimizer's name) before its message.
 */
export function rethrow(e: unknown, context?: string): never {
  if (context && e instanceof Error) {
    const Cls = e instanceof TypeError ? TypeError : e instanceof RangeError ? RangeError : Error
    throw new Cls(`${context}: ${e.message}`)
  }
  throw e
}

/** Calls `f`, converting native errors. */
export function call<T>(f: () => T, context?: string): T {
  try {
    return f()
  } catch (e) {
    rethrow(e, context)
  }
}
