/**
 * The divergence warning: every {@link WATCH_EVERY} steps a step that is given the params
 * samples their global L2 norm (before the step), and once per optimizer, when that norm
 * has grown steadily and far, the optimizer's `onWarning` hook gets a {@link PsgdWarning}
 * (by default `process.emitWarning`).
 */

/** What an optimizer tells its `onWarning` hook. */
export interface PsgdWarning {
  /** Which warning: `'PSGD_DIVERGING'`, the params' norm grows steadily. */
  code: 'PSGD_DIVERGING'
  /** The optimizer (`'kron'`, `'xmat'`, `'lra'`, `'affine'`). */
  optimizer: string
  /** The steps taken when the norm was sampled. */
  step: number
  /** The params' global L2 norm then. */
  norm: number
  /** The first positive norm sampled: what it grew from. */
  reference: number
  /** The step that sample was taken at. */
  referenceStep: number
  /** What happened and what to change. */
  message: string
}

/** The `onWarning` option: receives the optimizer's warnings. */
export type WarningHook = (warning: PsgdWarning) => void

/** Steps between two samples of the params' norm. */
export const WATCH_EVERY = 10
/** Norm growth over the first positive sample that a warning needs. */
export const DIVERGED_GROWTH = 100
/** Samples (one per {@link WATCH_EVERY} steps) the steadiness test looks back over, at most. */
const WINDOW = 20
/** Intervals between samples the steadiness test needs at least. */
const MIN_INTERVALS = 5
/** Share of those intervals over which the norm must have risen. */
const RISING_SHARE = 0.8
/** Growth over the window that counts as still growing (not a one-time rise that settled). */
const WINDOW_GROWTH = 1.5

/**
 * Whether the norms sampled so far (oldest first, one per {@link WATCH_EVERY} steps) show
 * a diverging run: the last is non-finite, or it is at least {@link DIVERGED_GROWTH}× the
 * first positive sample while over the last (up to 20) samples the norm rose across at
 * least 80 % of the intervals and by at least 1.5× in all. A run from zero-initialised
 * params that converges rises fast at first and then flattens, so it fails the last test;
 * a diverging one keeps multiplying.
 */
export function diverging(norms: readonly number[]): boolean {
  const last = norms[norms.length - 1]
  if (last === undefined) return false
  if (!Number.isFinite(last)) return true
  const ref = norms.find((n) => n > 0)
  if (ref === undefined || last < DIVERGED_GROWTH * ref) return false
  const window = norms.slice(-WINDOW)
  const intervals = window.length - 1
  if (intervals < MIN_INTERVALS) return false
  let rising = 0
  for (let i = 1; i < window.length; i++) if (window[i] > window[i - 1]) rising++
  return rising >= RISING_SHARE * intervals && last >= WINDOW_GROWTH * window[0]
}

/** The default hook: a Node process warning users can filter by type or code. */
function emit(w: PsgdWarning): void {
  process.emitWarning(w.message, { type: 'PsgdWarning', code: w.code })
}

/** The sampled norms of one optimizer state, oldest first, with their steps. */
interface Samples {
  steps: number[]
  norms: number[]
}

/**
 * One optimizer's divergence watch: which states' params are due for a sample, the
 * samples, and whether it has warned (it warns once).
 */
export class DivergenceWatch {
  private fired = false
  private readonly hook: WarningHook | null
  private readonly samples = new WeakMap<object, Samples>()

  /** `hook`: the `onWarning` option (undefined: the default; null: silenced). */
  constructor(
    private readonly owner: string,
    hook: WarningHook | null | undefined,
    private readonly advice: string,
  ) {
    this.hook = hook === undefined ? emit : hook
  }

  /** Whether a step from a state with `count` steps should sample the params' norm. */
  due(count: number): boolean {
    return this.hook !== null && !this.fired && count % WATCH_EVERY === 0
  }

  /** Records the norm of the params a state's step started from (after `count` steps), and warns once when {@link diverging}. */
  record(state: object, count: number, norm: number): void {
    if (!this.due(count)) return
    let s = this.samples.get(state)
    if (s === undefined || (s.steps.length > 0 && (s.steps[s.steps.length - 1] as number) >= count)) {
      // a new state, or one loaded or stepped back: start over
      s = { steps: [], norms: [] }
      this.samples.set(state, s)
    }
    s.steps.push(count)
    s.norms.push(norm)
    if (s.norms.length > 4 * WINDOW) {
      // keep the reference (the first positive sample) and the recent window
      const keep = Math.max(
        0,
        s.norms.findIndex((n) => n > 0),
      )
      s.steps.splice(keep + 1, s.norms.length - WINDOW - keep - 1)
      s.norms.splice(keep + 1, s.norms.length - WINDOW - keep - 1)
    }
    if (!diverging(s.norms)) return
    this.fired = true
    const at = s.norms.findIndex((n) => n > 0)
    const reference = s.norms[at] ?? 0
    const warning: PsgdWarning = {
      code: 'PSGD_DIVERGING',
      optimizer: this.owner,
      step: count,
      norm,
      reference,
      referenceStep: s.steps[at] ?? 0,
      message: Number.isFinite(norm)
        ? `${this.owner}: the params' L2 norm grew from ${reference.toExponential(2)} (step ${s.steps[at]}) to ${norm.toExponential(2)} (step ${count}) and is still rising: training is diverging. ${this.advice}`
        : `${this.owner}: the params hold NaN or Inf at step ${count}. ${this.advice}`,
    }
    try {
      ;(this.hook as WarningHook)(warning)
    } catch (e) {
      // the step is done and stands; the hook's own failure is reported, not thrown
      const why = e instanceof Error ? e.message : String(e)
      process.emitWarning(`${this.owner}: the onWarning hook threw (${why}) on: ${warning.message}`, {
        type: 'PsgdWarning',
        code: 'PSGD_WARNING_HOOK_FAILED',
      })
    }
  }
}

/** What to change, per variant, in the divergence warning. */
export function divergenceAdvice(variant: string): string {
  const clip = variant === 'kron' ? 'updateClipRms or gradClip' : 'updateGlobalNormClip or gradClip'
  return `Lower learningRate (by 3-10x) or clip the steps (${clip}); if stats() shows a factor's condition estimate or normaliser blowing up, or the steps start to fail with NaN or Inf, onUnhealthy: 'reset' resets such factors. onWarning: null silences this warning.`
}

/** The sum of squares of a leaf's values (float64). */
export function sumSquares(values: ArrayLike<number>): number {
  let s = 0
  for (let i = 0; i < values.length; i++) s += values[i] * values[i]
  return s
}
