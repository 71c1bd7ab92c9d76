// Generated from Kron's presets (crates/psgd/src/variants/kron/presets.rs) by
// `cargo test -p psgd generated_presets`; do not edit. A test fails when this file and
// the presets differ; rerun with PSGD_WRITE_GENERATED=1 to rewrite it.
import type { KronOptions } from './kron'
import { precondUpdateProbSchedule } from './schedule'

/**
 * Kron's presets: option sets under which Kron behaves like another PSGD library.
 * Every preset sets the same options, so a spread of one replaces an earlier one whole;
 * put your own values after it: `kron({ ...kronPresets.psgdTorch, learningRate: 3e-4 })`.
 * What each still does differently is listed in the options reference (docs/options.md).
 */
export interface KronPresets {
  /**
   * psgd-jax 0.2.9's `kron` (the defaults): the EQ rule with triangular factors, psgd-jax's
   * deterministic norm bound and memoryless step, its fit-probability anneal and update
   * counter, debiased momentum, the update's RMS capped at 1.1.
   */
  readonly psgdJax: Readonly<KronOptions>
  /**
   * psgd_torch's `KronWhiten` defaults (the method author's reference): the `Q0.5EQ1.5`
   * rule, the Lipschitz step (β 0.9), the random subspace norm bound, damping 1e-9,
   * balancing after 1% of fits, one automatic initial scale for all leaves from the first
   * gradient, a fit every step decided by a uniform draw, no momentum (with psgd_torch's
   * warm-up when `b1` is set), the gradient whitened, dense factors up to any size unless
   * `d² > N`, and the update capped at RMS 2 and clamped to ±10.
   */
  readonly psgdTorch: Readonly<KronOptions>
  /**
   * distributed-kron 2.0.0's `pro` defaults: the `Q0.5EQ1.5` rule with preconditioner step
   * 0.5 and Lipschitz β 0.95, every leaf merged to one or two dimensions and cut into blocks
   * of 256, dense factors up to 16384, a fit every step, balancing every 100 steps, momentum
   * 0.95 (debiased) whitened, the update's RMS capped at 1.1, and its `lr_style: 'adam'`
   * (the update divided by 5) with weight decay 0.1 folded into `learningRate` 2e-4 and
   * `weightDecay` 0.5.
   */
  readonly distributedKronPro: Readonly<KronOptions>
  /**
   * heavyball 3.2.1's `PSGDPRO` defaults: the `Q0.5EQ1.5` rule with the Lipschitz step (β
   * 0.9), heavyball's deterministic power-iteration norm bound, Procrustes steps up to 0.5,
   * balancing before every fit, an automatic initial scale per leaf with exponent 0.5, dense
   * factors up to 2048, a fit probability annealed from step 1000 to 0.03 by its
   * deterministic cumulative schedule, momentum 0.9 (debiased) whitened, and no update clip.
   */
  readonly heavyballPro: Readonly<KronOptions>
}

/** See {@link KronPresets}. */
export const kronPresets: KronPresets = Object.freeze({
  psgdJax: Object.freeze({
    b1: 0.9,
    balanceEvery: null,
    balanceProbability: null,
    balanceWhen: null,
    blockSize: null,
    damping: null,
    initScalePower: 1.0,
    initScaleScope: "leaf",
    learningRate: 0.001,
    lipschitzBeta: null,
    maxSizeTriangular: 8192,
    maxSkew: null,
    memorySaveMode: null,
    mergeDims: null,
    minNdimTriangular: 2,
    momentumIntoPrecondUpdate: true,
    momentumWarmup: "debias",
    normEstimator: null,
    preconditionerInitScale: 1.0,
    preconditionerLr: 0.1,
    preconditionerUpdateProbability: null,
    procrustesMaxStep: 0.125,
    targetMergedDimSize: 4096,
    updateClipElement: null,
    updateClipRms: 1.1,
    updateDecision: "counter",
    updatePreconditionerFirst: true,
    updateRule: "EQ",
    weightDecay: 0.0,
  }),
  psgdTorch: Object.freeze({
    b1: 0.0,
    balanceEvery: null,
    balanceProbability: 0.01,
    balanceWhen: "afterFit",
    blockSize: null,
    damping: 1e-9,
    initScalePower: 1.0,
    initScaleScope: "global",
    learningRate: 0.001,
    lipschitzBeta: 0.9,
    maxSizeTriangular: 9007199254740992,
    maxSkew: 1.0,
    memorySaveMode: null,
    mergeDims: null,
    minNdimTriangular: 1,
    momentumIntoPrecondUpdate: false,
    momentumWarmup: "psgdTorch",
    normEstimator: "subspace",
    preconditionerInitScale: null,
    preconditionerLr: 0.1,
    preconditionerUpdateProbability: 1.0,
    procrustesMaxStep: 0.125,
    targetMergedDimSize: 4096,
    updateClipElement: 10.0,
    updateClipRms: 2.0,
    updateDecision: "draw",
    updatePreconditionerFirst: true,
    updateRule: "Q0.5EQ1.5",
    weightDecay: 0.0,
  }),
  distributedKronPro: Object.freeze({
    b1: 0.95,
    balanceEvery: 100,
    balanceProbability: null,
    balanceWhen: "beforeFit",
    blockSize: 256,
    damping: 1e-9,
    initScalePower: 1.0,
    initScaleScope: "leaf",
    learningRate: 0.0002,
    lipschitzBeta: 0.95,
    maxSizeTriangular: 16384,
    maxSkew: null,
    memorySaveMode: null,
    mergeDims: "twoD",
    minNdimTriangular: 2,
    momentumIntoPrecondUpdate: true,
    momentumWarmup: "debias",
    normEstimator: "subspace",
    preconditionerInitScale: 1.0,
    preconditionerLr: 0.5,
    preconditionerUpdateProbability: 1.0,
    procrustesMaxStep: 0.125,
    targetMergedDimSize: 4096,
    updateClipElement: null,
    updateClipRms: 1.1,
    updateDecision: "counter",
    updatePreconditionerFirst: true,
    updateRule: "Q0.5EQ1.5",
    weightDecay: 0.5,
  }),
  heavyballPro: Object.freeze({
    b1: 0.9,
    balanceEvery: 1,
    balanceProbability: null,
    balanceWhen: "beforeFit",
    blockSize: null,
    damping: 1e-9,
    initScalePower: 0.5,
    initScaleScope: "leaf",
    learningRate: 0.001,
    lipschitzBeta: 0.9,
    maxSizeTriangular: 2048,
    maxSkew: null,
    memorySaveMode: null,
    mergeDims: null,
    minNdimTriangular: 2,
    momentumIntoPrecondUpdate: true,
    momentumWarmup: "debias",
    normEstimator: "power",
    preconditionerInitScale: null,
    preconditionerLr: 0.1,
    preconditionerUpdateProbability: precondUpdateProbSchedule({ maxProb: 1, minProb: 0.03, decay: 0.0010005003335835344, flatStart: 1000 }),
    procrustesMaxStep: 0.5,
    targetMergedDimSize: 4096,
    updateClipElement: null,
    updateClipRms: null,
    updateDecision: "cumulative",
    updatePreconditionerFirst: true,
    updateRule: "Q0.5EQ1.5",
    weightDecay: 0.0,
  }),
})
