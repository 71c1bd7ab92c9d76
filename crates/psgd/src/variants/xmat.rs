//! PSGD XMat: one global preconditioner `Q = diag(a) + adiag(b)` (an "X"-shaped matrix:
//! a diagonal plus an anti-diagonal) over all parameters flattened into one vector, as
//! psgd-jax 0.2.9's `xmat` / `scale_by_xmat`. Memory: two vectors of the parameter count.

use crate::common::{
    add_eps, concat_flat, global_init_scale, global_init_scale_host, psgd_options, split_flat,
};
use crate::error::{PsgdError, Result};
use crate::kernels::elementwise::{self, Flat};
use crate::limits::StateSize;
use crate::random::RandomSource;
use crate::state_io::{LoadedState, StateFile};
use crate::step::{FitInputs, Preconditioner, Psgd, PsgdState, StepNormalizer};
use crate::telemetry::FactorStats;
use crate::transform::LeafSpec;
use candle_core::{DType, Device, Tensor};

/// PSGD XMat (see the module docs).
pub type XMat = Psgd<XMatPreconditioner>;
psgd_options! {
    /// Options of [`XMat`]: psgd-jax 0.2.9's `xmat` arguments (camelCase in JSON), with its
    /// defaults. XMat has no options of its own.
    XMatOptions, "xmat", zero_clip_disables: true, {}
}
/// State of [`XMat`].
pub type XMatState = PsgdState<XMatFactors>;

/// The two vectors of `Q = diag(a) + adiag(b)`.
#[derive(Debug, Clone)]
pub struct XMatFactors {
    /// The diagonal.
    pub a: Tensor,
    /// The anti-diagonal.
    pub b: Tensor,
    /// Never saved, for the telemetry: the step normaliser of the last fit (a float32
    /// scalar); `None` before a fit and after a load.
    pub norm: Option<Tensor>,
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
    const SHARED: bool = true;
    type Options = XMatOptions;
    type State = XMatFactors;

    fn new(leaves: &[LeafSpec], _o: &XMatOptions) -> Result<Self> {
        Ok(XMatPreconditioner {
            leaves: leaves.to_vec(),
            n: leaves
                .iter()
                .map(|l| l.shape.iter().product::<usize>())
                .sum(),
        })
    }

    fn state_sizes(&self) -> Vec<StateSize> {
        vec![StateSize {
            what: format!("the X-matrix preconditioner ({} parameters)", self.n),
            option: None,
            elems: 2 * self.n as u128,
        }]
    }

    fn init(&self, device: &Device, _rng: &mut dyn RandomSource) -> Result<XMatFactors> {
        Ok(XMatFactors {
            a: Tensor::ones(self.n, DType::F32, device)?,
            b: Tensor::zeros(self.n, DType::F32, device)?,
            norm: None,
        })
    }

    fn update(
        &self,
        st: &XMatFactors,
        inputs: &FitInputs,
        _rng: &mut dyn RandomSource,
    ) -> Result<XMatFactors> {
        let vectors = inputs.vectors.ok_or_else(|| {
            PsgdError::State("xmat: the preconditioner fit needs probe vectors".into())
        })?;
        let (a, b) = (std::slice::from_ref(&st.a), std::slice::from_ref(&st.b));
        crate::kernels::dispatch(
            &[a, b, vectors, inputs.hvps],
            |x| self.update_host(&x[0], &x[1], &x[2], &x[3], inputs, st.a.device()),
            || self.update_tensors(st, vectors, inputs),
        )
    }

    fn apply(&self, st: &XMatFactors, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        let (a, b) = (std::slice::from_ref(&st.a), std::slice::from_ref(&st.b));
        let out = crate::kernels::dispatch(
            &[a, b, grads],
            |x| {
                let [out] = elementwise::mirror_map([&x[0], &x[1], &x[2]], |i, j, _| {
                    let ([ai, bi, gi], [aj, bj, gj]) = (*i, *j);
                    let anti = ai * bi + aj * bj;
                    (
                        [(ai * ai + bj * bj) * gi + anti * gj],
                        [(aj * aj + bi * bi) * gj + anti * gi],
                    )
                });
                Ok(Tensor::from_vec(out, self.n, st.a.device())?)
            },
            || self.apply_tensors(st, grads),
        )?;
        split_flat(&out, &self.leaves)
    }

    fn save(&self, st: &XMatFactors, f: &mut StateFile) {
        f.tensor("a".into(), &st.a);
        f.tensor("b".into(), &st.b);
    }

    fn load(&self, f: &mut LoadedState) -> Result<XMatFactors> {
        Ok(XMatFactors {
            a: f.take_factor("a")?,
            b: f.take_typed("b")?,
            norm: None,
        })
    }

    fn factor_stats(&self, st: &XMatFactors) -> Result<Vec<FactorStats>> {
        FactorStats::whole_tree(&st.a, st.norm.as_ref())
    }

    /// The condition estimate of its diagonal `a`, and whether `a` and `b` are finite.
    fn conditions(&self, st: &XMatFactors) -> Result<Vec<f64>> {
        let estimates = vec![
            crate::guard::diag_condition(&st.a, false)?,
            crate::guard::finite_probe(&st.b)?,
        ];
        crate::common::shared_conditions(estimates, self.leaves.len())
    }

    fn take_leaves(
        &self,
        st: XMatFactors,
        from: &XMatFactors,
        which: &[bool],
    ) -> Result<XMatFactors> {
        Ok(crate::common::take_shared(st, from, which))
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

impl XMatPreconditioner {
    /// The fit on host vectors, in two passes over the mirrored pairs: the step size's
    /// reduction, then the new factors. Each element's arithmetic is the candle-op path's,
    /// in the same order.
    fn update_host(
        &self,
        a: &Flat,
        b: &Flat,
        v: &Flat,
        h: &Flat,
        inputs: &FitInputs,
        device: &Device,
    ) -> Result<XMatFactors> {
        let s = if inputs.first {
            global_init_scale_host(inputs, Some(v), h)
        } else {
            1.0
        };
        let fit = |i: &[f32; 4], j: &[f32; 4], mid: bool| {
            let ([ai, bi, vi, hi], [aj, bj, vj, hj]) = (*i, *j);
            let (ai, aj) = (ai * s, aj * s);
            let (qi, qj) = (ai * hi + bi * hj, aj * hj + bj * hi);
            // one denominator for both ends of the pair (products commute exactly)
            let den = ai * aj - bi * bj;
            let (wi, wj) = ((aj * vi - bj * vj) / den, (ai * vj - bi * vi) / den);
            let (u, w) = ([qi * qi, qj * qj], [wi * wi, wj * wj]);
            let nabla_b = qi * qj - wi * wj;
            XMatPair {
                a: [ai, aj],
                b: [bi, bj],
                u,
                w,
                nabla_a: [u[0] - w[0], u[1] - w[1]],
                // the middle element is on both diagonals; its b entry stays zero
                nabla_b: if mid { nabla_b * 0.0 } else { nabla_b },
            }
        };
        let inputs_4 = [a, b, v, h];
        let denom = match inputs.normalizer {
            StepNormalizer::Second => elementwise::mirror_fold(
                inputs_4,
                0f32,
                |i, j, mid, m: &mut f32| {
                    let e = fit(i, j, mid);
                    *m = m.max(e.u[0] + e.w[0]).max(e.u[1] + e.w[1]);
                },
                f32::max,
            ),
            StepNormalizer::First => {
                let (ma, mb) = elementwise::mirror_fold(
                    inputs_4,
                    (0f32, 0f32),
                    |i, j, mid, m: &mut (f32, f32)| {
                        let e = fit(i, j, mid);
                        let na = e.nabla_a[0].abs().max(e.nabla_a[1].abs());
                        *m = (m.0.max(na), m.1.max(e.nabla_b.abs()));
                    },
                    |x, y| (x.0.max(y.0), x.1.max(y.1)),
                );
                ma.max(mb)
            }
        };
        let mu = (1.0 / denom.max(1e-25)) * inputs.precond_lr as f32;
        let [a_new, b_new] = elementwise::mirror_map(inputs_4, |i, j, mid| {
            let e = fit(i, j, mid);
            let ([ai, aj], [bi, bj], [nai, naj], nb) = (e.a, e.b, e.nabla_a, e.nabla_b);
            (
                [
                    ai - (nai * ai + nb * bj) * mu,
                    bi - (nai * bi + nb * aj) * mu,
                ],
                [
                    aj - (naj * aj + nb * bi) * mu,
                    bj - (naj * bj + nb * ai) * mu,
                ],
            )
        });
        Ok(XMatFactors {
            a: Tensor::from_vec(a_new, self.n, device)?,
            b: Tensor::from_vec(b_new, self.n, device)?,
            norm: Some(Tensor::new(denom, device)?),
        })
    }

    /// The fit as candle ops, for tensors [`elementwise`] does not handle.
    fn update_tensors(
        &self,
        st: &XMatFactors,
        vectors: &[Tensor],
        inputs: &FitInputs,
    ) -> Result<XMatFactors> {
        let v = concat_flat(vectors)?;
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
        Ok(XMatFactors {
            a: a_new,
            b: b_new,
            norm: Some(denom),
        })
    }

    /// `P·g` with `P = QᵀQ` as candle ops, as one flat vector.
    fn apply_tensors(&self, st: &XMatFactors, grads: &[Tensor]) -> Result<Tensor> {
        let g = concat_flat(grads)?;
        let (a, b) = (&st.a, &st.b);
        let ab = (a * b)?;
        let diag = (a.sqr()? + flip(&b.sqr()?)?)?;
        let anti = (&ab + flip(&ab)?)?;
        Ok(((diag * &g)? + (anti * flip(&g)?)?)?)
    }
}

/// A mirrored pair's share of the fit, at its two ends: the factors, `(Qh)²`,
/// `(Q⁻ᵀv)²` and the gradients (`∇b` is the same at both ends).
struct XMatPair {
    a: [f32; 2],
    b: [f32; 2],
    u: [f32; 2],
    w: [f32; 2],
    nabla_a: [f32; 2],
    nabla_b: f32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SeededRandom;

    fn max_rel_diff(x: &Tensor, y: &Tensor) -> f32 {
        let max = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>();
        max(&(x - y).unwrap()).unwrap() / max(y).unwrap().max(1e-30)
    }

    /// The host passes against the candle-op path, on leaves that span several parallel
    /// tasks and whose pieces straddle task boundaries, for an odd and an even length.
    #[test]
    fn host_passes_match_the_candle_ops() {
        let mut rng = SeededRandom::for_step(7, 1);
        for extra in [vec![3], vec![4]] {
            let leaves = [vec![7], vec![129, 257], vec![3, 5], vec![], extra]
                .iter()
                .enumerate()
                .map(|(i, s)| LeafSpec::new(format!("l{i}"), s))
                .collect::<Vec<_>>();
            let p = XMatPreconditioner::new(&leaves, &XMatOptions::default()).unwrap();
            let mut rand = |m: f64, s: f64| -> Vec<Tensor> {
                leaves
                    .iter()
                    .map(|l| {
                        let t = rng.normal(&l.shape, &Device::Cpu).unwrap();
                        ((t * s).unwrap() + m).unwrap()
                    })
                    .collect()
            };
            let st = XMatFactors {
                a: concat_flat(&rand(1.0, 0.1)).unwrap(),
                b: concat_flat(&rand(0.0, 0.1)).unwrap(),
                norm: None,
            };
            let (v, h) = (rand(0.0, 1.0), rand(0.0, 1.0));
            for (first, hessian, normalizer) in [
                (true, true, StepNormalizer::Second),
                (true, false, StepNormalizer::First),
                (false, false, StepNormalizer::Second),
                (false, true, StepNormalizer::First),
            ] {
                let inputs = FitInputs {
                    vectors: Some(&v),
                    hvps: &h,
                    hessian,
                    first,
                    count: 0,
                    precond_lr: 0.1,
                    init_scale: None,
                    normalizer,
                    precision: Default::default(),
                };
                let host = p.update(&st, &inputs, &mut SeededRandom::for_step(0, 1));
                let host = host.unwrap();
                let ops = p.update_tensors(&st, &v, &inputs).unwrap();
                for (x, y) in [(&host.a, &ops.a), (&host.b, &ops.b)] {
                    assert!(
                        max_rel_diff(x, y) < 1e-6,
                        "{first} {hessian} {normalizer:?}"
                    );
                }
            }
            let host = p.apply(&st, &h).unwrap();
            let ops = split_flat(&p.apply_tensors(&st, &h).unwrap(), &leaves).unwrap();
            for (x, y) in host.iter().zip(&ops) {
                assert_eq!(x.dims(), y.dims());
                assert_eq!(max_rel_diff(x, y), 0.0);
            }
        }
    }
}
