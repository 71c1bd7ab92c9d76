//! The health guard (`onUnhealthy`, `maxCondition`): what a step does when a preconditioner
//! factor turns non-finite or ill-conditioned, or when its updates would hold NaN or Inf.
//!
//! Under `'throw'` (the default) nothing here runs: a step whose updates would hold NaN or
//! Inf fails and changes nothing. Under `'reset'` and `'skip'` every fit is followed by a
//! health check of the factors it made ([`Preconditioner::conditions`]); a leaf whose
//! factors fail it has them reset to their initial scale (`'reset'`) or keeps the factors
//! it had before the fit (`'skip'`). A step whose updates would hold NaN or Inf makes zero
//! updates and keeps its momentum (`'skip'`: and its preconditioner; `'reset'`: the
//! factors at fault are reset). The counts of what the guard did live in the state
//! ([`GuardCounts`]).
//!
//! [`Preconditioner::conditions`]: crate::step::Preconditioner::conditions

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// What a step does when the preconditioner turns unhealthy (`onUnhealthy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnhealthy {
    /// `'throw'` (default): a step whose updates would hold NaN or Inf fails with a
    /// `RangeError` and changes nothing; the factors are not checked.
    #[default]
    Throw,
    /// `'reset'`: a leaf whose fitted factors are non-finite or ill-conditioned gets its
    /// factors back at their initial scale; a step whose updates would hold NaN or Inf
    /// resets the factors at fault and makes zero updates.
    Reset,
    /// `'skip'`: the fit that made a leaf's factors unhealthy is dropped for that leaf; a
    /// step whose updates would hold NaN or Inf makes zero updates and keeps its momentum
    /// and preconditioner.
    Skip,
}

impl crate::options::Choice for OnUnhealthy {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("throw", OnUnhealthy::Throw),
        ("reset", OnUnhealthy::Reset),
        ("skip", OnUnhealthy::Skip),
    ];
}
crate::options::choice_option!(OnUnhealthy, "'throw' | 'reset' | 'skip'");

/// The default `maxCondition`: see the option's doc in the declarations.
pub const DEFAULT_MAX_CONDITION: f64 = 1e6;

/// `maxCondition`: `null` or a finite number > 1.
pub fn check_max_condition(v: &Option<f64>) -> std::result::Result<(), String> {
    match v {
        Some(c) if !(c.is_finite() && *c > 1.0) => {
            Err(format!("must be a finite number > 1 or null, got {c}"))
        }
        _ => Ok(()),
    }
}

/// What the health guard did so far, kept in the state ([`crate::step::PsgdState`]) for
/// telemetry. Not saved in state files: a loaded state starts from zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardCounts {
    /// Per leaf: how many times the factors that precondition it were reset to their
    /// initial scale (`'reset'`). XMat and LRA precondition every leaf with one
    /// preconditioner, so a reset counts on every leaf.
    pub resets: Vec<u64>,
    /// Per leaf: how many fits were dropped because they made its factors unhealthy
    /// (`'skip'`).
    pub dropped: Vec<u64>,
    /// Steps whose updates would have held NaN or Inf and were made zero instead
    /// (`'reset'` and `'skip'`; the step is still counted).
    pub skipped: u64,
}

impl GuardCounts {
    /// Zero counts for `leaves` leaves.
    pub fn new(leaves: usize) -> Self {
        GuardCounts {
            resets: vec![0; leaves],
            dropped: vec![0; leaves],
            skipped: 0,
        }
    }

    /// These counts plus what one step did.
    pub(crate) fn after(&self, step: &StepHealth) -> Self {
        let add = |n: u64, b: bool| n + u64::from(b);
        GuardCounts {
            resets: leafwise(&self.resets, &step.reset, add),
            dropped: leafwise(&self.dropped, &step.dropped, add),
            skipped: self.skipped + u64::from(step.skipped),
        }
    }
}

/// `f(a[i], b[i])` leaf by leaf over the longer of the two lists (a missing item is its
/// type's default: 0, false).
fn leafwise<A: Copy + Default, B: Copy + Default, C>(
    a: &[A],
    b: &[B],
    f: impl Fn(A, B) -> C,
) -> Vec<C> {
    (0..a.len().max(b.len()))
        .map(|i| {
            f(
                a.get(i).copied().unwrap_or_default(),
                b.get(i).copied().unwrap_or_default(),
            )
        })
        .collect()
}

/// What the guard did in one step: per leaf whether its factors were reset or its fit
/// dropped, and whether the step's updates were made zero. The fit stage returns the
/// first two (so a fit run elsewhere carries them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepHealth {
    /// Per leaf: reset to the initial scale (empty: none).
    pub reset: Vec<bool>,
    /// Per leaf: this step's fit dropped (empty: none).
    pub dropped: Vec<bool>,
    /// The updates were made zero.
    pub skipped: bool,
}

impl StepHealth {
    /// Both records of `self` and `other`, leaf by leaf.
    pub(crate) fn and(self, other: StepHealth) -> Self {
        let or = |x: bool, y: bool| x | y;
        StepHealth {
            reset: leafwise(&self.reset, &other.reset, or),
            dropped: leafwise(&self.dropped, &other.dropped, or),
            skipped: self.skipped | other.skipped,
        }
    }
}

/// Whether a condition estimate `c` (NaN or Inf for a non-finite factor) fails the bound.
pub fn unhealthy(c: f64, max_condition: Option<f64>) -> bool {
    !c.is_finite() || max_condition.is_some_and(|m| c > m)
}

/// A 0-d float32 tensor that is 0 when `t` is finite and NaN when any element is NaN or
/// ±Inf (or when its absolute sum overflows float32, which no healthy factor reaches).
pub fn finite_probe(t: &Tensor) -> Result<Tensor> {
    Ok((t.to_dtype(DType::F32)?.abs()?.sum_all()? * 0.0)?)
}

/// The condition estimate of a factor as a 0-d float32 tensor: per matrix of the batch,
/// `max|diag| / min|diag|` (of its entries when `dense` is false: a diagonal factor),
/// the largest over the batch; NaN when any entry is non-finite. `q` is `(…, d, d)` when
/// dense, `(…, d)` when diagonal. For a triangular factor (Kron's EQ rule, Affine) this is
/// a lower bound of its condition number; for a full factor (Kron's inverse-free rules) a
/// cheap estimate of it.
pub fn diag_condition(q: &Tensor, dense: bool) -> Result<Tensor> {
    let q32 = q.to_dtype(DType::F32)?;
    let dims = q32.dims().to_vec();
    let d = *dims.last().unwrap_or(&1);
    let diag = if dense {
        let b: usize = dims[..dims.len().saturating_sub(2)].iter().product();
        let m = q32.reshape((b, d, d))?;
        let eye = Tensor::eye(d, DType::F32, q.device())?.unsqueeze(0)?;
        m.broadcast_mul(&eye)?.sum(2)?
    } else {
        let b: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        q32.reshape((b, d))?
    }
    .abs()?;
    let ratio = (diag.max(1)? / diag.min(1)?)?.max(0)?;
    Ok((ratio + finite_probe(&q32)?)?)
}

/// Per group, the largest of its 0-d estimates read back at once (NaN and ±Inf give
/// +Inf; an empty group 1).
pub fn read_groups(groups: Vec<Vec<Tensor>>) -> Result<Vec<f64>> {
    let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    let all: Vec<Tensor> = groups.into_iter().flatten().collect();
    let values: Vec<f32> = if all.is_empty() {
        vec![]
    } else {
        Tensor::stack(&all, 0)?.to_device(&Device::Cpu)?.to_vec1()?
    };
    let mut at = 0;
    Ok(sizes
        .iter()
        .map(|&n| {
            let v = values[at..at + n].iter().fold(1f64, |m, &x| {
                let x = if x.is_finite() {
                    x as f64
                } else {
                    f64::INFINITY
                };
                m.max(x)
            });
            at += n;
            v
        })
        .collect())
}

/// `state`'s items with those marked in `which` replaced by `from`'s (a per-leaf
/// preconditioner's [`crate::step::Preconditioner::take_leaves`]).
pub fn take_marked<T: Clone>(state: Vec<T>, from: &[T], which: &[bool]) -> Vec<T> {
    state
        .into_iter()
        .enumerate()
        .map(|(i, s)| match which.get(i) {
            Some(true) => from[i].clone(),
            _ => s,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diag_condition_of_diagonal_dense_and_broken_factors() {
        let dev = Device::Cpu;
        let read = |t: Tensor| t.to_scalar::<f32>().unwrap();
        let v = Tensor::new(&[2f32, -8., 4.], &dev).unwrap();
        assert_eq!(read(diag_condition(&v, false).unwrap()), 4.0);
        // dense upper-triangular: the diagonal only
        let m = Tensor::new(&[[1f32, 100.], [0., 0.5]], &dev).unwrap();
        assert_eq!(read(diag_condition(&m, true).unwrap()), 2.0);
        // batched (B, d): the worst of the batch
        let b = Tensor::new(&[[1f32, 1.], [1., 10.]], &dev).unwrap();
        assert_eq!(read(diag_condition(&b, false).unwrap()), 10.0);
        let nan = Tensor::new(&[[1f32, f32::NAN], [0., 1.]], &dev).unwrap();
        assert!(read(diag_condition(&nan, true).unwrap()).is_nan());
        let groups = vec![
            vec![diag_condition(&v, false).unwrap()],
            vec![
                diag_condition(&nan, true).unwrap(),
                diag_condition(&m, true).unwrap(),
            ],
            vec![],
        ];
        assert_eq!(read_groups(groups).unwrap(), vec![4.0, f64::INFINITY, 1.0]);
    }

    #[test]
    fn the_bound_and_the_counts() {
        assert!(unhealthy(f64::INFINITY, None));
        assert!(!unhealthy(1e30, None));
        assert!(unhealthy(2e6, Some(1e6)) && !unhealthy(1e6, Some(1e6)));
        assert!(check_max_condition(&Some(1.0)).is_err());
        assert!(check_max_condition(&Some(f64::INFINITY)).is_err());
        assert!(check_max_condition(&None).is_ok() && check_max_condition(&Some(10.0)).is_ok());
        let c = GuardCounts::new(2);
        let step = StepHealth {
            reset: vec![false, true],
            dropped: vec![],
            skipped: true,
        }
        .and(StepHealth {
            reset: vec![true],
            dropped: vec![false, true],
            skipped: false,
        });
        let c = c.after(&step).after(&step);
        assert_eq!(c.resets, vec![2, 2]);
        assert_eq!(c.dropped, vec![0, 2]);
        assert_eq!(c.skipped, 2);
    }
}
