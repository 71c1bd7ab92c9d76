/**
 * The native addon (built by `@napi-rs/cli` from `crates/psgd-node`). Its types are the
 * ones napi-rs generates from the binding, checked in as `native.generated.ts` (a test
 * fails when they differ from the build's `native/index.d.ts`), so the TypeScript layer
 * type-checks before the addon is built and never drifts from it.
 */
import * as path from 'node:path'
import * as fs from 'node:fs'
import type * as Generated from './native.generated'

export type NativeTensor = Generated.NativeTensor
export type NativeState = Generated.NativeState
export type NativeProbe = Generated.NativeProbe
export type LeafInfo = Generated.LeafInfo
export type StepInput = Generated.StepInput
export type NativeStepStats = Generated.NativeStepStats

/** A native optimizer of one variant for a fixed list of leaves. */
export type NativeOptimizer = Generated.NativeOptimizer & {
  /**
   * Benchmarks only (an addon built with the `bench` feature, as `npm run bench` does):
   * `n` steps run by a Rust loop, each timed there (seconds).
   */
  timeSteps?(grads: NativeTensor[], state: NativeState, params: NativeTensor[] | null, step: StepInput, n: number, add?: boolean): number[]
}

/** The addon's exports. */
type Binding = Omit<typeof Generated, 'NativeOptimizer'> & {
  NativeOptimizer: new (variant: string, leaves: LeafInfo[], optionsJson: string) => NativeOptimizer
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
