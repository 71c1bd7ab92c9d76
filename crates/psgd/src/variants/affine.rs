//! PSGD Affine: each leaf reshaped to a matrix `G` (as psgd-jax does) and preconditioned
//! as `Qlᵀ·Ql·G·Qrᵀ·Qr`, with each side upper-triangular or diagonal by size and skew,
//! as psgd-jax 0.2.9's `affine` / `scale_by_affine`.
//!
//! The whitening fit is psgd-jax's "drop v" math: when a side is diagonal and the matrix is
//! not skewed against it, the probe vector is integrated out analytically; otherwise a
//! probe is drawn and the Hessian-mode fit is used with the gradient as `H·v`.

use crate::common::{add_eps, global_init_scale, psgd_options};
use crate::error::{PsgdError, Result};
use crate::kernels::linalg::{
    factor_gram, norm_lower_bound, norm_lower_bound_sym_sum, solve_triangular_right,
    triu_difference,
};
use crate::kernels::precision::Precision;
use crate::kernels::triangular::{matmul_tri, Tri};
use crate::limits::StateSize;
use crate::random::RandomSource;
use crate::state_io::{LoadedState, StateFile};
use crate::step::{FitInputs, Preconditioner, Psgd, PsgdState, StepNormalizer};
use crate::telemetry::{diagonal_ratio, largest, FactorStats};
use crate::transform::LeafSpec;
use candle_core::{DType, Device, Tensor};

/// PSGD Affine (see the module docs).
pub type Affine = Psgd<AffinePreconditioner>;
/// State of [`Affine`].
pub type AffineState = PsgdState<Vec<AffineFactors>>;

psgd_options! {
    /// Options of [`Affine`]: psgd-jax 0.2.9's `affine` arguments (camelCase in JSON), with
    /// its defaults.
    AffineOptions, "affine", zero_clip_disables: false, {
        /// A side of the matrix longer than this gets a diagonal factor. Default 4096.
        max_size_triangular: usize = 4096;
        /// A side more than this many times longer than the other gets a diagonal factor.
        /// Default 128.
        max_skew_triangular: usize = 128;
    }
}

/// The left and right factors of one leaf: `(n, n)` upper-triangular or `(n,)` diagonal.
#[derive(Debug, Clone)]
pub struct AffineFactors {
    /// Left factor (rows of the matrix).
    pub ql: Tensor,
    /// Right factor (columns).
    pub qr: Tensor,
    /// Derived, never saved: `QlᵀQl` (`Ql²` when diagonal), what applying needs.
    pub pl: Tensor,
    /// Derived, never saved: `QrᵀQr` (`Qr²` when diagonal).
    pub pr: Tensor,
    /// Never saved, for the telemetry: the step normaliser of each side's last fit (left,
    /// right), float32 scalars; `None` before a fit and after a load.
    pub norms: Option<[Tensor; 2]>,
}

impl AffineFactors {
    /// The factors with their products for applying (`pl`, `pr`) computed in float32.
    pub fn new(ql: Tensor, qr: Tensor) -> Result<Self> {
        let gram = |q: &Tensor| factor_gram(q, is_dense(q), Precision::Float32);
        Ok(AffineFactors {
            pl: gram(&ql)?,
            pr: gram(&qr)?,
            ql,
            qr,
            norms: None,
        })
    }
}

/// How a leaf becomes a matrix: permute its axes by `perm` (identity: none) and reshape.
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixShape {
    /// The axis permutation applied first.
    pub perm: Vec<usize>,
    /// The permuted shape.
    pub permuted: Vec<usize>,
    /// The matrix shape `(rows, cols)`.
    pub rows: usize,
    /// See `rows`.
    pub cols: usize,
}

fn prod(s: &[usize]) -> usize {
    s.iter().product()
}

/// Calls `f` on every permutation of `0..n` in the order psgd-jax's recursive generator
/// yields them (lexicographic in positions), so ties in the size criterion resolve the
/// same way. One at a time: a list of all of them is `n!` vectors (rank 11: 40 M).
fn for_each_permutation(n: usize, f: &mut impl FnMut(&[usize])) {
    fn go(rest: &mut Vec<usize>, prefix: &mut Vec<usize>, f: &mut impl FnMut(&[usize])) {
        if rest.is_empty() {
            f(prefix);
            return;
        }
        for i in 0..rest.len() {
            let x = rest.remove(i);
            prefix.push(x);
            go(rest, prefix, f);
            prefix.pop();
            rest.insert(i, x);
        }
    }
    go(&mut (0..n).collect(), &mut Vec::with_capacity(n), f);
}

/// The highest leaf rank Affine takes: the search below visits every axis permutation
/// (10! = 3.6 M, a fraction of a second; each rank more multiplies that by the rank).
pub const MAX_RANK: usize = 10;

/// psgd-jax's `_shape_as_matrix`: scalars and vectors become one row, matrices stay, and
/// higher-rank tensors take the permutation and split minimising `rows² + cols²`.
/// Sizes are compared in `u128`, so no shape of addressable size overflows.
pub fn shape_as_matrix(shape: &[usize]) -> MatrixShape {
    let identity: Vec<usize> = (0..shape.len()).collect();
    match shape.len() {
        2 => MatrixShape {
            perm: identity,
            permuted: shape.to_vec(),
            rows: shape[0],
            cols: shape[1],
        },
        0 | 1 => MatrixShape {
            perm: identity,
            permuted: shape.to_vec(),
            rows: 1,
            cols: prod(shape),
        },
        _ => {
            let mut best: (u128, Vec<usize>, usize) = (u128::MAX, identity.clone(), 1);
            for_each_permutation(shape.len(), &mut |p| {
                let dims: Vec<u128> = p.iter().map(|&j| shape[j] as u128).collect();
                for i in 1..dims.len() {
                    let rows: u128 = dims[..i].iter().product();
                    let cols: u128 = dims[i..].iter().product();
                    let size = rows
                        .saturating_mul(rows)
                        .saturating_add(cols.saturating_mul(cols));
                    if size < best.0 {
                        best = (size, p.to_vec(), i);
                    }
                }
            });
            let (_, perm, i) = best;
            let permuted: Vec<usize> = perm.iter().map(|&j| shape[j]).collect();
            MatrixShape {
                rows: prod(&permuted[..i]),
                cols: prod(&permuted[i..]),
                perm,
                permuted,
            }
        }
    }
}

impl MatrixShape {
    fn is_identity(&self) -> bool {
        self.perm.iter().enumerate().all(|(i, &p)| i == p)
    }

    fn leaf_to_matrix(&self, t: &Tensor) -> Result<Tensor> {
        let t = if self.is_identity() {
            t.clone()
        } else {
            t.permute(self.perm.as_slice())?.contiguous()?
        };
        Ok(t.reshape((self.rows, self.cols))?)
    }

    fn matrix_to_leaf(&self, m: &Tensor, shape: &[usize]) -> Result<Tensor> {
        if self.is_identity() {
            return Ok(m.reshape(shape)?);
        }
        let mut inverse = vec![0; self.perm.len()];
        for (i, &p) in self.perm.iter().enumerate() {
            inverse[p] = i;
        }
        Ok(m.reshape(self.permuted.as_slice())?
            .permute(inverse.as_slice())?
            .contiguous()?)
    }
}

/// The Affine preconditioner for a fixed list of leaves.
#[derive(Debug, Clone)]
pub struct AffinePreconditioner {
    leaves: Vec<LeafSpec>,
    shapes: Vec<MatrixShape>,
    /// Per leaf: whether the left and the right factor are triangular (else diagonal).
    dense: Vec<(bool, bool)>,
}

/// psgd-jax's `_initQ` rule for one side of length `s` against the other side `t`.
fn triangular(s: usize, t: usize, o: &AffineOptions) -> bool {
    !(s < 2 || s > o.max_size_triangular || s > o.max_skew_triangular.saturating_mul(t))
}

fn is_dense(q: &Tensor) -> bool {
    q.rank() == 2
}

fn max_all(t: &Tensor) -> Result<Tensor> {
    Ok(t.flatten_all()?.max(0)?)
}

fn sq_sum(t: &Tensor, axis: usize) -> Result<Tensor> {
    Ok(t.sqr()?.sum(axis)?)
}

fn nlb(a: &Tensor) -> Result<Tensor> {
    Ok(norm_lower_bound(&a.unsqueeze(0)?)?.squeeze(0)?)
}

/// `X · A⁻¹` for one upper-triangular `A`.
fn solve_right(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    Ok(solve_triangular_right(&x.unsqueeze(0)?, &a.unsqueeze(0)?)?.squeeze(0)?)
}

/// `A⁻ᵀ · X` for one upper-triangular `A` (a lower-triangular left solve), as `(Xᵀ A⁻¹)ᵀ`.
fn solve_left_transposed(a: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(solve_right(&x.t()?, a)?.t()?)
}

/// `Q · X` for an upper-triangular `Q`.
fn left_q(q: &Tensor, x: &Tensor, p: Precision) -> Result<Tensor> {
    matmul_tri(q, Tri::Upper, x, Tri::Full, Tri::Full, p)
}

/// `X · Qᵀ` for an upper-triangular `Q`.
fn right_qt(x: &Tensor, q: &Tensor, p: Precision) -> Result<Tensor> {
    matmul_tri(x, Tri::Full, &q.t()?, Tri::Lower, Tri::Full, p)
}

/// `x · xᵀ` (or `xᵀ · x` with `transposed`), of which only the upper triangle is used.
fn gram_upper(x: &Tensor, transposed: bool, p: Precision) -> Result<Tensor> {
    let (l, r) = if transposed {
        (x.t()?, x.clone())
    } else {
        (x.clone(), x.t()?)
    };
    matmul_tri(&l, Tri::Full, &r, Tri::Full, Tri::Upper, p)
}

fn col(q: &Tensor) -> Result<Tensor> {
    Ok(q.unsqueeze(1)?)
}

fn row(q: &Tensor) -> Result<Tensor> {
    Ok(q.unsqueeze(0)?)
}

/// A leaf fit's random draws, taken from the source in psgd-jax's order before the fits
/// run (so the leaves can be fitted in parallel with the same numbers).
struct LeafDraws {
    /// The whitening fit's probe, where no closed form applies ([`whitening_needs_probe`]).
    probe: Option<Tensor>,
    /// Whether this fit rebalances the two factors (a 1 % draw).
    rebalance: bool,
}

impl LeafDraws {
    /// The draws of one leaf's fit: the probe first (when `probe_shape` is given), then
    /// the rebalancing draw, as the reference takes them.
    fn take(
        rng: &mut dyn RandomSource,
        probe_shape: Option<[usize; 2]>,
        device: &Device,
    ) -> Result<Self> {
        let probe = probe_shape.map(|s| rng.normal(&s, device)).transpose()?;
        Ok(LeafDraws {
            probe,
            rebalance: rng.uniform()? < 0.01,
        })
    }
}

/// The rebalancing of the two factors' largest entries (on 1 % of fits).
fn balance(ql: Tensor, qr: Tensor, rebalance: bool) -> Result<(Tensor, Tensor)> {
    if rebalance {
        let rho = (max_all(&ql.abs()?)? / max_all(&qr.abs()?)?)?.sqrt()?;
        return Ok((ql.broadcast_div(&rho)?, qr.broadcast_mul(&rho)?));
    }
    Ok((ql, qr))
}

/// One side's step `Q − (lr / max(denom, eps))·grad·Q` (triangular) or `… grad∘Q`
/// (diagonal).
fn descend(q: &Tensor, (grad, denom): (Tensor, Tensor), inputs: &FitInputs) -> Result<Tensor> {
    let delta = if is_dense(q) {
        matmul_tri(
            &grad,
            Tri::Upper,
            q,
            Tri::Upper,
            Tri::Upper,
            inputs.precision,
        )?
    } else {
        (grad * q)?
    };
    let step = (add_eps(&denom)?.recip()? * inputs.precond_lr)?;
    Ok((q - delta.broadcast_mul(&step)?)?)
}

/// One side's gradient and step denominator from its two quadratic terms `aa` (from
/// `A`) and `bb` (from `B`): a triangular side keeps the upper triangle and is normalised
/// by the norm lower bound, a diagonal side by the largest entry ('2nd' uses `aa + bb`,
/// '1st' the gradient itself). A triangular side's terms are symmetric and only their
/// upper triangles are read.
fn side(aa: Tensor, bb: Tensor, dense: bool, second: bool) -> Result<(Tensor, Tensor)> {
    Ok(if dense {
        let g = triu_difference(&aa, &bb)?;
        let s = if second {
            norm_lower_bound_sym_sum(&aa.unsqueeze(0)?, &bb.unsqueeze(0)?)?.squeeze(0)?
        } else {
            nlb(&g)?
        };
        (g, s)
    } else {
        let diff = (&aa - &bb)?;
        let s = if second {
            max_all(&(aa + bb)?)?
        } else {
            max_all(&diff.abs()?)?
        };
        (diff, s)
    })
}

/// A fit's new sides and the normaliser of each side's step.
type FitSides = ((Tensor, Tensor), [Tensor; 2]);

/// Both sides' gradients and steps from their quadratic terms, then the update.
fn fit_sides(
    ql: &Tensor,
    qr: &Tensor,
    [aa1, bb1, aa2, bb2]: [Tensor; 4],
    inputs: &FitInputs,
    rebalance: bool,
) -> Result<FitSides> {
    let second = inputs.normalizer == StepNormalizer::Second;
    let (gl, sl) = side(aa1, bb1, is_dense(ql), second)?;
    let (gr, sr) = side(aa2, bb2, is_dense(qr), second)?;
    let ql = descend(ql, (gl, sl.clone()), inputs)?;
    let qr = descend(qr, (gr, sr.clone()), inputs)?;
    Ok((balance(ql, qr, rebalance)?, [sl, sr]))
}

/// psgd-jax's `_update_precond_affine_math_`: the fit to a pair `(dX, dG) = (v, H·v)`.
fn fit_with_vector(
    ql: &Tensor,
    qr: &Tensor,
    dx: &Tensor,
    dg: &Tensor,
    inputs: &FitInputs,
    rebalance: bool,
) -> Result<FitSides> {
    let p = inputs.precision;
    let terms = match (is_dense(ql), is_dense(qr)) {
        (true, true) => {
            let a = right_qt(&left_q(ql, dg, p)?, qr, p)?;
            let bh = solve_left_transposed(ql, &solve_right(dx, qr)?)?;
            [
                gram_upper(&a, false, p)?,
                gram_upper(&bh, false, p)?,
                gram_upper(&a, true, p)?,
                gram_upper(&bh, true, p)?,
            ]
        }
        (true, false) => {
            let a = left_q(ql, &dg.broadcast_mul(&row(qr)?)?, p)?;
            let bh = solve_left_transposed(ql, &dx.broadcast_div(&row(qr)?)?)?;
            [
                gram_upper(&a, false, p)?,
                gram_upper(&bh, false, p)?,
                sq_sum(&a, 0)?,
                sq_sum(&bh, 0)?,
            ]
        }
        (false, true) => {
            let a = right_qt(&dg.broadcast_mul(&col(ql)?)?, qr, p)?;
            let bh = solve_right(dx, qr)?.broadcast_div(&col(ql)?)?;
            [
                sq_sum(&a, 1)?,
                sq_sum(&bh, 1)?,
                gram_upper(&a, true, p)?,
                gram_upper(&bh, true, p)?,
            ]
        }
        (false, false) => {
            let a = dg.broadcast_mul(&col(ql)?)?.broadcast_mul(&row(qr)?)?;
            let bh = dx.broadcast_div(&row(qr)?)?.broadcast_div(&col(ql)?)?;
            [
                sq_sum(&a, 1)?,
                sq_sum(&bh, 1)?,
                sq_sum(&a, 0)?,
                sq_sum(&bh, 0)?,
            ]
        }
    };
    fit_sides(ql, qr, terms, inputs, rebalance)
}

/// `(Q⁻¹)ᵀ·Q⁻¹` of a triangular side.
fn inv_qq(q: &Tensor, p: Precision) -> Result<Tensor> {
    let n = q.dim(0)?;
    let inv = solve_right(&Tensor::eye(n, DType::F32, q.device())?, q)?;
    matmul_tri(&inv.t()?, Tri::Lower, &inv, Tri::Upper, Tri::Full, p)
}

fn trace(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(0)?;
    Ok((t * Tensor::eye(n, DType::F32, t.device())?)?.sum_all()?)
}

/// Whether the whitening fit of an `m×n` leaf with these sides has no closed form and
/// draws a probe: both sides triangular, or the diagonal side the shorter one.
fn whitening_needs_probe(left_dense: bool, right_dense: bool, m: usize, n: usize) -> bool {
    match (left_dense, right_dense) {
        (false, false) => false,
        (false, true) => m < n,
        (true, false) => n < m,
        (true, true) => true,
    }
}

/// psgd-jax's `_update_precond_affine_dropv_math`: the whitening fit to a gradient `dG`,
/// with the probe integrated out where a side is diagonal and the shape allows it.
fn fit_whitening(
    ql: &Tensor,
    qr: &Tensor,
    dg: &Tensor,
    inputs: &FitInputs,
    draws: &LeafDraws,
) -> Result<FitSides> {
    let p = inputs.precision;
    let (m, n) = dg.dims2()?;
    if whitening_needs_probe(is_dense(ql), is_dense(qr), m, n) {
        // no closed form here: fit to the probe as with a Hessian-vector product
        let v = draws.probe.as_ref().ok_or_else(|| {
            PsgdError::State("affine: the whitening fit's probe was not drawn".into())
        })?;
        return fit_with_vector(ql, qr, v, dg, inputs, draws.rebalance);
    }
    let terms = match (is_dense(ql), is_dense(qr)) {
        (false, false) => {
            let a = dg.broadcast_mul(&col(ql)?)?.broadcast_mul(&row(qr)?)?;
            let (iql, iqr) = (ql.sqr()?.recip()?, qr.sqr()?.recip()?);
            [
                sq_sum(&a, 1)?,
                iql.broadcast_mul(&iqr.sum_all()?)?,
                sq_sum(&a, 0)?,
                iqr.broadcast_mul(&iql.sum_all()?)?,
            ]
        }
        (false, true) => {
            let a = right_qt(&dg.broadcast_mul(&col(ql)?)?, qr, p)?;
            let iql = ql.sqr()?.recip()?;
            let iqqr = inv_qq(qr, p)?;
            [
                sq_sum(&a, 1)?,
                iql.broadcast_mul(&trace(&iqqr)?)?,
                gram_upper(&a, true, p)?,
                iqqr.broadcast_mul(&iql.sum_all()?)?,
            ]
        }
        (true, false) => {
            let a = left_q(ql, &dg.broadcast_mul(&row(qr)?)?, p)?;
            let iqql = inv_qq(ql, p)?;
            let iqr = qr.sqr()?.recip()?;
            [
                gram_upper(&a, false, p)?,
                iqql.broadcast_mul(&iqr.sum_all()?)?,
                sq_sum(&a, 0)?,
                iqr.broadcast_mul(&trace(&iqql)?)?,
            ]
        }
        (true, true) => {
            return Err(PsgdError::State(
                "affine: two triangular sides have no closed-form whitening fit".into(),
            ))
        }
    };
    fit_sides(ql, qr, terms, inputs, draws.rebalance)
}

impl Preconditioner for AffinePreconditioner {
    const NAME: &'static str = "affine";
    const WHITENING_VECTOR: bool = false;
    const FIT_ON_POOL: bool = true;
    type Options = AffineOptions;
    type State = Vec<AffineFactors>;

    fn new(leaves: &[LeafSpec], o: &AffineOptions) -> Result<Self> {
        for l in leaves {
            // a 0-size axis gives an empty factor, which the fit cannot normalise
            if l.shape.contains(&0) {
                return Err(PsgdError::Size(format!(
                    "params '{}' has shape {:?}: affine needs every dim to be at least 1",
                    l.path, l.shape
                )));
            }
            if l.shape.len() > MAX_RANK {
                return Err(PsgdError::Size(format!(
                    "params '{}' has rank {} (shape {:?}); affine takes leaves of rank up to \
                     {MAX_RANK} (reshape it first)",
                    l.path,
                    l.shape.len(),
                    l.shape
                )));
            }
        }
        let shapes: Vec<MatrixShape> = leaves.iter().map(|l| shape_as_matrix(&l.shape)).collect();
        let dense = shapes
            .iter()
            .map(|s| (triangular(s.rows, s.cols, o), triangular(s.cols, s.rows, o)))
            .collect();
        Ok(AffinePreconditioner {
            leaves: leaves.to_vec(),
            shapes,
            dense,
        })
    }

    fn state_sizes(&self) -> Vec<StateSize> {
        let mut out = vec![];
        for ((leaf, s), &(dl, dr)) in self.leaves.iter().zip(&self.shapes).zip(&self.dense) {
            for (side, n, dense) in [("left", s.rows, dl), ("right", s.cols, dr)] {
                let n = n as u128;
                out.push(StateSize {
                    what: format!(
                        "the {side} factor of leaf '{}' ({})",
                        leaf.path,
                        if dense {
                            format!("a {n}×{n} matrix")
                        } else {
                            format!("{n} values")
                        }
                    ),
                    option: dense.then_some("maxSizeTriangular"),
                    // a dense factor keeps its Gram matrix next to it
                    elems: if dense { 2 * n * n } else { 2 * n },
                });
            }
        }
        out
    }

    fn init(&self, device: &Device, _rng: &mut dyn RandomSource) -> Result<Vec<AffineFactors>> {
        let side = |n: usize, dense: bool| -> Result<Tensor> {
            Ok(if dense {
                Tensor::eye(n, DType::F32, device)?
            } else {
                Tensor::ones(n, DType::F32, device)?
            })
        };
        self.shapes
            .iter()
            .zip(&self.dense)
            .map(|(s, &(dl, dr))| AffineFactors::new(side(s.rows, dl)?, side(s.cols, dr)?))
            .collect()
    }

    fn update(
        &self,
        st: &Vec<AffineFactors>,
        inputs: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<Vec<AffineFactors>> {
        let vectors = match (inputs.hessian, inputs.vectors) {
            (true, Some(v)) => Some(v),
            (true, None) => {
                return Err(PsgdError::State(
                    "affine: the Hessian fit needs probe vectors".into(),
                ))
            }
            _ => None,
        };
        let draws = st
            .iter()
            .zip(&self.shapes)
            .enumerate()
            .map(|(l, (f, shape))| {
                let (m, n) = (shape.rows, shape.cols);
                let probe = vectors.is_none()
                    && whitening_needs_probe(is_dense(&f.ql), is_dense(&f.qr), m, n);
                LeafDraws::take(rng, probe.then_some([m, n]), inputs.hvps[l].device())
            })
            .collect::<Result<Vec<_>>>()?;
        crate::stages::map_leaves(&self.leaves, |l| {
            let (f, shape) = (&st[l], &self.shapes[l]);
            let h = shape.leaf_to_matrix(&inputs.hvps[l])?;
            let v = vectors.map(|vs| shape.leaf_to_matrix(&vs[l])).transpose()?;
            let (mut ql, mut qr) = (f.ql.clone(), f.qr.clone());
            if inputs.first {
                // XMat's scale, per leaf: each factor takes its square root so that
                // Ql ⊗ Qr starts where XMat's single Q would
                let s = global_init_scale(inputs, v.as_ref(), &h)?.sqrt()?;
                ql = ql.broadcast_mul(&s)?;
                qr = qr.broadcast_mul(&s)?;
            }
            let ((ql, qr), norms) = match &v {
                Some(v) => fit_with_vector(&ql, &qr, v, &h, inputs, draws[l].rebalance)?,
                None => fit_whitening(&ql, &qr, &h, inputs, &draws[l])?,
            };
            Ok(AffineFactors {
                norms: Some(norms),
                ..AffineFactors::new(ql, qr)?
            })
        })
    }

    fn apply(&self, st: &Vec<AffineFactors>, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        // outside the fit psgd-jax uses the default (float32 on CPU) matmul precision
        st.iter()
            .zip(&self.shapes)
            .zip(grads.iter().zip(&self.leaves))
            .map(|((f, shape), (g, leaf))| {
                let g = shape.leaf_to_matrix(g)?;
                let left = if is_dense(&f.pl) {
                    Precision::Float32.matmul(&f.pl, &g)?
                } else {
                    g.broadcast_mul(&col(&f.pl)?)?
                };
                let out = if is_dense(&f.pr) {
                    Precision::Float32.matmul(&left, &f.pr)?
                } else {
                    left.broadcast_mul(&row(&f.pr)?)?
                };
                shape.matrix_to_leaf(&out, &leaf.shape)
            })
            .collect()
    }

    fn save(&self, st: &Vec<AffineFactors>, f: &mut StateFile) {
        for (l, q) in st.iter().enumerate() {
            f.tensor(format!("Ql.{l}"), &q.ql);
            f.tensor(format!("Qr.{l}"), &q.qr);
        }
    }

    fn load(&self, f: &mut LoadedState) -> Result<Vec<AffineFactors>> {
        (0..self.leaves.len())
            .map(|l| {
                AffineFactors::new(
                    f.take_factor(&format!("Ql.{l}"))?,
                    f.take_factor(&format!("Qr.{l}"))?,
                )
            })
            .collect()
    }

    fn factor_stats(&self, st: &Vec<AffineFactors>) -> Result<Vec<FactorStats>> {
        let mut out = vec![];
        for (leaf, f) in self.leaves.iter().zip(st) {
            for (factor, q) in [&f.ql, &f.qr].into_iter().enumerate() {
                let norm = f.norms.as_ref().map(|n| &n[factor]);
                out.push(FactorStats {
                    path: leaf.path.clone(),
                    factor,
                    condition: diagonal_ratio(q, is_dense(q))?,
                    normaliser: norm.map(largest).transpose()?,
                });
            }
        }
        Ok(out)
    }

    /// Per leaf, the larger condition estimate of its left and right factor.
    fn conditions(&self, st: &Vec<AffineFactors>) -> Result<Vec<f64>> {
        let groups = st
            .iter()
            .map(|f| {
                [&f.ql, &f.qr]
                    .into_iter()
                    .map(|q| crate::guard::diag_condition(q, is_dense(q)))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        crate::guard::read_groups(groups)
    }

    fn take_leaves(
        &self,
        st: Vec<AffineFactors>,
        from: &Vec<AffineFactors>,
        which: &[bool],
    ) -> Result<Vec<AffineFactors>> {
        Ok(crate::guard::take_marked(st, from, which))
    }

    fn check(&self, st: &Vec<AffineFactors>) -> Result<()> {
        if st.len() != self.leaves.len() {
            return Err(PsgdError::State(format!(
                "affine state has {} leaves, expected {}",
                st.len(),
                self.leaves.len()
            )));
        }
        for ((f, s), (&(dl, dr), leaf)) in st
            .iter()
            .zip(&self.shapes)
            .zip(self.dense.iter().zip(&self.leaves))
        {
            let want = |n: usize, dense: bool| if dense { vec![n, n] } else { vec![n] };
            for (name, q, w) in [
                ("Ql", &f.ql, want(s.rows, dl)),
                ("Qr", &f.qr, want(s.cols, dr)),
                ("Pl (derived QlᵀQl)", &f.pl, want(s.rows, dl)),
                ("Pr (derived QrᵀQr)", &f.pr, want(s.cols, dr)),
            ] {
                if q.dims() != w.as_slice() {
                    return Err(PsgdError::State(format!(
                        "affine factor {name} of '{}' has shape {:?}, expected {w:?}",
                        leaf.path,
                        q.dims()
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_as_matrix_follows_the_reference() {
        let m = |s: &[usize]| {
            let r = shape_as_matrix(s);
            (r.perm, r.rows, r.cols)
        };
        assert_eq!(m(&[]), (vec![], 1, 1));
        assert_eq!(m(&[5]), (vec![0], 1, 5));
        assert_eq!(m(&[4, 3]), (vec![0, 1], 4, 3));
        // [2, 3, 4]: splits 2|12 (148), 6|4 (52); permuted 3,2|4... best is 6×4 as is
        assert_eq!(m(&[2, 3, 4]), (vec![0, 1, 2], 6, 4));
        // [4, 3, 2]: 4|6 (52) with no permutation
        assert_eq!(m(&[4, 3, 2]), (vec![0, 1, 2], 4, 6));
        // [2, 8, 2]: a permutation is needed for 4|8 (80) instead of 2|16 or 16|2 (260)
        let r = shape_as_matrix(&[2, 8, 2]);
        assert_eq!((r.rows * r.cols, r.rows.pow(2) + r.cols.pow(2)), (32, 80));
        assert_ne!(r.perm, vec![0, 1, 2]);
    }

    #[test]
    fn permutations_come_in_the_reference_generator_order() {
        // psgd-jax's recursive generator, as a list
        fn reference(items: &[usize]) -> Vec<Vec<usize>> {
            if items.len() <= 1 {
                return vec![items.to_vec()];
            }
            let mut out = vec![];
            for i in 0..items.len() {
                let mut rest = items.to_vec();
                let first = rest.remove(i);
                for mut q in reference(&rest) {
                    q.insert(0, first);
                    out.push(q);
                }
            }
            out
        }
        for n in 0..6 {
            let mut got = vec![];
            for_each_permutation(n, &mut |p| got.push(p.to_vec()));
            let want = reference(&(0..n).collect::<Vec<_>>());
            assert_eq!(got, if n == 0 { vec![vec![]] } else { want });
        }
    }

    #[test]
    fn leaves_of_too_high_rank_or_with_an_empty_axis_are_refused_by_name() {
        let o = AffineOptions::default();
        let ten = LeafSpec::new("ok", &[1; MAX_RANK]);
        AffinePreconditioner::new(std::slice::from_ref(&ten), &o).unwrap();
        for (shape, want) in [
            (vec![1; MAX_RANK + 1], "rank 11"),
            (vec![3, 0], "at least 1"),
        ] {
            let e = AffinePreconditioner::new(&[LeafSpec::new("x", &shape)], &o).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Range);
            assert!(
                e.to_string().contains("params 'x'") && e.to_string().contains(want),
                "{e}"
            );
        }
    }

    #[test]
    fn matrix_round_trip_restores_the_tensor() {
        let shape = [2usize, 8, 2];
        let t = Tensor::arange(0f32, 32., &Device::Cpu)
            .unwrap()
            .reshape(&shape[..])
            .unwrap();
        let s = shape_as_matrix(&shape);
        let m = s.leaf_to_matrix(&t).unwrap();
        let back = s.matrix_to_leaf(&m, &shape).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
