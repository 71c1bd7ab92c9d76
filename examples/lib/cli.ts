/**
 * Command-line flags of the examples: `--out FILE`, `--smoke` (a tiny run, for tests),
 * `--seed N`, plus each example's own numeric or text flags (`--name value`).
 */
import { parseArgs } from 'node:util'

export interface Flags {
  out: string
  smoke: boolean
  seed: number
  /** the example's own flags, as given (strings) */
  extra: Record<string, string | undefined>
}

export function parseFlags(argv: readonly string[], defaultOut: string, extra: readonly string[] = []): Flags {
  const { values } = parseArgs({
    args: [...argv],
    options: {
      out: { type: 'string' },
      smoke: { type: 'boolean' },
      seed: { type: 'string' },
      ...Object.fromEntries(extra.map((k) => [k, { type: 'string' as const }])),
    },
    strict: true,
  })
  const v = values as Record<string, string | boolean | undefined>
  return {
    out: (v.out as string | undefined) ?? defaultOut,
    smoke: v.smoke === true,
    seed: v.seed !== undefined ? int(v.seed as string, 'seed') : 1,
    extra: Object.fromEntries(extra.map((k) => [k, v[k] as string | undefined])),
  }
}

/** A flag's value as a number (or `fallback` when absent). */
export function num(flags: Flags, key: string, fallback: number): number {
  const s = flags.extra[key]
  if (s === undefined) return fallback
  const n = Number(s)
  if (!Number.isFinite(n)) throw new Error(`--${key}: expected a number, got '${s}'`)
  return n
}

function int(s: string, key: string): number {
  const n = Number(s)
  if (!Number.isInteger(n)) throw new Error(`--${key}: expected an integer, got '${s}'`)
  return n
}
