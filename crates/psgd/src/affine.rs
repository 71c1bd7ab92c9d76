//! PSGD Affine (psgd-jax 0.2.9's `affine`): NOT IMPLEMENTED YET, a placeholder so the
//! variant is registered; every method fails with a clear error.

use crate::common::{FitInputs, Preconditioner, Psgd, PsgdOptions, PsgdState};
use crate::error::{PsgdError, Result};
use crate::random::RandomSource;
use crate::state_io::{LoadedState, StateFile};
use crate::transform::LeafSpec;
use candle_core::{Device, Tensor};

/// PSGD Affine (placeholder).
pub type Affine = Psgd<AffinePreconditioner>;
/// Options of [`Affine`].
pub type AffineOptions = PsgdOptions<AffineVariantOptions>;
/// State of [`Affine`].
pub type AffineState = PsgdState<()>;

/// The options only Affine has.
#[derive(Debug, Clone, Default)]
pub struct AffineVariantOptions {}

/// The Affine preconditioner (placeholder).
#[derive(Debug, Clone)]
pub struct AffinePreconditioner;

fn todo() -> PsgdError {
    PsgdError::option_range("variant", "affine is not implemented yet")
}

impl Preconditioner for AffinePreconditioner {
    const NAME: &'static str = "affine";
    const WHITENING_VECTOR: bool = false;
    const ZERO_CLIP_DISABLES: bool = false;
    type Options = AffineVariantOptions;
    type State = ();

    fn parse_option(_o: &mut Self::Options, _key: &str, _v: &serde_json::Value) -> Result<bool> {
        Ok(false)
    }

    fn new(_leaves: &[LeafSpec], _o: &Self::Options) -> Result<Self> {
        Err(todo())
    }

    fn init(&self, _device: &Device, _rng: &mut dyn RandomSource) -> Result<()> {
        Err(todo())
    }

    fn update(&self, _s: &(), _inputs: &FitInputs, _rng: &mut dyn RandomSource) -> Result<()> {
        Err(todo())
    }

    fn apply(&self, _s: &(), _grads: &[Tensor]) -> Result<Vec<Tensor>> {
        Err(todo())
    }

    fn save(&self, _s: &(), _f: &mut StateFile) {}

    fn load(&self, _f: &mut LoadedState) -> Result<()> {
        Err(todo())
    }

    fn check(&self, _s: &()) -> Result<()> {
        Ok(())
    }
}
