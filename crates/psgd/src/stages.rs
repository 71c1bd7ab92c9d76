//! The stages of the one optimizer step ([`crate::step`]) around the fused kernels
//! ([`crate::kernels::fused`]): input checks, the momentum buffers, the deterministic
//! preconditioner-update counter, and where a fit runs (the pool, leaves in parallel).

use crate::error::{PsgdError, Result};
use crate::kernels::fused;
use crate::transform::{LeafSpec, StepHyper};
use candle_core::{DType, Tensor};

pub(crate) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
}

/// Checks count, shape and dtype of `tensors` against `specs`.
pub fn check_leaves(what: &'static str, specs: &[LeafSpec], tensors: &[Tensor]) -> Result<()> {
    if specs.len() != tensors.len() {
        return Err(PsgdError::LeafCount {
            what,
            expected: specs.len(),
            got: tensors.len(),
        });
    }
    for (s, t) in specs.iter().zip(tensors) {
        if t.dims() != s.shape.as_slice() {
            return Err(PsgdError::Shape {
                what,
                path: s.path.clone(),
                expected: s.shape.clone(),
                got: t.dims().to_vec(),
            });
        }
        if !is_float(t.dtype()) {
            return Err(PsgdError::Dtype {
                what,
                path: s.path.clone(),
                got: format!("{:?}", t.dtype()).to_lowercase(),
            });
        }
    }
    Ok(())
}

/// Fails with the first leaf holding NaN or Inf.
pub fn check_finite(what: &'static str, specs: &[LeafSpec], tensors: &[Tensor]) -> Result<()> {
    match fused::first_non_finite(tensors)? {
        None => Ok(()),
        Some(i) => Err(PsgdError::NonFinite {
            what,
            path: specs[i].path.clone(),
        }),
    }
}

/// Checks the hyperparameters of the step after `count` steps. The options' constants
/// were checked when the optimizer was made, so a bad value here is a schedule's (the
/// learning rate's gets `count`, the probability's `count + 1`, as in psgd-jax).
pub fn check_hyper(h: &StepHyper, count: u64) -> Result<()> {
    use crate::options::check;
    let at = |m: String, step: u64| format!("{m} (schedule at step {step})");
    check::learning_rate(h.learning_rate)
        .map_err(|m| PsgdError::option_range("learningRate", at(m, count)))?;
    check::probability(h.update_probability).map_err(|m| {
        PsgdError::option_range("preconditionerUpdateProbability", at(m, count + 1))
    })?;
    Ok(())
}

/// Leaves with fewer elements than this in all fit on a worker of rayon's pool.
const ON_POOL_MAX: usize = 1 << 20;

/// Whether the leaves hold fewer than [`ON_POOL_MAX`] elements in all: a model whose fit
/// is many small passes rather than a few large ones.
fn is_small(leaves: &[LeafSpec]) -> bool {
    leaves.iter().map(LeafSpec::numel).sum::<usize>() < ON_POOL_MAX
}

/// Runs a preconditioner fit of `leaves` on a worker of rayon's pool when the model is
/// small. A fit's host passes fork many small jobs: from a thread outside
/// the pool each fork is a hand-off to the pool and back (tens of µs, most of a small
/// model's fit), from a worker it runs inline unless another worker is idle to take
/// half. For a large model the forks are negligible, and tensors allocated on a worker
/// then freed elsewhere made later steps slower (measured: transformer Kron apply +25 %),
/// so it stays on the calling thread.
pub fn on_pool<R: Send>(leaves: &[LeafSpec], f: impl FnOnce() -> R + Send) -> R {
    if !is_small(leaves) || rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Runs `f` on the pool that fits run on apart from their step (`overlapFit`): one thread
/// fewer than the machine has (at least one), so that the caller's next gradient keeps a
/// core while the fit runs: on rayon's global pool the fit's parallel passes would take
/// every core and slow the very computation it is meant to overlap. The numbers do not
/// depend on the pool (the parallel passes split over leaves and output blocks, never a
/// sum), so they stay those of the step's own fit.
pub fn on_fit_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores.saturating_sub(1).max(1))
            .thread_name(|i| format!("psgd-fit-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// `f(i)` for every leaf index, in leaf order. In a small model's fit (on a worker, see
/// [`on_pool`]) the leaves run in parallel: each leaf is a chain of small products and
/// passes too short to split, so the leaves are the only parallel work there is. A large
/// model's leaves run one after another, each product parallel within itself.
pub fn map_leaves<T: Send>(
    leaves: &[LeafSpec],
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    if is_small(leaves) && leaves.len() > 1 {
        use rayon::prelude::*;
        (0..leaves.len()).into_par_iter().map(&f).collect()
    } else {
        (0..leaves.len()).map(f).collect()
    }
}

/// The momentum state at init: zeros in `mu_dtype` (or each param's dtype), or none when
/// `b1 == 0`.
pub fn init_momentum(
    b1: f64,
    mu_dtype: Option<DType>,
    params: &[Tensor],
) -> Result<Option<Vec<Tensor>>> {
    if b1 <= 0.0 {
        return Ok(None);
    }
    params
        .iter()
        .map(|p| Ok(p.zeros_like()?.to_dtype(mu_dtype.unwrap_or(p.dtype()))?))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// [`momentum`] over every leaf: the new buffers (float32) and the update each leaf goes
/// on with; without momentum, no buffers and the gradients themselves.
pub fn momentum_all(
    b1: f64,
    nesterov: bool,
    warmup: fused::Warmup,
    mu: Option<&Vec<Tensor>>,
    g32: &[Tensor],
    count: u64,
) -> Result<(Option<Vec<Tensor>>, Vec<Tensor>)> {
    match mu {
        Some(mu) => {
            let pairs = mu
                .iter()
                .zip(g32)
                .map(|(m, g)| fused::momentum(b1, m, g, count, nesterov, warmup))
                .collect::<Result<Vec<_>>>()?;
            let (mu, upd): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
            Ok((Some(mu), upd))
        }
        None => Ok((None, g32.to_vec())),
    }
}

/// New momentum buffers stored back in the dtypes of the old ones (`mu_dtype`).
pub fn keep_dtypes(
    new: Option<Vec<Tensor>>,
    old: Option<&Vec<Tensor>>,
) -> Result<Option<Vec<Tensor>>> {
    match new {
        Some(mu) => Ok(Some(
            mu.iter()
                .zip(old.into_iter().flatten())
                .map(|(m, o)| Ok(m.to_dtype(o.dtype())?))
                .collect::<Result<Vec<_>>>()?,
        )),
        None => Ok(None),
    }
}

/// The deterministic update counter of psgd-jax 0.2.9: count up, update the preconditioner
/// once the counter reaches `1/prob` (compared in float32 as the reference does), then reset.
/// Returns whether to update and the new counter.
pub fn update_counter(counter: u64, prob: f64) -> (bool, u64) {
    let next = counter + 1;
    let threshold = (1.0 / prob) as f32;
    if next as f32 >= threshold {
        (true, 0)
    } else {
        (false, next)
    }
}

/// heavyball's deterministic cumulative decision: with `c` the sum of the update
/// probabilities so far, fit iff `floor(c + p) > floor(c)`. Returns whether to fit and the
/// new sum `c + p`.
pub fn update_cumulative(c: f64, p: f64) -> (bool, f64) {
    let next = c + p;
    (next.floor() > c.floor(), next)
}

/// Whether any masked leaf needs the params for weight decay.
pub fn needs_params(specs: &[LeafSpec], weight_decay: f64) -> bool {
    weight_decay > 0.0 && specs.iter().any(|s| s.weight_decay)
}

/// Checks a step's inputs: grads always, params when given or needed.
pub fn check_step_inputs(
    specs: &[LeafSpec],
    grads: &[Tensor],
    params: Option<&[Tensor]>,
    weight_decay: f64,
) -> Result<()> {
    check_leaves("grads", specs, grads)?;
    match params {
        Some(p) => check_leaves("params", specs, p)?,
        None if needs_params(specs, weight_decay) => {
            return Err(PsgdError::option_range(
                "weightDecay",
                "> 0 needs the params passed to update",
            ))
        }
        None => {}
    }
    check_finite("grads", specs, grads)?;
    if let Some(p) = params {
        if needs_params(specs, weight_decay) {
            check_finite("params", specs, p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_leaves_keeps_leaf_order_and_reports_a_failure() {
        let spec = |n: usize| LeafSpec::new(format!("l{n}"), &[n]);
        // small (in parallel) and large (in turn)
        for sizes in [vec![3, 5, 7, 11, 13], vec![ON_POOL_MAX, 2, 3]] {
            let leaves: Vec<LeafSpec> = sizes.iter().map(|&n| spec(n)).collect();
            let out = map_leaves(&leaves, |l| Ok(leaves[l].numel())).unwrap();
            assert_eq!(out, sizes);
            let err = map_leaves(&leaves, |l| {
                if l == 2 {
                    Err(PsgdError::State(format!("leaf {l}")))
                } else {
                    Ok(l)
                }
            })
            .unwrap_err();
            assert!(err.to_string().contains("leaf 2"), "{err}");
        }
    }

    #[test]
    fn counter_matches_reference_rule() {
        // prob 0.5: update every second step
        let mut c = 0;
        let mut got = vec![];
        for _ in 0..6 {
            let (u, n) = update_counter(c, 0.5);
            got.push(u);
            c = n;
        }
        assert_eq!(got, vec![false, true, false, true, false, true]);
        // prob 1: every step; prob 0: never
        assert!(update_counter(0, 1.0).0);
        assert!(!update_counter(1000, 0.0).0);
    }

    #[test]
    fn cumulative_fits_when_the_sum_crosses_an_integer() {
        // p = 0.4: sums 0.4, 0.8, 1.2, 1.6, 2.0, 2.4, 2.8, 3.2 fit at steps 3, 5 and 8
        let mut c = 0.0;
        let mut got = vec![];
        for _ in 0..8 {
            let (u, n) = update_cumulative(c, 0.4);
            got.push(u);
            c = n;
        }
        let fits: Vec<usize> = (0..8).filter(|&i| got[i]).map(|i| i + 1).collect();
        assert_eq!(fits, vec![3, 5, 8]);
        // p = 1 fits every step, p = 0 never
        assert!(update_cumulative(0.0, 1.0).0 && update_cumulative(7.0, 1.0).0);
        assert!(!update_cumulative(3.5, 0.0).0);
    }
}
