//! PSGD Kron: one preconditioner factor per tensor axis (triangular or diagonal), fitted by
//! gradient whitening, as psgd-jax 0.2.9's `kron` / `scale_by_kron`.

use crate::error::{PsgdError, Result};
use crate::linalg::{
    factor_gram, max_abs_per_batch, norm_lower_bound_sym_sum, solve_triangular_right,
    triu_difference, TINY_F32,
};
pub use crate::precision::{parse_dtype, Precision};
use crate::random::RandomSource;
use crate::schedule::{precond_update_prob_schedule, Schedule};
use crate::state_io::{self, StateFile};
use crate::transform::{self, Curvature, LeafSpec, StepHyper};
use crate::triangular::{matmul_tri, saves_work, Tri};
use crate::Transform;
use candle_core::{DType, Device, Tensor};

/// Which axes get diagonal factors to save memory (`memory_save_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemorySaveMode {
    /// Every eligible axis gets a triangular factor.
    #[default]
    None,
    /// The largest axis of each leaf (the last among equals) is diagonal.
    OneDiag,
    /// Every axis is diagonal.
    AllDiag,
}

impl MemorySaveMode {
    /// Parses psgd-jax's spelling: `None`/`null`, `"one_diag"`, `"all_diag"`.
    pub fn parse(s: Option<&str>) -> Result<Self> {
        match s {
            None => Ok(MemorySaveMode::None),
            Some("one_diag") => Ok(MemorySaveMode::OneDiag),
            Some("all_diag") => Ok(MemorySaveMode::AllDiag),
            Some(other) => Err(PsgdError::option_range(
                "memory_save_mode",
                format!("must be null, 'one_diag' or 'all_diag', got '{other}'"),
            )),
        }
    }
}

/// Options of [`Kron`], with psgd-jax 0.2.9's defaults.
#[derive(Debug, Clone)]
pub struct KronOptions {
    /// Learning rate, or a schedule of the step count before this step (0 on the first
    /// step), as optax's `scale_by_learning_rate` evaluates it. Default 0.001.
    pub learning_rate: Schedule,
    /// Momentum; 0 turns it off (no momentum state). Default 0.9.
    pub b1: f64,
    /// Decoupled weight decay, applied to leaves whose [`LeafSpec::weight_decay`] is set.
    pub weight_decay: f64,
    /// Probability of updating the preconditioner, or a schedule of the 1-based step count.
    /// Default: [`precond_update_prob_schedule`].
    pub preconditioner_update_probability: Schedule,
    /// Axes longer than this get a diagonal factor. Default 8192.
    pub max_size_triangular: usize,
    /// Leaves with fewer axes get diagonal factors only. Default 2.
    pub min_ndim_triangular: usize,
    /// See [`MemorySaveMode`].
    pub memory_save_mode: MemorySaveMode,
    /// Fit the preconditioner to the momentum instead of the raw gradient. Default true.
    pub momentum_into_precond_update: bool,
    /// Step size of the preconditioner fit. Default 0.1.
    pub preconditioner_lr: f64,
    /// Initial scale of the preconditioner (each factor gets `scale^(1/ndim)`). Default 1.
    pub preconditioner_init_scale: f64,
    /// Dtype of the momentum; `None` keeps the params' dtype.
    pub mu_dtype: Option<DType>,
    /// Dtype of the factors; `None` is float32.
    pub precond_dtype: Option<DType>,
    /// Matmul precision in the preconditioner fit. Default `Tensorfloat32`.
    pub precond_update_precision: Precision,
    /// Matmul precision when applying the preconditioner. Default `Float32`.
    pub precond_grads_precision: Precision,
    /// Process scanned layers in batches of `lax_map_batch_size` slices instead of all at
    /// once (bounds the memory of the temporaries). Default false.
    pub lax_map_scanned_layers: bool,
    /// Slices per batch with `lax_map_scanned_layers`. Default 8.
    pub lax_map_batch_size: usize,
    /// Seed of the default random source.
    pub seed: u64,
}

impl Default for KronOptions {
    fn default() -> Self {
        KronOptions {
            learning_rate: Schedule::Constant(0.001),
            b1: 0.9,
            weight_decay: 0.0,
            preconditioner_update_probability: precond_update_prob_schedule(),
            max_size_triangular: 8192,
            min_ndim_triangular: 2,
            memory_save_mode: MemorySaveMode::None,
            momentum_into_precond_update: true,
            preconditioner_lr: 0.1,
            preconditioner_init_scale: 1.0,
            mu_dtype: None,
            precond_dtype: None,
            precond_update_precision: Precision::Tensorfloat32,
            precond_grads_precision: Precision::Float32,
            lax_map_scanned_layers: false,
            lax_map_batch_size: 8,
            seed: 0,
        }
    }
}

impl KronOptions {
    /// Options from a JSON object with psgd-jax's snake_case keyword names. The pytree
    /// options (`weight_decay_mask`, `scanned_layers`) belong in the [`LeafSpec`]s and are
    /// skipped here; any other unknown key is an error.
    pub fn from_json(obj: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        use crate::json::*;
        let mut o = KronOptions::default();
        for (k, v) in obj {
            match k.as_str() {
                "learning_rate" => o.learning_rate = Schedule::Constant(num(k, v)?),
                "b1" => o.b1 = num(k, v)?,
                "weight_decay" => o.weight_decay = num(k, v)?,
                "preconditioner_update_probability" => {
                    if !v.is_null() {
                        o.preconditioner_update_probability = Schedule::Constant(num(k, v)?)
                    }
                }
                "max_size_triangular" => o.max_size_triangular = uint(k, v)?,
                "min_ndim_triangular" => o.min_ndim_triangular = uint(k, v)?,
                "memory_save_mode" => o.memory_save_mode = MemorySaveMode::parse(opt_str(k, v)?)?,
                "momentum_into_precond_update" => o.momentum_into_precond_update = boolean(k, v)?,
                "preconditioner_lr" => o.preconditioner_lr = num(k, v)?,
                "preconditioner_init_scale" => o.preconditioner_init_scale = num(k, v)?,
                "mu_dtype" => o.mu_dtype = parse_dtype(k, opt_str(k, v)?)?,
                "precond_dtype" => o.precond_dtype = parse_dtype(k, opt_str(k, v)?)?,
                "precond_update_precision" => {
                    o.precond_update_precision = Precision::parse(k, opt_str(k, v)?)?
                }
                "precond_grads_precision" => {
                    o.precond_grads_precision = Precision::parse(k, opt_str(k, v)?)?
                }
                "lax_map_scanned_layers" => o.lax_map_scanned_layers = boolean(k, v)?,
                "lax_map_batch_size" => o.lax_map_batch_size = uint(k, v)?,
                "seed" => o.seed = uint(k, v)? as u64,
                "weight_decay_mask" | "scanned_layers" => {}
                _ => {
                    return Err(PsgdError::option_type(
                        k,
                        "unknown option for kron".to_string(),
                    ))
                }
            }
        }
        o.validate()?;
        Ok(o)
    }

    fn validate(&self) -> Result<()> {
        transform::check_common_options(
            self.b1,
            self.weight_decay,
            &self.learning_rate,
            &self.preconditioner_update_probability,
        )?;
        transform::check_finite_option("preconditioner_lr", self.preconditioner_lr)?;
        let s = self.preconditioner_init_scale;
        if !(s.is_finite() && s > 0.0) {
            return Err(PsgdError::option_range(
                "preconditioner_init_scale",
                format!("must be > 0, got {s}"),
            ));
        }
        Ok(())
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
                scale: o.preconditioner_init_scale,
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
                    || o.memory_save_mode == MemorySaveMode::AllDiag
                    || (o.memory_save_mode == MemorySaveMode::OneDiag && i == largest)
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
            scale: o.preconditioner_init_scale.powf(1.0 / slice.len() as f64),
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
            return Ok(y.reshape(plan.batched_shape())?);
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
fn grams(qs: &[Tensor], plan: &LeafPlan, p: Precision) -> Result<Vec<Tensor>> {
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

/// The state of [`Kron`]: plain data, saved and loaded as safetensors.
#[derive(Debug, Clone)]
pub struct KronState {
    /// Steps taken.
    pub count: u64,
    /// The deterministic preconditioner-update counter.
    pub update_counter: u64,
    /// Momentum per leaf (`None` when `b1 == 0`).
    pub mu: Option<Vec<Tensor>>,
    /// Factors per leaf, in psgd-jax's shapes.
    pub qs: Vec<Vec<Tensor>>,
    /// Derived from `qs`, never saved: per leaf and factor `QᵢᵀQᵢ` (`Qᵢ²` when diagonal),
    /// float32, batched `(B, d, d)` / `(B, d)`. `None` until a step that does not fit the
    /// factors needs them; set it to `None` after editing `qs` by hand.
    pub ps: Option<Vec<Vec<Tensor>>>,
}

/// The Kron optimizer for a fixed list of leaves.
#[derive(Debug, Clone)]
pub struct Kron {
    options: KronOptions,
    leaves: Vec<LeafSpec>,
    plans: Vec<LeafPlan>,
}

impl Kron {
    /// The options.
    pub fn options(&self) -> &KronOptions {
        &self.options
    }

    /// [`grams`] of every leaf, at the apply step's precision.
    fn grams_of(&self, qs: &[Vec<Tensor>]) -> Result<Vec<Vec<Tensor>>> {
        self.plans
            .iter()
            .zip(qs)
            .map(|(plan, q)| grams(q, plan, self.options.precond_grads_precision))
            .collect()
    }

    fn precond_dtype(&self) -> DType {
        self.options.precond_dtype.unwrap_or(DType::F32)
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

    fn check_state(&self, s: &KronState) -> Result<()> {
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
        match (&s.mu, self.options.b1 > 0.0) {
            (Some(mu), true) => {
                for (spec, m) in self.leaves.iter().zip(mu) {
                    if m.dims() != spec.shape.as_slice() {
                        return Err(PsgdError::State(format!(
                            "momentum of '{}' has shape {:?}, expected {:?}",
                            spec.path,
                            m.dims(),
                            spec.shape
                        )));
                    }
                }
                if mu.len() != self.leaves.len() {
                    return Err(PsgdError::State("momentum has the wrong leaf count".into()));
                }
                Ok(())
            }
            (None, false) => Ok(()),
            (Some(_), false) => Err(PsgdError::State("has momentum but b1 is 0".into())),
            (None, true) => Err(PsgdError::State("has no momentum but b1 > 0".into())),
        }
    }

    /// Fits every leaf's factors once: maybe balance, draw probes, damp, step.
    fn update_preconditioners(
        &self,
        qs: &[Vec<Tensor>],
        inputs: &[Tensor],
        rng: &mut dyn RandomSource,
    ) -> Result<Vec<Vec<Tensor>>> {
        let do_balance = rng.uniform()? < 0.01;
        let probes = self
            .leaves
            .iter()
            .zip(inputs)
            .map(|(spec, x)| rng.normal(&spec.shape, x.device()))
            .collect::<Result<Vec<_>>>()?;
        let o = &self.options;
        transform::map_leaves(&self.leaves, |l| {
            let (plan, q, x, v) = (&self.plans[l], &qs[l], &inputs[l], &probes[l]);
            let x = transform::damp(x, v)?;
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
                update_factors(
                    &t[..n],
                    &t[n],
                    &t[n + 1],
                    plan,
                    o.preconditioner_lr,
                    o.precond_update_precision,
                )
            })?;
            new.iter()
                .zip(&plan.stored)
                .map(|(q, st)| Ok(q.reshape(st.as_slice())?.to_dtype(self.precond_dtype())?))
                .collect()
        })
    }

    /// The preconditioned gradient of one leaf (before the clip, weight decay and lr).
    /// `f` holds the kept grams (already batched) or the factors in their stored shapes.
    fn apply_leaf(&self, plan: &LeafPlan, f: Factors, m: &Tensor) -> Result<Tensor> {
        let shape = m.dims().to_vec();
        let x = m.reshape(plan.batched_shape().as_slice())?;
        let batched = match f {
            Factors::Grams(ps) => ps.to_vec(),
            Factors::Qs(qs) => qs
                .iter()
                .enumerate()
                .map(|(i, q)| plan.batched_q(i, q))
                .collect::<Result<Vec<_>>>()?,
        };
        let n = batched.len();
        let mut ins: Vec<&Tensor> = batched.iter().collect();
        ins.push(&x);
        let out = self.map_batches(plan, &ins, |t| {
            Ok(vec![precondition(
                &t[n],
                f.like(&t[..n]),
                plan,
                self.options.precond_grads_precision,
            )?])
        })?;
        Ok(out[0].reshape(shape)?)
    }
}

impl Transform for Kron {
    type Options = KronOptions;
    type State = KronState;

    fn options_from_json(obj: &serde_json::Map<String, serde_json::Value>) -> Result<KronOptions> {
        KronOptions::from_json(obj)
    }

    fn new(leaves: Vec<LeafSpec>, options: KronOptions) -> Result<Self> {
        options.validate()?;
        let plans = leaves
            .iter()
            .map(|s| LeafPlan::new(s, &options))
            .collect::<Result<Vec<_>>>()?;
        Ok(Kron {
            options,
            leaves,
            plans,
        })
    }

    fn leaves(&self) -> &[LeafSpec] {
        &self.leaves
    }

    fn seed(&self) -> u64 {
        self.options.seed
    }

    fn init_with(&self, params: &[Tensor], _rng: &mut dyn RandomSource) -> Result<KronState> {
        transform::check_leaves("params", &self.leaves, params)?;
        let mu = transform::init_momentum(self.options.b1, self.options.mu_dtype, params)?;
        let qs = self
            .plans
            .iter()
            .zip(params)
            .map(|(plan, p)| plan.init_factors(self.precond_dtype(), p.device()))
            .collect::<Result<Vec<_>>>()?;
        Ok(KronState {
            count: 0,
            update_counter: 0,
            mu,
            qs,
            ps: None,
        })
    }

    fn hyper(&self, state: &KronState) -> StepHyper {
        StepHyper::new(
            self.options.learning_rate.at(state.count),
            self.options
                .preconditioner_update_probability
                .at(state.count + 1),
        )
    }

    fn count(state: &KronState) -> u64 {
        state.count
    }

    fn update_with(
        &self,
        grads: &[Tensor],
        state: &KronState,
        params: Option<&[Tensor]>,
        hyper: StepHyper,
        curvature: Option<&Curvature>,
        rng: &mut dyn RandomSource,
    ) -> Result<(Vec<Tensor>, KronState)> {
        let o = &self.options;
        if curvature.is_some() {
            return Err(PsgdError::option_type(
                "hvp",
                "kron fits its preconditioner by gradient whitening only; it takes no hvp/vector",
            ));
        }
        transform::check_step_inputs(&self.leaves, grads, params, o.weight_decay)?;
        transform::check_hyper(&hyper)?;
        self.check_state(state)?;
        let count = state.count + 1;
        let g32 = grads
            .iter()
            .map(|g| Ok(g.to_dtype(DType::F32)?))
            .collect::<Result<Vec<_>>>()?;

        let (mu, momentum) = transform::momentum_all(o.b1, false, state.mu.as_ref(), &g32, count)?;

        let (do_update, update_counter) =
            transform::update_counter(state.update_counter, hyper.update_probability);
        let qs = if do_update {
            let inputs = if o.momentum_into_precond_update {
                &momentum
            } else {
                &g32
            };
            transform::on_pool(&self.leaves, || {
                self.update_preconditioners(&state.qs, inputs, rng)
            })?
        } else {
            state.qs.clone()
        };

        let ps = match (&state.ps, do_update) {
            (_, true) => None,
            (Some(ps), false) => Some(ps.clone()),
            (None, false) => Some(self.grams_of(&qs)?),
        };
        let pre = self
            .plans
            .iter()
            .enumerate()
            .map(|(l, plan)| match &ps {
                Some(ps) => self.apply_leaf(plan, Factors::Grams(&ps[l]), &momentum[l]),
                None => self.apply_leaf(plan, Factors::Qs(&qs[l]), &momentum[l]),
            })
            .collect::<Result<Vec<_>>>()?;
        let updates = transform::finish_updates(
            &pre,
            params,
            &self.leaves,
            grads,
            o.weight_decay,
            hyper.learning_rate,
            transform::Clip::Rms,
        )?;

        let mu = transform::keep_dtypes(mu, state.mu.as_ref())?;
        Ok((
            updates,
            KronState {
                count,
                update_counter,
                mu,
                qs,
                ps,
            },
        ))
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.options.learning_rate = Schedule::Constant(lr);
    }

    fn learning_rate(&self, state: &KronState) -> f64 {
        self.options.learning_rate.at(state.count)
    }

    fn state_to_bytes(&self, state: &KronState) -> Result<Vec<u8>> {
        let mut f = StateFile::new("kron", &self.leaves);
        f.meta("count", state.count.to_string());
        f.meta("update_counter", state.update_counter.to_string());
        f.momentum(state.mu.as_ref());
        for (l, qs) in state.qs.iter().enumerate() {
            for (i, q) in qs.iter().enumerate() {
                f.tensor(format!("Q.{l}.{i}"), q);
            }
        }
        f.to_bytes()
    }

    fn state_from_bytes(&self, bytes: &[u8], device: &Device) -> Result<KronState> {
        let mut f = state_io::LoadedState::parse(bytes, device, "kron", &self.leaves)?;
        let count = f.meta_u64("count")?;
        let update_counter = f.meta_u64("update_counter")?;
        let mu = f.take_momentum(self.leaves.len(), self.options.b1 > 0.0)?;
        let qs = self
            .plans
            .iter()
            .enumerate()
            .map(|(l, plan)| {
                (0..plan.stored.len())
                    .map(|i| f.take(&format!("Q.{l}.{i}")))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let state = KronState {
            count,
            update_counter,
            mu,
            qs,
            ps: None,
        };
        self.check_state(&state)?;
        Ok(state)
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
