//! The numerics of Kron's fit that the options choose, whatever the update rule: the
//! spectral-norm lower bound that normalises a dense factor's step (`normEstimator`), the
//! damping of the fit's input (`damping`), the running Lipschitz bound
//! (`lipschitzBeta`), the cap of the Procrustes rotation (`procrustesMaxStep`) and when
//! the factors are balanced (`balanceProbability`, `balanceEvery`, `balanceWhen`).
//! [`FitNumerics`] resolves the options against the rule's own choices once; the fits
//! call its methods.

use super::{KronOptions, UpdateRule};
use crate::error::{PsgdError, Result};
use crate::kernels::fused;
use crate::kernels::linalg::{norm_lower_bound, norm_lower_bound_sym_sum, symmetric_from_upper};
use crate::kernels::precision::Precision;
use crate::kernels::subspace::{
    norm_lower_bound_skh, norm_lower_bound_spd, procrustes_step, procrustes_step3,
};
use crate::random::RandomSource;
use candle_core::{DType, Tensor};

/// How the fit bounds the spectral norm of a dense factor's terms (`normEstimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormEstimator {
    /// psgd-jax's deterministic bound: the row of largest norm and one product with it.
    RowNorm,
    /// psgd_torch's random subspace iteration: 32 standard normal rows per factor and fit,
    /// two half-iterations.
    Subspace,
    /// heavyball's deterministic power iteration from the row of largest norm, two
    /// iterations (also the Procrustes step's normaliser).
    Power,
}

impl crate::options::Choice for NormEstimator {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("rowNorm", NormEstimator::RowNorm),
        ("subspace", NormEstimator::Subspace),
        ("power", NormEstimator::Power),
    ];
}
crate::options::choice_option!(NormEstimator, "'rowNorm' | 'subspace' | 'power'");

/// When the factors are balanced, relative to the fit (`balanceWhen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceWhen {
    /// Before the fit (psgd-jax, heavyball, distributed-kron); a random decision is one
    /// uniform draw before any other draw of the fit, for all leaves.
    BeforeFit,
    /// After each leaf's fit (psgd_torch); a random decision is one uniform draw per
    /// leaf, after the leaf's other draws.
    AfterFit,
}

impl crate::options::Choice for BalanceWhen {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("beforeFit", BalanceWhen::BeforeFit),
        ("afterFit", BalanceWhen::AfterFit),
    ];
}
crate::options::choice_option!(BalanceWhen, "'beforeFit' | 'afterFit'");

/// Iterations of heavyball's power iteration (its `precond_update_power_iterations`).
pub const POWER_ITERS: usize = 2;

/// psgd_torch's damping of the inverse-free rules' noise, `(δ + eps·|g|)·ν`.
pub const TORCH_DAMPING: f64 = 1e-9;

/// psgd_torch's smoothing of the running Lipschitz bound (`betaL`).
pub const TORCH_LIPSCHITZ_BETA: f64 = 0.9;

/// psgd-jax's and psgd_torch's probability of balancing at a fit.
pub const BALANCE_PROBABILITY: f64 = 0.01;

/// What decides whether a fit balances the factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BalanceTrigger {
    /// A uniform draw `u`, balancing when `u < p`.
    Draw(f64),
    /// Deterministically, at the fits of steps whose 1-based count is a multiple of `n`.
    Every(u64),
}

/// The fit's numerics, resolved from the options and the rule (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitNumerics {
    pub estimator: NormEstimator,
    /// `None`: psgd-jax's `sqrt(eps)·mean|g|·v`; `Some(δ)`: `(δ + eps·|g|)·ν`.
    pub damping: Option<f64>,
    /// `None`: psgd-jax's memoryless `lr / (ℓ + tiny)`; `Some(β)`: the running bound.
    pub lipschitz_beta: Option<f64>,
    pub procrustes_max_step: f64,
    pub balance: BalanceTrigger,
    pub balance_when: BalanceWhen,
}

impl FitNumerics {
    /// The options' numerics; `null` ones are the rule's own (psgd-jax's under `'EQ'`,
    /// psgd_torch's under the inverse-free rules, whose QEP balances before every fit with
    /// no draw). Refuses both `balanceProbability` and
    /// `balanceEvery`.
    pub fn new(o: &KronOptions) -> Result<Self> {
        let eq = !o.update_rule.inverse_free();
        // QEP's own balance is before every fit, with no draw
        let qep = o.update_rule == UpdateRule::Qep;
        let balance = match (o.balance_probability, o.balance_every) {
            (Some(_), Some(_)) => {
                return Err(PsgdError::option_range(
                    "balanceEvery",
                    "cannot be set together with balanceProbability (one decides when the \
                     factors are balanced)",
                ))
            }
            (_, Some(n)) => BalanceTrigger::Every(n as u64),
            (None, None) if qep => BalanceTrigger::Every(1),
            (p, None) => BalanceTrigger::Draw(p.unwrap_or(BALANCE_PROBABILITY)),
        };
        Ok(FitNumerics {
            estimator: o.norm_estimator.unwrap_or(if eq {
                NormEstimator::RowNorm
            } else {
                NormEstimator::Subspace
            }),
            damping: if eq {
                o.damping
            } else {
                Some(o.damping.unwrap_or(TORCH_DAMPING))
            },
            lipschitz_beta: if eq {
                o.lipschitz_beta
            } else {
                Some(o.lipschitz_beta.unwrap_or(TORCH_LIPSCHITZ_BETA))
            },
            procrustes_max_step: o.procrustes_max_step,
            balance,
            balance_when: o.balance_when.unwrap_or(if eq || qep {
                BalanceWhen::BeforeFit
            } else {
                BalanceWhen::AfterFit
            }),
        })
    }

    /// Whether the state keeps a Lipschitz bound per factor.
    pub fn keeps_bounds(&self) -> bool {
        self.lipschitz_beta.is_some()
    }

    /// Whether a dense factor's norm bound takes a random subspace `(32, d)` per fit.
    pub fn draws_subspace(&self) -> bool {
        self.estimator == NormEstimator::Subspace
    }

    /// Whether the Procrustes steps of `rule` take a random subspace: under PRO and PRO4P,
    /// unless the estimator is the power iteration (which also normalises the rotation).
    pub fn draws_rotation(&self, rule: UpdateRule) -> bool {
        matches!(rule, UpdateRule::Pro | UpdateRule::Pro4p)
            && self.estimator != NormEstimator::Power
    }

    fn balances_at(
        &self,
        when: BalanceWhen,
        count: u64,
        rng: &mut dyn RandomSource,
    ) -> Result<bool> {
        if when != self.balance_when {
            return Ok(false);
        }
        Ok(match self.balance {
            BalanceTrigger::Draw(p) => rng.uniform()? < p as f32,
            BalanceTrigger::Every(n) => (count + 1).is_multiple_of(n),
        })
    }

    /// Whether the fit of the step with 0-based `count` balances every leaf before it
    /// (a random decision draws here, before every other draw of the fit).
    pub fn balance_before(&self, count: u64, rng: &mut dyn RandomSource) -> Result<bool> {
        self.balances_at(BalanceWhen::BeforeFit, count, rng)
    }

    /// Whether a leaf is balanced after its fit (a random decision draws here, after the
    /// leaf's other draws).
    pub fn balance_after(&self, count: u64, rng: &mut dyn RandomSource) -> Result<bool> {
        self.balances_at(BalanceWhen::AfterFit, count, rng)
    }

    /// The damped input of the fit: `g + sqrt(eps)·mean|g|·ν` or `g + (δ + eps·|g|)·ν`
    /// (eps the float32 machine epsilon), in float32.
    pub fn damp(&self, g: &Tensor, nu: &Tensor) -> Result<Tensor> {
        match self.damping {
            None => fused::damp(g, nu),
            Some(delta) => {
                let g = g.to_dtype(DType::F32)?;
                let scale = ((g.abs()? * f32::EPSILON as f64)? + delta)?;
                Ok((&g + (scale * nu)?)?)
            }
        }
    }

    /// A lower bound on the largest eigenvalue of each symmetric positive semidefinite
    /// matrix of the batch `a` `(B, n, n)`, as `(B,)`; `v` `(B, 32, n)` is the subspace
    /// draw of [`NormEstimator::Subspace`].
    pub fn spd_bound(&self, a: &Tensor, v: Option<&Tensor>, p: Precision) -> Result<Tensor> {
        match self.estimator {
            NormEstimator::RowNorm => norm_lower_bound(a),
            NormEstimator::Subspace => norm_lower_bound_spd(a, subspace(v)?, p),
            NormEstimator::Power => power_bound(a, true, POWER_ITERS, p),
        }
    }

    /// [`Self::spd_bound`] of `a + b`, of which only the upper triangles are read (EQ's
    /// terms); the row-norm bound reads them as they are, as psgd-jax's fit does.
    pub fn spd_bound_upper_sum(
        &self,
        a: &Tensor,
        b: &Tensor,
        v: Option<&Tensor>,
        p: Precision,
    ) -> Result<Tensor> {
        match self.estimator {
            NormEstimator::RowNorm => norm_lower_bound_sym_sum(a, b),
            _ => self.spd_bound(&symmetric_from_upper(&(a + b)?)?, v, p),
        }
    }

    /// The step's normaliser from the estimate `ell` `(B,)`: `ℓ + tiny` (memoryless), or
    /// the running bound `L ← max(β·L + (1−β)·ℓ, ℓ)` from the previous `l`. Returns the
    /// normaliser and, with the running bound, the new `L`.
    pub fn normaliser(&self, ell: &Tensor, l: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        match (self.lipschitz_beta, l) {
            (Some(beta), Some(l)) => {
                let l = running_bound(l, ell, beta)?;
                Ok((l.clone(), Some(l)))
            }
            (None, _) => Ok(((ell + crate::kernels::linalg::TINY_F32)?, None)),
            (Some(_), None) => Err(PsgdError::State(
                "the fit keeps a Lipschitz bound but the state has none".into(),
            )),
        }
    }

    /// One Procrustes rotation of the factors `q` `(B, n, n)` toward symmetric positive
    /// definite, its generator normalised by the subspace bound (from `v`) or the power
    /// iteration, its step capped at `procrustesMaxStep`.
    pub fn procrustes(&self, q: &Tensor, v: Option<&Tensor>, p: Precision) -> Result<Tensor> {
        procrustes_step(q, self.rotation_bound(v, p)?, self.procrustes_max_step, p)
    }

    /// One third-order Procrustes rotation of the factors `q` `(B, n, n)` (PRO4P's), its
    /// generator normalised as in [`Self::procrustes`]; its step keeps its own cap of 1/3
    /// (`procrustesMaxStep` caps the second-order step of `'Q0.5EQ1.5'`).
    pub fn procrustes3(&self, q: &Tensor, v: Option<&Tensor>, p: Precision) -> Result<Tensor> {
        procrustes_step3(q, self.rotation_bound(v, p)?, p)
    }

    /// The normaliser of the Procrustes generator: the power iteration with `'power'`,
    /// else the subspace bound from `v`.
    fn rotation_bound<'a>(&self, v: Option<&'a Tensor>, p: Precision) -> Result<Bound<'a>> {
        Ok(match self.estimator {
            NormEstimator::Power => Box::new(move |r| power_bound(r, false, POWER_ITERS, p)),
            _ => {
                let v = subspace(v)?;
                Box::new(move |r| norm_lower_bound_skh(r, v, p))
            }
        })
    }
}

fn subspace(v: Option<&Tensor>) -> Result<&Tensor> {
    v.ok_or_else(|| PsgdError::Draw("no subspace was drawn for a norm bound".into()))
}

/// A `(B,)` lower bound of the spectral norm of each matrix of a batch.
type Bound<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;

/// The running bound `max(β·L + (1−β)·ℓ, ℓ)`; `l` and `ell` are `(B,)`.
pub fn running_bound(l: &Tensor, ell: &Tensor, beta: f64) -> Result<Tensor> {
    let ema = ((l * beta)? + (ell * (1.0 - beta))?)?;
    Ok(ema.maximum(ell)?)
}

/// heavyball's power iteration on each matrix of the batch `a` `(B, n, n)`, as `(B,)`: `a`
/// is scaled by the norm `r` of its row of largest norm (the first among equals; at
/// least the float32 `tiny`), `x` starts at that row over `r`, then `iters` times
/// `x ← m(x)/max(‖m(x)‖, 1e-12)`; the bound is `r·sqrt(x·m(x))`. `m(x) = A·A·x` for a
/// symmetric `a` (`spd`, its largest eigenvalue), `Aᵀ·A·x` otherwise (its largest
/// singular value). Deterministic, float32 (heavyball rounds the singular-value case to
/// bfloat16 stochastically; that rounding is not reproduced).
pub fn power_bound(a: &Tensor, spd: bool, iters: usize, p: Precision) -> Result<Tensor> {
    let (b, n, _) = a.dims3()?;
    let a = a.to_dtype(DType::F32)?;
    let norms = a.sqr()?.sum(2)?.sqrt()?;
    let j = norms.argmax_keepdim(1)?;
    let r = norms.max(1)?.maximum(crate::kernels::linalg::TINY_F32)?;
    let at = j
        .reshape((b, 1, 1))?
        .broadcast_as((b, 1, n))?
        .contiguous()?;
    let rb = r.reshape((b, 1, 1))?;
    let mut x = a.gather(&at, 1)?.broadcast_div(&rb)?;
    let an = a.broadcast_div(&rb)?;
    let at_ = an.transpose(1, 2)?;
    // row vectors: x·Aᵀ = (A·x)ᵀ, then ·Aᵀ (symmetric) or ·A
    let m = |x: &Tensor| -> Result<Tensor> {
        let y = p.matmul(x, &at_)?;
        if spd {
            p.matmul(&y, &at_)
        } else {
            p.matmul(&y, &an)
        }
    };
    for _ in 0..iters {
        let y = m(&x)?;
        let norm = y.sqr()?.sum_keepdim(2)?.sqrt()?.maximum(1e-12)?;
        x = y.broadcast_div(&norm)?;
    }
    let rq = (&x * m(&x)?)?.sum(2)?.flatten_all()?;
    Ok((rq.maximum(0.0)?.sqrt()? * r)?)
}

#[cfg(test)]
mod tests {
    use super::super::{whiten, KronFactors, KronPreconditioner, LeafPlan};
    use super::*;
    use crate::kernels::subspace::SUBSPACE_DIM;
    use crate::random::{Draw, ReplayRandom, SeededRandom};
    use crate::step::Preconditioner;
    use crate::transform::LeafSpec;
    use candle_core::Device;

    fn numerics(f: impl FnOnce(&mut KronOptions)) -> FitNumerics {
        let mut o = KronOptions::default();
        f(&mut o);
        FitNumerics::new(&o).unwrap()
    }

    /// `H·diag(λ)·H` with `H` a Householder reflection: a symmetric matrix whose
    /// eigenvalues are exactly `λ`, as `(1, n, n)`.
    fn known_spectrum(lams: &[f64], seed: u64) -> Tensor {
        let n = lams.len();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i as f64 + 1.0) * (seed as f64 + 0.7)).sin())
            .collect();
        let vv: f64 = v.iter().map(|x| x * x).sum();
        let h = |i: usize, j: usize| f64::from(i == j) - 2.0 * v[i] * v[j] / vv;
        let a: Vec<f32> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                (0..n).map(|m| h(i, m) * lams[m] * h(m, j)).sum::<f64>() as f32
            })
            .collect();
        Tensor::from_vec(a, (1, n, n), &Device::Cpu).unwrap()
    }

    /// Each estimator gives a lower bound of the largest eigenvalue (up to float32
    /// round-off) that is close to it, on spectra that are spread, clustered near the top
    /// and of rank one.
    #[test]
    fn every_estimator_is_a_close_lower_bound_of_the_largest_eigenvalue() {
        let spectra: Vec<Vec<f64>> = vec![
            vec![3.0, 1.0, 0.5],
            (0..8).map(|i| 10.0 / (1.0 + i as f64)).collect(),
            (0..20).map(|i| 2.0 - 0.01 * i as f64).collect(),
            vec![5.0, 0.0, 0.0, 0.0, 0.0],
            (0..12).map(|i| 1e-6 * (12 - i) as f64).collect(),
        ];
        for (k, lams) in spectra.iter().enumerate() {
            let a = known_spectrum(lams, k as u64);
            let top = lams.iter().cloned().fold(0.0, f64::max);
            let n = lams.len();
            let v = SeededRandom::for_step(k as u64, 1)
                .normal(&[1, SUBSPACE_DIM, n], &Device::Cpu)
                .unwrap();
            for est in [
                NormEstimator::RowNorm,
                NormEstimator::Subspace,
                NormEstimator::Power,
            ] {
                let nm = numerics(|o| o.norm_estimator = Some(est));
                let b = nm.spd_bound(&a, Some(&v), Precision::Float32).unwrap();
                let b = b.to_vec1::<f32>().unwrap()[0] as f64;
                // the same bound from the upper triangles of a split sum (EQ's terms)
                let half = (&a * 0.5).unwrap();
                let upper = symmetric_from_upper(&half).unwrap().triu2_of();
                let b2 = nm
                    .spd_bound_upper_sum(&upper, &upper, Some(&v), Precision::Float32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()[0] as f64;
                assert!(
                    b <= top * (1.0 + 1e-5) && b >= 0.9 * top,
                    "spectrum {k}, {est:?}: bound {b}, largest eigenvalue {top}"
                );
                assert!(
                    (b2 - b).abs() <= 1e-5 * top,
                    "spectrum {k}, {est:?}: {b2} from the upper triangles, {b} from the matrix"
                );
            }
        }
    }

    trait Triu {
        fn triu2_of(&self) -> Tensor;
    }

    impl Triu for Tensor {
        /// The upper triangle (the strict lower one set to garbage, which must be unread).
        fn triu2_of(&self) -> Tensor {
            let n = self.dim(2).unwrap();
            let up = Tensor::triu2(n, DType::F32, &Device::Cpu).unwrap();
            let low = (up.ones_like().unwrap() - &up).unwrap();
            (self.broadcast_mul(&up).unwrap() + (low * 1e3).unwrap().unsqueeze(0).unwrap()).unwrap()
        }
    }

    /// psgd-jax's damping (null) is the fused probe form; a number `δ` is psgd_torch's
    /// `g + (δ + eps·|g|)·ν`; the inverse-free rules damp with `δ = 1e-9` by default.
    #[test]
    fn each_damping_form() {
        let g = Tensor::new(&[[1.5f32, -0.25], [0.0, 4.0]], &Device::Cpu).unwrap();
        let nu = Tensor::new(&[[0.3f32, -1.2], [2.0, 0.7]], &Device::Cpu).unwrap();
        let eq = numerics(|_| {});
        assert_eq!(eq.damping, None);
        let got = eq.damp(&g, &nu).unwrap();
        let want = fused::damp(&g, &nu).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let pro = numerics(|o| o.update_rule = UpdateRule::Pro);
        assert_eq!(pro.damping, Some(TORCH_DAMPING));
        let eps = f32::EPSILON as f64;
        for (nm, delta) in [
            (pro, TORCH_DAMPING),
            (numerics(|o| o.damping = Some(0.5)), 0.5),
        ] {
            let got = nm.damp(&g, &nu).unwrap().flatten_all().unwrap();
            let got = got.to_vec1::<f32>().unwrap();
            let (gs, ns) = (
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                nu.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for ((o, g), n) in got.iter().zip(&gs).zip(&ns) {
                let (g, n) = (*g as f64, *n as f64);
                let want = g + (delta + eps * g.abs()) * n;
                assert!(
                    (*o as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{o} vs {want}"
                );
            }
        }
    }

    /// The Procrustes rotation of `Q = [[1, s], [−s, 1]]` (skew part `s`, optimum `a* = s`)
    /// is capped at `procrustesMaxStep`, whichever estimator normalises its generator:
    /// `Q + a·RQ + (a²/2)·R²Q` with `R = [[0, −1], [1, 0]]`, `a = min(s, cap)`.
    #[test]
    fn procrustes_step_is_capped() {
        let s = 0.6f64;
        let q = Tensor::new(&[[[1.0f32, s as f32], [-s as f32, 1.0]]], &Device::Cpu).unwrap();
        let v = SeededRandom::for_step(3, 1)
            .normal(&[1, SUBSPACE_DIM, 2], &Device::Cpu)
            .unwrap();
        for est in [NormEstimator::Subspace, NormEstimator::Power] {
            for cap in [0.125, 0.5, 1.0] {
                let nm = numerics(|o| {
                    o.update_rule = UpdateRule::Pro;
                    o.norm_estimator = Some(est);
                    o.procrustes_max_step = cap;
                });
                let got = nm.procrustes(&q, Some(&v), Precision::Float32).unwrap();
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let a = s.min(cap);
                // RQ = [[s, −1], [1, s]], R²Q = [[−1, −s], [s, −1]]
                let diag = 1.0 + a * s - a * a / 2.0;
                let off = s - a - a * a / 2.0 * s;
                let want = [diag, off, -off, diag];
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5,
                        "{est:?} cap {cap}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    fn tape(draws: Vec<Draw>) -> ReplayRandom {
        ReplayRandom::new("balance", draws)
    }

    /// Each balancing rule consumes its reference's draws: psgd-jax's one uniform before
    /// the fit, psgd_torch's one per leaf after it, none for a deterministic one.
    #[test]
    fn each_balance_rule_consumes_its_draws() {
        let u = |x: f32| vec![Draw::Uniform(x)];
        // psgd-jax (EQ's own): before, 1%
        let eq = numerics(|_| {});
        let mut r = tape(u(0.005));
        assert!(eq.balance_before(0, &mut r).unwrap());
        assert!(!eq.balance_after(0, &mut r).unwrap());
        assert_eq!(r.remaining(), 0);
        let mut r = tape(u(0.02));
        assert!(!eq.balance_before(0, &mut r).unwrap());
        // psgd_torch (the inverse-free rules' own): after, 1%
        let pro = numerics(|o| o.update_rule = UpdateRule::Quad);
        let mut r = tape(u(0.009));
        assert!(!pro.balance_before(0, &mut r).unwrap());
        assert!(pro.balance_after(0, &mut r).unwrap());
        assert_eq!(r.remaining(), 0);
        // QEP's own: before every fit, no draw; a probability of one's own replaces it
        let qep = numerics(|o| o.update_rule = UpdateRule::Qep);
        let mut r = tape(vec![]);
        for count in 0..3 {
            assert!(qep.balance_before(count, &mut r).unwrap());
            assert!(!qep.balance_after(count, &mut r).unwrap());
        }
        let qep_drawn = numerics(|o| {
            o.update_rule = UpdateRule::Qep;
            o.balance_probability = Some(0.01);
        });
        let mut r = tape(u(0.5));
        assert!(!qep_drawn.balance_before(0, &mut r).unwrap());
        assert_eq!(r.remaining(), 0);
        // a probability of one's own, after the fit under EQ
        let half = numerics(|o| {
            o.balance_probability = Some(0.5);
            o.balance_when = Some(BalanceWhen::AfterFit);
        });
        let mut r = tape(u(0.3));
        assert!(!half.balance_before(0, &mut r).unwrap());
        assert!(half.balance_after(0, &mut r).unwrap());
        assert_eq!(r.remaining(), 0);
        // heavyball (every fit, before) and distributed-kron (every 100 steps): no draw
        for (every, when, first_hits) in [
            (1, BalanceWhen::BeforeFit, [0u64, 1, 2]),
            (100, BalanceWhen::BeforeFit, [99, 199, 299]),
            (3, BalanceWhen::AfterFit, [2, 5, 8]),
        ] {
            let nm = numerics(|o| {
                o.update_rule = UpdateRule::Pro;
                o.balance_every = Some(every);
                o.balance_when = Some(when);
            });
            let mut r = tape(vec![]);
            let mut hits = vec![];
            for count in 0..300u64 {
                let (b, a) = (
                    nm.balance_before(count, &mut r).unwrap(),
                    nm.balance_after(count, &mut r).unwrap(),
                );
                // one place per fit: before or after, as `balanceWhen` says
                assert!(!(b && a));
                assert_eq!(b, (b || a) && when == BalanceWhen::BeforeFit);
                if b || a {
                    hits.push(count);
                }
            }
            assert_eq!(hits[..3], first_hits, "every {every}");
            assert_eq!(hits.len(), 300 / every, "every {every}");
        }
    }

    /// One leaf's draws under each numerics, in psgd_torch's order: the noise (EQ's probe
    /// too), a subspace per dense factor with `'subspace'` (and a second under PRO unless
    /// `'power'`), then the balance uniform with a random balance after the fit.
    #[test]
    fn leaf_draws_follow_the_numerics() {
        let plan = LeafPlan {
            batch: 1,
            dims: vec![3, 4],
            diag: vec![false, true],
            stored: vec![vec![3, 3], vec![4]],
            scanned: false,
            scale: 1.0,
            p_power: 1.0,
        };
        let n = |shape: &[usize]| Draw::Normal {
            shape: shape.to_vec(),
            data: vec![0.5; shape.iter().product()],
        };
        let k = SUBSPACE_DIM;
        let modern_eq = |o: &mut KronOptions| {
            o.norm_estimator = Some(NormEstimator::Subspace);
            o.balance_when = Some(BalanceWhen::AfterFit);
        };
        // rule, numerics, the draws they take, whether the dense factor has (spd, skh)
        type Case = (UpdateRule, FitNumerics, Vec<Draw>, (bool, bool));
        let cases: Vec<Case> = vec![
            (
                UpdateRule::Eq,
                numerics(|_| {}),
                vec![n(&[3, 4])],
                (false, false),
            ),
            (
                UpdateRule::Eq,
                numerics(modern_eq),
                vec![n(&[3, 4]), n(&[k, 3]), Draw::Uniform(0.5)],
                (true, false),
            ),
            (
                UpdateRule::Pro,
                numerics(|o| o.update_rule = UpdateRule::Pro),
                vec![n(&[3, 4]), n(&[k, 3]), n(&[k, 3]), Draw::Uniform(0.5)],
                (true, true),
            ),
            (
                UpdateRule::Pro,
                numerics(|o| {
                    o.update_rule = UpdateRule::Pro;
                    o.norm_estimator = Some(NormEstimator::Power);
                    o.balance_every = Some(1);
                    o.balance_when = Some(BalanceWhen::BeforeFit);
                }),
                vec![n(&[3, 4])],
                (false, false),
            ),
            (
                UpdateRule::Quad,
                numerics(|o| {
                    o.update_rule = UpdateRule::Quad;
                    o.norm_estimator = Some(NormEstimator::RowNorm);
                }),
                vec![n(&[3, 4]), Draw::Uniform(0.5)],
                (false, false),
            ),
            // QEP balances before the fit by default: no balance draw
            (
                UpdateRule::Qep,
                numerics(|o| o.update_rule = UpdateRule::Qep),
                vec![n(&[3, 4]), n(&[k, 3])],
                (true, false),
            ),
        ];
        for (c, (rule, nm, draws, (spd, skh))) in cases.into_iter().enumerate() {
            let mut r = ReplayRandom::new("leaf", draws);
            let d = whiten::draw(&plan, &[3, 4], rule, &nm, 0, None, &mut r, &Device::Cpu).unwrap();
            assert_eq!(r.remaining(), 0, "case {c}");
            let s = d.subspaces[0].as_ref().unwrap();
            assert_eq!((s.spd.is_some(), s.skh.is_some()), (spd, skh), "case {c}");
            assert!(d.subspaces[1].is_none() && !d.balance);
        }
        // PRO4P draws its subspaces as the fit goes: here only the noise; the Procrustes
        // steps take subspaces unless the estimator is the power iteration
        let pro4p = numerics(|o| o.update_rule = UpdateRule::Pro4p);
        let mut r = ReplayRandom::new("leaf", vec![n(&[3, 4])]);
        let d = whiten::draw(
            &plan,
            &[3, 4],
            UpdateRule::Pro4p,
            &pro4p,
            0,
            None,
            &mut r,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(r.remaining(), 0);
        assert!(d.subspaces.iter().all(Option::is_none) && !d.balance);
        assert!(pro4p.draws_subspace() && pro4p.draws_rotation(UpdateRule::Pro4p));
        let power = numerics(|o| {
            o.update_rule = UpdateRule::Pro4p;
            o.norm_estimator = Some(NormEstimator::Power);
        });
        assert!(!power.draws_subspace() && !power.draws_rotation(UpdateRule::Pro4p));
    }

    /// A state with running bounds is refused by an optimizer that keeps none, and the
    /// other way round, naming `lipschitzBeta`; both balancing triggers at once are
    /// refused.
    #[test]
    fn bounds_in_the_state_follow_lipschitz_beta() {
        let leaves = vec![LeafSpec::new("w", &[3, 4])];
        let make = |beta: Option<f64>| {
            let o = KronOptions {
                lipschitz_beta: beta,
                ..Default::default()
            };
            KronPreconditioner::new(&leaves, &o).unwrap()
        };
        let (with, without) = (make(Some(0.9)), make(None));
        let mut rng = SeededRandom::for_step(0, 0);
        let s_with: KronFactors = with.init(&Device::Cpu, &mut rng).unwrap();
        let s_without: KronFactors = without.init(&Device::Cpu, &mut rng).unwrap();
        assert_eq!(s_with.ls[0].len(), 2);
        assert!(s_without.ls[0].is_empty());
        with.check(&s_with).unwrap();
        without.check(&s_without).unwrap();
        for (p, s) in [(&with, &s_without), (&without, &s_with)] {
            let e = p.check(s).unwrap_err().to_string();
            assert!(
                e.contains("Lipschitz bounds") && e.contains("lipschitzBeta"),
                "{e}"
            );
        }
        let both = KronOptions {
            balance_every: Some(2),
            balance_probability: Some(0.5),
            ..Default::default()
        };
        let e = KronPreconditioner::new(&leaves, &both).unwrap_err();
        assert!(e.to_string().contains("balanceProbability"), "{e}");
    }
}
