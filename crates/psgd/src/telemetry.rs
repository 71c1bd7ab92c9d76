//! What a step tells about itself: [`Telemetry`], kept in the state by every step (never
//! saved), and [`StepStats`], what [`crate::Psgd::stats`] reads from it when asked. A
//! step measures only what it already has at hand: the fit decision, the sums of
//! squares the CPU finish takes in its one pass (elsewhere 0-d tensors nobody reads until
//! asked) and the time of its stages; the factors' values are read from the state.

use crate::error::Result;
use crate::kernels::fused::{Clip, FinishSums, Measured};
use candle_core::{DType, Tensor};

/// Weight of the previous whitening estimate at each fit: an exponential average over
/// about the last ten fits.
pub const WHITENING_BETA: f64 = 0.9;

/// What the fit stage reports besides the fitted preconditioner (a variant's own values,
/// such as Kron's normalisers, travel in the fitted state itself).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FitTelemetry {
    /// Wall time of the fit, in milliseconds.
    pub ms: f64,
}

/// A fitted preconditioner and what its fit reports: the fit stage's whole output.
#[derive(Debug, Clone)]
pub struct Fitted<S> {
    /// The fitted preconditioner.
    pub state: S,
    /// What the fit reports.
    pub telemetry: FitTelemetry,
    /// What the health guard did at the fit (`onUnhealthy`; nothing under `'throw'`).
    pub health: crate::guard::StepHealth,
}

/// Wall time of one step's stages, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    /// The preconditioner's fit (0 on a step that does not fit).
    pub fit_ms: f64,
    /// Preconditioning and the finish (clip, weight decay, learning rate).
    pub apply_ms: f64,
    /// The whole step: the rest is checks, the update decision and the momentum.
    pub total_ms: f64,
}

/// What the last step left for [`StepStats`], kept in the state (never saved).
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    /// Whether the last step fitted the preconditioner.
    pub fitted: bool,
    /// Fits since the state was made or loaded.
    pub fits: u64,
    /// Per leaf, the last step's sums (empty before a step).
    pub leaves: Vec<FinishSums>,
    /// Per leaf, the whitening estimate: the average of the preconditioned gradient's RMS
    /// over the fitting steps (empty before a fit).
    pub whitening: Vec<Measured>,
    /// Whether what the step preconditions is what its fit saw (see
    /// [`StepStats::whitening_on_fit_input`]).
    pub whitening_on_fit_input: bool,
    /// The clip the last step ran.
    pub clip: Option<Clip>,
    /// The last step's time split.
    pub times: StepTimes,
}

impl Telemetry {
    /// The telemetry after a step that follows `prev`.
    pub fn next(
        prev: &Telemetry,
        fitted: bool,
        sums: Vec<FinishSums>,
        sizes: &[usize],
        clip: Clip,
        on_fit_input: bool,
        times: StepTimes,
    ) -> Result<Telemetry> {
        let whitening = if fitted {
            let rms = sums
                .iter()
                .zip(sizes)
                .map(|(s, &n)| s.pre_sq.rms(n))
                .collect::<Result<Vec<_>>>()?;
            if prev.whitening.len() == rms.len() {
                prev.whitening
                    .iter()
                    .zip(&rms)
                    .map(|(w, x)| w.ema(x, WHITENING_BETA))
                    .collect::<Result<Vec<_>>>()?
            } else {
                rms
            }
        } else {
            prev.whitening.clone()
        };
        Ok(Telemetry {
            fitted,
            fits: prev.fits + fitted as u64,
            leaves: sums,
            whitening,
            whitening_on_fit_input: on_fit_input,
            clip: Some(clip),
            times,
        })
    }

    /// Reads what the step left (the only device reads of the telemetry).
    pub fn read(
        &self,
        count: u64,
        paths: &[String],
        sizes: &[usize],
        factors: Vec<FactorStats>,
    ) -> Result<StepStats> {
        let whitening = self
            .whitening
            .iter()
            .map(Measured::read)
            .collect::<Result<Vec<_>>>()?;
        let read = |f: fn(&FinishSums) -> &Measured| -> Result<Vec<f64>> {
            self.leaves.iter().map(|s| f(s).read()).collect()
        };
        let pre_sq = read(|s| &s.pre_sq)?;
        let pre_max = read(|s| &s.pre_max)?;
        let upd_sq = read(|s| &s.update_sq)?;
        let stepped = !self.leaves.is_empty();
        let global = match self.clip {
            Some(Clip::GlobalNorm(c)) => Some(pre_sq.iter().sum::<f64>().sqrt() > c),
            _ => None,
        };
        let rms = |sq: f64, n: usize| (sq / n.max(1) as f64).sqrt();
        let leaves = paths
            .iter()
            .enumerate()
            .map(|(l, path)| {
                let n = sizes[l];
                let at = |v: &[f64]| v.get(l).copied().filter(|_| stepped);
                let clipped = at(&pre_sq).map(|sq| {
                    let pre_rms = rms(sq, n);
                    match self.clip {
                        Some(Clip::Update { rms: cap, element }) => {
                            let div = cap.map_or(1.0, |c| (pre_rms / c).max(1.0));
                            cap.is_some_and(|c| pre_rms > c)
                                || element.is_some_and(|e| pre_max[l] / div > e)
                        }
                        Some(Clip::GlobalNorm(_)) => global.unwrap_or(false),
                        _ => false,
                    }
                });
                LeafStats {
                    path: path.clone(),
                    size: n,
                    pre_rms: at(&pre_sq).map(|sq| rms(sq, n)),
                    update_rms: at(&upd_sq).map(|sq| rms(sq, n)),
                    clipped,
                    whitening: whitening.get(l).copied(),
                    resets: 0,
                    dropped: 0,
                }
            })
            .collect::<Vec<_>>();
        // the tree's whitening: the RMS over all its elements
        let total: usize = sizes.iter().sum();
        let tree_whitening = (whitening.len() == sizes.len() && total > 0).then(|| {
            let sq: f64 = whitening
                .iter()
                .zip(sizes)
                .map(|(w, &n)| w * w * n as f64)
                .sum();
            (sq / total as f64).sqrt()
        });
        Ok(StepStats {
            count,
            fitted: self.fitted,
            fits: self.fits,
            leaves,
            factors,
            whitening: tree_whitening,
            whitening_on_fit_input: self.whitening_on_fit_input,
            clip: self.clip.map_or("none", clip_name).to_string(),
            times: stepped.then_some(self.times),
            skipped: 0,
        })
    }
}

/// The configured clip's name in [`StepStats::clip`].
fn clip_name(c: Clip) -> &'static str {
    match c {
        Clip::None
        | Clip::Update {
            rms: None,
            element: None,
        } => "none",
        Clip::Update {
            rms: Some(_),
            element: None,
        } => "rms",
        Clip::Update {
            rms: None,
            element: Some(_),
        } => "element",
        Clip::Update {
            rms: Some(_),
            element: Some(_),
        } => "rms+element",
        Clip::GlobalNorm(_) => "globalNorm",
    }
}

/// [`FactorStats::path`] of a preconditioner over the whole tree (XMat's, LRA's).
pub const WHOLE_TREE: &str = "*";

/// One factor of a leaf's preconditioner, as [`StepStats`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorStats {
    /// The path of the leaf (Kron under `mergeDims` / `blockSize`: of the part; XMat and
    /// LRA, whose one preconditioner spans the tree: [`WHOLE_TREE`]).
    pub path: String,
    /// Which factor of the leaf (Kron: the axis; Affine: 0 left, 1 right; XMat and LRA
    /// have one, over the whole tree).
    pub factor: usize,
    /// `max|diag| / min|diag|` of the factor (the largest over stacked layers or blocks):
    /// its condition number when it is diagonal, a lower bound on it when it is
    /// triangular, and a rough estimate for a dense one (Kron's inverse-free rules; XMat's
    /// diagonal `a`, LRA's `d`). Infinite when a diagonal entry is 0.
    pub condition: f64,
    /// The normaliser of the factor's fit step (the largest over stacked layers or
    /// blocks): Kron's running Lipschitz bound `L` as the state holds it (0 before its
    /// first fit); under Kron's EQ without one, XMat and Affine the last fit's own
    /// normaliser (`None` before a fit and after a load); `None` for LRA, whose fit has
    /// one per update direction.
    pub normaliser: Option<f64>,
}

impl FactorStats {
    /// The one factor of a preconditioner over the whole tree whose diagonal is `diag`
    /// (XMat's `a`, LRA's `d`), with its last fit's normaliser where the fit keeps one.
    pub fn whole_tree(diag: &Tensor, norm: Option<&Tensor>) -> Result<Vec<FactorStats>> {
        Ok(vec![FactorStats {
            path: WHOLE_TREE.into(),
            factor: 0,
            condition: diagonal_ratio(&diag.flatten_all()?, false)?,
            normaliser: norm.map(largest).transpose()?,
        }])
    }
}

/// One leaf in [`StepStats`]; the step's values are `None` before a step.
#[derive(Debug, Clone, PartialEq)]
pub struct LeafStats {
    /// The leaf's path.
    pub path: String,
    /// Its number of elements.
    pub size: usize,
    /// RMS of the preconditioned gradient `P·m` before the clip.
    pub pre_rms: Option<f64>,
    /// RMS of the update the step returned (what was added to the param).
    pub update_rms: Option<f64>,
    /// Whether the clip changed the update (the RMS cap, the element clamp or the global
    /// norm).
    pub clipped: Option<bool>,
    /// The average of [`LeafStats::pre_rms`] over the recent fitting steps.
    pub whitening: Option<f64>,
    /// Times the health guard reset the factors that precondition this leaf to their
    /// initial scale (`onUnhealthy: 'reset'`), since the state was made or loaded.
    pub resets: u64,
    /// Fits the health guard dropped for this leaf (`onUnhealthy: 'skip'`), since the
    /// state was made or loaded.
    pub dropped: u64,
}

/// What the last step did and how the preconditioner stands, per leaf and factor.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Steps taken.
    pub count: u64,
    /// Whether the last step fitted the preconditioner.
    pub fitted: bool,
    /// Fits since the state was made or loaded.
    pub fits: u64,
    /// Per leaf.
    pub leaves: Vec<LeafStats>,
    /// Per factor.
    pub factors: Vec<FactorStats>,
    /// The leaves' whitening estimates as one RMS over the whole tree; `None` before a fit.
    pub whitening: Option<f64>,
    /// Whether the preconditioned gradient is `P·h` for the fit's own input `h` (the fit
    /// sees the momentum, or there is none, and no Hessian-vector products): the whitening
    /// estimate's target is then 1.
    pub whitening_on_fit_input: bool,
    /// The clip the step runs: `'none'`, `'rms'`, `'element'`, `'rms+element'` or
    /// `'globalNorm'`.
    pub clip: String,
    /// The last step's time split; `None` before a step.
    pub times: Option<StepTimes>,
    /// Steps whose updates the health guard made zero because they would have held NaN
    /// or Inf (`onUnhealthy: 'reset' | 'skip'`), since the state was made or loaded.
    pub skipped: u64,
}

/// `max|diag| / min|diag|` of a factor: `q` a diagonal `(…, d)` or with `dense` a square
/// `(…, d, d)`, the largest ratio over any leading (stacked) axes: the health guard's
/// estimate ([`crate::guard::diag_condition`]), read back. Infinite when a diagonal entry
/// is 0, NaN when an entry is not finite; 1 for an empty factor.
pub fn diagonal_ratio(q: &Tensor, dense: bool) -> Result<f64> {
    if q.elem_count() == 0 {
        return Ok(1.0);
    }
    let c = crate::guard::diag_condition(q, dense)?;
    Ok(c.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The largest entry of a normaliser `(B,)` (or of any shape), as [`FactorStats`] reports
/// it.
pub fn largest(t: &Tensor) -> Result<f64> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x)))
}
