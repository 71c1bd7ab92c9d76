//! The parts of an optimizer step every PSGD variant shares: leaf specs and input checks,
//! momentum with bias correction, the deterministic preconditioner-update counter, the RMS
//! clip, decoupled weight decay and the learning-rate scaling.

use crate::error::{PsgdError, Result};
use candle_core::{DType, Tensor};

/// What the optimizer knows about one leaf of the parameter tree.
#[derive(Debug, Clone, PartialEq)]
pub struct LeafSpec {
    /// The leaf's path (e.g. `layers.0.weight`), used in error messages.
    pub path: String,
    /// The leaf's shape.
    pub shape: Vec<usize>,
    /// Whether the leading axis is a stack of layers, each with its own preconditioner.
    pub scanned: bool,
    /// Whether weight decay applies to this leaf (the weight-decay mask).
    pub weight_decay: bool,
}

impl LeafSpec {
    /// An unscanned leaf with weight decay on (the reference's default mask).
    pub fn new(path: impl Into<String>, shape: &[usize]) -> Self {
        LeafSpec {
            path: path.into(),
            shape: shape.to_vec(),
            scanned: false,
            weight_decay: true,
        }
    }
}

/// The hyperparameters of one step, after evaluating any schedules.
#[derive(Debug, Clone, Copy)]
pub struct StepHyper {
    /// The learning rate for this step.
    pub learning_rate: f64,
    /// The preconditioner update probability for this step.
    pub update_probability: f64,
    /// The preconditioner step size for this step; `None` takes the options' value (or
    /// schedule). Kron's is a constant option and ignores this.
    pub precond_lr: Option<f64>,
}

impl StepHyper {
    /// A learning rate and update probability, with the options' preconditioner step size.
    pub fn new(learning_rate: f64, update_probability: f64) -> Self {
        StepHyper {
            learning_rate,
            update_probability,
            precond_lr: None,
        }
    }
}

/// The Hessian-based inputs of one step (psgd-jax's `Hvp`, `vector` and
/// `update_preconditioner`), one tensor per leaf. Without them a variant fits its
/// preconditioner by gradient whitening.
#[derive(Debug, Clone)]
pub struct Curvature {
    /// The Hessian-vector products `H·v`.
    pub hvp: Vec<Tensor>,
    /// The probe vectors `v`.
    pub vector: Vec<Tensor>,
    /// Whether to update the preconditioner this step.
    pub update_preconditioner: bool,
}

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

/// Fails with the first leaf holding NaN or Inf. One read-back for the whole tree: `0 · t`
/// is zero for finite entries and NaN otherwise.
pub fn check_finite(what: &'static str, specs: &[LeafSpec], tensors: &[Tensor]) -> Result<()> {
    let probes = tensors
        .iter()
        .map(|t| Ok((t * 0.0)?.to_dtype(DType::F32)?.sum_all()?))
        .collect::<Result<Vec<_>>>()?;
    if probes.is_empty() {
        return Ok(());
    }
    let all = Tensor::stack(&probes, 0)?;
    let vals = all.to_vec1::<f32>()?;
    match vals.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(PsgdError::NonFinite {
            what,
            path: specs[i].path.clone(),
        }),
    }
}

/// Checks a step's hyperparameters.
pub fn check_hyper(h: &StepHyper) -> Result<()> {
    if !h.learning_rate.is_finite() {
        return Err(PsgdError::option_range(
            "learning_rate",
            format!("must be finite, got {}", h.learning_rate),
        ));
    }
    if h.update_probability.is_nan() || h.update_probability < 0.0 {
        return Err(PsgdError::option_range(
            "preconditioner_update_probability",
            format!("must be a number >= 0, got {}", h.update_probability),
        ));
    }
    Ok(())
}

/// `1 − b1^count` in float32, as optax's `tree_bias_correction` computes it.
fn bias_correction(b1: f64, count: u64) -> f64 {
    1.0 - (b1 as f32).powi(count.min(i32::MAX as u64) as i32) as f64
}

/// `mu ← b1·mu + (1−b1)·g` (float32) and the update it gives at 1-based step `count`: the
/// bias-corrected `mu`, or with `nesterov` psgd-jax's bias-corrected Nesterov blend
/// `b1·mu/(1−b1^(count+1)) + (1−b1)·g/(1−b1^count)`.
pub fn momentum(
    b1: f64,
    mu: &Tensor,
    g: &Tensor,
    count: u64,
    nesterov: bool,
) -> Result<(Tensor, Tensor)> {
    let mu_new = ((g * (1.0 - b1))? + (mu.to_dtype(DType::F32)? * b1)?)?;
    let update = if nesterov {
        let m = (&mu_new / bias_correction(b1, count + 1))?;
        let gc = (g / bias_correction(b1, count))?;
        ((m * b1)? + (gc * (1.0 - b1))?)?
    } else {
        (&mu_new / bias_correction(b1, count))?
    };
    Ok((mu_new, update))
}

/// Fails unless the option `name` is finite.
pub fn check_finite_option(name: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(PsgdError::option_range(
            name,
            format!("must be finite, got {v}"),
        ))
    }
}

/// Checks the options every variant has: `b1` in [0, 1), a finite weight decay, a finite
/// constant learning rate and a constant update probability in [0, 1].
pub fn check_common_options(
    b1: f64,
    weight_decay: f64,
    learning_rate: &crate::schedule::Schedule,
    update_probability: &crate::schedule::Schedule,
) -> Result<()> {
    if !(b1.is_finite() && (0.0..1.0).contains(&b1)) {
        return Err(PsgdError::option_range(
            "b1",
            format!("must be in [0, 1), got {b1}"),
        ));
    }
    check_finite_option("weight_decay", weight_decay)?;
    if let crate::schedule::Schedule::Constant(lr) = learning_rate {
        check_finite_option("learning_rate", *lr)?;
    }
    if let crate::schedule::Schedule::Constant(p) = update_probability {
        check_hyper(&StepHyper::new(0.0, *p))?;
    }
    Ok(())
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
    mu: Option<&Vec<Tensor>>,
    g32: &[Tensor],
    count: u64,
) -> Result<(Option<Vec<Tensor>>, Vec<Tensor>)> {
    match mu {
        Some(mu) => {
            let pairs = mu
                .iter()
                .zip(g32)
                .map(|(m, g)| momentum(b1, m, g, count, nesterov))
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

/// [`finish_update`] for every leaf, each cast to its gradient's dtype.
pub fn finish_updates(
    pre: &[Tensor],
    params: Option<&[Tensor]>,
    specs: &[LeafSpec],
    grads: &[Tensor],
    weight_decay: f64,
    learning_rate: f64,
) -> Result<Vec<Tensor>> {
    pre.iter()
        .enumerate()
        .map(|(l, u)| {
            finish_update(
                u,
                params.map(|p| &p[l]),
                &specs[l],
                weight_decay,
                learning_rate,
                grads[l].dtype(),
            )
        })
        .collect()
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

/// `u / max(1, rms(u)/1.1)`: the preconditioned gradient should have unit RMS, so cap it.
pub fn clip_rms(u: &Tensor) -> Result<Tensor> {
    let rms = u.sqr()?.mean_all()?.sqrt()?;
    let denom = (rms / 1.1)?.maximum(1.0)?;
    Ok(u.broadcast_div(&denom)?)
}

/// Decoupled weight decay on masked leaves, then `-learning_rate ·`, cast to `dtype`.
pub fn finish_update(
    pre: &Tensor,
    param: Option<&Tensor>,
    spec: &LeafSpec,
    weight_decay: f64,
    learning_rate: f64,
    dtype: DType,
) -> Result<Tensor> {
    let mut u = pre.clone();
    if weight_decay > 0.0 && spec.weight_decay {
        let p = param.ok_or_else(|| {
            PsgdError::option_range(
                "params",
                format!("weight decay needs the params (leaf '{}')", spec.path),
            )
        })?;
        u = (u + (p.to_dtype(DType::F32)? * weight_decay)?)?;
    }
    Ok((u * (-learning_rate))?.to_dtype(dtype)?)
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
                "params",
                "weight_decay > 0 needs the params passed to update",
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
}
