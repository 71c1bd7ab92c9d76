//! PSGD XMat: one global preconditioner `Q = diag(a) + adiag(b)` (an "X"-shaped matrix:
//! a diagonal plus an anti-diagonal) over all parameters flattened into one vector, as
//! psgd-jax 0.2.9's `xmat` / `scale_by_xmat`. Memory: two vectors of the parameter count.

use crate::common::{
    add_eps, concat_flat, global_init_scale, split_flat, FitInputs, Preconditioner, Psgd,
    PsgdOptions, PsgdState, StepNormalizer,
};
use crate::error::{PsgdError, Result};
use crate::random::RandomSource;
use crate::state_io::{LoadedState, StateFile};
use crate::transform::LeafSpec;
use candle_core::{DType, Device, Tensor};

/// PSGD XMat (see the module docs).
pub type XMat = Psgd<XMatPreconditioner>;
/// Options of [`XMat`]: the shared options only.
pub type XMatOptions = PsgdOptions<()>;
/// State of [`XMat`].
pub type XMatState = PsgdState<XMatFactors>;

/// The two vectors of `Q = diag(a) + adiag(b)`.
#[derive(Debug, Clone)]
pub struct XMatFactors {
    /// The diagonal.
    pub a: Tensor,
    /// The anti-diagonal.
    pub b: Tensor,
}

/// The XMat preconditioner for a fixed list of leaves.
#[derive(Debug, Clone)]
pub struct XMatPreconditioner {
    leaves: Vec<LeafSpec>,
    n: usize,
}

fn flip(t: &Tensor) -> Result<Tensor> {
    Ok(t.flip(&[0])?)
}

impl Preconditioner for XMatPreconditioner {
    const NAME: &'static str = "xmat";
    const WHITENING_VECTOR: bool = true;
    const ZERO_CLIP_DISABLES: bool = true;
    type Options = ();
    type State = XMatFactors;

    fn parse_option(_o: &mut (), _key: &str, _v: &serde_json::Value) -> Result<bool> {
        Ok(false)
    }

    fn new(leaves: &[LeafSpec], _o: &()) -> Result<Self> {
        Ok(XMatPreconditioner {
            leaves: leaves.to_vec(),
            n: leaves
                .iter()
                .map(|l| l.shape.iter().product::<usize>())
                .sum(),
        })
    }

    fn init(&self, device: &Device, _rng: &mut dyn RandomSource) -> Result<XMatFactors> {
        Ok(XMatFactors {
            a: Tensor::ones(self.n, DType::F32, device)?,
            b: Tensor::zeros(self.n, DType::F32, device)?,
        })
    }

    fn update(
        &self,
        st: &XMatFactors,
        inputs: &FitInputs,
        _rng: &mut dyn RandomSource,
    ) -> Result<XMatFactors> {
        let v = concat_flat(inputs.vectors.ok_or_else(|| {
            PsgdError::State("xmat: the preconditioner fit needs probe vectors".into())
        })?)?;
        let h = concat_flat(inputs.hvps)?;
        let a = if inputs.first {
            st.a.broadcast_mul(&global_init_scale(inputs, Some(&v), &h)?)?
        } else {
            st.a.clone()
        };
        let b = &st.b;
        let (aflip, bflip) = (flip(&a)?, flip(b)?);
        let qh = ((&a * &h)? + (b * flip(&h)?)?)?;
        let inv_qtv =
            (((&aflip * &v)? - (&bflip * flip(&v)?)?)? / ((&a * &aflip)? - (b * &bflip)?)?)?;
        let (u, w) = (qh.sqr()?, inv_qtv.sqr()?);
        let nabla_a = (&u - &w)?;
        let mut nabla_b = ((&qh * flip(&qh)?)? - (&inv_qtv * flip(&inv_qtv)?)?)?;
        if self.n % 2 == 1 {
            // the middle element is on both diagonals; its b entry stays zero
            let mut mask = vec![1f32; self.n];
            mask[self.n / 2] = 0.0;
            nabla_b = (nabla_b * Tensor::from_vec(mask, self.n, h.device())?)?;
        }
        let denom = match inputs.normalizer {
            StepNormalizer::Second => (&u + &w)?.max(0)?,
            StepNormalizer::First => nabla_a.abs()?.max(0)?.maximum(&nabla_b.abs()?.max(0)?)?,
        };
        let mu = (add_eps(&denom)?.recip()? * inputs.precond_lr)?;
        let a_new = (&a - ((&nabla_a * &a)? + (&nabla_b * &bflip)?)?.broadcast_mul(&mu)?)?;
        let b_new = (b - ((&nabla_a * b)? + (&nabla_b * &aflip)?)?.broadcast_mul(&mu)?)?;
        Ok(XMatFactors { a: a_new, b: b_new })
    }

    fn apply(&self, st: &XMatFactors, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        let g = concat_flat(grads)?;
        let (a, b) = (&st.a, &st.b);
        let ab = (a * b)?;
        let diag = (a.sqr()? + flip(&b.sqr()?)?)?;
        let anti = (&ab + flip(&ab)?)?;
        let out = ((diag * &g)? + (anti * flip(&g)?)?)?;
        split_flat(&out, &self.leaves)
    }

    fn save(&self, st: &XMatFactors, f: &mut StateFile) {
        f.tensor("a".into(), &st.a);
        f.tensor("b".into(), &st.b);
    }

    fn load(&self, f: &mut LoadedState) -> Result<XMatFactors> {
        Ok(XMatFactors {
            a: f.take("a")?,
            b: f.take("b")?,
        })
    }

    fn check(&self, st: &XMatFactors) -> Result<()> {
        for (name, t) in [("a", &st.a), ("b", &st.b)] {
            if t.dims() != [self.n] {
                return Err(PsgdError::State(format!(
                    "xmat factor '{name}' has shape {:?}, expected [{}]",
                    t.dims(),
                    self.n
                )));
            }
        }
        Ok(())
    }
}
