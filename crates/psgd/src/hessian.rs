//! The finite-difference Hessian-vector product behind `hessianHelper` (psgd-jax's
//! `hessian_helper` without an exact `hvp`): the update decision and the probe are drawn
//! here, with the package's one random source, and the shifted params and the difference
//! are formed on the leaves' own device. The caller evaluates the gradient at the two
//! shifted points in between.

use crate::error::{PsgdError, Result};
use crate::random::{RandomSource, SeededRandom};
use candle_core::{DType, Tensor};

/// What one step of the Hessian mode draws: whether to fit, and when it does, the probe
/// and the two points the gradient is needed at.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Whether the preconditioner is fitted this step (`u < p`, and always on steps 0, 1).
    pub update_preconditioner: bool,
    /// The probe vector `v` (one per leaf, float32), when fitting.
    pub vector: Vec<Tensor>,
    /// `params + δ·v` in each param's dtype, when fitting.
    pub plus: Vec<Tensor>,
    /// `params − δ·v`, when fitting.
    pub minus: Vec<Tensor>,
    /// The step δ.
    pub delta: f64,
}

fn sum_sq(ts: &[Tensor]) -> Result<f64> {
    let mut s = 0.0;
    for t in ts {
        s += t
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(s)
}

/// Draws step `step`'s decision and probe (seeded by `seed`) for `params`. The step
/// `δ = ∛ε₃₂ · max(1, rms(p)) / rms(v)` balances float32 rounding against the truncation
/// error of the central difference.
pub fn probe(params: &[Tensor], seed: u64, step: u64, update_probability: f64) -> Result<Probe> {
    if !(0.0..=1.0).contains(&update_probability) {
        return Err(PsgdError::option_range(
            "preconditionerUpdateProbability",
            format!("must be in [0, 1], got {update_probability}"),
        ));
    }
    let mut rng = SeededRandom::for_step(seed, step);
    let u = rng.uniform()?;
    let update = u < update_probability as f32 || step < 2;
    if !update {
        return Ok(Probe {
            update_preconditioner: false,
            vector: vec![],
            plus: vec![],
            minus: vec![],
            delta: 0.0,
        });
    }
    let vector = params
        .iter()
        .map(|p| rng.normal(p.dims(), p.device()))
        .collect::<Result<Vec<_>>>()?;
    let n: usize = params.iter().map(Tensor::elem_count).sum::<usize>().max(1);
    let rms_p = (sum_sq(params)? / n as f64).sqrt();
    let rms_v = (sum_sq(&vector)? / n as f64).sqrt();
    let delta = (f32::EPSILON as f64).cbrt() * rms_p.max(1.0) / rms_v.max(1e-30);
    let shift = |sign: f64| -> Result<Vec<Tensor>> {
        params
            .iter()
            .zip(&vector)
            .map(|(p, v)| {
                let s = (p.to_dtype(DType::F32)? + (v * (sign * delta))?)?;
                Ok(s.to_dtype(p.dtype())?)
            })
            .collect()
    };
    Ok(Probe {
        update_preconditioner: true,
        plus: shift(1.0)?,
        minus: shift(-1.0)?,
        vector,
        delta,
    })
}

/// The central difference from the gradients at `probe.plus` and `probe.minus`:
/// `hvp = (∇f(p+) − ∇f(p−)) / 2δ`, and the probe actually realised in the params' dtype,
/// `vector = (p+ − p−) / 2δ`, so that on a quadratic `hvp = H·vector` holds to rounding.
/// Both float32.
pub fn difference(
    probe: &Probe,
    grads_plus: &[Tensor],
    grads_minus: &[Tensor],
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let n = probe.plus.len();
    if grads_plus.len() != n || grads_minus.len() != n {
        return Err(PsgdError::LeafCount {
            what: "grads",
            expected: n,
            got: grads_plus.len().min(grads_minus.len()),
        });
    }
    let half = 1.0 / (2.0 * probe.delta);
    let diff = |a: &[Tensor], b: &[Tensor]| -> Result<Vec<Tensor>> {
        a.iter()
            .zip(b)
            .map(|(a, b)| {
                let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
                Ok((d * half)?)
            })
            .collect()
    };
    Ok((
        diff(grads_plus, grads_minus)?,
        diff(&probe.plus, &probe.minus)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// On a quadratic `f = ½ xᵀHx` with diagonal `H`, the difference is `H·vector`.
    #[test]
    fn central_difference_is_exact_on_a_quadratic() {
        let dev = Device::Cpu;
        let h = Tensor::new(&[1f32, 2., 3., 4.], &dev).unwrap();
        let x = Tensor::new(&[0.5f32, -1., 2., 0.25], &dev).unwrap();
        let p = probe(std::slice::from_ref(&x), 7, 3, 1.0).unwrap();
        assert!(p.update_preconditioner);
        let g = |t: &Tensor| (t * &h).unwrap();
        let (hvp, v) = difference(&p, &[g(&p.plus[0])], &[g(&p.minus[0])]).unwrap();
        let want = (&v[0] * &h).unwrap();
        let err = (&hvp[0] - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-3, "{err}");
        // the same seed and step draw the same probe; another step another one
        let again = probe(std::slice::from_ref(&x), 7, 3, 1.0).unwrap();
        assert_eq!(
            again.vector[0].to_vec1::<f32>().unwrap(),
            p.vector[0].to_vec1::<f32>().unwrap()
        );
        let other = probe(std::slice::from_ref(&x), 7, 4, 1.0).unwrap();
        assert_ne!(
            other.vector[0].to_vec1::<f32>().unwrap(),
            p.vector[0].to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn steps_zero_and_one_always_fit_and_p_zero_never_after() {
        let x = [Tensor::new(&[1f32], &Device::Cpu).unwrap()];
        assert!(probe(&x, 0, 0, 0.0).unwrap().update_preconditioner);
        assert!(probe(&x, 0, 1, 0.0).unwrap().update_preconditioner);
        assert!((2..20).all(|s| !probe(&x, 0, s, 0.0).unwrap().update_preconditioner));
        assert!(probe(&x, 0, 5, 1.5).is_err());
    }
}
