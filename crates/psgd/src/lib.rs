//! PSGD (preconditioned stochastic gradient descent) optimizers on candle tensors.
//!
//! Each optimizer is an optax-style pair of pure functions, [`Transform::init`] and
//! [`Transform::update`], over a list of leaves (a flattened parameter tree) and a plain,
//! serialisable state. [`PsgdOptimizer`] wraps any of them as a [`candle_nn::Optimizer`].
//! The numbers follow psgd-jax 0.2.9. [`Kron`] has its own step; [`XMat`] (and the other
//! global-style variants) share [`Psgd`], generic over a [`Preconditioner`].

pub mod affine;
pub mod any;
pub mod common;
pub mod conformance;
pub mod elementwise;
pub mod error;
mod json;
pub mod kron;
pub mod linalg;
pub mod lra;
mod optimizer;
pub mod precision;
pub mod random;
pub mod schedule;
pub mod state_io;
#[cfg(test)]
mod test_util;
pub mod transform;
pub mod triangular;
pub mod xmat;

pub use affine::{Affine, AffineOptions, AffineState};
pub use any::{AnyState, AnyTransform};
pub use common::{Preconditioner, Psgd, PsgdOptions, PsgdState, StepNormalizer};
pub use error::{ErrorKind, PsgdError, Result};
pub use kron::{Kron, KronOptions, KronState, MemorySaveMode, Precision};
pub use lra::{Lra, LraOptions, LraState};
pub use optimizer::PsgdOptimizer;
pub use random::{RandomSource, ReplayRandom, SeededRandom};
pub use schedule::{precond_update_prob_schedule, PrecondUpdateProbSchedule, Schedule};
pub use transform::{Curvature, LeafSpec, StepHyper};
pub use xmat::{XMat, XMatOptions, XMatState};

use candle_core::{Device, Tensor};

/// What every PSGD variant provides: an optax-style `init`/`update` pair over a fixed list
/// of leaves, with a plain state.
pub trait Transform: Sized + Send + Sync {
    /// The options struct; its `Default` matches psgd-jax's defaults.
    type Options: Clone + Default + Send + Sync;
    /// The optimizer state.
    type State: Clone + Send + Sync;

    /// Options from a JSON object with psgd-jax's snake_case keyword names.
    fn options_from_json(obj: &serde_json::Map<String, serde_json::Value>)
        -> Result<Self::Options>;
    /// An optimizer for these leaves.
    fn new(leaves: Vec<LeafSpec>, options: Self::Options) -> Result<Self>;
    /// The leaves it was built for.
    fn leaves(&self) -> &[LeafSpec];
    /// The seed of the default random source.
    fn seed(&self) -> u64;
    /// The initial state, drawing any random initial factors from `rng`; factors and
    /// momentum live on the params' device.
    fn init_with(&self, params: &[Tensor], rng: &mut dyn RandomSource) -> Result<Self::State>;

    /// The initial state, with the seeded random source (step 0).
    fn init(&self, params: &[Tensor]) -> Result<Self::State> {
        let mut rng = SeededRandom::for_step(self.seed(), 0);
        self.init_with(params, &mut rng)
    }
    /// The step count of a state.
    fn count(state: &Self::State) -> u64;
    /// This step's learning rate and update probability from the options' schedules.
    fn hyper(&self, state: &Self::State) -> StepHyper;
    /// One step with explicit hyperparameters, optional Hessian-based inputs (`None`:
    /// gradient whitening) and random source. Returns the updates (to add to the params)
    /// and the new state; `state` itself is never modified, so on error nothing is lost.
    fn update_with(
        &self,
        grads: &[Tensor],
        state: &Self::State,
        params: Option<&[Tensor]>,
        hyper: StepHyper,
        curvature: Option<&Curvature>,
        rng: &mut dyn RandomSource,
    ) -> Result<(Vec<Tensor>, Self::State)>;

    /// One step with the options' schedules and the seeded random source.
    fn update(
        &self,
        grads: &[Tensor],
        state: &Self::State,
        params: Option<&[Tensor]>,
    ) -> Result<(Vec<Tensor>, Self::State)> {
        let mut rng = SeededRandom::for_step(self.seed(), Self::count(state) + 1);
        self.update_with(grads, state, params, self.hyper(state), None, &mut rng)
    }

    /// Replaces the learning rate with a constant.
    fn set_learning_rate(&mut self, lr: f64);
    /// The learning rate the next step will use.
    fn learning_rate(&self, state: &Self::State) -> f64;
    /// The state as safetensors bytes.
    fn state_to_bytes(&self, state: &Self::State) -> Result<Vec<u8>>;
    /// A state from safetensors bytes, checked against this optimizer's leaves.
    fn state_from_bytes(&self, bytes: &[u8], device: &Device) -> Result<Self::State>;
}

/// `params + updates`, leaf by leaf (optax's `apply_updates`), in each param's dtype.
pub fn apply_updates(params: &[Tensor], updates: &[Tensor]) -> Result<Vec<Tensor>> {
    params
        .iter()
        .zip(updates)
        .map(|(p, u)| Ok((p + u.to_dtype(p.dtype())?)?))
        .collect()
}
