/**
 * The TensorFlow.js adapter (`psgd/tfjs`): the four PSGD variants as `tf.train.Optimizer`
 * subclasses, so `model.compile({ optimizer: new KronOptimizer(...) })` and
 * `optimizer.minimize(f)` train with PSGD. Only this module imports `@tensorflow/tfjs-core`
 * (an optional peer dependency): the main entry never loads it.
 *
 * Each step reads every gradient once (`dataSync`), runs the native step on plain
 * `{ data, shape }` leaves (whose native copies the core frees before it returns, so a
 * step leaves no native tensor behind), and writes each variable once (`assign`).
 */
import {
  add,
  dispose,
  engine,
  getBackend,
  Optimizer,
  serialization,
  tensor,
  tidy,
  type NamedTensorMap,
  type Scalar,
  type Tensor as TfTensor,
  type Variable,
} from '@tensorflow/tfjs-core'
import type { GradientTransformation, OptimizerState } from './core'
import type { Schedule } from './schedule'
import { affine, type AffineOptions } from './affine'
import { kron, type KronOptions } from './kron'
import { lra, type LRAOptions } from './lra'
import { xmat, type XMatOptions } from './xmat'
import type { ArrayLeaf } from './tree'

/** A named tensor, as tfjs's optimizers take and give them (tfjs-core does not export its own type). */
export interface NamedTensor {
  /** The variable's (or the weight's) name. */
  name: string
  /** Its value. */
  tensor: TfTensor
}

/** Name of the weight {@link PsgdTfjsOptimizer.getWeights} gives the state of the `i`-th set of variables. */
const STATE_WEIGHT = 'psgd_state'

/** One native state and the variables (by name, in the leaf order) it was made for. */
interface Group {
  names: string[]
  shapes: number[][]
  state: OptimizerState
}

/** A state restored by `setWeights`, waiting for the first step on its variables (see {@link PsgdTfjsOptimizer.setWeights}). */
interface Pending {
  names: string[]
  bytes: Uint8Array
}

/** The sorted variable names of one call, joined: the key of the state kept for that set. */
function groupKey(names: readonly string[]): string {
  return JSON.stringify(names)
}

/**
 * The base of {@link KronOptimizer}, {@link XMatOptimizer}, {@link LRAOptimizer} and
 * {@link AffineOptimizer}: a `tf.train.Optimizer` whose step is PSGD's.
 *
 * - **Which variables.** `applyGradients` updates the variables it is given (by name, as
 *   registered with the tfjs engine), skipping null gradients, as tfjs's own optimizers
 *   do; `minimize` and `model.fit` give it the trainable variables only, so non-trainable
 *   ones (e.g. batch-norm statistics) are never touched.
 * - **Leaf order.** The variables are sorted by name, so the map and list forms of
 *   `applyGradients`, in any order, give the same step.
 * - **State per set of variables.** A PSGD preconditioner spans the leaves it was made
 *   for (XMat and LRA: all of them at once), so one native state is kept per distinct set
 *   of variable names, created on its first step. A call with another set (a variable
 *   created later, a GAN alternating two sub-models) gets a fresh state for that set, as
 *   tfjs's optimizers give a new variable fresh slots.
 * - **Saving.** `getWeights` returns `iter` and one int32 tensor `psgd_state/<i>` per set
 *   (the variable names and the native state bytes, packed), so a model saved with
 *   `includeOptimizer: true` and loaded again continues bit-for-bit.
 */
export abstract class PsgdTfjsOptimizer<O extends object> extends Optimizer {
  /** @internal The options as given, less `learningRate` (see {@link PsgdTfjsOptimizer.learningRate}). */
  protected readonly options: O
  private readonly transformation: GradientTransformation
  private groups = new Map<string, Group>()
  private pending: Pending[] = []
  private disposed = false
  private readonly variant: string
  private readonly make: (options: O) => GradientTransformation
  /** The learning rate: a number, or a schedule of the step count. */
  private rate: number | Schedule

  /**
   * @param options the options of the class of the same variant, or a number: the learning
   * rate (`new KronOptimizer(1e-3)` is `new KronOptimizer({ learningRate: 1e-3 })`, as
   * `tf.train.adam(1e-3)`).
   * @throws TypeError for an unknown option or one of the wrong type; RangeError for a
   * value out of range (checked now, not at the first step).
   */
  protected constructor(variant: string, make: (options: O) => GradientTransformation, options: O | number | undefined, defaultRate: number) {
    super()
    this.variant = variant
    this.make = make
    const given = (typeof options === 'number' ? { learningRate: options } : (options ?? {})) as O & { learningRate?: number | Schedule }
    const { learningRate, ...rest } = given
    this.rate = learningRate ?? defaultRate
    this.checkRate(this.rate)
    // The rate reaches the core as a schedule read at every step, so assigning
    // `learningRate` changes the next step and leaves the options the state was made
    // with (its config) as they were.
    this.transformation = make({ ...given, learningRate: (count: number) => this.rateAt(count) })
    this.options = rest as O
  }

  /**
   * The learning rate, as on every `tf.train` optimizer: reading gives the rate of the next
   * step (a schedule's value at the current {@link PsgdTfjsOptimizer.iterations}); assigning
   * a number (or a schedule of the step count) changes every later step, so learning-rate
   * callbacks and schedulers written for tfjs (`model.optimizer.learningRate = lr`) work.
   * The preconditioner and momentum are kept.
   * @throws RangeError on assignment of a negative or non-finite rate; TypeError for one
   * that is neither a number nor a function (the rate stays as it was).
   */
  get learningRate(): number {
    return this.rateAt(this.iterations)
  }

  set learningRate(value: number | Schedule) {
    this.checkRate(value)
    this.rate = value
  }

  /** Sets {@link PsgdTfjsOptimizer.learningRate} (the method `tf.train.sgd`'s optimizer has). */
  setLearningRate(value: number | Schedule): void {
    this.learningRate = value
  }

  /** The rate at step `count` (what the core's schedule reads). */
  private rateAt(count: number): number {
    const r = this.rate
    return typeof r === 'function' ? r(count) : r
  }

  /** A rate the options would accept, by the same checks (a function is checked at each step). */
  private checkRate(value: unknown): void {
    if (typeof value !== 'function') this.make({ learningRate: value } as O)
  }

  /**
   * `tf.train.Optimizer.minimize`: computes `f`'s gradients with respect to `varList` (default:
   * every trainable variable) and applies them. A step that throws (bad gradients, such as a
   * NaN batch, or a disposed optimizer) disposes the gradients and the cost before the error
   * reaches the caller, so refused steps leave no tensor behind.
   * @returns the cost (`f`'s value before the step) when `returnCost` is true, else null.
   * @throws TypeError when the optimizer was disposed (before `f` runs); what `applyGradients` throws.
   */
  override minimize(f: () => Scalar, returnCost = false, varList?: Variable[]): Scalar | null {
    this.checkAlive()
    const { value, grads } = this.computeGradients(f, varList)
    try {
      this.applyGradients(varList == null ? grads : varList.map((v) => ({ name: v.name, tensor: grads[v.name] })))
    } catch (e) {
      value.dispose()
      throw e
    } finally {
      dispose(grads)
    }
    if (returnCost) return value
    value.dispose()
    return null
  }

  /**
   * One PSGD step on the variables named in `variableGradients` (a name → gradient map or
   * a list of `{ name, tensor }`, the two forms tfjs passes).
   * @throws TypeError for a name that is no registered variable, a non-float32 variable or
   * gradient; RangeError for a gradient whose shape differs from its variable's.
   */
  applyGradients(variableGradients: NamedTensorMap | NamedTensor[]): void {
    this.checkAlive()
    const pairs: [string, TfTensor][] = []
    if (Array.isArray(variableGradients)) {
      for (const v of variableGradients) if (v?.tensor != null) pairs.push([v.name, v.tensor])
    } else {
      for (const [name, g] of Object.entries(variableGradients)) if (g != null) pairs.push([name, g])
    }
    if (pairs.length === 0) return
    pairs.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
    const names = pairs.map(([n]) => n)
    const vars = names.map((name, i) => {
      if (i > 0 && name === names[i - 1]) throw new TypeError(`${this.variant}: variable '${name}' is given twice`)
      const v = engine().registeredVariables[name]
      if (v === undefined) throw new TypeError(`${this.variant}: '${name}' is not a registered tfjs variable`)
      if (v.dtype !== 'float32') throw new TypeError(`${this.variant}: variable '${name}' is ${v.dtype}; PSGD updates float32 variables`)
      return v
    })
    const grads: ArrayLeaf[] = pairs.map(([name, g], i) => {
      if (g.dtype !== 'float32') throw new TypeError(`${this.variant}: the gradient of '${name}' is ${g.dtype}, expected float32`)
      if (!sameShape(g.shape, vars[i].shape)) {
        throw new RangeError(
          `${this.variant}: the gradient of '${name}' has shape ${JSON.stringify(g.shape)}, the variable has ${JSON.stringify(vars[i].shape)}`,
        )
      }
      // read once; the native step copies it, so a backend's own buffer is never written
      return { data: g.dataSync() as Float32Array, shape: [...g.shape] }
    })
    const group = this.groupFor(names, vars)
    // params are read only when the step needs them (decoupled weight decay)
    const params = this.needsParams() ? vars.map((v) => ({ data: v.dataSync() as Float32Array, shape: [...v.shape] })) : null
    let updates
    try {
      ;[updates] = this.transformation.update(grads, group.state, params)
    } catch (e) {
      throw withNames(e, names)
    }
    const leaves = updates as ArrayLeaf[]
    // The `cpu` backend keeps values in JS arrays, so reading a variable is free while its
    // own `add` is a generic broadcasting loop (measured 6.5 ms vs 0.8 ms for the JS sum on
    // a 784×128 kernel); elsewhere (`wasm`, native, GPU) the backend's add is the fast one.
    const sumInJs = getBackend() === 'cpu'
    tidy(() => {
      vars.forEach((v, i) => {
        const u = leaves[i].data
        if (sumInJs) {
          const cur = v.dataSync() as Float32Array
          // the updates array is this step's own (copied out of native memory): reuse it
          for (let j = 0; j < u.length; j++) u[j] += cur[j]
          v.assign(tensor(u, leaves[i].shape, 'float32'))
        } else v.assign(add(v, tensor(u, leaves[i].shape, 'float32')))
      })
    })
    this.incrementIterations()
  }

  /** The state for this set of variables: kept, restored from `setWeights`, or new. */
  private groupFor(names: string[], vars: Variable[]): Group {
    const key = groupKey(names)
    const have = this.groups.get(key)
    if (have) return have
    const shapes = vars.map((v) => [...v.shape])
    // only shapes are read at init, so zeros stand in for the values (no backend read)
    const state = this.transformation.init(shapes.map((shape) => ({ data: new Float32Array(sizeOf(shape)), shape })))
    const restored = this.takePending(names)
    if (restored) {
      try {
        state.loadBytes(restored.bytes)
      } catch (e) {
        // kept, so a step on the variables it was saved for can still restore it
        this.pending.unshift(restored)
        const why = e instanceof Error ? e.message : String(e)
        throw new RangeError(
          `${this.variant}: the state setWeights restored for ${JSON.stringify(restored.names)} does not fit ${JSON.stringify(names)}: ${why}`,
          {
            cause: e,
          },
        )
      }
    }
    const group = { names, shapes, state }
    this.groups.set(key, group)
    return group
  }

  /**
   * The saved state for `names`: the one saved for the same names, else (a model rebuilt
   * with other layer names) the first one saved for as many variables; its shapes are
   * checked by `loadBytes`.
   */
  private takePending(names: string[]): Pending | undefined {
    let at = this.pending.findIndex((p) => groupKey(p.names) === groupKey(names))
    if (at < 0) at = this.pending.findIndex((p) => p.names.length === names.length)
    if (at < 0) return undefined
    return this.pending.splice(at, 1)[0]
  }

  private needsParams(): boolean {
    const wd = (this.options as { weightDecay?: unknown }).weightDecay
    return wd !== undefined && wd !== 0
  }

  private checkAlive(): void {
    if (this.disposed) throw new TypeError(`${this.variant}: the optimizer was disposed`)
  }

  /**
   * `iter` and one int32 tensor `psgd_state/<i>` per set of variables stepped so far (or
   * restored and not yet stepped): `[name bytes, state bytes, …packed bytes]`.
   */
  override async getWeights(): Promise<NamedTensor[]> {
    this.checkAlive()
    const out: NamedTensor[] = [await this.saveIterations()]
    const saved: Pending[] = [...[...this.groups.values()].map((g) => ({ names: g.names, bytes: g.state.toBytes() })), ...this.pending]
    saved.forEach((p, i) => out.push({ name: `${STATE_WEIGHT}/${i}`, tensor: pack(p) }))
    return out
  }

  /**
   * Restores what {@link PsgdTfjsOptimizer.getWeights} returned. The states replace this
   * optimizer's and are loaded at the first step on their variables (only then are the
   * variables' shapes known); a state that does not fit them is a RangeError there.
   * @throws TypeError when the weights are not such a list.
   */
  override async setWeights(weightValues: NamedTensor[]): Promise<void> {
    this.checkAlive()
    if (!Array.isArray(weightValues) || weightValues.length === 0) {
      throw new TypeError(`${this.variant}.setWeights: expected the list getWeights returns ('iter', then '${STATE_WEIGHT}/<i>' tensors)`)
    }
    const rest = await this.extractIterations(weightValues)
    const pending: Pending[] = []
    for (const w of rest) {
      if (!w.name.includes(STATE_WEIGHT)) {
        throw new TypeError(`${this.variant}.setWeights: unexpected weight '${w.name}' (expected '${STATE_WEIGHT}/<i>')`)
      }
      if (w.tensor.dtype !== 'int32') throw new TypeError(`${this.variant}.setWeights: weight '${w.name}' must be int32, got ${w.tensor.dtype}`)
      pending.push(unpack(await w.tensor.data<'int32'>(), `${this.variant}.setWeights: weight '${w.name}'`))
    }
    this.groups.clear()
    this.pending = pending
  }

  /**
   * The options, for `tf.serialization` (and `model.save`), with the current
   * {@link PsgdTfjsOptimizer.learningRate}.
   * @throws TypeError when an option is a function (a schedule or mask), which no config can hold.
   */
  getConfig(): serialization.ConfigDict {
    const config: serialization.ConfigDict = {}
    for (const [k, v] of Object.entries({ learningRate: this.rate, ...this.options })) {
      if (v === undefined) continue
      if (typeof v === 'function') throw new TypeError(`${this.variant}.getConfig: option '${k}' is a function, which a config cannot hold`)
      config[k] = v as serialization.ConfigDictValue
    }
    return config
  }

  /**
   * An optimizer from a {@link PsgdTfjsOptimizer.getConfig} result (what `tf.serialization`
   * and `tf.loadLayersModel` call). A model loaded by tfjs-layers has its string values
   * rewritten from snake_case to camelCase (`'one_diag'` comes back as `'oneDiag'`); such a
   * value, refused as it is and accepted in snake_case, is restored.
   * @throws TypeError / RangeError for a config whose options `cls` refuses (as its constructor).
   */
  static override fromConfig<T extends serialization.Serializable>(cls: serialization.SerializableConstructor<T>, config: serialization.ConfigDict): T {
    const accepts = (options: object): boolean => {
      try {
        ;(new cls(options) as unknown as PsgdTfjsOptimizer<object>).dispose()
        return true
      } catch {
        return false
      }
    }
    const options: Record<string, unknown> = {}
    for (const [k, v] of Object.entries(config)) {
      // tfjs-layers adds its deserialization context to the config; it is no PSGD option
      if (k === 'customObjects') continue
      const snake = typeof v === 'string' ? snakeCase(v) : v
      options[k] = snake !== v && !accepts({ [k]: v }) && accepts({ [k]: snake }) ? snake : v
    }
    return new cls(options)
  }

  /** Frees the native states now (momentum and preconditioner factors); later use throws a TypeError. */
  override dispose(): void {
    for (const g of this.groups.values()) g.state.dispose()
    this.groups.clear()
    this.pending = []
    this.disposed = true
  }
}

/**
 * The core names a leaf by its path, here its index in the sorted variables (indices, not
 * names, so that a state reloads into a model rebuilt with other layer names): the error
 * the caller sees names the variable.
 */
function withNames(e: unknown, names: readonly string[]): unknown {
  if (!(e instanceof TypeError || e instanceof RangeError)) return e
  const message = e.message.replace(/'(\d+)'/g, (m, i: string) => (names[Number(i)] !== undefined ? `'${names[Number(i)]}'` : m))
  const out = e instanceof TypeError ? new TypeError(message, { cause: e }) : new RangeError(message, { cause: e })
  return out
}

/** Undoes tfjs-layers' `toCamelCase` of a config string: `'oneDiag'` → `'one_diag'`. */
function snakeCase(s: string): string {
  return s.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toLowerCase()
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i])
}

function sizeOf(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1)
}

/** `[name byte count, state byte count, …(names JSON ++ state bytes) packed 4 per int32]`. */
function pack(p: Pending): TfTensor {
  const names = new TextEncoder().encode(JSON.stringify(p.names))
  const words = Math.ceil((names.length + p.bytes.length) / 4)
  const buf = new Uint8Array(8 + words * 4)
  const head = new DataView(buf.buffer)
  head.setInt32(0, names.length, true)
  head.setInt32(4, p.bytes.length, true)
  buf.set(names, 8)
  buf.set(p.bytes, 8 + names.length)
  return tensor(littleEndianInt32(buf), [2 + words], 'int32')
}

function unpack(words: Int32Array, what: string): Pending {
  const buf = new Uint8Array(words.length * 4)
  const view = new DataView(buf.buffer)
  words.forEach((w, i) => view.setInt32(i * 4, w, true))
  const nameLen = words.length >= 2 ? view.getInt32(0, true) : -1
  const stateLen = words.length >= 2 ? view.getInt32(4, true) : -1
  if (nameLen < 0 || stateLen < 0 || 8 + nameLen + stateLen > buf.length) throw new RangeError(`${what} is not a PSGD state`)
  let names: unknown
  try {
    names = JSON.parse(new TextDecoder().decode(buf.subarray(8, 8 + nameLen)))
  } catch {
    throw new RangeError(`${what} is not a PSGD state (bad variable names)`)
  }
  if (!Array.isArray(names) || !names.every((n) => typeof n === 'string')) throw new RangeError(`${what} is not a PSGD state (bad variable names)`)
  return { names, bytes: buf.slice(8 + nameLen, 8 + nameLen + stateLen) }
}

/** The bytes as int32 words, little-endian whatever the platform (saved files are little-endian). */
function littleEndianInt32(buf: Uint8Array): Int32Array {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength)
  const out = new Int32Array(buf.byteLength / 4)
  for (let i = 0; i < out.length; i++) out[i] = view.getInt32(i * 4, true)
  return out
}

/** PSGD Kron as a TensorFlow.js optimizer: `model.compile({ optimizer: new KronOptimizer({ learningRate: 1e-3 }), loss })`. */
export class KronOptimizer extends PsgdTfjsOptimizer<KronOptions> {
  /** The name `tf.serialization` registers it under. */
  static className = 'PsgdKron'
  /**
   * The options of `new Kron(params, options)`, or the learning rate alone (default 0.001, the core's).
   * @throws TypeError / RangeError for bad options.
   */
  constructor(options: KronOptions | number = {}) {
    super('KronOptimizer', kron, options, 0.001)
  }
}

/** PSGD XMat as a TensorFlow.js optimizer (one preconditioner over all the variables of a step). */
export class XMatOptimizer extends PsgdTfjsOptimizer<XMatOptions> {
  /** The name `tf.serialization` registers it under. */
  static className = 'PsgdXMat'
  /**
   * The options of `new XMat(params, options)`, or the learning rate alone (default 0.01, the core's).
   * @throws TypeError / RangeError for bad options.
   */
  constructor(options: XMatOptions | number = {}) {
    super('XMatOptimizer', xmat, options, 0.01)
  }
}

/** PSGD LRA (low-rank plus diagonal) as a TensorFlow.js optimizer. */
export class LRAOptimizer extends PsgdTfjsOptimizer<LRAOptions> {
  /** The name `tf.serialization` registers it under. */
  static className = 'PsgdLRA'
  /**
   * The options of `new LRA(params, options)`, or the learning rate alone (default 0.01, the core's).
   * @throws TypeError / RangeError for bad options.
   */
  constructor(options: LRAOptions | number = {}) {
    super('LRAOptimizer', lra, options, 0.01)
  }
}

/** PSGD Affine (a left and a right factor per variable) as a TensorFlow.js optimizer. */
export class AffineOptimizer extends PsgdTfjsOptimizer<AffineOptions> {
  /** The name `tf.serialization` registers it under. */
  static className = 'PsgdAffine'
  /**
   * The options of `new Affine(params, options)`, or the learning rate alone (default 0.01, the core's).
   * @throws TypeError / RangeError for bad options.
   */
  constructor(options: AffineOptions | number = {}) {
    super('AffineOptimizer', affine, options, 0.01)
  }
}

// so `tf.loadLayersModel` of a model saved with one of these rebuilds it from its config
for (const cls of [KronOptimizer, XMatOptimizer, LRAOptimizer, AffineOptimizer]) serialization.registerClass(cls)
