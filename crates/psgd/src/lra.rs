//! PSGD LRA ("UVd"): one global preconditioner `Q = (I + U·Vᵀ)·diag(d)` over all
//! parameters flattened into one column, low rank plus diagonal, as psgd-jax 0.2.9's
//! `low_rank_approximation` / `scale_by_lra`. `U` and `V` start random (drawn at init);
//! each fit updates `d` and then either `U` or `V` (a coin flip), and about one fit in a
//! hundred rebalances the norms of `U` and `V`.

use crate::common::{
    add_eps, concat_flat, global_init_scale, split_flat, FitInputs, Preconditioner, Psgd,
    PsgdOptions, PsgdState, StepNormalizer,
};
use crate::error::{PsgdError, Result};
use crate::linalg::solve_small;
use crate::precision::Precision;
use crate::random::RandomSource;
use crate::state_io::{LoadedState, StateFile};
use crate::transform::LeafSpec;
use candle_core::{DType, Device, Tensor};

/// PSGD LRA (see the module docs).
pub type Lra = Psgd<LraPreconditioner>;
/// Options of [`Lra`].
pub type LraOptions = PsgdOptions<LraVariantOptions>;
/// State of [`Lra`].
pub type LraState = PsgdState<LraFactors>;

/// The option only LRA has.
#[derive(Debug, Clone)]
pub struct LraVariantOptions {
    /// Rank of `U` and `V` (psgd-jax's `uvd_rank_of_approximation`). Default 10.
    pub rank: usize,
}

impl Default for LraVariantOptions {
    fn default() -> Self {
        LraVariantOptions { rank: 10 }
    }
}

/// The factors of `Q = (I + U·Vᵀ)·diag(d)`.
#[derive(Debug, Clone)]
pub struct LraFactors {
    /// `(n, rank)`.
    pub u: Tensor,
    /// `(n, rank)`.
    pub v: Tensor,
    /// `(n, 1)`.
    pub d: Tensor,
}

/// The LRA preconditioner for a fixed list of leaves.
#[derive(Debug, Clone)]
pub struct LraPreconditioner {
    leaves: Vec<LeafSpec>,
    n: usize,
    rank: usize,
}

/// `(I + U·Vᵀ)·x`.
fn ip_uvt(u: &Tensor, v: &Tensor, x: &Tensor, p: Precision) -> Result<Tensor> {
    Ok((x + p.matmul(u, &p.matmul(&v.t()?, x)?)?)?)
}

/// The Frobenius norm as a 0-d tensor.
fn norm(t: &Tensor) -> Result<Tensor> {
    Ok(t.sqr()?.sum_all()?.sqrt()?)
}

/// `x · s` for a 0-d `s`.
fn scale(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(s)?)
}

/// `lr / max(x, eps)` as a 0-d tensor.
fn step_size(lr: f64, x: &Tensor) -> Result<Tensor> {
    Ok((add_eps(x)?.recip()? * lr)?)
}

impl LraPreconditioner {
    fn column(&self, ts: &[Tensor]) -> Result<Tensor> {
        Ok(concat_flat(ts)?.reshape((self.n, 1))?)
    }
}

impl Preconditioner for LraPreconditioner {
    const NAME: &'static str = "lra";
    const WHITENING_VECTOR: bool = true;
    const ZERO_CLIP_DISABLES: bool = false;
    type Options = LraVariantOptions;
    type State = LraFactors;

    fn parse_option(o: &mut LraVariantOptions, key: &str, v: &serde_json::Value) -> Result<bool> {
        if key == "uvd_rank_of_approximation" {
            o.rank = crate::json::uint(key, v)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn validate(o: &LraVariantOptions) -> Result<()> {
        if o.rank == 0 {
            return Err(PsgdError::option_range(
                "uvd_rank_of_approximation",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn new(leaves: &[LeafSpec], o: &LraVariantOptions) -> Result<Self> {
        Ok(LraPreconditioner {
            leaves: leaves.to_vec(),
            n: leaves
                .iter()
                .map(|l| l.shape.iter().product::<usize>())
                .sum(),
            rank: o.rank,
        })
    }

    fn init(&self, device: &Device, rng: &mut dyn RandomSource) -> Result<LraFactors> {
        let s = ((self.n * (self.rank + 10)) as f64).sqrt();
        let u = (rng.normal(&[self.n, self.rank], device)? / s)?;
        let v = (rng.normal(&[self.n, self.rank], device)? / s)?;
        Ok(LraFactors {
            u,
            v,
            d: Tensor::ones((self.n, 1), DType::F32, device)?,
        })
    }

    fn update(
        &self,
        st: &LraFactors,
        inputs: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<LraFactors> {
        let p = inputs.precision;
        let lr = inputs.precond_lr;
        let v = self.column(inputs.vectors.ok_or_else(|| {
            PsgdError::State("lra: the preconditioner fit needs probe vectors".into())
        })?)?;
        let h = self.column(inputs.hvps)?;
        let mut d = st.d.clone();
        if inputs.first {
            d = scale(&d, &global_init_scale(inputs, Some(&v), &h)?)?;
        }
        let (mut u, mut vv) = (st.u.clone(), st.v.clone());
        // keeps the dynamic ranges of U and V alike; psgd-jax draws this first
        if rng.uniform()? < 0.01 {
            let rho = (norm(&u)? / norm(&vv)?)?.sqrt()?;
            u = u.broadcast_div(&rho)?;
            vv = vv.broadcast_mul(&rho)?;
        }

        let qh = ip_uvt(&u, &vv, &(&d * &h)?, p)?;
        let ph = (&d * ip_uvt(&vv, &u, &qh, p)?)?;
        let ip_vtu = (Tensor::eye(self.rank, DType::F32, u.device())? + p.matmul(&vv.t()?, &u)?)?;
        let inv_qtv = (&v / &d)?;
        let u_solve = solve_small(&ip_vtu.t()?, &p.matmul(&u.t()?, &inv_qtv)?)?;
        let inv_qtv = (&inv_qtv - p.matmul(&vv, &u_solve)?)?;
        let v_solve = solve_small(&ip_vtu, &p.matmul(&vv.t()?, &inv_qtv)?)?;
        let inv_pv = ((&inv_qtv - p.matmul(&u, &v_solve)?)? / &d)?;

        let nabla_d = ((&ph * &h)? - (&v * &inv_pv)?)?;
        let mu = match inputs.normalizer {
            StepNormalizer::Second => {
                // two separate rsqrts, as the reference, to avoid underflow
                let r1 = add_eps(&(ph.sqr()? + v.sqr()?)?)?.sqrt()?.recip()?;
                let r2 = add_eps(&(h.sqr()? + inv_pv.sqr()?)?)?.sqrt()?.recip()?;
                ((r1 * r2)?.flatten_all()?.min(0)? * lr)?
            }
            StepNormalizer::First => step_size(lr, &nabla_d.abs()?.flatten_all()?.max(0)?)?,
        };
        let d = (&d - scale(&(&d * &nabla_d)?, &mu)?)?;

        let (a, b) = (&qh, &inv_qtv);
        let dot = |x: &Tensor, y: &Tensor| -> Result<Tensor> {
            Ok(p.matmul(&x.t()?, y)?.squeeze(1)?.squeeze(0)?)
        };
        if rng.uniform()? < 0.5 {
            let atv = p.matmul(&a.t()?, &vv)?;
            let btv = p.matmul(&b.t()?, &vv)?;
            let atvvt = p.matmul(&atv, &vv.t()?)?;
            let btvvt = p.matmul(&btv, &vv.t()?)?;
            let mu = match inputs.normalizer {
                StepNormalizer::Second => step_size(
                    lr,
                    &((norm(a)? * norm(&atvvt)?)? + (norm(b)? * norm(&btvvt)?)?)?,
                )?,
                StepNormalizer::First => {
                    let row = |x: &Tensor, y: &Tensor| dot(&x.t()?, &y.t()?);
                    let n2 = (((dot(a, a)? * row(&atvvt, &atvvt)?)?
                        + (dot(b, b)? * row(&btvvt, &btvvt)?)?)?
                        - ((dot(a, b)? * row(&atvvt, &btvvt)?)? * 2.0)?)?;
                    step_size(lr, &n2.abs()?.sqrt()?)?
                }
            };
            let delta = (p.matmul(a, &p.matmul(&atv, &ip_vtu)?)?
                - p.matmul(b, &p.matmul(&btv, &ip_vtu)?)?)?;
            u = (&u - scale(&delta, &mu)?)?;
        } else {
            let atu = p.matmul(&a.t()?, &u)?;
            let btu = p.matmul(&b.t()?, &u)?;
            let uuta = p.matmul(&u, &atu.t()?)?;
            let uutb = p.matmul(&u, &btu.t()?)?;
            let mu = match inputs.normalizer {
                StepNormalizer::Second => step_size(
                    lr,
                    &((norm(a)? * norm(&uuta)?)? + (norm(b)? * norm(&uutb)?)?)?,
                )?,
                StepNormalizer::First => {
                    let n2 = (((dot(&uuta, &uuta)? * dot(a, a)?)?
                        + (dot(&uutb, &uutb)? * dot(b, b)?)?)?
                        - ((dot(&uuta, &uutb)? * dot(a, b)?)? * 2.0)?)?;
                    step_size(lr, &n2.abs()?.sqrt()?)?
                }
            };
            let left = p.matmul(&(a + p.matmul(&vv, &atu.t()?)?)?, &atu)?;
            let right = p.matmul(&(b + p.matmul(&vv, &btu.t()?)?)?, &btu)?;
            vv = (&vv - scale(&(left - right)?, &mu)?)?;
        }
        Ok(LraFactors { u, v: vv, d })
    }

    fn apply(&self, st: &LraFactors, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        // outside the fit psgd-jax uses the default (float32 on CPU) matmul precision
        let p = Precision::Float32;
        let g = self.column(grads)?;
        let g = ip_uvt(&st.u, &st.v, &(&st.d * &g)?, p)?;
        let out = (&st.d * ip_uvt(&st.v, &st.u, &g, p)?)?;
        split_flat(&out.flatten_all()?, &self.leaves)
    }

    fn save(&self, st: &LraFactors, f: &mut StateFile) {
        f.tensor("U".into(), &st.u);
        f.tensor("V".into(), &st.v);
        f.tensor("d".into(), &st.d);
    }

    fn load(&self, f: &mut LoadedState) -> Result<LraFactors> {
        Ok(LraFactors {
            u: f.take("U")?,
            v: f.take("V")?,
            d: f.take("d")?,
        })
    }

    fn check(&self, st: &LraFactors) -> Result<()> {
        for (name, t, want) in [
            ("U", &st.u, [self.n, self.rank]),
            ("V", &st.v, [self.n, self.rank]),
            ("d", &st.d, [self.n, 1]),
        ] {
            if t.dims() != want {
                return Err(PsgdError::State(format!(
                    "lra factor '{name}' has shape {:?}, expected {want:?}",
                    t.dims()
                )));
            }
        }
        Ok(())
    }
}
