/**
 * A minimal safetensors reader/writer for crafting damaged or edited checkpoints in tests,
 * with the checksum the core writes (so an edit can be made to pass the checksum and reach
 * the checks behind it).
 */
import { crc32 } from 'node:zlib'

export interface Entry {
  dtype: string
  shape: number[]
  data: Uint8Array
}

export interface File {
  tensors: Map<string, Entry>
  /** The `psgd` metadata object (string values). */
  meta: Record<string, string>
}

export function parse(bytes: Uint8Array): File {
  const buf = Buffer.from(bytes)
  const n = Number(buf.readBigUInt64LE(0))
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, unknown>
  const data = buf.subarray(8 + n)
  const tensors = new Map<string, Entry>()
  for (const [name, v] of Object.entries(header)) {
    if (name === '__metadata__') continue
    const e = v as { dtype: string; shape: number[]; data_offsets: [number, number] }
    const [a, b] = e.data_offsets
    tensors.set(name, { dtype: e.dtype, shape: e.shape, data: new Uint8Array(data.subarray(a, b)) })
  }
  const meta = JSON.parse((header.__metadata__ as Record<string, string> | undefined)?.psgd ?? '{}') as Record<string, string>
  return { tensors, meta }
}

/** The core's checksum: CRC-32 over tensors by name (name, dtype, shape as u64 LE, bytes), then metadata by key. */
export function checksum(f: File): string {
  let h = 0
  for (const name of [...f.tensors.keys()].sort()) {
    const e = f.tensors.get(name) as Entry
    h = crc32(Buffer.from(name), h)
    h = crc32(Buffer.from(e.dtype), h)
    for (const d of e.shape) {
      const b = Buffer.alloc(8)
      b.writeBigUInt64LE(BigInt(d))
      h = crc32(b, h)
    }
    h = crc32(e.data, h)
  }
  for (const k of Object.keys(f.meta).sort()) {
    if (k === 'checksum') continue
    h = crc32(Buffer.from(k), h)
    h = crc32(Buffer.from(f.meta[k]), h)
  }
  return h.toString(16).padStart(8, '0')
}

/** Serialises `f`; with `sign`, its checksum is recomputed first (an edit that passes it). */
export function write(f: File, sign = true): Uint8Array {
  const meta: Record<string, string> = { ...f.meta }
  if (sign) meta.checksum = checksum(f)
  const sorted = Object.fromEntries(Object.entries(meta).sort(([a], [b]) => (a < b ? -1 : 1)))
  const header: Record<string, unknown> = { __metadata__: { psgd: JSON.stringify(sorted) } }
  let offset = 0
  const parts: Uint8Array[] = []
  for (const [name, e] of f.tensors) {
    header[name] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + e.data.length] }
    offset += e.data.length
    parts.push(e.data)
  }
  let text = JSON.stringify(header)
  while ((8 + Buffer.byteLength(text)) % 8 !== 0) text += ' '
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(text)))
  return new Uint8Array(Buffer.concat([len, Buffer.from(text), ...parts]))
}
