//! Every variant behind one enum, chosen by name at run time (for the bindings and the
//! conformance runner).

use crate::error::{PsgdError, Result};
use crate::options::Options;
use crate::random::RandomSource;
use crate::transform::{Curvature, LeafSpec, StepHyper, Transform};
use candle_core::{Device, Tensor};

/// Declares [`AnyTransform`] / [`AnyState`] over the variants, with one dispatch each.
macro_rules! variants {
    ($($variant:ident($ty:ty) = $name:literal),* $(,)?) => {
        /// One of the PSGD variants.
        // one per optimizer, made once and stepped by reference: the variants' sizes (Kron
        // keeps its options twice) do not matter
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone)]
        pub enum AnyTransform {
            $(
                #[doc = concat!("PSGD `", $name, "`.")]
                $variant($ty),
            )*
        }

        /// The state of one of the PSGD variants.
        #[derive(Debug, Clone)]
        pub enum AnyState {
            $(
                #[doc = concat!("State of `", $name, "`.")]
                $variant(<$ty as Transform>::State),
            )*
        }

        /// A fit of one of the variants, handed back by [`AnyTransform::update_deferred`].
        enum AnyFitJob {
            $($variant(crate::step::PendingFit<<$ty as crate::step::PreconditionerOf>::Precond>),)*
        }

        /// A fitted preconditioner of one of the variants (see [`AnyPendingFit::run`]).
        #[derive(Clone)]
        pub struct AnyFitted(AnyFittedInner);

        #[derive(Clone)]
        enum AnyFittedInner {
            $($variant(crate::telemetry::Fitted<<<$ty as crate::step::PreconditionerOf>::Precond as crate::step::Preconditioner>::State>),)*
        }

        impl AnyPendingFit {
            /// [`AnyPendingFit::run`] on the pool of fits that run apart from their step:
            /// one thread fewer than the machine has (at least one), which leaves the
            /// caller's next gradient a core.
            pub fn run_apart(self, opt: &AnyTransform) -> Result<AnyFitted> {
                crate::stages::on_fit_pool(|| self.run(opt))
            }

            /// Runs the fit with `opt`, the optimizer whose step handed it back.
            pub fn run(self, opt: &AnyTransform) -> Result<AnyFitted> {
                let mut rng = self.rng;
                match (opt, self.job) {
                    $((AnyTransform::$variant(t), AnyFitJob::$variant(j)) => {
                        Ok(AnyFitted(AnyFittedInner::$variant(t.run_fit(j, &mut rng)?)))
                    })*
                    #[allow(unreachable_patterns)]
                    _ => Err(mismatch()),
                }
            }
        }

        impl AnyFitted {
            /// Puts the fitted preconditioner in `state`, the state the step that handed
            /// the fit back made (or one that continues it: only its preconditioner and
            /// the fit's time in its telemetry are replaced).
            pub fn install(self, state: &mut AnyState) -> Result<()> {
                match (state, self.0) {
                    $((AnyState::$variant(s), AnyFittedInner::$variant(p)) => {
                        s.install_fit(p, false);
                        Ok(())
                    })*
                    #[allow(unreachable_patterns)]
                    _ => Err(mismatch()),
                }
            }
        }

        impl AnyTransform {
            /// [`crate::Psgd::update_deferred`] with the seeded random source of this step:
            /// the updates and the next state, and the step's fit when it comes after the
            /// updates, as a job that owns what it needs (the random source included), so
            /// that it can run on another thread (`overlapFit`).
            pub fn update_deferred(
                &self,
                state: &AnyState,
                step: StepInputs,
            ) -> Result<(Vec<Tensor>, AnyState, Option<AnyPendingFit>)> {
                let mut rng = crate::random::SeededRandom::for_step(self.seed(), state.count() + 1);
                let StepInputs { grads, params, hyper, curvature } = step;
                match (self, state) {
                    $((AnyTransform::$variant(t), AnyState::$variant(s)) => {
                        let (u, s, job) =
                            t.update_deferred(grads, s, params, hyper, curvature, &mut rng)?;
                        let job = job.map(|j| AnyPendingFit { job: AnyFitJob::$variant(j), rng });
                        Ok((u, AnyState::$variant(s), job))
                    })*
                    #[allow(unreachable_patterns)]
                    _ => Err(mismatch()),
                }
            }

            /// Whether the options ask for the fit to overlap the caller's next gradient
            /// (`overlapFit`).
            pub fn overlap_fit(&self) -> bool {
                match self {
                    $(AnyTransform::$variant(t) => t.step_options().overlap_fit,)*
                }
            }
        }

        impl AnyTransform {
            /// The variant named `variant` (psgd-jax's module name: `kron`, `xmat`, `lra`,
            /// `affine`) for `leaves`, with options by their camelCase names.
            pub fn new(
                variant: &str,
                leaves: Vec<LeafSpec>,
                options: &serde_json::Map<String, serde_json::Value>,
            ) -> Result<Self> {
                check_overlap_fit(options)?;
                match variant {
                    $($name => Ok(AnyTransform::$variant(<$ty as Transform>::new(
                        leaves,
                        <<$ty as Transform>::Options as Options>::from_json(options)?,
                    )?)),)*
                    other => Err(PsgdError::option_range(
                        "variant",
                        format!("must be 'kron', 'xmat', 'lra' or 'affine', got '{other}'"),
                    )),
                }
            }

            /// The variant's name.
            pub fn variant(&self) -> &'static str {
                match self {
                    $(AnyTransform::$variant(_) => $name,)*
                }
            }

            /// The leaves.
            pub fn leaves(&self) -> &[LeafSpec] {
                match self {
                    $(AnyTransform::$variant(t) => t.leaves(),)*
                }
            }

            /// The seed of the default random source.
            pub fn seed(&self) -> u64 {
                match self {
                    $(AnyTransform::$variant(t) => t.seed(),)*
                }
            }

            /// See [`Transform::init_with`].
            pub fn init_with(&self, params: &[Tensor], rng: &mut dyn RandomSource) -> Result<AnyState> {
                match self {
                    $(AnyTransform::$variant(t) => Ok(AnyState::$variant(t.init_with(params, rng)?)),)*
                }
            }

            /// See [`Transform::init`].
            pub fn init(&self, params: &[Tensor]) -> Result<AnyState> {
                match self {
                    $(AnyTransform::$variant(t) => Ok(AnyState::$variant(t.init(params)?)),)*
                }
            }

            /// See [`Transform::hyper`].
            pub fn hyper(&self, state: &AnyState) -> Result<StepHyper> {
                match (self, state) {
                    $((AnyTransform::$variant(t), AnyState::$variant(s)) => Ok(t.hyper(s)),)*
                    #[allow(unreachable_patterns)]
                    _ => Err(mismatch()),
                }
            }

            /// See [`Transform::update_with`].
            pub fn update_with(
                &self,
                grads: &[Tensor],
                state: &AnyState,
                params: Option<&[Tensor]>,
                hyper: StepHyper,
                curvature: Option<&Curvature>,
                rng: &mut dyn RandomSource,
            ) -> Result<(Vec<Tensor>, AnyState)> {
                match (self, state) {
                    $((AnyTransform::$variant(t), AnyState::$variant(s)) => {
                        let (u, s) = t.update_with(grads, s, params, hyper, curvature, rng)?;
                        Ok((u, AnyState::$variant(s)))
                    })*
                    #[allow(unreachable_patterns)]
                    _ => Err(mismatch()),
                }
            }

            /// The state as safetensors bytes (see [`crate::state_io`]).
            pub fn state_to_bytes(&self, state: &AnyState) -> Result<Vec<u8>> {
                match (self, state) {
                    $((AnyTransform::$variant(t), AnyState::$variant(s)) => t.state_to_bytes(s),)*
                    #[allow(unreachable_patterns)]
                    _ => Err(mismatch()),
                }
            }

            /// Bytes held by a state's tensors (see [`crate::Psgd::state_nbytes`]).
            pub fn state_nbytes(&self, state: &AnyState) -> usize {
                match (self, state) {
                    $((AnyTransform::$variant(t), AnyState::$variant(s)) => t.state_nbytes(s),)*
                    #[allow(unreachable_patterns)]
                    _ => 0,
                }
            }

            /// What the last step of `state` did (see [`crate::Psgd::stats`]).
            pub fn stats(&self, state: &AnyState) -> Result<crate::telemetry::StepStats> {
                match (self, state) {
                    $((AnyTransform::$variant(t), AnyState::$variant(s)) => t.stats(s),)*
                    #[allow(unreachable_patterns)]
                    _ => Err(mismatch()),
                }
            }

            /// A state from safetensors bytes, checked against this optimizer.
            pub fn state_from_bytes(&self, bytes: &[u8], device: &Device) -> Result<AnyState> {
                match self {
                    $(AnyTransform::$variant(t) => Ok(AnyState::$variant(t.state_from_bytes(bytes, device)?)),)*
                }
            }

            /// Checks options given by their camelCase names for the variant `variant`,
            /// without building an optimizer.
            pub fn check_options(
                variant: &str,
                options: &serde_json::Map<String, serde_json::Value>,
            ) -> Result<()> {
                check_overlap_fit(options)?;
                match variant {
                    $($name => <<$ty as Transform>::Options as Options>::from_json(options).map(drop),)*
                    other => Err(PsgdError::option_range(
                        "variant",
                        format!("must be 'kron', 'xmat', 'lra' or 'affine', got '{other}'"),
                    )),
                }
            }

            /// Checks that `state` belongs to this variant.
            pub fn check_variant(&self, state: &AnyState) -> Result<()> {
                match (self, state) {
                    $((AnyTransform::$variant(_), AnyState::$variant(_)) => Ok(()),)*
                    #[allow(unreachable_patterns)]
                    _ => Err(mismatch()),
                }
            }
        }

        impl AnyState {
            /// Steps taken.
            pub fn count(&self) -> u64 {
                match self {
                    $(AnyState::$variant(s) => <$ty as Transform>::count(s),)*
                }
            }

            /// Sets the step count (what schedules, momentum's bias correction and the
            /// random stream of the next step read), keeping the update counter at most it:
            /// for a state that continues another count (an optimizer's global one).
            pub fn set_count(&mut self, count: u64) {
                match self {
                    $(AnyState::$variant(s) => {
                        s.count = count;
                        s.update_counter = s.update_counter.min(count);
                        s.update_cumulative = s.update_cumulative.min(count as f64);
                    })*
                }
            }
        }
    };
}

variants! {
    Kron(crate::kron::Kron) = "kron",
    XMat(crate::xmat::XMat) = "xmat",
    Lra(crate::lra::Lra) = "lra",
    Affine(crate::affine::Affine) = "affine",
}

/// The inputs of one step, as [`AnyTransform::update_seeded`] takes them one by one.
pub struct StepInputs<'a> {
    /// The gradients.
    pub grads: &'a [Tensor],
    /// The params (for weight decay).
    pub params: Option<&'a [Tensor]>,
    /// The step's hyperparameters.
    pub hyper: StepHyper,
    /// The Hessian-based inputs, if any.
    pub curvature: Option<&'a Curvature>,
}

/// A step's fit that runs after its updates were handed out (see
/// [`AnyTransform::update_deferred`]): it owns its inputs and the step's random source, and
/// is `Send`, so a binding can run it on a worker thread while the caller computes the
/// next gradient.
pub struct AnyPendingFit {
    job: AnyFitJob,
    rng: crate::random::SeededRandom,
}

/// `overlapFit: true` runs the fit after the updates, which is the order of
/// `updatePreconditionerFirst: false`: asking for the other order as well is an error (an
/// absent `updatePreconditionerFirst` follows `overlapFit`).
fn check_overlap_fit(options: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let on = |k: &str| options.get(k) == Some(&serde_json::Value::Bool(true));
    if on("overlapFit") && on("updatePreconditionerFirst") {
        return Err(PsgdError::option_range(
            "overlapFit",
            "fits the preconditioner after the step's updates, the order of \
             updatePreconditionerFirst: false, and cannot be combined with \
             updatePreconditionerFirst: true (leave updatePreconditionerFirst out)"
                .to_string(),
        ));
    }
    Ok(())
}

fn mismatch() -> PsgdError {
    PsgdError::State("the state belongs to another optimizer variant".into())
}

impl AnyTransform {
    /// [`Self::update_with`] with the seeded random source of this step.
    pub fn update_seeded(
        &self,
        grads: &[Tensor],
        state: &AnyState,
        params: Option<&[Tensor]>,
        hyper: StepHyper,
        curvature: Option<&Curvature>,
    ) -> Result<(Vec<Tensor>, AnyState)> {
        let mut rng = crate::random::SeededRandom::for_step(self.seed(), state.count() + 1);
        self.update_with(grads, state, params, hyper, curvature, &mut rng)
    }
}
