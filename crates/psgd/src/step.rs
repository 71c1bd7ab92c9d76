//! The one optimizer step every variant runs, as psgd-jax 0.2.9 chains it:
//! `scale_by_<variant>` (update decision, momentum, preconditioner fit, preconditioning,
//! clip), then decoupled weight decay, then the learning rate. A variant only provides its
//! [`Preconditioner`] (how it is initialised, fitted, applied and saved) and its options;
//! where the variants differ in the step itself, the difference is a policy read from the
//! options ([`StepOptions`]): the update decision (Kron's deterministic counter or a
//! random draw or a cumulative count), what the whitening fit sees (the momentum or the raw
//! gradient), whether the fit comes before or after the preconditioning, the momentum's
//! warm-up, the clip (per-leaf RMS and element clamp, global norm, none) and Nesterov
//! momentum.
//!
//! The random draws of a step, in order: the update decision's draw (under a random
//! decision), the whitening probes of XMat and LRA (drawn, or skipped, after the decision),
//! then the fit's own draws (Kron's and Affine's, inside [`Preconditioner::update`]). The
//! apply and the finish draw nothing, so the order is the same whether the fit comes
//! before the preconditioning or after it (`updatePreconditionerFirst`).

use crate::error::{PsgdError, Result};
use crate::guard::{GuardCounts, OnUnhealthy, StepHealth};
use crate::kernels::fused::{self, Clip};
use crate::kernels::precision::Precision;
use crate::limits::{self, StateSize};
use crate::options::Options;
use crate::random::RandomSource;
use crate::schedule::Schedule;
use crate::stages;
use crate::state_io::{LoadedState, StateFile};
use crate::telemetry::{FactorStats, FitTelemetry, Fitted, StepStats, StepTimes, Telemetry};
use crate::transform::{Curvature, LeafSpec, StepHyper, Transform};
use candle_core::{DType, Device, Tensor};
use std::fmt::Debug;
use std::time::Instant;

/// How the preconditioner step is normalised (`stepNormalizerOrder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepNormalizer {
    /// `'1st'`: by the size of the gradient of the fitting loss.
    First,
    /// `'2nd'` (default): by an estimate of its second-order term.
    #[default]
    Second,
}

impl crate::options::Choice for StepNormalizer {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("1st", StepNormalizer::First),
        ("2nd", StepNormalizer::Second),
    ];
}
crate::options::choice_option!(StepNormalizer, "'1st' | '2nd'");

/// How a step decides whether to fit the preconditioner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateDecision {
    /// Kron's default (psgd-jax's): a counter that fires once it reaches `1/p` (no random
    /// draw).
    Counter,
    /// One uniform draw `u` at the start of every step, fitting when `u < p`, and on the
    /// first `always` steps whatever `u` is: 2 for XMat, LRA and Affine (psgd-jax's), 0
    /// for Kron's `updateDecision: 'draw'` (psgd_torch's).
    Draw {
        /// Steps (from the first) that fit whatever the draw.
        always: u64,
    },
    /// heavyball's deterministic cumulative count: the step fits iff
    /// `floor(c + p) > floor(c)`, then `c ← c + p` (`c` kept in the state, from 0).
    Cumulative,
}

impl UpdateDecision {
    /// The option value that selects it (`updateDecision`), in errors and state files.
    pub fn name(self) -> &'static str {
        match self {
            UpdateDecision::Counter => "counter",
            UpdateDecision::Draw { .. } => "draw",
            UpdateDecision::Cumulative => "cumulative",
        }
    }
}

/// What the update decision of one step gives.
#[derive(Debug, Clone)]
struct Decided {
    fit: bool,
    update_counter: u64,
    update_cumulative: f64,
    vectors: Option<Vec<Tensor>>,
}

/// What a whitening fit is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitSource {
    /// The momentum (Kron's `momentum_into_precond_update`).
    Momentum,
    /// The raw gradient.
    Gradient,
}

/// The options the step reads, whatever each variant calls them.
#[derive(Debug, Clone)]
pub struct StepOptions {
    /// Learning rate (a schedule of the step count before this step).
    pub learning_rate: Schedule,
    /// Probability of a fit (a schedule of the 1-based step count).
    pub update_probability: Schedule,
    /// Step size of the fit (a schedule of the 1-based step count).
    pub precond_lr: Schedule,
    /// Momentum; 0 turns it off.
    pub b1: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Dtype of the momentum; `None` keeps the params'.
    pub mu_dtype: Option<DType>,
    /// Seed of the default random source.
    pub seed: u64,
    /// The initial scale of a global preconditioner (`None`: from the first fit's inputs).
    pub init_scale: Option<f64>,
    /// See [`StepNormalizer`].
    pub normalizer: StepNormalizer,
    /// Matmul precision of the fit.
    pub precision: Precision,
    /// See [`UpdateDecision`].
    pub decision: UpdateDecision,
    /// See [`FitSource`].
    pub fit_source: FitSource,
    /// The clip of the preconditioned updates.
    pub clip: Clip,
    /// How momentum warms up (Kron's `momentumWarmup`; psgd-jax's debiasing elsewhere).
    pub momentum_warmup: fused::Warmup,
    /// Fit the preconditioner before preconditioning the step (psgd-jax's order, the
    /// default); false: precondition with the preconditioner as it was, then fit it
    /// (`updatePreconditionerFirst: false`, psgd_torch's `update_preconditioner_first`).
    pub update_first: bool,
    /// Run the fit of a step after its updates, as a separate job the caller may run on
    /// another thread (`overlapFit`; see [`Psgd::update_deferred`]). It implies
    /// `update_first: false`, which the variants' options set with it.
    pub overlap_fit: bool,
    /// Clip the incoming gradients to this global L2 norm first (`gradClip`; none by default).
    pub grad_clip: Option<f64>,
    /// Fail a step whose updates hold NaN or Inf (`allowNonFinite: false`, the default).
    pub check_finite: bool,
    /// The health guard (`onUnhealthy`; see [`crate::guard`]).
    pub on_unhealthy: OnUnhealthy,
    /// The health check's condition bound (`maxCondition`; `None`: non-finite only).
    pub max_condition: Option<f64>,
}

/// The options of a variant: the [`Options`] table plus the view the step reads.
pub trait VariantOptions: Options {
    /// The name of the option that sets the fit's step size, in errors.
    const PRECOND_LR: &'static str;
    /// The step's view of the options.
    fn step(&self) -> StepOptions;
    /// Replaces the learning rate with a constant (`candle_nn::Optimizer`).
    fn set_learning_rate(&mut self, lr: f64);
}

/// What a preconditioner fit gets.
pub struct FitInputs<'a> {
    /// The probe vectors, one per leaf (Hessian mode, or drawn for whitening when
    /// [`Preconditioner::WHITENING_VECTOR`] is set).
    pub vectors: Option<&'a [Tensor]>,
    /// The Hessian-vector products, or what the whitening fit sees ([`FitSource`]). Float32.
    pub hvps: &'a [Tensor],
    /// Whether the inputs are Hessian-vector products (else gradients).
    pub hessian: bool,
    /// Whether this is the first step (the initial scale is applied first).
    pub first: bool,
    /// The step's 0-based count (0 on the first step).
    pub count: u64,
    /// The fit's step size this step.
    pub precond_lr: f64,
    /// See [`StepOptions::init_scale`].
    pub init_scale: Option<f64>,
    /// See [`StepNormalizer`].
    pub normalizer: StepNormalizer,
    /// Matmul precision of the fit.
    pub precision: Precision,
}

/// The owned inputs of one fit: what [`FitInputs`] borrows, kept so that the fit can run
/// after the step that made them returned (see [`PendingFit`]).
#[derive(Debug, Clone)]
struct FitData {
    vectors: Option<Vec<Tensor>>,
    hvps: Vec<Tensor>,
    hessian: bool,
    first: bool,
    count: u64,
    precond_lr: f64,
    init_scale: Option<f64>,
    normalizer: StepNormalizer,
    precision: Precision,
}

impl FitData {
    fn inputs(&self) -> FitInputs<'_> {
        FitInputs {
            vectors: self.vectors.as_deref(),
            hvps: &self.hvps,
            hessian: self.hessian,
            first: self.first,
            count: self.count,
            precond_lr: self.precond_lr,
            init_scale: self.init_scale,
            normalizer: self.normalizer,
            precision: self.precision,
        }
    }
}

/// The fit of a step under `updatePreconditionerFirst: false`, handed back by
/// [`Psgd::update_deferred`] instead of run: the preconditioner it starts from and owned
/// copies of its inputs (tensors are shared handles, so nothing is copied). Run it with
/// [`Psgd::run_fit`], with the step's random source as the step left it (the fit's draws
/// are the step's last), and put the result in the state's `precond`: the state is then
/// the one [`Transform::update_with`] gives, bit for bit. It is `Send`, so the fit can run
/// on another thread while the caller computes the next gradient (`overlapFit`).
#[derive(Debug, Clone)]
pub struct PendingFit<P: Preconditioner> {
    start: P::State,
    data: FitData,
    /// The step's float32 gradients, which a reset of the factors scales them from
    /// (`onUnhealthy: 'reset'`; empty otherwise).
    grads: Vec<Tensor>,
}

/// What [`Psgd::update_deferred`] gives: the updates, the next state (with the
/// preconditioner as it was before the fit) and the step's fit, if it comes after the
/// updates.
pub type Deferred<P> = (
    Vec<Tensor>,
    PsgdState<<P as Preconditioner>::State>,
    Option<PendingFit<P>>,
);

/// Names the preconditioner of an optimizer type (`Kron` = `Psgd<KronPreconditioner>`),
/// for code that lists the variants by their optimizer types ([`crate::any`]).
pub trait PreconditionerOf {
    /// The preconditioner.
    type Precond: Preconditioner;
}

impl<P: Preconditioner> PreconditionerOf for Psgd<P> {
    type Precond = P;
}

/// The variant-specific part of a PSGD optimizer: a fifth variant is one of these.
pub trait Preconditioner: Sized + Clone + Debug + Send + Sync {
    /// psgd-jax's name of the variant (`kron`, `xmat`, …), in errors and state files.
    const NAME: &'static str;
    /// Whether the whitening fit needs a probe vector per leaf drawn by the step, after the
    /// update decision (XMat and LRA; Kron and Affine draw their own).
    const WHITENING_VECTOR: bool;
    /// Whether `update` accepts Hessian-vector products (every variant does).
    const HESSIAN: bool = true;
    /// Whether the fit runs on a worker of rayon's pool (`stages::on_pool`): worth it
    /// when it forks many small parallel jobs (Kron's and Affine's per-leaf products), not
    /// for a fit of a few fused passes (XMat, LRA).
    const FIT_ON_POOL: bool = false;
    /// Whether one preconditioner serves every leaf (XMat, LRA): the health guard then
    /// checks, resets and counts it as one, on every leaf.
    const SHARED: bool = false;
    /// The variant's options.
    type Options: VariantOptions;
    /// The preconditioner's tensors.
    type State: Clone + Debug + Send + Sync;

    /// The preconditioner for these leaves.
    fn new(leaves: &[LeafSpec], o: &Self::Options) -> Result<Self>;
    /// The parts of the state `init` makes, with their sizes, which [`Psgd`] checks
    /// against the machine's memory before anything is allocated.
    fn state_sizes(&self) -> Vec<StateSize>;
    /// The dtype the preconditioner keeps its factors in (checked when a state is loaded).
    fn factor_dtype(&self) -> DType {
        DType::F32
    }
    /// The initial preconditioner on `device`, drawing any random factors from `rng`.
    fn init(&self, device: &Device, rng: &mut dyn RandomSource) -> Result<Self::State>;
    /// The preconditioner rescaled from the first step's gradients (float32, after
    /// `gradClip`), before that step's fit decision; `None` keeps it. Called on the first
    /// step only: Kron's automatic initial scale. (XMat, LRA and Affine take theirs inside
    /// their first fit, as psgd-jax does.)
    fn first_step(&self, _state: &Self::State, _grads: &[Tensor]) -> Result<Option<Self::State>> {
        Ok(None)
    }
    /// One fit of the preconditioner to the inputs.
    fn update(
        &self,
        state: &Self::State,
        inputs: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<Self::State>;
    /// The state the apply reads, given whether this step fitted: a variant that keeps
    /// derived tensors (Kron's `QᵀQ`) forms or drops them here.
    fn prepare_apply(&self, state: Self::State, _fitted: bool) -> Result<Self::State> {
        Ok(state)
    }
    /// The preconditioned gradients (float32, one per leaf).
    fn apply(&self, state: &Self::State, grads: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Adds the preconditioner's tensors to a state file.
    fn save(&self, state: &Self::State, f: &mut StateFile);
    /// Reads them back.
    fn load(&self, f: &mut LoadedState) -> Result<Self::State>;
    /// Checks that `state` fits this preconditioner (shapes), before a step uses it.
    fn check(&self, state: &Self::State) -> Result<()>;
    /// Per factor, its condition estimate and the normaliser of its last fit, read from
    /// `state` (for [`Psgd::stats`]; not on the step's path).
    fn factor_stats(&self, _state: &Self::State) -> Result<Vec<FactorStats>> {
        Ok(vec![])
    }
    /// The health guard's check ([`crate::guard`]): per leaf of the optimizer, the largest
    /// condition estimate ([`crate::guard::diag_condition`]) of the factors that
    /// precondition it, +Inf where any of them (or a value the fit keeps with them, such
    /// as Kron's Lipschitz bounds) holds NaN or Inf. Read back at once; run only under
    /// `onUnhealthy: 'reset' | 'skip'`.
    fn conditions(&self, state: &Self::State) -> Result<Vec<f64>>;
    /// `state` with the factors (and what the fit keeps with them) that precondition the
    /// leaves marked in `which` taken from `from`; a preconditioner shared by every leaf
    /// (XMat, LRA) is taken whole when any leaf is marked.
    fn take_leaves(
        &self,
        state: Self::State,
        from: &Self::State,
        which: &[bool],
    ) -> Result<Self::State>;
}

/// The state of every variant: the step count, the update counter (Kron), the momentum
/// and the preconditioner.
#[derive(Debug, Clone)]
pub struct PsgdState<S> {
    /// Steps taken.
    pub count: u64,
    /// The deterministic preconditioner-update counter ([`UpdateDecision::Counter`]; 0
    /// otherwise).
    pub update_counter: u64,
    /// The sum of the update probabilities so far ([`UpdateDecision::Cumulative`]; 0
    /// otherwise).
    pub update_cumulative: f64,
    /// Momentum per leaf (none when `b1 == 0`).
    pub mu: Option<Vec<Tensor>>,
    /// The preconditioner.
    pub precond: S,
    /// What the last step measured of itself, read by [`Psgd::stats`] (never saved).
    pub telemetry: Telemetry,
    /// What the health guard (`onUnhealthy`) did so far: resets and dropped fits per
    /// leaf, skipped steps. Zero under `'throw'`; not saved in state files.
    pub guard: GuardCounts,
}

impl<S> PsgdState<S> {
    /// Puts a fit [`Psgd::run_fit`] gave into the state its step made (or one that
    /// continues it): the fitted preconditioner, what the health guard did at the fit
    /// (its counts), and the fit's time in the telemetry. A
    /// fit run `inline` (by the step itself) counts in the step's total time; one run on
    /// another thread (`overlapFit`) does not, as the caller did not wait for it.
    pub fn install_fit(&mut self, fitted: Fitted<S>, inline: bool) {
        self.precond = fitted.state;
        self.guard = self.guard.after(&fitted.health);
        let times = &mut self.telemetry.times;
        times.fit_ms = fitted.telemetry.ms;
        if inline {
            times.total_ms += fitted.telemetry.ms;
        }
    }
}

/// A PSGD optimizer: the shared step around a [`Preconditioner`].
#[derive(Debug, Clone)]
pub struct Psgd<P: Preconditioner> {
    options: P::Options,
    step: StepOptions,
    leaves: Vec<LeafSpec>,
    precond: P,
    /// What the state and a step need (see [`Psgd::ensure_memory`]).
    need: limits::MemoryNeed,
}

impl<P: Preconditioner> Psgd<P> {
    /// Refuses with a `RangeError`, before anything is allocated, to make a state (`step`
    /// false) or run a step (`step` true) that would not get its memory now: see
    /// [`limits::reserve`]. A state is also refused when the memory available now is less
    /// than it and a step need together ([`limits::ensure_available`]; read at the state
    /// only, as reading it costs about 30 µs). The host's memory is checked for a state
    /// on the CPU only: a GPU's allocation failure is an error, not an abort.
    fn ensure_memory(&self, device: &Device, step: bool) -> Result<()> {
        if !device.is_cpu() {
            return Ok(());
        }
        let name = P::NAME;
        if step {
            return limits::reserve(self.need.step, &format!("a {name} step"));
        }
        let what = format!("a {name} state and its steps");
        limits::ensure_available(self.need.step, &what, limits::memory_available)?;
        limits::reserve(self.need.state, &format!("a {name} state"))
    }

    /// The options.
    pub fn options(&self) -> &P::Options {
        &self.options
    }

    /// The preconditioner.
    pub fn preconditioner(&self) -> &P {
        &self.precond
    }

    /// The options as the step reads them.
    pub fn step_options(&self) -> &StepOptions {
        &self.step
    }

    /// Whether and on what the preconditioner is fitted this step: draws what the
    /// decision and the whitening probes need (in psgd-jax's order).
    fn decide(
        &self,
        state: &PsgdState<P::State>,
        hyper: &StepHyper,
        curvature: Option<&Curvature>,
        g32: &[Tensor],
        rng: &mut dyn RandomSource,
    ) -> Result<Decided> {
        let mut d = Decided {
            fit: false,
            update_counter: 0,
            update_cumulative: 0.0,
            vectors: None,
        };
        if let Some(c) = curvature {
            d.fit = c.update_preconditioner;
            d.vectors = Some(f32s(&c.vector)?);
            return Ok(d);
        }
        let p = hyper.update_probability;
        match self.step.decision {
            UpdateDecision::Counter => {
                (d.fit, d.update_counter) = stages::update_counter(state.update_counter, p);
            }
            UpdateDecision::Draw { always } => {
                let u = rng.uniform()?;
                d.fit = u < p as f32 || state.count < always;
            }
            UpdateDecision::Cumulative => {
                (d.fit, d.update_cumulative) =
                    stages::update_cumulative(state.update_cumulative, p);
            }
        }
        if !P::WHITENING_VECTOR {
            return Ok(d);
        }
        // the probes only feed the fit: a step without one skips their values
        if !d.fit {
            for l in &self.leaves {
                rng.skip_normal(&l.shape)?;
            }
            return Ok(d);
        }
        let probes = self
            .leaves
            .iter()
            .zip(g32)
            .map(|(l, g)| rng.normal(&l.shape, g.device()))
            .collect::<Result<Vec<_>>>()?;
        d.vectors = Some(probes);
        Ok(d)
    }

    /// The fit stage of a step: the preconditioner `start` fitted once to `job`, drawing
    /// its own random numbers from `rng` (the last draws of the step). It reads nothing
    /// else of the step, and under `updatePreconditionerFirst: false` it runs after the
    /// step's updates are made, so it can run on another thread while the caller computes
    /// the next gradient and give the same numbers bit for bit: keep it that way (no
    /// input of the fit may come from the finish, and nothing after it may draw).
    /// The fit's telemetry (its time; a variant's values travel in the fitted state)
    /// comes out with it, so that it is the same wherever the fit runs.
    pub(crate) fn fit_stage(
        &self,
        start: &P::State,
        job: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<Fitted<P::State>> {
        let t0 = Instant::now();
        let mut fit = || self.precond.update(start, job, rng);
        let state = if P::FIT_ON_POOL {
            stages::on_pool(&self.leaves, fit)
        } else {
            fit()
        }?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(Fitted {
            state,
            telemetry: FitTelemetry { ms },
            health: StepHealth::default(),
        })
    }

    /// What the last step of `state` did and how its preconditioner stands (see
    /// [`StepStats`]): the step's own measurements and the factors' values, read here
    /// (the step itself reads nothing back for them).
    pub fn stats(&self, state: &PsgdState<P::State>) -> Result<StepStats> {
        let paths: Vec<String> = self.leaves.iter().map(|l| l.path.clone()).collect();
        let sizes: Vec<usize> = self.leaves.iter().map(LeafSpec::numel).collect();
        let factors = self.precond.factor_stats(&state.precond)?;
        let mut stats = state.telemetry.read(state.count, &paths, &sizes, factors)?;
        let guard = &state.guard;
        for (l, leaf) in stats.leaves.iter_mut().enumerate() {
            leaf.resets = guard.resets.get(l).copied().unwrap_or(0);
            leaf.dropped = guard.dropped.get(l).copied().unwrap_or(0);
        }
        stats.skipped = guard.skipped;
        Ok(stats)
    }

    fn check_state(&self, s: &PsgdState<P::State>) -> Result<()> {
        let bad = |m: String| Err(PsgdError::State(m));
        match (&s.mu, self.step.b1 > 0.0) {
            (Some(mu), true) => {
                if mu.len() != self.leaves.len() {
                    return bad(format!(
                        "momentum has {} leaves, expected {}",
                        mu.len(),
                        self.leaves.len()
                    ));
                }
                for (m, l) in mu.iter().zip(&self.leaves) {
                    if m.dims() != l.shape.as_slice() {
                        return bad(format!(
                            "momentum of '{}' has shape {:?}, expected {:?}",
                            l.path,
                            m.dims(),
                            l.shape
                        ));
                    }
                }
            }
            (None, false) => {}
            (Some(_), false) => return bad("has momentum but b1 is 0".into()),
            (None, true) => return bad("has no momentum but b1 > 0".into()),
        }
        self.precond.check(&s.precond)
    }

    /// The state as safetensors bytes (see [`crate::state_io`]).
    pub fn state_to_bytes(&self, state: &PsgdState<P::State>) -> Result<Vec<u8>> {
        self.state_file(state).to_bytes()
    }

    /// Bytes held by the tensors a state file would hold (momentum and factors; derived
    /// tensors such as Kron's `QᵀQ` are not counted): what a binding reports to its
    /// garbage collector. Cheap: no data is read.
    pub fn state_nbytes(&self, state: &PsgdState<P::State>) -> usize {
        self.state_file(state).nbytes()
    }

    fn state_file(&self, state: &PsgdState<P::State>) -> StateFile {
        let mut f = StateFile::new(P::NAME, &self.leaves);
        f.meta("count", state.count.to_string());
        match self.step.decision {
            UpdateDecision::Counter => f.meta("update_counter", state.update_counter.to_string()),
            UpdateDecision::Cumulative => {
                f.meta("update_decision", "cumulative".into());
                f.meta("update_cumulative", state.update_cumulative.to_string());
            }
            UpdateDecision::Draw { .. } => {}
        }
        f.momentum(state.mu.as_ref());
        self.precond.save(&state.precond, &mut f);
        f
    }

    /// A state from safetensors bytes, checked against this optimizer.
    pub fn state_from_bytes(&self, bytes: &[u8], device: &Device) -> Result<PsgdState<P::State>> {
        self.ensure_memory(device, false)?;
        let allow_non_finite = !self.step.check_finite;
        let mut f = LoadedState::parse(bytes, device, P::NAME, &self.leaves, allow_non_finite)?;
        f.set_factor_dtype(self.precond.factor_dtype());
        let count = f.meta_u64("count")?;
        // the decision the state was saved under: named since 'cumulative', else told by
        // the counter psgd-jax's decision keeps
        let saved = match (f.meta_str("update_decision"), f.meta_str("update_counter")) {
            (Some(d), _) => d.to_string(),
            (None, Some(_)) => "counter".to_string(),
            (None, None) => "draw".to_string(),
        };
        let ours = self.step.decision.name();
        if saved != ours {
            return Err(PsgdError::State(format!(
                "was saved under updateDecision '{saved}', and this optimizer has \
                 updateDecision '{ours}': load it into an optimizer with the same \
                 updateDecision"
            )));
        }
        let update_counter = match self.step.decision {
            UpdateDecision::Counter => f.meta_u64("update_counter")?,
            _ => 0,
        };
        if update_counter > count {
            return Err(PsgdError::State(format!(
                "its update counter ({update_counter}) exceeds its step count ({count})"
            )));
        }
        let update_cumulative = match self.step.decision {
            UpdateDecision::Cumulative => f
                .meta_str("update_cumulative")
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|&c| (0.0..=count as f64).contains(&c))
                .ok_or_else(|| {
                    PsgdError::State(format!(
                        "missing or bad 'update_cumulative' (the sum of the update \
                         probabilities, from 0 to its step count {count})"
                    ))
                })?,
            _ => 0.0,
        };
        let mu = f.take_momentum(self.leaves.len(), self.step.b1 > 0.0, self.step.mu_dtype)?;
        let state = PsgdState {
            count,
            update_counter,
            update_cumulative,
            mu,
            precond: self.precond.load(&mut f)?,
            telemetry: Telemetry::default(),
            guard: GuardCounts::new(self.leaves.len()),
        };
        f.finish()?;
        self.check_state(&state)?;
        Ok(state)
    }
}

/// A step whose updates would hold NaN or Inf under `onUnhealthy: 'reset' | 'skip'`:
/// what [`Psgd::skipped_step`] needs of it.
struct Skipped<S> {
    /// The updates as computed (their shapes and dtypes).
    updates: Vec<Tensor>,
    /// The first leaf whose updates are non-finite.
    leaf: usize,
    /// The preconditioner the updates were made with.
    current: S,
    /// The preconditioner before this step's fit.
    kept: S,
    /// What the guard did at this step's fit so far.
    health: StepHealth,
    /// The step's telemetry: the values of the updates that were refused, no fit.
    telemetry: Telemetry,
}

impl<P: Preconditioner> Psgd<P> {
    /// The fit stage under the health guard: [`Psgd::fit_stage`], then under
    /// `onUnhealthy: 'reset' | 'skip'` the check of the factors it made, per leaf; an
    /// unhealthy leaf's factors are reset ([`Psgd::reset_leaves`]) or taken back from
    /// `start` (the fit dropped for that leaf). Returns the fit stage's output with the
    /// preconditioner so checked and what the guard did. Like the fit stage it reads only its arguments (`grads`: the step's
    /// float32 gradients, for Kron's automatic initial scale of a reset) and draws last,
    /// so it runs the same wherever the fit runs.
    pub(crate) fn guarded_fit_stage(
        &self,
        start: &P::State,
        job: &FitInputs,
        grads: &[Tensor],
        rng: &mut dyn RandomSource,
    ) -> Result<Fitted<P::State>> {
        let fitted = self.fit_stage(start, job, rng)?;
        if self.step.on_unhealthy == OnUnhealthy::Throw {
            return Ok(fitted);
        }
        let bad = self.unhealthy_leaves(&fitted.state)?;
        if !bad.contains(&true) {
            return Ok(fitted);
        }
        let (state, health) = match self.step.on_unhealthy {
            OnUnhealthy::Skip => (
                self.precond.take_leaves(fitted.state, start, &bad)?,
                StepHealth {
                    dropped: bad,
                    ..Default::default()
                },
            ),
            _ => (
                self.reset_leaves(fitted.state, &bad, job, grads, rng)?,
                StepHealth {
                    reset: bad,
                    ..Default::default()
                },
            ),
        };
        Ok(Fitted {
            state,
            health,
            ..fitted
        })
    }

    /// Per leaf, whether the factors that precondition it fail the health check.
    fn unhealthy_leaves(&self, s: &P::State) -> Result<Vec<bool>> {
        let max = self.step.max_condition;
        let c = self.precond.conditions(s)?;
        Ok(c.into_iter()
            .map(|c| crate::guard::unhealthy(c, max))
            .collect())
    }

    /// `state` with the factors of the leaves marked in `bad` back at their initial scale:
    /// the initial preconditioner (the same draws as the state's first), scaled as the
    /// first step scales it from `grads` (Kron's automatic initial scale), then, when
    /// this step fits (`job` has inputs), fitted once on them as a first step is (XMat,
    /// LRA and Affine take their automatic initial scale there). A leaf the refit leaves
    /// unhealthy keeps the unfitted initial factors. The Lipschitz bounds Kron keeps
    /// start over with them.
    fn reset_leaves(
        &self,
        state: P::State,
        bad: &[bool],
        job: &FitInputs,
        grads: &[Tensor],
        rng: &mut dyn RandomSource,
    ) -> Result<P::State> {
        let device = grads.first().map_or(Device::Cpu, |g| g.device().clone());
        let mut first_draws = crate::random::SeededRandom::for_step(self.step.seed, 0);
        let init = self.precond.init(&device, &mut first_draws)?;
        let start = self.precond.first_step(&init, grads)?.unwrap_or(init);
        let fresh = if job.hvps.is_empty() {
            start
        } else {
            let first = FitInputs {
                first: true,
                ..*job
            };
            let refit = self.fit_stage(&start, &first, rng)?.state;
            let still = self.unhealthy_leaves(&refit)?;
            self.precond.take_leaves(refit, &start, &still)?
        };
        self.precond.take_leaves(state, &fresh, bad)
    }

    /// The step whose updates would hold NaN or Inf, under `onUnhealthy: 'reset' |
    /// 'skip'`: zero updates, the momentum as it was, the update decision and the count
    /// advanced (schedules go on). `'skip'` keeps the preconditioner as it was before this
    /// step's fit; `'reset'` resets the factors at fault: those failing the health check
    /// and those of the first leaf whose updates are non-finite.
    fn skipped_step(
        &self,
        state: &PsgdState<P::State>,
        skip: Skipped<P::State>,
        decided: &Decided,
        job: &FitInputs,
        grads: &[Tensor],
        rng: &mut dyn RandomSource,
    ) -> Result<(Vec<Tensor>, PsgdState<P::State>)> {
        let updates = skip
            .updates
            .iter()
            .map(|u| Ok(u.zeros_like()?))
            .collect::<Result<Vec<_>>>()?;
        let skipped = StepHealth {
            skipped: true,
            ..Default::default()
        };
        let (precond, health) = match self.step.on_unhealthy {
            OnUnhealthy::Reset => {
                let mut bad = self.unhealthy_leaves(&skip.current)?;
                bad[skip.leaf] = true;
                if P::SHARED {
                    bad.fill(true);
                }
                let reset = self.reset_leaves(skip.current, &bad, job, grads, rng)?;
                let health = StepHealth {
                    reset: bad,
                    ..skipped
                };
                (
                    self.precond.prepare_apply(reset, true)?,
                    skip.health.and(health),
                )
            }
            _ => (skip.kept, skipped),
        };
        Ok((
            updates,
            PsgdState {
                count: state.count + 1,
                update_counter: decided.update_counter,
                update_cumulative: decided.update_cumulative,
                mu: state.mu.clone(),
                precond,
                telemetry: skip.telemetry,
                guard: state.guard.after(&health),
            },
        ))
    }
}

fn f32s(ts: &[Tensor]) -> Result<Vec<Tensor>> {
    ts.iter().map(|t| Ok(t.to_dtype(DType::F32)?)).collect()
}

impl<P: Preconditioner> Transform for Psgd<P> {
    type Options = P::Options;
    type State = PsgdState<P::State>;

    fn new(leaves: Vec<LeafSpec>, options: P::Options) -> Result<Self> {
        options.validate()?;
        limits::check_leaf_sizes(&leaves)?;
        let precond = P::new(&leaves, &options)?;
        let step = options.step();
        let need = limits::check_state_size(
            &leaves,
            &precond.state_sizes(),
            step.b1 > 0.0,
            limits::memory_limit(),
        )?;
        Ok(Psgd {
            step,
            options,
            leaves,
            precond,
            need,
        })
    }

    fn leaves(&self) -> &[LeafSpec] {
        &self.leaves
    }

    fn seed(&self) -> u64 {
        self.step.seed
    }

    fn init_with(&self, params: &[Tensor], rng: &mut dyn RandomSource) -> Result<Self::State> {
        stages::check_leaves("params", &self.leaves, params)?;
        let device = params
            .first()
            .map(|p| p.device().clone())
            .unwrap_or(Device::Cpu);
        self.ensure_memory(&device, false)?;
        let mu = stages::init_momentum(self.step.b1, self.step.mu_dtype, params)?;
        Ok(PsgdState {
            count: 0,
            update_counter: 0,
            update_cumulative: 0.0,
            mu,
            precond: self.precond.init(&device, rng)?,
            telemetry: Telemetry::default(),
            guard: GuardCounts::new(self.leaves.len()),
        })
    }

    fn count(state: &Self::State) -> u64 {
        state.count
    }

    fn hyper(&self, state: &Self::State) -> StepHyper {
        StepHyper {
            learning_rate: self.step.learning_rate.at(state.count),
            update_probability: self.step.update_probability.at(state.count + 1),
            precond_lr: Some(self.step.precond_lr.at(state.count + 1)),
        }
    }

    fn update_with(
        &self,
        grads: &[Tensor],
        state: &Self::State,
        params: Option<&[Tensor]>,
        hyper: StepHyper,
        curvature: Option<&Curvature>,
        rng: &mut dyn RandomSource,
    ) -> Result<(Vec<Tensor>, Self::State)> {
        let (updates, mut next, pending) =
            self.update_deferred(grads, state, params, hyper, curvature, rng)?;
        if let Some(job) = pending {
            next.install_fit(self.run_fit(job, rng)?, true);
        }
        Ok((updates, next))
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.options.set_learning_rate(lr);
        self.step.learning_rate = Schedule::Constant(lr);
    }

    fn learning_rate(&self, state: &Self::State) -> f64 {
        self.step.learning_rate.at(state.count)
    }
}

impl<P: Preconditioner> Psgd<P> {
    /// One step, as [`Transform::update_with`], with its fit handed back instead of run
    /// where the fit comes after the updates (`updatePreconditionerFirst: false` and a
    /// step that fits): the returned state then holds the preconditioner as it was
    /// (prepared for the apply), and running the [`PendingFit`] with `rng` (as this call
    /// left it) gives the fitted one. [`Transform::update_with`] is this with the fit run
    /// at once, so the numbers are the same whichever thread runs the fit and when, as
    /// long as it runs before the next step reads the state.
    pub fn update_deferred(
        &self,
        grads: &[Tensor],
        state: &PsgdState<P::State>,
        params: Option<&[Tensor]>,
        hyper: StepHyper,
        curvature: Option<&Curvature>,
        rng: &mut dyn RandomSource,
    ) -> Result<Deferred<P>> {
        let o = &self.step;
        let t0 = Instant::now();
        // checks: nothing below runs on input that would fail later
        if curvature.is_some() && !P::HESSIAN {
            return Err(PsgdError::option_type(
                "hvp",
                format!(
                    "is not taken: {} fits its preconditioner by gradient whitening only",
                    P::NAME
                ),
            ));
        }
        stages::check_step_inputs(&self.leaves, grads, params, o.weight_decay)?;
        stages::check_hyper(&hyper, state.count)?;
        if let Some(c) = curvature {
            stages::check_leaves("hvp", &self.leaves, &c.hvp)?;
            stages::check_leaves("vector", &self.leaves, &c.vector)?;
            if c.update_preconditioner {
                stages::check_finite("hvp", &self.leaves, &c.hvp)?;
                stages::check_finite("vector", &self.leaves, &c.vector)?;
            }
        }
        self.check_state(state)?;
        if let Some(g) = grads.first() {
            self.ensure_memory(g.device(), true)?;
        }
        let precond_lr = hyper
            .precond_lr
            .unwrap_or_else(|| o.precond_lr.at(state.count + 1));
        crate::options::check::precond_lr(precond_lr).map_err(|m| {
            let m = format!("{m} (schedule at step {})", state.count + 1);
            PsgdError::option_range(P::Options::PRECOND_LR, m)
        })?;
        let count = state.count + 1;
        let mut g32 = f32s(grads)?;
        if let Some(c) = o.grad_clip {
            g32 = fused::clip_global_norm(g32, c)?;
        }

        // the update decision and the whitening probes (psgd-jax draws them first)
        let decided = self.decide(state, &hyper, curvature, &g32, rng)?;
        let fit = decided.fit;
        let (mu, momentum) = stages::momentum_all(
            o.b1,
            o.nesterov,
            o.momentum_warmup,
            state.mu.as_ref(),
            &g32,
            count,
        )?;

        // Kron's automatic initial scale: taken on the first step, before anything else
        // reads the preconditioner, whichever order the fit and the apply come in
        let scaled = match state.count {
            0 => self.precond.first_step(&state.precond, &g32)?,
            _ => None,
        };
        let start = scaled.unwrap_or_else(|| state.precond.clone());
        let guarded = o.on_unhealthy != OnUnhealthy::Throw;
        let kept = guarded.then(|| start.clone());
        let mut health = StepHealth::default();
        let hvps = match (fit, curvature, o.fit_source) {
            (false, _, _) => vec![],
            (true, Some(c), _) => f32s(&c.hvp)?,
            (true, None, FitSource::Momentum) => momentum.clone(),
            (true, None, FitSource::Gradient) => g32.clone(),
        };
        let job = FitData {
            vectors: decided.vectors.clone(),
            hvps,
            hessian: curvature.is_some(),
            first: state.count == 0,
            count: state.count,
            precond_lr,
            init_scale: o.init_scale,
            normalizer: o.normalizer,
            precision: o.precision,
        };
        // fit, then precondition (psgd-jax's order); or precondition with the
        // preconditioner as it was, make the updates, and fit it last: the fit is then a
        // separate stage on inputs that are all known before the updates are made
        let mut times = StepTimes::default();
        let before = if o.update_first && fit {
            let fitted = self.guarded_fit_stage(&start, &job.inputs(), &g32, rng)?;
            times.fit_ms = fitted.telemetry.ms;
            health = fitted.health;
            fitted.state
        } else {
            start
        };
        let current = self.precond.prepare_apply(before, o.update_first && fit)?;

        // the finish: clip, weight decay and learning rate (one pass per leaf on the CPU)
        let t_apply = Instant::now();
        let pre = self.precond.apply(&current, &momentum)?;
        let (updates, non_finite, sums) = fused::finish_updates(
            &pre,
            params,
            &self.leaves,
            grads,
            o.weight_decay,
            hyper.learning_rate,
            o.clip,
            o.check_finite || guarded,
        )?;
        // under the guard, finite updates that would take a param past float's range are
        // refused too: the params they make are what the next step's gradient reads
        let non_finite = match (non_finite, guarded, params) {
            (None, true, Some(ps)) => first_overflowing_param(ps, &updates)?,
            (found, _, _) => found,
        };
        if let (Some(l), None) = (non_finite, &kept) {
            return Err(PsgdError::NonFiniteUpdate {
                path: self.leaves[l].path.clone(),
                cause: overflow_cause(&pre[l], &g32[l], hyper.learning_rate)?,
            });
        }
        times.apply_ms = t_apply.elapsed().as_secs_f64() * 1e3;
        times.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let sizes: Vec<usize> = self.leaves.iter().map(LeafSpec::numel).collect();
        let on_fit_input =
            curvature.is_none() && (o.fit_source == FitSource::Momentum || state.mu.is_none());
        // a step the guard refuses reports the values it refused, as a step that did not
        // fit (they do not enter the whitening estimate)
        let telemetry = Telemetry::next(
            &state.telemetry,
            fit && non_finite.is_none(),
            sums,
            &sizes,
            o.clip,
            on_fit_input,
            times,
        )?;
        if let (Some(l), Some(kept)) = (non_finite, kept) {
            let skip = Skipped {
                updates,
                leaf: l,
                current,
                kept,
                health,
                telemetry,
            };
            let (updates, next) =
                self.skipped_step(state, skip, &decided, &job.inputs(), &g32, rng)?;
            return Ok((updates, next, None));
        }
        let pending = (!o.update_first && fit).then(|| PendingFit {
            start: current.clone(),
            data: job,
            // what a reset of the factors (`onUnhealthy: 'reset'`) scales them from
            grads: if guarded { g32 } else { vec![] },
        });

        let mu = stages::keep_dtypes(mu, state.mu.as_ref())?;
        let next = PsgdState {
            count,
            update_counter: decided.update_counter,
            update_cumulative: decided.update_cumulative,
            mu,
            precond: current,
            telemetry,
            guard: match guarded {
                true => state.guard.after(&health),
                false => state.guard.clone(),
            },
        };
        Ok((updates, next, pending))
    }

    /// Runs a fit [`Psgd::update_deferred`] handed back, with the random source that step
    /// left: the fitted preconditioner, prepared for the next apply, to put in the state's
    /// `precond`. An error leaves nothing changed (the state keeps the preconditioner it
    /// had, and its count, momentum and updates stand).
    pub fn run_fit(
        &self,
        job: PendingFit<P>,
        rng: &mut dyn RandomSource,
    ) -> Result<Fitted<P::State>> {
        let fitted = self.guarded_fit_stage(&job.start, &job.data.inputs(), &job.grads, rng)?;
        // in this order every apply reads the preconditioner as a step that does not fit
        // would (Kron: its grams), so it is prepared so now, with the fit, rather than at
        // the start of the next step: the same values, formed off the next step's path
        // where the fit runs apart from it (the overlap worker)
        Ok(Fitted {
            state: self.precond.prepare_apply(fitted.state, false)?,
            ..fitted
        })
    }
}

/// The first leaf whose param `params + updates` (added in the param's dtype, as
/// [`crate::apply_updates`] does) would hold NaN or Inf. Run under the health guard only:
/// it is a pass over every param.
fn first_overflowing_param(params: &[Tensor], updates: &[Tensor]) -> Result<Option<usize>> {
    for (l, (p, u)) in params.iter().zip(updates).enumerate() {
        let next = (p + u.to_dtype(p.dtype())?)?;
        // a sum in float64 of float32-range values is finite exactly when they all are
        let sum = next.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        if !sum.is_finite() {
            return Ok(Some(l));
        }
    }
    Ok(None)
}

/// Where a step whose inputs were finite overflowed float32 for one leaf: in the
/// preconditioned gradient `pre` (the preconditioner's scale does not suit gradients `g`
/// of this size), or only once the learning rate (and weight decay) were applied.
fn overflow_cause(pre: &Tensor, g: &Tensor, learning_rate: f64) -> Result<String> {
    let largest = |t: &Tensor| -> Result<Option<f64>> {
        let a = t.to_dtype(DType::F64)?.abs()?.flatten_all()?;
        let finite = a.sum_all()?.to_scalar::<f64>()?.is_finite();
        Ok(match (finite, a.elem_count()) {
            (false, _) => None,
            (true, 0) => Some(0.0),
            (true, _) => Some(a.max(0)?.to_scalar::<f64>()?),
        })
    };
    let g = largest(g)?.unwrap_or(f64::NAN);
    Ok(match largest(pre)? {
        None => format!(
            "the preconditioned gradient overflowed float32 (largest |gradient| {g:e}): the \
             preconditioner's scale does not suit gradients of this size (an initial scale \
             or a first gradient far from the later gradients' scale?)"
        ),
        Some(p) => format!(
            "the preconditioned gradient is finite (largest |value| {p:e}), but times the \
             learning rate {learning_rate:e} (with weight decay) it overflows float32"
        ),
    })
}
