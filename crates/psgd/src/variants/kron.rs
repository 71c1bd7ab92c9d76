//! PSGD Kron: one preconditioner factor per tensor axis (triangular or diagonal), fitted by
//! gradient whitening as psgd-jax 0.2.9's `kron` / `scale_by_kron`, or to Hessian-vector
//! products (the Newton form); `updateRule` picks psgd_torch's other fits.

use crate::common::finite_or_one;
use crate::error::{PsgdError, Result};
use crate::kernels::fused::{Clip, Warmup};
use crate::kernels::linalg::{
    factor_gram, max_abs_per_batch, solve_triangular_right, triu_difference,
};
pub use crate::kernels::precision::Precision;
use crate::kernels::triangular::{matmul_tri, saves_work, Tri};
use crate::limits::StateSize;
use crate::options::{check, StateDType};
use crate::random::RandomSource;
use crate::schedule::{precond_update_prob_schedule, Schedule};
use crate::stages;
use crate::state_io::{LoadedState, StateFile};
use crate::step::{
    FitInputs, FitSource, Preconditioner, Psgd, PsgdState, StepNormalizer, StepOptions,
    UpdateDecision, VariantOptions,
};
use crate::telemetry::{diagonal_ratio, largest, FactorStats};
use crate::transform::LeafSpec;
use candle_core::{DType, Device, Tensor};

/// Which axes get diagonal factors to save memory (`memorySaveMode`; null: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySaveMode {
    /// The largest axis of each leaf (the last among equals) is diagonal.
    OneDiag,
    /// Every axis is diagonal.
    AllDiag,
}

impl crate::options::Choice for MemorySaveMode {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("one_diag", MemorySaveMode::OneDiag),
        ("all_diag", MemorySaveMode::AllDiag),
    ];
}
crate::options::choice_option!(MemorySaveMode, "'one_diag' | 'all_diag'");

/// How Kron's factors are fitted (`updateRule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateRule {
    /// psgd-jax 0.2.9's rule: triangular factors, `dQ = E·Q`, each step normalised by a
    /// deterministic norm bound.
    Eq,
    /// psgd_torch's `Q0.5EQ1.5` (PRO): full factors, `dQ = Q^0.5·E·Q^1.5` with a
    /// Procrustes step toward symmetric positive definite; no triangular solve.
    Pro,
    /// psgd_torch's `QUAD`: full symmetric factors, a quadratic form of the fit.
    Quad,
    /// psgd_torch's `QEQ`: full factors, `dQ = Q·E·Q`.
    Qeq,
    /// psgd_torch's `QEP`: full factors, `dQ = Q·E·P`, the factors balanced before every
    /// fit.
    Qep,
    /// psgd_torch's `PRO4P`: the factors are those of `P` itself (`dP = P^0.5·E·P`), kept
    /// near symmetric by up to ten third-order Procrustes steps per fit.
    Pro4p,
    /// psgd_torch's `QUAD4P`: `QUAD`'s quadratic form on the factors of `P` itself.
    Quad4p,
}

impl UpdateRule {
    /// Whether the rule keeps full factors and a Lipschitz bound (every rule but EQ).
    pub fn inverse_free(self) -> bool {
        self != UpdateRule::Eq
    }

    /// Whether the factors are those of `P` itself (PRO4P, QUAD4P): each is applied once
    /// (`P·G = P₁ ×₁ … Pₖ ×ₖ G`) and starts at `scale^(2/k)`.
    pub fn fits_p(self) -> bool {
        matches!(self, UpdateRule::Pro4p | UpdateRule::Quad4p)
    }
}

impl crate::options::Choice for UpdateRule {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("EQ", UpdateRule::Eq),
        ("Q0.5EQ1.5", UpdateRule::Pro),
        ("PRO", UpdateRule::Pro),
        ("QUAD", UpdateRule::Quad),
        ("QEQ", UpdateRule::Qeq),
        ("QEP", UpdateRule::Qep),
        ("PRO4P", UpdateRule::Pro4p),
        ("QUAD4P", UpdateRule::Quad4p),
    ];
}
crate::options::choice_option!(
    UpdateRule,
    "'EQ' | 'Q0.5EQ1.5' | 'PRO' | 'QUAD' | 'QEQ' | 'QEP' | 'PRO4P' | 'QUAD4P'"
);

/// How Kron decides whether a step fits the preconditioner (`updateDecision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KronUpdateDecision {
    /// psgd-jax's deterministic counter: fit once `1/p` steps have passed since the last
    /// fit. No random draw.
    Counter,
    /// psgd_torch's: one uniform draw `u` at the start of every step (even when `p` is 1),
    /// fitting when `u < p`.
    Draw,
    /// heavyball's: deterministic, fitting iff `floor(c + p) > floor(c)` with `c` the sum
    /// of the probabilities of the steps before (kept in the state).
    Cumulative,
}

impl crate::options::Choice for KronUpdateDecision {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("counter", KronUpdateDecision::Counter),
        ("draw", KronUpdateDecision::Draw),
        ("cumulative", KronUpdateDecision::Cumulative),
    ];
}
crate::options::choice_option!(KronUpdateDecision, "'counter' | 'draw' | 'cumulative'");

impl crate::options::Choice for Warmup {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("debias", Warmup::Debias), ("psgdTorch", Warmup::PsgdTorch)];
}
crate::options::choice_option!(Warmup, "'debias' | 'psgdTorch'");

/// Over what the automatic initial scale is taken (`initScaleScope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitScaleScope {
    /// One scale per leaf (per layer with `scannedLayers`).
    Leaf,
    /// One scale for every leaf, from the largest `mean(|g|⁴)` (psgd_torch's).
    Global,
}

impl crate::options::Choice for InitScaleScope {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("leaf", InitScaleScope::Leaf),
        ("global", InitScaleScope::Global),
    ];
}
crate::options::choice_option!(InitScaleScope, "'leaf' | 'global'");

mod layout;
mod numerics;
mod presets;
mod whiten;
pub use numerics::{BalanceWhen, NormEstimator};

pub use layout::MergeDims;
pub use presets::{kron_presets, KronPreset};

/// Tensors per leaf and factor.
type PerLeaf = Vec<Vec<Tensor>>;

/// The damping `δ` of the automatic initial scale `(mean(|g|⁴) + δ⁴)^(-1/8)`, as
/// psgd_torch's Kron: it bounds the scale by `δ^(-1/2)` ≈ 3.2e4, so a first gradient that
/// is tiny (1e-33, a subnormal, a single tiny entry) cannot make a preconditioner so large
/// that every later ordinary gradient overflows float32. For a gradient with
/// `mean(|g|⁴)^¼ ≥ 1e-8` it changes the scale by less than 1e-5 relative.
pub const AUTO_SCALE_DAMPING: f64 = 1e-9;

crate::declare_options! {
    /// Options of [`Kron`]: psgd-jax 0.2.9's `kron` arguments (camelCase in JSON), with its
    /// defaults.
    pub struct KronOptions for "kron" {
        /// Learning rate, or a schedule of the step count (0 on the first step, as optax).
        /// Default 0.001.
        learning_rate: Schedule = Schedule::Constant(0.001),
            check check::learning_rate_schedule;
        /// Momentum coefficient in [0, 1); 0 turns momentum off. Default 0.9.
        b1: f64 = 0.9, check check::momentum;
        /// Decoupled weight decay (needs `params` in `update`), on the leaves
        /// `weightDecayMask` selects (≥ 0). Default 0.
        weight_decay: f64 = 0.0, check check::non_negative;
        /// Probability of updating the preconditioner on a step, or a schedule of the
        /// 1-based step count. Default (and null): `precondUpdateProbSchedule()`, 1 for 500
        /// steps, then annealed to 0.03.
        preconditioner_update_probability: Option<Schedule> = None,
            check |s: &Option<Schedule>| s.as_ref().map_or(Ok(()), check::probability_schedule);
        /// How a step decides to fit the preconditioner with probability `p`
        /// (`preconditionerUpdateProbability`). `'counter'` (default, psgd-jax's): a
        /// deterministic counter fits once `1/p` steps have passed since the last fit, with
        /// no random draw. `'draw'` (psgd_torch's): one uniform draw `u` at the start of
        /// every step, even when `p` is 1, and the step fits when `u < p`.
        /// `'cumulative'` (heavyball's): deterministic, the step fits iff
        /// `floor(c + p) > floor(c)` with `c` the sum of the earlier steps' `p` (kept in
        /// the state), so over any run the fits number `floor(Σp)`. A state loads only into
        /// an optimizer with the same `updateDecision`. Not in psgd-jax.
        update_decision: KronUpdateDecision = KronUpdateDecision::Counter;
        /// Fit the preconditioner before preconditioning the step (default true,
        /// psgd-jax's and psgd_torch's default order). false: precondition (and finish)
        /// the step with the preconditioner as it was, then fit it on this step's input
        /// (psgd_torch's `update_preconditioner_first=False`). The random draws come in
        /// the same order either way, and the automatic initial scale
        /// (`preconditionerInitScale: null`) is still taken first. Not in psgd-jax.
        update_preconditioner_first: bool = true;
        /// Run the preconditioner fit of a step on a native worker thread after the
        /// step returns, overlapping it with the caller's next gradient (the classes,
        /// the TensorFlow.js optimizers and the functional API). The numbers are exactly
        /// those of `updatePreconditionerFirst: false` run in order, which it implies;
        /// with an explicit `updatePreconditionerFirst: true` it is a `RangeError`. The
        /// next step, saving, loading into the state and `dispose` wait for the fit; an
        /// error in the fit is raised by the next of them. It helps only when a core is
        /// free while the gradient is computed. Default false. Not in psgd-jax.
        overlap_fit: bool = false;
        /// How momentum (`b1`) warms up. `'debias'` (default, psgd-jax's): an EMA with
        /// coefficient `b1`, divided by `1 − b1^t`. `'psgdTorch'` (psgd_torch's): the
        /// coefficient at 1-based step `t` is `β = min((t−1)/t, b1)`,
        /// `m ← β·m + (1−β)·g`, with no bias correction (the first step's momentum is
        /// the gradient). Not in psgd-jax.
        momentum_warmup: Warmup = Warmup::Debias;
        /// Cap on the RMS of each leaf's preconditioned update: `u / max(1, rms(u)/cap)`.
        /// Default 1.1 (psgd-jax's); psgd_torch's is 2 (`grad_clip_max_amps[0]`); null:
        /// no cap (heavyball's `PSGDPRO`).
        update_clip_rms: Option<f64> = Some(1.1), check check::positive_or_none;
        /// Clamp each element of the preconditioned update to `±v` after the RMS cap.
        /// Default null (no clamp, psgd-jax's); psgd_torch's is 10
        /// (`grad_clip_max_amps[1]`). Not in psgd-jax.
        update_clip_element: Option<f64> = None, check check::positive_or_none;
        /// Axes longer than this get a diagonal factor instead of a triangular one.
        /// Default 8192.
        max_size_triangular: usize = 8192;
        /// An axis of length `d` in a leaf (a layer with `scannedLayers`) of `N` elements
        /// gets a diagonal factor when `d² > maxSkew·N`, besides the other rules: 1
        /// makes the longer axis of a non-square matrix diagonal (psgd_torch's
        /// `preconditioner_max_skew`, whose default is 1). Size-1 axes, which psgd_torch
        /// squeezes away, change neither `N` nor any other axis' factor. Default null (no
        /// such rule, psgd-jax's).
        max_skew: Option<f64> = None, check check::positive_or_none;
        /// Leaves with fewer axes than this get only diagonal factors. Default 2.
        min_ndim_triangular: usize = 2;
        /// `null` (default): every axis may be triangular; `'one_diag'`: the largest axis
        /// of each leaf is diagonal; `'all_diag'`: every axis is diagonal.
        memory_save_mode: Option<MemorySaveMode> = None;
        /// Merge a leaf's axes before preconditioning it. `null` (default): no merging.
        /// `'small'` (distributed-kron `kron`'s `merge_small_dims`): adjacent axes are
        /// grouped so that each merged size comes closest to `targetMergedDimSize`, by
        /// distributed-kron's loss (sizes below `target/8` or above `8·target` cost most).
        /// `'twoD'` (distributed-kron `pro`'s `_merge_dims`): every leaf becomes 1-D (when
        /// one axis holds all its elements, e.g. `[1, 8, 1]` → `[8]`) or 2-D, split at the
        /// most balanced position (e.g. `[2, 3, 4]` → `[6, 4]`). Factor kinds (dense or
        /// diagonal) are decided on the merged shape. Not in psgd-jax.
        merge_dims: Option<MergeDims> = None;
        /// The merged size `mergeDims: 'small'` aims at (≥ 1). Default 4096
        /// (distributed-kron's `target_merged_dim_size`).
        target_merged_dim_size: usize = 4096, check |v: &usize| layout::at_least_one(*v);
        /// Cut every dense axis (after `mergeDims`) longer than this into blocks of this
        /// length, the last one shorter; each block gets factors of its own (a
        /// block-diagonal Kron, as distributed-kron's `block_size`), so a factor is at most
        /// `blockSize × blockSize`. Blocks are not padded: a block's fit is that of a leaf of
        /// its shape. With `preconditionerInitScale: null` each block takes its own scale.
        /// Default null (no blocks). Not in psgd-jax.
        block_size: Option<usize> = None,
            check |v: &Option<usize>| v.map_or(Ok(()), layout::at_least_one);
        /// Fit the preconditioner to the momentum rather than the raw gradient. Default
        /// true.
        momentum_into_precond_update: bool = true;
        /// Step size of the preconditioner fit (≥ 0). Default 0.1.
        preconditioner_lr: f64 = 0.1, check |v: &f64| check::precond_lr(*v);
        /// How the factors are fitted. `'EQ'` (default): psgd-jax 0.2.9's rule, with
        /// triangular factors and a triangular solve per fit. `'Q0.5EQ1.5'` (alias
        /// `'PRO'`): psgd_torch's default rule, with full factors kept near symmetric
        /// positive definite by a Procrustes rotation and no triangular solve (matrix
        /// products only). `'QUAD'`: psgd_torch's quadratic rule, with full symmetric
        /// factors. `'QEQ'`, `'QEP'`: psgd_torch's `dQ = Q·E·Q` and `dQ = Q·E·P` (QEP
        /// balances the factors before every fit). `'PRO4P'`, `'QUAD4P'`: PRO's and QUAD's
        /// forms on the factors of `P` itself (each applied once, starting at
        /// `scale^(2/k)`). Under every rule but `'EQ'` the fit steps by
        /// `preconditionerLr / L`, with `L` a running lower bound of its Lipschitz constant
        /// (see `lipschitzBeta`, kept in the state), damps its input as psgd_torch does
        /// (`g + (1e-9 + eps·|g|)·ν`) and balances the factors after the fit on 1% of fits
        /// (QEP: before every fit; see "The fit's numerics" in the docs for the options
        /// that change these). With Hessian-vector products each rule fits in its Newton
        /// form. Not in psgd-jax.
        update_rule: UpdateRule = UpdateRule::Eq;
        /// Smoothing `β` of the running Lipschitz bound that normalises the fit's step,
        /// `L ← max(β·L + (1−β)·ℓ, ℓ)` with `ℓ` the latest norm estimate and the step
        /// `preconditionerLr / L`, in [0, 1) (0: the latest estimate alone). Default null:
        /// the rule's own, 0.9 (psgd_torch's `betaL`) under every rule but `'EQ'`, none
        /// under `'EQ'` (psgd-jax's memoryless step `preconditionerLr / (ℓ + tiny)`). A
        /// number under `'EQ'` keeps the bound in the state, as psgd_torch's `EQ` does.
        /// Not in psgd-jax.
        lipschitz_beta: Option<f64> = None,
            check |v: &Option<f64>| v.as_ref().map_or(Ok(()), check::momentum);
        /// How the fit bounds the spectral norm of a dense factor's terms. `'rowNorm'`:
        /// psgd-jax's deterministic bound (the row of largest norm and one product with
        /// it). `'subspace'`: psgd_torch's random subspace iteration (32 standard normal
        /// rows per dense factor and fit, drawn after the fit's noise, two
        /// half-iterations). `'power'`: heavyball's deterministic power iteration from the
        /// row of largest norm (two iterations), which under `'Q0.5EQ1.5'` and `'PRO4P'`
        /// also normalises the Procrustes rotations in place of their random subspaces (in
        /// float32; heavyball rounds that one to bfloat16 stochastically). Default null: the
        /// rule's own, `'rowNorm'` under `'EQ'`, `'subspace'` under every other rule. Not in
        /// psgd-jax.
        norm_estimator: Option<NormEstimator> = None;
        /// How the fit's input is damped by its random draw `ν`. Null (default under
        /// `'EQ'`): psgd-jax's `g + sqrt(eps)·mean(|g|)·ν`. A number `δ ≥ 0`: psgd_torch's
        /// `g + (δ + eps·|g|)·ν` (eps the float32 machine epsilon); the inverse-free rules
        /// always damp this way, with `δ = 1e-9` when null. Under `'EQ'` `ν` is also the
        /// fit's probe, as in both references. Not in psgd-jax.
        damping: Option<f64> = None, check check::non_negative_or_none;
        /// Largest step `a` of `'Q0.5EQ1.5'`'s Procrustes rotation `exp(aR)`, in (0, 1].
        /// Default 1/8 (psgd_torch's); heavyball's is 0.5. `'PRO4P'`'s third-order
        /// rotations keep psgd_torch's cap of 1/3. Not in psgd-jax.
        procrustes_max_step: f64 = 0.125, check |v: &f64| {
            if v.is_finite() && *v > 0.0 && *v <= 1.0 {
                Ok(())
            } else {
                Err(format!("must be in (0, 1], got {v}"))
            }
        };
        /// Probability in [0, 1] that a fit balances each leaf's factors (rescales them to
        /// the same largest entry; the preconditioner is unchanged up to round-off), by a
        /// uniform draw per fit. Default null: 0.01 (psgd-jax's and psgd_torch's), unless
        /// `balanceEvery` is set; under `'QEP'` null with `balanceEvery` null is the rule's
        /// own balance before every fit, with no draw. Not in psgd-jax.
        balance_probability: Option<f64> = None,
            check |v: &Option<f64>| v.map_or(Ok(()), check::probability);
        /// Balance deterministically, with no draw, at the fits of the steps whose 1-based
        /// count is a multiple of this (≥ 1): 1 is heavyball's (every fit), 100
        /// distributed-kron's. Cannot be set with `balanceProbability`. Default null (a
        /// random decision; `'QEP'`'s own is every fit). Not in psgd-jax.
        balance_every: Option<usize> = None, check |v: &Option<usize>| match v {
            Some(0) => Err("must be >= 1 (a number of steps), got 0".to_string()),
            _ => Ok(()),
        };
        /// When the factors are balanced. `'beforeFit'`: before the fit, the random
        /// decision one uniform draw before every other draw of the fit (psgd-jax,
        /// heavyball, distributed-kron). `'afterFit'`: after each leaf's fit, the random
        /// decision one uniform draw per leaf after the leaf's other draws (psgd_torch).
        /// Default null: the rule's own, `'beforeFit'` under `'EQ'` and `'QEP'`,
        /// `'afterFit'` under the other rules. Not in psgd-jax.
        balance_when: Option<BalanceWhen> = None;
        /// Initial scale of the preconditioner (each factor gets `scale^(1/ndim)`).
        /// Default 1 (psgd-jax's). `null`: automatic, from the first step's gradient
        /// `g` of each leaf (of each layer with `scannedLayers`), `(mean(|g|⁴) + δ⁴)^(-1/8)`
        /// with `δ = 1e-9` as psgd_torch's newer Kron does, so that the first
        /// preconditioned gradient has an RMS near 1 whatever the gradient's scale, and
        /// at most `δ^(-1/2)` ≈ 3.2e4 for a tiny gradient; 1 for a gradient of all zeros.
        /// See `initScaleScope` and `initScalePower`. Not in psgd-jax.
        preconditioner_init_scale: Option<f64> = Some(1.0), check check::positive_or_none;
        /// With `preconditionerInitScale: null`, over what the automatic scale is taken:
        /// `'leaf'` (default) one per leaf (per layer with `scannedLayers`); `'global'`
        /// one for every leaf, from the largest `mean(|g|⁴)` over all of them (psgd_torch's
        /// `preconditioner_init_scale=None`). Not in psgd-jax.
        init_scale_scope: InitScaleScope = InitScaleScope::Leaf;
        /// With `preconditionerInitScale: null`, the power `k` the automatic scale is
        /// raised to: `((mean(|g|⁴) + δ⁴)^(-1/8))^k`, so the initial preconditioner is
        /// that to the `2k` (> 0). Default 1 (psgd_torch's); heavyball's
        /// `precond_init_scale_power` is 0.5 by default (heavyball clamps `|g| ≥ 1e-12`
        /// instead of adding `δ⁴`). Not in psgd-jax.
        init_scale_power: f64 = 1.0, check check::positive;
        /// Clip the incoming gradients to this global L2 norm before anything else
        /// (momentum and the preconditioner fit see the clipped gradients). Not in
        /// psgd-jax. Default null (no clip).
        grad_clip: Option<f64> = None, check check::positive_or_none;
        /// Let a step whose updates hold NaN or Inf through, as psgd-jax does. Default
        /// false: such a step fails with a `RangeError` naming the leaf and changes
        /// nothing (the test is fused into the step's last pass).
        allow_non_finite: bool = false;
/// What a step does when the preconditioner turns unhealthy: `'throw'` (default: a
        /// step whose updates would hold NaN or Inf fails with a `RangeError` and
        /// changes nothing), `'reset'` (after each fit, a leaf whose factors are
        /// non-finite or past `maxCondition` gets them back at their initial scale; a
        /// step whose updates would hold NaN or Inf resets the factors at fault and
        /// makes zero updates) or `'skip'` (such a fit is dropped for that leaf; such
        /// a step makes zero updates and keeps its momentum and preconditioner). The
        /// step is counted either way. Not in psgd-jax.
        on_unhealthy: crate::guard::OnUnhealthy = crate::guard::OnUnhealthy::Throw;
        /// The condition bound of `onUnhealthy`'s health check: a factor whose
        /// `max|diag| / min|diag|` exceeds it is unhealthy (null: only non-finite
        /// factors are). Default 1e6: float32 resolves about 7 significant digits,
        /// so past it the factors' smallest directions are lost to rounding. Read
        /// only under `'reset'` and `'skip'`.
        max_condition: Option<f64> = Some(crate::guard::DEFAULT_MAX_CONDITION),
            check crate::guard::check_max_condition;
        /// Dtype of the momentum buffer; null keeps each param's dtype.
        mu_dtype: Option<StateDType> = None;
        /// Dtype of the preconditioner factors; null is float32.
        precond_dtype: Option<StateDType> = None;
        /// Matmul precision of the preconditioner fit. Default `'tensorfloat32'` (computed
        /// in float32: candle has no TF32 switch); `'bfloat16'` rounds the operands to
        /// bfloat16; null is float32.
        precond_update_precision: Option<Precision> = Some(Precision::Tensorfloat32);
        /// Matmul precision when applying the preconditioner. Default null (float32).
        precond_grads_precision: Option<Precision> = None;
        /// Process scanned layers in batches of `laxMapBatchSize` layers, bounding memory.
        /// Default false.
        lax_map_scanned_layers: bool = false;
        /// Layers per batch with `laxMapScannedLayers`. Default 8.
        lax_map_batch_size: usize = 8;
        /// Seed of the random probe vectors; the same seed gives the same run. Default 0.
        seed: u64 = 0;
    }
    ts_only {
        /// Which leaves get weight decay: a tree of booleans or `(path, leaf) => boolean`.
        /// Default: all.
        "weightDecayMask": "Mask";
        /// Leaves whose leading axis is a stack of layers (a tree of booleans or a
        /// predicate): each layer gets its own preconditioner. Default: none.
        "scannedLayers": "Mask";
        /// Receives the optimizer's warnings (a `PsgdWarning`: the divergence warning, once per
        /// optimizer, when the params' norm grows steadily); null silences them and skips
        /// the norm's sampling. Default: `process.emitWarning` with type `'PsgdWarning'` and
        /// the warning's `code`.
        "onWarning": "WarningHook | null";
    }
}

impl VariantOptions for KronOptions {
    const PRECOND_LR: &'static str = "preconditionerLr";

    fn step(&self) -> StepOptions {
        StepOptions {
            learning_rate: self.learning_rate.clone(),
            update_probability: self
                .preconditioner_update_probability
                .clone()
                .unwrap_or_else(precond_update_prob_schedule),
            precond_lr: Schedule::Constant(self.preconditioner_lr),
            b1: self.b1,
            nesterov: false,
            weight_decay: self.weight_decay,
            mu_dtype: self.mu_dtype.map(|d| d.0),
            seed: self.seed,
            init_scale: self.preconditioner_init_scale,
            normalizer: StepNormalizer::Second,
            precision: self.update_precision(),
            decision: match self.update_decision {
                KronUpdateDecision::Counter => UpdateDecision::Counter,
                KronUpdateDecision::Draw => UpdateDecision::Draw { always: 0 },
                KronUpdateDecision::Cumulative => UpdateDecision::Cumulative,
            },
            fit_source: if self.momentum_into_precond_update {
                FitSource::Momentum
            } else {
                FitSource::Gradient
            },
            clip: match (self.update_clip_rms, self.update_clip_element) {
                (None, None) => Clip::None,
                (rms, element) => Clip::Update { rms, element },
            },
            grad_clip: self.grad_clip,
            check_finite: !self.allow_non_finite,
            on_unhealthy: self.on_unhealthy,
            max_condition: self.max_condition,
            momentum_warmup: self.momentum_warmup,
            update_first: self.update_preconditioner_first && !self.overlap_fit,
            overlap_fit: self.overlap_fit,
        }
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.learning_rate = Schedule::Constant(lr);
    }
}

impl KronOptions {
    fn update_precision(&self) -> Precision {
        self.precond_update_precision.unwrap_or(Precision::Float32)
    }

    fn grads_precision(&self) -> Precision {
        self.precond_grads_precision.unwrap_or(Precision::Float32)
    }
}

/// How one leaf is preconditioned: a batch of `batch` slices (the scanned axis, or 1), each
/// of shape `dims` (a 0-d leaf is treated as shape `[1]`), with a factor per axis.
#[derive(Debug, Clone)]
struct LeafPlan {
    batch: usize,
    dims: Vec<usize>,
    diag: Vec<bool>,
    /// The shape each stored factor has (psgd-jax's layout, so states line up).
    stored: Vec<Vec<usize>>,
    scanned: bool,
    scale: f64,
    /// 2 where the factors are those of `P` (PRO4P, QUAD4P; see [`UpdateRule::fits_p`]),
    /// so an initial scale `s` gives factors `s^(2/k)`; else 1.
    p_power: f64,
}

impl LeafPlan {
    /// The plan of `spec` with factor kinds `diag` (one per axis after the layer axis; see
    /// [`factor_kinds`]).
    fn new(spec: &LeafSpec, diag: &[bool], o: &KronOptions) -> Result<Self> {
        if spec.shape.contains(&0) {
            return Err(PsgdError::Shape {
                what: "params",
                path: spec.path.clone(),
                expected: vec![],
                got: spec.shape.clone(),
            });
        }
        let (batch, slice) = layout::layers(spec)?;
        let lead: Vec<usize> = if spec.scanned { vec![batch] } else { vec![] };
        // the factors of P itself (PRO4P, QUAD4P) start at the square of Q's
        let p_power = if o.update_rule.fits_p() { 2.0 } else { 1.0 };
        if slice.is_empty() {
            return Ok(LeafPlan {
                batch,
                dims: vec![1],
                diag: vec![true],
                stored: vec![lead],
                scanned: spec.scanned,
                scale: o.preconditioner_init_scale.unwrap_or(1.0).powf(p_power),
                p_power,
            });
        }
        let stored = slice
            .iter()
            .zip(diag)
            .map(|(&d, &dg)| {
                let mut s = lead.clone();
                s.push(d);
                if !dg {
                    s.push(d);
                }
                s
            })
            .collect();
        Ok(LeafPlan {
            batch,
            dims: slice.to_vec(),
            diag: diag.to_vec(),
            stored,
            scanned: spec.scanned,
            scale: o
                .preconditioner_init_scale
                .unwrap_or(1.0)
                .powf(p_power / slice.len() as f64),
            p_power,
        })
    }

    fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    fn batched_shape(&self) -> Vec<usize> {
        let mut s = vec![self.batch];
        s.extend(&self.dims);
        s
    }

    /// Factor `i` as `(B, d, d)` or `(B, d)` in float32.
    fn batched_q(&self, i: usize, q: &Tensor) -> Result<Tensor> {
        let d = self.dims[i];
        let q = q.to_dtype(DType::F32)?;
        Ok(if self.diag[i] {
            q.reshape((self.batch, d))?
        } else {
            q.reshape((self.batch, d, d))?
        })
    }

    /// The factors times the automatic initial scale taken from the gradient `g`: per
    /// slice of the batch `s = (mean(|g|⁴) + δ⁴)^(-1/8)` with psgd_torch's damping
    /// `δ` = [`AUTO_SCALE_DAMPING`] (so `s ≤ δ^(-1/2)` ≈ 3.2e4 however tiny the gradient),
    /// 1 for an all-zero slice; each of the `k` factors times `s^(1/k)` (the leaf scope at
    /// power 1, for the tests).
    #[cfg(test)]
    fn auto_scaled(&self, qs: &[Tensor], g: &Tensor) -> Result<Vec<Tensor>> {
        self.scaled_by(qs, &auto_scale(&self.fourth_root_mean(g)?)?, 1.0)
    }

    /// Per slice of the batch, `a = mean(|g|⁴)^¼`, float32 `(B, 1)`: 0 for an all-zero
    /// slice only (a tiny one that underflows is kept at the smallest normal float, which
    /// [`auto_scale`] treats as it treats any `a ≪ δ`).
    fn fourth_root_mean(&self, g: &Tensor) -> Result<Tensor> {
        let g = g
            .to_dtype(DType::F32)?
            .reshape((self.batch, self.numel()))?;
        // a = mean(|g|⁴)^¼ = m·mean(|g/m|⁴)^¼ with m = max|g| (1 for an all-zero slice):
        // no overflow for large gradients, no underflow to 0 for tiny ones
        let m = g.abs()?.max_keepdim(1)?;
        let zero = m.eq(0f32)?;
        let m = zero.where_cond(&m.ones_like()?, &m)?;
        let r = g.broadcast_div(&m)?.sqr()?.sqr()?.mean_keepdim(1)?;
        let a = (m * r.sqrt()?.sqrt()?)?.maximum(f32::MIN_POSITIVE)?;
        Ok(zero.where_cond(&a.zeros_like()?, &a)?)
    }

    /// The factors times `s^(power/k)` (`s` per slice of the batch, `(B, 1)`; the square
    /// of that for the factors of `P` under PRO4P and QUAD4P).
    fn scaled_by(&self, qs: &[Tensor], s: &Tensor, power: f64) -> Result<Vec<Tensor>> {
        let per_factor = s.powf(self.p_power * power / self.dims.len() as f64)?;
        qs.iter()
            .enumerate()
            .map(|(i, q)| {
                let b = self.batched_q(i, q)?;
                let f = if self.diag[i] {
                    per_factor.clone()
                } else {
                    per_factor.unsqueeze(2)?
                };
                let stored = self.stored[i].as_slice();
                Ok(b.broadcast_mul(&f)?.reshape(stored)?.to_dtype(q.dtype())?)
            })
            .collect()
    }

    fn init_factors(&self, dtype: DType, device: &Device) -> Result<Vec<Tensor>> {
        self.dims
            .iter()
            .zip(&self.diag)
            .zip(&self.stored)
            .map(|((&d, &dg), stored)| {
                let q = if dg {
                    Tensor::full(self.scale as f32, (self.batch, d), device)?
                } else {
                    (Tensor::eye(d, DType::F32, device)? * self.scale)?
                        .unsqueeze(0)?
                        .repeat((self.batch, 1, 1))?
                };
                Ok(q.reshape(stored.as_slice())?.to_dtype(dtype)?)
            })
            .collect()
    }
}

/// The automatic initial scale `(a⁴ + δ⁴)^(-1/8)` of `a = mean(|g|⁴)^¼` (see
/// [`LeafPlan::auto_scaled`]), 1 where `a` is 0, elementwise.
fn auto_scale(a: &Tensor) -> Result<Tensor> {
    let zero = a.eq(0f32)?;
    // (a⁴ + δ⁴)^¼ = hi·(1 + (lo/hi)⁴)^¼ with hi = max(a, δ), lo = min(a, δ): no power
    // of a tiny or huge number is formed
    let d = (a.ones_like()? * AUTO_SCALE_DAMPING)?;
    let (hi, lo) = (a.maximum(&d)?, a.minimum(&d)?);
    let t = (lo / &hi)?.sqr()?.sqr()?;
    let norm = (hi * (t + 1.0)?.sqrt()?.sqrt()?)?;
    let s = norm.sqrt()?.recip()?;
    finite_or_one(&zero.where_cond(&s.ones_like()?, &s)?)
}

/// Which axes of a leaf's `slice` (its shape without the layer axis) get diagonal factors:
/// those of length 1 or above `maxSizeTriangular`, every one of a leaf with fewer than
/// `minNdimTriangular` axes, those `memorySaveMode` picks, and with `maxSkew` those of
/// length `d` with `d² > maxSkew·N` (`N` the slice's elements).
fn factor_kinds(slice: &[usize], o: &KronOptions) -> Vec<bool> {
    let largest = slice
        .iter()
        .enumerate()
        .fold(0, |best, (i, &d)| if d >= slice[best] { i } else { best });
    let numel = slice.iter().product::<usize>() as f64;
    slice
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            d == 1
                || o.max_skew
                    .is_some_and(|k| (d as f64) * (d as f64) > k * numel)
                || d > o.max_size_triangular
                || slice.len() < o.min_ndim_triangular
                || o.memory_save_mode == Some(MemorySaveMode::AllDiag)
                || (o.memory_save_mode == Some(MemorySaveMode::OneDiag) && i == largest)
        })
        .collect()
}

/// Applies `f` to each axis in turn. `x` is `(B, d₀, …, dₖ₋₁)`; `f(i, X)` gets the tensor
/// viewed as `(B, dᵢ, rest)` and returns `(B, rest, dᵢ)`, which cycles the axes, so after
/// every axis the original order is back. Each product reads its operand transposed in
/// place, with no copy.
fn for_each_axis(
    x: &Tensor,
    dims: &[usize],
    mut f: impl FnMut(usize, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let n: usize = dims.iter().product();
    let mut cur = x.reshape((b, n))?;
    for (i, &d) in dims.iter().enumerate() {
        cur = f(i, &cur.reshape((b, d, n / d))?)?;
    }
    let mut shape = vec![b];
    shape.extend(dims);
    Ok(cur.reshape(shape)?)
}

/// `x` unfolded along axis `i`: `(B, dᵢ, everything else)`. The last axis is a
/// transposed view (the products read it in place); a middle one is copied.
fn unfold(x: &Tensor, plan: &LeafPlan, i: usize) -> Result<Tensor> {
    let b = x.dim(0)?;
    let n = plan.numel();
    let d = plan.dims[i];
    let lead: usize = plan.dims[..i].iter().product();
    Ok(if lead == 1 {
        x.reshape((b, d, n / d))?
    } else if lead * d == n {
        x.reshape((b, lead, d))?.transpose(1, 2)?
    } else {
        x.reshape((b, lead, n / lead))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, d, n / d))?
    })
}

/// `A`: each factor applied along its axis, `Qᵢ ×ᵢ X`.
fn apply_factors(x: &Tensor, qs: &[Tensor], plan: &LeafPlan, p: Precision) -> Result<Tensor> {
    for_each_axis(x, &plan.dims, |i, x2| {
        let xt = x2.transpose(1, 2)?;
        if plan.diag[i] {
            Ok(xt.broadcast_mul(&qs[i].unsqueeze(1)?)?)
        } else {
            matmul_tri(
                &xt,
                Tri::Full,
                &qs[i].transpose(1, 2)?,
                Tri::Lower,
                Tri::Full,
                p,
            )
        }
    })
}

/// `conjB`: each factor's inverse applied from the right along its axis.
fn solve_factors(v: &Tensor, qs: &[Tensor], plan: &LeafPlan) -> Result<Tensor> {
    for_each_axis(v, &plan.dims, |i, x2| {
        let xt = x2.transpose(1, 2)?;
        if plan.diag[i] {
            Ok(xt.broadcast_div(&qs[i].unsqueeze(1)?)?)
        } else {
            solve_triangular_right(&xt, &qs[i])
        }
    })
}

/// What a leaf is preconditioned with: the kept `Pᵢ = QᵢᵀQᵢ` (from [`grams`]), or the
/// batched factors `Qᵢ` themselves right after they changed.
#[derive(Clone, Copy)]
enum Factors<'a> {
    Grams(&'a [Tensor]),
    Qs(&'a [Tensor]),
}

impl Factors<'_> {
    /// The same kind of factors, for other tensors (a leaf's slice of a batch).
    fn like<'b>(&self, t: &'b [Tensor]) -> Factors<'b> {
        match self {
            Factors::Grams(_) => Factors::Grams(t),
            Factors::Qs(_) => Factors::Qs(t),
        }
    }
}

/// The preconditioned gradient: `QᵢᵀQᵢ` applied along each axis. With the kept `Pᵢ` that
/// is one product per axis, or per run of small axes ([`merge_small_axes`]); `Pᵢ` is
/// symmetric, so the transposed unfolding multiplies it directly. With fresh factors the axis is multiplied by `Qᵢᵀ` and `Qᵢ` in turn where
/// that is cheaper than forming `Pᵢ`: always where the triangular products skip the
/// zeros, else when the axis is longer than the rest of the leaf.
fn precondition(g: &Tensor, f: Factors, plan: &LeafPlan, p: Precision) -> Result<Tensor> {
    let qs = match f {
        Factors::Grams(ps) => {
            let (dims, grams) = merge_small_axes(plan, ps)?;
            let y = for_each_axis(g, &dims, |i, x2| {
                let xt = x2.transpose(1, 2)?;
                match &grams[i] {
                    Gram::Diag(d) => Ok(xt.broadcast_mul(&d.unsqueeze(1)?)?),
                    Gram::Dense(m) => p.matmul(&xt, m),
                }
            })?;
            // `g` may be a slice of the layers (`laxMapScannedLayers`)
            let mut shape = vec![g.dim(0)?];
            shape.extend(&plan.dims);
            return Ok(y.reshape(shape)?);
        }
        Factors::Qs(qs) => qs,
    };
    for_each_axis(g, &plan.dims, |i, x2| {
        let xt = x2.transpose(1, 2)?;
        let q = &qs[i];
        if plan.diag[i] {
            return Ok(xt.broadcast_mul(&q.sqr()?.unsqueeze(1)?)?);
        }
        let (_, d, rest) = x2.dims3()?;
        if rest >= d && !saves_work(q) {
            p.matmul(&xt, &factor_gram(q, true, p)?)
        } else {
            let y = matmul_tri(
                &xt,
                Tri::Full,
                &q.transpose(1, 2)?,
                Tri::Lower,
                Tri::Full,
                p,
            )?;
            matmul_tri(&y, Tri::Full, q, Tri::Upper, Tri::Full, p)
        }
    })
}

/// Adjacent dense axes whose sizes multiply to at most this are applied as one: the
/// Kronecker product of their grams, in one pass over the leaf. The 3×3 spatial axes of a
/// conv kernel are otherwise two products with n = 3 each, bound by memory traffic.
const MERGE_MAX: usize = 16;

/// A kept gram on an axis (or on a merged run of axes).
enum Gram {
    Diag(Tensor),
    Dense(Tensor),
}

/// The leaf's axes with runs of small dense ones merged (see [`MERGE_MAX`]), and the gram
/// of each: `P_a ⊗ P_b` for a merged pair, whose row index `(i, j)` is `i·d_b + j`, the
/// row-major order of the two axes.
fn merge_small_axes(plan: &LeafPlan, ps: &[Tensor]) -> Result<(Vec<usize>, Vec<Gram>)> {
    let mut dims: Vec<usize> = Vec::with_capacity(ps.len());
    let mut grams: Vec<Gram> = Vec::with_capacity(ps.len());
    for (i, (&d, p)) in plan.dims.iter().zip(ps).enumerate() {
        if plan.diag[i] {
            dims.push(d);
            grams.push(Gram::Diag(p.clone()));
            continue;
        }
        if let (Some(last), Some(Gram::Dense(prev))) = (dims.last_mut(), grams.last_mut()) {
            if *last * d <= MERGE_MAX {
                let (b, m) = (prev.dim(0)?, *last);
                let k = prev
                    .reshape((b, m, 1, m, 1))?
                    .broadcast_mul(&p.reshape((b, 1, d, 1, d))?)?
                    .reshape((b, m * d, m * d))?;
                *last *= d;
                *prev = k;
                continue;
            }
        }
        dims.push(d);
        grams.push(Gram::Dense(p.clone()));
    }
    Ok((dims, grams))
}

/// `Pᵢ = QᵢᵀQᵢ` of each factor (`Qᵢ²` for a diagonal one) in the batched float32 layout:
/// what applying the preconditioner needs. They change only when the factors do, so the
/// state keeps them and an apply-only step is one product per axis. They are formed at
/// the first step that does not fit the factors, not at the fit itself: while every step
/// fits (psgd-jax's default schedule does for the first 500), they would go unused.
fn grams(qs: &[Tensor], plan: &LeafPlan, p: Precision, rule: UpdateRule) -> Result<Vec<Tensor>> {
    if rule.inverse_free() {
        let batched = qs
            .iter()
            .enumerate()
            .map(|(i, q)| plan.batched_q(i, q))
            .collect::<Result<Vec<_>>>()?;
        return whiten::axis_operators(&batched, plan, rule, p);
    }
    qs.iter()
        .enumerate()
        .map(|(i, q)| factor_gram(&plan.batched_q(i, q)?, !plan.diag[i], p))
        .collect()
}

/// One fitting step of every factor of a leaf from the (damped) input `g` and probe `v`,
/// all factors moving from the same `A` and `conjB`; `ls` are the running Lipschitz
/// bounds (empty for psgd-jax's memoryless step) and `subspaces` the dense factors'
/// draws of the subspace norm bound. Returns the new factors and bounds.
#[allow(clippy::too_many_arguments)]
fn update_factors(
    qs: &[Tensor],
    ls: &[Tensor],
    g: &Tensor,
    v: &Tensor,
    subspaces: &[Option<Tensor>],
    plan: &LeafPlan,
    lr: f64,
    p: Precision,
    nm: &numerics::FitNumerics,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let a = apply_factors(g, qs, plan, p)?;
    let conj_b = solve_factors(v, qs, plan)?;
    let b = a.dim(0)?;
    let mut new_qs = Vec::with_capacity(qs.len());
    let mut new_ls = Vec::with_capacity(ls.len());
    for (i, q) in qs.iter().enumerate() {
        let ua = unfold(&a, plan, i)?;
        let ub = unfold(&conj_b, plan, i)?;
        if plan.diag[i] {
            let t1 = ua.sqr()?.sum(2)?;
            let t2 = ub.sqr()?.sum(2)?;
            let ell = (&t1 + &t2)?.abs()?.max(1)?;
            let (denom, _) = nm.normaliser(&ell, ls.get(i))?;
            new_ls.push(denom.clone());
            let step = (((t1 - t2)? * lr)? * q)?.broadcast_div(&denom.unsqueeze(1)?)?;
            new_qs.push((q - step)?);
        } else {
            // both terms are symmetric and only their upper triangles are used
            let gram = |u: &Tensor| {
                matmul_tri(u, Tri::Full, &u.transpose(1, 2)?, Tri::Full, Tri::Upper, p)
            };
            let (t1, t2) = (gram(&ua)?, gram(&ub)?);
            let ell = nm.spd_bound_upper_sum(&t1, &t2, subspaces[i].as_ref(), p)?;
            let (denom, _) = nm.normaliser(&ell, ls.get(i))?;
            new_ls.push(denom.clone());
            let scale = (denom.recip()? * lr)?.reshape((b, 1, 1))?;
            let step = triu_difference(&t1, &t2)?;
            let delta = matmul_tri(&step, Tri::Upper, q, Tri::Upper, Tri::Upper, p)?;
            new_qs.push((q - delta.broadcast_mul(&scale)?)?);
        }
    }
    Ok((new_qs, new_ls))
}

/// The state file's metadata entry naming the inverse-free rule that wrote it.
const RULE_META: &str = "update_rule";

/// Refuses a state written under another rule than `rule`: `saved` is the rule the file
/// names (`None`: EQ, or a state of `'Q0.5EQ1.5'` or `'QUAD'` written before the name
/// was kept). The factors mean different things under different rules (`Q` or `P`, full
/// or triangular), so they are not converted.
fn check_saved_rule(saved: Option<&str>, rule: UpdateRule) -> Result<()> {
    use crate::options::Choice;
    let ours = crate::options::choice_name(rule);
    let same = match saved {
        Some(name) => {
            let theirs = UpdateRule::CHOICES.iter().find(|(n, _)| *n == name);
            theirs.is_some_and(|(_, r)| *r == rule)
        }
        None => matches!(rule, UpdateRule::Eq | UpdateRule::Pro | UpdateRule::Quad),
    };
    if same {
        return Ok(());
    }
    Err(PsgdError::State(format!(
        "was written with updateRule {}, this optimizer has updateRule '{ours}'; a state \
         loads only under the rule that wrote it",
        saved.map_or("'EQ', 'Q0.5EQ1.5' or 'QUAD'".to_string(), |s| format!(
            "'{s}'"
        ))
    )))
}

/// Takes the Lipschitz bound `name` from a loaded state: float32, finite and ≥ 0.
fn load_bound(f: &mut LoadedState, name: &str) -> Result<Tensor> {
    let t = f.take(name)?;
    let bad = t.dtype() != DType::F32
        || t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .any(|v| !(v.is_finite() && *v >= 0.0));
    if bad {
        return Err(PsgdError::State(format!(
            "tensor '{name}' (a Lipschitz bound) must be finite float32 values ≥ 0"
        )));
    }
    Ok(t)
}

/// Rescales a leaf's factors so each has the same largest entry (their geometric mean);
/// the preconditioner they form is unchanged.
fn balance(qs: &[Tensor], plan: &LeafPlan) -> Result<Vec<Tensor>> {
    if qs.len() < 2 {
        return Ok(qs.to_vec());
    }
    let norms = qs
        .iter()
        .map(max_abs_per_batch)
        .collect::<Result<Vec<_>>>()?;
    let mut prod = norms[0].clone();
    for n in &norms[1..] {
        prod = (prod * n)?;
    }
    let gmean = prod.powf(1.0 / qs.len() as f64)?;
    qs.iter()
        .zip(&norms)
        .enumerate()
        .map(|(i, (q, n))| {
            let k = (&gmean / n)?;
            let k = if plan.diag[i] {
                k.unsqueeze(1)?
            } else {
                k.reshape((plan.batch, 1, 1))?
            };
            Ok(q.broadcast_mul(&k)?)
        })
        .collect()
}

/// PSGD Kron (see the module docs).
pub type Kron = Psgd<KronPreconditioner>;
/// The state of [`Kron`]: plain data, saved and loaded as safetensors.
pub type KronState = PsgdState<KronFactors>;

/// Kron's preconditioner state. Its lists run over the tensors Kron preconditions: the
/// leaves, or with `mergeDims` / `blockSize` each leaf's parts in turn (a part is the
/// merged leaf, or its blocks of one shape stacked along the leading axis, as scanned
/// layers are; see [`kron_state_size`] for their shapes).
#[derive(Debug, Clone)]
pub struct KronFactors {
    /// Factors per leaf, in psgd-jax's shapes (dense ones full, not triangular, under the
    /// inverse-free rules).
    pub qs: Vec<Vec<Tensor>>,
    /// Under the inverse-free rules (every rule but EQ): per leaf and factor the running Lipschitz
    /// bound of the fit, float32 `(B,)` (0 before the first fit). Empty under EQ.
    pub ls: Vec<Vec<Tensor>>,
    /// Derived from `qs`, never saved: per leaf and factor `QᵢᵀQᵢ` (`Qᵢ²` when diagonal),
    /// float32, batched `(B, d, d)` / `(B, d)`. `None` until a step that does not fit the
    /// factors needs them; set it to `None` after editing `qs` by hand.
    pub ps: Option<Vec<Vec<Tensor>>>,
    /// Under EQ without a running bound: per leaf and factor the normaliser of the last
    /// fit's step, float32 `(B,)`, for the telemetry. Never saved; `None` before a fit
    /// (and after a load), and under the rules that keep `ls`.
    pub norms: Option<Vec<Vec<Tensor>>>,
}

/// Kron's preconditioner for a fixed list of leaves.
#[derive(Debug, Clone)]
pub struct KronPreconditioner {
    options: KronOptions,
    /// `preconditionerInitScale: null`: the factors are scaled on the first step.
    auto_scale: bool,
    /// The fit's numerics, resolved from the options.
    numerics: numerics::FitNumerics,
    /// The tensors preconditioned: the leaves, or their parts under `mergeDims` /
    /// `blockSize` (see [`layout`]).
    leaves: Vec<LeafSpec>,
    /// How the optimizer's leaves map to `leaves`.
    layout: Box<layout::Layout>,
    plans: Vec<LeafPlan>,
}

/// What Kron's state holds for one leaf, from [`kron_state_size`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KronLeafSize {
    /// The leaf's path.
    pub path: String,
    /// The shapes of its factors, in the saved state's order (`Q.<leaf>.<k>`): per part
    /// (the leaf, or its blocks of one shape under `blockSize`), a factor per merged axis;
    /// a leading axis stacks the layers of a scanned leaf and the blocks.
    pub factors: Vec<Vec<usize>>,
    /// Bytes of those factors (in `precondDtype`) and, under the inverse-free rules, of
    /// their Lipschitz bounds (float32): the preconditioner's share of the saved state.
    pub bytes: u128,
}

/// The factor shapes and bytes Kron's state would hold for each of `leaves` under `o`,
/// without allocating anything: how `mergeDims`, `blockSize`, `maxSizeTriangular` and
/// `memorySaveMode` change the state's size. Fails as the optimizer would on bad options
/// or leaves.
pub fn kron_state_size(leaves: &[LeafSpec], o: &KronOptions) -> Result<Vec<KronLeafSize>> {
    use crate::options::Options;
    o.validate()?;
    crate::limits::check_leaf_sizes(leaves)?;
    let p = KronPreconditioner::new(leaves, o)?;
    let factor_bytes = p.precond_dtype().size_in_bytes() as u128;
    let bound_bytes = if o.update_rule.inverse_free() { 4 } else { 0 };
    Ok(leaves
        .iter()
        .enumerate()
        .map(|(l, spec)| {
            let plans = p.layout.parts_of(l).iter().map(|&i| &p.plans[i]);
            let mut out = KronLeafSize {
                path: spec.path.clone(),
                factors: vec![],
                bytes: 0,
            };
            for plan in plans {
                for st in &plan.stored {
                    let n: u128 = st.iter().map(|&d| d as u128).product();
                    out.bytes += n * factor_bytes + plan.batch as u128 * bound_bytes;
                    out.factors.push(st.clone());
                }
            }
            out
        })
        .collect())
}

/// The metadata entry of a saved state that records a layout other than the default
/// (`mergeDims`, `targetMergedDimSize`, `blockSize`).
const LAYOUT_META: &str = "kron_layout";

impl KronPreconditioner {
    /// The state file's names of every factor (or bound: `kind` `"L"`), in the order of the
    /// parts and their factors: `<kind>.<leaf>.<k>`, `k` counting the factors of the leaf's
    /// parts.
    fn factor_names<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = String> + 'a {
        (0..self.layout.leaf_count()).flat_map(move |l| {
            let per_part = self
                .layout
                .parts_of(l)
                .iter()
                .map(|&p| self.plans[p].dims.len());
            (0..per_part.sum::<usize>()).map(move |k| format!("{kind}.{l}.{k}"))
        })
    }

    /// [`grams`] of every leaf, at the apply step's precision.
    fn grams_of(&self, qs: &[Vec<Tensor>]) -> Result<Vec<Vec<Tensor>>> {
        self.plans
            .iter()
            .zip(qs)
            .map(|(plan, q)| {
                grams(
                    q,
                    plan,
                    self.options.grads_precision(),
                    self.options.update_rule,
                )
            })
            .collect()
    }

    /// A leaf's Lipschitz bounds before the first fit: zeros per factor when the fit keeps
    /// a running bound, none otherwise (psgd-jax's EQ).
    fn init_bounds(&self, plan: &LeafPlan, device: &Device) -> Result<Vec<Tensor>> {
        if !self.numerics.keeps_bounds() {
            return Ok(vec![]);
        }
        plan.dims
            .iter()
            .map(|_| Ok(Tensor::zeros(plan.batch, DType::F32, device)?))
            .collect()
    }

    fn precond_dtype(&self) -> DType {
        self.options.precond_dtype.map_or(DType::F32, |d| d.0)
    }

    /// Runs `f` over the batch axis of a leaf: at once, or in slices of
    /// `lax_map_batch_size` for scanned layers with `lax_map_scanned_layers`.
    fn map_batches(
        &self,
        plan: &LeafPlan,
        inputs: &[&Tensor],
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let chunk = if plan.scanned && self.options.lax_map_scanned_layers {
            self.options.lax_map_batch_size.max(1)
        } else {
            plan.batch
        };
        if chunk >= plan.batch {
            let all: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
            return f(&all);
        }
        let mut parts: Vec<Vec<Tensor>> = vec![];
        for start in (0..plan.batch).step_by(chunk) {
            let len = chunk.min(plan.batch - start);
            let sl = inputs
                .iter()
                .map(|t| Ok(t.narrow(0, start, len)?))
                .collect::<Result<Vec<_>>>()?;
            parts.push(f(&sl)?);
        }
        (0..parts[0].len())
            .map(|k| {
                let col: Vec<&Tensor> = parts.iter().map(|p| &p[k]).collect();
                Ok(Tensor::cat(&col, 0)?)
            })
            .collect()
    }

    /// The EQ fit of every leaf's factors: maybe balance, draw probes (whitening; the
    /// Newton form takes the caller's `vectors` with their products `inputs`), damp,
    /// step; returns the new factors and running bounds (none for psgd-jax's memoryless
    /// step).
    #[allow(clippy::too_many_arguments)]
    fn update_preconditioners(
        &self,
        qs: &[Vec<Tensor>],
        ls: &[Vec<Tensor>],
        inputs: &[Tensor],
        vectors: Option<&[Tensor]>,
        lr: f64,
        count: u64,
        rng: &mut dyn RandomSource,
    ) -> Result<(PerLeaf, PerLeaf)> {
        // psgd-jax's draws by default: one balance draw, then the probes of every leaf
        // (the caller's vectors in the Newton form); the other numerics draw as
        // psgd_torch's EQ (see `whiten::draw`)
        let nm = &self.numerics;
        let before = nm.balance_before(count, rng)?;
        // the Newton form's probes are the caller's vectors; psgd-jax's damping reuses
        // them as the noise (as its whitening does), psgd_torch's draws a noise of its own
        // (`randn_like(Hvp)`, in the noise's place among the fit's draws)
        let own_noise = vectors.is_some() && nm.damping.is_some();
        let given = if own_noise { None } else { vectors };
        let draws = self.draws(UpdateRule::Eq, inputs, given, count, rng)?;
        let probes = match (own_noise, vectors) {
            (true, Some(v)) => Some(
                v.iter()
                    .map(|v| Ok(v.to_dtype(DType::F32)?))
                    .collect::<Result<Vec<_>>>()?,
            ),
            _ => None,
        };
        let precision = self.options.update_precision();
        let out = stages::map_leaves(&self.leaves, |l| {
            let (plan, q, x, d) = (&self.plans[l], &qs[l], &inputs[l], &draws[l]);
            let x = nm.damp(x, &d.nu)?;
            let shape = plan.batched_shape();
            let probe = probes.as_ref().map_or(&d.nu, |p| &p[l]);
            let (x, v) = (
                x.reshape(shape.as_slice())?,
                probe.reshape(shape.as_slice())?,
            );
            let mut bq = self.batched(plan, q)?;
            if before {
                bq = balance(&bq, plan)?;
            }
            let (n, m) = (bq.len(), ls[l].len());
            let mut ins: Vec<&Tensor> = bq.iter().chain(&ls[l]).collect();
            ins.push(&x);
            ins.push(&v);
            for s in d.subspaces.iter().flatten() {
                ins.extend(&s.spd);
            }
            let new = self.map_batches(plan, &ins, |t| {
                let mut at = n + m + 2;
                let subspaces: Vec<Option<Tensor>> = d
                    .subspaces
                    .iter()
                    .map(|s| {
                        s.as_ref().and_then(|s| s.spd.as_ref()).map(|_| {
                            at += 1;
                            t[at - 1].clone()
                        })
                    })
                    .collect();
                let (x, v) = (&t[n + m], &t[n + m + 1]);
                let (q, l) = update_factors(
                    &t[..n],
                    &t[n..n + m],
                    x,
                    v,
                    &subspaces,
                    plan,
                    lr,
                    precision,
                    nm,
                )?;
                Ok(q.into_iter().chain(l).collect())
            })?;
            let (q, l) = new.split_at(n);
            self.finish_leaf(plan, q, l, d.balance)
        })?;
        Ok(out.into_iter().unzip())
    }

    /// Every leaf's draws of a fit under `rule`, leaf by leaf (see [`whiten::draw`]);
    /// `given` are the noises when the caller's vectors are also the noise (EQ's Newton
    /// form under psgd-jax's damping).
    fn draws(
        &self,
        rule: UpdateRule,
        inputs: &[Tensor],
        given: Option<&[Tensor]>,
        count: u64,
        rng: &mut dyn RandomSource,
    ) -> Result<Vec<whiten::LeafDraws>> {
        let given = given
            .map(|v| {
                v.iter()
                    .map(|v| Ok(v.to_dtype(DType::F32)?))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        self.leaves
            .iter()
            .zip(&self.plans)
            .zip(inputs)
            .enumerate()
            .map(|(l, ((spec, plan), x))| {
                whiten::draw(
                    plan,
                    &spec.shape,
                    rule,
                    &self.numerics,
                    count,
                    given.as_ref().map(|g| &g[l]),
                    rng,
                    x.device(),
                )
            })
            .collect()
    }

    /// A leaf's factors in the batched float32 layout.
    fn batched(&self, plan: &LeafPlan, qs: &[Tensor]) -> Result<Vec<Tensor>> {
        qs.iter()
            .enumerate()
            .map(|(i, q)| plan.batched_q(i, q))
            .collect()
    }

    /// A leaf's fitted factors `q` (balanced when `balance_after`) in their stored shapes
    /// and dtype, and its bounds `l`.
    fn finish_leaf(
        &self,
        plan: &LeafPlan,
        q: &[Tensor],
        l: &[Tensor],
        balance_after: bool,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let q = if balance_after {
            balance(q, plan)?
        } else {
            q.to_vec()
        };
        let q = q
            .iter()
            .zip(&plan.stored)
            .map(|(q, st)| Ok(q.reshape(st.as_slice())?.to_dtype(self.precond_dtype())?))
            .collect::<Result<Vec<_>>>()?;
        Ok((q, l.to_vec()))
    }

    /// The inverse-free fit of every leaf (every rule but EQ), from the inputs `inputs`
    /// (gradients, or Hessian-vector products with their probes `probes`): the draws leaf
    /// by leaf in psgd_torch's order (see [`whiten::draw`]), then the leaves' fits; under
    /// PRO4P, whose count of draws depends on the data, leaf after leaf with the draws
    /// taken as the fit goes. Returns the new factors and Lipschitz bounds.
    #[allow(clippy::too_many_arguments)]
    fn fit_inverse_free(
        &self,
        qs: &[Vec<Tensor>],
        ls: &[Vec<Tensor>],
        inputs: &[Tensor],
        probes: Option<&[Tensor]>,
        lr: f64,
        count: u64,
        rng: &mut dyn RandomSource,
    ) -> Result<(PerLeaf, PerLeaf)> {
        let rule = self.options.update_rule;
        let fit = whiten::Fit {
            rule,
            lr,
            numerics: self.numerics,
            precision: self.options.update_precision(),
        };
        let before = self.numerics.balance_before(count, rng)?;
        if rule == UpdateRule::Pro4p {
            let mut out = Vec::with_capacity(self.leaves.len());
            for (l, (spec, plan)) in self.leaves.iter().zip(&self.plans).enumerate() {
                let nu = rng.normal(&spec.shape, inputs[l].device())?;
                let (q, b) = {
                    let live = std::sync::Mutex::new(&mut *rng);
                    self.fit_leaf_inverse_free(
                        l,
                        (&qs[l], &ls[l]),
                        &inputs[l],
                        probes,
                        &nu,
                        before,
                        &[],
                        |_| whiten::Draws::Live(&live),
                        fit,
                    )?
                };
                let balanced = self.numerics.balance_after(count, rng)?;
                out.push(self.finish_leaf(plan, &q, &b, balanced)?);
            }
            return Ok(out.into_iter().unzip());
        }
        let draws = self.draws(rule, inputs, None, count, rng)?;
        let out = stages::map_leaves(&self.leaves, |l| {
            let d = &draws[l];
            // every dense factor's subspaces, batched along axis 0
            let mut subs: Vec<&Tensor> = vec![];
            for s in d.subspaces.iter().flatten() {
                subs.extend(&s.spd);
                subs.extend(&s.skh);
            }
            let (q, b) = self.fit_leaf_inverse_free(
                l,
                (&qs[l], &ls[l]),
                &inputs[l],
                probes,
                &d.nu,
                before,
                &subs,
                |t: &[Tensor]| {
                    let mut at = 0;
                    let mut next = |drawn: &Option<Tensor>| {
                        drawn.as_ref().map(|_| {
                            at += 1;
                            t[at - 1].clone()
                        })
                    };
                    let sliced = d
                        .subspaces
                        .iter()
                        .map(|s| {
                            s.as_ref().map(|s| whiten::Subspaces {
                                spd: next(&s.spd),
                                skh: next(&s.skh),
                            })
                        })
                        .collect();
                    whiten::Draws::Drawn(sliced)
                },
                fit,
            )?;
            self.finish_leaf(&self.plans[l], &q, &b, d.balance)
        })?;
        Ok(out.into_iter().unzip())
    }

    /// One leaf's inverse-free fit over its layers (in slices under
    /// `laxMapScannedLayers`) from its factors and bounds `(qs, ls)`: damps the input `x`
    /// with the noise `nu`, balances first when `before`, and fits with the draws `draws`
    /// makes from a slice of the batched subspaces `subs`. Returns the batched factors and
    /// the bounds.
    #[allow(clippy::too_many_arguments)]
    fn fit_leaf_inverse_free<'a>(
        &self,
        l: usize,
        (qs, ls): (&[Tensor], &[Tensor]),
        x: &Tensor,
        probes: Option<&[Tensor]>,
        nu: &Tensor,
        before: bool,
        subs: &[&Tensor],
        draws: impl Fn(&[Tensor]) -> whiten::Draws<'a>,
        fit: whiten::Fit,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let plan = &self.plans[l];
        let shape = plan.batched_shape();
        let gn = self.numerics.damp(x, nu)?.reshape(shape.as_slice())?;
        let probe = probes
            .map(|v| Ok::<_, PsgdError>(v[l].to_dtype(DType::F32)?.reshape(shape.as_slice())?))
            .transpose()?;
        let mut bq = self.batched(plan, qs)?;
        if before {
            bq = balance(&bq, plan)?;
        }
        let n = bq.len();
        // every input of the fit, batched along axis 0: factors, bounds, the damped input,
        // the probe, then the subspaces
        let mut ins: Vec<&Tensor> = bq.iter().chain(ls).collect();
        ins.push(&gn);
        ins.extend(&probe);
        let first_sub = ins.len();
        ins.extend(subs);
        let new = self.map_batches(plan, &ins, |t| {
            let probe = probe.as_ref().map(|_| &t[2 * n + 1]);
            let (q, l) = whiten::fit_leaf(
                &t[..n],
                &t[n..2 * n],
                &t[2 * n],
                probe,
                draws(&t[first_sub..]),
                plan,
                fit,
            )?;
            Ok(q.into_iter().chain(l).collect())
        })?;
        let (q, l) = new.split_at(n);
        Ok((q.to_vec(), l.to_vec()))
    }

    /// The preconditioned gradient of one leaf (before the clip, weight decay and lr).
    /// `f` holds the kept grams (already batched) or the factors in their stored shapes.
    fn apply_leaf(&self, plan: &LeafPlan, f: Factors, m: &Tensor) -> Result<Tensor> {
        let shape = m.dims().to_vec();
        let x = m.reshape(plan.batched_shape().as_slice())?;
        let (batched, f) = match f {
            Factors::Grams(ps) => (ps.to_vec(), f),
            // full factors (the inverse-free rules): by their grams, or by `Qᵢᵀ` and `Qᵢ`
            // in turn on an axis longer than the rest of the leaf
            Factors::Qs(qs) if self.options.update_rule.inverse_free() => {
                let batched = qs
                    .iter()
                    .enumerate()
                    .map(|(i, q)| plan.batched_q(i, q))
                    .collect::<Result<Vec<_>>>()?;
                let n = batched.len();
                let mut ins: Vec<&Tensor> = batched.iter().collect();
                ins.push(&x);
                let (p, rule) = (self.options.grads_precision(), self.options.update_rule);
                let out = self.map_batches(plan, &ins, |t| {
                    Ok(vec![whiten::precondition_full(
                        &t[n],
                        &t[..n],
                        plan,
                        rule,
                        p,
                    )?])
                })?;
                return Ok(out[0].reshape(shape)?);
            }
            Factors::Qs(qs) => (
                qs.iter()
                    .enumerate()
                    .map(|(i, q)| plan.batched_q(i, q))
                    .collect::<Result<Vec<_>>>()?,
                f,
            ),
        };
        let n = batched.len();
        let mut ins: Vec<&Tensor> = batched.iter().collect();
        ins.push(&x);
        let out = self.map_batches(plan, &ins, |t| {
            Ok(vec![precondition(
                &t[n],
                f.like(&t[..n]),
                plan,
                self.options.grads_precision(),
            )?])
        })?;
        Ok(out[0].reshape(shape)?)
    }
}

impl Preconditioner for KronPreconditioner {
    const NAME: &'static str = "kron";
    const WHITENING_VECTOR: bool = false;
    const FIT_ON_POOL: bool = true;
    type Options = KronOptions;
    type State = KronFactors;

    fn new(leaves: &[LeafSpec], o: &KronOptions) -> Result<Self> {
        let layout = layout::Layout::new(leaves, o)?;
        let plans = layout
            .parts()
            .iter()
            .map(|p| LeafPlan::new(&p.spec, &p.diag, o))
            .collect::<Result<Vec<_>>>()?;
        Ok(KronPreconditioner {
            auto_scale: o.preconditioner_init_scale.is_none(),
            numerics: numerics::FitNumerics::new(o)?,
            options: o.clone(),
            leaves: layout.parts().iter().map(|p| p.spec.clone()).collect(),
            layout: Box::new(layout),
            plans,
        })
    }

    fn factor_dtype(&self) -> DType {
        self.precond_dtype()
    }

    fn state_sizes(&self) -> Vec<StateSize> {
        let mut out = vec![];
        for (leaf, plan) in self.leaves.iter().zip(&self.plans) {
            for (axis, (stored, &diag)) in plan.stored.iter().zip(&plan.diag).enumerate() {
                let elems = stored.iter().map(|&d| d as u128).product::<u128>();
                out.push(StateSize {
                    what: format!(
                        "the factor of leaf '{}' for axis {axis} (shape {stored:?})",
                        leaf.path
                    ),
                    option: (!diag).then_some("maxSizeTriangular"),
                    // a dense factor keeps its QᵀQ next to it; a running Lipschitz bound is
                    // one number per layer
                    elems: if diag { elems } else { 2 * elems }
                        + if self.numerics.keeps_bounds() {
                            plan.batch as u128
                        } else {
                            0
                        },
                });
            }
        }
        out
    }

    fn init(&self, device: &Device, _rng: &mut dyn RandomSource) -> Result<KronFactors> {
        let qs = self
            .plans
            .iter()
            .map(|plan| plan.init_factors(self.precond_dtype(), device))
            .collect::<Result<Vec<_>>>()?;
        let ls = self
            .plans
            .iter()
            .map(|plan| self.init_bounds(plan, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(KronFactors {
            qs,
            ls,
            ps: None,
            norms: None,
        })
    }

    fn first_step(&self, st: &KronFactors, grads: &[Tensor]) -> Result<Option<KronFactors>> {
        if !self.auto_scale {
            return Ok(None);
        }
        let grads = self.layout.split(grads)?;
        let a = stages::map_leaves(&self.leaves, |l| self.plans[l].fourth_root_mean(&grads[l]))?;
        let scales = match self.options.init_scale_scope {
            InitScaleScope::Leaf => a.iter().map(auto_scale).collect::<Result<Vec<_>>>()?,
            InitScaleScope::Global => {
                // one scale from the largest mean(|g|⁴) of every leaf and layer
                let maxes = a
                    .iter()
                    .map(|a| a.max_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let s = auto_scale(&Tensor::stack(&maxes, 0)?.max_all()?)?;
                a.iter()
                    .map(|a| Ok(s.broadcast_as(a.shape())?))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let power = self.options.init_scale_power;
        let qs = stages::map_leaves(&self.leaves, |l| {
            self.plans[l].scaled_by(&st.qs[l], &scales[l], power)
        })?;
        Ok(Some(KronFactors {
            qs,
            ls: st.ls.clone(),
            ps: None,
            norms: st.norms.clone(),
        }))
    }

    fn update(
        &self,
        st: &KronFactors,
        inputs: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<KronFactors> {
        let (hvps, vectors) = (
            self.layout.split(inputs.hvps)?,
            inputs.vectors.map(|v| self.layout.split(v)).transpose()?,
        );
        let inputs = &FitInputs {
            hvps: &hvps,
            vectors: vectors.as_deref(),
            ..*inputs
        };
        // the Newton form: the caller's probes with their Hessian-vector products
        let probes = if inputs.hessian {
            let v = inputs.vectors.ok_or_else(|| {
                PsgdError::option_type("vector", "is needed with the Hessian-vector products")
            })?;
            Some(v)
        } else {
            None
        };
        let (lr, count) = (inputs.precond_lr, inputs.count);
        if self.options.update_rule.inverse_free() {
            let (qs, ls) =
                self.fit_inverse_free(&st.qs, &st.ls, inputs.hvps, probes, lr, count, rng)?;
            return Ok(KronFactors {
                qs,
                ls,
                ps: None,
                norms: None,
            });
        }
        // EQ's fit gives each factor's step normaliser: the running bound kept in `ls`,
        // or without one the step's own, kept apart (never saved) for the telemetry
        let (qs, norms) =
            self.update_preconditioners(&st.qs, &st.ls, inputs.hvps, probes, lr, count, rng)?;
        let (ls, norms) = match self.numerics.lipschitz_beta {
            Some(_) => (norms, None),
            None => (st.ls.clone(), Some(norms)),
        };
        Ok(KronFactors {
            qs,
            ls,
            ps: None,
            norms,
        })
    }

    fn prepare_apply(&self, st: KronFactors, fitted: bool) -> Result<KronFactors> {
        // the grams change only with the factors: formed at the first step that does not
        // fit them, kept while none does
        Ok(match (st.ps, fitted) {
            (_, true) => KronFactors {
                qs: st.qs,
                ls: st.ls,
                ps: None,
                norms: st.norms,
            },
            (Some(ps), false) => KronFactors {
                qs: st.qs,
                ls: st.ls,
                ps: Some(ps),
                norms: st.norms,
            },
            (None, false) => {
                let ps = self.grams_of(&st.qs)?;
                KronFactors {
                    qs: st.qs,
                    ls: st.ls,
                    ps: Some(ps),
                    norms: st.norms,
                }
            }
        })
    }

    fn apply(&self, st: &KronFactors, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        let grads = self.layout.split(grads)?;
        let out = self
            .plans
            .iter()
            .enumerate()
            .map(|(l, plan)| match &st.ps {
                Some(ps) => self.apply_leaf(plan, Factors::Grams(&ps[l]), &grads[l]),
                None => self.apply_leaf(plan, Factors::Qs(&st.qs[l]), &grads[l]),
            })
            .collect::<Result<Vec<_>>>()?;
        self.layout.join(out)
    }

    fn save(&self, st: &KronFactors, f: &mut StateFile) {
        let rule = self.options.update_rule;
        if rule.inverse_free() {
            f.meta(RULE_META, crate::options::choice_name(rule).to_string());
        }
        // named per leaf (`Q.<leaf>.<k>`, k counting the factors of the leaf's parts), so
        // a leaf's tensors move with it when a state is regrouped
        for (kind, per_part) in [("Q", &st.qs), ("L", &st.ls)] {
            for (name, t) in self.factor_names(kind).zip(per_part.iter().flatten()) {
                f.tensor(name, t);
            }
        }
        if let Some(tag) = self.layout.tag() {
            f.meta(LAYOUT_META, tag.to_string());
        }
    }

    fn load(&self, f: &mut LoadedState) -> Result<KronFactors> {
        check_saved_rule(f.meta_str(RULE_META), self.options.update_rule)?;
        let saved = f.meta_str(LAYOUT_META).map(str::to_string);
        if saved.as_deref() != self.layout.tag() {
            return Err(layout::mismatch(saved.as_deref(), self.layout.tag()));
        }
        let mut names = self.factor_names("Q");
        let qs = self
            .plans
            .iter()
            .map(|plan| {
                plan.stored
                    .iter()
                    .map(|_| f.take_factor(&names.next().expect("a name per factor")))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut names = self.factor_names("L");
        let ls = self
            .plans
            .iter()
            .map(|plan| {
                if !self.numerics.keeps_bounds() {
                    return Ok(vec![]);
                }
                plan.stored
                    .iter()
                    .map(|_| load_bound(f, &names.next().expect("a name per factor")))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KronFactors {
            qs,
            ls,
            ps: None,
            norms: None,
        })
    }

    fn factor_stats(&self, st: &KronFactors) -> Result<Vec<FactorStats>> {
        let mut out = vec![];
        for (l, plan) in self.plans.iter().enumerate() {
            for (i, q) in st.qs[l].iter().enumerate() {
                let bound = match (st.ls[l].get(i), &st.norms) {
                    (Some(b), _) => Some(b),
                    (None, Some(n)) => n.get(l).and_then(|n| n.get(i)),
                    (None, None) => None,
                };
                out.push(FactorStats {
                    path: self.leaves[l].path.clone(),
                    factor: i,
                    condition: diagonal_ratio(&plan.batched_q(i, q)?, !plan.diag[i])?,
                    normaliser: bound.map(largest).transpose()?,
                });
            }
        }
        Ok(out)
    }

    /// Per leaf, the largest condition estimate of the factors of its parts (a factor
    /// batched over layers or blocks: its worst), and whether its Lipschitz bounds are
    /// finite.
    fn conditions(&self, st: &KronFactors) -> Result<Vec<f64>> {
        let groups = (0..self.layout.leaf_count())
            .map(|l| {
                let mut out = vec![];
                for &p in self.layout.parts_of(l) {
                    let plan = &self.plans[p];
                    for (i, q) in st.qs[p].iter().enumerate() {
                        let q = plan.batched_q(i, q)?;
                        out.push(crate::guard::diag_condition(&q, !plan.diag[i])?);
                    }
                    for b in &st.ls[p] {
                        out.push(crate::guard::finite_probe(b)?);
                    }
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        crate::guard::read_groups(groups)
    }

    fn take_leaves(
        &self,
        st: KronFactors,
        from: &KronFactors,
        which: &[bool],
    ) -> Result<KronFactors> {
        let mut parts = vec![false; self.plans.len()];
        for (l, _) in which.iter().enumerate().filter(|(_, &w)| w) {
            for &p in self.layout.parts_of(l) {
                parts[p] = true;
            }
        }
        let ls = if st.ls.len() == parts.len() {
            crate::guard::take_marked(st.ls, &from.ls, &parts)
        } else {
            st.ls
        };
        // the normalisers of the last fit go with the factors they were taken for
        let norms = match (st.norms, &from.norms) {
            (Some(n), Some(f)) if n.len() == parts.len() && f.len() == parts.len() => {
                Some(crate::guard::take_marked(n, f, &parts))
            }
            _ => None,
        };
        Ok(KronFactors {
            qs: crate::guard::take_marked(st.qs, &from.qs, &parts),
            ls,
            ps: None,
            norms,
        })
    }

    fn check(&self, s: &KronFactors) -> Result<()> {
        if s.qs.len() != self.leaves.len() {
            return Err(PsgdError::State(format!(
                "has preconditioners for {} leaves, the optimizer has {}",
                s.qs.len(),
                self.leaves.len()
            )));
        }
        for ((spec, plan), qs) in self.leaves.iter().zip(&self.plans).zip(&s.qs) {
            if qs.len() != plan.stored.len()
                || qs
                    .iter()
                    .zip(&plan.stored)
                    .any(|(q, st)| q.dims() != st.as_slice())
            {
                return Err(PsgdError::State(format!(
                    "preconditioner of '{}' has shapes {:?}, expected {:?}",
                    spec.path,
                    qs.iter().map(|q| q.dims().to_vec()).collect::<Vec<_>>(),
                    plan.stored
                )));
            }
        }
        let bounds = if self.numerics.keeps_bounds() {
            |plan: &LeafPlan| plan.dims.len()
        } else {
            |_: &LeafPlan| 0
        };
        for ((spec, plan), ls) in self.leaves.iter().zip(&self.plans).zip(&s.ls) {
            if ls.len() != bounds(plan)
                || ls
                    .iter()
                    .any(|b| b.dims() != [plan.batch] || b.dtype() != DType::F32)
            {
                return Err(PsgdError::State(format!(
                    "Lipschitz bounds of '{}' are {:?}, expected {} float32 of shape [{}] \
                     (updateRule {}, lipschitzBeta {})",
                    spec.path,
                    ls.iter().map(|b| b.dims().to_vec()).collect::<Vec<_>>(),
                    bounds(plan),
                    plan.batch,
                    crate::options::choice_name(self.options.update_rule),
                    self.numerics
                        .lipschitz_beta
                        .map_or("null (none kept)".to_string(), |b| b.to_string())
                )));
            }
        }
        if s.ls.len() != self.leaves.len() {
            return Err(PsgdError::State(format!(
                "has Lipschitz bounds for {} leaves, the optimizer has {}",
                s.ls.len(),
                self.leaves.len()
            )));
        }
        let ps_ok = s.ps.as_ref().is_none_or(|all| {
            all.len() == s.qs.len()
                && all.iter().zip(&self.plans).all(|(ps, plan)| {
                    ps.len() == plan.dims.len()
                        && ps.iter().enumerate().all(|(i, p)| {
                            let d = plan.dims[i];
                            if plan.diag[i] {
                                p.dims() == [plan.batch, d]
                            } else {
                                p.dims() == [plan.batch, d, d]
                            }
                        })
                })
        });
        if !ps_ok {
            return Err(PsgdError::State(
                "the derived QᵀQ cache (ps) does not match the factors; set it to None".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, rand};

    fn plan(dims: &[usize], diag: &[bool]) -> LeafPlan {
        LeafPlan {
            batch: 2,
            dims: dims.to_vec(),
            diag: diag.to_vec(),
            stored: vec![],
            scanned: true,
            scale: 1.0,
            p_power: 1.0,
        }
    }

    /// The automatic initial scale: `mean(|g|⁴)^(-1/8)` for an ordinary gradient, bounded
    /// by `δ^(-1/2)` for a tiny one (no underflow to 0, no huge scale), 1 for all zeros.
    #[test]
    fn auto_scale_is_bounded_for_tiny_gradients() {
        let mut plan = plan(&[2, 3], &[true, true]);
        plan.stored = vec![vec![2, 2], vec![2, 3]];
        let ordinary: Vec<f32> = (0..6).map(|i| (i as f32 - 2.5) * 0.3).collect();
        let reference = {
            let m4 = ordinary.iter().map(|g| (*g as f64).powi(4)).sum::<f64>() / 6.0;
            m4.powf(-0.125)
        };
        let bound = AUTO_SCALE_DAMPING.powf(-0.5);
        let cases: [(Vec<f32>, f64); 6] = [
            (ordinary.clone(), reference),
            (ordinary.iter().map(|g| g * 1e6).collect(), reference * 1e-3),
            (vec![1e-33; 6], bound),
            (vec![1e-38, -1e-38, 1e-38, 1e-38, 0.0, 1e-38], bound),
            (vec![0.0, 0.0, 1e-44, 0.0, 0.0, 0.0], bound),
            (vec![0.0; 6], 1.0),
        ];
        for (k, (g, want)) in cases.iter().enumerate() {
            let mut both = ordinary.clone();
            both.extend(g);
            let g = Tensor::from_vec(both, (2, 6), &Device::Cpu).unwrap();
            let qs: Vec<Tensor> = plan
                .stored
                .iter()
                .map(|s| Tensor::ones(s.as_slice(), DType::F32, &Device::Cpu).unwrap())
                .collect();
            let out = plan.auto_scaled(&qs, &g).unwrap();
            let at = |i: usize, b: usize| -> f64 { out[i].to_vec2::<f32>().unwrap()[b][0] as f64 };
            // slice 0 holds the ordinary gradient, slice 1 the case's
            let s0 = at(0, 0) * at(1, 0);
            let s1 = at(0, 1) * at(1, 1);
            assert!(
                (s0 / reference - 1.0).abs() < 1e-5,
                "case {k}: {s0} vs {reference}"
            );
            assert!(
                s1.is_finite() && (s1 / want - 1.0).abs() < 1e-4,
                "case {k}: {s1} vs {want}"
            );
        }
    }

    /// Merging small axes only reorders the sums: the result is that of one axis at a time.
    #[test]
    fn merged_small_axes_match_one_axis_at_a_time() {
        let cases: [(&[usize], &[bool]); 3] = [
            (&[3, 3, 5, 2, 4], &[false, false, false, true, false]),
            (&[2, 2, 2, 2], &[false; 4]),
            (&[4, 3, 3], &[false, true, false]),
        ];
        for (k, (dims, diag)) in cases.into_iter().enumerate() {
            let plan = plan(dims, diag);
            let ps: Vec<Tensor> = dims
                .iter()
                .zip(diag)
                .enumerate()
                .map(|(i, (&d, &dg))| {
                    let seed = 10 * k as u64 + i as u64;
                    if dg {
                        rand((2, 1, d), seed).squeeze(1).unwrap()
                    } else {
                        rand((2, d, d), seed)
                    }
                })
                .collect();
            let n: usize = dims.iter().product();
            let x = rand((2, 1, n), 99).reshape(plan.batched_shape()).unwrap();
            let p = Precision::Float32;
            let merged = precondition(&x, Factors::Grams(&ps), &plan, p).unwrap();
            let one_at_a_time = for_each_axis(&x, dims, |i, x2| {
                let xt = x2.transpose(1, 2)?;
                if diag[i] {
                    Ok(xt.broadcast_mul(&ps[i].unsqueeze(1)?)?)
                } else {
                    p.matmul(&xt, &ps[i])
                }
            })
            .unwrap();
            let scale = one_at_a_time.abs().unwrap().max_all().unwrap();
            let err = max_abs_diff(&merged, &one_at_a_time) / scale.to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "case {k}: relative error {err}");
        }
    }
}
