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
  toArray(): Float32Array
  add(other: NativeTensor): NativeTensor
  assign(other: NativeTensor): void
  to(dtype: string, device: string): NativeTensor
}

/** An optimizer state handle; advanced in place by `update`. */
export interface NativeState {
  clone(): NativeState
  readonly count: number
}

/** One leaf as the native optimizer sees it. */
export interface LeafInfo {
  path: string
  shape: number[]
  scanned: boolean
  weightDecay: boolean
}

/** One step's hyperparameters, with the schedules evaluated. */
export interface StepInput {
  learningRate: number
  updateProbability: number
  /** XMat/LRA/Affine: the preconditioner step size this step. */
  precondLr?: number
  /** Hessian mode: whether to update the preconditioner this step. */
  updatePreconditioner?: boolean
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
  /** Benchmarks only: `n` steps run by a Rust loop, each timed there (seconds). */
  /** `update` with the updates added into `params` natively (each param keeps its object). */
  step(grads: NativeTensor[], state: NativeState, params: NativeTensor[], step: StepInput, hvp?: NativeTensor[] | null, vector?: NativeTensor[] | null): void
  timeSteps(grads: NativeTensor[], state: NativeState, params: NativeTensor[] | null, step: StepInput, n: number, add?: boolean): number[]
  stateToBytes(state: NativeState): Buffer
  stateFromBytes(bytes: Uint8Array, device: string): NativeState
  copyState(source: NativeState, target: NativeState): void
}

/** The result of one conformance case. */
export interface ConformanceResult {
  name: string
  maxRelErr: number
  detail: string
  passed: boolean
}

interface Binding {
  NativeTensor: {
    fromArray(data: Float32Array, shape: number[], dtype: string, device: string): NativeTensor
  }
  NativeOptimizer: new (variant: string, leaves: LeafInfo[], optionsJson: string) => NativeOptimizer
  liveTensorBytes(): number
  runConformance(dir: string): ConformanceResult[]
  conformanceTolerance(): number
}

function load(): Binding {
  // from the sources (src/) and from the compiled package (dist/src/)
  for (const up of ['..', path.join('..', '..')]) {
    const file = path.join(__dirname, up, 'native', 'index.js')
    if (fs.existsSync(file)) {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      return require(file) as Binding
    }
  }
  throw new Error("psgd: the native addon is not built. Run 'npm run build:native' (needs Rust and cargo).")
}

/** The loaded addon. */
export const native: Binding = load()

const ERROR_CLASS = /^\[(TypeError|RangeError|Error)\] /

/** Re-throws a native error as the `TypeError`/`RangeError` its message is tagged with. */
export function rethrow(e: unknown, context?: string): never {
  if (e instanceof Error) {
    const m = ERROR_CLASS.exec(e.message)
    if (m) {
      const msg = (context ? `${context}: ` : '') + e.message.slice(m[0].length)
      if (m[1] === 'TypeError') throw new TypeError(msg)
      if (m[1] === 'RangeError') throw new RangeError(msg)
      throw new Error(msg)
    }
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
