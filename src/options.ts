/**
 * Option tables: each variant lists its psgd-jax keyword arguments once, with the
 * camelCase name, the snake_case name the native core reads, and the accepted type. The
 * schedules and masks are resolved in TypeScript and never reach the core.
 */

/** How an option's value is checked before it crosses to the native core. */
export type OptionKind = 'number' | 'numberOrNull' | 'integer' | 'boolean' | 'seed' | { oneOf: readonly (string | null)[] } | 'dtype' | 'precision'

/** One option that is passed to the native core. */
export interface NativeOption {
  snake: string
  kind: OptionKind
}

/** Dtype names the `muDtype` / `precondDtype` options accept. */
export const DTYPES = ['float32', 'bfloat16', 'float16', 'float64'] as const

/** Matmul precision names (psgd-jax's `precond_*_precision`). */
export const PRECISIONS = ['bfloat16', 'tensorfloat32', 'float32'] as const

function describe(v: unknown): string {
  if (typeof v === 'string') return `'${v}'`
  if (typeof v === 'function') return 'a function'
  try {
    return JSON.stringify(v) ?? String(v)
  } catch {
    return String(v)
  }
}

/**
 * Checks `value` against `kind` and returns it as the native core wants it; throws a
 * `TypeError`/`RangeError` naming `owner` and option `name`.
 */
export function checkOption(owner: string, name: string, kind: OptionKind, value: unknown): unknown {
  const fail = (Cls: typeof TypeError, want: string): never => {
    throw new Cls(`${owner}: option '${name}' must be ${want}, got ${describe(value)}`)
  }
  if (typeof kind === 'object') {
    if (!kind.oneOf.includes(value as string | null)) fail(TypeError, `one of ${kind.oneOf.map(describe).join(', ')}`)
    return value
  }
  switch (kind) {
    case 'number':
      if (typeof value !== 'number') fail(TypeError, 'a number')
      if (!Number.isFinite(value)) fail(RangeError, 'finite')
      return value
    case 'numberOrNull':
      if (value === null) return null
      if (typeof value !== 'number') fail(TypeError, 'a number or null')
      if (!Number.isFinite(value)) fail(RangeError, 'finite')
      return value
    case 'integer':
    case 'seed':
      if (typeof value !== 'number') fail(TypeError, 'a number')
      if (!Number.isSafeInteger(value) || (value as number) < 0) fail(RangeError, 'a non-negative integer')
      return value
    case 'boolean':
      if (typeof value !== 'boolean') fail(TypeError, 'a boolean')
      return value
    case 'dtype':
      if (value === null) return null
      if (!DTYPES.includes(value as (typeof DTYPES)[number])) fail(TypeError, `null or one of ${DTYPES.map(describe).join(', ')}`)
      return value
    case 'precision':
      if (value === null) return null
      if (!PRECISIONS.includes(value as (typeof PRECISIONS)[number])) {
        fail(TypeError, `null or one of ${PRECISIONS.map(describe).join(', ')}`)
      }
      return value
  }
}

/** Replaces psgd-jax's snake_case option names in a native error message by ours. */
export function camelizeMessage(message: string, table: Readonly<Record<string, NativeOption>>): string {
  let out = message
  for (const [camel, { snake }] of Object.entries(table)) {
    out = out.split(`'${snake}'`).join(`'${camel}'`).split(`${snake} `).join(`${camel} `)
  }
  return out
}

/** The camelCase form of a snake_case name. */
export function camelCase(snake: string): string {
  return snake.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase())
}
