//! What XMat, LRA and Affine share: psgd-jax 0.2.9 gives the three the same options
//! (declared once here, [`psgd_options!`]), and XMat and LRA precondition the whole tree
//! flattened into one vector with the same automatic initial scale.

use crate::error::Result;
use crate::kernels::elementwise::{self, Flat};
use crate::step::FitInputs;
use crate::transform::LeafSpec;
use candle_core::{Device, Tensor};

/// Declares the options of XMat, LRA or Affine: the options the three share, then the
/// variant's own (`$own`, in [`crate::declare_options!`]'s syntax).
macro_rules! psgd_options {
    ($(#[$meta:meta])* $name:ident, $variant:literal, zero_clip_disables: $zero:literal, { $($own:tt)* }) => {
        $crate::declare_options! {
            $(#[$meta])*
            pub struct $name for $variant {
                /// Learning rate, or a schedule of the step count (0 on the first step, as
                /// optax). Default 0.01 (psgd-jax's), which suits small problems: XMat at
                /// 0.01 diverged training a 3-layer MNIST MLP, so on networks
                /// start lower, e.g. 1e-3.
                learning_rate: $crate::schedule::Schedule = $crate::schedule::Schedule::Constant(0.01),
                    check $crate::options::check::learning_rate_schedule;
                /// Probability of updating the preconditioner on a step, or a schedule of
                /// the 1-based step count. Default (and null) 1.
                preconditioner_update_probability: Option<$crate::schedule::Schedule> = None,
                    check |s: &Option<$crate::schedule::Schedule>| s.as_ref().map_or(Ok(()), $crate::options::check::probability_schedule);
                /// Momentum coefficient in [0, 1); 0 turns momentum off. Default 0.9.
                b1: f64 = 0.9, check $crate::options::check::momentum;
                /// Nesterov momentum (with bias correction). Default false.
                nesterov: bool = false;
                /// Decoupled weight decay (needs `params` in `update`), on the leaves the
                /// `mask` selects (≥ 0). Default 0.
                weight_decay: f64 = 0.0, check $crate::options::check::non_negative;
                /// Step size of the preconditioner fit (≥ 0), or a schedule of the 1-based
                /// step count. Default 0.1.
                precond_lr: $crate::schedule::Schedule = $crate::schedule::Schedule::Constant(0.1),
                    check $crate::options::check::precond_lr_schedule;
                /// Initial scale of the preconditioner. Default null: chosen on the first fit
                /// from its inputs, `(Σv²/Σh²)^¼` with Hessian-vector products, `(n/Σg²)^¼`
                /// when whitening.
                precond_init_scale: Option<f64> = None, check $crate::options::check::positive_or_none;
                /// Clip the updates to this global L2 norm. Default null (no clip).
                update_global_norm_clip: Option<f64> = None,
                    check $crate::options::check::non_negative_or_none;
                /// Clip the incoming gradients to this global L2 norm before anything else
                /// (momentum and the preconditioner fit see the clipped gradients). Not in
                /// psgd-jax. Default null (no clip).
                grad_clip: Option<f64> = None, check $crate::options::check::positive_or_none;
                /// Let a step whose updates hold NaN or Inf through, as psgd-jax does.
                /// Default false: such a step fails with a `RangeError` naming the leaf and
                /// changes nothing (the test is fused into the step's last pass).
                allow_non_finite: bool = false;
/// What a step does when the preconditioner turns unhealthy: `'throw'` (default: a
                /// step whose updates would hold NaN or Inf fails with a `RangeError` and
                /// changes nothing), `'reset'` (after each fit, a leaf whose factors are
                /// non-finite or past `maxCondition` gets them back at their initial scale; a
                /// step whose updates would hold NaN or Inf resets the factors at fault and
                /// makes zero updates) or `'skip'` (such a fit is dropped for that leaf; such
                /// a step makes zero updates and keeps its momentum and preconditioner). The
                /// step is counted either way. Not in psgd-jax.
                on_unhealthy: $crate::guard::OnUnhealthy = $crate::guard::OnUnhealthy::Throw;
                /// The condition bound of `onUnhealthy`'s health check: a factor whose
                /// `max|diag| / min|diag|` exceeds it is unhealthy (null: only non-finite
                /// factors are). Default 1e6: float32 resolves about 7 significant digits,
                /// so past it the factors' smallest directions are lost to rounding. Read
                /// only under `'reset'` and `'skip'`.
                max_condition: Option<f64> = Some($crate::guard::DEFAULT_MAX_CONDITION),
                    check $crate::guard::check_max_condition;
                /// How the preconditioner step is normalised: `'1st'` or `'2nd'` (default).
                step_normalizer_order: $crate::step::StepNormalizer = $crate::step::StepNormalizer::Second;
                /// Fit the preconditioner before preconditioning the step (default true,
                /// psgd-jax's order). false: precondition the step with the preconditioner
                /// as it was, then fit it on this step's input (psgd_torch's
                /// `update_preconditioner_first=False`); the random draws come in the same
                /// order either way. Not in psgd-jax.
                update_preconditioner_first: bool = true;
                /// Run the preconditioner fit of a step on a native worker thread after the
                /// step returns, overlapping it with the caller's next gradient (the classes,
                /// the TensorFlow.js optimizers and the functional API). The numbers are exactly
                /// those of `updatePreconditionerFirst: false` run in order, which it implies;
                /// with an explicit `updatePreconditionerFirst: true` it is a `RangeError`. The
                /// next step, saving, loading into the state and `dispose` wait for the fit; an
                /// error in the fit is raised by the next of them. It helps only when a core is
                /// free while the gradient is computed. Default false. Not in psgd-jax.
                overlap_fit: bool = false;
                /// Dtype of the momentum buffer; null keeps each param's dtype.
                mu_dtype: Option<$crate::options::StateDType> = None;
                /// Matmul precision of the fit: `'bfloat16'`, `'tensorfloat32'` (default;
                /// computed in float32, as candle has no TF32 switch) or `'float32'`.
                precision: $crate::kernels::precision::Precision = $crate::kernels::precision::Precision::Tensorfloat32;
                /// Seed of the random probe vectors; the same seed gives the same run.
                /// Default 0.
                seed: u64 = 0;
                $($own)*
            }
            ts_only {
                /// Which leaves get weight decay: a tree of booleans or `(path, leaf) =>
                /// boolean` (psgd-jax's `mask`). Default: all.
                "mask": "Mask";
                /// Receives the optimizer's warnings (a `PsgdWarning`: the divergence warning, once per
                /// optimizer, when the params' norm grows steadily); null silences them and skips
                /// the norm's sampling. Default: `process.emitWarning` with type `'PsgdWarning'` and
                /// the warning's `code`.
                "onWarning": "WarningHook | null";
            }
        }

        impl $crate::step::VariantOptions for $name {
            const PRECOND_LR: &'static str = "precondLr";

            fn step(&self) -> $crate::step::StepOptions {
                use $crate::kernels::fused::Clip;
                $crate::step::StepOptions {
                    learning_rate: self.learning_rate.clone(),
                    update_probability: self
                        .preconditioner_update_probability
                        .clone()
                        .unwrap_or($crate::schedule::Schedule::Constant(1.0)),
                    precond_lr: self.precond_lr.clone(),
                    b1: self.b1,
                    nesterov: self.nesterov,
                    weight_decay: self.weight_decay,
                    mu_dtype: self.mu_dtype.map(|d| d.0),
                    seed: self.seed,
                    init_scale: self.precond_init_scale,
                    normalizer: self.step_normalizer_order,
                    precision: self.precision,
                    decision: $crate::step::UpdateDecision::Draw { always: 2 },
                    fit_source: $crate::step::FitSource::Gradient,
                    // psgd-jax's XMat tests the option's truth value (0 disables the
                    // clip); LRA and Affine test for None
                    clip: match self.update_global_norm_clip {
                        Some(c) if !(c == 0.0 && $zero) => Clip::GlobalNorm(c),
                        _ => Clip::None,
                    },
                    grad_clip: self.grad_clip,
                    check_finite: !self.allow_non_finite,
                    on_unhealthy: self.on_unhealthy,
                    max_condition: self.max_condition,
                    momentum_warmup: $crate::kernels::fused::Warmup::Debias,
                    update_first: self.update_preconditioner_first && !self.overlap_fit,
                    overlap_fit: self.overlap_fit,
                }
            }

            fn set_learning_rate(&mut self, lr: f64) {
                self.learning_rate = $crate::schedule::Schedule::Constant(lr);
            }
        }
    };
}
pub(crate) use psgd_options;

/// Flattens every leaf and concatenates them into one vector (the reference's global
/// parameter vector, leaves in order).
pub fn concat_flat(ts: &[Tensor]) -> Result<Tensor> {
    if let [t] = ts {
        return Ok(t.flatten_all()?);
    }
    let device = ts.first().map_or(Device::Cpu, |t| t.device().clone());
    // one parallel copy instead of candle's single-threaded `cat`
    crate::kernels::dispatch(
        &[ts],
        |x| {
            let [out] = elementwise::map_rows(x[0].len(), [1], |r, [out]| {
                let mut scratch = vec![];
                out.copy_from_slice(x[0].range(r.start, r.end, &mut scratch));
            });
            Ok(Tensor::from_vec(out, x[0].len(), &device)?)
        },
        || {
            let flat = ts
                .iter()
                .map(|t| Ok(t.flatten_all()?))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&flat, 0)?)
        },
    )
}

/// Splits a vector made by [`concat_flat`] back into tensors of the leaves' shapes.
pub fn split_flat(v: &Tensor, leaves: &[LeafSpec]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(leaves.len());
    let mut at = 0;
    for l in leaves {
        let n: usize = l.shape.iter().product();
        out.push(v.narrow(0, at, n)?.reshape(l.shape.as_slice())?);
        at += n;
    }
    Ok(out)
}

/// The automatic initial scale of a global preconditioner (XMat, LRA; Affine per leaf),
/// as a 0-d tensor: `(Σv² / Σh²)^¼` with Hessian-vector products, `(n / Σh²)^¼` when
/// whitening gradients. See [`finite_scale`] for inputs without signal.
pub fn global_init_scale(inputs: &FitInputs, v: Option<&Tensor>, h: &Tensor) -> Result<Tensor> {
    if let Some(s) = inputs.init_scale {
        return Ok(Tensor::new(s as f32, h.device())?);
    }
    let hh = h.sqr()?.sum_all()?;
    let num = match (inputs.hessian, v) {
        (true, Some(v)) => v.sqr()?.sum_all()?,
        _ => Tensor::new(h.elem_count() as f32, h.device())?,
    };
    finite_or_one(&(num / hh)?.sqrt()?.sqrt()?)
}

/// [`finite_scale`] on the device, elementwise (no read-back): `0·s` is 0 exactly where
/// `s` is finite (NaN and ±Inf give NaN, which equals nothing).
pub fn finite_or_one(s: &Tensor) -> Result<Tensor> {
    let finite = (s * 0.0)?.eq(0f32)?;
    Ok(finite.where_cond(s, &s.ones_like()?)?)
}

/// The initial scale `s`, or 1 when it is not finite: the inputs of the first fit carry no
/// signal (an all-zero gradient: an unused parameter, a frozen block), where psgd-jax
/// divides by `Σh² = 0` and the preconditioner, then every update, turns NaN. With 1
/// the preconditioner keeps its initial identity scale and fits once gradients arrive.
/// Every finite scale is the reference's.
pub fn finite_scale(s: f32) -> f32 {
    if s.is_finite() {
        s
    } else {
        1.0
    }
}

/// [`global_init_scale`] on host vectors (sums in float64, the rest in float32).
pub fn global_init_scale_host(inputs: &FitInputs, v: Option<&Flat>, h: &Flat) -> f32 {
    if let Some(s) = inputs.init_scale {
        return s as f32;
    }
    let hh = elementwise::sum_sq(h) as f32;
    let num = match (inputs.hessian, v) {
        (true, Some(v)) => elementwise::sum_sq(v) as f32,
        _ => h.len() as f32,
    };
    finite_scale((num / hh).sqrt().sqrt())
}

/// The health check of a preconditioner shared by every leaf (XMat, LRA): the largest of
/// its 0-d `estimates` ([`crate::guard::read_groups`]), once per leaf.
pub fn shared_conditions(estimates: Vec<Tensor>, leaves: usize) -> Result<Vec<f64>> {
    let c = crate::guard::read_groups(vec![estimates])?;
    Ok(vec![c[0]; leaves])
}

/// A preconditioner shared by every leaf taken from `from` when any leaf is marked.
pub fn take_shared<S: Clone>(state: S, from: &S, which: &[bool]) -> S {
    if which.contains(&true) {
        from.clone()
    } else {
        state
    }
}

/// `max(x, 1e-25)` for a 0-d tensor (psgd-jax's `add_eps`).
pub fn add_eps(x: &Tensor) -> Result<Tensor> {
    Ok(x.maximum(1e-25)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::precision::Precision;
    use crate::step::StepNormalizer;
    use candle_core::Device;

    /// The candle-op path keeps the reference's finite scales and gives 1 where psgd-jax
    /// divides by `Σh² = 0`, as the host path does.
    #[test]
    fn init_scale_is_the_reference_s_or_1_without_signal() {
        let inputs = |hessian| FitInputs {
            vectors: None,
            hvps: &[],
            hessian,
            first: true,
            count: 0,
            precond_lr: 0.1,
            init_scale: None,
            normalizer: StepNormalizer::Second,
            precision: Precision::Float32,
        };
        let dev = Device::Cpu;
        let h = Tensor::new(&[1f32, 2., 2.], &dev).unwrap();
        let v = Tensor::new(&[3f32, 0., 4.], &dev).unwrap();
        let zero = h.zeros_like().unwrap();
        let at = |hessian, v: Option<&Tensor>, h: &Tensor| {
            global_init_scale(&inputs(hessian), v, h)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // (Σv²/Σh²)^¼ = (25/9)^¼ and (n/Σh²)^¼ = (3/9)^¼
        assert!((at(true, Some(&v), &h) - (25f32 / 9.).powf(0.25)).abs() < 1e-6);
        assert!((at(false, None, &h) - (3f32 / 9.).powf(0.25)).abs() < 1e-6);
        // no signal: 1, not Inf (n/0) or NaN (0/0)
        assert_eq!(at(false, None, &zero), 1.0);
        assert_eq!(at(true, Some(&zero), &zero), 1.0);
    }
}
