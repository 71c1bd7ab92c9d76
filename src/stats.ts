/**
 * Telemetry of a PSGD step: what `stats()` gives (see docs/guide.md, "Telemetry"). A step
 * keeps what it measured of itself with its state, without reading anything back; the
 * numbers are read (and the factors' values computed) only when `stats()` is called.
 */

import type { NativeState, NativeOptimizer, NativeStepStats } from './native'
import { call } from './native'

/** One leaf of {@link PsgdStats} (per variable name in the TensorFlow.js optimizers). */
export interface PsgdLeafStats {
  /** The leaf's path (its variable's name in the TensorFlow.js optimizers). */
  path: string
  /** Its number of elements. */
  size: number
  /**
   * RMS of the preconditioned gradient `P·m` of the last step, before the clip. A
   * well-fitted whitening preconditioner gives about 1; `null` before a step.
   */
  preRms: number | null
  /** RMS of the update of the last step (what was added to the param); `null` before a step. */
  updateRms: number | null
  /**
   * Whether the clip changed the last step's update (the RMS cap, the element clamp or the
   * global norm; see {@link PsgdStats.clip}); `null` before a step.
   */
  clipped: boolean | null
  /**
   * The whitening estimate of this leaf: an exponential average (weight 0.9 on the past,
   * so about the last ten fits) of {@link PsgdLeafStats.preRms} over the steps that fitted
   * the preconditioner; `null` before a fit.
   */
  whitening: number | null
  /**
   * Times the health guard reset the factors that precondition this leaf to their initial
   * scale (`onUnhealthy: 'reset'`), since the state was made or loaded. XMat and LRA have
   * one preconditioner for the whole tree: a reset counts on every leaf.
   */
  resets: number
  /** Fits the health guard dropped for this leaf (`onUnhealthy: 'skip'`), since the state was made or loaded. */
  dropped: number
}

/** One factor of a leaf's preconditioner in {@link PsgdStats}. */
export interface PsgdFactorStats {
  /**
   * The leaf's path (Kron under `mergeDims`/`blockSize`: the part's); `'*'` for the one
   * preconditioner of XMat and LRA, which spans the whole tree.
   */
  path: string
  /** Which factor of the leaf: Kron's axis; Affine's 0 (left) or 1 (right); 0 for XMat and LRA. */
  factor: number
  /**
   * `max|diag| / min|diag|` of the factor, the largest over stacked layers or blocks: the
   * condition number of a diagonal factor, a lower bound on it for a triangular one, a
   * rough estimate for a dense one (Kron's inverse-free rules; XMat's diagonal `a`; LRA's
   * `d`). `Infinity` when a diagonal entry is 0.
   */
  condition: number
  /**
   * The normaliser of the factor's fit step, the largest over stacked layers or blocks:
   * Kron's running Lipschitz bound `L` as the state holds it (0 before its first fit);
   * under Kron's EQ rule without one, XMat and Affine the last fit's own normaliser (`null`
   * before a fit and after a load); `null` for LRA, whose fit has one per update direction.
   */
  normaliser: number | null
}

/** Wall time of the last step's stages, in milliseconds. */
export interface PsgdStepTimes {
  /** The preconditioner's fit (0 on a step that did not fit). */
  fitMs: number
  /** Preconditioning and the finish (clip, weight decay, learning rate). */
  applyMs: number
  /** The whole native step; the rest is the checks, the update decision and the momentum. */
  totalMs: number
}

/**
 * What the last step did and how the preconditioner stands: from `opt.stats()`,
 * `state.stats()` or `stats(state)`. Reading it is the only time the telemetry is read
 * back from the device, and reading it twice gives the same object.
 */
export interface PsgdStats {
  /** Steps taken. */
  count: number
  /** Whether the last step fitted the preconditioner (`false` before a step). */
  fitted: boolean
  /** Fits since the state was made or loaded (not kept in state files). */
  fits: number
  /** Per leaf, in the state's leaf order. */
  leaves: PsgdLeafStats[]
  /** Per factor of each leaf's preconditioner (read from the state: given before a step too). */
  factors: PsgdFactorStats[]
  /**
   * The whitening estimate of the whole tree: the leaves' {@link PsgdLeafStats.whitening}
   * as one RMS over all their elements. About 1 when the preconditioner whitens what it
   * fits (see {@link PsgdStats.whiteningOnFitInput}); `null` before a fit.
   */
  whitening: number | null
  /**
   * Whether the preconditioned gradient is `P·h` for the fit's own input `h` (the fit sees
   * the momentum, as Kron's default does, or there is no momentum; no Hessian-vector
   * products): the whitening estimate's target is then 1. Otherwise (XMat, LRA and Affine
   * fit on the raw gradient and precondition the momentum) it sits below 1.
   */
  whiteningOnFitInput: boolean
  /**
   * The clip the step runs: `'none'`, `'rms'`, `'element'`, `'rms+element'` or
   * `'globalNorm'`; `null` for a TensorFlow.js optimizer before its first step (it has no
   * state yet).
   */
  clip: string | null
  /** The largest {@link PsgdFactorStats.condition} (1 without factors). */
  maxCondition: number
  /** The last step's time split; `null` before a step. */
  times: PsgdStepTimes | null
  /**
   * Steps whose updates the health guard made zero because they would have held NaN or Inf
   * (`onUnhealthy: 'reset' | 'skip'`), since the state was made or loaded.
   */
  skipped: number
}

/** @internal The stats of `state` as `optimizer` reads them, typed. */
export function readStats(optimizer: NativeOptimizer, state: NativeState, owner: string): PsgdStats {
  const s: NativeStepStats = call(() => optimizer.stats(state), `${owner}: stats`)
  const orNull = <T>(v: T | null | undefined): T | null => v ?? null
  const factors = s.factors.map((f) => ({ path: f.path, factor: f.factor, condition: f.condition, normaliser: orNull(f.normaliser) }))
  return {
    count: s.count,
    fitted: s.fitted,
    fits: s.fits,
    leaves: s.leaves.map((l) => ({
      path: l.path,
      size: l.size,
      preRms: orNull(l.preRms),
      updateRms: orNull(l.updateRms),
      clipped: orNull(l.clipped),
      whitening: orNull(l.whitening),
      resets: l.resets,
      dropped: l.dropped,
    })),
    factors,
    whitening: orNull(s.whitening),
    whiteningOnFitInput: s.whiteningOnFitInput,
    clip: s.clip,
    maxCondition: largestCondition(factors),
    times: s.times ? { fitMs: s.times.fitMs, applyMs: s.times.applyMs, totalMs: s.times.totalMs } : null,
    skipped: s.skipped,
  }
}

/**
 * @internal The stats of several states as one (the TensorFlow.js optimizers keep one per
 * set of variables): leaves and factors in turn, `fitted` when any fitted, the most fits,
 * the whitening over all their elements, the time splits and skipped steps summed; `count`
 * the optimizer's.
 */
export function mergeStats(count: number, parts: PsgdStats[]): PsgdStats {
  const leaves = parts.flatMap((p) => p.leaves)
  const whitening = treeRms(leaves, (l) => l.whitening)
  const times = parts.map((p) => p.times).filter((t): t is PsgdStepTimes => t !== null)
  const factors = parts.flatMap((p) => p.factors)
  return {
    count,
    fitted: parts.some((p) => p.fitted),
    fits: parts.reduce((m, p) => Math.max(m, p.fits), 0),
    leaves,
    factors,
    whitening,
    whiteningOnFitInput: parts.length > 0 && parts.every((p) => p.whiteningOnFitInput),
    clip: parts[0]?.clip ?? null,
    maxCondition: largestCondition(factors),
    times:
      times.length === 0
        ? null
        : {
            fitMs: times.reduce((a, t) => a + t.fitMs, 0),
            applyMs: times.reduce((a, t) => a + t.applyMs, 0),
            totalMs: times.reduce((a, t) => a + t.totalMs, 0),
          },
    skipped: parts.reduce((a, p) => a + p.skipped, 0),
  }
}

/** The largest condition estimate (NaN when one is; 1 without factors). */
function largestCondition(factors: PsgdFactorStats[]): number {
  return factors.reduce((m, f) => (Number.isNaN(f.condition) || Number.isNaN(m) ? NaN : Math.max(m, f.condition)), 1)
}

/** One RMS over all the leaves' elements of a per-leaf RMS (`null` where no leaf has one). */
function treeRms(leaves: PsgdLeafStats[], of: (l: PsgdLeafStats) => number | null): number | null {
  let sq = 0
  let n = 0
  for (const l of leaves) {
    const v = of(l)
    if (v === null) continue
    sq += v * v * l.size
    n += l.size
  }
  return n > 0 ? Math.sqrt(sq / n) : null
}

/** Options of {@link psgdStatsCallback}. */
export interface PsgdStatsCallbackOptions {
  /** Add the summaries to every `every`-th batch's logs (default 1: every batch); the epoch's logs always get them. */
  every?: number
}

/**
 * A few scalar summaries of {@link PsgdStats} (the keys {@link psgdStatsCallback} adds to
 * the logs): `psgd_fitted` (1 or 0), `psgd_pre_rms` and `psgd_update_rms` (over all
 * leaves' elements), `psgd_clipped` (the share of leaves the clip changed),
 * `psgd_whitening`, `psgd_max_condition`, `psgd_fit_ms`, `psgd_step_ms`, and the health
 * guard's counts `psgd_resets` (over all leaves) and `psgd_skipped`. A value
 * that does not exist yet (before a step or a fit) is left out.
 */
export function statsSummary(s: PsgdStats): Record<string, number> {
  const out: Record<string, number> = {
    psgd_fitted: s.fitted ? 1 : 0,
    psgd_max_condition: s.maxCondition,
    psgd_resets: s.leaves.reduce((a, l) => a + l.resets, 0),
    psgd_skipped: s.skipped,
  }
  const put = (k: string, v: number | null) => {
    if (v !== null) out[k] = v
  }
  put(
    'psgd_pre_rms',
    treeRms(s.leaves, (l) => l.preRms),
  )
  put(
    'psgd_update_rms',
    treeRms(s.leaves, (l) => l.updateRms),
  )
  const stepped = s.leaves.filter((l) => l.clipped !== null)
  put('psgd_clipped', stepped.length > 0 ? stepped.filter((l) => l.clipped).length / stepped.length : null)
  put('psgd_whitening', s.whitening)
  put('psgd_fit_ms', s.times?.fitMs ?? null)
  put('psgd_step_ms', s.times?.totalMs ?? null)
  return out
}

/**
 * A `model.fit` callback (pass it in `callbacks`, alone or with other plain callback
 * objects; to mix it with `tf.callbacks` instances wrap it: `new tf.CustomCallback(...)`)
 * that adds {@link statsSummary}'s scalars of `optimizer.stats()` to the batch logs (every
 * `every`-th batch) and to each epoch's logs, so that they show in `history.history` and
 * in any later callback. Reading the stats is its only cost.
 */
export function psgdStatsCallback(
  optimizer: { stats(): PsgdStats },
  options: PsgdStatsCallbackOptions = {},
): { onBatchEnd(batch: number, logs?: Record<string, unknown>): void; onEpochEnd(epoch: number, logs?: Record<string, unknown>): void } {
  const every = options.every ?? 1
  if (!Number.isInteger(every) || every < 1) throw new RangeError(`psgdStatsCallback: every must be a whole number >= 1, got ${String(every)}`)
  const add = (logs: Record<string, unknown> | undefined) => {
    if (logs) Object.assign(logs, statsSummary(optimizer.stats()))
  }
  return {
    onBatchEnd(batch, logs) {
      if ((batch + 1) % every === 0) add(logs)
    },
    onEpochEnd(_epoch, logs) {
      add(logs)
    },
  }
}
