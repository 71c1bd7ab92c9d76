//! Linear algebra candle lacks: the right triangular solve, a small dense solve and the
//! cheap spectral-norm lower bound. Both work on a leading batch axis (one matrix per scanned layer).

use crate::error::Result;
use crate::kernels::elementwise::with_host;
use crate::kernels::precision::Precision;
use crate::kernels::triangular::{matmul_tri, solve_right_cpu, Tri};
use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

/// The smallest positive normal float32; keeps denominators positive.
pub const TINY_F32: f64 = f32::MIN_POSITIVE as f64;

/// `X @ inv(A)` for a batch of upper-triangular `A`.
///
/// `x` is `(B, R, n)` and `a` is `(B, n, n)`; only the upper triangle of `a` is read. On
/// the CPU it is [`solve_right_cpu`] (blocked GEMMs, or substitution for a short `X`);
/// elsewhere a recursive block solve made of candle ops, so the data never leaves the
/// device.
pub fn solve_triangular_right(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    match solve_right_cpu(x, a) {
        Some(y) => y,
        None => solve_triangular_right_blocked(x, a),
    }
}

/// The device-agnostic solve: split `A` into 2×2 blocks and recurse,
/// `Y₁ = X₁ A₁₁⁻¹`, `Y₂ = (X₂ − Y₁ A₁₂) A₂₂⁻¹`.
pub fn solve_triangular_right_blocked(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    let n = a.dim(2)?;
    if n == 1 {
        return Ok(x.broadcast_div(a)?);
    }
    let h = n / 2;
    let x1 = x.narrow(2, 0, h)?.contiguous()?;
    let x2 = x.narrow(2, h, n - h)?;
    let a11 = a.narrow(1, 0, h)?.narrow(2, 0, h)?.contiguous()?;
    let a12 = a.narrow(1, 0, h)?.narrow(2, h, n - h)?.contiguous()?;
    let a22 = a.narrow(1, h, n - h)?.narrow(2, h, n - h)?.contiguous()?;
    let y1 = solve_triangular_right_blocked(&x1, &a11)?;
    let rhs = (x2 - Precision::Float32.matmul(&y1, &a12)?)?.contiguous()?;
    let y2 = solve_triangular_right_blocked(&rhs, &a22)?;
    Ok(Tensor::cat(&[&y1, &y2], 2)?)
}

/// `QᵀQ` of a triangular factor (batched over leading axes), or `Q²` of a diagonal one:
/// what applying a Kronecker-factored preconditioner multiplies by. Kept in the states
/// so that a step which does not fit the factors applies each with one product.
pub fn factor_gram(q: &Tensor, dense: bool, p: Precision) -> Result<Tensor> {
    if !dense {
        return Ok(q.sqr()?);
    }
    let qt = q.transpose(D::Minus2, D::Minus1)?;
    matmul_tri(&qt, Tri::Lower, q, Tri::Upper, Tri::Full, p)
}

/// Square matrices `(B, n, n)` (or one `(n, n)`) as host slices, when they are
/// contiguous float32 on the CPU.
fn with_square<R>(ts: &[&Tensor], f: impl FnOnce(usize, usize, &[&[f32]]) -> R) -> Option<R> {
    let t0 = ts[0];
    let (b, n) = match t0.dims() {
        [n, m] if n == m => (1, *n),
        [b, n, m] if n == m => (*b, *n),
        _ => return None,
    };
    if ts.iter().any(|t| t.dims() != t0.dims()) {
        return None;
    }
    let owned: Vec<[Tensor; 1]> = ts.iter().map(|t| [(*t).clone()]).collect();
    let groups: Vec<&[Tensor]> = owned.iter().map(|g| g.as_slice()).collect();
    with_host(&groups, |flats| {
        // each group is one contiguous tensor, so no scratch copy is ever made
        let mut scratch: Vec<Vec<f32>> = vec![vec![]; flats.len()];
        let slices: Vec<&[f32]> = flats
            .iter()
            .zip(scratch.iter_mut())
            .map(|(fl, sc)| fl.range(0, fl.len(), sc))
            .collect();
        f(b, n, &slices)
    })
}

/// `triu(a − b)` for square matrices `(B, n, n)` or `(n, n)`.
pub fn triu_difference(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let host = with_square(&[a, b], |bt, n, s| {
        let mut out = vec![0f32; bt * n * n];
        out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            let i = r % n;
            let at = r * n;
            for j in i..n {
                row[j] = s[0][at + j] - s[1][at + j];
            }
        });
        out
    });
    match host {
        Some(out) => Ok(Tensor::from_vec(out, a.dims(), a.device())?),
        None => {
            let n = a.dim(D::Minus1)?;
            Ok((a - b)?.broadcast_mul(&Tensor::triu2(n, DType::F32, a.device())?)?)
        }
    }
}

/// Rows per task of the passes over an upper triangle.
const TRI_ROWS: usize = 32;

/// `Σ_rows` of per-task partial vectors, added in task order so the result does not
/// depend on scheduling.
fn sum_partials(parts: Vec<Vec<f64>>, n: usize) -> Vec<f64> {
    let mut acc = vec![0f64; n];
    for p in parts {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc
}

/// One pass over the symmetric `S = U + W` read from the upper triangles of `u` and `w`
/// (`n × n`, row-major): `y[i] = Σ_k f(S[i][k], k)`, each off-diagonal entry read once for
/// both rows it is in.
fn sym_pass(u: &[f32], w: &[f32], n: usize, f: impl Fn(f64, usize) -> f64 + Sync) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = u
        .par_chunks(n * TRI_ROWS)
        .zip(w.par_chunks(n * TRI_ROWS))
        .enumerate()
        .map(|(c, (rows_u, rows_w))| {
            let mut y = vec![0f64; n];
            for (r, (ru, rw)) in rows_u.chunks(n).zip(rows_w.chunks(n)).enumerate() {
                let i = c * TRI_ROWS + r;
                let mut yi = f((ru[i] + rw[i]) as f64, i);
                for (j, (&a, &b)) in ru.iter().zip(rw).enumerate().skip(i + 1) {
                    let v = (a + b) as f64;
                    yi += f(v, j);
                    y[j] += f(v, i);
                }
                y[i] += yi;
            }
            y
        })
        .collect();
    sum_partials(parts, n)
}

/// [`norm_lower_bound`] of `a + b` for symmetric `a` and `b` of which only the upper
/// triangles are read (`(B, n, n)`, as [`matmul_tri`] gives them with an upper output).
/// For a symmetric matrix the reference's row and column branches coincide: one row of
/// largest norm, one product to get a direction, and the norm of the product with that.
pub fn norm_lower_bound_sym_sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let host = with_square(&[a, b], |bt, n, s| {
        (0..bt)
            .map(|k| {
                let m = k * n * n..(k + 1) * n * n;
                sym_bound(&s[0][m.clone()], &s[1][m], n)
            })
            .collect::<Vec<f32>>()
    });
    match host {
        Some(v) => {
            let bt = v.len();
            Ok(Tensor::from_vec(v, bt, a.device())?)
        }
        None => {
            let s = (a + b)?;
            let s = if s.rank() == 2 { s.unsqueeze(0)? } else { s };
            norm_lower_bound(&symmetric_from_upper(&s)?)
        }
    }
}

/// The symmetric matrices `(B, n, n)` whose upper triangles are those of `s` (its strict
/// lower triangles are not read).
pub fn symmetric_from_upper(s: &Tensor) -> Result<Tensor> {
    let n = s.dim(2)?;
    let up = s.broadcast_mul(&Tensor::triu2(n, DType::F32, s.device())?)?;
    let strict =
        (Tensor::triu2(n, DType::F32, s.device())? - Tensor::eye(n, DType::F32, s.device())?)?;
    Ok((&up + s.broadcast_mul(&strict)?.transpose(1, 2)?)?)
}

/// The bound of one symmetric matrix `U + W`, given by the upper triangles of `u` and `w`.
fn sym_bound(u: &[f32], w: &[f32], n: usize) -> f32 {
    let max_abs = u
        .par_chunks(n)
        .zip(w.par_chunks(n))
        .enumerate()
        .map(|(i, (ru, rw))| {
            ru[i..]
                .iter()
                .zip(&rw[i..])
                .fold(0f32, |m, (a, b)| m.max((a + b).abs()))
        })
        .reduce(|| 0f32, f32::max);
    if max_abs.is_nan() || max_abs <= 0.0 {
        return max_abs;
    }
    let inv = 1.0 / max_abs as f64;
    // squared norm of each row of S / max_abs
    let norms = sym_pass(u, w, n, |v, _| (v * inv) * (v * inv));
    // the first row of largest norm, as argmax picks it
    let j = norms
        .iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > norms[best] { i } else { best });
    let row_j: Vec<f64> = (0..n)
        .map(|k| {
            let at = if k >= j { j * n + k } else { k * n + j };
            (u[at] + w[at]) as f64 * inv
        })
        .collect();
    let x: Vec<f64> = sym_pass(u, w, n, |v, k| v * row_j[k])
        .iter()
        .map(|v| v * inv)
        .collect();
    let nx = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let x: Vec<f64> = x.iter().map(|v| v / nx).collect();
    let y = sym_pass(u, w, n, |v, k| v * x[k]);
    let ny = y.iter().map(|v| v * v).sum::<f64>().sqrt() * inv;
    (ny * max_abs as f64) as f32
}

/// Sum of squares over the last axis, kept as a size-1 axis.
fn sq_norm_keepdim(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.sum_keepdim(D::Minus1)?)
}

/// The largest absolute entry of each matrix of a batch: `(B, ...)` to `(B,)`.
pub fn max_abs_per_batch(a: &Tensor) -> Result<Tensor> {
    Ok(a.abs()?.flatten_from(1)?.max(1)?)
}

/// A cheap lower bound on the spectral norm of each matrix in the batch `a` `(B, n, n)`,
/// returned as `(B,)`: scale by the largest entry, take the column or row of largest norm,
/// and do one power-iteration-like product with it. Both candidates are computed and one
/// selected on the device, so nothing is read back to the host.
pub fn norm_lower_bound(a: &Tensor) -> Result<Tensor> {
    let (b, n, _) = a.dims3()?;
    let max_abs = max_abs_per_batch(a)?;
    let positive = max_abs.gt(0.0)?;
    let safe = positive.where_cond(&max_abs, &max_abs.ones_like()?)?;
    let an = a.broadcast_div(&safe.reshape((b, 1, 1))?)?;
    let aa = an.sqr()?;
    let col_sums = aa.sum(1)?; // (B, n): squared norm of each column
    let row_sums = aa.sum(2)?; // (B, n): squared norm of each row
    let i = col_sums.argmax_keepdim(1)?; // (B, 1)
    let j = row_sums.argmax_keepdim(1)?;
    let v0 = col_sums.max(1)?;
    let v1 = row_sums.max(1)?;

    // column branch: x = A[:, i]; x = xᵀA; |(x/|x|) Aᵀ|
    let ci = i
        .reshape((b, 1, 1))?
        .broadcast_as((b, n, 1))?
        .contiguous()?;
    let col = an.gather(&ci, 2)?.transpose(1, 2)?; // (B, 1, n)
    let mm = |a: &Tensor, b: &Tensor| Precision::Float32.matmul(a, b);
    let x = mm(&col, &an)?;
    let x = x.broadcast_div(&sq_norm_keepdim(&x)?.sqrt()?)?;
    let gt_val = sq_norm_keepdim(&mm(&x, &an.t()?)?)?.sqrt()?.flatten_all()?;

    // row branch: x = A[j, :]; x = A x; |Aᵀ (x/|x|)|
    let rj = j
        .reshape((b, 1, 1))?
        .broadcast_as((b, 1, n))?
        .contiguous()?;
    let row = an.gather(&rj, 1)?; // (B, 1, n)
    let x = mm(&row, &an.t()?)?; // (B, 1, n) = (A x)ᵀ
    let x = x.broadcast_div(&sq_norm_keepdim(&x)?.sqrt()?)?;
    let le_val = sq_norm_keepdim(&mm(&x, &an)?)?.sqrt()?.flatten_all()?;

    let picked = v0.gt(&v1)?.where_cond(&gt_val, &le_val)?;
    let bound = (picked * &max_abs)?;
    Ok(positive.where_cond(&bound, &max_abs)?)
}

/// `inv(A) · B` for one small square `A` (`(r, r)`, `B` `(r, k)`): Gaussian elimination
/// with partial pivoting in float64 on the host. LRA's systems are rank × rank (10 by
/// default), so the copy is a few hundred bytes; the result is float32 on `A`'s device.
pub fn solve_small(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (r, r2) = a.dims2()?;
    let (rb, k) = b.dims2()?;
    if r != r2 || rb != r {
        return Err(candle_core::Error::Msg(format!(
            "solve_small: A is {:?}, B is {:?}",
            a.dims(),
            b.dims()
        ))
        .into());
    }
    let mut m = a.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut x = b.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    for col in 0..r {
        let pivot = (col..r)
            .max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        x.swap(col, pivot);
        let (prow, xrow) = (m[col].clone(), x[col].clone());
        for row in col + 1..r {
            let f = m[row][col] / prow[col];
            if f != 0.0 {
                for (a, p) in m[row][col..].iter_mut().zip(&prow[col..]) {
                    *a -= f * p;
                }
                for (a, p) in x[row].iter_mut().zip(&xrow) {
                    *a -= f * p;
                }
            }
        }
    }
    for col in (0..r).rev() {
        let mut acc = x[col].clone();
        for j in col + 1..r {
            let mj = m[col][j];
            for (a, xj) in acc.iter_mut().zip(&x[j]) {
                *a -= mj * xj;
            }
        }
        for a in acc.iter_mut() {
            *a /= m[col][col];
        }
        x[col] = acc;
    }
    let flat: Vec<f32> = x.into_iter().flatten().map(|v| v as f32).collect();
    Ok(Tensor::from_vec(flat, (r, k), a.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, rand};
    use candle_core::Device;

    fn upper(b: usize, n: usize, seed: u64) -> Tensor {
        let mut v = Vec::with_capacity(b * n * n);
        let mut s = seed;
        for bi in 0..b {
            for r in 0..n {
                for c in 0..n {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
                    v.push(if c < r {
                        // junk below the diagonal must be ignored
                        100.0
                    } else if c == r {
                        1.0 + bi as f32 * 0.1 + u.abs()
                    } else {
                        u
                    });
                }
            }
        }
        Tensor::from_vec(v, (b, n, n), &Device::Cpu).unwrap()
    }

    #[test]
    fn triangular_solve_matches_direct_product() {
        // 300 spans several column blocks of the CPU solve
        let cases = [
            (1, 1, 1),
            (1, 5, 7),
            (3, 4, 9),
            (2, 1, 16),
            (1, 33, 33),
            // short right-hand sides are solved by substitution, tall ones in blocks
            (2, 7, 300),
            (1, 120, 300),
            (2, 40, 260),
        ];
        for &(b, r, n) in &cases {
            // off-diagonal entries shrunk by √n keep large random triangles well
            // conditioned, so the check measures the solve and not the conditioning
            let shrink: Vec<f32> = (0..n * n)
                .map(|i| {
                    if i % n > i / n {
                        1.0 / (n as f32).sqrt()
                    } else {
                        1.0
                    }
                })
                .collect();
            let shrink = Tensor::from_vec(shrink, (n, n), &Device::Cpu).unwrap();
            let a = upper(b, n, 7 + n as u64).broadcast_mul(&shrink).unwrap();
            let x = rand((b, r, n), 3 + r as u64);
            let triu = a
                .broadcast_mul(&Tensor::triu2(n, DType::F32, &Device::Cpu).unwrap())
                .unwrap();
            let xt = x
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            for y in [
                solve_triangular_right_blocked(&x, &triu).unwrap(),
                solve_triangular_right(&x, &a).unwrap(),
                // a strided (transposed) right-hand side is read in place
                solve_triangular_right(&xt, &a).unwrap(),
            ] {
                // Y A must give back X
                let back = y.matmul(&triu).unwrap();
                assert!(max_abs_diff(&back, &x) < 1e-4, "b={b} r={r} n={n}");
            }
        }
    }

    #[test]
    fn norm_lower_bound_is_a_tight_lower_bound() {
        // symmetric PSD matrices: the spectral norm is the largest eigenvalue
        let x = rand((2, 6, 10), 11);
        let m = x.matmul(&x.t().unwrap()).unwrap();
        let lb = norm_lower_bound(&m).unwrap().to_vec1::<f32>().unwrap();
        // power iteration for the true norm
        for (bi, lbv) in lb.iter().enumerate() {
            let mb = m.get(bi).unwrap();
            let mut v = Tensor::ones((6, 1), DType::F32, &Device::Cpu).unwrap();
            for _ in 0..500 {
                let w = mb.matmul(&v).unwrap();
                let nrm = w.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
                v = w.broadcast_div(&nrm).unwrap();
            }
            let norm = mb
                .matmul(&v)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(*lbv <= norm * 1.0001, "{lbv} > {norm}");
            assert!(*lbv * 2f32.sqrt() >= norm, "{lbv} too loose for {norm}");
        }
        // an all-zero matrix gives zero
        let z = Tensor::zeros((1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            norm_lower_bound(&z).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0]
        );
    }

    #[test]
    fn norm_lower_bound_picks_row_or_column_like_the_reference() {
        // a non-symmetric matrix whose largest row and largest column differ
        let a = Tensor::from_vec(
            vec![3f32, 0.0, 0.0, 4.0, 1.0, 0.0, 0.0, 0.0, 2.0],
            (1, 3, 3),
            &Device::Cpu,
        )
        .unwrap();
        let lb = norm_lower_bound(&a).unwrap().to_vec1::<f32>().unwrap()[0];
        // column 0 has squared norm 25 > largest row (17): x = A[:,0]ᵀA = [25,4,0]; |x̂ Aᵀ|
        let x = [25f32, 4.0, 0.0];
        let nx = (x[0] * x[0] + x[1] * x[1]).sqrt();
        let xa = [(x[0] * 3.0) / nx, (x[0] * 4.0 + x[1] * 1.0) / nx, 0.0];
        let expect = (xa[0] * xa[0] + xa[1] * xa[1] + xa[2] * xa[2]).sqrt();
        assert!((lb - expect).abs() < 1e-4, "{lb} vs {expect}");
    }

    #[test]
    fn symmetric_bound_and_upper_difference_match_the_dense_forms() {
        for &(b, n) in &[(1, 1), (2, 7), (1, 100), (3, 65)] {
            let x = rand((b, n, n + 3), 21 + n as u64);
            let y = rand((b, n, 2 * n), 40 + n as u64);
            let xx = x.matmul(&x.t().unwrap()).unwrap();
            let yy = y.matmul(&y.t().unwrap()).unwrap();
            let want = norm_lower_bound(&(&xx + &yy).unwrap())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // only the upper triangles may be read: wreck the lower ones
            let junk = (Tensor::tril2(n, DType::F32, &Device::Cpu).unwrap()
                - Tensor::eye(n, DType::F32, &Device::Cpu).unwrap())
            .unwrap()
                * 1e3;
            let junk = junk.unwrap();
            let (xj, yj) = (
                xx.broadcast_add(&junk).unwrap(),
                yy.broadcast_sub(&junk).unwrap(),
            );
            let got = norm_lower_bound_sym_sum(&xj, &yj)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "n={n}: {g} vs {w}"
                );
            }
            let diff = triu_difference(&xj, &yj).unwrap();
            let triu = Tensor::triu2(n, DType::F32, &Device::Cpu).unwrap();
            let want = (&xx - &yy).unwrap().broadcast_mul(&triu).unwrap();
            assert!(max_abs_diff(&diff, &want) < 1e-4, "n={n}");
        }
        let z = Tensor::zeros((2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            norm_lower_bound_sym_sum(&z, &z)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![0.0, 0.0]
        );
    }

    #[test]
    fn small_solve_matches_direct_product() {
        for &(r, k) in &[(1, 1), (3, 1), (10, 2)] {
            // diagonally weighted so it is well conditioned, but a pivot is still needed
            let a = (rand((1, r, r), 5 + r as u64).squeeze(0).unwrap()
                + (Tensor::eye(r, DType::F32, &Device::Cpu).unwrap() * 0.5).unwrap())
            .unwrap();
            let b = rand((1, r, k), 9).squeeze(0).unwrap();
            let x = solve_small(&a, &b).unwrap();
            let back = a.matmul(&x).unwrap();
            let d = max_abs_diff(&back.unsqueeze(0).unwrap(), &b.unsqueeze(0).unwrap());
            assert!(d < 1e-5, "r={r} k={k}: {d}");
        }
    }
}
