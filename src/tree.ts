import { kindOf, preview, showPath } from './describe'
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

/**
 * Whether `x` is a Float32Array, also one made in another realm (a `vm` context, an
 * iframe), which `instanceof` does not recognise but the native side reads alike.
 */
export function isFloat32Array(x: unknown): x is Float32Array {
  return x instanceof Float32Array || (ArrayBuffer.isView(x) && Object.prototype.toString.call(x) === '[object Float32Array]')
}

/** Whether `x` is a leaf (a Tensor, a `{ data: Float32Array, shape }` object, or a number). */
export function isLeaf(x: unknown): x is Leaf {
  if (x instanceof Tensor || typeof x === 'number') return true
  return isPlainObject(x) && isFloat32Array(x.data) && Array.isArray(x.shape)
}

function join(prefix: string, key: string | number): string {
  return prefix === '' ? String(key) : `${prefix}.${key}`
}

/** How deep a tree may nest: deeper is surely a mistake, and would exhaust the stack. */
export const MAX_DEPTH = 1000

/**
 * What is wrong with `data` as a plain leaf's values, and how to fix it; null when it is
 * a Float32Array.
 */
export function dataProblem(data: unknown): string | null {
  if (isFloat32Array(data)) return null
  const head = `data must be a Float32Array (float32), got ${preview(data).replace(/^an? /, '')}`
  if (data instanceof DataView) return `${head}: use new Float32Array(view.buffer, view.byteOffset, view.byteLength / 4) if it holds float32 values`
  if (data instanceof BigInt64Array || data instanceof BigUint64Array) return `${head}: convert it with Float32Array.from(data, Number)`
  if (ArrayBuffer.isView(data)) return `${head}: convert it with Float32Array.from(data)`
  if (Array.isArray(data)) return `${head}: convert it with Float32Array.from(data) (JSON.parse gives plain arrays)`
  if (data instanceof ArrayBuffer) return `${head}: view it with new Float32Array(buffer)`
  if (isPlainObject(data) && Object.keys(data).every((k) => /^(0|[1-9]\d*)$/.test(k))) {
    return `${head}: a Float32Array through JSON.stringify becomes such an object; rebuild it with Float32Array.from(Object.values(data))`
  }
  return head
}

/** What is wrong with `shape` as a plain leaf's shape, and how to fix it; null when it is an array. */
export function shapeProblem(shape: unknown): string | null {
  if (Array.isArray(shape)) return null
  const head = `shape must be an array of non-negative integers, got ${preview(shape)}`
  return ArrayBuffer.isView(shape) ? `${head}: convert it with Array.from(shape)` : head
}

/** Why `x` (not a leaf, array or plain object) cannot be in a tree, and what to pass instead. */
function notALeaf(x: unknown): string {
  const got = preview(x)
  switch (typeof x) {
    case 'bigint':
      return `${got} is a bigint: use Number(x)`
    case 'string':
    case 'boolean':
    case 'symbol':
      return `${kindOf(x)} ${got}`
    case 'function':
      return `${got}: call it first, or leave it out of the tree`
  }
  if (x instanceof Map) return `${got}: use a plain object (Object.fromEntries(map))`
  if (x instanceof Set) return `${got}: use an array ([...set])`
  if (x instanceof Promise) return `${got}: await it first`
  if (x instanceof Number) return `${got}: use the primitive number (x.valueOf())`
  if (isFloat32Array(x)) return `${got} on its own: wrap it as { data, shape: [data.length] }`
  if (ArrayBuffer.isView(x)) return `${got}: wrap it as { data: Float32Array.from(x), shape: [x.length] }`
  return `${got}: trees are built from plain objects and arrays; copy its fields into a plain object, or pass a Tensor or { data, shape }`
}

/** Whether a plain object is what `structuredClone`/`postMessage` make of a {@link Tensor}. */
function isClonedTensor(x: Record<string, unknown>): boolean {
  return 'native' in x && ('cachedShape' in x || 'disposeCalled' in x)
}

/** Throws when container `x` cannot take a new value at `key` (read-only: frozen, or a getter without a setter). */
function checkWritable(x: object, key: string | number, what: string, path: string): void {
  const d = Object.getOwnPropertyDescriptor(x, key)
  if (d && (d.writable === false || (d.get && !d.set))) {
    throw new TypeError(
      `${what} '${showPath(path)}' is a number in a read-only property (a frozen object or a getter): the optimizer writes a new number there; make it writable, or use a { data: Float32Array, shape: [] } leaf`,
    )
  }
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
  const walk = (x: unknown, path: string, setter: ((v: L) => void) | null, depth: number): TreeDef => {
    if (isLeafFn(x)) {
      leaves.push(x as L)
      paths.push(path)
      if (setter) set.push(setter)
      return { kind: 'leaf' }
    }
    if (x === null || x === undefined) return { kind: 'none', value: x }
    const at = `${what}: '${showPath(path)}'`
    if (typeof x === 'object' && open.includes(x)) throw new TypeError(`${at} is a cycle`)
    if (depth > MAX_DEPTH) throw new RangeError(`${at} is nested more than ${MAX_DEPTH} levels deep: flatten the tree`)
    if (typeof x === 'object' && Object.getOwnPropertySymbols(x).some((k) => Object.prototype.propertyIsEnumerable.call(x, k))) {
      throw new TypeError(`${at} has symbol keys, which a tree cannot hold (they would be skipped): use string keys`)
    }
    if (Array.isArray(x)) {
      const keys = Object.keys(x)
      if (keys.length !== x.length) {
        const hole = Array.from({ length: x.length }, (_, i) => i).find((i) => !(i in x))
        if (hole !== undefined) throw new TypeError(`${what}: '${showPath(join(path, hole))}' is a hole in a sparse array: fill it (null for no leaf)`)
        const extra = keys.find((k) => !/^(0|[1-9]\d*)$/.test(k)) ?? ''
        throw new TypeError(`${at} is an array with a named property '${showPath(extra)}', which a tree cannot hold: use a plain object`)
      }
      open.push(x)
      const children = x.map((c, i) => {
        if (withSetters && typeof c === 'number') checkWritable(x, i, what, join(path, i))
        return walk(c, join(path, i), withSetters ? (v) => (x[i] = v) : null, depth + 1)
      })
      open.pop()
      return { kind: 'array', children }
    }
    if (isPlainObject(x)) {
      if ('data' in x && 'shape' in x) {
        // shaped like a plain leaf: say what is wrong with it rather than descend into it
        const problem = dataProblem(x.data) ?? shapeProblem(x.shape) ?? 'not a leaf'
        throw new TypeError(`${what} '${showPath(path)}': ${problem}`)
      }
      if (isClonedTensor(x)) {
        throw new TypeError(
          `${at} is not a leaf: it is a plain copy of a Tensor (structuredClone and postMessage copy its fields, not its native memory); send { data: t.toArray(), shape: t.shape } and rebuild it with Tensor.fromArray`,
        )
      }
      open.push(x)
      const keys = Object.keys(x).sort()
      const children = keys.map((k) => {
        const c = x[k]
        if (withSetters && typeof c === 'number') checkWritable(x, k, what, join(path, k))
        return walk(c, join(path, k), withSetters ? (v) => (x[k] = v) : null, depth + 1)
      })
      open.pop()
      return { kind: 'object', keys, children }
    }
    throw new TypeError(`${at} is not a leaf (Tensor, { data: Float32Array, shape }, number), array or plain object: it is ${notALeaf(x)}`)
  }
  const root = { value: tree }
  const treedef = walk(tree, '', withSetters ? (v) => (root.value = v) : null, 0)
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
        // defined, not assigned: a key '__proto__' (as JSON.parse makes it) stays an own key
        d.keys.forEach((k, j) => Object.defineProperty(out, k, { value: build(d.children[j]), enumerable: true, writable: true, configurable: true }))
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
  if (missing !== undefined) return `leaf '${showPath(missing)}' is missing`
  const extra = got.find((p) => !want.has(p))
  if (extra !== undefined) return `leaf '${showPath(extra)}' is not in the params`
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
      if (typeof v !== 'boolean') throw new TypeError(`${name}: the predicate returned ${preview(v)} for '${showPath(p)}', expected a boolean`)
      return v
    })
  }
  if (typeof mask === 'boolean') return paths.map(() => mask)
  const flat = flatten<boolean>(mask, (x) => typeof x === 'boolean', name)
  const byPath = new Map(flat.paths.map((p, i) => [p, flat.leaves[i]]))
  return paths.map((p) => {
    const v = byPath.get(p)
    if (v === undefined) throw new TypeError(`${name}: no boolean for leaf '${showPath(p)}'`)
    return v
  })
}
