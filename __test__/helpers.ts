import { spawnSync } from 'node:child_process'
import * as path from 'node:path'
import { Tensor, type ArrayLeaf, type PyTree } from '../index'

/** A plain leaf. */
export function leaf(values: number[], shape: number[] = [values.length]): ArrayLeaf {
  return { data: Float32Array.from(values), shape }
}

/** Deterministic pseudo-random values in [-1, 1). */
export function values(n: number, seed: number): number[] {
  let s = seed >>> 0 || 1
  return Array.from({ length: n }, () => {
    s ^= s << 13
    s ^= s >>> 17
    s ^= s << 5
    return ((s >>> 0) / 2 ** 32) * 2 - 1
  })
}

/** A copy of a tree's numbers, for before/after comparisons. */
export function snapshot(tree: PyTree): unknown {
  if (tree instanceof Tensor) return { tensor: Array.from(tree.toArray()), shape: tree.shape }
  if (typeof tree === 'number' || tree === null || tree === undefined) return tree
  if (Array.isArray(tree)) return tree.map(snapshot)
  if ((tree as ArrayLeaf).data instanceof Float32Array) {
    const l = tree as ArrayLeaf
    return { data: Array.from(l.data), shape: [...l.shape] }
  }
  return Object.fromEntries(Object.entries(tree as Record<string, PyTree>).map(([k, v]) => [k, snapshot(v)]))
}

/** The sum of squares of every leaf. */
export function sumSquares(tree: PyTree): number {
  let s = 0
  const walk = (t: PyTree): void => {
    if (t instanceof Tensor) t.toArray().forEach((x) => (s += x * x))
    else if (typeof t === 'number') s += t * t
    else if (t === null || t === undefined) return
    else if (Array.isArray(t)) t.forEach(walk)
    else if ((t as ArrayLeaf).data instanceof Float32Array) (t as ArrayLeaf).data.forEach((x) => (s += x * x))
    else Object.values(t as Record<string, PyTree>).forEach(walk)
  }
  walk(tree)
  return s
}

/** The gradient of `sumSquares`: 2·p, with the same leaf kinds. */
export function twice(tree: PyTree): PyTree {
  if (tree instanceof Tensor)
    return Tensor.fromArray(
      tree.toArray().map((x) => 2 * x),
      tree.shape,
    )
  if (typeof tree === 'number') return 2 * tree
  if (tree === null || tree === undefined) return tree
  if (Array.isArray(tree)) return tree.map(twice)
  if ((tree as ArrayLeaf).data instanceof Float32Array) {
    const l = tree as ArrayLeaf
    return { data: l.data.map((x) => 2 * x), shape: [...l.shape] }
  }
  return Object.fromEntries(Object.entries(tree as Record<string, PyTree>).map(([k, v]) => [k, twice(v)]))
}

/** The float32 tensors of a safetensors buffer, by name (for looking inside saved states). */
export function safetensors(bytes: Uint8Array): Map<string, Float32Array> {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const n = Number(buf.readBigUInt64LE(0))
  const header = JSON.parse(buf.subarray(8, 8 + n).toString()) as Record<string, { dtype: string; data_offsets: [number, number] }>
  const out = new Map<string, Float32Array>()
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__' || info.dtype !== 'F32') continue
    const [a, b] = info.data_offsets
    const slice = buf.subarray(8 + n + a, 8 + n + b)
    out.set(name, new Float32Array(slice.buffer.slice(slice.byteOffset, slice.byteOffset + slice.byteLength)))
  }
  return out
}

/** Runs `code` (TypeScript, with `psgd` imported as `p`) in a child process; returns its stdout (the child fails the test when it exits non-zero). */
export function child(code: string, env: Record<string, string> = {}): string {
  const root = path.join(__dirname, '..')
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--expose-gc', '-e', `const p = require(${JSON.stringify(root)});\n${code}`], {
    env: { ...process.env, ...env },
    encoding: 'utf8',
  })
  if (r.status !== 0) throw new Error(`child failed (${r.status}): ${r.stderr}`)
  return r.stdout
}
