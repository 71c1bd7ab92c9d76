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
  scalar,
  serialization,
  tensor,
  tidy,
  type NamedTensorMap,
  type Scalar,
  type Tensor as TfTensor,
  type Variable,
} from '@tensorflow/tfjs-core'
import type { GradientTransformation, OptimizerState, Transformation } from './core'
import { call, native } from './native'
import { scheduleAsData, scheduleFromData, type Schedule } from './schedule'
import { affine, type AffineOptions } from './affine'
import { kron, type KronOptions } from './kron'
import { lra, type LRAOptions } from './lra'
import { xmat, type XMatOptions } from './xmat'
import type { ArrayLeaf } from './tree'
import { mergeStats, type PsgdStats } from './stats'
import { WATCH_EVERY } from './guard'

/** A named tensor, as tfjs's optimizers take and give them (tfjs-core does not export its own type). */
export interface NamedTensor {
  /** The variable's (or the weight's) name. */
  name: string
  /** Its value. */
  tensor: TfTensor
}

/** Name of the weights {@link PsgdTfjsOptimizer.getWeights} gives the saved states: `psgd_state/<i>`. */
const STATE_WEIGHT = 'psgd_state'
/** A saved state's weight name (under any scope tfjs may add). */
const STATE_NAME = /(^|\/)psgd_state\/\d+$/

/** One native state and the variables it holds the state of (by name, in its leaf order). */
interface Group {
  names: string[]
  state: OptimizerState
}

/** A state restored by `setWeights`, waiting for a step on its variables (see {@link PsgdTfjsOptimizer.setWeights}). */
interface Pending {
  /** The variable names it was saved for, in its leaf order. */
  names: string[]
  /** Their shapes (from the state's own metadata). */
  shapes: number[][]
  /** Its step count when saved. */
  count: number
  bytes: Uint8Array
}

/** The key of a set of variable names, in any order. */
function setKey(names: readonly string[]): string {
  return JSON.stringify([...names].sort())
}

/** A name without the `_<n>` tfjs-layers appends to a name registered a second time. */
function baseName(name: string): string {
  return name.replace(/_\d+$/, '')
}

/** The `_<n>` suffix tfjs adds to a re-registered name (`''` when there is none). */
function suffixOf(name: string): string {
  return name.slice(baseName(name).length)
}

/** The optimizer's states: the live ones, which variable each is held by, and the restored ones not yet bound. */
interface Book {
  /** The live states, by the set of variable names each holds; no variable is in two. */
  groups: Map<string, Group>
  /** The live state of each variable, by name. */
  holders: Map<string, Group>
  /** The states `setWeights` restored, not yet bound to variables. */
  pending: Pending[]
}

/**
 * @internal A step's changes to a {@link Book}, made on copies of its maps: the states made for the
 * step, the ones they replace, the counts set. {@link Draft.commit} gives the new book and
 * frees what was replaced; {@link Draft.abandon} frees what was made and puts the counts
 * back, leaving the book as it was.
 */
export class Draft {
  readonly book: Book
  private readonly made: Group[] = []
  private readonly replaced: Group[] = []
  private readonly counts: [Group, number][] = []

  constructor(from: Book) {
    this.book = { groups: new Map(from.groups), holders: new Map(from.holders), pending: [...from.pending] }
  }

  /** Notes a state made for this step (freed if the step is abandoned). */
  add(g: Group): Group {
    this.made.push(g)
    return g
  }

  register(g: Group): void {
    this.book.groups.set(setKey(g.names), g)
    for (const n of g.names) this.book.holders.set(n, g)
  }

  /** Takes `g` out of the book (freed when the step commits). */
  remove(g: Group): void {
    this.book.groups.delete(setKey(g.names))
    for (const n of g.names) if (this.book.holders.get(n) === g) this.book.holders.delete(n)
    this.replaced.push(g)
  }

  /** Marks a restored state as bound. */
  take(p: Pending): void {
    this.book.pending = this.book.pending.filter((q) => q !== p)
  }

  /** Sets `g`'s step count, to be put back if the step is abandoned. */
  setCount(g: Group, count: number): void {
    const was = g.state.count
    if (was === count) return
    this.counts.push([g, was])
    g.state.handle.setCount(count)
  }

  commit(): Book {
    for (const g of this.replaced) g.state.dispose()
    return this.book
  }

  abandon(): void {
    for (const g of this.made) if (!g.state.disposed) g.state.dispose()
    for (const [g, was] of this.counts.reverse()) if (!g.state.disposed) g.state.handle.setCount(was)
  }
}

/**
 * The base of {@link KronOptimizer}, {@link XMatOptimizer}, {@link LRAOptimizer} and
 * {@link AffineOptimizer}: a `tf.train.Optimizer` whose step is PSGD's.
 *
 * - **Which variables.** `applyGradients` updates the variables it is given (by name, as
 *   registered with the tfjs engine), skipping null gradients, as tfjs's own optimizers
 *   do; `minimize` and `model.fit` give it the trainable variables only, so non-trainable
 *   ones (e.g. batch-norm statistics) are never touched.
 * - **Leaf order.** The variables are taken in the order they were created: for a model,
 *   the order in which it gives its weights (layer by layer, kernel before bias). It does
 *   not depend on their names nor on the order of the call (the map and list forms of
 *   `applyGradients`, in any order, give the same step), so a model built again under
 *   other auto-generated layer names steps the same way.
 * - **Names.** The leaves are named by their variables: `weightDecayMask` and
 *   `scannedLayers` given as functions are called with the variable's name and a leaf of
 *   its shape (`(name) => !name.includes('bias')` decays the kernels only), and errors
 *   name the variable.
 * - **One step count.** The optimizer's `iterations` is the count every step reads:
 *   learning-rate and update-probability schedules, momentum's bias correction and the
 *   random stream all continue across any change of the variables a step is given.
 * - **When the trainable set changes** (a layer frozen or unfrozen and the model compiled
 *   again, a variable created later, a step in which some variables get a null gradient),
 *   each variable keeps its own state: its momentum, and with Kron and Affine, whose
 *   preconditioner is one per variable, its factors, carried from the state that last
 *   held them into the state of the new set; a variable seen for the first time starts
 *   fresh. XMat's and LRA's preconditioner spans all the variables of its set at once, so
 *   it starts anew when the set changes, while the momentum and the count carry over. A
 *   preconditioner that starts at a count above 0 (a new variable's; XMat's and LRA's
 *   after a change) starts from its initial scale option: the automatic scale a null
 *   initial scale takes from the first step applies at count 0 only. Sets that alternate
 *   without sharing variables (a GAN's generator and discriminator) each keep their whole
 *   state.
 * - **Saving.** `getWeights` returns `iter` and one int32 tensor `psgd_state/<i>` per
 *   state (the variable names in leaf order and the native state bytes, packed); a model
 *   saved with `includeOptimizer: true` and loaded again continues bit-for-bit. The
 *   returned tensors belong to the optimizer, as tfjs's optimizers' own weights do: they
 *   stay valid until the next `getWeights` or `dispose` (clone them to keep them longer),
 *   so any number of saves holds one copy.
 * - **Restoring.** `setWeights` keeps the states until a step on any of their variables:
 *   a saved state goes to the variables of its names (also when tfjs-layers added or
 *   changed a `_<n>` suffix, as it does to a model loaded into a process that already has
 *   those names; its variables not in the step are renamed alike and keep their state until
 *   they step), else, when no variable of the step has a state yet, to the step's variables
 *   if it is the only saved state of their shapes in leaf order. Two models sharing one
 *   optimizer each get their own state back; a state is never guessed onto variables
 *   (several fitting by shape only is a RangeError).
 * - **A refused step changes nothing.** The states a step needs (made, moved between sets,
 *   or bound from a restore) are planned on a draft and kept only once the step succeeded.
 */
export abstract class PsgdTfjsOptimizer<O extends object> extends Optimizer {
  /** @internal The options as given, less `learningRate` (see {@link PsgdTfjsOptimizer.learningRate}). */
  protected readonly options: O
  private readonly transformation: GradientTransformation
  /** The live states, the variable each is held by, and the restored states not yet bound. */
  private book: Book = { groups: new Map(), holders: new Map(), pending: [] }
  /** The tensors the last `getWeights` handed out (this optimizer's, freed at the next call or at `dispose`). */
  private handedOut: TfTensor[] = []
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
   * @throws TypeError for a name that is no registered variable or is given twice, a
   * non-float32 variable or gradient; RangeError for a gradient whose shape differs from
   * its variable's, or a restored state that does not fit (see {@link PsgdTfjsOptimizer.setWeights}).
   */
  applyGradients(variableGradients: NamedTensorMap | NamedTensor[]): void {
    this.checkAlive()
    const given = new Map<string, TfTensor>()
    const take = (name: string, g: TfTensor | null | undefined) => {
      if (g == null) return
      if (given.has(name)) throw new TypeError(`${this.variant}: variable '${name}' is given twice`)
      given.set(name, g)
    }
    if (Array.isArray(variableGradients)) for (const v of variableGradients) take(v?.name, v?.tensor)
    else for (const [name, g] of Object.entries(variableGradients)) take(name, g)
    if (given.size === 0) return
    const vars = new Map<string, Variable>()
    for (const [name, g] of given) {
      const v = engine().registeredVariables[name]
      if (v === undefined) throw new TypeError(`${this.variant}: '${name}' is not a registered tfjs variable`)
      if (v.dtype !== 'float32') throw new TypeError(`${this.variant}: variable '${name}' is ${v.dtype}; PSGD updates float32 variables`)
      if (g.dtype !== 'float32') throw new TypeError(`${this.variant}: the gradient of '${name}' is ${g.dtype}, expected float32`)
      if (!sameShape(g.shape, v.shape)) {
        throw new RangeError(`${this.variant}: the gradient of '${name}' has shape ${JSON.stringify(g.shape)}, the variable has ${JSON.stringify(v.shape)}`)
      }
      vars.set(name, v)
    }
    // creation order (tensor ids grow): the model's order, whatever the names or the call's order
    const created = [...vars.keys()].sort((a, b) => (vars.get(a) as Variable).id - (vars.get(b) as Variable).id)
    // The states this step needs are planned on a draft of the book and committed only
    // once the step has succeeded: a refused step (a NaN gradient, a bad schedule value)
    // leaves every state, restored or live, as it was.
    const draft = new Draft(this.book)
    try {
      const group = this.groupFor(draft, created, vars)
      this.stepOn(group, given, vars)
    } catch (e) {
      draft.abandon()
      throw e
    }
    this.book = draft.commit()
    this.incrementIterations()
  }

  /**
   * What the last step did and how the preconditioners stand, per variable name (see
   * {@link PsgdStats}): the stats of every state this optimizer keeps (one per set of
   * variables stepped together), as one. `count` is the optimizer's `iterations`. Before
   * the first step there is no state: no leaves, no factors, `clip` null.
   * @throws TypeError once the optimizer was disposed.
   */
  stats(): PsgdStats {
    this.checkAlive()
    return mergeStats(
      this.iterations,
      [...this.book.groups.values()].map((g) => g.state.stats()),
    )
  }

  /** The native step on `group`'s variables and the write of their new values. */
  private stepOn(group: Group, given: Map<string, TfTensor>, vars: Map<string, Variable>): void {
    const names = group.names
    const variables = names.map((n) => vars.get(n) as Variable)
    // read once; the native step copies it, so a backend's own buffer is never written
    const grads: ArrayLeaf[] = names.map((n) => {
      const g = given.get(n) as TfTensor
      return { data: g.dataSync() as Float32Array, shape: [...g.shape] }
    })
    // params are read only when the step needs them (decoupled weight decay)
    // the divergence watch samples the params' norm every WATCH_EVERY steps (onWarning)
    const watched = (this.options as { onWarning?: unknown }).onWarning !== null && group.state.count % WATCH_EVERY === 0
    const params = this.needsParams() || watched ? variables.map((v) => ({ data: v.dataSync() as Float32Array, shape: [...v.shape] })) : null
    const [updates] = this.transformation.update(grads, group.state, params)
    const leaves = updates as ArrayLeaf[]
    // The `cpu` backend keeps values in JS arrays, so reading a variable is free while its
    // own `add` is a generic broadcasting loop (measured 6.5 ms vs 0.8 ms for the JS sum on
    // a 784×128 kernel); elsewhere (`wasm`, native, GPU) the backend's add is the fast one.
    const sumInJs = getBackend() === 'cpu'
    tidy(() => {
      variables.forEach((v, i) => {
        const u = leaves[i].data
        if (sumInJs) {
          const cur = v.dataSync() as Float32Array
          // the updates array is this step's own (copied out of native memory): reuse it
          for (let j = 0; j < u.length; j++) u[j] += cur[j]
          v.assign(tensor(u, leaves[i].shape, 'float32'))
        } else v.assign(add(v, tensor(u, leaves[i].shape, 'float32')))
      })
    })
  }

  /**
   * The state for this step's variables (`names`, in creation order), at the optimizer's
   * count, planned on `draft`: a restored one, the live one of exactly these variables, or
   * one made for them from the live states of each (see the class's notes).
   */
  private groupFor(draft: Draft, names: string[], vars: Map<string, Variable>): Group {
    if (draft.book.pending.length > 0) this.bindPending(draft, names, vars)
    const { holders } = draft.book
    const first = holders.get(names[0])
    const whole = first !== undefined && first.names.length === names.length && names.every((n) => holders.get(n) === first)
    const group = whole
      ? first
      : this.regroup(
          draft,
          names,
          names.map((n) => [...(vars.get(n) as Variable).shape]),
        )
    draft.setCount(group, this.iterations)
    return group
  }

  /** A fresh native state for variables `names` of `shapes` (only shapes are read at init: zeros stand in for the values). */
  private freshState(names: string[], shapes: number[][]): OptimizerState {
    const leaves = shapes.map((shape) => ({ data: new Float32Array(sizeOf(shape)), shape }))
    return (this.transformation as Transformation).initNamed(leaves, names)
  }

  /**
   * A fresh state for `names` with the per-variable state of `sources`' variables among
   * them moved in (the binding's `regroupState`); with `spanning`, the whole state of
   * that source (the same variables under other names).
   */
  private moved(
    names: string[],
    shapes: number[][],
    sources: { names: string[]; bytes: Uint8Array }[],
    spanning: number | null,
    count: number,
  ): OptimizerState {
    const state = this.freshState(names, shapes)
    const picks = names.flatMap((n, leaf) => {
      const source = spanning ?? sources.findIndex((s) => s.names.includes(n))
      return source < 0 ? [] : [{ leaf, source, sourceLeaf: spanning === null ? sources[source].names.indexOf(n) : leaf }]
    })
    if (picks.length === 0 && spanning === null) return state
    try {
      const bytes = call(
        () =>
          native.regroupState(
            state.toBytes(),
            sources.map((s) => s.bytes),
            picks,
            spanning,
            count,
          ),
        this.variant,
      )
      state.loadBytes(bytes)
    } catch (e) {
      state.dispose()
      throw e
    }
    return state
  }

  /**
   * Makes the live state of `names` from the live states holding any of them (momentum,
   * and Kron's and Affine's per-variable factors, move; see the class's notes), and
   * leaves each of those states with its other variables only; on `draft`.
   */
  private regroup(draft: Draft, names: string[], shapes: number[][]): Group {
    const sources = [...new Set(names.flatMap((n) => draft.book.holders.get(n) ?? []))]
    const saved = sources.map((g) => ({ names: g.names, bytes: g.state.toBytes() }))
    const made: Group[] = [draft.add({ names, state: this.moved(names, shapes, saved, null, this.iterations) })]
    const now = new Set(names)
    sources.forEach((g, i) => {
      const rest = g.names.filter((n) => !now.has(n))
      if (rest.length === 0) return
      const restShapes = rest.map((n) => g.state.layout.shapes[g.names.indexOf(n)])
      made.push(draft.add({ names: rest, state: this.moved(rest, restShapes, [saved[i]], null, g.state.count) }))
    })
    for (const g of sources) draft.remove(g)
    for (const g of made) draft.register(g)
    return made[0]
  }

  /**
   * Binds restored states on `draft`: by name, a state one of whose saved names is one of
   * this step's variables (also across tfjs-layers' `_<n>` suffix, which then renames its
   * other variables alike: they need not be in this step, and keep their state until they
   * are); else, when none of this step's variables has a state yet, the one state saved
   * for as many variables of the same shapes in leaf order.
   * @throws RangeError when a state bound by name does not fit its variables, or when
   * several states fit by shape and no names decide; nothing is bound then.
   */
  private bindPending(draft: Draft, names: string[], vars: Map<string, Variable>): void {
    const { pending, holders } = draft.book
    const here = new Set(names)
    // a saved name's variable in this step: the same name, else the one of its base name
    const inStep = (saved: string): string | undefined => {
      if (here.has(saved)) return saved
      const like = names.filter((n) => baseName(n) === baseName(saved))
      return like.length === 1 ? like[0] : undefined
    }
    let bound: [Pending, string[]][] = []
    for (const p of pending) {
      const matched = p.names.map(inStep)
      if (matched.every((m) => m === undefined)) continue
      // the suffix change the matches make (none, or tfjs's `_<n>` added or changed)
      const changes = new Set(matched.flatMap((m, i) => (m === undefined || m === p.names[i] ? [] : [`${suffixOf(p.names[i])}>${suffixOf(m)}`])))
      if (changes.size > 1) {
        throw new RangeError(
          `${this.variant}: the state setWeights restored for ${JSON.stringify(p.names)} matches the variables ${JSON.stringify(matched.filter(Boolean))} under different name suffixes; which variables are its is unclear`,
        )
      }
      const [from, to] = changes.size === 0 ? ['', ''] : [...changes][0].split('>')
      const mapped = p.names.map((n, i) => matched[i] ?? (changes.size > 0 && suffixOf(n) === from ? baseName(n) + to : n))
      if (new Set(mapped).size === mapped.length) bound.push([p, mapped])
    }
    const shapeOf = (n: string) => (vars.get(n) as Variable).shape
    if (bound.length === 0 && names.every((n) => !holders.has(n))) {
      const fits = pending.filter((p) => p.names.length === names.length && p.shapes.every((s, i) => sameShape(s, shapeOf(names[i]))))
      if (fits.length > 1) {
        throw new RangeError(
          `${this.variant}: the states setWeights restored for ${fits.map((p) => JSON.stringify(p.names)).join(' and ')} all fit the variables ${JSON.stringify(names)} by shape, and no names decide which is theirs`,
        )
      }
      bound = fits.map((p) => [p, names])
    }
    const claimed = new Map<string, Pending>()
    for (const [p, mapped] of bound) {
      for (const n of mapped) {
        const other = claimed.get(n)
        if (other !== undefined || holders.has(n)) {
          throw new RangeError(
            `${this.variant}: variable '${n}' would take the state setWeights restored for ${JSON.stringify(p.names)}, but it already has ${other ? `the one restored for ${JSON.stringify(other.names)}` : 'a state'}`,
          )
        }
        claimed.set(n, p)
      }
      const bad = mapped.findIndex((n, i) => here.has(n) && !sameShape(p.shapes[i], shapeOf(n)))
      if (bad >= 0) {
        throw new RangeError(
          `${this.variant}: the state setWeights restored for ${JSON.stringify(p.names)} holds '${p.names[bad]}' of shape ${JSON.stringify(p.shapes[bad])}, which does not fit '${mapped[bad]}' of shape ${JSON.stringify([...shapeOf(mapped[bad])])}`,
        )
      }
    }
    for (const [p, mapped] of bound) {
      let state: OptimizerState
      try {
        state = this.moved(mapped, p.shapes, [p], 0, p.count)
      } catch (e) {
        const why = e instanceof Error ? e.message : String(e)
        throw new RangeError(`${this.variant}: a state setWeights restored does not fit the variables ${JSON.stringify(mapped)}: ${why}`, { cause: e })
      }
      draft.register(draft.add({ names: mapped, state }))
      draft.take(p)
    }
  }

  private needsParams(): boolean {
    const wd = (this.options as { weightDecay?: unknown }).weightDecay
    return wd !== undefined && wd !== 0
  }

  private checkAlive(): void {
    if (this.disposed) throw new TypeError(`${this.variant}: the optimizer was disposed`)
  }

  /** Frees the tensors the last {@link PsgdTfjsOptimizer.getWeights} handed out. */
  private releaseWeights(): void {
    dispose(this.handedOut)
    this.handedOut = []
  }

  /**
   * `iter` and one int32 tensor `psgd_state/<i>` per state (live, or restored and not yet
   * stepped): `[name bytes, state bytes, …packed bytes]`. The tensors are this
   * optimizer's: they stay valid until the next `getWeights` or `dispose`, which free
   * them (tfjs's own optimizers hand out their variables the same way), so a loop of
   * saves holds one copy.
   */
  override async getWeights(): Promise<NamedTensor[]> {
    this.checkAlive()
    const saved = [...[...this.book.groups.values()].map((g) => ({ names: g.names, bytes: g.state.toBytes() })), ...this.book.pending]
    const out: NamedTensor[] = [{ name: 'iter', tensor: scalar(this.iterations, 'int32') }]
    saved.forEach((p, i) => out.push({ name: `${STATE_WEIGHT}/${i}`, tensor: pack(p) }))
    this.releaseWeights()
    this.handedOut = out.map((w) => w.tensor)
    return out
  }

  /**
   * Restores what {@link PsgdTfjsOptimizer.getWeights} returned: the count at once, the
   * states at the first step on their variables (see the class's notes on restoring). The
   * list is checked whole before anything changes.
   * @throws TypeError when the weights are not such a list (no `iter` first, a weight of
   * another name or dtype); RangeError for a count or a state that is not one (or of
   * another variant), or a variable in two states.
   */
  override async setWeights(weightValues: NamedTensor[]): Promise<void> {
    this.checkAlive()
    const what = `${this.variant}.setWeights`
    if (!Array.isArray(weightValues) || weightValues.length === 0) {
      throw new TypeError(`${what}: expected the list getWeights returns ('iter', then '${STATE_WEIGHT}/<i>' tensors)`)
    }
    const [iter, ...rest] = weightValues
    if (iter?.name !== 'iter' || iter.tensor?.size !== 1) {
      throw new TypeError(`${what}: the first weight must be the scalar 'iter' (the step count), got '${String(iter?.name)}'`)
    }
    const count = (await iter.tensor.data())[0]
    if (!Number.isSafeInteger(count) || count < 0) throw new RangeError(`${what}: 'iter' must be a step count (an integer ≥ 0), got ${count}`)
    const pending: Pending[] = []
    const seen = new Set<string>()
    for (const w of rest) {
      if (typeof w?.name !== 'string' || !STATE_NAME.test(w.name)) {
        throw new TypeError(`${what}: unexpected weight '${String(w?.name)}' (expected '${STATE_WEIGHT}/<i>')`)
      }
      if (w.tensor?.dtype !== 'int32') throw new TypeError(`${what}: weight '${w.name}' must be int32, got ${String(w.tensor?.dtype)}`)
      const p = unpack(await w.tensor.data<'int32'>(), `${what}: weight '${w.name}'`, this.variant)
      for (const n of p.names) {
        if (seen.has(n)) throw new RangeError(`${what}: variable '${n}' is in two saved states`)
        seen.add(n)
      }
      pending.push(p)
    }
    this.dropStates()
    this.book.pending = pending
    this.iterations_ = count
  }

  private dropStates(): void {
    for (const g of this.book.groups.values()) g.state.dispose()
    this.book = { groups: new Map(), holders: new Map(), pending: [] }
  }

  /**
   * The options, for `tf.serialization` (and `model.save`), with the current
   * {@link PsgdTfjsOptimizer.learningRate}.
   * A schedule made by `precondUpdateProbSchedule` is written as its options, and
   * {@link PsgdTfjsOptimizer.fromConfig} makes it again.
   * An `onWarning` hook is left out (a config holds no function; `null` is kept).
   * @throws TypeError when an option is any other function (a schedule or mask), which no config can hold.
   */
  getConfig(): serialization.ConfigDict {
    const config: serialization.ConfigDict = {}
    for (const [k, v] of Object.entries({ learningRate: this.rate, ...this.options })) {
      if (v === undefined || (k === 'onWarning' && typeof v === 'function')) continue
      if (typeof v === 'function') {
        // a schedule made by precondUpdateProbSchedule is data (its options)
        const data = scheduleAsData(v as Schedule)
        if (data === undefined) throw new TypeError(`${this.variant}.getConfig: option '${k}' is a function, which a config cannot hold`)
        config[k] = data as unknown as serialization.ConfigDictValue
        continue
      }
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
      const schedule = scheduleFromData(v)
      if (schedule !== undefined) {
        options[k] = schedule
        continue
      }
      const snake = typeof v === 'string' ? snakeCase(v) : v
      options[k] = snake !== v && !accepts({ [k]: v }) && accepts({ [k]: snake }) ? snake : v
    }
    return new cls(options)
  }

  /**
   * Frees the native states now (momentum and preconditioner factors) and the tensors the
   * last {@link PsgdTfjsOptimizer.getWeights} handed out; later use throws a TypeError.
   */
  override dispose(): void {
    this.dropStates()
    this.releaseWeights()
    this.disposed = true
  }
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
function pack(p: { names: string[]; bytes: Uint8Array }): TfTensor {
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

/** A packed state, checked as far as its header goes (the state itself is checked when it is loaded). */
function unpack(words: Int32Array, what: string, variant: string): Pending {
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
  const bytes = buf.slice(8 + nameLen, 8 + nameLen + stateLen)
  const header = stateHeader(bytes, what)
  // 'KronOptimizer' holds 'kron' states
  if (`${header.variant}optimizer` !== variant.toLowerCase()) throw new RangeError(`${what} holds a '${header.variant}' state, this is ${variant}`)
  if (header.shapes.length !== names.length) {
    throw new RangeError(`${what} names ${names.length} variables for a state of ${header.shapes.length}`)
  }
  return { names, shapes: header.shapes, count: header.count, bytes }
}

/** What a state's safetensors header says: its variant, leaf shapes and step count. */
function stateHeader(bytes: Uint8Array, what: string): { variant: string; shapes: number[][]; count: number } {
  try {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
    const n = Number(view.getBigUint64(0, true))
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n))) as { __metadata__: { psgd: string } }
    const meta = JSON.parse(header.__metadata__.psgd) as { variant: string; leaves: string; count: string }
    const shapes = (JSON.parse(meta.leaves) as { shape: number[] }[]).map((l) => l.shape)
    const count = Number(meta.count)
    const ok =
      8 + n <= bytes.length &&
      typeof meta.variant === 'string' &&
      Number.isSafeInteger(count) &&
      shapes.every((s) => Array.isArray(s) && s.every((d) => Number.isSafeInteger(d) && d >= 0))
    if (ok) return { variant: meta.variant, shapes, count }
  } catch {
    // reported below
  }
  throw new RangeError(`${what} is not a PSGD state (no state header)`)
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
