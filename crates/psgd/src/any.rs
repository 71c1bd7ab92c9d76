//! Every variant behind one enum, chosen by name at run time (for the bindings and the
//! conformance runner).

use crate::error::{PsgdError, Result};
use crate::kron::{Kron, KronState};
use crate::random::RandomSource;
use crate::transform::{LeafSpec, StepHyper};
use crate::Transform;
use candle_core::{Device, Tensor};

/// One of the PSGD variants.
#[derive(Debug, Clone)]
pub enum AnyTransform {
    /// PSGD Kron.
    Kron(Kron),
}

/// The state of one of the PSGD variants.
#[derive(Debug, Clone)]
pub enum AnyState {
    /// State of [`Kron`].
    Kron(KronState),
}

macro_rules! dispatch {
    ($self:expr, $t:ident => $body:expr) => {
        match $self {
            AnyTransform::Kron($t) => $body,
        }
    };
}

fn mismatch() -> PsgdError {
    PsgdError::State("the state belongs to another optimizer variant".into())
}

impl AnyTransform {
    /// The variant named `variant` (`"kron"`) for `leaves`, with options in psgd-jax's
    /// snake_case names.
    pub fn new(
        variant: &str,
        leaves: Vec<LeafSpec>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        match variant {
            "kron" => Ok(AnyTransform::Kron(Kron::new(
                leaves,
                Kron::options_from_json(options)?,
            )?)),
            other => Err(PsgdError::option_range(
                "variant",
                format!("unknown or unsupported optimizer variant '{other}'"),
            )),
        }
    }

    /// The variant's name.
    pub fn variant(&self) -> &'static str {
        dispatch!(self, _t => "kron")
    }

    /// The leaves.
    pub fn leaves(&self) -> &[LeafSpec] {
        dispatch!(self, t => t.leaves())
    }

    /// See [`Transform::init`].
    pub fn init(&self, params: &[Tensor]) -> Result<AnyState> {
        dispatch!(self, t => Ok(AnyState::Kron(t.init(params)?)))
    }

    /// See [`Transform::hyper`].
    pub fn hyper(&self, state: &AnyState) -> Result<StepHyper> {
        match (self, state) {
            (AnyTransform::Kron(t), AnyState::Kron(s)) => Ok(t.hyper(s)),
        }
    }

    /// See [`Transform::update_with`].
    pub fn update_with(
        &self,
        grads: &[Tensor],
        state: &AnyState,
        params: Option<&[Tensor]>,
        hyper: StepHyper,
        rng: &mut dyn RandomSource,
    ) -> Result<(Vec<Tensor>, AnyState)> {
        match (self, state) {
            (AnyTransform::Kron(t), AnyState::Kron(s)) => {
                let (u, s) = t.update_with(grads, s, params, hyper, rng)?;
                Ok((u, AnyState::Kron(s)))
            }
        }
    }

    /// [`Self::update_with`] with the seeded random source of this step.
    pub fn update_seeded(
        &self,
        grads: &[Tensor],
        state: &AnyState,
        params: Option<&[Tensor]>,
        hyper: StepHyper,
    ) -> Result<(Vec<Tensor>, AnyState)> {
        let (seed, count) = match (self, state) {
            (AnyTransform::Kron(t), AnyState::Kron(s)) => (t.seed(), s.count),
        };
        let mut rng = crate::SeededRandom::for_step(seed, count + 1);
        self.update_with(grads, state, params, hyper, &mut rng)
    }

    /// See [`Transform::state_to_bytes`].
    pub fn state_to_bytes(&self, state: &AnyState) -> Result<Vec<u8>> {
        match (self, state) {
            (AnyTransform::Kron(t), AnyState::Kron(s)) => t.state_to_bytes(s),
        }
    }

    /// See [`Transform::state_from_bytes`].
    pub fn state_from_bytes(&self, bytes: &[u8], device: &Device) -> Result<AnyState> {
        dispatch!(self, t => Ok(AnyState::Kron(t.state_from_bytes(bytes, device)?)))
    }

    /// Checks that `state` belongs to this variant.
    pub fn check_variant(&self, state: &AnyState) -> Result<()> {
        match (self, state) {
            (AnyTransform::Kron(_), AnyState::Kron(_)) => Ok(()),
            #[allow(unreachable_patterns)]
            _ => Err(mismatch()),
        }
    }
}

impl AnyState {
    /// Steps taken.
    pub fn count(&self) -> u64 {
        match self {
            AnyState::Kron(s) => s.count,
        }
    }
}
