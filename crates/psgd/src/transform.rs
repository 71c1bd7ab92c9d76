//! The optax-style interface every optimizer has: [`Transform`], a pure `init`/`update`
//! pair over a fixed list of leaves and a plain state, and the types its calls take.
//! It is implemented once, generically, by [`crate::step::Psgd`]; state I/O lives in
//! [`crate::state_io`] and option parsing in [`crate::options`].

use crate::error::Result;
use crate::random::{RandomSource, SeededRandom};
use candle_core::Tensor;

/// What the optimizer knows about one leaf of the parameter tree.
#[derive(Debug, Clone, PartialEq)]
pub struct LeafSpec {
    /// The leaf's path (e.g. `layers.0.weight`), used in error messages.
    pub path: String,
    /// The leaf's shape.
    pub shape: Vec<usize>,
    /// Whether the leading axis is a stack of layers, each with its own preconditioner.
    pub scanned: bool,
    /// Whether weight decay applies to this leaf (the weight-decay mask).
    pub weight_decay: bool,
}

impl LeafSpec {
    /// An unscanned leaf with weight decay on (the reference's default mask).
    pub fn new(path: impl Into<String>, shape: &[usize]) -> Self {
        LeafSpec {
            path: path.into(),
            shape: shape.to_vec(),
            scanned: false,
            weight_decay: true,
        }
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The hyperparameters of one step, after evaluating any schedules.
#[derive(Debug, Clone, Copy)]
pub struct StepHyper {
    /// The learning rate for this step.
    pub learning_rate: f64,
    /// The preconditioner update probability for this step.
    pub update_probability: f64,
    /// The preconditioner step size for this step; `None` takes the options' value (or
    /// schedule). Kron's is a constant option and ignores this.
    pub precond_lr: Option<f64>,
}

impl StepHyper {
    /// A learning rate and update probability, with the options' preconditioner step size.
    pub fn new(learning_rate: f64, update_probability: f64) -> Self {
        StepHyper {
            learning_rate,
            update_probability,
            precond_lr: None,
        }
    }
}

/// The Hessian-based inputs of one step (psgd-jax's `Hvp`, `vector` and
/// `update_preconditioner`), one tensor per leaf. Without them a variant fits its
/// preconditioner by gradient whitening.
#[derive(Debug, Clone)]
pub struct Curvature {
    /// The Hessian-vector products `H·v`.
    pub hvp: Vec<Tensor>,
    /// The probe vectors `v`.
    pub vector: Vec<Tensor>,
    /// Whether to update the preconditioner this step.
    pub update_preconditioner: bool,
}

/// What every PSGD variant provides: an optax-style `init`/`update` pair over a fixed list
/// of leaves, with a plain state.
pub trait Transform: Sized + Send + Sync {
    /// The options struct; its `Default` matches psgd-jax's defaults.
    type Options: crate::options::Options;
    /// The optimizer state.
    type State: Clone + Send + Sync;

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
}

/// `params + updates`, leaf by leaf (optax's `apply_updates`), in each param's dtype.
pub fn apply_updates(params: &[Tensor], updates: &[Tensor]) -> Result<Vec<Tensor>> {
    params
        .iter()
        .zip(updates)
        .map(|(p, u)| Ok((p + u.to_dtype(p.dtype())?)?))
        .collect()
}
