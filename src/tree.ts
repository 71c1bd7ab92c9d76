import { Tensor } from './tensor'

/** A plain leaf: row-major float32 values and a shape. */
export interface ArrayLeaf {
  data: Float32Array
  shape: number[]
}

/** A leaf of a parameter tree: a native {@link Tensor}, a plain `{ data, shape }`, or a number. */
export type Leaf = Tensor | ArrayLeaf | number

/** A parameter tree: a leaf, or nested plain objects and arrays of trees (`null`/`undefined` are empty). */
export type PyTree = Leaf | null | undefined | PyTree[] | { [key: string]: PyTree }

/** A mask: a tree of booleans shaped like the params, or a predicate on each leaf. */
export type Mask = boolean | null | undefined | Mask[] | { [key: string]: Mask } | ((path: string, leaf: Leaf) => boolean)

/** The structure of a tree, without its leaves. */
export type TreeDef =
  | { kind: 'leaf' }
  | { kind: 'none'; value: null | undefined }
  | { kind: 'array'; children: TreeDef[] }
  | { kind: 'object'; keys: string[]; children: TreeDef[] }

/** A flattened tree: leaves in order, their paths, and how to put them back. */
export interface Flat<L> {
  leaves: L[]
  paths: string[]
  treedef: TreeDef
  /** `set[i](v)` stores `v` in the container that holds leaf `i` (in place); empty unless asked for. */
  set: ((v: L) => void)[]
}

function isPlainObject(x: unknown): x is Record<string, unknown> {
  if (x === null || typeof x !== 'object') return false
  const proto = Object.getPrototypeOf(x)
  return proto === Object.prototype || proto === null
}

/** Whether `x` is a leaf (a Tensor, a `{ data: Float32Array, shape }` object, or a number). */
export function isLeaf(x: unknown): x is Leaf {
  if (x instanceof Tensor || typeof x === 'number') return true
  return isPlainObject(x) && x.data instanceof Float32Array && Array.isArray(x.shape)
}

function join(prefix: string, key: string | number): string {
  return prefix === '' ? String(key) : `${prefix}.${key}`
}

/**
 * Flattens a tree into leaves in a fixed order: arrays by index, objects by sorted key (as
 * JAX does for dicts), so trees built in different key order flatten the same way.
 * `set` is filled only with `withSetters` (an in-place writer needs it; a step's inputs do
 * not, and making a closure per node is a measurable part of a small model's step).
 */
export function flatten<L = Leaf>(tree: unknown, isLeafFn: (x: unknown) => boolean = isLeaf, what = 'tree', withSetters = false): Flat<L> {
  const leaves: L[] = []
  const paths: string[] = []
  const set: ((v: L) => void)[] = []
  // the containers from the root down to the current node: a cycle revisits one of them
  const open: unknown[] = []
  const walk = (x: unknown, path: string, setter: ((v: L) => void) | null): TreeDef => {
    if (isLeafFn(x)) {
      leaves.push(x as L)
      paths.push(path)
      if (setter) set.push(setter)
      return { kind: 'leaf' }
    }
    if (x === null || x === undefined) return { kind: 'none', value: x }
    if (typeof x === 'object' && open.includes(x)) throw new TypeError(`${what}: '${path || '(root)'}' is a cycle`)
    if (Array.isArray(x)) {
      open.push(x)
      const children = x.map((c, i) => walk(c, join(path, i), withSetters ? (v) => (x[i] = v) : null))
      open.pop()
      return { kind: 'array', children }
    }
    if (isPlainObject(x)) {
      if ('data' in x && 'shape' in x) {
        // shaped like a plain leaf: say what is wrong with it rather than descend into it
        const d = x.data as { constructor?: { name?: string } } | null
        const kind = d === null || d === undefined ? String(d) : (d.constructor?.name ?? typeof d)
        throw new TypeError(`${what} '${path || '(root)'}': data must be a Float32Array (float32), got ${kind}`)
      }
      open.push(x)
      const keys = Object.keys(x).sort()
      const children = keys.map((k) => walk(x[k], join(path, k), withSetters ? (v) => (x[k] = v) : null))
      open.pop()
      return { kind: 'object', keys, children }
    }
    throw new TypeError(`${what}: '${path || '(root)'}' is not a leaf (Tensor, { data: Float32Array, shape }, number), array or plain object`)
  }
  const root = { value: tree }
  const treedef = walk(tree, '', withSetters ? (v) => (root.value = v) : null)
  return { leaves, paths, treedef, set }
}

/**
 * The leaves of `tree` in flatten order when its structure is exactly `treedef`, else
 * null. A step's grads almost always have the params' structure: walking the known
 * structure skips the sort and path strings of {@link flatten}, a measurable part of a
 * small model's step. On null, callers flatten in full, which explains any difference.
 */
export function leavesLike<L = Leaf>(tree: unknown, treedef: TreeDef, isLeafFn: (x: unknown) => boolean = isLeaf): L[] | null {
  const leaves: L[] = []
  const walk = (x: unknown, d: TreeDef): boolean => {
    switch (d.kind) {
      case 'leaf':
        if (!isLeafFn(x)) return false
        leaves.push(x as L)
        return true
      case 'none':
        return x === d.value
      case 'array':
        if (!Array.isArray(x) || isLeafFn(x) || x.length !== d.children.length) return false
        for (let i = 0; i < x.length; i++) if (!walk(x[i], d.children[i])) return false
        return true
      case 'object': {
        if (!isPlainObject(x) || isLeafFn(x) || Object.keys(x).length !== d.keys.length) return false
        for (let i = 0; i < d.keys.length; i++) {
          const k = d.keys[i]
          // own and enumerable, as Object.keys: with the count equal, the key sets are
          if (!Object.prototype.propertyIsEnumerable.call(x, k) || !walk(x[k], d.children[i])) return false
        }
        return true
      }
    }
  }
  return walk(tree, treedef) ? leaves : null
}

/** Builds a tree with the structure `treedef` from `leaves` (in flatten order). */
export function unflatten<T = PyTree>(treedef: TreeDef, leaves: readonly unknown[]): T {
  let i = 0
  const build = (d: TreeDef): unknown => {
    switch (d.kind) {
      case 'leaf':
        return leaves[i++]
      case 'none':
        return d.value
      case 'array':
        return d.children.map(build)
      case 'object': {
        const out: Record<string, unknown> = {}
        d.keys.forEach((k, j) => (out[k] = build(d.children[j])))
        return out
      }
    }
  }
  const out = build(treedef)
  if (i !== leaves.length) throw new RangeError(`unflatten: ${leaves.length} leaves for a tree of ${i}`)
  return out as T
}

/** Describes where two flattened trees differ, or returns null when their paths agree. */
export function structureMismatch(expected: readonly string[], got: readonly string[]): string | null {
  const want = new Set(expected)
  const have = new Set(got)
  const missing = expected.find((p) => !have.has(p))
  if (missing !== undefined) return `leaf '${missing}' is missing`
  const extra = got.find((p) => !want.has(p))
  if (extra !== undefined) return `leaf '${extra}' is not in the params`
  if (expected.length !== got.length) return `has ${got.length} leaves, expected ${expected.length}`
  return null
}

/**
 * Resolves a mask to one boolean per leaf. A mask tree must have a boolean for every leaf
 * path; a predicate is called as `mask(path, leaf)`.
 */
export function resolveMask(mask: Mask, name: string, paths: readonly string[], leaves: readonly Leaf[], fallback: boolean): boolean[] {
  if (mask === undefined || mask === null) return paths.map(() => fallback)
  if (typeof mask === 'function') {
    return paths.map((p, i) => {
      const v = mask(p, leaves[i])
      if (typeof v !== 'boolean') throw new TypeError(`${name}: the predicate returned ${String(v)} for '${p}', expected a boolean`)
      return v
    })
  }
  if (typeof mask === 'boolean') return paths.map(() => mask)
  const flat = flatten<boolean>(mask, (x) => typeof x === 'boolean', name)
  const byPath = new Map(flat.paths.map((p, i) => [p, flat.leaves[i]]))
  return paths.map((p) => {
    const v = byPath.get(p)
    if (v === undefined) throw new TypeError(`${name}: no boolean for leaf '${p}'`)
    return v
  })
}
