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

        impl AnyTransform {
            /// The variant named `variant` (psgd-jax's module name: `kron`, `xmat`, `lra`,
            /// `affine`) for `leaves`, with options by their camelCase names.
            pub fn new(
                variant: &str,
                leaves: Vec<LeafSpec>,
                options: &serde_json::Map<String, serde_json::Value>,
            ) -> Result<Self> {
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
