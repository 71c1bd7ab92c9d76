/**
 * `hessianHelper`: everything the Hessian-based mode of XMat, LRA and Affine needs for one
 * step, from a loss-and-gradient function (psgd-jax's `hessian_helper`).
 */
import { Tensor } from './tensor'
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

/** xoshiro128** seeded from (seed, step) through splitmix32: reproducible, no global state. */
function generator(seed: number, step: number): () => number {
  let x = (seed ^ Math.imul(step + 1, 0x9e3779b9)) >>> 0
  const split = () => {
    x = (x + 0x9e3779b9) >>> 0
    let z = x
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b)
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35)
    return (z ^ (z >>> 16)) >>> 0
  }
  const s = [split(), split(), split(), split()]
  return () => {
    const r = Math.imul(((Math.imul(s[1], 5) << 7) | (Math.imul(s[1], 5) >>> 25)) >>> 0, 9) >>> 0
    const t = s[1] << 9
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = ((s[3] << 11) | (s[3] >>> 21)) >>> 0
    return r / 4294967296
  }
}

/** Standard normal draws (Box–Muller). */
function normals(uniform: () => number, n: number): Float64Array {
  const out = new Float64Array(n)
  for (let i = 0; i < n; i += 2) {
    const u1 = 1 - uniform()
    const u2 = uniform()
    const r = Math.sqrt(-2 * Math.log(u1))
    out[i] = r * Math.cos(2 * Math.PI * u2)
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * u2)
  }
  return out
}

function leafValues(leaf: Leaf): Float32Array {
  if (typeof leaf === 'number') return Float32Array.of(leaf)
  return leaf instanceof Tensor ? leaf.toArray() : leaf.data
}

/** A leaf like `like` (kind, shape, device, dtype) holding `values`. */
function leafLike(like: Leaf, values: ArrayLike<number>): Leaf {
  if (typeof like === 'number') return Math.fround(values[0])
  const data = Float32Array.from(values)
  if (like instanceof Tensor) return Tensor.fromArray(data, like.shape, { device: like.device, dtype: like.dtype })
  return { data, shape: [...(like as ArrayLeaf).shape] }
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
  const uniform = generator(seed, step)
  const updatePreconditioner = Math.fround(uniform()) < Math.fround(p) || step < 2
  const { loss, grads } = await lossAndGrad(params)
  checkGradTree(grads, flat.paths, 'grads')

  const zeros = () =>
    unflatten(
      flat.treedef,
      flat.leaves.map((l) => leafLike(l, new Float32Array(leafValues(l).length))),
    )
  if (!updatePreconditioner) return { loss, grads, hvp: zeros(), vector: zeros(), updatePreconditioner }

  const values = flat.leaves.map(leafValues)
  const sizes = values.map((v) => v.length)
  const n = sizes.reduce((a, b) => a + b, 0)
  const draws = normals(uniform, n)
  const drawn: Float64Array[] = []
  let at = 0
  for (const size of sizes) {
    drawn.push(draws.subarray(at, at + size))
    at += size
  }

  if (hvp) {
    const vector = unflatten<P>(
      flat.treedef,
      flat.leaves.map((l, i) => leafLike(l, drawn[i])),
    )
    const h = await hvp(params, vector)
    checkGradTree(h, flat.paths, 'hvp')
    return { loss, grads, hvp: h, vector, updatePreconditioner }
  }

  const rms = (vs: ArrayLike<number>[]) => Math.sqrt(vs.reduce((s, v) => s + Array.from(v).reduce((a, x) => a + x * x, 0), 0) / Math.max(n, 1))
  const delta = (Math.cbrt(2 ** -23) * Math.max(1, rms(values))) / Math.max(rms(drawn), 1e-30)
  const shifted = (sign: number) => values.map((v, i) => v.map((x, j) => x + sign * delta * drawn[i][j]))
  const plus = shifted(1)
  const minus = shifted(-1)
  const gPlus = checkGradTree(
    (
      await lossAndGrad(
        unflatten<P>(
          flat.treedef,
          flat.leaves.map((l, i) => leafLike(l, plus[i])),
        ),
      )
    ).grads,
    flat.paths,
    'grads',
  )
  const gMinus = checkGradTree(
    (
      await lossAndGrad(
        unflatten<P>(
          flat.treedef,
          flat.leaves.map((l, i) => leafLike(l, minus[i])),
        ),
      )
    ).grads,
    flat.paths,
    'grads',
  )
  const vector = flat.leaves.map((l, i) =>
    leafLike(
      l,
      plus[i].map((x, j) => (x - minus[i][j]) / (2 * delta)),
    ),
  )
  const product = flat.leaves.map((l, i) => {
    const a = leafValues(gPlus[i])
    const b = leafValues(gMinus[i])
    return leafLike(
      l,
      Array.from(a, (x, j) => (x - b[j]) / (2 * delta)),
    )
  })
  return { loss, grads, hvp: unflatten(flat.treedef, product), vector: unflatten(flat.treedef, vector), updatePreconditioner }
}
