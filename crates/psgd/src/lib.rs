//! PSGD (preconditioned stochastic gradient descent) optimizers on candle tensors.
//!
//! Each optimizer is an optax-style pair of pure functions, [`Transform::init`] and
//! [`Transform::update`], over a list of leaves (a flattened parameter tree) and a plain,
//! serialisable state. [`PsgdOptimizer`] wraps any of them as a [`candle_nn::Optimizer`].
//! The numbers follow psgd-jax 0.2.9.
//!
//! The layers, top to bottom: [`Transform`] (the interface) is implemented once by
//! [`Psgd`], the step every variant runs ([`step`]: update decision, momentum, fit,
//! apply, then the finish chain of `stages`); a variant is a [`Preconditioner`] plus its
//! options, declared once ([`options`]); the preconditioners call the hot operations of
//! the kernel layer (`kernels`), each with a CPU host path and a candle-op path for
//! the other devices.

pub mod any;
pub mod codegen;
pub mod error;
pub mod guard;
pub mod hessian;
mod kernels;
pub mod limits;
mod optimizer;
pub mod options;
pub mod random;
pub mod schedule;
mod stages;
pub mod state_io;
pub mod step;
pub mod telemetry;
#[cfg(test)]
mod test_util;
pub mod transform;
pub mod variants;

pub(crate) use variants::common;
pub use variants::{affine, kron, lra, xmat};

pub use affine::{Affine, AffineOptions, AffineState};
pub use any::{AnyState, AnyTransform};
pub use error::{ErrorKind, PsgdError, Result};
pub use kernels::fused::{Clip, Warmup as MomentumWarmup};
pub use kernels::precision::Precision;
pub use kron::{
    kron_presets, BalanceWhen, InitScaleScope, Kron, KronOptions, KronPreset, KronState,
    KronUpdateDecision, MemorySaveMode, NormEstimator, UpdateRule,
};
pub use lra::{Lra, LraOptions, LraState};
pub use optimizer::PsgdOptimizer;
pub use options::Options;
pub use random::{RandomSource, ReplayRandom, SeededRandom};
pub use schedule::{precond_update_prob_schedule, PrecondUpdateProbSchedule, Schedule};
pub use step::{Preconditioner, Psgd, PsgdState, StepNormalizer};
pub use transform::{apply_updates, Curvature, LeafSpec, StepHyper, Transform};
pub use xmat::{XMat, XMatOptions, XMatState};
