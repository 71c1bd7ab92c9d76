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
 * the reference does, so the deterministic update counter flips on the same steps.
 */
export function precondUpdateProbSchedule(options: PrecondUpdateProbScheduleOptions = {}): Schedule {
  const { maxProb = 1, minProb = 0.03, decay = 0.001, flatStart = 500 } = options
  for (const [k, v] of Object.entries({ maxProb, minProb, decay, flatStart })) {
    if (typeof v !== 'number' || !Number.isFinite(v)) {
      throw new TypeError(`precondUpdateProbSchedule: option '${k}' must be a finite number, got ${String(v)}`)
    }
  }
  const f = Math.fround
  return (n: number) => {
    const x = f(Math.exp(f(f(-f(decay)) * f(n - flatStart))))
    return Math.min(Math.max(f(f(maxProb) * x), f(minProb)), f(maxProb))
  }
}
