//! Kron's inverse-free fits: psgd_torch's rules `Q0.5EQ1.5` (PRO), `QUAD`, `QEQ`, `QEP`,
//! `PRO4P` and `QUAD4P`, in their whitening and Newton forms.
//!
//! Every factor moves from the same preconditioned input `Pg = P·Gn` (`Gn` the damped
//! input, a gradient or a Hessian-vector product; `P` from the factors before the fit;
//! under the 4P rules the factors are those of `P`, each applied once). Per factor `i`,
//! with `t1 = gram_i(Pg)` and the second term `t2` (`N/dᵢ` whitening, `gram_i(V)` of the
//! probe `V` in the Newton form; under QEP both are taken after `Qᵢ` is applied along the
//! axis, and whitening's `t2` is `(N/dᵢ)·QᵢQᵢᵀ`), the error is `E = t1 − t2` and the step
//! is `preconditionerLr / Lᵢ`, where `Lᵢ` is a running lower bound of the fit's Lipschitz
//! constant: `ℓ = ‖t1‖ + t2` whitening (`‖t1 + t2‖` in the Newton form and under QEP; for
//! a dense factor the bound `normEstimator` chooses, a random subspace bound by default,
//! the largest entry for a diagonal one), `Lᵢ ← max(β·Lᵢ + (1−β)·ℓ, ℓ)`. The damping, the
//! estimator, `β`, the Procrustes normaliser and cap and the balancing are the
//! [`FitNumerics`]'. With `h = lr/L`:
//! - PRO: `Q ← Q − h·E·Q`, then a Procrustes rotation toward symmetric positive definite;
//!   PRO4P the same with up to ten third-order rotations, until `Q` is symmetric to 1e-3.
//! - QEQ: `Q ← Q − h·Q·E`. QEP: `Q ← Q − h·E·Q`.
//! - QUAD (QUAD4P with `h` for `h/2`): `p = Q − (h/2)·E·Q`, `p ← p − (h/2)·p·E`,
//!   `Q ← (p + pᵀ)/2`.
//! - a diagonal factor: `q ← q ⊙ (1 − h·E)`, squared under QUAD (`1 − (h/2)·E`) and
//!   QUAD4P.
//!
//! Dense factors are full matrices: nothing here is triangular, every product is a
//! dense one.

use super::numerics::{running_bound, FitNumerics};
use super::{for_each_axis, precondition, unfold, Factors, LeafPlan, UpdateRule};
use crate::error::{PsgdError, Result};
use crate::kernels::linalg::max_abs_per_batch;
use crate::kernels::precision::Precision;
use crate::kernels::subspace::SUBSPACE_DIM;
use crate::random::RandomSource;
use candle_core::{Device, Tensor};
use std::sync::Mutex;

/// The most third-order Procrustes steps PRO4P takes per factor and fit.
const PRO4P_MAX_ROTATIONS: usize = 10;

/// PRO4P stops rotating a factor once `max|Pᵀ − P| < PRO4P_SYMMETRIC·max|P|`.
const PRO4P_SYMMETRIC: f64 = 1e-3;

/// The subspace draws of a dense factor (`(B, 32, d)`): its norm bound's (with
/// `normEstimator: 'subspace'`) and, under PRO, its Procrustes step's (unless the
/// estimator is `'power'`).
#[derive(Clone)]
pub(super) struct Subspaces {
    pub spd: Option<Tensor>,
    pub skh: Option<Tensor>,
}

/// The random draws of one leaf's fit that precede it, in psgd_torch's order: the noise
/// `ν` (the leaf's shape; EQ's probe too; the caller's vector in EQ's Newton form), then
/// per dense factor its [`Subspaces`] (drawn as `(32, d)` for an unscanned leaf), then the
/// uniform that decides whether the factors are balanced afterwards (with a random
/// balance after the fit; QEP's own balance is before every fit and draws none). Under
/// PRO4P, whose count of draws depends on the data, only `ν` is drawn here: the fit draws
/// the rest as it goes (see [`Draws::Live`]) and the caller the balance decision after it.
pub(super) struct LeafDraws {
    pub nu: Tensor,
    /// Per factor: `Some` for a dense one, `None` for a diagonal one (and under PRO4P).
    pub subspaces: Vec<Option<Subspaces>>,
    pub balance: bool,
}

/// The shape a subspace draw has: `(B, 32, d)` for scanned layers, `(32, d)` else.
fn subspace_shape(plan: &LeafPlan, batch: usize, d: usize) -> Vec<usize> {
    if plan.scanned {
        vec![batch, SUBSPACE_DIM, d]
    } else {
        vec![SUBSPACE_DIM, d]
    }
}

/// One subspace draw of a factor of size `d` for `batch` layers, as `(batch, 32, d)`.
fn draw_subspace(
    plan: &LeafPlan,
    batch: usize,
    d: usize,
    rng: &mut dyn RandomSource,
    device: &Device,
) -> Result<Tensor> {
    Ok(rng
        .normal(&subspace_shape(plan, batch, d), device)?
        .reshape((batch, SUBSPACE_DIM, d))?)
}

/// Takes the draws of one leaf's fit that precede it from `rng` (see [`LeafDraws`]) for
/// the fit of the step with 0-based `count`; `given` is the noise when the caller has it
/// (EQ's Newton form), else it is drawn.
#[allow(clippy::too_many_arguments)]
pub(super) fn draw(
    plan: &LeafPlan,
    shape: &[usize],
    rule: UpdateRule,
    numerics: &FitNumerics,
    count: u64,
    given: Option<&Tensor>,
    rng: &mut dyn RandomSource,
    device: &Device,
) -> Result<LeafDraws> {
    let nu = match given {
        Some(v) => v.clone(),
        None => rng.normal(shape, device)?,
    };
    let mut subspaces = Vec::with_capacity(plan.dims.len());
    for (&d, &diag) in plan.dims.iter().zip(&plan.diag) {
        if diag || rule == UpdateRule::Pro4p {
            subspaces.push(None);
            continue;
        }
        let mut one = || draw_subspace(plan, plan.batch, d, rng, device);
        let spd = numerics.draws_subspace().then(&mut one).transpose()?;
        let skh = numerics.draws_rotation(rule).then(&mut one).transpose()?;
        subspaces.push(Some(Subspaces { spd, skh }));
    }
    let balance = match rule {
        UpdateRule::Pro4p => false,
        _ => numerics.balance_after(count, rng)?,
    };
    Ok(LeafDraws {
        nu,
        subspaces,
        balance,
    })
}

/// Where a fit's subspace draws come from.
pub(super) enum Draws<'a> {
    /// Drawn beforehand ([`draw`]), per factor, sliced like the fit's layers.
    Drawn(Vec<Option<Subspaces>>),
    /// Drawn from the source as the fit goes, in psgd_torch's order (PRO4P: per dense
    /// factor the norm bound's subspace, then one per Procrustes step).
    Live(&'a (dyn LiveSource + 'a)),
}

/// A random source shared by the slices of a fit that draws as it goes.
pub(super) trait LiveSource: Sync {
    /// A normal draw of `shape` on `device`.
    fn normal(&self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

impl<'y> LiveSource for Mutex<&mut (dyn RandomSource + 'y)> {
    fn normal(&self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let mut rng = self
            .lock()
            .map_err(|_| PsgdError::Draw("the random source was poisoned".into()))?;
        rng.normal(shape, device)
    }
}

impl Draws<'_> {
    /// Axis `i`'s norm bound subspace, when the numerics take one (`wanted`).
    fn spd(&mut self, i: usize, plan: &LeafPlan, like: &Tensor, wanted: bool) -> Drawn {
        self.take(i, plan, like, wanted, |s| &s.spd)
    }

    /// Axis `i`'s Procrustes subspace, when the numerics take one (`wanted`).
    fn skh(&mut self, i: usize, plan: &LeafPlan, like: &Tensor, wanted: bool) -> Drawn {
        self.take(i, plan, like, wanted, |s| &s.skh)
    }

    /// Axis `i`'s subspace `which` of those drawn beforehand, or one drawn now.
    fn take(
        &mut self,
        i: usize,
        plan: &LeafPlan,
        like: &Tensor,
        wanted: bool,
        which: fn(&Subspaces) -> &Option<Tensor>,
    ) -> Drawn {
        match self {
            Draws::Drawn(s) => Ok(s[i].as_ref().and_then(|s| which(s).clone())),
            Draws::Live(rng) => wanted.then(|| live(*rng, plan, like)).transpose(),
        }
    }
}

/// A subspace when one is taken.
type Drawn = Result<Option<Tensor>>;

/// A subspace drawn now for the factor `like` `(B, d, d)`.
fn live(rng: &dyn LiveSource, plan: &LeafPlan, like: &Tensor) -> Result<Tensor> {
    let (b, d, _) = like.dims3()?;
    Ok(rng
        .normal(&subspace_shape(plan, b, d), like.device())?
        .reshape((b, SUBSPACE_DIM, d))?)
}

/// What each factor multiplies its axis by when the preconditioner is applied, batched
/// float32: `QᵀQ` of a full factor (`q²` of a diagonal one), or under the 4P rules the
/// factor of `P` itself, transposed (the products read the unfolding transposed) and
/// `p` for a diagonal one.
pub(super) fn axis_operators(
    qs: &[Tensor],
    plan: &LeafPlan,
    rule: UpdateRule,
    p: Precision,
) -> Result<Vec<Tensor>> {
    qs.iter()
        .zip(&plan.diag)
        .map(|(q, &diag)| match (diag, rule.fits_p()) {
            (true, true) => Ok(q.clone()),
            (true, false) => Ok(q.sqr()?),
            (false, true) => Ok(q.transpose(1, 2)?.contiguous()?),
            (false, false) => p.matmul(&q.transpose(1, 2)?, q),
        })
        .collect()
}

/// Whether multiplying axis `i` by `Qᵢᵀ` and then `Qᵢ` (two `(r×d)·(d×d)` products, `r`
/// the rest of the leaf) costs less than forming `Pᵢ = QᵢᵀQᵢ` (`(d×d)·(d×d)`) and
/// multiplying by it: a dense axis longer than the rest of the leaf.
fn twice_is_cheaper(plan: &LeafPlan, i: usize) -> bool {
    let d = plan.dims[i];
    !plan.diag[i] && 2 * (plan.numel() / d) < d
}

/// `g` preconditioned with the factors `qs` (batched) under `rule`: each axis's
/// [`axis_operators`], by the cheaper order per axis. Under the 4P rules, or where no axis
/// is longer than twice the rest of its leaf, this is the kept operators' path exactly
/// (one product per axis or merged run); otherwise such an axis is multiplied by `Qᵢᵀ`
/// and `Qᵢ` in turn and the others by their grams (the same products in another
/// association: equal to rounding).
pub(super) fn precondition_full(
    g: &Tensor,
    qs: &[Tensor],
    plan: &LeafPlan,
    rule: UpdateRule,
    p: Precision,
) -> Result<Tensor> {
    if rule.fits_p() || !(0..qs.len()).any(|i| twice_is_cheaper(plan, i)) {
        let ops = axis_operators(qs, plan, rule, p)?;
        return precondition(g, Factors::Grams(&ops), plan, p);
    }
    let y = for_each_axis(g, &plan.dims, |i, x2| {
        let xt = x2.transpose(1, 2)?;
        let q = &qs[i];
        if plan.diag[i] {
            Ok(xt.broadcast_mul(&q.sqr()?.unsqueeze(1)?)?)
        } else if twice_is_cheaper(plan, i) {
            p.matmul(&p.matmul(&xt, &q.transpose(1, 2)?)?, q)
        } else {
            p.matmul(&xt, &p.matmul(&q.transpose(1, 2)?, q)?)
        }
    })?;
    let mut shape = vec![g.dim(0)?];
    shape.extend(&plan.dims);
    Ok(y.reshape(shape)?)
}

/// The hyper-parameters of one fit.
#[derive(Clone, Copy)]
pub(super) struct Fit {
    pub rule: UpdateRule,
    pub lr: f64,
    pub numerics: FitNumerics,
    pub precision: Precision,
}

impl Fit {
    /// The running bound from `l` and the estimate `ell`.
    fn lipschitz(&self, l: &Tensor, ell: &Tensor) -> Result<Tensor> {
        let beta = self.numerics.lipschitz_beta.unwrap_or(0.0);
        running_bound(l, ell, beta)
    }
}

/// `Qᵢ ×ᵢ X` unfolded along axis `i`: `(B, dᵢ, rest)` (QEP's terms).
fn apply_on_axis(
    q: &Tensor,
    x: &Tensor,
    plan: &LeafPlan,
    i: usize,
    p: Precision,
) -> Result<Tensor> {
    let u = unfold(x, plan, i)?;
    if plan.diag[i] {
        Ok(u.broadcast_mul(&q.unsqueeze(2)?)?)
    } else {
        p.matmul(q, &u)
    }
}

/// `gram_i` of an unfolding `u` `(B, d, rest)`: `u·uᵀ` `(B, d, d)` for a dense factor, the
/// row sums of squares `(B, d)` for a diagonal one.
fn gram(u: &Tensor, diag: bool, p: Precision) -> Result<Tensor> {
    if diag {
        Ok(u.sqr()?.sum(2)?)
    } else {
        p.matmul(u, &u.transpose(1, 2)?)
    }
}

/// The second term of a factor's fit.
enum Second {
    /// `N/dᵢ` times the identity (whitening, except QEP).
    Scalar(f64),
    /// A matrix `(B, d, d)` or, for a diagonal factor, a vector `(B, d)`.
    Tensor(Tensor),
}

/// One fit of a leaf's batched factors `qs` (`(B, d, d)` full or `(B, d)`) and bounds `ls`
/// (`(B,)` each) from the damped input `gn` `(B, d₀, …)`, with the probe `probe` (same
/// shape) in the Newton form (`None`: whitening). Returns the new factors and bounds.
pub(super) fn fit_leaf(
    qs: &[Tensor],
    ls: &[Tensor],
    gn: &Tensor,
    probe: Option<&Tensor>,
    mut draws: Draws,
    plan: &LeafPlan,
    fit: Fit,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let p = fit.precision;
    let rule = fit.rule;
    let nm = &fit.numerics;
    let pg = precondition_full(gn, qs, plan, rule, p)?;
    // a slice of the layers under `laxMapScannedLayers`
    let b = gn.dim(0)?;
    let n = plan.numel() as f64;
    let mut new_qs = Vec::with_capacity(qs.len());
    let mut new_ls = Vec::with_capacity(qs.len());
    for (i, (q, l)) in qs.iter().zip(ls).enumerate() {
        let diag = plan.diag[i];
        let scale = n / plan.dims[i] as f64;
        let (t1, t2) = if rule == UpdateRule::Qep {
            let t1 = gram(&apply_on_axis(q, &pg, plan, i, p)?, diag, p)?;
            let t2 = match probe {
                Some(v) => gram(&apply_on_axis(q, v, plan, i, p)?, diag, p)?,
                None if diag => (q.sqr()? * scale)?,
                None => (p.matmul(q, &q.transpose(1, 2)?)? * scale)?,
            };
            (t1, Second::Tensor(t2))
        } else {
            let t1 = gram(&unfold(&pg, plan, i)?, diag, p)?;
            let t2 = match probe {
                Some(v) => Second::Tensor(gram(&unfold(v, plan, i)?, diag, p)?),
                None => Second::Scalar(scale),
            };
            (t1, t2)
        };
        // ℓ, then E = t1 − t2 as psgd_torch forms it
        let (ell, err) = match (&t2, diag) {
            (Second::Scalar(t2), true) => ((t1.max(1)? + *t2)?, (&t1 - *t2)?),
            (Second::Tensor(t2), true) => ((&t1 + t2)?.max(1)?, (&t1 - t2)?),
            (Second::Scalar(t2), false) => {
                let spd = draws.spd(i, plan, q, nm.draws_subspace())?;
                ((nm.spd_bound(&t1, spd.as_ref(), p)? + *t2)?, t1.clone())
            }
            (Second::Tensor(t2), false) => {
                let spd = draws.spd(i, plan, q, nm.draws_subspace())?;
                let sum = (&t1 + t2)?;
                (nm.spd_bound(&sum, spd.as_ref(), p)?, (&t1 - t2)?)
            }
        };
        let l = fit.lipschitz(l, &ell)?;
        let step = (l.recip()? * fit.lr)?;
        if diag {
            let step = step.reshape((b, 1))?;
            let e = err.broadcast_mul(&step)?;
            let gain = match rule {
                UpdateRule::Quad => ((e * -0.5)? + 1.0)?.sqr()?,
                UpdateRule::Quad4p => (e.neg()? + 1.0)?.sqr()?,
                _ => (e.neg()? + 1.0)?,
            };
            new_qs.push((q * gain)?);
            new_ls.push(l);
            continue;
        }
        let step = step.reshape((b, 1, 1))?;
        // E·Q and Q·E; whitening's `E` is `t1 − t2·I`, formed as psgd_torch does
        let left = |m: &Tensor| -> Result<Tensor> {
            let t1m = p.matmul(&err, m)?;
            Ok(match &t2 {
                Second::Scalar(t2) => (t1m - (m * *t2)?)?,
                Second::Tensor(_) => t1m,
            })
        };
        let right = |m: &Tensor| -> Result<Tensor> {
            let mt1 = p.matmul(m, &err)?;
            Ok(match &t2 {
                Second::Scalar(t2) => (mt1 - (m * *t2)?)?,
                Second::Tensor(_) => mt1,
            })
        };
        let q = match rule {
            UpdateRule::Quad | UpdateRule::Quad4p => {
                let half = if rule == UpdateRule::Quad {
                    (step * 0.5)?
                } else {
                    step
                };
                let p1 = (q - left(q)?.broadcast_mul(&half)?)?;
                let p2 = (&p1 - right(&p1)?.broadcast_mul(&half)?)?;
                ((&p2 + p2.transpose(1, 2)?)? * 0.5)?
            }
            UpdateRule::Qeq => (q - right(q)?.broadcast_mul(&step)?)?,
            UpdateRule::Pro => {
                let q = (q - left(q)?.broadcast_mul(&step)?)?;
                let skh = draws.skh(i, plan, &q, nm.draws_rotation(rule))?;
                nm.procrustes(&q, skh.as_ref(), p)?
            }
            UpdateRule::Pro4p => {
                let q = (q - left(q)?.broadcast_mul(&step)?)?;
                symmetrize_p(q, i, plan, &mut draws, nm, p)?
            }
            UpdateRule::Qep | UpdateRule::Eq => (q - left(q)?.broadcast_mul(&step)?)?,
        };
        new_qs.push(q);
        new_ls.push(l);
    }
    Ok((new_qs, new_ls))
}

/// PRO4P's rotations of a fitted factor `q` `(B, d, d)`: up to ten third-order Procrustes
/// steps, each with its own subspace draw (none with `normEstimator: 'power'`), stopping
/// once every layer is symmetric to `PRO4P_SYMMETRIC` (a layer that is already stays as it
/// is while the others rotate).
fn symmetrize_p(
    mut q: Tensor,
    i: usize,
    plan: &LeafPlan,
    draws: &mut Draws,
    nm: &FitNumerics,
    p: Precision,
) -> Result<Tensor> {
    let b = q.dim(0)?;
    let mut done = q.zeros_like()?.sum((1, 2))?.gt(1.0)?;
    for _ in 0..PRO4P_MAX_ROTATIONS {
        let skh = draws.skh(i, plan, &q, nm.draws_rotation(UpdateRule::Pro4p))?;
        let rotated = nm.procrustes3(&q, skh.as_ref(), p)?;
        q = done
            .reshape((b, 1, 1))?
            .broadcast_as(q.shape())?
            .where_cond(&q, &rotated)?;
        let skew = max_abs_per_batch(&(q.transpose(1, 2)? - &q)?)?;
        let size = (max_abs_per_batch(&q)? * PRO4P_SYMMETRIC)?;
        done = done.maximum(&skew.lt(&size)?)?;
        if done.min(0)?.to_scalar::<u8>()? == 1 {
            break;
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{Draw, ReplayRandom};

    type M = Vec<Vec<f64>>;

    fn mm(a: &M, b: &M) -> M {
        (0..a.len())
            .map(|i| {
                (0..b[0].len())
                    .map(|j| (0..b.len()).map(|k| a[i][k] * b[k][j]).sum())
                    .collect()
            })
            .collect()
    }

    fn tr(a: &M) -> M {
        (0..a[0].len())
            .map(|j| (0..a.len()).map(|i| a[i][j]).collect())
            .collect()
    }

    fn lin(a: &M, x: f64, b: &M, y: f64) -> M {
        a.iter()
            .zip(b)
            .map(|(r, s)| r.iter().zip(s).map(|(u, v)| x * u + y * v).collect())
            .collect()
    }

    fn norm(v: &[f64]) -> f64 {
        v.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// psgd_torch's subspace bound in float64, `s` the normaliser.
    fn bound(a: &M, v: &M, s: f64) -> f64 {
        let tiny = f32::MIN_POSITIVE as f64;
        let s = s + tiny;
        let a: M = a
            .iter()
            .map(|r| r.iter().map(|x| x / s).collect())
            .collect();
        let j = (0..a.len()).fold(0, |b, i| if norm(&a[i]) > norm(&a[b]) { i } else { b });
        let mut v: M = v
            .iter()
            .map(|r| {
                let d: f64 = r.iter().zip(&a[j]).map(|(x, y)| x * y).sum();
                let sg = if d > 0.0 {
                    1.0
                } else if d < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                r.iter().zip(&a[j]).map(|(x, y)| y + sg * x).collect()
            })
            .collect();
        for _ in 0..2 {
            v = mm(&v, &a);
            v = v
                .iter()
                .map(|r| {
                    let n = norm(r) + tiny;
                    r.iter().map(|x| x / n).collect()
                })
                .collect();
            v = mm(&v, &a);
        }
        s * v.iter().map(|r| norm(r)).fold(0.0, f64::max)
    }

    /// The Procrustes generator `R = Qᵀ − Q` over its subspace bound (from `v`), float64.
    fn generator(q: &M, v: &M) -> M {
        let r = lin(&tr(q), 1.0, q, -1.0);
        let s = r.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
        let nr = bound(&r, v, s) + f32::MIN_POSITIVE as f64;
        r.iter()
            .map(|x| x.iter().map(|y| y / nr).collect())
            .collect()
    }

    fn pseudo(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn rows(v: &[f64], r: usize, c: usize) -> M {
        (0..r).map(|i| v[i * c..(i + 1) * c].to_vec()).collect()
    }

    fn t32(m: &M) -> Vec<f32> {
        m.iter().flatten().map(|&x| x as f32).collect()
    }

    /// An axis longer than twice the rest of the leaf is multiplied by `Qᵀ` and `Q` in
    /// turn, the others by their grams: the result is `P·G` to float32 rounding, against
    /// a float64 evaluation; a leaf with no such axis takes the kept operators' path bit
    /// for bit.
    #[test]
    fn precondition_full_orders_each_axis_by_cost() {
        let dev = Device::Cpu;
        // a (3, 16) leaf: axis 1 (16 > 2·3) goes by Qᵀ then Q, axis 0 by its gram
        let plan = LeafPlan {
            batch: 1,
            dims: vec![3, 16],
            diag: vec![false, false],
            stored: vec![vec![3, 3], vec![16, 16]],
            scanned: false,
            scale: 1.0,
            p_power: 1.0,
        };
        assert!(!twice_is_cheaper(&plan, 0) && twice_is_cheaper(&plan, 1));
        let q0 = rows(&pseudo(9, 11), 3, 3);
        let q1 = rows(&pseudo(256, 12), 16, 16);
        let g = rows(&pseudo(48, 13), 3, 16);
        let qs = vec![
            Tensor::from_vec(t32(&q0), (1, 3, 3), &dev).unwrap(),
            Tensor::from_vec(t32(&q1), (1, 16, 16), &dev).unwrap(),
        ];
        let gt = Tensor::from_vec(t32(&g), (1, 3, 16), &dev).unwrap();
        let got = precondition_full(&gt, &qs, &plan, UpdateRule::Pro, Precision::Float32).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // P₀·G·P₁ (both grams symmetric)
        let want = mm(&mm(&mm(&tr(&q0), &q0), &g), &mm(&tr(&q1), &q1));
        let scale = want.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
        for (a, b) in got.iter().zip(want.iter().flatten()) {
            assert!((*a as f64 - b).abs() < 1e-5 * scale, "{got:?} vs {want:?}");
        }
        // a square leaf: the grams' path, bit for bit
        let sq = LeafPlan {
            dims: vec![3, 3],
            stored: vec![vec![3, 3], vec![3, 3]],
            ..plan
        };
        let qs = vec![qs[0].clone(), qs[0].clone()];
        let g = Tensor::from_vec(t32(&rows(&pseudo(9, 14), 3, 3)), (1, 3, 3), &dev).unwrap();
        let full = precondition_full(&g, &qs, &sq, UpdateRule::Pro, Precision::Float32).unwrap();
        let grams = axis_operators(&qs, &sq, UpdateRule::Pro, Precision::Float32).unwrap();
        let kept = precondition(&g, Factors::Grams(&grams), &sq, Precision::Float32).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(&full), bits(&kept));
    }

    /// One PRO and one QUAD fit of a `3 × 4` leaf (a full 3×3 factor, a diagonal one of 4)
    /// with replayed draws, against a float64 evaluation of psgd_torch's formulas: the
    /// draw order (ν, the dense factor's subspaces, the balance uniform), `Pg`, the terms,
    /// the Lipschitz bounds and both factors.
    #[test]
    fn one_fit_matches_the_formulas_in_float64() {
        let (d0, d1, k) = (3usize, 4usize, SUBSPACE_DIM);
        let plan = LeafPlan {
            batch: 1,
            dims: vec![d0, d1],
            diag: vec![false, true],
            stored: vec![vec![d0, d0], vec![d1]],
            scanned: false,
            scale: 1.0,
            p_power: 1.0,
        };
        let q0 = lin(
            &rows(&pseudo(9, 1), 3, 3),
            0.2,
            &(0..3)
                .map(|i| (0..3).map(|j| f64::from(i == j)).collect())
                .collect(),
            1.0,
        );
        let q1: Vec<f64> = pseudo(4, 2).iter().map(|x| 1.0 + 0.3 * x).collect();
        let g = rows(&pseudo(12, 3), 3, 4);
        let nu = rows(&pseudo(12, 4), 3, 4);
        let v_spd = rows(&pseudo(k * 3, 5), k, 3);
        let v_skh = rows(&pseudo(k * 3, 6), k, 3);
        let (l0, l1, lr, beta) = (0.0f64, 40.0f64, 0.3, 0.9);
        for rule in [UpdateRule::Pro, UpdateRule::Quad] {
            let mut tape = vec![Draw::Normal {
                shape: vec![3, 4],
                data: t32(&nu),
            }];
            tape.push(Draw::Normal {
                shape: vec![k, 3],
                data: t32(&v_spd),
            });
            if rule == UpdateRule::Pro {
                tape.push(Draw::Normal {
                    shape: vec![k, 3],
                    data: t32(&v_skh),
                });
            }
            tape.push(Draw::Uniform(0.5));
            let mut rng = ReplayRandom::new("fit", tape);
            let numerics = FitNumerics::new(&super::super::KronOptions {
                update_rule: rule,
                ..Default::default()
            })
            .unwrap();
            let draws = draw(
                &plan,
                &[3, 4],
                rule,
                &numerics,
                0,
                None,
                &mut rng,
                &Device::Cpu,
            )
            .unwrap();
            assert!(!draws.balance);
            let gt = Tensor::from_vec(t32(&g), (3, 4), &Device::Cpu).unwrap();
            let gn = numerics
                .damp(&gt, &draws.nu)
                .unwrap()
                .reshape((1, 3, 4))
                .unwrap();
            let qs = vec![
                Tensor::from_vec(t32(&q0), (1, 3, 3), &Device::Cpu).unwrap(),
                Tensor::from_vec(t32(&vec![q1.clone()]), (1, 4), &Device::Cpu).unwrap(),
            ];
            let ls = vec![
                Tensor::new(&[l0 as f32], &Device::Cpu).unwrap(),
                Tensor::new(&[l1 as f32], &Device::Cpu).unwrap(),
            ];
            let fit = Fit {
                rule,
                lr,
                numerics,
                precision: Precision::Float32,
            };
            let subspaces = Draws::Drawn(draws.subspaces);
            let (nq, nl) = fit_leaf(&qs, &ls, &gn, None, subspaces, &plan, fit).unwrap();

            // the reference, in float64
            let eps = f32::EPSILON as f64;
            let gn: M = (0..3)
                .map(|i| {
                    (0..4)
                        .map(|j| g[i][j] + (1e-9 + eps * g[i][j].abs()) * nu[i][j])
                        .collect()
                })
                .collect();
            let p0 = mm(&tr(&q0), &q0);
            let pg: M = mm(&p0, &gn)
                .iter()
                .map(|r| r.iter().zip(&q1).map(|(x, q)| x * q * q).collect())
                .collect();
            let t1 = mm(&pg, &tr(&pg));
            let (t2a, t2b) = (4.0, 3.0);
            let ell0 = bound(&t1, &v_spd, (0..3).map(|i| t1[i][i]).fold(0.0, f64::max)) + t2a;
            let lip = |l: f64, e: f64| (beta * l + (1.0 - beta) * e).max(e);
            let la = lip(l0, ell0);
            let t1b: Vec<f64> = (0..4)
                .map(|j| (0..3).map(|i| pg[i][j].powi(2)).sum())
                .collect();
            let ell1 = t1b.iter().cloned().fold(0.0, f64::max) + t2b;
            let lb = lip(l1, ell1);
            let eye: M = (0..3)
                .map(|i| (0..3).map(|j| f64::from(i == j)).collect())
                .collect();
            let t1_minus = lin(&t1, 1.0, &eye, -t2a);
            let (want0, want1): (M, Vec<f64>) = if rule == UpdateRule::Pro {
                let q = lin(&q0, 1.0, &mm(&t1_minus, &q0), -lr / la);
                // procrustes_step2
                let r = generator(&q, &v_skh);
                let rq = mm(&r, &q);
                let rrq = mm(&r, &rq);
                let c1: f64 = (0..3).map(|i| rq[i][i]).sum();
                let c2: f64 = (0..3).map(|i| rrq[i][i]).sum();
                let a = if c2 < 0.0 {
                    (-c1 / c2).min(0.125)
                } else {
                    0.125
                };
                let q = lin(&lin(&q, 1.0, &rq, a), 1.0, &rrq, a * a / 2.0);
                let q1n = (0..4)
                    .map(|j| q1[j] * (1.0 - lr / lb * (t1b[j] - t2b)))
                    .collect();
                (q, q1n)
            } else {
                let h = lr / 2.0 / la;
                let p1 = lin(&q0, 1.0, &mm(&t1_minus, &q0), -h);
                let p2 = lin(&p1, 1.0, &mm(&p1, &t1_minus), -h);
                let q = lin(&p2, 0.5, &tr(&p2), 0.5);
                let q1n = (0..4)
                    .map(|j| q1[j] * (1.0 - lr / 2.0 / lb * (t1b[j] - t2b)).powi(2))
                    .collect();
                (q, q1n)
            };
            let got0 = nq[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got1 = nq[1].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rel = |a: f32, b: f64| (a as f64 - b).abs() / b.abs().max(1e-3);
            for (a, b) in got0.iter().zip(want0.iter().flatten()) {
                assert!(rel(*a, *b) < 1e-4, "{rule:?} dense: {got0:?} vs {want0:?}");
            }
            for (a, b) in got1.iter().zip(&want1) {
                assert!(
                    rel(*a, *b) < 1e-4,
                    "{rule:?} diagonal: {got1:?} vs {want1:?}"
                );
            }
            let lg: Vec<f32> = nl.iter().map(|t| t.to_vec1::<f32>().unwrap()[0]).collect();
            assert!(
                rel(lg[0], la) < 1e-5 && rel(lg[1], lb) < 1e-5,
                "{rule:?}: L {lg:?} vs {la}, {lb}"
            );
            // the case exercises the EMA on one factor and the first-fit bound on the other
            assert!(lb > ell1 && (la - ell0).abs() < 1e-12 * la);
        }
    }

    /// `procrustes_step3` against psgd_torch's formulas in float64 on a 4×4 factor whose
    /// skew part is 0.05 and 3 times a random one (the root below and at its 1/3 cap), with a
    /// replayed subspace; a symmetric factor is left exactly as it is.
    #[test]
    fn procrustes_step3_matches_the_formulas_in_float64() {
        use crate::kernels::subspace::{norm_lower_bound_skh, procrustes_step3};
        let p = Precision::Float32;
        let n = 4usize;
        let eye: M = (0..n)
            .map(|i| (0..n).map(|j| f64::from(i == j)).collect())
            .collect();
        let x = rows(&pseudo(n * n, 41), n, n);
        let sym = lin(&lin(&x, 0.3, &tr(&x), 0.3), 1.0, &eye, 2.0);
        let k = rows(&pseudo(n * n, 42), n, n);
        let skew = lin(&k, 1.0, &tr(&k), -1.0);
        let v = rows(&pseudo(SUBSPACE_DIM * n, 43), SUBSPACE_DIM, n);
        let vt = Tensor::from_vec(t32(&v), (1, SUBSPACE_DIM, n), &Device::Cpu).unwrap();
        let mut caps = vec![];
        for amount in [0.05, 3.0] {
            let q = lin(&sym, 1.0, &skew, amount);
            let qt = Tensor::from_vec(t32(&q), (1, n, n), &Device::Cpu).unwrap();
            let got = procrustes_step3(&qt, |r| norm_lower_bound_skh(r, &vt, p), p).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // the reference
            let r = generator(&q, &v);
            let rq = mm(&r, &q);
            let rrq = mm(&r, &rq);
            let rrrq = mm(&r, &rrq);
            let trace = |m: &M| (0..n).map(|i| m[i][i]).sum::<f64>();
            let (c1, c2, c3) = (trace(&rq), trace(&rrq), trace(&rrrq));
            assert!(c1 > 0.0 && c3 < 0.0, "the factor moves: {c1} {c3}");
            let root = (-c2 - (c2 * c2 - 1.5 * c1 * c3).sqrt()) / (0.75 * c3);
            let a = root.min(1.0 / 3.0);
            caps.push(root > 1.0 / 3.0);
            let inner = lin(&rrq, 1.0, &rrrq, 0.25 * a);
            let outer = lin(&rq, 1.0, &inner, 0.5 * a);
            let want = lin(&q, 1.0, &outer, a);
            for (g, w) in got.iter().zip(want.iter().flatten()) {
                assert!(
                    (*g as f64 - w).abs() < 1e-5 * w.abs().max(1.0),
                    "skew {amount}: {got:?} vs {want:?}"
                );
            }
        }
        assert_eq!(caps, [false, true], "one case below the cap, one at it");
        // a symmetric factor does not move
        let qt = Tensor::from_vec(t32(&sym), (1, n, n), &Device::Cpu).unwrap();
        let got = procrustes_step3(&qt, |r| norm_lower_bound_skh(r, &vt, p), p).unwrap();
        let diff = (got - &qt).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
