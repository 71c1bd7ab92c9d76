//! Fused elementwise operations of the step (momentum, the RMS and global-norm clips, the
//! damping of Kron's fit input, the finish pass of weight decay and learning rate, the
//! finiteness scan), each declared once with its CPU host path (one multithreaded pass
//! over contiguous float32) and its candle-op path for every other device and dtype,
//! chosen by [`super::dispatch`]. The tests that hold the two paths equal are here.

use super::elementwise::{self, with_host, Flat};
use crate::error::{PsgdError, Result};
use crate::transform::LeafSpec;
use candle_core::{DType, Tensor};
use std::slice::from_ref;

/// The index of the first tensor holding NaN or Inf.
pub fn first_non_finite(tensors: &[Tensor]) -> Result<Option<usize>> {
    super::dispatch(
        &[tensors],
        |x| Ok(elementwise::position(&x[0], |v| !v.is_finite()).map(|i| x[0].piece_of(i))),
        || first_non_finite_ops(tensors),
    )
}

/// [`first_non_finite`] with one read-back for the whole tree (on a GPU the tensors stay
/// there): `0 · t` is zero for finite entries and NaN otherwise.
fn first_non_finite_ops(tensors: &[Tensor]) -> Result<Option<usize>> {
    let probes = tensors
        .iter()
        .map(|t| Ok((t * 0.0)?.to_dtype(DType::F32)?.sum_all()?))
        .collect::<Result<Vec<_>>>()?;
    if probes.is_empty() {
        return Ok(None);
    }
    let vals = Tensor::stack(&probes, 0)?.to_vec1::<f32>()?;
    Ok(vals.iter().position(|v| !v.is_finite()))
}

/// `1 − b1^count` in float32, as optax's `tree_bias_correction` computes it.
fn bias_correction(b1: f64, count: u64) -> f64 {
    1.0 - (b1 as f32).powi(count.min(i32::MAX as u64) as i32) as f64
}

/// `v · m + 0` in float32: candle's `affine`, which every `tensor * f64` (and `/ f64`, as
/// a product with the reciprocal) goes through; the host paths use it to give the same
/// bits as the candle-op paths.
fn affine(v: f32, m: f32) -> f32 {
    v * m + 0.0
}

/// How momentum warms up over the first steps (`momentumWarmup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Warmup {
    /// psgd-jax's (optax's): an EMA with coefficient `b1`, divided by `1 − b1^t`.
    #[default]
    Debias,
    /// psgd_torch's: the coefficient `β_t = min((t−1)/t, b1)` at 1-based step `t`, no
    /// bias correction (the first step's momentum is the gradient).
    PsgdTorch,
}

/// The coefficients of one momentum step: `mu ← b·mu + a·g`, the update `c0·mu` (or with
/// Nesterov `b·c1·mu + a·c0·g`).
#[derive(Debug, Clone, Copy)]
struct Ema {
    a: f64,
    b: f64,
    c0: Option<f64>,
    c1: Option<f64>,
}

impl Ema {
    fn new(b1: f64, count: u64, warmup: Warmup) -> Self {
        match warmup {
            Warmup::Debias => Ema {
                a: 1.0 - b1,
                b: b1,
                c0: Some(bias_correction(b1, count)),
                c1: Some(bias_correction(b1, count + 1)),
            },
            Warmup::PsgdTorch => {
                let t = count.max(1) as f64;
                let beta = ((t - 1.0) / t).min(b1);
                Ema {
                    a: 1.0 - beta,
                    b: beta,
                    c0: None,
                    c1: None,
                }
            }
        }
    }
}

/// `mu ← b1·mu + (1−b1)·g` (float32) and the update it gives at 1-based step `count`: the
/// bias-corrected `mu`, or with `nesterov` psgd-jax's bias-corrected Nesterov blend
/// `b1·mu/(1−b1^(count+1)) + (1−b1)·g/(1−b1^count)`. Under [`Warmup::PsgdTorch`] the
/// coefficient is `β_t` (see there) and nothing is divided.
pub fn momentum(
    b1: f64,
    mu: &Tensor,
    g: &Tensor,
    count: u64,
    nesterov: bool,
    warmup: Warmup,
) -> Result<(Tensor, Tensor)> {
    let mu = mu.to_dtype(DType::F32)?;
    let e = Ema::new(b1, count, warmup);
    if mu.dims() == g.dims() {
        let (a, b) = (e.a as f32, e.b as f32);
        let c0 = e.c0.map(|c| (1.0 / c) as f32);
        let c1 = e.c1.map(|c| (1.0 / c) as f32);
        let scaled = |v: f32, c: Option<f32>| c.map_or(v, |c| affine(v, c));
        // both outputs in one pass, with the candle path's operations in its order
        let host = with_host(&[from_ref(&mu), from_ref(g)], |x| {
            elementwise::zip_map([&x[0], &x[1]], |[m, g]| {
                let m = affine(g, a) + affine(m, b);
                let u = if nesterov {
                    affine(scaled(m, c1), b) + affine(scaled(g, c0), a)
                } else {
                    scaled(m, c0)
                };
                [m, u]
            })
        });
        if let Some([m, u]) = host {
            return Ok((
                Tensor::from_vec(m, g.shape(), g.device())?,
                Tensor::from_vec(u, g.shape(), g.device())?,
            ));
        }
    }
    momentum_ops(e, &mu, g, nesterov)
}

/// [`momentum`] as candle ops, for tensors the host path cannot view (`mu` in float32).
fn momentum_ops(e: Ema, mu: &Tensor, g: &Tensor, nesterov: bool) -> Result<(Tensor, Tensor)> {
    let divided = |t: &Tensor, c: Option<f64>| -> Result<Tensor> {
        Ok(match c {
            Some(c) => (t / c)?,
            None => t.clone(),
        })
    };
    let mu_new = ((g * e.a)? + (mu * e.b)?)?;
    let update = if nesterov {
        let m = divided(&mu_new, e.c1)?;
        let gc = divided(g, e.c0)?;
        ((m * e.b)? + (gc * e.a)?)?
    } else {
        divided(&mu_new, e.c0)?
    };
    Ok((mu_new, update))
}

/// How `finish_updates` caps the preconditioned updates before weight decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clip {
    /// No cap.
    None,
    /// Per leaf: `u / max(1, rms(u)/rms)` (no cap with `rms: None`), then each element
    /// clamped to `±element` (none with `None`). Kron's default is `rms: Some(1.1)`.
    Update {
        /// The RMS cap.
        rms: Option<f64>,
        /// The element clamp after it.
        element: Option<f64>,
    },
    /// `clip_global_norm` over all leaves with this maximum norm.
    GlobalNorm(f64),
}

/// A number a step measured without reading it back: a value on the host (the CPU
/// path's), or a 0-d float32 tensor where the step's tensors live, read when asked for.
#[derive(Debug, Clone)]
pub enum Measured {
    /// Known on the host.
    Host(f64),
    /// A 0-d tensor not read yet.
    Device(Tensor),
}

impl Measured {
    /// The value (a read-back for [`Measured::Device`]).
    pub fn read(&self) -> Result<f64> {
        match self {
            Measured::Host(v) => Ok(*v),
            Measured::Device(t) => Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?),
        }
    }

    /// `β·self + (1−β)·x`, where they are (on the host when both are).
    pub fn ema(&self, x: &Measured, beta: f64) -> Result<Measured> {
        Ok(match (self, x) {
            (Measured::Host(a), Measured::Host(b)) => Measured::Host(beta * a + (1.0 - beta) * b),
            (Measured::Device(a), Measured::Device(b)) => {
                Measured::Device(((a * beta)? + (b * (1.0 - beta))?)?)
            }
            (Measured::Device(a), Measured::Host(b)) => {
                Measured::Device(((a * beta)? + (1.0 - beta) * b)?)
            }
            (Measured::Host(a), Measured::Device(b)) => {
                Measured::Device(((b * (1.0 - beta))? + beta * a)?)
            }
        })
    }

    /// `sqrt(self / n)`: a root mean square from a sum of squares over `n` elements.
    pub fn rms(&self, n: usize) -> Result<Measured> {
        let n = n.max(1) as f64;
        Ok(match self {
            Measured::Host(v) => Measured::Host((v / n).sqrt()),
            Measured::Device(t) => Measured::Device((t / n)?.sqrt()?),
        })
    }
}

/// What [`finish_updates_measured`] measured of one leaf: of the preconditioned gradient
/// before the clip its sum of squares and largest `|value|`, of the update its sum of
/// squares.
#[derive(Debug, Clone)]
pub struct FinishSums {
    /// `Σ pre²`.
    pub pre_sq: Measured,
    /// `max |pre|`.
    pub pre_max: Measured,
    /// `Σ update²`.
    pub update_sq: Measured,
}

/// `clip`, then [`finish_update`], for every leaf, each cast to its gradient's dtype. On
/// the CPU in float32 this is one pass per leaf after the clip's sum of squares, instead
/// of a chain of whole-tensor ops. With `check`, also the index of the first leaf whose
/// update holds a NaN or Inf (on the host tested within that same pass). And per leaf its
/// [`FinishSums`] (for the step's telemetry): on the CPU host path summed within the
/// finish's one pass, elsewhere as 0-d tensors that nothing reads until asked.
// the step's inputs to the finish, each used once; a struct would only rename them
#[allow(clippy::too_many_arguments)]
pub fn finish_updates(
    pre: &[Tensor],
    params: Option<&[Tensor]>,
    specs: &[LeafSpec],
    grads: &[Tensor],
    weight_decay: f64,
    learning_rate: f64,
    clip: Clip,
    check: bool,
) -> Result<(Vec<Tensor>, Option<usize>, Vec<FinishSums>)> {
    let decay = pre
        .iter()
        .enumerate()
        .map(|(l, _)| decayed_param(params.map(|p| &p[l]), &specs[l], weight_decay))
        .collect::<Result<Vec<_>>>()?;
    let fin = Finish::new(weight_decay, learning_rate);
    if let Some(out) = fin.host(pre, &decay, clip, check) {
        let (out, finite, sums) = out?;
        let updates = out
            .iter()
            .zip(grads)
            .map(|(u, g)| Ok(u.to_dtype(g.dtype())?))
            .collect::<Result<Vec<_>>>()?;
        let sums = sums
            .into_iter()
            .map(|s| FinishSums {
                pre_sq: Measured::Host(s.in_sq),
                pre_max: Measured::Host(s.in_max as f64),
                update_sq: Measured::Host(s.out_sq),
            })
            .collect();
        return Ok((updates, finite.iter().position(|f| !f), sums));
    }
    let sums = pre
        .iter()
        .map(|u| {
            if u.elem_count() == 0 {
                return Ok((Measured::Host(0.0), Measured::Host(0.0)));
            }
            Ok((
                Measured::Device(u.sqr()?.sum_all()?),
                Measured::Device(u.abs()?.flatten_all()?.max(0)?),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let pre = match clip {
        Clip::None => pre.to_vec(),
        Clip::Update { rms, element } => pre
            .iter()
            .map(|u| {
                let u = match rms {
                    Some(c) => clip_rms(u, c)?,
                    None => u.clone(),
                };
                Ok(match element {
                    Some(e) => u.clamp(-e, e)?,
                    None => u,
                })
            })
            .collect::<Result<_>>()?,
        Clip::GlobalNorm(c) => clip_global_norm(pre.to_vec(), c)?,
    };
    let updates = pre
        .iter()
        .zip(&decay)
        .zip(grads)
        .map(|((u, p), g)| fin.ops(u, p.as_ref(), g.dtype()))
        .collect::<Result<Vec<_>>>()?;
    // one read-back for the whole tree (the ops path is the GPU's)
    let bad = if check {
        first_non_finite_ops(&updates)?
    } else {
        None
    };
    let sums = sums
        .into_iter()
        .zip(&updates)
        .map(|((pre_sq, pre_max), u)| {
            Ok(FinishSums {
                pre_sq,
                pre_max,
                update_sq: Measured::Device(u.to_dtype(DType::F32)?.sqr()?.sum_all()?),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((updates, bad, sums))
}

/// `u / max(1, rms(u)/cap)`: the preconditioned gradient should have unit RMS, so cap it
/// (Kron's cap is 1.1 by default).
pub fn clip_rms(u: &Tensor, cap: f64) -> Result<Tensor> {
    let host = with_host(&[from_ref(u)], |x| {
        let d = rms_divisor(&x[0], cap);
        let [out] = elementwise::zip_map([&x[0]], |[v]| [v / d]);
        out
    });
    match host {
        Some(out) => Ok(Tensor::from_vec(out, u.shape(), u.device())?),
        None => clip_rms_ops(u, cap),
    }
}

/// [`clip_rms`] as candle ops.
fn clip_rms_ops(u: &Tensor, cap: f64) -> Result<Tensor> {
    let rms = u.sqr()?.mean_all()?.sqrt()?;
    let denom = (rms / cap)?.maximum(1.0)?;
    Ok(u.broadcast_div(&denom)?)
}

/// The divisor of [`clip_rms`], `max(1, rms/cap)`, in float32 as the candle ops compute it
/// from the sum of squares (which the host sums in float64).
fn rms_divisor(x: &Flat<'_>, cap: f64) -> f32 {
    let mean = (elementwise::sum_sq(x) / x.len() as f64) as f32;
    affine(mean.sqrt(), (1.0 / cap) as f32).max(1.0)
}

/// optax's `clip_by_global_norm`: scales every update by `max / ‖u‖` when `‖u‖ ≥ max`.
pub fn clip_global_norm(updates: Vec<Tensor>, max_norm: f64) -> Result<Vec<Tensor>> {
    let sq = updates
        .iter()
        .map(|u| Ok(u.sqr()?.sum_all()?))
        .collect::<Result<Vec<_>>>()?;
    let norm = Tensor::stack(&sq, 0)?.sum_all()?.sqrt()?;
    // max/max(‖u‖, max) is exactly 1 below the threshold; no host round trip
    let scale = (norm.maximum(max_norm)?.recip()? * max_norm)?;
    updates
        .into_iter()
        .map(|u| Ok(u.broadcast_mul(&scale)?))
        .collect()
}

/// `x + v · mean(|x|) · sqrt(ε_f32)`: Kron's damping of the preconditioner fit's input by
/// its probe `v`, so that a zero gradient still gives a well-posed fit.
pub fn damp(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    let eps = (f32::EPSILON as f64).sqrt();
    if x.dims() == v.dims() && x.elem_count() > 0 {
        let host = with_host(&[from_ref(x), from_ref(v)], |h| {
            let mean = (elementwise::sum_abs(&h[0]) / h[0].len() as f64) as f32;
            let scale = affine(mean, eps as f32);
            let [out] = elementwise::zip_map([&h[0], &h[1]], |[x, v]| [x + v * scale]);
            out
        });
        if let Some(out) = host {
            return Ok(Tensor::from_vec(out, x.shape(), x.device())?);
        }
    }
    let scale = (x.abs()?.mean_all()? * eps)?;
    Ok((x + v.broadcast_mul(&scale)?)?)
}

/// The param a leaf's weight decay needs, in float32, or `None` when it has none.
fn decayed_param(
    param: Option<&Tensor>,
    spec: &LeafSpec,
    weight_decay: f64,
) -> Result<Option<Tensor>> {
    if !(weight_decay > 0.0 && spec.weight_decay) {
        return Ok(None);
    }
    let p = param.ok_or_else(|| {
        PsgdError::option_range(
            "weightDecay",
            format!("> 0 needs the params (leaf '{}')", spec.path),
        )
    })?;
    Ok(Some(p.to_dtype(DType::F32)?))
}

/// What [`Finish::host`] gives: per leaf the update, whether it is finite and its pass's sums.
type HostFinish = (Vec<Tensor>, Vec<bool>, Vec<elementwise::PassSums>);

/// The end of a step: decoupled weight decay, then `-learning_rate ·`.
#[derive(Debug, Clone, Copy)]
struct Finish {
    weight_decay: f64,
    learning_rate: f64,
}

impl Finish {
    fn new(weight_decay: f64, learning_rate: f64) -> Self {
        Finish {
            weight_decay,
            learning_rate,
        }
    }

    /// One leaf as candle ops: `(u + wd·p) · (−lr)`, cast to `dtype`.
    fn ops(&self, u: &Tensor, p32: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
        let u = match p32 {
            Some(p) => (u + (p * self.weight_decay)?)?,
            None => u.clone(),
        };
        Ok((u * (-self.learning_rate))?.to_dtype(dtype)?)
    }

    /// Every leaf with `clip` on the host, each in one pass after the clip's sums; `None`
    /// unless every update and decayed param is a contiguous float32 CPU tensor (of its
    /// update's shape).
    fn host(
        &self,
        pre: &[Tensor],
        p32: &[Option<Tensor>],
        clip: Clip,
        check: bool,
    ) -> Option<Result<HostFinish>> {
        if pre
            .iter()
            .zip(p32)
            .any(|(u, p)| p.as_ref().is_some_and(|p| p.dims() != u.dims()))
        {
            return None;
        }
        let groups: Vec<&[Tensor]> = pre
            .iter()
            .zip(p32)
            .flat_map(|(u, p)| [from_ref(u), p.as_ref().map_or(&[][..], from_ref)])
            .collect();
        let (wd, nlr) = (self.weight_decay as f32, (-self.learning_rate) as f32);
        with_host(&groups, |h| {
            let leaves: Vec<(&Flat, &Flat)> = h.chunks(2).map(|c| (&c[0], &c[1])).collect();
            // the multiplier of a global-norm clip, as the candle ops give it
            let global = match clip {
                Clip::GlobalNorm(c) => {
                    let sq: f64 = leaves.iter().map(|(u, _)| elementwise::sum_sq(u)).sum();
                    let norm = (sq.sqrt() as f32).max(c as f32);
                    affine(1.0 / norm, c as f32)
                }
                _ => 1.0,
            };
            leaves
                .iter()
                .zip(pre)
                .map(|(&(u, p), t)| {
                    // a divisor of 1 and a multiplier of 1 leave every value as it is
                    let (div, clamp) = match clip {
                        Clip::Update { rms, element } => (
                            rms.filter(|_| !u.is_empty())
                                .map_or(1.0, |c| rms_divisor(u, c)),
                            element.map(|e| e as f32),
                        ),
                        _ => (1.0, None),
                    };
                    let out = match (div, global, clamp) {
                        (1.0, 1.0, None) => finish_pass(u, p, wd, nlr, check, |v| v),
                        (1.0, s, None) => finish_pass(u, p, wd, nlr, check, |v| v * s),
                        (d, _, None) => finish_pass(u, p, wd, nlr, check, |v| v / d),
                        (1.0, _, Some(e)) => finish_pass(u, p, wd, nlr, check, |v| v.clamp(-e, e)),
                        (d, _, Some(e)) => {
                            finish_pass(u, p, wd, nlr, check, |v| (v / d).clamp(-e, e))
                        }
                    };
                    let (out, finite, sums) = out;
                    Ok((Tensor::from_vec(out, t.shape(), t.device())?, finite, sums))
                })
                .collect::<Result<Vec<_>>>()
                .map(|v| {
                    let (mut outs, mut finite, mut sums) = (vec![], vec![], vec![]);
                    for (o, f, s) in v {
                        outs.push(o);
                        finite.push(f);
                        sums.push(s);
                    }
                    (outs, finite, sums)
                })
        })
    }
}

/// `(clip(u) + wd·p) · nlr` in one pass, without `p` when it is empty, with `check`
/// whether every value is finite, and the pass's sums of `u` and the output (for the
/// step's telemetry). `clip` is a separate closure per kind so that the common kinds pay
/// no division.
fn finish_pass(
    u: &Flat<'_>,
    p: &Flat<'_>,
    wd: f32,
    nlr: f32,
    check: bool,
    clip: impl Fn(f32) -> f32 + Sync,
) -> (Vec<f32>, bool, elementwise::PassSums) {
    let ([out], finite, sums) = if p.is_empty() {
        elementwise::zip_map_summed([u], |[v]| [affine(clip(v), nlr)], check, true)
    } else {
        elementwise::zip_map_summed(
            [u, p],
            |[v, p]| [affine(clip(v) + affine(p, wd), nlr)],
            check,
            true,
        )
    };
    (out, finite, sums)
}

/// Decoupled weight decay on masked leaves, then `-learning_rate ·`, cast to `dtype` (one
/// leaf of [`finish_updates`], for its tests).
#[cfg(test)]
fn finish_update(
    pre: &Tensor,
    param: Option<&Tensor>,
    spec: &LeafSpec,
    weight_decay: f64,
    learning_rate: f64,
    dtype: DType,
) -> Result<Tensor> {
    let p32 = decayed_param(param, spec, weight_decay)?;
    let fin = Finish::new(weight_decay, learning_rate);
    match fin.host(from_ref(pre), from_ref(&p32), Clip::None, false) {
        Some(out) => Ok(out?.0.remove(0).to_dtype(dtype)?),
        None => fin.ops(pre, p32.as_ref(), dtype),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::random::{RandomSource, SeededRandom};
    use crate::stages::check_finite;
    use crate::transform::LeafSpec;
    use candle_core::Device;

    /// Lengths around the host kernels' task size, and empty.
    const LENS: [usize; 5] = [0, 1, 7, 8192 * 2 + 3, 65536 + 5];

    fn randn(n: usize, seed: u64, scale: f64) -> Tensor {
        let t = SeededRandom::for_step(seed, 1)
            .normal(&[n], &Device::Cpu)
            .unwrap();
        (t * scale).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Equal up to float64-vs-float32 summation in a reduction the result went through.
    fn assert_close(a: &Tensor, b: &Tensor) {
        let (a, b) = (vals(a), vals(b));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-3), "{x} vs {y}");
        }
    }

    /// A view with the same values and shape that no host path can read (for more than
    /// one element): every second entry of a longer tensor.
    fn strided(t: &Tensor) -> Tensor {
        let s = Tensor::stack(&[t, t], t.rank())
            .unwrap()
            .narrow(t.rank(), 0, 1)
            .unwrap()
            .squeeze(t.rank())
            .unwrap();
        assert_eq!(s.dims(), t.dims());
        assert!(t.elem_count() <= 1 || with_host(&[from_ref(&s)], |_| ()).is_none());
        s
    }

    #[test]
    fn fused_momentum_matches_the_ops_bit_for_bit() {
        for n in LENS {
            let (mu, g) = (randn(n, 1, 1.0), randn(n, 2, 3.0));
            for nesterov in [false, true] {
                for (count, warmup) in [1, 2, 50]
                    .into_iter()
                    .flat_map(|c| [(c, Warmup::Debias), (c, Warmup::PsgdTorch)])
                {
                    let (m, u) = momentum(0.9, &mu, &g, count, nesterov, warmup).unwrap();
                    let e = Ema::new(0.9, count, warmup);
                    let (m0, u0) = momentum_ops(e, &mu, &g, nesterov).unwrap();
                    assert_eq!(vals(&m), vals(&m0), "n {n}");
                    assert_eq!(vals(&u), vals(&u0), "n {n}");
                    assert_eq!(m.dims(), g.dims());
                }
            }
        }
    }

    #[test]
    fn psgd_torch_warmup_follows_its_formula() {
        // β_t = min((t−1)/t, b1), m ← β_t·m + (1−β_t)·g, the update is m itself
        let (mu, g) = (randn(9, 1, 1.0), randn(9, 2, 3.0));
        for (t, beta) in [(1u64, 0.0f64), (2, 0.5), (3, 2.0 / 3.0), (20, 0.9)] {
            let (m, u) = momentum(0.9, &mu, &g, t, false, Warmup::PsgdTorch).unwrap();
            let want: Vec<f32> = vals(&mu)
                .iter()
                .zip(vals(&g))
                .map(|(m, g)| (1.0 - beta as f32) * g + beta as f32 * m)
                .collect();
            for (a, b) in vals(&m).iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "t {t}: {a} vs {b}"
                );
            }
            assert_eq!(vals(&u), vals(&m), "t {t}: no bias correction");
        }
        // the first step's momentum is the gradient
        let (m, _) = momentum(0.9, &mu, &g, 1, false, Warmup::PsgdTorch).unwrap();
        assert_eq!(vals(&m), vals(&g));
    }

    #[test]
    fn momentum_of_other_layouts_and_dtypes_takes_the_ops() {
        let (mu, g) = (randn(100, 1, 1.0), randn(100, 2, 1.0));
        let d = Warmup::Debias;
        let e = Ema::new(0.9, 3, d);
        let (m0, u0) = momentum(0.9, &mu, &g, 3, true, d).unwrap();
        // strided: the ops path, same values
        let (m, u) = momentum(0.9, &strided(&mu), &strided(&g), 3, true, d).unwrap();
        assert_eq!((vals(&m), vals(&u)), (vals(&m0), vals(&u0)));
        assert_eq!(m.dims(), &[100]);
        // a bfloat16 buffer is cast first, then fused
        let mu16 = mu.to_dtype(DType::BF16).unwrap();
        let (m, u) = momentum(0.9, &mu16, &g, 3, false, d).unwrap();
        let (m1, u1) = momentum_ops(e, &mu16.to_dtype(DType::F32).unwrap(), &g, false).unwrap();
        assert_eq!((vals(&m), vals(&u)), (vals(&m1), vals(&u1)));
        // float64 gradients cannot be viewed
        let g64 = g.to_dtype(DType::F64).unwrap();
        assert!(
            momentum(0.9, &mu, &g64, 3, false, d).is_err()
                == momentum_ops(e, &mu, &g64, false).is_err()
        );
    }

    #[test]
    fn fused_rms_clip_matches_the_ops() {
        for n in LENS {
            // below the cap (divisor 1: exact) and above it
            for scale in [0.5, 4.0] {
                let u = randn(n, 3, scale);
                let got = clip_rms(&u, 1.1).unwrap();
                let want = clip_rms_ops(&u, 1.1).unwrap();
                if scale < 1.0 {
                    assert_eq!(vals(&got), vals(&u));
                }
                assert_close(&got, &want);
                // the ops path, whose sum over a strided view may round differently
                assert_close(&clip_rms(&strided(&u), 1.1).unwrap(), &want);
            }
        }
    }

    #[test]
    fn fused_damping_matches_the_ops() {
        for n in LENS {
            let (x, v) = (randn(n, 4, 2.0), randn(n, 5, 1.0));
            let want = {
                let scale =
                    (x.abs().unwrap().mean_all().unwrap() * (f32::EPSILON as f64).sqrt()).unwrap();
                (&x + v.broadcast_mul(&scale).unwrap()).unwrap()
            };
            assert_close(&damp(&x, &v).unwrap(), &want);
            assert_close(&damp(&strided(&x), &strided(&v)).unwrap(), &want);
        }
    }

    fn leaves(lens: &[usize], seed: u64, scale: f64) -> Vec<Tensor> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| randn(n, seed + i as u64, scale))
            .collect()
    }

    #[test]
    fn the_finish_sums_agree_on_both_paths_and_leave_the_updates_as_they_were() {
        let lens = [0, 3, 8192 + 1, 1000];
        let specs: Vec<LeafSpec> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| LeafSpec::new(format!("l{i}"), &[n]))
            .collect();
        let params = leaves(&lens, 10, 1.0);
        let pre = leaves(&lens, 20, 3.0);
        let clip = Clip::Update {
            rms: Some(1.1),
            element: Some(0.5),
        };
        let run = |pre: &[Tensor]| {
            finish_updates(pre, None, &specs, &params, 0.0, 0.01, clip, true).unwrap()
        };
        let (host, _, hs) = run(&pre);
        assert!(hs.iter().all(|s| matches!(s.pre_sq, Measured::Host(_))));
        // a float64 leaf sends the whole finish down the candle-op path: 0-d tensors
        let mut pre64 = pre.clone();
        pre64[2] = pre64[2].to_dtype(DType::F64).unwrap();
        let (_, _, os) = run(&pre64);
        assert!(os[1..]
            .iter()
            .all(|s| matches!(s.pre_sq, Measured::Device(_))));
        for (l, (h, o)) in hs.iter().zip(&os).enumerate() {
            let f = |m: &Measured| m.read().unwrap();
            let sq = vals(&pre[l]).iter().map(|&v| (v * v) as f64).sum::<f64>();
            let mx = vals(&pre[l]).iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let usq = vals(&host[l]).iter().map(|&v| (v * v) as f64).sum::<f64>();
            for (got, want) in [
                (f(&h.pre_sq), sq),
                (f(&o.pre_sq), sq),
                (f(&h.pre_max), mx),
                (f(&o.pre_max), mx),
                (f(&h.update_sq), usq),
                (f(&o.update_sq), usq),
            ] {
                assert!(
                    (got - want).abs() <= 1e-5 * want.max(1e-30),
                    "leaf {l}: {got} vs {want}"
                );
            }
        }
        // the sums ride along: the pass's outputs are those of the pass without them
        let h = |t: &Tensor| from_ref(t).to_vec();
        let (a, b) = (h(&pre[2]), h(&params[2]));
        with_host(&[&a, &b], |x| {
            let f = |[v, p]: [f32; 2]| [affine(v / 1.7 + affine(p, 0.1), -0.01)];
            let (plain, ok) = elementwise::zip_map_checked([&x[0], &x[1]], f, true);
            let (summed, ok2, _) = elementwise::zip_map_summed([&x[0], &x[1]], f, true, true);
            assert_eq!(plain[0], summed[0]);
            assert_eq!(ok, ok2);
        })
        .unwrap();
    }

    #[test]
    fn fused_finish_matches_the_ops() {
        let lens = [0, 3, 8192 + 1, 1000];
        let specs: Vec<LeafSpec> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| LeafSpec {
                weight_decay: i != 2,
                ..LeafSpec::new(format!("l{i}"), &[n])
            })
            .collect();
        let params = leaves(&lens, 10, 1.0);
        let grads: Vec<Tensor> = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i == 1 {
                    p.to_dtype(DType::BF16).unwrap()
                } else {
                    p.clone()
                }
            })
            .collect();
        for scale in [0.1, 5.0] {
            let pre = leaves(&lens, 20, scale);
            for clip in [
                Clip::None,
                Clip::Update {
                    rms: Some(1.1),
                    element: None,
                },
                Clip::Update {
                    rms: Some(2.0),
                    element: Some(0.5),
                },
                Clip::Update {
                    rms: None,
                    element: Some(0.5),
                },
                Clip::GlobalNorm(1.0),
                Clip::GlobalNorm(1e6),
            ] {
                for wd in [0.0, 0.1] {
                    let (got, bad, _) =
                        finish_updates(&pre, Some(&params), &specs, &grads, wd, 0.01, clip, true)
                            .unwrap();
                    assert_eq!(bad, None);
                    let clipped = match clip {
                        Clip::None => pre.clone(),
                        Clip::Update { rms, element } => pre
                            .iter()
                            .map(|u| {
                                let u = rms.map_or(u.clone(), |c| clip_rms_ops(u, c).unwrap());
                                element.map_or(u.clone(), |e| u.clamp(-e, e).unwrap())
                            })
                            .collect(),
                        Clip::GlobalNorm(c) => clip_global_norm(pre.clone(), c).unwrap(),
                    };
                    let fin = Finish::new(wd, 0.01);
                    for (l, u) in clipped.iter().enumerate() {
                        let p = decayed_param(Some(&params[l]), &specs[l], wd).unwrap();
                        let want = fin.ops(u, p.as_ref(), grads[l].dtype()).unwrap();
                        assert_eq!(got[l].dtype(), grads[l].dtype());
                        assert_eq!(got[l].dims(), want.dims());
                        if clip == Clip::None || (scale < 1.0 && clip != Clip::GlobalNorm(1.0)) {
                            assert_eq!(vals(&got[l]), vals(&want), "{clip:?} wd {wd}");
                        } else {
                            assert_close(&got[l], &want);
                        }
                    }
                    // one float64 leaf (without weight decay) sends the whole step down
                    // the ops path, which gives the same values (a global norm over mixed
                    // dtypes is an error there, as it always was)
                    let mut pre64 = pre.clone();
                    pre64[2] = pre64[2].to_dtype(DType::F64).unwrap();
                    let slow = finish_updates(
                        &pre64,
                        Some(&params),
                        &specs,
                        &grads,
                        wd,
                        0.01,
                        clip,
                        false,
                    );
                    if let Ok((slow, _, _)) = slow {
                        for (a, b) in slow.iter().zip(&got) {
                            assert_close(a, b);
                        }
                    } else {
                        assert!(matches!(clip, Clip::GlobalNorm(_)));
                    }
                }
            }
        }
        // weight decay without params is an error on either path
        let pre = leaves(&lens, 20, 1.0);
        assert!(finish_updates(&pre, None, &specs, &grads, 0.1, 0.01, Clip::None, false).is_err());
        let one = finish_update(&strided(&pre[2]), None, &specs[2], 0.1, 0.01, DType::F32).unwrap();
        let want = Finish::new(0.1, 0.01)
            .ops(&pre[2], None, DType::F32)
            .unwrap();
        assert_eq!(vals(&one), vals(&want));
    }

    #[test]
    fn finiteness_scan_names_the_first_bad_leaf() {
        let lens = [5, 0, 8192 * 3 + 7, 2];
        let specs: Vec<LeafSpec> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| LeafSpec::new(format!("l{i}"), &[n]))
            .collect();
        let clean = leaves(&lens, 30, 1.0);
        assert!(check_finite("grads", &specs, &clean).is_ok());
        assert!(check_finite("grads", &[], &[]).is_ok());
        let bad_at = |l: usize, i: usize, v: f32| {
            let mut ts = clean.clone();
            let mut x = vals(&ts[l]);
            x[i] = v;
            ts[l] = Tensor::new(x, &Device::Cpu).unwrap();
            ts
        };
        for (l, i) in [(0, 0), (2, 0), (2, 8192 * 2 + 1), (2, 8192 * 3 + 6), (3, 1)] {
            for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut ts = bad_at(l, i, v);
                // a later bad leaf must not be named instead
                if l < 3 {
                    ts[3] = Tensor::new(&[f32::NAN, 0.0], &Device::Cpu).unwrap();
                }
                let want = format!("l{l}");
                for ts in [
                    ts.clone(),
                    ts.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect(),
                ] {
                    match check_finite("grads", &specs, &ts) {
                        Err(PsgdError::NonFinite { path, .. }) => assert_eq!(path, want),
                        other => panic!("{other:?}"),
                    }
                    // the check fused into the finish (host for float32, ops for float64)
                    let fin = |check| {
                        finish_updates(&ts, None, &specs, &clean, 0.0, 0.01, Clip::None, check)
                            .unwrap()
                            .1
                    };
                    assert_eq!(fin(true), Some(l));
                    assert_eq!(fin(false), None);
                }
            }
        }
    }
}
