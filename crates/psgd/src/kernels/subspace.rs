//! Randomised spectral-norm lower bounds and the Procrustes step, as psgd_torch's
//! inverse-free Kron rules use them: `norm_lower_bound_spd` (the Lipschitz estimate of a
//! factor's fit), `norm_lower_bound_skh` and `procrustes_step2` (which rotates a factor
//! toward symmetric positive definite). Everything is batched over a leading axis (one
//! matrix per scanned layer) and made of matrix products, so it runs on any device; the
//! random subspace is passed in, so a caller can replay a reference's draws.

use crate::error::Result;
use crate::kernels::linalg::{max_abs_per_batch, TINY_F32};
use crate::kernels::precision::Precision;
use candle_core::{DType, Tensor, D};

/// Rows of the random subspace the bounds iterate (psgd_torch's `k`).
pub const SUBSPACE_DIM: usize = 32;

/// Subspace half-iterations of the bounds (psgd_torch's `half_iters`).
const HALF_ITERS: usize = 2;

/// The largest step of [`procrustes_step2`]'s rotation (psgd_torch's `max_step_size`).
const PROCRUSTES_MAX_STEP: f64 = 1.0 / 8.0;

/// The diagonal of each matrix of a batch `(B, n, n)`, as `(B, n)`.
fn diagonal(a: &Tensor) -> Result<Tensor> {
    let n = a.dim(D::Minus1)?;
    let eye = Tensor::eye(n, a.dtype(), a.device())?;
    Ok(a.broadcast_mul(&eye)?.sum(D::Minus1)?)
}

/// The trace of each matrix of a batch `(B, n, n)`, as `(B,)`.
fn trace(a: &Tensor) -> Result<Tensor> {
    Ok(diagonal(a)?.sum(D::Minus1)?)
}

/// The subspace iteration both bounds share, on `a / s` with `s = scale + tiny`: the
/// rows of `v` `(B, k, n)` are turned toward the row of `a` of largest norm (the first
/// among equals), then multiplied by `a` twice per half-iteration with a normalisation
/// between; the bound is `s` times the largest row norm at the end.
fn subspace_bound(a: &Tensor, scale: &Tensor, v: &Tensor, p: Precision) -> Result<Tensor> {
    let (b, n, _) = a.dims3()?;
    let s = (scale + TINY_F32)?;
    let an = a.broadcast_div(&s.reshape((b, 1, 1))?)?;
    let j = an.sqr()?.sum(2)?.argmax_keepdim(1)?;
    let at = j
        .reshape((b, 1, 1))?
        .broadcast_as((b, 1, n))?
        .contiguous()?;
    let row = an.gather(&at, 1)?;
    let dots = v.broadcast_mul(&row)?.sum_keepdim(2)?;
    let sign = (dots.gt(0.0)?.to_dtype(DType::F32)? - dots.lt(0.0)?.to_dtype(DType::F32)?)?;
    let mut v = v.broadcast_mul(&sign)?.broadcast_add(&row)?;
    for _ in 0..HALF_ITERS {
        v = p.matmul(&v, &an)?;
        let norm = (v.sqr()?.sum_keepdim(2)?.sqrt()? + TINY_F32)?;
        v = v.broadcast_div(&norm)?;
        v = p.matmul(&v, &an)?;
    }
    Ok((v.sqr()?.sum(2)?.sqrt()?.max(1)? * s)?)
}

/// A lower bound on the spectral norm (the largest eigenvalue) of each symmetric positive
/// semidefinite matrix of the batch `a` `(B, n, n)`, as `(B,)`: random subspace iteration
/// on `a` scaled by its largest diagonal entry, from the `k` rows of `v` `(B, k, n)`
/// (standard normal draws; psgd_torch draws `k = 32` even when `n < 32`). Never above
/// the norm; close to it (measured within a few percent) since the rows start near the
/// largest row of `a`.
pub fn norm_lower_bound_spd(a: &Tensor, v: &Tensor, p: Precision) -> Result<Tensor> {
    let s = diagonal(a)?.max(1)?;
    subspace_bound(a, &s, v, p)
}

/// A lower bound on the spectral norm of each skew-symmetric matrix of the batch `a`
/// `(B, n, n)`, as `(B,)`: the iteration of [`norm_lower_bound_spd`] on `a` scaled by its
/// largest absolute entry. 0 for a zero matrix.
pub fn norm_lower_bound_skh(a: &Tensor, v: &Tensor, p: Precision) -> Result<Tensor> {
    subspace_bound(a, &max_abs_per_batch(a)?, v, p)
}

/// The generator of the Procrustes rotations, `R = Qᵀ − Q` divided by its
/// [`norm_lower_bound_skh`] (from the draws `v` `(B, k, n)`) plus the smallest normal.
fn procrustes_generator(q: &Tensor, v: &Tensor, p: Precision) -> Result<Tensor> {
    let b = q.dim(0)?;
    let r = (q.transpose(1, 2)? - q)?;
    let norm = (norm_lower_bound_skh(&r, v, p)? + TINY_F32)?;
    Ok(r.broadcast_div(&norm.reshape((b, 1, 1))?)?)
}

/// One step of psgd_torch's online orthogonal Procrustes solver on each factor of the
/// batch `q` `(B, n, n)`: the rotation `exp(aR)`, truncated after its second-order term,
/// with the generator `R = Qᵀ − Q` normalised by [`norm_lower_bound_skh`] (from the draws
/// `v` `(B, k, n)`), and `a` from a line search on `tr(RQ)`, `tr(R²Q)` capped at 1/8.
/// It moves `Q` toward symmetric positive definite without changing `QᵀQ` beyond the
/// truncation; a symmetric `Q` is left as it is.
pub fn procrustes_step2(q: &Tensor, v: &Tensor, p: Precision) -> Result<Tensor> {
    let b = q.dim(0)?;
    let r = procrustes_generator(q, v, p)?;
    let rq = p.matmul(&r, q)?;
    let rrq = p.matmul(&r, &rq)?;
    let (c1, c2) = (trace(&rq)?, trace(&rrq)?);
    let cap = (c2.ones_like()? * PROCRUSTES_MAX_STEP)?;
    let negative = c2.lt(0.0)?;
    // where c2 ≥ 0 the ratio is not used (and may be ±∞ or NaN)
    let safe_c2 = negative.where_cond(&c2, &c2.ones_like()?.neg()?)?;
    let search = (c1.neg()? / safe_c2)?.minimum(&cap)?;
    let a = negative.where_cond(&search, &cap)?.reshape((b, 1, 1))?;
    let half_a2 = (a.sqr()? * 0.5)?;
    Ok((q + rq.broadcast_mul(&a)?)?.add(&rrq.broadcast_mul(&half_a2)?)?)
}

/// The largest step of [`procrustes_step3`]'s rotation (psgd_torch's `max_step_size`).
const PROCRUSTES3_MAX_STEP: f64 = 1.0 / 3.0;

/// One step of psgd_torch's third-order online Procrustes solver on each matrix of the
/// batch `q` `(B, n, n)`: the rotation `I + aR + (aR)²/2 + (aR)³/8` with the generator
/// `R = Qᵀ − Q` normalised by [`norm_lower_bound_skh`] (from the draws `v` `(B, k, n)`)
/// and `a` the larger root of `tr(RQ) + a·tr(R²Q) + (3/8)a²·tr(R³Q) = 0`, capped at 1/3.
/// A matrix with `tr(RQ) ≤ 0` or `tr(R³Q) ≥ 0` (symmetric up to round-off) is left as it
/// is.
pub fn procrustes_step3(q: &Tensor, v: &Tensor, p: Precision) -> Result<Tensor> {
    let b = q.dim(0)?;
    let r = procrustes_generator(q, v, p)?;
    let rq = p.matmul(&r, q)?;
    let rrq = p.matmul(&r, &rq)?;
    let rrrq = p.matmul(&r, &rrq)?;
    let (c1, c2, c3) = (trace(&rq)?, trace(&rrq)?, trace(&rrrq)?);
    let moves = c1.gt(0.0)?.mul(&c3.lt(0.0)?)?;
    // where the matrix does not move, stand-ins keep the root finite (it is not used)
    let one = c1.ones_like()?;
    let c1s = moves.where_cond(&c1, &one)?;
    let c3s = moves.where_cond(&c3, &one.neg()?)?;
    let disc = ((c2.sqr()? - (c1s.mul(&c3s)? * 1.5)?)?.relu()?).sqrt()?;
    let root = ((c2.neg()? - disc)? / (c3s * 0.75)?)?;
    let root = root.minimum(&(&one * PROCRUSTES3_MAX_STEP)?)?;
    let a = moves
        .where_cond(&root, &c1.zeros_like()?)?
        .reshape((b, 1, 1))?;
    let inner = (&rrq + rrrq.broadcast_mul(&(&a * 0.25)?)?)?;
    let outer = (&rq + inner.broadcast_mul(&(&a * 0.5)?)?)?;
    Ok((q + outer.broadcast_mul(&a)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A deterministic standard-normal-ish sequence (Box–Muller on an LCG).
    fn normals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut uni = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u1, u2) = (uni(), uni());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }

    /// The largest eigenvalue of a symmetric matrix (Jacobi rotations, float64).
    fn max_eigenvalue(a: &[f64], n: usize) -> f64 {
        let mut m = a.to_vec();
        for _ in 0..100 {
            for p in 0..n {
                for q in p + 1..n {
                    let apq = m[p * n + q];
                    if apq.abs() < 1e-300 {
                        continue;
                    }
                    let theta = (m[q * n + q] - m[p * n + p]) / (2.0 * apq);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (t * t + 1.0).sqrt();
                    let s = t * c;
                    for k in 0..n {
                        let (akp, akq) = (m[k * n + p], m[k * n + q]);
                        m[k * n + p] = c * akp - s * akq;
                        m[k * n + q] = s * akp + c * akq;
                    }
                    for k in 0..n {
                        let (apk, aqk) = (m[p * n + k], m[q * n + k]);
                        m[p * n + k] = c * apk - s * aqk;
                        m[q * n + k] = s * apk + c * aqk;
                    }
                }
            }
        }
        (0..n).map(|i| m[i * n + i]).fold(f64::MIN, f64::max)
    }

    fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// SPD `B Bᵀ + δI` of size n (row-major, float64) from a seed.
    fn spd(n: usize, seed: u64, low_rank: bool) -> Vec<f64> {
        let r = if low_rank { 2 } else { n };
        let b = normals(n * r, seed);
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..r)
                    .map(|k| b[i * r + k] as f64 * b[j * r + k] as f64)
                    .sum::<f64>()
                    + if i == j { 1e-3 } else { 0.0 };
            }
        }
        a
    }

    /// `norm_lower_bound_spd` is a lower bound of the largest eigenvalue and close to it,
    /// for full-rank and low-rank SPD matrices of sizes below and above the subspace's 32
    /// rows, batched.
    #[test]
    fn spd_bound_is_a_close_lower_bound() {
        for (k, (n, low_rank)) in [(3, false), (5, true), (8, false), (40, false), (64, true)]
            .into_iter()
            .enumerate()
        {
            let mats: Vec<Vec<f64>> = (0..2)
                .map(|b| spd(n, 10 * k as u64 + b, low_rank))
                .collect();
            let a = tensor(
                mats.iter().flatten().map(|&x| x as f32).collect(),
                &[2, n, n],
            );
            let v = tensor(
                normals(2 * SUBSPACE_DIM * n, 77 + k as u64),
                &[2, SUBSPACE_DIM, n],
            );
            let got = norm_lower_bound_spd(&a, &v, Precision::Float32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (b, m) in mats.iter().enumerate() {
                let exact = max_eigenvalue(m, n);
                let rel = got[b] as f64 / exact;
                assert!(
                    rel <= 1.0 + 1e-5 && rel > 0.9,
                    "n {n}, batch {b}: bound {} vs eigenvalue {exact}",
                    got[b]
                );
            }
        }
    }

    /// `norm_lower_bound_skh` bounds the spectral norm of a skew-symmetric matrix (the
    /// square root of the largest eigenvalue of `RᵀR`) from below and closely; 0 for 0.
    #[test]
    fn skh_bound_is_a_close_lower_bound() {
        for (k, n) in [3usize, 6, 36].into_iter().enumerate() {
            let x = normals(n * n, 300 + k as u64);
            let r: Vec<f64> = (0..n * n)
                .map(|at| {
                    let (i, j) = (at / n, at % n);
                    x[j * n + i] as f64 - x[i * n + j] as f64
                })
                .collect();
            let rtr: Vec<f64> = (0..n * n)
                .map(|at| {
                    let (i, j) = (at / n, at % n);
                    (0..n).map(|m| r[m * n + i] * r[m * n + j]).sum()
                })
                .collect();
            let exact = max_eigenvalue(&rtr, n).sqrt();
            let a = tensor(r.iter().map(|&x| x as f32).collect(), &[1, n, n]);
            let v = tensor(
                normals(SUBSPACE_DIM * n, 5 + k as u64),
                &[1, SUBSPACE_DIM, n],
            );
            let got = norm_lower_bound_skh(&a, &v, Precision::Float32).unwrap();
            let got = got.to_vec1::<f32>().unwrap()[0] as f64;
            assert!(
                got <= exact * (1.0 + 1e-5) && got > 0.9 * exact,
                "n {n}: bound {got} vs norm {exact}"
            );
        }
        let zero = Tensor::zeros((1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let v = tensor(normals(SUBSPACE_DIM * 4, 1), &[1, SUBSPACE_DIM, 4]);
        let got = norm_lower_bound_skh(&zero, &v, Precision::Float32).unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), vec![0.0]);
    }

    /// The Procrustes step leaves a symmetric factor unchanged, keeps `QᵀQ` (it is a
    /// rotation up to its truncation) and shrinks the skew part of a non-symmetric one.
    #[test]
    fn procrustes_step_rotates_toward_symmetric() {
        let n = 4;
        let v = tensor(normals(SUBSPACE_DIM * n, 9), &[1, SUBSPACE_DIM, n]);
        let sym = spd(n, 3, false);
        let q = tensor(sym.iter().map(|&x| x as f32).collect(), &[1, n, n]);
        let out = procrustes_step2(&q, &v, Precision::Float32).unwrap();
        let diff = (out - &q).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

        let x = normals(n * n, 21);
        let q: Vec<f32> = (0..n * n).map(|at| sym[at] as f32 + 0.05 * x[at]).collect();
        let q = tensor(q, &[1, n, n]);
        let skew = |t: &Tensor| -> f32 {
            (t.transpose(1, 2).unwrap() - t)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let gram = |t: &Tensor| t.transpose(1, 2).unwrap().matmul(t).unwrap();
        let mut cur = q.clone();
        for _ in 0..5 {
            cur = procrustes_step2(&cur, &v, Precision::Float32).unwrap();
        }
        assert!(
            skew(&cur) < 0.05 * skew(&q),
            "{} vs {}",
            skew(&cur),
            skew(&q)
        );
        let (g0, g1) = (gram(&q), gram(&cur));
        let rel = ((&g1 - &g0).unwrap().abs().unwrap().max_all().unwrap())
            .to_scalar::<f32>()
            .unwrap()
            / g0.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        assert!(rel < 1e-3, "QᵀQ moved by {rel}");
    }
}
