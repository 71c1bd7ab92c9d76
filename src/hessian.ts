/**
 * `hessianHelper`: everything the Hessian-based mode of Kron, XMat, LRA and Affine needs
 * for one step, from a loss-and-gradient function (psgd-jax's `hessian_helper`).
 */
import { call, native, type NativeTensor } from './native'
import { preview, showPath, showShape } from './describe'
import { checkShape, readValues, Tensor } from './tensor'
import { dataProblem, flatten, isLeaf, structureMismatch, unflatten, type ArrayLeaf, type Leaf, type PyTree } from './tree'

/** What `lossAndGrad(params)` returns. */
export interface LossAndGrad<L = number> {
  /** The loss (any value; passed through). */
  loss: L
  /** The gradient: a tree like the params. */
  grads: PyTree
}

/** Options of {@link hessianHelper}. */
export interface HessianHelperOptions<P extends PyTree = PyTree> {
  /**
   * The step count (e.g. `state.count`): the preconditioner is always updated on steps 0
   * and 1, as psgd-jax does, and the random draws differ from step to step. Default 0.
   */
  step?: number
  /** Seed of the probe vector and the update draw (with `step`). Default 0. */
  seed?: number
  /** Probability of updating the preconditioner this step. Default 1. */
  preconditionerUpdateProbability?: number
  /**
   * An exact Hessian-vector product `hvp(params, vector)`. Without it the product is a
   * central finite difference of two extra gradient calls.
   */
  hvp?: (params: P, vector: P) => PyTree | Promise<PyTree>
}

/** What {@link hessianHelper} returns; pass the last three to `update` as `extra`. */
export interface HessianHelperResult<L = number> {
  /** The loss at `params`. */
  loss: L
  /** The gradient at `params`. */
  grads: PyTree
  /** `H·vector` (zeros when `updatePreconditioner` is false, as psgd-jax passes dummies). */
  hvp: PyTree
  /** The probe vector (zeros when `updatePreconditioner` is false). */
  vector: PyTree
  /** Whether the optimizer should update its preconditioner this step. */
  updatePreconditioner: boolean
}

/**
 * Calls `f` with the leaves as native tensors on their devices (plain leaves are copied in,
 * and those copies freed when it returns rather than when a finalizer gets to them).
 */
function withNativeLeaves<R>(leaves: Leaf[], paths: string[], what: string, f: (ts: NativeTensor[]) => R): R {
  const temps: NativeTensor[] = []
  try {
    const ts = toNativeLeaves(leaves, paths, what, temps)
    return f(ts)
  } finally {
    for (const t of temps) t.dispose()
  }
}

function toNativeLeaves(leaves: Leaf[], paths: string[], what: string, temps: NativeTensor[]): NativeTensor[] {
  return leaves.map((leaf, i) => {
    if (leaf instanceof Tensor) {
      if (leaf.disposed) throw new TypeError(`hessianHelper: ${what} '${paths[i]}': the tensor was disposed`)
      return leaf.native
    }
    const at = `hessianHelper: ${what} '${showPath(paths[i])}'`
    const data = typeof leaf === 'number' ? Float32Array.of(leaf) : leaf.data
    const shape = typeof leaf === 'number' ? [] : leaf.shape
    const problem = dataProblem(data)
    if (problem !== null) throw new TypeError(`${at}: ${problem}`)
    checkShape(shape, at)
    const n = shape.reduce((a, b) => a * b, 1)
    if (data.length !== n) throw new RangeError(`${at} has ${data.length} values, its shape ${showShape(shape)} needs ${n}`)
    const t = call(() => native.NativeTensor.fromArray(data, [...shape], 'float32', 'cpu'), at)
    temps.push(t)
    return t
  })
}

/** A leaf like `like` (kind, shape) holding the native tensor `t`. */
function leafFrom(like: Leaf, t: NativeTensor): Leaf {
  if (like instanceof Tensor) return new Tensor(t, like.shapeView())
  const data = readValues(t, typeof like === 'number' ? [] : (like as ArrayLeaf).shape)
  t.dispose()
  if (typeof like === 'number') return data[0]
  return { data, shape: [...(like as ArrayLeaf).shape] }
}

/** A leaf like `like` holding zeros. */
function zerosLike(like: Leaf): Leaf {
  if (typeof like === 'number') return 0
  if (like instanceof Tensor)
    return Tensor.fromArray(new Float32Array(like.shapeView().reduce((a, b) => a * b, 1)), like.shape, { device: like.device, dtype: like.dtype })
  return { data: new Float32Array((like as ArrayLeaf).data.length), shape: [...(like as ArrayLeaf).shape] }
}

/** A leaf's shape without an N-API call for a plain leaf or a number. */
function shapeOf(leaf: Leaf): readonly number[] {
  return typeof leaf === 'number' ? [] : leaf instanceof Tensor ? leaf.shapeView() : leaf.shape
}

/**
 * The leaves of a tree returned by a callback (`what`: the gradients of `lossAndGrad`,
 * the result of `hvp`), checked to be the params' tree, leaf for leaf: the same paths,
 * shapes and (for Tensors) dtype, float32 data for plain leaves.
 */
function checkGradTree(grads: unknown, params: { leaves: Leaf[]; paths: string[] }, what: string): Leaf[] {
  const flat = flatten<Leaf>(grads, isLeaf, `hessianHelper: ${what}`)
  const bad = structureMismatch(params.paths, flat.paths)
  if (bad) throw new RangeError(`hessianHelper: ${what}: ${bad}`)
  if (flat.paths.some((p, i) => p !== params.paths[i])) throw new RangeError(`hessianHelper: ${what}: the leaves are not in the params' order`)
  flat.leaves.forEach((g, i) => {
    const at = `hessianHelper: ${what} '${showPath(flat.paths[i])}'`
    const want = shapeOf(params.leaves[i])
    if (!(g instanceof Tensor)) {
      const problem = typeof g === 'number' ? null : dataProblem(g.data)
      if (problem !== null) throw new TypeError(`${at}: ${problem}`)
    } else if (g.disposed) throw new TypeError(`${at}: the tensor was disposed`)
    const got = shapeOf(g)
    if (got.length !== want.length || got.some((d, k) => d !== want[k])) {
      throw new RangeError(`${at} has shape ${showShape(got)}, the param has ${showShape(want)}`)
    }
    const p = params.leaves[i]
    if (g instanceof Tensor && p instanceof Tensor && g.dtype !== p.dtype) {
      throw new TypeError(`${at} has dtype ${g.dtype}, the param has ${p.dtype}: convert it with .to({ dtype: '${p.dtype}' })`)
    }
  })
  return flat.leaves
}

/** The `{ loss, grads }` a `lossAndGrad` call returned, checked. */
function lossAndGrads<L>(r: unknown, params: { leaves: Leaf[]; paths: string[] }): { loss: L; grads: PyTree; leaves: Leaf[] } {
  if (r === null || typeof r !== 'object' || !('grads' in r)) {
    throw new TypeError(`hessianHelper: lossAndGrad must return { loss, grads }, got ${preview(r)}`)
  }
  const { loss, grads } = r as LossAndGrad<L>
  return { loss, grads, leaves: checkGradTree(grads, params, 'grads') }
}

/**
 * Computes the loss and gradient at `params` and, when this step updates the
 * preconditioner, a probe vector `v` and the Hessian-vector product `H·v`, for
 * `optimizer.update(grads, state, params, { hvp, vector, updatePreconditioner })`.
 *
 * The update decision is `u < preconditionerUpdateProbability` for a uniform draw `u`, and
 * always true on steps 0 and 1. Without an exact `hvp` function, `H·v` is the central
 * difference `(∇f(p + δv) − ∇f(p − δv)) / 2δ` with `δ = ∛ε₃₂ · max(1, rms(p)) / rms(v)`,
 * the step that balances float32 rounding against the truncation error; the returned
 * `vector` is the perturbation actually realised in float32 divided by `2δ`, so that on a
 * quadratic `hvp = H·vector` holds to rounding.
 */
export async function hessianHelper<P extends PyTree, L = number>(
  lossAndGrad: (params: P) => LossAndGrad<L> | Promise<LossAndGrad<L>>,
  params: P,
  options: HessianHelperOptions<P> = {},
): Promise<HessianHelperResult<L>> {
  const { step = 0, seed = 0, preconditionerUpdateProbability = 1, hvp } = options
  if (typeof lossAndGrad !== 'function') throw new TypeError('hessianHelper: lossAndGrad must be a function')
  if (!Number.isInteger(step) || step < 0) throw new RangeError(`hessianHelper: option 'step' must be a non-negative integer, got ${preview(step)}`)
  if (!Number.isInteger(seed)) throw new RangeError(`hessianHelper: option 'seed' must be an integer, got ${preview(seed)}`)
  const p = preconditionerUpdateProbability
  if (typeof p !== 'number' || !(p >= 0 && p <= 1)) {
    throw new RangeError(`hessianHelper: option 'preconditionerUpdateProbability' must be in [0, 1], got ${preview(p)}`)
  }
  if (hvp !== undefined && typeof hvp !== 'function') throw new TypeError("hessianHelper: option 'hvp' must be a function (params, vector) => tree")

  const flat = flatten<Leaf>(params, isLeaf, 'params')
  // the decision, the probe and the shifted points are drawn natively, on the leaves' own
  // device, from the package's one random source (seeded by `seed` and `step`)
  const probe = withNativeLeaves(flat.leaves, flat.paths, 'params', (ts) => call(() => native.hessianProbe(ts, seed, step, p), 'hessianHelper'))
  const updatePreconditioner = probe.updatePreconditioner
  const { loss, grads } = lossAndGrads<L>(await lossAndGrad(params), flat)

  const zeros = () => unflatten(flat.treedef, flat.leaves.map(zerosLike))
  if (!updatePreconditioner) return { loss, grads, hvp: zeros(), vector: zeros(), updatePreconditioner }

  if (hvp) {
    const vector = unflatten<P>(
      flat.treedef,
      probe.vector().map((t, i) => leafFrom(flat.leaves[i], t)),
    )
    const h = await hvp(params, vector)
    checkGradTree(h, flat, 'hvp')
    return { loss, grads, hvp: h, vector, updatePreconditioner }
  }

  const [plus, minus] = probe.points()
  const at = (points: NativeTensor[]) =>
    unflatten<P>(
      flat.treedef,
      points.map((t, i) => leafFrom(flat.leaves[i], t)),
    )
  const gPlus = lossAndGrads<L>(await lossAndGrad(at(plus)), flat).leaves
  const gMinus = lossAndGrads<L>(await lossAndGrad(at(minus)), flat).leaves
  const [product, vector] = withNativeLeaves(gPlus, flat.paths, 'grads', (plusTs) =>
    withNativeLeaves(gMinus, flat.paths, 'grads', (minusTs) => call(() => probe.difference(plusTs, minusTs), 'hessianHelper')),
  )
  return {
    loss,
    grads,
    hvp: unflatten(
      flat.treedef,
      product.map((t, i) => leafFrom(flat.leaves[i], t)),
    ),
    vector: unflatten(
      flat.treedef,
      vector.map((t, i) => leafFrom(flat.leaves[i], t)),
    ),
    updatePreconditioner,
  }
}
