//! PSGD Kron: one preconditioner factor per tensor axis (triangular or diagonal), fitted by
//! gradient whitening, as psgd-jax 0.2.9's `kron` / `scale_by_kron`.

use crate::common::finite_or_one;
use crate::error::{PsgdError, Result};
use crate::kernels::fused::{self, Clip};
use crate::kernels::linalg::{
    factor_gram, max_abs_per_batch, norm_lower_bound_sym_sum, solve_triangular_right,
    triu_difference, TINY_F32,
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
}

impl UpdateRule {
    /// Whether the rule keeps full factors and a Lipschitz bound (PRO, QUAD).
    pub fn inverse_free(self) -> bool {
        self != UpdateRule::Eq
    }
}

impl crate::options::Choice for UpdateRule {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("EQ", UpdateRule::Eq),
        ("Q0.5EQ1.5", UpdateRule::Pro),
        ("PRO", UpdateRule::Pro),
        ("QUAD", UpdateRule::Quad),
    ];
}
crate::options::choice_option!(UpdateRule, "'EQ' | 'Q0.5EQ1.5' | 'PRO' | 'QUAD'");

/// How Kron decides whether a step fits the preconditioner (`updateDecision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KronUpdateDecision {
    /// psgd-jax's deterministic counter: fit once `1/p` steps have passed since the last
    /// fit. No random draw.
    Counter,
    /// psgd_torch's: one uniform draw `u` at the start of every step (even when `p` is 1),
    /// fitting when `u < p`.
    Draw,
}

impl crate::options::Choice for KronUpdateDecision {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("counter", KronUpdateDecision::Counter),
        ("draw", KronUpdateDecision::Draw),
    ];
}
crate::options::choice_option!(KronUpdateDecision, "'counter' | 'draw'");

mod whiten;

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
        /// every step, even when `p` is 1, and the step fits when `u < p`. Not in
        /// psgd-jax.
        update_decision: KronUpdateDecision = KronUpdateDecision::Counter;
        /// Axes longer than this get a diagonal factor instead of a triangular one.
        /// Default 8192.
        max_size_triangular: usize = 8192;
        /// Leaves with fewer axes than this get only diagonal factors. Default 2.
        min_ndim_triangular: usize = 2;
        /// `null` (default): every axis may be triangular; `'one_diag'`: the largest axis
        /// of each leaf is diagonal; `'all_diag'`: every axis is diagonal.
        memory_save_mode: Option<MemorySaveMode> = None;
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
        /// factors. Under `'Q0.5EQ1.5'` and `'QUAD'` the fit steps by
        /// `preconditionerLr / L`, with `L` a running lower bound of its Lipschitz constant
        /// (see `lipschitzBeta`, kept in the state), damps its input as psgd_torch does
        /// (`g + (1e-9 + eps·|g|)·ν`) and balances the factors after the fit on 1% of fits.
        /// Not in psgd-jax.
        update_rule: UpdateRule = UpdateRule::Eq;
        /// Smoothing `β` of the running Lipschitz bound of `'Q0.5EQ1.5'` and `'QUAD'`,
        /// `L ← max(β·L + (1−β)·ℓ, ℓ)` with `ℓ` the latest estimate, in [0, 1) (0: the
        /// latest estimate alone). Default 0.9 (psgd_torch's `betaL`). `'EQ'` ignores it.
        /// Not in psgd-jax.
        lipschitz_beta: f64 = 0.9, check check::momentum;
        /// Initial scale of the preconditioner (each factor gets `scale^(1/ndim)`).
        /// Default 1 (psgd-jax's). `null`: automatic, from the first step's gradient
        /// `g` of each leaf (of each layer with `scannedLayers`), `(mean(|g|⁴) + δ⁴)^(-1/8)`
        /// with `δ = 1e-9` as psgd_torch's newer Kron does, so that the first
        /// preconditioned gradient has an RMS near 1 whatever the gradient's scale, and
        /// at most `δ^(-1/2)` ≈ 3.2e4 for a tiny gradient; 1 for a gradient of all zeros.
        /// Not in psgd-jax.
        preconditioner_init_scale: Option<f64> = Some(1.0), check check::positive_or_none;
        /// Clip the incoming gradients to this global L2 norm before anything else
        /// (momentum and the preconditioner fit see the clipped gradients). Not in
        /// psgd-jax. Default null (no clip).
        grad_clip: Option<f64> = None, check check::positive_or_none;
        /// Let a step whose updates hold NaN or Inf through, as psgd-jax does. Default
        /// false: such a step fails with a `RangeError` naming the leaf and changes
        /// nothing (the test is fused into the step's last pass).
        allow_non_finite: bool = false;
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
            },
            fit_source: if self.momentum_into_precond_update {
                FitSource::Momentum
            } else {
                FitSource::Gradient
            },
            clip: Clip::Rms,
            grad_clip: self.grad_clip,
            check_finite: !self.allow_non_finite,
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
}

impl LeafPlan {
    fn new(spec: &LeafSpec, o: &KronOptions) -> Result<Self> {
        if spec.shape.contains(&0) {
            return Err(PsgdError::Shape {
                what: "params",
                path: spec.path.clone(),
                expected: vec![],
                got: spec.shape.clone(),
            });
        }
        let (batch, slice): (usize, &[usize]) = if spec.scanned {
            match spec.shape.split_first() {
                Some((&b, rest)) => (b, rest),
                None => {
                    return Err(PsgdError::option_range(
                        "scanned_layers",
                        format!("leaf '{}' is 0-d and has no layer axis to scan", spec.path),
                    ))
                }
            }
        } else {
            (1, spec.shape.as_slice())
        };
        let lead: Vec<usize> = if spec.scanned { vec![batch] } else { vec![] };
        if slice.is_empty() {
            return Ok(LeafPlan {
                batch,
                dims: vec![1],
                diag: vec![true],
                stored: vec![lead],
                scanned: spec.scanned,
                scale: o.preconditioner_init_scale.unwrap_or(1.0),
            });
        }
        let largest = slice
            .iter()
            .enumerate()
            .fold(0, |best, (i, &d)| if d >= slice[best] { i } else { best });
        let diag: Vec<bool> = slice
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                d == 1
                    || d > o.max_size_triangular
                    || slice.len() < o.min_ndim_triangular
                    || o.memory_save_mode == Some(MemorySaveMode::AllDiag)
                    || (o.memory_save_mode == Some(MemorySaveMode::OneDiag) && i == largest)
            })
            .collect();
        let stored = slice
            .iter()
            .zip(&diag)
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
            diag,
            stored,
            scanned: spec.scanned,
            scale: o
                .preconditioner_init_scale
                .unwrap_or(1.0)
                .powf(1.0 / slice.len() as f64),
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
    /// 1 for an all-zero slice; each of the `k` factors times `s^(1/k)`.
    fn auto_scaled(&self, qs: &[Tensor], g: &Tensor) -> Result<Vec<Tensor>> {
        let g = g
            .to_dtype(DType::F32)?
            .reshape((self.batch, self.numel()))?;
        // a = mean(|g|⁴)^¼ = m·mean(|g/m|⁴)^¼ with m = max|g| (1 for an all-zero slice):
        // no overflow for large gradients, no underflow to 0 for tiny ones
        let m = g.abs()?.max_keepdim(1)?;
        let zero = m.eq(0f32)?;
        let m = zero.where_cond(&m.ones_like()?, &m)?;
        let r = g.broadcast_div(&m)?.sqr()?.sqr()?.mean_keepdim(1)?;
        let a = (m * r.sqrt()?.sqrt()?)?;
        // (a⁴ + δ⁴)^¼ = hi·(1 + (lo/hi)⁴)^¼ with hi = max(a, δ), lo = min(a, δ): no power
        // of a tiny or huge number is formed
        let d = (a.ones_like()? * AUTO_SCALE_DAMPING)?;
        let (hi, lo) = (a.maximum(&d)?, a.minimum(&d)?);
        let t = (lo / &hi)?.sqr()?.sqr()?;
        let norm = (hi * (t + 1.0)?.sqrt()?.sqrt()?)?;
        let s = norm.sqrt()?.recip()?;
        let s = finite_or_one(&zero.where_cond(&s.ones_like()?, &s)?)?;
        let per_factor = s.powf(1.0 / self.dims.len() as f64)?;
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
fn grams(qs: &[Tensor], plan: &LeafPlan, p: Precision, full: bool) -> Result<Vec<Tensor>> {
    if full {
        let batched = qs
            .iter()
            .enumerate()
            .map(|(i, q)| plan.batched_q(i, q))
            .collect::<Result<Vec<_>>>()?;
        return whiten::full_grams(&batched, plan, p);
    }
    qs.iter()
        .enumerate()
        .map(|(i, q)| factor_gram(&plan.batched_q(i, q)?, !plan.diag[i], p))
        .collect()
}

/// One fitting step of every factor of a leaf from the (damped) input `g` and probe `v`,
/// all factors moving from the same `A` and `conjB`.
fn update_factors(
    qs: &[Tensor],
    g: &Tensor,
    v: &Tensor,
    plan: &LeafPlan,
    lr: f64,
    p: Precision,
) -> Result<Vec<Tensor>> {
    let a = apply_factors(g, qs, plan, p)?;
    let conj_b = solve_factors(v, qs, plan)?;
    let b = a.dim(0)?;
    qs.iter()
        .enumerate()
        .map(|(i, q)| {
            let ua = unfold(&a, plan, i)?;
            let ub = unfold(&conj_b, plan, i)?;
            if plan.diag[i] {
                let t1 = ua.sqr()?.sum(2)?;
                let t2 = ub.sqr()?.sum(2)?;
                let denom = ((&t1 + &t2)?.abs()?.max_keepdim(1)? + TINY_F32)?;
                let step = (((t1 - t2)? * lr)? * q)?.broadcast_div(&denom)?;
                Ok((q - step)?)
            } else {
                // both terms are symmetric and only their upper triangles are used
                let gram = |u: &Tensor| {
                    matmul_tri(u, Tri::Full, &u.transpose(1, 2)?, Tri::Full, Tri::Upper, p)
                };
                let (t1, t2) = (gram(&ua)?, gram(&ub)?);
                let denom = (norm_lower_bound_sym_sum(&t1, &t2)? + TINY_F32)?;
                let scale = (denom.recip()? * lr)?.reshape((b, 1, 1))?;
                let step = triu_difference(&t1, &t2)?;
                let delta = matmul_tri(&step, Tri::Upper, q, Tri::Upper, Tri::Upper, p)?;
                Ok((q - delta.broadcast_mul(&scale)?)?)
            }
        })
        .collect()
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

/// Kron's preconditioner state.
#[derive(Debug, Clone)]
pub struct KronFactors {
    /// Factors per leaf, in psgd-jax's shapes (dense ones full, not triangular, under the
    /// inverse-free rules).
    pub qs: Vec<Vec<Tensor>>,
    /// Under the inverse-free rules (PRO, QUAD): per leaf and factor the running Lipschitz
    /// bound of the fit, float32 `(B,)` (0 before the first fit). Empty under EQ.
    pub ls: Vec<Vec<Tensor>>,
    /// Derived from `qs`, never saved: per leaf and factor `QᵢᵀQᵢ` (`Qᵢ²` when diagonal),
    /// float32, batched `(B, d, d)` / `(B, d)`. `None` until a step that does not fit the
    /// factors needs them; set it to `None` after editing `qs` by hand.
    pub ps: Option<Vec<Vec<Tensor>>>,
}

/// Kron's preconditioner for a fixed list of leaves.
#[derive(Debug, Clone)]
pub struct KronPreconditioner {
    options: KronOptions,
    /// `preconditionerInitScale: null`: the factors are scaled on the first step.
    auto_scale: bool,
    leaves: Vec<LeafSpec>,
    plans: Vec<LeafPlan>,
}

impl KronPreconditioner {
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
                    self.options.update_rule.inverse_free(),
                )
            })
            .collect()
    }

    /// A leaf's Lipschitz bounds before the first fit: zeros per factor under the
    /// inverse-free rules, none under EQ.
    fn init_bounds(&self, plan: &LeafPlan, device: &Device) -> Result<Vec<Tensor>> {
        if !self.options.update_rule.inverse_free() {
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

    /// Fits every leaf's factors once: maybe balance, draw probes, damp, step.
    fn update_preconditioners(
        &self,
        qs: &[Vec<Tensor>],
        inputs: &[Tensor],
        lr: f64,
        rng: &mut dyn RandomSource,
    ) -> Result<Vec<Vec<Tensor>>> {
        // the EQ fit (psgd-jax's): one balance draw, then the probes of every leaf
        let do_balance = rng.uniform()? < 0.01;
        let probes = self
            .leaves
            .iter()
            .zip(inputs)
            .map(|(spec, x)| rng.normal(&spec.shape, x.device()))
            .collect::<Result<Vec<_>>>()?;
        let precision = self.options.update_precision();
        stages::map_leaves(&self.leaves, |l| {
            let (plan, q, x, v) = (&self.plans[l], &qs[l], &inputs[l], &probes[l]);
            let x = fused::damp(x, v)?;
            let shape = plan.batched_shape();
            let (x, v) = (x.reshape(shape.as_slice())?, v.reshape(shape.as_slice())?);
            let mut bq = q
                .iter()
                .enumerate()
                .map(|(i, q)| plan.batched_q(i, q))
                .collect::<Result<Vec<_>>>()?;
            if do_balance {
                bq = balance(&bq, plan)?;
            }
            let n = bq.len();
            let mut ins: Vec<&Tensor> = bq.iter().collect();
            ins.push(&x);
            ins.push(&v);
            let new = self.map_batches(plan, &ins, |t| {
                update_factors(&t[..n], &t[n], &t[n + 1], plan, lr, precision)
            })?;
            new.iter()
                .zip(&plan.stored)
                .map(|(q, st)| Ok(q.reshape(st.as_slice())?.to_dtype(self.precond_dtype())?))
                .collect()
        })
    }

    /// The inverse-free fit (PRO, QUAD) of every leaf: the draws leaf by leaf in
    /// psgd_torch's order (see [`whiten::draw`]), then the leaves' fits; returns the new
    /// factors and Lipschitz bounds.
    fn fit_inverse_free(
        &self,
        qs: &[Vec<Tensor>],
        ls: &[Vec<Tensor>],
        inputs: &[Tensor],
        lr: f64,
        rng: &mut dyn RandomSource,
    ) -> Result<(PerLeaf, PerLeaf)> {
        let draws = self
            .leaves
            .iter()
            .zip(&self.plans)
            .zip(inputs)
            .map(|((spec, plan), x)| {
                whiten::draw(plan, &spec.shape, self.options.update_rule, rng, x.device())
            })
            .collect::<Result<Vec<_>>>()?;
        let fit = whiten::Fit {
            rule: self.options.update_rule,
            lr,
            beta: self.options.lipschitz_beta,
            precision: self.options.update_precision(),
        };
        let out = stages::map_leaves(&self.leaves, |l| {
            let (plan, d) = (&self.plans[l], &draws[l]);
            let shape = plan.batched_shape();
            let gn = whiten::damp(&inputs[l], &d.nu)?.reshape(shape.as_slice())?;
            let bq = qs[l]
                .iter()
                .enumerate()
                .map(|(i, q)| plan.batched_q(i, q))
                .collect::<Result<Vec<_>>>()?;
            let n = bq.len();
            // every input of the fit, batched along axis 0: factors, bounds, the damped
            // input, then each dense factor's subspaces
            let mut ins: Vec<&Tensor> = bq.iter().chain(&ls[l]).collect();
            ins.push(&gn);
            for (spd, skh) in d.subspaces.iter().flatten() {
                ins.push(spd);
                ins.extend(skh);
            }
            let rule = self.options.update_rule;
            let new = self.map_batches(plan, &ins, |t| {
                let mut at = 2 * n + 1;
                let subspaces = d
                    .subspaces
                    .iter()
                    .map(|s| {
                        s.as_ref().map(|_| {
                            let spd = t[at].clone();
                            at += 1;
                            let skh = (rule == UpdateRule::Pro).then(|| {
                                at += 1;
                                t[at - 1].clone()
                            });
                            (spd, skh)
                        })
                    })
                    .collect::<Vec<_>>();
                let (q, l) =
                    whiten::fit_leaf(&t[..n], &t[n..2 * n], &t[2 * n], &subspaces, plan, fit)?;
                Ok(q.into_iter().chain(l).collect())
            })?;
            let (q, l) = new.split_at(n);
            let q = if d.balance {
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
        })?;
        Ok(out.into_iter().unzip())
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
                let p = self.options.grads_precision();
                let out = self.map_batches(plan, &ins, |t| {
                    Ok(vec![whiten::precondition_full(&t[n], &t[..n], plan, p)?])
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
    const HESSIAN: bool = false;
    const FIT_ON_POOL: bool = true;
    type Options = KronOptions;
    type State = KronFactors;

    fn new(leaves: &[LeafSpec], o: &KronOptions) -> Result<Self> {
        let plans = leaves
            .iter()
            .map(|s| LeafPlan::new(s, o))
            .collect::<Result<Vec<_>>>()?;
        Ok(KronPreconditioner {
            auto_scale: o.preconditioner_init_scale.is_none(),
            options: o.clone(),
            leaves: leaves.to_vec(),
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
                    // a dense factor keeps its QᵀQ next to it; the inverse-free rules keep
                    // a Lipschitz bound per layer
                    elems: if diag { elems } else { 2 * elems }
                        + if self.options.update_rule.inverse_free() {
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
        Ok(KronFactors { qs, ls, ps: None })
    }

    fn first_step(&self, st: &KronFactors, grads: &[Tensor]) -> Result<Option<KronFactors>> {
        if !self.auto_scale {
            return Ok(None);
        }
        let qs = stages::map_leaves(&self.leaves, |l| {
            self.plans[l].auto_scaled(&st.qs[l], &grads[l])
        })?;
        Ok(Some(KronFactors {
            qs,
            ls: st.ls.clone(),
            ps: None,
        }))
    }

    fn update(
        &self,
        st: &KronFactors,
        inputs: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<KronFactors> {
        if self.options.update_rule.inverse_free() {
            let (qs, ls) =
                self.fit_inverse_free(&st.qs, &st.ls, inputs.hvps, inputs.precond_lr, rng)?;
            return Ok(KronFactors { qs, ls, ps: None });
        }
        let qs = self.update_preconditioners(&st.qs, inputs.hvps, inputs.precond_lr, rng)?;
        Ok(KronFactors {
            qs,
            ls: st.ls.clone(),
            ps: None,
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
            },
            (Some(ps), false) => KronFactors {
                qs: st.qs,
                ls: st.ls,
                ps: Some(ps),
            },
            (None, false) => {
                let ps = self.grams_of(&st.qs)?;
                KronFactors {
                    qs: st.qs,
                    ls: st.ls,
                    ps: Some(ps),
                }
            }
        })
    }

    fn apply(&self, st: &KronFactors, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        self.plans
            .iter()
            .enumerate()
            .map(|(l, plan)| match &st.ps {
                Some(ps) => self.apply_leaf(plan, Factors::Grams(&ps[l]), &grads[l]),
                None => self.apply_leaf(plan, Factors::Qs(&st.qs[l]), &grads[l]),
            })
            .collect()
    }

    fn save(&self, st: &KronFactors, f: &mut StateFile) {
        for (l, qs) in st.qs.iter().enumerate() {
            for (i, q) in qs.iter().enumerate() {
                f.tensor(format!("Q.{l}.{i}"), q);
            }
        }
        for (l, ls) in st.ls.iter().enumerate() {
            for (i, b) in ls.iter().enumerate() {
                f.tensor(format!("L.{l}.{i}"), b);
            }
        }
    }

    fn load(&self, f: &mut LoadedState) -> Result<KronFactors> {
        let qs = self
            .plans
            .iter()
            .enumerate()
            .map(|(l, plan)| {
                (0..plan.stored.len())
                    .map(|i| f.take_factor(&format!("Q.{l}.{i}")))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let ls = self
            .plans
            .iter()
            .enumerate()
            .map(|(l, plan)| {
                if !self.options.update_rule.inverse_free() {
                    return Ok(vec![]);
                }
                (0..plan.stored.len())
                    .map(|i| load_bound(f, &format!("L.{l}.{i}")))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KronFactors { qs, ls, ps: None })
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
        let bounds = if self.options.update_rule.inverse_free() {
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
                     (updateRule {})",
                    spec.path,
                    ls.iter().map(|b| b.dims().to_vec()).collect::<Vec<_>>(),
                    bounds(plan),
                    plan.batch,
                    crate::options::choice_name(self.options.update_rule)
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
