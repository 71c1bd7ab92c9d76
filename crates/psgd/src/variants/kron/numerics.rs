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
use crate::kernels::subspace::{norm_lower_bound_skh, norm_lower_bound_spd, procrustes_step};
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
    /// psgd_torch's under the inverse-free rules). Refuses both `balanceProbability` and
    /// `balanceEvery`.
    pub fn new(o: &KronOptions) -> Result<Self> {
        let eq = !o.update_rule.inverse_free();
        let balance = match (o.balance_probability, o.balance_every) {
            (Some(_), Some(_)) => {
                return Err(PsgdError::option_range(
                    "balance_every",
                    "cannot be set together with balanceProbability (one decides when the \
                     factors are balanced)",
                ))
            }
            (_, Some(n)) => BalanceTrigger::Every(n as u64),
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
            balance_when: o.balance_when.unwrap_or(if eq {
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

    /// Whether the Procrustes step of `rule` takes a random subspace: under PRO, unless
    /// the estimator is the power iteration (which also normalises the rotation).
    pub fn draws_rotation(&self, rule: UpdateRule) -> bool {
        rule == UpdateRule::Pro && self.estimator != NormEstimator::Power
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
            BalanceTrigger::Every(n) => (count + 1) % n == 0,
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
        let cap = self.procrustes_max_step;
        match self.estimator {
            NormEstimator::Power => {
                procrustes_step(q, |r| power_bound(r, false, POWER_ITERS, p), cap, p)
            }
            _ => {
                let v = subspace(v)?;
                procrustes_step(q, |r| norm_lower_bound_skh(r, v, p), cap, p)
            }
        }
    }
}

fn subspace(v: Option<&Tensor>) -> Result<&Tensor> {
    v.ok_or_else(|| PsgdError::Draw("no subspace was drawn for a norm bound".into()))
}

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
