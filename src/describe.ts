/**
 * Short descriptions of values for error messages: what a value is (its type, length and
 * first few items), never the whole of it, so that a message about a million-element
 * argument stays a line long.
 */

/** Items of an array-like shown in a preview. */
const ITEMS = 4
/** Characters of a string, a path or a key shown in a preview. */
const CHARS = 40

/** `s` cut to `max` characters (with `…` when cut). */
export function clip(s: string, max = CHARS): string {
  return s.length <= max ? s : `${s.slice(0, max - 1)}…`
}

/** A leaf path for a message: `(root)` for the empty path, the ends of a very long one. */
export function showPath(path: string): string {
  if (path === '') return '(root)'
  if (path.length <= 2 * CHARS) return path
  return `${path.slice(0, CHARS)}…${path.slice(-CHARS + 1)}`
}

/** The first {@link ITEMS} items of an array-like, as `[a, b, c, …]`. */
function firstItems(x: ArrayLike<unknown>): string {
  const shown: string[] = []
  for (let i = 0; i < Math.min(x.length, ITEMS); i++) shown.push(item(x[i]))
  return `[${shown.join(', ')}${x.length > ITEMS ? ', …' : ''}]`
}

/** One item inside a preview: scalars as themselves, anything else by its kind. */
function item(v: unknown): string {
  if (typeof v === 'number' || typeof v === 'boolean' || v === null || v === undefined) return String(v)
  if (typeof v === 'bigint') return `${v}n`
  if (typeof v === 'string') return `'${clip(v, 12)}'`
  return kindOf(v)
}

/** The constructor's name of an object (`Object` for a plain one, `null-prototype object`). */
export function className(x: object): string {
  const proto: unknown = Object.getPrototypeOf(x)
  if (proto === null) return 'null-prototype object'
  const ctor = (proto as { constructor?: { name?: unknown } }).constructor
  return typeof ctor?.name === 'string' && ctor.name !== '' ? ctor.name : 'object'
}

/** A one-word kind: `a Float64Array`, `an Array`, `a Map`, `a string`. */
export function kindOf(v: unknown): string {
  if (v === null || v === undefined) return String(v)
  if (typeof v !== 'object' && typeof v !== 'function') return article(typeof v)
  if (typeof v === 'function') return 'a function'
  return article(className(v))
}

function article(word: string): string {
  return /^[aeiouAEIOU]/.test(word) ? `an ${word}` : `a ${word}`
}

/**
 * A short description of any value for an error message: scalars as themselves (strings
 * cut), typed arrays and arrays as kind, length and first items, other objects by kind
 * and their first keys. At most about 120 characters, whatever the value.
 */
export function preview(v: unknown): string {
  if (typeof v === 'string') return `'${clip(v)}'`
  if (typeof v === 'bigint') return `${clip(String(v), 20)}n`
  if (typeof v === 'symbol') return clip(v.toString())
  if (typeof v === 'function') return `a function${v.name ? ` (${clip(v.name, 20)})` : ''}`
  if (v === null || typeof v !== 'object') return String(v)
  try {
    if (ArrayBuffer.isView(v)) {
      if (v instanceof DataView) return `a DataView of ${v.byteLength} bytes`
      const a = v as unknown as ArrayLike<unknown>
      return `${kindOf(v)} of ${a.length} values ${firstItems(a)}`
    }
    if (Array.isArray(v)) return `${kindOf(v)} of ${v.length} items ${firstItems(v)}`
    if (v instanceof Map || v instanceof Set) return `${kindOf(v)} of ${v.size} entries`
    if (v instanceof ArrayBuffer) return `an ArrayBuffer of ${v.byteLength} bytes`
    const keys = Object.keys(v)
    const shown = keys.slice(0, ITEMS).map((k) => clip(k, 16))
    return `${kindOf(v)} with keys {${shown.join(', ')}${keys.length > ITEMS ? ', …' : ''}}`
  } catch {
    // a revoked Proxy or a throwing trap: say what can be said without touching it
    return 'an object that cannot be inspected'
  }
}

/** A shape for a message: `[2,3]` as JSON when short, else a {@link preview}. */
export function showShape(shape: unknown): string {
  return Array.isArray(shape) && shape.length <= 8 && shape.every((d) => typeof d === 'number') ? JSON.stringify(shape) : preview(shape)
}
