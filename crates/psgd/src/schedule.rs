//! Learning-rate and update-probability schedules: a constant or a function of the step.

use std::fmt;
use std::sync::Arc;

/// A hyperparameter that is either constant or a function of the step count.
#[derive(Clone)]
pub enum Schedule {
    /// The same value every step.
    Constant(f64),
    /// `f(step)`; which step count is passed is documented where the schedule is used.
    Fn(Arc<dyn Fn(u64) -> f64 + Send + Sync>),
}

impl Schedule {
    /// The value at `step`.
    pub fn at(&self, step: u64) -> f64 {
        match self {
            Schedule::Constant(v) => *v,
            Schedule::Fn(f) => f(step),
        }
    }

    /// A schedule from a closure.
    pub fn from_fn(f: impl Fn(u64) -> f64 + Send + Sync + 'static) -> Self {
        Schedule::Fn(Arc::new(f))
    }
}

impl From<f64> for Schedule {
    fn from(v: f64) -> Self {
        Schedule::Constant(v)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Constant(v) => write!(f, "Constant({v})"),
            Schedule::Fn(_) => write!(f, "Fn(..)"),
        }
    }
}

/// Parameters of psgd-jax's `precond_update_prob_schedule`.
#[derive(Debug, Clone, Copy)]
pub struct PrecondUpdateProbSchedule {
    pub max_prob: f64,
    pub min_prob: f64,
    pub decay: f64,
    pub flat_start: f64,
}

impl Default for PrecondUpdateProbSchedule {
    fn default() -> Self {
        PrecondUpdateProbSchedule {
            max_prob: 1.0,
            min_prob: 0.03,
            decay: 0.001,
            flat_start: 500.0,
        }
    }
}

impl PrecondUpdateProbSchedule {
    /// The probability at step `n`: an exponential anneal after a flat start, computed in
    /// float32 as the reference does so that the update counter flips on the same steps.
    pub fn at(&self, n: u64) -> f64 {
        let x = (-(self.decay as f32) * (n as f32 - self.flat_start as f32)).exp();
        let p = (self.max_prob as f32 * x)
            .max(self.min_prob as f32)
            .min(self.max_prob as f32);
        p as f64
    }

    /// As a [`Schedule`].
    pub fn schedule(self) -> Schedule {
        Schedule::from_fn(move |n| self.at(n))
    }
}

/// psgd-jax's default update-probability schedule (1.0 for 500 steps, then down to 0.03).
pub fn precond_update_prob_schedule() -> Schedule {
    PrecondUpdateProbSchedule::default().schedule()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_shape() {
        let s = PrecondUpdateProbSchedule::default();
        assert_eq!(s.at(1), 1.0);
        assert_eq!(s.at(500), 1.0);
        assert!((s.at(1500) - (-1.0f64).exp()).abs() < 1e-6);
        assert!((s.at(100_000) - 0.03).abs() < 1e-7);
    }
}
