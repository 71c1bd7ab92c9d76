//! Matrix products that skip the known zeros of triangular operands.
//!
//! Kron's and Affine's factors `Q` are upper triangular, and most of a fit's work is
//! products with `Q`, `Qᵀ` or with a matrix of which only the upper triangle is wanted
//! (`triu(A Aᵀ − B Bᵀ)`). A dense product spends half of its multiply-adds on zeros there
//! (two thirds for `triu(T)·Q`). On the CPU these products are cut into blocks, and each
//! output block is one GEMM over only the stretch of the inner dimension where both
//! operands can be nonzero; blocks outside a triangular output are skipped.
//!
//! On other devices, and for dtypes other than float32, the product is the plain dense
//! one: every entry that is promised is still exact, only nothing is saved.
//!
//! Every CPU float32 product of the crate comes here, dense ones included
//! ([`Precision::matmul`]): candle's CPU matmul asks for the thread count on each call,
//! which without `RAYON_NUM_THREADS` set parses `/proc/cpuinfo` (measured: most of a
//! small model's step).

use crate::error::Result;
use crate::kernels::precision::Precision;
use candle_core::{DType, Device, Storage, Tensor, D};
use rayon::prelude::*;
use std::ops::Range;

/// Where a matrix can be nonzero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    /// Anywhere.
    Full,
    /// On and above the diagonal (`j ≥ i`).
    Upper,
    /// On and below the diagonal (`j ≤ i`).
    Lower,
}

impl Precision {
    /// `a · b` (batched like `Tensor::matmul`) at this precision: the dense case of
    /// `matmul_tri`. (Defined here, beside the products, so that `precision` depends on
    /// no other kernel.)
    pub fn matmul(self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        matmul_tri(a, Tri::Full, b, Tri::Full, Tri::Full, self)
    }
}

/// `a · b` for equal batch shapes. On the CPU a batch of large matrices goes one matrix at
/// a time: candle's batched CPU product parallelises each matrix less well (measured up
/// to 1.5× slower for `4 × (512×2048)·(2048×2048)`), and scanned layers are such batches.
pub(crate) fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = (a.dim(D::Minus2)?, a.dim(D::Minus1)?);
    let n = b.dim(D::Minus1)?;
    if a.rank() != 3 || !a.device().is_cpu() || a.dim(0)? < 2 || m * k * n < 1 << 24 {
        return Ok(a.matmul(b)?);
    }
    let outs = (0..a.dim(0)?)
        .map(|i| a.get(i)?.matmul(&b.get(i)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&outs, 0)?)
}

/// Products smaller than this (in multiply-adds) are not worth cutting up.
const MIN_WORK: usize = 1 << 21;

/// Products smaller than this run on the calling thread: waking the pool costs more.
const SERIAL_MAX: usize = 1 << 18;

/// Block edge along a structured axis of length `n`: about eight blocks, so the skipped
/// share of the work is close to its limit, but never so small that a GEMM call is
/// dominated by packing its operands.
fn block_size(n: usize) -> usize {
    (n.div_ceil(8).div_ceil(16) * 16).clamp(64, 512)
}

fn blocks(n: usize, bs: usize) -> Vec<Range<usize>> {
    (0..n.div_ceil(bs))
        .map(|i| i * bs..((i + 1) * bs).min(n))
        .collect()
}

/// `a · b` for batches `a` `(B, m, k)` and `b` `(B, k, n)` (or single matrices), where
/// `a` is zero outside `sa` and `b` outside `sb` (a structured operand must be square).
/// Only the entries inside `out` are promised; the others are zero or exact. Operands
/// may be strided views (a transpose costs no copy); the result is contiguous float32.
pub fn matmul_tri(
    a: &Tensor,
    sa: Tri,
    b: &Tensor,
    sb: Tri,
    out: Tri,
    p: Precision,
) -> Result<Tensor> {
    if a.rank() == 2 && b.rank() == 2 {
        let r = matmul_tri(&a.unsqueeze(0)?, sa, &b.unsqueeze(0)?, sb, out, p)?;
        return Ok(r.squeeze(0)?);
    }
    let (a, b) = (p.round(a)?, p.round(b)?);
    match host_matmul(&a, sa, &b, sb, out) {
        Some(r) => r,
        None => batched_matmul(&a, &b),
    }
}

/// Whether [`matmul_tri`] takes the blocked host path for a tensor (float32 on the CPU),
/// so callers can choose the order of products that is cheapest there.
pub fn saves_work(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// A batch of matrices in host memory: element `(b, i, j)` is at
/// `ptr + b·bs + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    bs: isize,
    rs: isize,
    cs: isize,
}

// SAFETY: a View only points into a storage whose read guard outlives every use, and it
// is only read from.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// The float32 CPU storage of a rank-3 tensor, read through its layout.
    fn of(storage: &candle_core::CpuStorage, l: &candle_core::Layout) -> Option<View> {
        let data = storage.as_slice::<f32>().ok()?;
        let s = l.stride();
        if s.len() != 3 {
            return None;
        }
        Some(View {
            // in bounds: the layout's start offset lies inside its storage
            ptr: data[l.start_offset()..].as_ptr(),
            bs: s[0] as isize,
            rs: s[1] as isize,
            cs: s[2] as isize,
        })
    }

    /// A contiguous `(B, m, n)` buffer.
    fn contiguous(data: &[f32], m: usize, n: usize) -> View {
        View {
            ptr: data.as_ptr(),
            bs: (m * n) as isize,
            rs: n as isize,
            cs: 1,
        }
    }

    /// Element `(b, i, j)`.
    ///
    /// # Safety
    /// `(b, i, j)` must be an element of the viewed batch.
    unsafe fn get(self, b: usize, i: usize, j: usize) -> f32 {
        *self.at(b, i, j).ptr
    }

    /// The sub-matrix starting at `(b, i, j)`, with the same strides.
    ///
    /// # Safety
    /// `(b, i, j)` must be an element of the viewed batch.
    unsafe fn at(self, b: usize, i: usize, j: usize) -> View {
        View {
            ptr: self
                .ptr
                .offset(b as isize * self.bs + i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }
}

/// The output pointer, shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes a block no other task touches, and the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn all_threads() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    }
}

/// `dst ← dst·[read_dst] + beta · lhs · rhs` for an `m × n × k` product; `dst` is a
/// row-major buffer `(pointer, row stride, offset)`.
///
/// # Safety
/// Every `m × k` element of `lhs`, `k × n` element of `rhs` and `m × n` element of `dst`
/// must be in bounds, and nothing else may touch that part of `dst` meanwhile.
unsafe fn gemm_at(
    (dst, dst_rs, dst_off): (OutPtr, isize, usize),
    read_dst: bool,
    lhs: View,
    rhs: View,
    (m, n, k): (usize, usize, usize),
    beta: f32,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0.add(dst_off),
        1,
        dst_rs,
        read_dst,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0f32,
        beta,
        false,
        false,
        false,
        par,
    )
}

/// One output block: batch `b`, rows `rows`, columns `cols`, inner range `inner`.
struct Task {
    b: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    inner: Range<usize>,
}

fn host_matmul(a: &Tensor, sa: Tri, b: &Tensor, sb: Tri, out: Tri) -> Option<Result<Tensor>> {
    if !saves_work(a) || !saves_work(b) || a.rank() != 3 || b.rank() != 3 {
        return None;
    }
    let (batch, m, k) = a.dims3().ok()?;
    let (batch_b, k2, n) = b.dims3().ok()?;
    if batch != batch_b
        || k != k2
        || (sa != Tri::Full && m != k)
        || (sb != Tri::Full && k != n)
        || (out != Tri::Full && m != n)
    {
        return None;
    }
    // a small product is one GEMM call: the cuts would cost more than the zeros
    let (sa, sb, out) = if m * n * k < MIN_WORK {
        (Tri::Full, Tri::Full, Tri::Full)
    } else {
        (sa, sb, out)
    };
    let (sa_guard, la) = a.storage_and_layout();
    let (sb_guard, lb) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa_guard, &*sb_guard) else {
        return None;
    };
    let (va, vb) = (View::of(ca, la)?, View::of(cb, lb)?);

    // rows (and columns) are cut at the same places wherever a square structure ties
    // them to each other or to the inner axis. An axis without structure stays whole:
    // measured, splitting it for more parallel tasks made the GEMMs slower than it
    // balanced the load.
    let row_cut = sa != Tri::Full || out != Tri::Full;
    let col_cut = sb != Tri::Full || out != Tri::Full;
    let bs = block_size(if row_cut { m } else { n });
    let threads = rayon::current_num_threads().max(1);
    let row_blocks = if row_cut {
        blocks(m, bs)
    } else {
        blocks(m, m.max(1))
    };
    let col_blocks = if col_cut {
        blocks(n, bs)
    } else {
        blocks(n, n.max(1))
    };

    let mut tasks = Vec::new();
    for bi in 0..batch {
        for rows in &row_blocks {
            for cols in &col_blocks {
                let skip = match out {
                    Tri::Full => false,
                    Tri::Upper => cols.end <= rows.start,
                    Tri::Lower => rows.end <= cols.start,
                };
                if skip {
                    continue;
                }
                // the inner stretch where a row of the block of `a` and a column of the
                // block of `b` can both be nonzero
                let mut lo = 0;
                let mut hi = k;
                match sa {
                    Tri::Upper => lo = lo.max(rows.start),
                    Tri::Lower => hi = hi.min(rows.end),
                    Tri::Full => {}
                }
                match sb {
                    Tri::Upper => hi = hi.min(cols.end),
                    Tri::Lower => lo = lo.max(cols.start),
                    Tri::Full => {}
                }
                if lo < hi {
                    tasks.push(Task {
                        b: bi,
                        rows: rows.clone(),
                        cols: cols.clone(),
                        inner: lo..hi,
                    });
                }
            }
        }
    }
    // longest first, so the last tasks to start are short ones
    tasks.sort_by_key(|t| std::cmp::Reverse(t.rows.len() * t.cols.len() * t.inner.len()));

    // Where the tasks cover every block, each GEMM overwrites its block whole, so the
    // buffer starts uninitialised: zeroing it first was a pass over the output (measured
    // about 2 % of a conv net's apply step). Skipped blocks must read as zeros.
    let len = batch * m * n;
    let covers_all = tasks.len() == batch * row_blocks.len() * col_blocks.len();
    let mut dst = if covers_all {
        Vec::with_capacity(len)
    } else {
        vec![0f32; len]
    };
    let optr = OutPtr(dst.as_mut_ptr());
    let run = |t: &Task, par: gemm::Parallelism| {
        // SAFETY: the ranges come from the dims checked above, so every element read or
        // written lies inside its matrix, and the destination block is this job's alone.
        unsafe {
            gemm_at(
                (
                    optr,
                    n as isize,
                    t.b * m * n + t.rows.start * n + t.cols.start,
                ),
                false,
                va.at(t.b, t.rows.start, t.inner.start),
                vb.at(t.b, t.inner.start, t.cols.start),
                (t.rows.len(), t.cols.len(), t.inner.len()),
                1.0,
                par,
            )
        }
    };
    if tasks.len() >= 2 * threads {
        tasks
            .par_iter()
            .for_each(|t| run(t, gemm::Parallelism::None));
    } else {
        let par = if m * n * k < SERIAL_MAX {
            gemm::Parallelism::None
        } else {
            all_threads()
        };
        tasks.iter().for_each(|t| run(t, par));
    }
    drop((sa_guard, sb_guard));
    if covers_all {
        // SAFETY: every block of the output was written by its task's GEMM (which does
        // not read the destination: `read_dst` is false), and the blocks tile `0..len`.
        unsafe { dst.set_len(len) };
    }
    Some(Tensor::from_vec(dst, (batch, m, n), &Device::Cpu).map_err(Into::into))
}

/// Columns per block of the CPU triangular solve: wide enough for the GEMMs to run at
/// speed, narrow enough that inverting the diagonal blocks costs little.
const SOLVE_BLOCK: usize = 128;

/// Elements per task when a block of the right-hand side is copied out.
const SOLVE_COPY: usize = 1 << 14;

/// `X · A⁻¹` for `x` `(B, R, n)` and upper-triangular `a` `(B, n, n)` (its lower triangle
/// is never read), when both are float32 on the CPU; `None` otherwise.
///
/// Column blocks left to right: `Y_J = (X_J − Y_<J · A_<J,J) · A_JJ⁻¹`. The diagonal
/// blocks are inverted first (by substitution, in float64), so both steps of every block
/// are GEMMs and a substitution never runs over the `R` rows.
pub fn solve_right_cpu(x: &Tensor, a: &Tensor) -> Option<Result<Tensor>> {
    if !saves_work(x) || !saves_work(a) || x.rank() != 3 || a.rank() != 3 {
        return None;
    }
    let (batch, r, n) = x.dims3().ok()?;
    if a.dims() != [batch, n, n] {
        return None;
    }
    let (gx, lx) = x.storage_and_layout();
    let (ga, la) = a.storage_and_layout();
    let (Storage::Cpu(cx), Storage::Cpu(ca)) = (&*gx, &*ga) else {
        return None;
    };
    let (vx, va) = (View::of(cx, lx)?, View::of(ca, la)?);
    if substitution_pays(r, n) {
        let y = solve_by_substitution(vx, va, batch, r, n);
        drop((gx, ga));
        return Some(Tensor::from_vec(y, (batch, r, n), &Device::Cpu).map_err(Into::into));
    }
    let cols = blocks(n, SOLVE_BLOCK);
    let jobs: Vec<(usize, &Range<usize>)> = (0..batch)
        .flat_map(|b| cols.iter().map(move |c| (b, c)))
        .collect();
    let inverses: Vec<Vec<f32>> = jobs
        .par_iter()
        // SAFETY: the block lies inside matrix `b` of `a`, whose dims were checked.
        .map(|&(b, c)| {
            invert_upper(c.len(), |i, j| unsafe {
                va.get(b, c.start + i, c.start + j)
            })
        })
        .collect();

    let mut y = vec![0f32; batch * r * n];
    let mut t = vec![0f32; r * SOLVE_BLOCK.min(n)];
    let par = all_threads();
    for b in 0..batch {
        for (ci, c) in cols.iter().enumerate() {
            let w = c.len();
            let tb = &mut t[..r * w];
            // whole runs of rows per task: a narrow block has only a few columns per row
            let rows_per_task = (SOLVE_COPY / w).max(1);
            tb.par_chunks_mut(w * rows_per_task)
                .enumerate()
                .for_each(|(task, out)| {
                    for (k, o) in out.iter_mut().enumerate() {
                        let (row, j) = (task * rows_per_task + k / w, k % w);
                        // SAFETY: row < r and c.start + j < n
                        *o = unsafe { vx.get(b, row, c.start + j) };
                    }
                });
            let tptr = OutPtr(tb.as_mut_ptr());
            let yv = View::contiguous(&y, r, n);
            // SAFETY: all ranges are inside the (batch, r, n) buffers and the (w, w)
            // inverse; each product writes a buffer the other operands do not alias.
            unsafe {
                if c.start > 0 {
                    gemm_at(
                        (tptr, w as isize, 0),
                        true,
                        yv.at(b, 0, 0),
                        va.at(b, 0, c.start),
                        (r, w, c.start),
                        -1.0,
                        par,
                    );
                }
                let inv = View::contiguous(&inverses[b * cols.len() + ci], w, w);
                gemm_at(
                    (OutPtr(y.as_mut_ptr()), n as isize, b * r * n + c.start),
                    false,
                    View::contiguous(tb, r, w),
                    inv,
                    (r, w, w),
                    1.0,
                    par,
                );
            }
        }
    }
    drop((gx, ga));
    Some(Tensor::from_vec(y, (batch, r, n), &Device::Cpu).map_err(Into::into))
}

/// Whether a right-hand side of `r` rows is solved faster by plain substitution than by
/// inverting the diagonal blocks: inverting costs about `n·w²/3` multiply-adds (`w` the
/// block width) whatever `r` is, substitution `r·n²/2`. A short right-hand side (a leaf
/// like 10×512, whose factor on the long side is solved for 10 rows) spent most of its
/// solve on the inverses: 3.05 ms here against 0.33 ms in faer, which substitutes.
fn substitution_pays(r: usize, n: usize) -> bool {
    let w = SOLVE_BLOCK.min(n);
    3 * r * n < 2 * w * w
}

/// `X · A⁻¹` row by row: `y_j = (x_j − Σ_{k<j} y_k A_kj) / A_jj`, as updates of the
/// row's remainder by the rows of `A` (contiguous when `A` is), rows in parallel.
fn solve_by_substitution(vx: View, va: View, batch: usize, r: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; batch * r * n];
    if n == 0 {
        return y;
    }
    y.par_chunks_mut(n).enumerate().for_each(|(k, row)| {
        let (b, i) = (k / r, k % r);
        for (j, o) in row.iter_mut().enumerate() {
            // SAFETY: (b, i, j) is an element of x, checked (batch, r, n) by the caller
            *o = unsafe { vx.get(b, i, j) };
        }
        for j in 0..n {
            // SAFETY: (b, j, l) with j ≤ l < n is an element of a, checked (batch, n, n)
            let yj = row[j] / unsafe { va.get(b, j, j) };
            row[j] = yj;
            let a_row = unsafe { va.at(b, j, 0) };
            if a_row.cs == 1 {
                // SAFETY: row j of a is n contiguous elements
                let a_row = unsafe { std::slice::from_raw_parts(a_row.ptr, n) };
                for (t, &ajl) in row[j + 1..].iter_mut().zip(&a_row[j + 1..]) {
                    *t -= yj * ajl;
                }
            } else {
                for (l, t) in row.iter_mut().enumerate().skip(j + 1) {
                    // SAFETY: as above
                    *t -= yj * unsafe { a_row.get(0, 0, l) };
                }
            }
        }
    });
    y
}

/// The inverse of the `s × s` upper-triangular matrix with entries `u(i, j)` (`j ≥ i`),
/// row-major, by back substitution one column at a time in float64.
fn invert_upper(s: usize, u: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    let m: Vec<f64> = (0..s * s)
        .map(|k| {
            let (i, j) = (k / s, k % s);
            if j >= i {
                u(i, j) as f64
            } else {
                0.0
            }
        })
        .collect();
    let mut inv = vec![0f64; s * s];
    for j in 0..s {
        inv[j * s + j] = 1.0 / m[j * s + j];
        for i in (0..j).rev() {
            let acc: f64 = (i + 1..=j).map(|k| m[i * s + k] * inv[k * s + j]).sum();
            inv[i * s + j] = -acc / m[i * s + i];
        }
    }
    inv.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, rand};

    fn mask(t: &Tensor, s: Tri) -> Tensor {
        let n = t.dim(2).unwrap();
        let m = match s {
            Tri::Full => return t.clone(),
            Tri::Upper => Tensor::triu2(n, DType::F32, &Device::Cpu).unwrap(),
            Tri::Lower => Tensor::tril2(n, DType::F32, &Device::Cpu).unwrap(),
        };
        t.broadcast_mul(&m).unwrap()
    }

    #[test]
    fn structured_products_match_dense_ones_where_promised() {
        use Tri::*;
        let cases = [
            // (batch, m, k, n, sa, sb, out)
            (1, 700, 300, 300, Full, Lower, Full),
            (2, 300, 300, 500, Upper, Full, Full),
            (1, 300, 300, 300, Upper, Upper, Upper),
            (2, 257, 333, 257, Full, Full, Upper),
            (1, 300, 300, 300, Lower, Upper, Full),
            (1, 129, 129, 640, Lower, Full, Full),
            (3, 200, 200, 200, Full, Full, Lower),
            (1, 8, 8, 8, Upper, Upper, Upper),
            // dense ones, small (one call on this thread) and empty
            (3, 5, 7, 2, Full, Full, Full),
            (2, 4, 0, 3, Full, Full, Full),
            (2, 600, 600, 64, Full, Full, Full),
        ];
        for (i, &(bt, m, k, n, sa, sb, out)) in cases.iter().enumerate() {
            let a = mask(&rand((bt, m, k), 1 + i as u64), sa);
            let b = mask(&rand((bt, k, n), 50 + i as u64), sb);
            let dense = a.matmul(&b).unwrap();
            let got = matmul_tri(&a, sa, &b, sb, out, Precision::Float32).unwrap();
            let want = mask(&dense, out);
            let d = max_abs_diff(&mask(&got, out), &want);
            assert!(d < 1e-4, "case {i}: {d}");
            // outside the promised triangle an entry is zero or exact
            let outside = (&got - &mask(&got, out)).unwrap();
            let dense_outside = (&dense - &want).unwrap();
            let bad = outside
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .zip(
                    dense_outside
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
                .filter(|(g, d)| **g != 0.0 && (**g - d).abs() > 1e-4)
                .count();
            assert_eq!(bad, 0, "case {i}");
        }
    }

    #[test]
    fn strided_operands_are_read_in_place() {
        // aᵀ · qᵀ with both operands transposed views
        let a = rand((2, 400, 300), 3);
        let q = mask(&rand((2, 400, 400), 4), Tri::Upper);
        let at = a.transpose(1, 2).unwrap();
        let qt = q.transpose(1, 2).unwrap();
        let got = matmul_tri(
            &at,
            Tri::Full,
            &qt,
            Tri::Lower,
            Tri::Full,
            Precision::Float32,
        )
        .unwrap();
        let want = at
            .contiguous()
            .unwrap()
            .matmul(&qt.contiguous().unwrap())
            .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4);
    }
}
