import { native } from './native'

/** A hyperparameter as a function of the step count, like an optax schedule. */
export type Schedule = (step: number) => number

/** Options of {@link precondUpdateProbSchedule}. */
export interface PrecondUpdateProbScheduleOptions {
  /** Probability during the flat start; default 1. */
  maxProb?: number
  /** Floor of the anneal; default 0.03. */
  minProb?: number
  /** Exponential decay rate per step after the flat start; default 0.001. */
  decay?: number
  /** Steps at `maxProb` before the anneal; default 500. */
  flatStart?: number
}

/**
 * psgd-jax's default preconditioner update-probability schedule:
 * `min(max(maxProb·exp(−decay·(n − flatStart)), minProb), maxProb)`, computed in float32 as
 * the reference does, so the deterministic update counter flips on the same steps. The
 * formula and its defaults live once, in the native core (Kron's default uses the same).
 */
export function precondUpdateProbSchedule(options: PrecondUpdateProbScheduleOptions = {}): Schedule {
  const known = ['maxProb', 'minProb', 'decay', 'flatStart']
  for (const [k, v] of Object.entries(options)) {
    if (!known.includes(k)) throw new TypeError(`precondUpdateProbSchedule: unknown option '${k}'`)
    if (v !== undefined && (typeof v !== 'number' || !Number.isFinite(v))) {
      throw new TypeError(`precondUpdateProbSchedule: option '${k}' must be a finite number, got ${String(v)}`)
    }
  }
  const params = Object.freeze({ ...options })
  const schedule = (n: number): number => native.precondUpdateProb(params, n)
  annealParams.set(schedule, params)
  return schedule
}

/**
 * The options each {@link precondUpdateProbSchedule} result was made with, so that a
 * config (a TensorFlow.js optimizer's `getConfig`) can hold the schedule as data.
 */
const annealParams = new WeakMap<Schedule, Readonly<PrecondUpdateProbScheduleOptions>>()

/**
 * A schedule as plain data where it was made by {@link precondUpdateProbSchedule}:
 * `{ precondUpdateProbSchedule: options }`; `undefined` for any other function.
 * @internal
 */
export function scheduleAsData(f: Schedule): { precondUpdateProbSchedule: PrecondUpdateProbScheduleOptions } | undefined {
  const params = annealParams.get(f)
  return params === undefined ? undefined : { precondUpdateProbSchedule: { ...params } }
}

/**
 * The schedule a {@link scheduleAsData} result stands for; `undefined` for any other value.
 * @internal
 */
export function scheduleFromData(v: unknown): Schedule | undefined {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return undefined
  const keys = Object.keys(v)
  if (keys.length !== 1 || keys[0] !== 'precondUpdateProbSchedule') return undefined
  const params = (v as { precondUpdateProbSchedule: unknown }).precondUpdateProbSchedule
  if (typeof params !== 'object' || params === null || Array.isArray(params)) return undefined
  return precondUpdateProbSchedule(params as PrecondUpdateProbScheduleOptions)
}
