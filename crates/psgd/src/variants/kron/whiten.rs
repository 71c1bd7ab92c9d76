//! Kron's inverse-free fits, psgd_torch's whitening rules `Q0.5EQ1.5` (PRO) and `QUAD`.
//!
//! Both move every factor from the same preconditioned input `Pg = P·Gn` (`Gn` the damped
//! input, `P` from the factors before the fit). Per factor `i` with `t1 = gram_i(Pg)` and
//! `t2 = N/dᵢ`, the step is `preconditionerLr / Lᵢ`, where `Lᵢ` is a running lower bound of
//! the fit's Lipschitz constant: `ℓ = ‖t1‖ + t2` (a random subspace bound for a dense
//! factor, the largest entry for a diagonal one), `Lᵢ ← max(β·Lᵢ + (1−β)·ℓ, ℓ)`.
//! - PRO: `Q ← Q − (lr/L)(t1·Q − t2·Q)`, then a Procrustes rotation toward symmetric
//!   positive definite; a diagonal `q ← q ⊙ (1 − (lr/L)(t1 − t2))`.
//! - QUAD: `p = Q − (lr/2L)(t1·Q − t2·Q)`, `p ← p − (lr/2L)(p·t1 − t2·p)`, `Q ← (p + pᵀ)/2`;
//!   a diagonal `q ← q ⊙ (1 − (lr/2L)(t1 − t2))²`.
//!
//! Dense factors are full matrices: nothing here is triangular, every product is a
//! dense one.

use super::{for_each_axis, precondition, unfold, Factors, LeafPlan, UpdateRule};
use crate::error::{PsgdError, Result};
use crate::kernels::precision::Precision;
use crate::kernels::subspace::{norm_lower_bound_spd, procrustes_step2, SUBSPACE_DIM};
use crate::random::RandomSource;
use candle_core::{DType, Device, Tensor};

/// psgd_torch's damping of the noise, `(DAMPING + eps·|g|)·ν`.
const DAMPING: f64 = 1e-9;

/// The random draws of one leaf's fit, in psgd_torch's order: the noise `ν` (the leaf's
/// shape), then per dense factor the subspace of its norm bound and, under PRO, that of
/// its Procrustes step (`(B, 32, d)`; drawn as `(32, d)` for an unscanned leaf), then the
/// uniform that decides whether the factors are balanced afterwards.
pub(super) struct LeafDraws {
    pub nu: Tensor,
    /// Per factor: `(spd, skh)` for a dense one, `None` for a diagonal one.
    pub subspaces: Vec<Option<(Tensor, Option<Tensor>)>>,
    pub balance: bool,
}

/// Takes one leaf's draws from `rng` (see [`LeafDraws`]).
pub(super) fn draw(
    plan: &LeafPlan,
    shape: &[usize],
    rule: UpdateRule,
    rng: &mut dyn RandomSource,
    device: &Device,
) -> Result<LeafDraws> {
    let nu = rng.normal(shape, device)?;
    let mut subspaces = Vec::with_capacity(plan.dims.len());
    for (&d, &diag) in plan.dims.iter().zip(&plan.diag) {
        if diag {
            subspaces.push(None);
            continue;
        }
        let drawn: Vec<usize> = if plan.scanned {
            vec![plan.batch, SUBSPACE_DIM, d]
        } else {
            vec![SUBSPACE_DIM, d]
        };
        let mut one = || -> Result<Tensor> {
            Ok(rng
                .normal(&drawn, device)?
                .reshape((plan.batch, SUBSPACE_DIM, d))?)
        };
        let spd = one()?;
        let skh = if rule == UpdateRule::Pro {
            Some(one()?)
        } else {
            None
        };
        subspaces.push(Some((spd, skh)));
    }
    let balance = rng.uniform()? < 0.01;
    Ok(LeafDraws {
        nu,
        subspaces,
        balance,
    })
}

/// psgd_torch's damped input `g + (1e-9 + eps·|g|)·ν` (eps the float32 machine epsilon).
pub(super) fn damp(g: &Tensor, nu: &Tensor) -> Result<Tensor> {
    let g = g.to_dtype(DType::F32)?;
    let scale = ((g.abs()? * f32::EPSILON as f64)? + DAMPING)?;
    Ok((&g + (scale * nu)?)?)
}

/// `QᵀQ` of each full factor (`q²` for a diagonal one), batched float32.
pub(super) fn full_grams(qs: &[Tensor], plan: &LeafPlan, p: Precision) -> Result<Vec<Tensor>> {
    qs.iter()
        .zip(&plan.diag)
        .map(|(q, &diag)| {
            if diag {
                Ok(q.sqr()?)
            } else {
                p.matmul(&q.transpose(1, 2)?, q)
            }
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

/// `g` preconditioned with the full factors `qs` (batched): `QᵢᵀQᵢ` along each axis, by
/// the cheaper order per axis. Where no axis is longer than the rest of its leaf, this is
/// the kept grams' path exactly ([`full_grams`], then one product per axis or merged run);
/// otherwise such an axis is multiplied by `Qᵢᵀ` and `Qᵢ` in turn and the others by their
/// grams (the same products in another association: equal to rounding).
pub(super) fn precondition_full(
    g: &Tensor,
    qs: &[Tensor],
    plan: &LeafPlan,
    p: Precision,
) -> Result<Tensor> {
    if !(0..qs.len()).any(|i| twice_is_cheaper(plan, i)) {
        let grams = full_grams(qs, plan, p)?;
        return precondition(g, Factors::Grams(&grams), plan, p);
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
    pub beta: f64,
    pub precision: Precision,
}

/// The running bound `max(β·L + (1−β)·ℓ, ℓ)`; `l` and `ell` are `(B,)`.
fn lipschitz(l: &Tensor, ell: &Tensor, beta: f64) -> Result<Tensor> {
    let ema = ((l * beta)? + (ell * (1.0 - beta))?)?;
    Ok(ema.maximum(ell)?)
}

/// One fit of a leaf's batched factors `qs` (`(B, d, d)` full or `(B, d)`) and bounds `ls`
/// (`(B,)` each) from the damped input `gn` `(B, d₀, …)`, with the dense factors' subspace
/// draws `subspaces` (`(B, 32, d)`). Returns the new factors and bounds.
pub(super) fn fit_leaf(
    qs: &[Tensor],
    ls: &[Tensor],
    gn: &Tensor,
    subspaces: &[Option<(Tensor, Option<Tensor>)>],
    plan: &LeafPlan,
    fit: Fit,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let p = fit.precision;
    let pg = precondition_full(gn, qs, plan, p)?;
    // a slice of the layers under `laxMapScannedLayers`
    let b = gn.dim(0)?;
    let n = plan.numel() as f64;
    let mut new_qs = Vec::with_capacity(qs.len());
    let mut new_ls = Vec::with_capacity(qs.len());
    for (i, (q, l)) in qs.iter().zip(ls).enumerate() {
        let u = unfold(&pg, plan, i)?;
        let t2 = n / plan.dims[i] as f64;
        match &subspaces[i] {
            None => {
                let t1 = u.sqr()?.sum(2)?;
                let ell = (t1.max(1)? + t2)?;
                let l = lipschitz(l, &ell, fit.beta)?;
                let step = (l.recip()? * fit.lr)?.reshape((b, 1))?;
                let err = (t1 - t2)?.broadcast_mul(&step)?;
                let gain = match fit.rule {
                    UpdateRule::Quad => ((err * -0.5)? + 1.0)?.sqr()?,
                    _ => (err.neg()? + 1.0)?,
                };
                new_qs.push((q * gain)?);
                new_ls.push(l);
            }
            Some((spd, skh)) => {
                let t1 = p.matmul(&u, &u.transpose(1, 2)?)?;
                let ell = (norm_lower_bound_spd(&t1, spd, p)? + t2)?;
                let l = lipschitz(l, &ell, fit.beta)?;
                let step = (l.recip()? * fit.lr)?.reshape((b, 1, 1))?;
                let q = match (fit.rule, skh) {
                    (UpdateRule::Quad, _) => {
                        let half = (step * 0.5)?;
                        let left = (p.matmul(&t1, q)? - (q * t2)?)?;
                        let p1 = (q - left.broadcast_mul(&half)?)?;
                        let right = (p.matmul(&p1, &t1)? - (&p1 * t2)?)?;
                        let p2 = (&p1 - right.broadcast_mul(&half)?)?;
                        ((&p2 + p2.transpose(1, 2)?)? * 0.5)?
                    }
                    (_, Some(skh)) => {
                        let delta = (p.matmul(&t1, q)? - (q * t2)?)?;
                        let q = (q - delta.broadcast_mul(&step)?)?;
                        procrustes_step2(&q, skh, p)?
                    }
                    (_, None) => {
                        return Err(PsgdError::Draw(format!(
                            "no Procrustes subspace was drawn for axis {i}"
                        )))
                    }
                };
                new_qs.push(q);
                new_ls.push(l);
            }
        }
    }
    Ok((new_qs, new_ls))
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
    /// a float64 evaluation; a leaf with no such axis takes the kept grams' path bit for
    /// bit.
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
        let got = precondition_full(&gt, &qs, &plan, Precision::Float32).unwrap();
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
        let full = precondition_full(&g, &qs, &sq, Precision::Float32).unwrap();
        let grams = full_grams(&qs, &sq, Precision::Float32).unwrap();
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
            let draws = draw(&plan, &[3, 4], rule, &mut rng, &Device::Cpu).unwrap();
            assert!(!draws.balance);
            let gt = Tensor::from_vec(t32(&g), (3, 4), &Device::Cpu).unwrap();
            let gn = damp(&gt, &draws.nu).unwrap().reshape((1, 3, 4)).unwrap();
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
                beta,
                precision: Precision::Float32,
            };
            let (nq, nl) = fit_leaf(&qs, &ls, &gn, &draws.subspaces, &plan, fit).unwrap();

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
                let r = lin(&tr(&q), 1.0, &q, -1.0);
                let s = r.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
                let nr = bound(&r, &v_skh, s) + f32::MIN_POSITIVE as f64;
                let r: M = r
                    .iter()
                    .map(|x| x.iter().map(|y| y / nr).collect())
                    .collect();
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
}
