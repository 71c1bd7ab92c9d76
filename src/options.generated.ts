// Generated from the Rust option declarations (crates/psgd/src/options.rs and each
// variant's `declare_options!`) by `cargo test -p psgd generated_typescript`; do not
// edit. A test fails when this file and the declarations differ; rerun with
// PSGD_WRITE_GENERATED=1 to rewrite it.
import type { WarningHook } from './guard'
import type { Schedule } from './schedule'
import type { Mask } from './tree'

/** The options XMat, LRA and Affine share (psgd-jax's common arguments of `xmat`, `low_rank_approximation` and `affine`). */
export interface PsgdNativeOptions {
  /**
   * Learning rate, or a schedule of the step count (0 on the first step, as
   * optax). Default 0.01 (psgd-jax's), which suits small problems: XMat at
   * 0.01 diverged training a 3-layer MNIST MLP, so on networks
   * start lower, e.g. 1e-3.
   */
  learningRate?: number | Schedule
  /**
   * Probability of updating the preconditioner on a step, or a schedule of
   * the 1-based step count. Default (and null) 1.
   */
  preconditionerUpdateProbability?: number | Schedule | null
  /**
   * Momentum coefficient in [0, 1); 0 turns momentum off. Default 0.9.
   */
  b1?: number
  /**
   * Nesterov momentum (with bias correction). Default false.
   */
  nesterov?: boolean
  /**
   * Decoupled weight decay (needs `params` in `update`), on the leaves the
   * `mask` selects (≥ 0). Default 0.
   */
  weightDecay?: number
  /**
   * Step size of the preconditioner fit (≥ 0), or a schedule of the 1-based
   * step count. Default 0.1.
   */
  precondLr?: number | Schedule
  /**
   * Initial scale of the preconditioner. Default null: chosen on the first fit
   * from its inputs, `(Σv²/Σh²)^¼` with Hessian-vector products, `(n/Σg²)^¼`
   * when whitening.
   */
  precondInitScale?: number | null
  /**
   * Clip the updates to this global L2 norm. Default null (no clip).
   */
  updateGlobalNormClip?: number | null
  /**
   * Clip the incoming gradients to this global L2 norm before anything else
   * (momentum and the preconditioner fit see the clipped gradients). Not in
   * psgd-jax. Default null (no clip).
   */
  gradClip?: number | null
  /**
   * Let a step whose updates hold NaN or Inf through, as psgd-jax does.
   * Default false: such a step fails with a `RangeError` naming the leaf and
   * changes nothing (the test is fused into the step's last pass).
   */
  allowNonFinite?: boolean
  /**
   * What a step does when the preconditioner turns unhealthy: `'throw'` (default: a
   * step whose updates would hold NaN or Inf fails with a `RangeError` and
   * changes nothing), `'reset'` (after each fit, a leaf whose factors are
   * non-finite or past `maxCondition` gets them back at their initial scale; a
   * step whose updates would hold NaN or Inf resets the factors at fault and
   * makes zero updates) or `'skip'` (such a fit is dropped for that leaf; such
   * a step makes zero updates and keeps its momentum and preconditioner). The
   * step is counted either way. Not in psgd-jax.
   */
  onUnhealthy?: 'throw' | 'reset' | 'skip'
  /**
   * The condition bound of `onUnhealthy`'s health check: a factor whose
   * `max|diag| / min|diag|` exceeds it is unhealthy (null: only non-finite
   * factors are). Default 1e6: float32 resolves about 7 significant digits,
   * so past it the factors' smallest directions are lost to rounding. Read
   * only under `'reset'` and `'skip'`.
   */
  maxCondition?: number | null
  /**
   * How the preconditioner step is normalised: `'1st'` or `'2nd'` (default).
   */
  stepNormalizerOrder?: '1st' | '2nd'
  /**
   * Fit the preconditioner before preconditioning the step (default true,
   * psgd-jax's order). false: precondition the step with the preconditioner
   * as it was, then fit it on this step's input (psgd_torch's
   * `update_preconditioner_first=False`); the random draws come in the same
   * order either way. Not in psgd-jax.
   */
  updatePreconditionerFirst?: boolean
  /**
   * Run the preconditioner fit of a step on a native worker thread after the
   * step returns, overlapping it with the caller's next gradient (the classes,
   * the TensorFlow.js optimizers and the functional API). The numbers are exactly
   * those of `updatePreconditionerFirst: false` run in order, which it implies;
   * with an explicit `updatePreconditionerFirst: true` it is a `RangeError`. The
   * next step, saving, loading into the state and `dispose` wait for the fit; an
   * error in the fit is raised by the next of them. It helps only when a core is
   * free while the gradient is computed. Default false. Not in psgd-jax.
   */
  overlapFit?: boolean
  /**
   * Dtype of the momentum buffer; null keeps each param's dtype.
   */
  muDtype?: 'float32' | 'bfloat16' | 'float16' | 'float64' | null
  /**
   * Matmul precision of the fit: `'bfloat16'`, `'tensorfloat32'` (default;
   * computed in float32, as candle has no TF32 switch) or `'float32'`.
   */
  precision?: 'bfloat16' | 'tensorfloat32' | 'float32'
  /**
   * Seed of the random probe vectors; the same seed gives the same run.
   * Default 0.
   */
  seed?: number
  /**
   * Which leaves get weight decay: a tree of booleans or `(path, leaf) =>
   * boolean` (psgd-jax's `mask`). Default: all.
   */
  mask?: Mask
  /**
   * Receives the optimizer's warnings (a `PsgdWarning`: the divergence warning, once per
   * optimizer, when the params' norm grows steadily); null silences them and skips
   * the norm's sampling. Default: `process.emitWarning` with type `'PsgdWarning'` and
   * the warning's `code`.
   */
  onWarning?: WarningHook | null
}

/** The options of `kron` declared in Rust (see the variant's options type). */
export interface KronNativeOptions {
  /**
   * Learning rate, or a schedule of the step count (0 on the first step, as optax).
   * Default 0.001.
   */
  learningRate?: number | Schedule
  /**
   * Momentum coefficient in [0, 1); 0 turns momentum off. Default 0.9.
   */
  b1?: number
  /**
   * Decoupled weight decay (needs `params` in `update`), on the leaves
   * `weightDecayMask` selects (≥ 0). Default 0.
   */
  weightDecay?: number
  /**
   * Probability of updating the preconditioner on a step, or a schedule of the
   * 1-based step count. Default (and null): `precondUpdateProbSchedule()`, 1 for 500
   * steps, then annealed to 0.03.
   */
  preconditionerUpdateProbability?: number | Schedule | null
  /**
   * How a step decides to fit the preconditioner with probability `p`
   * (`preconditionerUpdateProbability`). `'counter'` (default, psgd-jax's): a
   * deterministic counter fits once `1/p` steps have passed since the last fit, with
   * no random draw. `'draw'` (psgd_torch's): one uniform draw `u` at the start of
   * every step, even when `p` is 1, and the step fits when `u < p`.
   * `'cumulative'` (heavyball's): deterministic, the step fits iff
   * `floor(c + p) > floor(c)` with `c` the sum of the earlier steps' `p` (kept in
   * the state), so over any run the fits number `floor(Σp)`. A state loads only into
   * an optimizer with the same `updateDecision`. Not in psgd-jax.
   */
  updateDecision?: 'counter' | 'draw' | 'cumulative'
  /**
   * Fit the preconditioner before preconditioning the step (default true,
   * psgd-jax's and psgd_torch's default order). false: precondition (and finish)
   * the step with the preconditioner as it was, then fit it on this step's input
   * (psgd_torch's `update_preconditioner_first=False`). The random draws come in
   * the same order either way, and the automatic initial scale
   * (`preconditionerInitScale: null`) is still taken first. Not in psgd-jax.
   */
  updatePreconditionerFirst?: boolean
  /**
   * Run the preconditioner fit of a step on a native worker thread after the
   * step returns, overlapping it with the caller's next gradient (the classes,
   * the TensorFlow.js optimizers and the functional API). The numbers are exactly
   * those of `updatePreconditionerFirst: false` run in order, which it implies;
   * with an explicit `updatePreconditionerFirst: true` it is a `RangeError`. The
   * next step, saving, loading into the state and `dispose` wait for the fit; an
   * error in the fit is raised by the next of them. It helps only when a core is
   * free while the gradient is computed. Default false. Not in psgd-jax.
   */
  overlapFit?: boolean
  /**
   * How momentum (`b1`) warms up. `'debias'` (default, psgd-jax's): an EMA with
   * coefficient `b1`, divided by `1 − b1^t`. `'psgdTorch'` (psgd_torch's): the
   * coefficient at 1-based step `t` is `β = min((t−1)/t, b1)`,
   * `m ← β·m + (1−β)·g`, with no bias correction (the first step's momentum is
   * the gradient). Not in psgd-jax.
   */
  momentumWarmup?: 'debias' | 'psgdTorch'
  /**
   * Cap on the RMS of each leaf's preconditioned update: `u / max(1, rms(u)/cap)`.
   * Default 1.1 (psgd-jax's); psgd_torch's is 2 (`grad_clip_max_amps[0]`); null:
   * no cap (heavyball's `PSGDPRO`).
   */
  updateClipRms?: number | null
  /**
   * Clamp each element of the preconditioned update to `±v` after the RMS cap.
   * Default null (no clamp, psgd-jax's); psgd_torch's is 10
   * (`grad_clip_max_amps[1]`). Not in psgd-jax.
   */
  updateClipElement?: number | null
  /**
   * Axes longer than this get a diagonal factor instead of a triangular one.
   * Default 8192.
   */
  maxSizeTriangular?: number
  /**
   * An axis of length `d` in a leaf (a layer with `scannedLayers`) of `N` elements
   * gets a diagonal factor when `d² > maxSkew·N`, besides the other rules: 1
   * makes the longer axis of a non-square matrix diagonal (psgd_torch's
   * `preconditioner_max_skew`, whose default is 1). Size-1 axes, which psgd_torch
   * squeezes away, change neither `N` nor any other axis' factor. Default null (no
   * such rule, psgd-jax's).
   */
  maxSkew?: number | null
  /**
   * Leaves with fewer axes than this get only diagonal factors. Default 2.
   */
  minNdimTriangular?: number
  /**
   * `null` (default): every axis may be triangular; `'one_diag'`: the largest axis
   * of each leaf is diagonal; `'all_diag'`: every axis is diagonal.
   */
  memorySaveMode?: 'one_diag' | 'all_diag' | null
  /**
   * Merge a leaf's axes before preconditioning it. `null` (default): no merging.
   * `'small'` (distributed-kron `kron`'s `merge_small_dims`): adjacent axes are
   * grouped so that each merged size comes closest to `targetMergedDimSize`, by
   * distributed-kron's loss (sizes below `target/8` or above `8·target` cost most).
   * `'twoD'` (distributed-kron `pro`'s `_merge_dims`): every leaf becomes 1-D (when
   * one axis holds all its elements, e.g. `[1, 8, 1]` → `[8]`) or 2-D, split at the
   * most balanced position (e.g. `[2, 3, 4]` → `[6, 4]`). Factor kinds (dense or
   * diagonal) are decided on the merged shape. Not in psgd-jax.
   */
  mergeDims?: 'small' | 'twoD' | null
  /**
   * The merged size `mergeDims: 'small'` aims at (≥ 1). Default 4096
   * (distributed-kron's `target_merged_dim_size`).
   */
  targetMergedDimSize?: number
  /**
   * Cut every dense axis (after `mergeDims`) longer than this into blocks of this
   * length, the last one shorter; each block gets factors of its own (a
   * block-diagonal Kron, as distributed-kron's `block_size`), so a factor is at most
   * `blockSize × blockSize`. Blocks are not padded: a block's fit is that of a leaf of
   * its shape. With `preconditionerInitScale: null` each block takes its own scale.
   * Default null (no blocks). Not in psgd-jax.
   */
  blockSize?: number | null
  /**
   * Fit the preconditioner to the momentum rather than the raw gradient. Default
   * true.
   */
  momentumIntoPrecondUpdate?: boolean
  /**
   * Step size of the preconditioner fit (≥ 0). Default 0.1.
   */
  preconditionerLr?: number
  /**
   * How the factors are fitted. `'EQ'` (default): psgd-jax 0.2.9's rule, with
   * triangular factors and a triangular solve per fit. `'Q0.5EQ1.5'` (alias
   * `'PRO'`): psgd_torch's default rule, with full factors kept near symmetric
   * positive definite by a Procrustes rotation and no triangular solve (matrix
   * products only). `'QUAD'`: psgd_torch's quadratic rule, with full symmetric
   * factors. `'QEQ'`, `'QEP'`: psgd_torch's `dQ = Q·E·Q` and `dQ = Q·E·P` (QEP
   * balances the factors before every fit). `'PRO4P'`, `'QUAD4P'`: PRO's and QUAD's
   * forms on the factors of `P` itself (each applied once, starting at
   * `scale^(2/k)`). Under every rule but `'EQ'` the fit steps by
   * `preconditionerLr / L`, with `L` a running lower bound of its Lipschitz constant
   * (see `lipschitzBeta`, kept in the state), damps its input as psgd_torch does
   * (`g + (1e-9 + eps·|g|)·ν`) and balances the factors after the fit on 1% of fits
   * (QEP: before every fit; see "The fit's numerics" in the docs for the options
   * that change these). With Hessian-vector products each rule fits in its Newton
   * form. Not in psgd-jax.
   */
  updateRule?: 'EQ' | 'Q0.5EQ1.5' | 'PRO' | 'QUAD' | 'QEQ' | 'QEP' | 'PRO4P' | 'QUAD4P'
  /**
   * Smoothing `β` of the running Lipschitz bound that normalises the fit's step,
   * `L ← max(β·L + (1−β)·ℓ, ℓ)` with `ℓ` the latest norm estimate and the step
   * `preconditionerLr / L`, in [0, 1) (0: the latest estimate alone). Default null:
   * the rule's own, 0.9 (psgd_torch's `betaL`) under every rule but `'EQ'`, none
   * under `'EQ'` (psgd-jax's memoryless step `preconditionerLr / (ℓ + tiny)`). A
   * number under `'EQ'` keeps the bound in the state, as psgd_torch's `EQ` does.
   * Not in psgd-jax.
   */
  lipschitzBeta?: number | null
  /**
   * How the fit bounds the spectral norm of a dense factor's terms. `'rowNorm'`:
   * psgd-jax's deterministic bound (the row of largest norm and one product with
   * it). `'subspace'`: psgd_torch's random subspace iteration (32 standard normal
   * rows per dense factor and fit, drawn after the fit's noise, two
   * half-iterations). `'power'`: heavyball's deterministic power iteration from the
   * row of largest norm (two iterations), which under `'Q0.5EQ1.5'` and `'PRO4P'`
   * also normalises the Procrustes rotations in place of their random subspaces (in
   * float32; heavyball rounds that one to bfloat16 stochastically). Default null: the
   * rule's own, `'rowNorm'` under `'EQ'`, `'subspace'` under every other rule. Not in
   * psgd-jax.
   */
  normEstimator?: 'rowNorm' | 'subspace' | 'power' | null
  /**
   * How the fit's input is damped by its random draw `ν`. Null (default under
   * `'EQ'`): psgd-jax's `g + sqrt(eps)·mean(|g|)·ν`. A number `δ ≥ 0`: psgd_torch's
   * `g + (δ + eps·|g|)·ν` (eps the float32 machine epsilon); the inverse-free rules
   * always damp this way, with `δ = 1e-9` when null. Under `'EQ'` `ν` is also the
   * fit's probe, as in both references. Not in psgd-jax.
   */
  damping?: number | null
  /**
   * Largest step `a` of `'Q0.5EQ1.5'`'s Procrustes rotation `exp(aR)`, in (0, 1].
   * Default 1/8 (psgd_torch's); heavyball's is 0.5. `'PRO4P'`'s third-order
   * rotations keep psgd_torch's cap of 1/3. Not in psgd-jax.
   */
  procrustesMaxStep?: number
  /**
   * Probability in [0, 1] that a fit balances each leaf's factors (rescales them to
   * the same largest entry; the preconditioner is unchanged up to round-off), by a
   * uniform draw per fit. Default null: 0.01 (psgd-jax's and psgd_torch's), unless
   * `balanceEvery` is set; under `'QEP'` null with `balanceEvery` null is the rule's
   * own balance before every fit, with no draw. Not in psgd-jax.
   */
  balanceProbability?: number | null
  /**
   * Balance deterministically, with no draw, at the fits of the steps whose 1-based
   * count is a multiple of this (≥ 1): 1 is heavyball's (every fit), 100
   * distributed-kron's. Cannot be set with `balanceProbability`. Default null (a
   * random decision; `'QEP'`'s own is every fit). Not in psgd-jax.
   */
  balanceEvery?: number | null
  /**
   * When the factors are balanced. `'beforeFit'`: before the fit, the random
   * decision one uniform draw before every other draw of the fit (psgd-jax,
   * heavyball, distributed-kron). `'afterFit'`: after each leaf's fit, the random
   * decision one uniform draw per leaf after the leaf's other draws (psgd_torch).
   * Default null: the rule's own, `'beforeFit'` under `'EQ'` and `'QEP'`,
   * `'afterFit'` under the other rules. Not in psgd-jax.
   */
  balanceWhen?: 'beforeFit' | 'afterFit' | null
  /**
   * Initial scale of the preconditioner (each factor gets `scale^(1/ndim)`).
   * Default 1 (psgd-jax's). `null`: automatic, from the first step's gradient
   * `g` of each leaf (of each layer with `scannedLayers`), `(mean(|g|⁴) + δ⁴)^(-1/8)`
   * with `δ = 1e-9` as psgd_torch's newer Kron does, so that the first
   * preconditioned gradient has an RMS near 1 whatever the gradient's scale, and
   * at most `δ^(-1/2)` ≈ 3.2e4 for a tiny gradient; 1 for a gradient of all zeros.
   * See `initScaleScope` and `initScalePower`. Not in psgd-jax.
   */
  preconditionerInitScale?: number | null
  /**
   * With `preconditionerInitScale: null`, over what the automatic scale is taken:
   * `'leaf'` (default) one per leaf (per layer with `scannedLayers`); `'global'`
   * one for every leaf, from the largest `mean(|g|⁴)` over all of them (psgd_torch's
   * `preconditioner_init_scale=None`). Not in psgd-jax.
   */
  initScaleScope?: 'leaf' | 'global'
  /**
   * With `preconditionerInitScale: null`, the power `k` the automatic scale is
   * raised to: `((mean(|g|⁴) + δ⁴)^(-1/8))^k`, so the initial preconditioner is
   * that to the `2k` (> 0). Default 1 (psgd_torch's); heavyball's
   * `precond_init_scale_power` is 0.5 by default (heavyball clamps `|g| ≥ 1e-12`
   * instead of adding `δ⁴`). Not in psgd-jax.
   */
  initScalePower?: number
  /**
   * Clip the incoming gradients to this global L2 norm before anything else
   * (momentum and the preconditioner fit see the clipped gradients). Not in
   * psgd-jax. Default null (no clip).
   */
  gradClip?: number | null
  /**
   * Let a step whose updates hold NaN or Inf through, as psgd-jax does. Default
   * false: such a step fails with a `RangeError` naming the leaf and changes
   * nothing (the test is fused into the step's last pass).
   */
  allowNonFinite?: boolean
  /**
   * What a step does when the preconditioner turns unhealthy: `'throw'` (default: a
   * step whose updates would hold NaN or Inf fails with a `RangeError` and
   * changes nothing), `'reset'` (after each fit, a leaf whose factors are
   * non-finite or past `maxCondition` gets them back at their initial scale; a
   * step whose updates would hold NaN or Inf resets the factors at fault and
   * makes zero updates) or `'skip'` (such a fit is dropped for that leaf; such
   * a step makes zero updates and keeps its momentum and preconditioner). The
   * step is counted either way. Not in psgd-jax.
   */
  onUnhealthy?: 'throw' | 'reset' | 'skip'
  /**
   * The condition bound of `onUnhealthy`'s health check: a factor whose
   * `max|diag| / min|diag|` exceeds it is unhealthy (null: only non-finite
   * factors are). Default 1e6: float32 resolves about 7 significant digits,
   * so past it the factors' smallest directions are lost to rounding. Read
   * only under `'reset'` and `'skip'`.
   */
  maxCondition?: number | null
  /**
   * Dtype of the momentum buffer; null keeps each param's dtype.
   */
  muDtype?: 'float32' | 'bfloat16' | 'float16' | 'float64' | null
  /**
   * Dtype of the preconditioner factors; null is float32.
   */
  precondDtype?: 'float32' | 'bfloat16' | 'float16' | 'float64' | null
  /**
   * Matmul precision of the preconditioner fit. Default `'tensorfloat32'` (computed
   * in float32: candle has no TF32 switch); `'bfloat16'` rounds the operands to
   * bfloat16; null is float32.
   */
  precondUpdatePrecision?: 'bfloat16' | 'tensorfloat32' | 'float32' | null
  /**
   * Matmul precision when applying the preconditioner. Default null (float32).
   */
  precondGradsPrecision?: 'bfloat16' | 'tensorfloat32' | 'float32' | null
  /**
   * Process scanned layers in batches of `laxMapBatchSize` layers, bounding memory.
   * Default false.
   */
  laxMapScannedLayers?: boolean
  /**
   * Layers per batch with `laxMapScannedLayers`. Default 8.
   */
  laxMapBatchSize?: number
  /**
   * Seed of the random probe vectors; the same seed gives the same run. Default 0.
   */
  seed?: number
  /**
   * Which leaves get weight decay: a tree of booleans or `(path, leaf) => boolean`.
   * Default: all.
   */
  weightDecayMask?: Mask
  /**
   * Leaves whose leading axis is a stack of layers (a tree of booleans or a
   * predicate): each layer gets its own preconditioner. Default: none.
   */
  scannedLayers?: Mask
  /**
   * Receives the optimizer's warnings (a `PsgdWarning`: the divergence warning, once per
   * optimizer, when the params' norm grows steadily); null silences them and skips
   * the norm's sampling. Default: `process.emitWarning` with type `'PsgdWarning'` and
   * the warning's `code`.
   */
  onWarning?: WarningHook | null
}

/** The options of `xmat` declared in Rust (see the variant's options type). */
export type XMatNativeOptions = PsgdNativeOptions

/** The options of `lra` declared in Rust (see the variant's options type). */
export interface LRANativeOptions extends PsgdNativeOptions {
  /**
   * Rank of the low-rank part `U·Vᵀ`, at least 1. Default 10.
   */
  uvdRankOfApproximation?: number
}

/** The options of `affine` declared in Rust (see the variant's options type). */
export interface AffineNativeOptions extends PsgdNativeOptions {
  /**
   * A side of the matrix longer than this gets a diagonal factor. Default 4096.
   */
  maxSizeTriangular?: number
  /**
   * A side more than this many times longer than the other gets a diagonal factor.
   * Default 128.
   */
  maxSkewTriangular?: number
}

/**
 * Per variant: whether `update` takes Hessian-vector products, and each option's kind:
 * `'schedule'` (a number, or a function of the step evaluated in TypeScript), `'mask'`
 * (resolved in TypeScript), `'hook'` (a function TypeScript calls) or `'value'` (read and checked by the native core).
 */
export const VARIANTS = {
  kron: {
    hessian: true,
    options: {
      learningRate: 'schedule',
      b1: 'value',
      weightDecay: 'value',
      preconditionerUpdateProbability: 'schedule',
      updateDecision: 'value',
      updatePreconditionerFirst: 'value',
      overlapFit: 'value',
      momentumWarmup: 'value',
      updateClipRms: 'value',
      updateClipElement: 'value',
      maxSizeTriangular: 'value',
      maxSkew: 'value',
      minNdimTriangular: 'value',
      memorySaveMode: 'value',
      mergeDims: 'value',
      targetMergedDimSize: 'value',
      blockSize: 'value',
      momentumIntoPrecondUpdate: 'value',
      preconditionerLr: 'value',
      updateRule: 'value',
      lipschitzBeta: 'value',
      normEstimator: 'value',
      damping: 'value',
      procrustesMaxStep: 'value',
      balanceProbability: 'value',
      balanceEvery: 'value',
      balanceWhen: 'value',
      preconditionerInitScale: 'value',
      initScaleScope: 'value',
      initScalePower: 'value',
      gradClip: 'value',
      allowNonFinite: 'value',
      onUnhealthy: 'value',
      maxCondition: 'value',
      muDtype: 'value',
      precondDtype: 'value',
      precondUpdatePrecision: 'value',
      precondGradsPrecision: 'value',
      laxMapScannedLayers: 'value',
      laxMapBatchSize: 'value',
      seed: 'value',
      weightDecayMask: 'mask',
      scannedLayers: 'mask',
      onWarning: 'hook',
    },
  },
  xmat: {
    hessian: true,
    options: {
      learningRate: 'schedule',
      preconditionerUpdateProbability: 'schedule',
      b1: 'value',
      nesterov: 'value',
      weightDecay: 'value',
      precondLr: 'schedule',
      precondInitScale: 'value',
      updateGlobalNormClip: 'value',
      gradClip: 'value',
      allowNonFinite: 'value',
      onUnhealthy: 'value',
      maxCondition: 'value',
      stepNormalizerOrder: 'value',
      updatePreconditionerFirst: 'value',
      overlapFit: 'value',
      muDtype: 'value',
      precision: 'value',
      seed: 'value',
      mask: 'mask',
      onWarning: 'hook',
    },
  },
  lra: {
    hessian: true,
    options: {
      learningRate: 'schedule',
      preconditionerUpdateProbability: 'schedule',
      b1: 'value',
      nesterov: 'value',
      weightDecay: 'value',
      precondLr: 'schedule',
      precondInitScale: 'value',
      updateGlobalNormClip: 'value',
      gradClip: 'value',
      allowNonFinite: 'value',
      onUnhealthy: 'value',
      maxCondition: 'value',
      stepNormalizerOrder: 'value',
      updatePreconditionerFirst: 'value',
      overlapFit: 'value',
      muDtype: 'value',
      precision: 'value',
      seed: 'value',
      uvdRankOfApproximation: 'value',
      mask: 'mask',
      onWarning: 'hook',
    },
  },
  affine: {
    hessian: true,
    options: {
      learningRate: 'schedule',
      preconditionerUpdateProbability: 'schedule',
      b1: 'value',
      nesterov: 'value',
      weightDecay: 'value',
      precondLr: 'schedule',
      precondInitScale: 'value',
      updateGlobalNormClip: 'value',
      gradClip: 'value',
      allowNonFinite: 'value',
      onUnhealthy: 'value',
      maxCondition: 'value',
      stepNormalizerOrder: 'value',
      updatePreconditionerFirst: 'value',
      overlapFit: 'value',
      muDtype: 'value',
      precision: 'value',
      seed: 'value',
      maxSizeTriangular: 'value',
      maxSkewTriangular: 'value',
      mask: 'mask',
      onWarning: 'hook',
    },
  },
} as const
