/**
 * `hessianHelper`: everything the Hessian-based mode of XMat, LRA and Affine needs for one
 * step, from a loss-and-gradient function (psgd-jax's `hessian_helper`).
 */
import { call, native, type NativeTensor } from './native'
import { readValues, Tensor } from './tensor'
import { flatten, isLeaf, unflatten, type ArrayLeaf, type Leaf, type PyTree } from './tree'

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
    const data = typeof leaf === 'number' ? Float32Array.of(leaf) : leaf.data
    const shape = typeof leaf === 'number' ? [] : [...leaf.shape]
    if (!(data instanceof Float32Array)) throw new TypeError(`hessianHelper: ${what} '${paths[i]}': data must be a Float32Array`)
    const t = call(() => native.NativeTensor.fromArray(data, shape, 'float32', 'cpu'), `hessianHelper: ${what} '${paths[i]}'`)
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

function checkGradTree(grads: PyTree, paths: string[], what: string): Leaf[] {
  const flat = flatten<Leaf>(grads, isLeaf, what)
  if (flat.paths.length !== paths.length || flat.paths.some((p, i) => p !== paths[i])) {
    throw new RangeError(`hessianHelper: ${what} does not have the params' leaves`)
  }
  return flat.leaves
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
  if (!Number.isInteger(step) || step < 0) throw new RangeError(`hessianHelper: option 'step' must be a non-negative integer, got ${String(step)}`)
  if (!Number.isInteger(seed)) throw new RangeError(`hessianHelper: option 'seed' must be an integer, got ${String(seed)}`)
  const p = preconditionerUpdateProbability
  if (typeof p !== 'number' || !(p >= 0 && p <= 1)) {
    throw new RangeError(`hessianHelper: option 'preconditionerUpdateProbability' must be in [0, 1], got ${String(p)}`)
  }
  if (hvp !== undefined && typeof hvp !== 'function') throw new TypeError("hessianHelper: option 'hvp' must be a function (params, vector) => tree")

  const flat = flatten<Leaf>(params, isLeaf, 'params')
  // the decision, the probe and the shifted points are drawn natively, on the leaves' own
  // device, from the package's one random source (seeded by `seed` and `step`)
  const probe = withNativeLeaves(flat.leaves, flat.paths, 'params', (ts) => call(() => native.hessianProbe(ts, seed, step, p), 'hessianHelper'))
  const updatePreconditioner = probe.updatePreconditioner
  const { loss, grads } = await lossAndGrad(params)
  checkGradTree(grads, flat.paths, 'grads')

  const zeros = () => unflatten(flat.treedef, flat.leaves.map(zerosLike))
  if (!updatePreconditioner) return { loss, grads, hvp: zeros(), vector: zeros(), updatePreconditioner }

  if (hvp) {
    const vector = unflatten<P>(
      flat.treedef,
      probe.vector().map((t, i) => leafFrom(flat.leaves[i], t)),
    )
    const h = await hvp(params, vector)
    checkGradTree(h, flat.paths, 'hvp')
    return { loss, grads, hvp: h, vector, updatePreconditioner }
  }

  const [plus, minus] = probe.points()
  const at = (points: NativeTensor[]) =>
    unflatten<P>(
      flat.treedef,
      points.map((t, i) => leafFrom(flat.leaves[i], t)),
    )
  const gPlus = checkGradTree((await lossAndGrad(at(plus))).grads, flat.paths, 'grads')
  const gMinus = checkGradTree((await lossAndGrad(at(minus))).grads, flat.paths, 'grads')
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
