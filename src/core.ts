/**
 * The machinery every variant shares: options split between JS and the native core,
 * pytree ↔ native conversion, schedule functions, the optax-style `init`/`update` pair
 * and the in-place optimizer class. A variant is just a {@link VariantSpec} (its name);
 * no variant has code of its own here.
 */
import { call, native, rethrow, type LeafInfo, type NativeOptimizer, type NativeState, type NativeTensor, type StepInput } from './native'
import type { Schedule } from './schedule'
import { checkShape, readValues, Tensor } from './tensor'
import { DivergenceWatch, divergenceAdvice, sumSquares, type WarningHook } from './guard'
import {
  dataProblem,
  flatten,
  isLeaf,
  leavesLike,
  resolveMask,
  structureMismatch,
  unflatten,
  type ArrayLeaf,
  type Flat,
  type Leaf,
  type Mask,
  type PyTree,
  type TreeDef,
} from './tree'
import { preview, showPath, showShape } from './describe'
import { optionKinds, suggestOption, takesHessian, type OptionKind, type VariantName } from './options'
import type { KronNativeOptions } from './options.generated'
import { readStats, type PsgdStats } from './stats'

/** Options every variant has (declared in Rust; see `options.generated.ts`). */
export type BaseOptions = Pick<
  KronNativeOptions,
  'learningRate' | 'b1' | 'weightDecay' | 'preconditionerUpdateProbability' | 'seed' | 'gradClip' | 'allowNonFinite'
>

/**
 * What a variant is to the TypeScript layer: its name. Its options, their defaults and
 * checks, and whether it takes Hessian-vector products come from the Rust declarations.
 */
export interface VariantSpec {
  /** The variant (`kron`), also the factory's name in error messages. */
  name: VariantName
}

/** Options after checking: the native JSON and the TypeScript-side schedules and masks. */
interface Resolved {
  json: string
  /** Schedules given as functions (evaluated here each step); numbers went to `json`. */
  learningRate: Schedule | null
  updateProbability: Schedule | null
  precondLr: Schedule | null
  weightDecayMask: Mask
  scannedLayers: Mask
  /** The `onWarning` hook: undefined is the default, null silences. */
  onWarning: WarningHook | null | undefined
}

function maskOption(owner: string, name: string, v: unknown): Mask {
  if (v === undefined || v === null || typeof v === 'function' || typeof v === 'boolean' || typeof v === 'object') {
    return v as Mask
  }
  throw new TypeError(`${owner}: option '${name}' must be a tree of booleans or a function (path, leaf) => boolean, got ${preview(v)}`)
}

/** The TypeError for an unknown option, with the name it most likely means. */
function unknownOption(spec: VariantSpec, name: string): TypeError {
  const hint = suggestOption(spec.name, name)
  const fix = hint === null ? `; see the options of ${spec.name}` : ` (did you mean '${hint}'?)`
  return new TypeError(`${spec.name}: unknown option '${showPath(name)}'${fix}`)
}

/**
 * Splits the options into what only JavaScript can hold (masks, schedule functions) and
 * the JSON the native core reads, and has the core check the JSON now (not at the first
 * step). The names, kinds, defaults and ranges are the Rust declarations'.
 */
function resolveOptions(spec: VariantSpec, options: object | undefined): Resolved {
  if (options !== undefined && (options === null || typeof options !== 'object' || Array.isArray(options))) {
    throw new TypeError(`${spec.name}: options must be an object, got ${preview(options)}`)
  }
  if (options instanceof Map) throw new TypeError(`${spec.name}: options must be a plain object, got ${preview(options)}: use Object.fromEntries(map)`)
  const kinds = optionKinds(spec.name)
  const json: Record<string, unknown> = {}
  const fns: Record<string, Schedule> = {}
  const masks: Record<string, Mask> = {}
  const hooks: Record<string, WarningHook | null> = {}
  for (const [k, v] of Object.entries(options ?? {})) {
    if (v === undefined) continue
    const kind = kinds[k] as OptionKind
    if (!Object.prototype.hasOwnProperty.call(kinds, k)) throw unknownOption(spec, k)
    if (kind === 'mask') masks[k] = maskOption(spec.name, k, v)
    else if (kind === 'hook') hooks[k] = hookOption(spec.name, k, v)
    else if (kind === 'schedule' && typeof v === 'function') fns[k] = v as Schedule
    else if (typeof v === 'number' && !Number.isFinite(v)) {
      // JSON has no NaN or Infinity to carry it to the core's own check
      throw new RangeError(`${spec.name}: option '${k}' must be finite, got ${preview(v)}`)
    } else if (typeof v === 'function' || typeof v === 'symbol' || typeof v === 'bigint') {
      throw new TypeError(`${spec.name}: option '${k}' must be a plain value, got a ${typeof v}`)
    } else json[k] = v
  }
  const text = JSON.stringify(json)
  call(() => native.checkOptions(spec.name, text), spec.name)
  return {
    json: text,
    learningRate: fns.learningRate ?? null,
    updateProbability: fns.preconditionerUpdateProbability ?? null,
    precondLr: fns.precondLr ?? null,
    weightDecayMask: masks.weightDecayMask ?? masks.mask,
    scannedLayers: masks.scannedLayers,
    onWarning: hooks.onWarning,
  }
}

function hookOption(owner: string, name: string, v: unknown): WarningHook | null {
  if (v === null || typeof v === 'function') return v as WarningHook | null
  throw new TypeError(`${owner}: option '${name}' must be a function (warning) => void or null, got ${preview(v)}`)
}

/** The params' global L2 norm (float64), reading each leaf once. */
function paramsNorm(leaves: readonly Leaf[]): number {
  let s = 0
  for (const l of leaves) {
    if (typeof l === 'number') s += l * l
    else if (l instanceof Tensor) s += sumSquares(l.toArray())
    else s += sumSquares(l.data)
  }
  return Math.sqrt(s)
}

/** Re-throws a native error with the optimizer's name. */
function nativeFailure(spec: VariantSpec, e: unknown): never {
  rethrow(e, spec.name)
}

/** A schedule's value, which must be a number (the core checks its range). */
function scheduleValue(spec: VariantSpec, name: string, f: Schedule, step: number): number {
  const v = f(step)
  if (typeof v !== 'number') {
    throw new TypeError(`${spec.name}: option '${name}' must return a number, got ${preview(v)} (schedule at step ${step})`)
  }
  return v
}

/** Everything the state needs to know about the tree it was made for. */
interface Layout {
  paths: string[]
  shapes: number[][]
  devices: string[]
  treedef: TreeDef
}

/** A leaf's shape (a Tensor's cached one, not a copy: read it, do not keep or modify it). */
function shapeOf(leaf: Leaf): readonly number[] {
  return typeof leaf === 'number' ? [] : leaf instanceof Tensor ? leaf.shapeView() : leaf.shape
}

/** Whether two shapes (or two path lists) are equal, item by item. */
function sameItems<T>(a: readonly T[], b: readonly T[]): boolean {
  if (a.length !== b.length) return false
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false
  return true
}

/** Throws if `leaf` is a disposed Tensor, naming it. */
function checkLive(leaf: Leaf, what: string, path: string): void {
  if (leaf instanceof Tensor && leaf.disposed) throw disposedError(what, path)
}

function disposedError(what: string, path: string): TypeError {
  return new TypeError(`${what} '${path}': the tensor was disposed`)
}

/**
 * Converts one leaf to a native tensor on `device`, checking what JS can check. A Tensor is
 * checked only for a `dispose` on itself (no N-API call); a native handle disposed some
 * other way makes the native step fail, and {@link checkLiveAll} then names the leaf.
 * A native tensor made here from a plain leaf is pushed to `temps`: nobody else holds it,
 * so the caller frees it when its call ends (see {@link disposeAll}).
 */
function toNative(leaf: Leaf, path: string, what: string, device: string, temps: NativeTensor[]): NativeTensor {
  if (leaf instanceof Tensor) {
    if (leaf.disposedHere) throw disposedError(what, path)
    return leaf.native
  }
  const t = plainToNative(leaf, path, what, device)
  temps.push(t)
  return t
}

/**
 * Frees native tensors made for one call at once: left to the garbage collector, each
 * step on `{ data, shape }` leaves would add its copies to the heap until the next
 * collection, and RSS would follow the collector's pace instead of staying flat.
 */
function disposeAll(temps: NativeTensor[]): void {
  for (const t of temps) t.dispose()
  temps.length = 0
}

function plainToNative(leaf: number | ArrayLeaf, path: string, what: string, device: string): NativeTensor {
  if (typeof leaf === 'number') {
    return call(() => native.NativeTensor.fromArray(Float32Array.of(leaf), [], 'float32', device), `${what} '${path}'`)
  }
  const { data, shape } = leaf as ArrayLeaf
  const problem = dataProblem(data)
  if (problem !== null) throw new TypeError(`${what} '${showPath(path)}': ${problem}`)
  checkShape(shape, `${what} '${showPath(path)}'`)
  const n = shape.reduce((a, b) => a * b, 1)
  if (data.length !== n) {
    // a buffer transferred by postMessage is left detached, with no bytes
    const detached = data.buffer.byteLength === 0 && n > 0 ? ' (its buffer is detached: was it transferred by postMessage?)' : ''
    throw new RangeError(`${what} '${showPath(path)}' has ${data.length} values${detached}, its shape ${showShape(shape)} needs ${n}`)
  }
  return call(() => native.NativeTensor.fromArray(data, [...shape], 'float32', device), `${what} '${path}'`)
}

/** Flattens `tree` and checks it has exactly the leaves (paths and shapes) of `layout`. */
function flattenLike(tree: unknown, layout: Layout, what: string, temps: NativeTensor[]) {
  const same = leavesLike<Leaf>(tree, layout.treedef)
  const flat: Flat<Leaf> = same ? { leaves: same, paths: layout.paths, treedef: layout.treedef, set: [] } : flatten<Leaf>(tree, isLeaf, what)
  if (!sameItems(flat.paths, layout.paths)) {
    const bad = structureMismatch(layout.paths, flat.paths)
    if (bad) throw new RangeError(`${what}: ${bad}`)
    const at = flat.paths.findIndex((p, i) => p !== layout.paths[i])
    throw new RangeError(`${what}: leaf '${flat.paths[at]}' is not where the params have it (leaf order differs)`)
  }
  const nativeLeaves: NativeTensor[] = []
  for (let i = 0; i < flat.leaves.length; i++) {
    const leaf = flat.leaves[i]
    const got = shapeOf(leaf)
    if (!sameItems(got, layout.shapes[i])) {
      throw new RangeError(`${what} '${showPath(flat.paths[i])}' has shape ${showShape(got)}, expected ${showShape(layout.shapes[i])}`)
    }
    nativeLeaves.push(toNative(leaf, flat.paths[i], what, layout.devices[i], temps))
  }
  return { flat, nativeLeaves }
}

/** Throws a TypeError naming the first disposed Tensor among the flattened inputs, if any. */
function checkLiveAll(inputs: [string, { leaves: Leaf[]; paths: string[] } | null][]): void {
  for (const [what, flat] of inputs) flat?.leaves.forEach((leaf, i) => checkLive(leaf, what, flat.paths[i]))
}

/** Checks and converts the Hessian-mode inputs of `update`; null when whitening. */
function hessianInputs(spec: VariantSpec, extra: UpdateExtra | undefined, layout: Layout, temps: NativeTensor[]) {
  if (extra === undefined || extra === null) return null
  if (typeof extra !== 'object') throw new TypeError(`${spec.name}.update: extra must be { hvp, vector, updatePreconditioner }`)
  const known = ['hvp', 'vector', 'updatePreconditioner']
  // a hessianHelper result may be passed whole: its loss and grads are not inputs here
  const unknown = Object.keys(extra).find((k) => !known.includes(k) && k !== 'loss' && k !== 'grads')
  if (unknown !== undefined) throw new TypeError(`${spec.name}.update: unknown extra input '${unknown}' (expected hvp, vector, updatePreconditioner)`)
  const given = known.filter((k) => (extra as Record<string, unknown>)[k] !== undefined)
  if (given.length === 0) return null
  if (!takesHessian(spec.name)) {
    throw new TypeError(`${spec.name}.update: ${spec.name} fits its preconditioner by gradient whitening only; it takes no hvp/vector/updatePreconditioner`)
  }
  if (given.length !== 3) {
    const missing = known.filter((k) => !given.includes(k))
    throw new TypeError(`${spec.name}.update: the Hessian mode needs hvp, vector and updatePreconditioner together; missing ${missing.join(', ')}`)
  }
  if (typeof extra.updatePreconditioner !== 'boolean') {
    throw new TypeError(`${spec.name}.update: updatePreconditioner must be a boolean, got ${preview(extra.updatePreconditioner)}`)
  }
  const hvp = flattenLike(extra.hvp, layout, 'hvp', temps)
  const vector = flattenLike(extra.vector, layout, 'vector', temps)
  return {
    hvp: hvp.nativeLeaves,
    vector: vector.nativeLeaves,
    flats: { hvp: hvp.flat, vector: vector.flat },
    updatePreconditioner: extra.updatePreconditioner,
  }
}

/** Builds an updates leaf of the same kind as the grads leaf it answers. */
function fromNative(t: NativeTensor, like: Leaf): Leaf {
  if (like instanceof Tensor) return new Tensor(t, like.shapeView())
  const data = readValues(t, shapeOf(like))
  // copied out: the native tensor is nobody's now (see disposeAll)
  t.dispose()
  if (typeof like === 'number') return data[0]
  return { data, shape: [...like.shape] }
}

/**
 * An optimizer state: an opaque handle to state in native memory (on the params' device),
 * advanced in place by `update`.
 */
export class OptimizerState {
  /** @internal */
  readonly handle: NativeState
  /** @internal */
  readonly optimizer: NativeOptimizer
  /** @internal */
  readonly layout: Layout
  /** @internal */
  readonly owner: string
  /** @internal The options (as the native core reads them) of the optimizer that made it. */
  readonly config: string
  /** @internal Whether an async step on this state is in flight (see {@link OptimizerState.idle}). */
  pending = false
  // set by `dispose`, so that every use checks it without an N-API call
  private disposeCalled = false

  /** @internal States are made by an optimizer's `init`. */
  constructor(handle: NativeState, optimizer: NativeOptimizer, layout: Layout, owner: string, config: string) {
    this.handle = handle
    this.optimizer = optimizer
    this.layout = layout
    this.owner = owner
    this.config = config
  }

  /**
   * @internal Throws while an async step on this state is in flight: one step at a time per
   * state, so every step sees the count and the state the one before it left (a second
   * step would read stale schedules; a save would see a state the params do not have yet).
   */
  idle(what: string): void {
    if (this.disposeCalled) throw new TypeError(`${this.owner}: ${what}: the state was disposed`)
    if (this.pending) {
      throw new Error(`${this.owner}: ${what}: an updateAsync/stepAsync on this state is still running; await it first`)
    }
  }

  /** Steps taken so far. While an async step runs, the count before it (read without waiting for it). */
  get count(): number {
    if (this.disposeCalled) throw new TypeError(`${this.owner}: count: the state was disposed`)
    return this.handle.count
  }

  /** Whether {@link OptimizerState.dispose} was called. */
  get disposed(): boolean {
    return this.disposeCalled
  }

  /**
   * Frees the state's native tensors (momentum and preconditioner factors) now, instead of
   * when the garbage collector gets to this object (V8 does not see their size). Any later
   * use of the state throws a `TypeError`. Idempotent.
   * @throws Error while an `updateAsync`/`stepAsync` on this state is in flight (await it first).
   */
  dispose(): void {
    if (this.pending) {
      throw new Error(`${this.owner}: dispose: an updateAsync/stepAsync on this state is still running; await it first`)
    }
    this.disposeCalled = true
    this.handle.dispose()
  }

  /** The leaf paths this state was made for, in order. */
  get paths(): string[] {
    return [...this.layout.paths]
  }

  /**
   * What the last step did and how the preconditioner stands, per leaf and factor (see
   * {@link PsgdStats}). Costs nothing until called: the step keeps its measurements with
   * the state, and they are read back here. Before the first step (and right after
   * {@link OptimizerState.loadBytes}) the step's values are `null`, `fitted` is false and
   * `fits` 0; the factors are read from the state either way.
   * @throws TypeError when the state was disposed; Error while an async step on it runs.
   */
  stats(): PsgdStats {
    this.idle('stats')
    return readStats(this.optimizer, this.handle, this.owner)
  }

  /** An independent copy: stepping one does not change the other. */
  clone(): OptimizerState {
    this.idle('clone')
    return new OptimizerState(this.handle.clone(), this.optimizer, this.layout, this.owner, this.config)
  }

  /** The state as safetensors bytes (factors, momentum, counters; metadata names the leaves). */
  toBytes(): Uint8Array {
    this.idle('toBytes')
    return call(() => this.optimizer.stateToBytes(this.handle), this.owner)
  }

  /**
   * Replaces this state's contents with a state saved by {@link OptimizerState.toBytes}, all
   * or nothing.
   * @throws RangeError when the bytes are not such a state for these leaves and options: a
   * wrong format version or checksum, a tensor of another dtype or shape, NaN/Inf, an
   * all-zero factor, counters out of range, a tensor this optimizer does not keep.
   */
  loadBytes(bytes: Uint8Array): void {
    if (!(bytes instanceof Uint8Array)) throw new TypeError(`${this.owner}: state bytes must be a Uint8Array`)
    this.idle('loadBytes')
    const device = this.layout.devices[0] ?? 'cpu'
    call(() => {
      const loaded = this.optimizer.stateFromBytes(bytes, device)
      try {
        this.optimizer.copyState(loaded, this.handle)
      } finally {
        // its tensors are this state's now; the wrapper goes at once, not at a collection
        loaded.dispose()
      }
    }, `${this.owner}: loading state`)
  }
}

/**
 * The telemetry of an optax-style state (the functional form of
 * {@link OptimizerState.stats}).
 */
export function stats(state: OptimizerState): PsgdStats {
  if (!(state instanceof OptimizerState)) throw new TypeError("stats: state must come from an optimizer's init")
  return state.stats()
}

/**
 * Extra inputs of `update` for the Hessian-based mode of every variant (Kron, XMat, LRA and
 * Affine; all three together). A {@link hessianHelper} result can be passed as it is.
 */
export interface UpdateExtra {
  /** Hessian-vector product `H·vector` (a tree like the params). */
  hvp?: PyTree
  /** The probe vector the `hvp` was taken with. */
  vector?: PyTree
  /** Whether to update the preconditioner this step (Hessian mode). */
  updatePreconditioner?: boolean
}

/** An optax-style optimizer: a pair of functions over pytrees and an opaque state. */
export interface GradientTransformation {
  /** The initial state for `params` (only their structure, shapes and devices are used). */
  init(params: PyTree): OptimizerState
  /**
   * One step. Returns the updates (to add to the params, e.g. with `applyUpdates`), with
   * the same leaf kinds as `grads`, and the state, advanced in place. On error nothing
   * changes: a `TypeError`/`RangeError` names the bad leaf or option; a state made by this
   * variant with other options is a `TypeError`; updates that would hold NaN or Inf are a
   * `RangeError` naming the leaf (unless `allowNonFinite`).
   */
  update(grads: PyTree, state: OptimizerState, params?: PyTree | null, extra?: UpdateExtra): [PyTree, OptimizerState]
  /**
   * {@link GradientTransformation.update} with the work done off the JS main thread. One
   * step at a time per state: until it settles, another step, `toBytes`, `loadBytes` or
   * `clone` on the same state throws an `Error`, and the Tensors it reads cannot be disposed.
   */
  updateAsync(grads: PyTree, state: OptimizerState, params?: PyTree | null, extra?: UpdateExtra): Promise<[PyTree, OptimizerState]>
}

/** The inputs of one native step, fully checked. */
interface Prepared {
  flat: ReturnType<typeof flattenLike>['flat']
  /** The flattened params, when given. */
  paramsFlat: ReturnType<typeof flattenLike>['flat'] | null
  grads: NativeTensor[]
  params: NativeTensor[] | null
  step: StepInput
  hvp: NativeTensor[] | null
  vector: NativeTensor[] | null
  /** Every flattened input, by name, to find a disposed leaf after a native failure. */
  inputs: [string, { leaves: Leaf[]; paths: string[] } | null][]
  /** Native tensors made from plain leaves for this call, freed when it ends. */
  temps: NativeTensor[]
  /** The params' norm when the divergence watch samples this step, with the count before it. */
  watched: { count: number; norm: number } | null
}

/** @internal What {@link makeTransformation} builds: the public pair and the in-place step behind the optimizer classes (and the TensorFlow.js adapter). */
export interface Transformation extends GradientTransformation {
  /**
   * The initial state for `leaves` named by `paths` (in this order), which `update` then
   * takes as an array of leaves in the same order: what the TensorFlow.js adapter makes
   * for its variables (the paths are their names, which masks and errors see).
   */
  initNamed(leaves: Leaf[], paths: string[]): OptimizerState
  /**
   * One step written into `params`, all or nothing. When every param leaf is a Tensor the
   * native core adds the updates itself, so no update crosses into JS. With other leaf
   * kinds it is `update`, and `write` stores the updates into the params; if `write`
   * throws, the state is put back as it was before the step.
   */
  stepInPlace(grads: PyTree, state: OptimizerState, params: PyTree, extra: UpdateExtra | undefined, write: (updates: PyTree) => void): void
}

/**
 * Runs `write`, which stores the values of a step the state has already counted into the
 * params; if it throws, `state` is put back to `before` (a clone from before the step),
 * so that the step changes nothing.
 */
function undoOnThrow(state: OptimizerState, before: NativeState, write: () => void): void {
  try {
    write()
  } catch (e) {
    state.optimizer.copyState(before, state.handle)
    throw e
  }
}

/** The leaves as the core sees them: paths, shapes and the masks resolved. */
function leafInfos(o: Resolved, flat: Flat<Leaf>): LeafInfo[] {
  const wd = resolveMask(o.weightDecayMask, 'weightDecayMask', flat.paths, flat.leaves, true)
  const scanned = resolveMask(o.scannedLayers, 'scannedLayers', flat.paths, flat.leaves, false)
  return flat.paths.map((path, i) => ({
    path,
    shape: [...shapeOf(flat.leaves[i])],
    scanned: scanned[i],
    weightDecay: wd[i],
  }))
}

/**
 * @internal The leaves `init` would give the core for `params` under `options`, and the
 * options as the core reads them (checked), without making anything.
 */
export function describeLeaves(spec: VariantSpec, params: PyTree, options: object | undefined): { leaves: LeafInfo[]; json: string } {
  const o = resolveOptions(spec, options)
  return { leaves: leafInfos(o, flatten<Leaf>(params, isLeaf, 'params')), json: o.json }
}

/** @internal Builds the optax-style pair for a variant (the factories and classes call it). */
export function makeTransformation(spec: VariantSpec, options: object | undefined): Transformation {
  const o = resolveOptions(spec, options)
  const watch = new DivergenceWatch(spec.name, o.onWarning, divergenceAdvice(spec.name))
  /** Called once a step from `state` has succeeded. */
  const watched = (prep: Prepared, state: OptimizerState) => {
    if (prep.watched) watch.record(state, prep.watched.count, prep.watched.norm)
  }

  const prepare = (grads: PyTree, state: OptimizerState, params: PyTree | null | undefined, extra?: UpdateExtra): Prepared => {
    if (!(state instanceof OptimizerState) || state.owner !== spec.name) {
      throw new TypeError(`${spec.name}.update: state must come from ${spec.name}().init`)
    }
    // the step would run with the state's own native optimizer, i.e. the other options
    if (state.config !== o.json) {
      throw new TypeError(`${spec.name}.update: the state was made by ${spec.name}() with other options (${state.config}, this one has ${o.json})`)
    }
    state.idle('update')
    const temps: NativeTensor[] = []
    try {
      return prepareWith(grads, state, params, extra, temps)
    } catch (e) {
      disposeAll(temps)
      throw e
    }
  }

  const prepareWith = (
    grads: PyTree,
    state: OptimizerState,
    params: PyTree | null | undefined,
    extra: UpdateExtra | undefined,
    temps: NativeTensor[],
  ): Prepared => {
    const hessian = hessianInputs(spec, extra, state.layout, temps)
    const g = flattenLike(grads, state.layout, 'grads', temps)
    const p = params === undefined || params === null ? null : flattenLike(params, state.layout, 'params', temps)
    // schedules given as functions are evaluated here (the learning rate at the count
    // before this step, the others at the 1-based step, as psgd-jax); the core checks them
    const count = state.count
    const step: StepInput = {}
    if (o.learningRate) step.learningRate = scheduleValue(spec, 'learningRate', o.learningRate, count)
    if (o.updateProbability) step.updateProbability = scheduleValue(spec, 'preconditionerUpdateProbability', o.updateProbability, count + 1)
    if (o.precondLr) step.precondLr = scheduleValue(spec, 'precondLr', o.precondLr, count + 1)
    if (hessian) step.updatePreconditioner = hessian.updatePreconditioner
    const norm = p !== null && watch.due(count) ? paramsNorm(p.flat.leaves) : null
    return {
      flat: g.flat,
      paramsFlat: p?.flat ?? null,
      grads: g.nativeLeaves,
      params: p?.nativeLeaves ?? null,
      step,
      hvp: hessian?.hvp ?? null,
      vector: hessian?.vector ?? null,
      inputs: [
        ['grads', g.flat],
        ['params', p?.flat ?? null],
        ['hvp', hessian?.flats.hvp ?? null],
        ['vector', hessian?.flats.vector ?? null],
      ],
      temps,
      watched: norm === null ? null : { count, norm },
    }
  }

  const finish = (prep: Prepared, out: NativeTensor[]): PyTree =>
    unflatten(
      prep.flat.treedef,
      out.map((t, i) => fromNative(t, prep.flat.leaves[i])),
    )

  // a native failure from a disposed leaf is reported with the leaf's name
  const nativeError = (e: unknown, prep?: Prepared): never => {
    if (prep) checkLiveAll(prep.inputs)
    return nativeFailure(spec, e)
  }

  const run = (prep: Prepared, state: OptimizerState): PyTree => {
    let out: NativeTensor[]
    try {
      out = state.optimizer.update(prep.grads, state.handle, prep.params, prep.step, prep.hvp, prep.vector)
    } catch (e) {
      return nativeError(e, prep)
    } finally {
      disposeAll(prep.temps)
    }
    const tree = finish(prep, out)
    watched(prep, state)
    return tree
  }

  /** The Tensor leaves an async step reads, which must stay undisposed until it settles. */
  const tensorInputs = (prep: Prepared): Tensor[] => prep.inputs.flatMap(([, f]) => (f ? f.leaves.filter((l): l is Tensor => l instanceof Tensor) : []))

  const initFlat = (flat: Flat<Leaf>): OptimizerState => {
    const leaves = leafInfos(o, flat)
    checkLiveAll([['params', flat]])
    const devices = flat.leaves.map((l) => (l instanceof Tensor ? l.device : 'cpu'))
    const layout: Layout = { paths: flat.paths, shapes: leaves.map((l) => l.shape), devices, treedef: flat.treedef }
    const temps: NativeTensor[] = []
    try {
      const nativeParams = flat.leaves.map((l, i) => toNative(l, flat.paths[i], 'params', devices[i], temps))
      const opt = new native.NativeOptimizer(spec.name, leaves, o.json)
      return new OptimizerState(opt.init(nativeParams), opt, layout, spec.name, o.json)
    } catch (e) {
      return nativeError(e)
    } finally {
      disposeAll(temps)
    }
  }

  return {
    init(params: PyTree): OptimizerState {
      return initFlat(flatten<Leaf>(params, isLeaf, 'params'))
    },

    initNamed(leaves: Leaf[], paths: string[]): OptimizerState {
      const treedef: TreeDef = { kind: 'array', children: leaves.map(() => ({ kind: 'leaf' }) as const) }
      return initFlat({ leaves, paths, treedef, set: [] })
    },

    update(grads, state, params, extra) {
      return [run(prepare(grads, state, params, extra), state), state]
    },

    async updateAsync(grads, state, params, extra) {
      const prep = prepare(grads, state, params, extra)
      const held = tensorInputs(prep)
      for (const t of held) t.retain()
      state.pending = true
      let out: NativeTensor[]
      try {
        out = await state.optimizer.updateAsync(prep.grads, state.handle, prep.params, prep.step, prep.hvp, prep.vector)
      } catch (e) {
        return nativeError(e, prep)
      } finally {
        state.pending = false
        for (const t of held) t.unretain()
        disposeAll(prep.temps)
      }
      const tree = finish(prep, out)
      watched(prep, state)
      return [tree, state]
    },

    stepInPlace(grads, state, params, extra, write) {
      const prep = prepare(grads, state, params, extra)
      const paramLeaves = prep.paramsFlat?.leaves ?? []
      if (prep.params === null || !paramLeaves.every((l) => l instanceof Tensor)) {
        // tensors are immutable natively, so this copy is handles only
        const before = state.handle.clone()
        try {
          // only a step that was taken is undone: a step that failed changed nothing (and
          // under overlapFit, its error may be the previous fit's, which the copy shares)
          const updates = run(prep, state)
          undoOnThrow(state, before, () => write(updates))
        } finally {
          before.dispose()
        }
        return
      }
      try {
        state.optimizer.step(prep.grads, state.handle, prep.params, prep.step, prep.hvp, prep.vector)
      } catch (e) {
        return nativeError(e, prep)
      } finally {
        disposeAll(prep.temps)
      }
      watched(prep, state)
    },
  }
}

/** Adds one update leaf to one param leaf, returning a new leaf of the param's kind. */
function addLeaf(p: Leaf, u: Leaf, path: string): Leaf {
  checkLive(p, 'params', path)
  checkLive(u, 'updates', path)
  if (!sameItems(shapeOf(p), shapeOf(u))) {
    throw new RangeError(`updates '${path}' has shape ${JSON.stringify(shapeOf(u))}, the param has ${JSON.stringify(shapeOf(p))}`)
  }
  if (p instanceof Tensor) {
    const temps: NativeTensor[] = []
    try {
      const un = u instanceof Tensor ? u.native : toNative(u, path, 'updates', p.device, temps)
      return new Tensor(call(() => p.native.add(un), `updates '${path}'`))
    } finally {
      disposeAll(temps)
    }
  }
  const uv = u instanceof Tensor ? u.toArray() : typeof u === 'number' ? Float32Array.of(u) : u.data
  if (typeof p === 'number') return Math.fround(p + uv[0])
  const data = new Float32Array(p.data.length)
  for (let i = 0; i < data.length; i++) data[i] = p.data[i] + uv[i]
  return { data, shape: [...p.shape] }
}

/**
 * `params + updates`, leaf by leaf, as a new tree with the params' structure and leaf kinds
 * (optax's `apply_updates`). The inputs are not modified.
 */
export function applyUpdates<T extends PyTree>(params: T, updates: PyTree): T {
  const p = flatten<Leaf>(params, isLeaf, 'params')
  const u = flatten<Leaf>(updates, isLeaf, 'updates')
  const bad = structureMismatch(p.paths, u.paths)
  if (bad) throw new RangeError(`updates: ${bad}`)
  const byPath = new Map(u.paths.map((path, i) => [path, u.leaves[i]]))
  const out = p.leaves.map((leaf, i) => addLeaf(leaf, byPath.get(p.paths[i]) as Leaf, p.paths[i]))
  return unflatten<T>(p.treedef, out)
}

/**
 * The in-place, PyTorch-style optimizer every variant's class extends: it holds the params
 * tree and the state, and `step` writes the new values into the params' own leaves.
 */
export class PsgdOptimizer<P extends PyTree = PyTree> {
  /** The optax-style pair behind this optimizer. */
  readonly transformation: GradientTransformation
  private readonly steps: Transformation
  /** The optimizer state (advanced in place by every step). */
  readonly state: OptimizerState
  private readonly tree: P
  private readonly owner: string
  private busy = false

  /** @internal Use the variant classes (`new Kron(params, options)`). */
  constructor(spec: VariantSpec, params: P, options: object | undefined) {
    this.owner = spec.name
    if (typeof params === 'number') {
      throw new TypeError(`${spec.name}: params must be a tree (or a Tensor / { data, shape } leaf) to update in place, got a number`)
    }
    this.steps = makeTransformation(spec, options)
    this.transformation = this.steps
    this.tree = params
    // a number leaf in a read-only property is refused now, not when a step writes it
    flatten(params, isLeaf, 'params', true)
    this.state = this.transformation.init(params)
  }

  /** The params tree this optimizer updates in place. */
  get params(): P {
    return this.tree
  }

  /** Steps taken so far. */
  get count(): number {
    return this.state.count
  }

  private enter(): void {
    if (this.busy) throw new Error(`${this.owner}: a stepAsync is still running; await it before the next step`)
  }

  /**
   * Writes `params + updates` into the params' leaves (Tensors keep their identity), all
   * or nothing. Every new value is computed first. Then the numbers are stored through
   * their containers, the only writes that can fail (a frozen container, a getter-only or
   * throwing property), and put back if one does; only then are the arrays and Tensors,
   * which are written in place, given their values.
   * @throws TypeError naming a number leaf that cannot be written; RangeError when the
   * params' leaves no longer match the updates.
   */
  private write(updates: PyTree): void {
    const p = flatten<Leaf>(this.tree, isLeaf, 'params', true)
    const u = flatten<Leaf>(updates, isLeaf, 'updates')
    const next: Leaf[] = []
    try {
      const bad = sameItems(p.paths, u.paths) ? null : (structureMismatch(p.paths, u.paths) ?? 'the leaf order differs from the params')
      if (bad !== null) throw new RangeError(`${this.owner}: updates: ${bad}; the step changed nothing`)
      p.leaves.forEach((leaf, i) => next.push(addLeaf(leaf, u.leaves[i], p.paths[i])))
      const written: number[] = []
      p.leaves.forEach((leaf, i) => {
        if (typeof leaf !== 'number') return
        try {
          p.set[i](next[i])
          written.push(i)
        } catch (e) {
          for (const j of written.reverse()) p.set[j](p.leaves[j])
          const why = e instanceof Error ? e.message : String(e)
          throw new TypeError(`${this.owner}: params '${p.paths[i]}' cannot be written (${why}); the step changed nothing`, { cause: e })
        }
      })
      p.leaves.forEach((leaf, i) => {
        if (leaf instanceof Tensor) leaf.native.assign((next[i] as Tensor).native)
        else if (typeof leaf !== 'number') leaf.data.set((next[i] as ArrayLeaf).data)
      })
    } finally {
      // Nobody else sees these: free them now, not at the next collection, or a training
      // loop holds several model-sized copies between collections.
      for (const t of [...u.leaves, ...next]) if (t instanceof Tensor) t.dispose()
    }
  }

  /**
   * One step: updates the params in place from `grads` (a tree like the params). All or
   * nothing: when it throws, the params and the state (its count included) are unchanged.
   */
  step(grads: PyTree, extra?: UpdateExtra): void {
    this.enter()
    // Tensor params take the new values natively; other leaf kinds are written from JS
    this.steps.stepInPlace(grads, this.state, this.tree, extra, (updates) => this.write(updates))
  }

  /**
   * {@link PsgdOptimizer.step} with the optimizer's work done off the JS main thread. The
   * params' Tensors cannot be disposed until it settles. All or nothing, as `step`: the
   * state counts the step only once the params hold all its values (a failure to write
   * one puts the params and the state back). Reading `count` meanwhile does not wait for
   * it, and gives the count before the step.
   */
  async stepAsync(grads: PyTree, extra?: UpdateExtra): Promise<void> {
    this.enter()
    this.state.idle('stepAsync')
    this.busy = true
    // tensors are immutable natively, so this copy is handles only
    const before = this.state.handle.clone()
    try {
      const [updates] = await this.transformation.updateAsync(grads, this.state, this.tree, extra)
      undoOnThrow(this.state, before, () => this.write(updates))
    } finally {
      before.dispose()
      this.busy = false
    }
  }

  /** The optimizer state as safetensors bytes; throws while a {@link PsgdOptimizer.stepAsync} is running. */
  stateDict(): Uint8Array {
    this.enter()
    return this.state.toBytes()
  }

  /**
   * What the last step did and how the preconditioner stands (see
   * {@link OptimizerState.stats}); throws while a {@link PsgdOptimizer.stepAsync} is running.
   */
  stats(): PsgdStats {
    this.enter()
    return this.state.stats()
  }

  /** Restores a state saved by {@link PsgdOptimizer.stateDict}; on error the state is unchanged. */
  loadStateDict(bytes: Uint8Array): void {
    this.enter()
    this.state.loadBytes(bytes)
  }

  /**
   * Frees the optimizer state's native memory now (see {@link OptimizerState.dispose}); the
   * params are the caller's and stay. Later steps throw a `TypeError`. Idempotent.
   * @throws Error while a {@link PsgdOptimizer.stepAsync} is running.
   */
  dispose(): void {
    this.enter()
    this.state.dispose()
  }
}
