//! The optimizer step that XMat, LRA and Affine share, as psgd-jax 0.2.9 chains it:
//! `scale_by_<variant>` (preconditioner fit, momentum, preconditioning, global-norm clip),
//! then decoupled weight decay, then the learning rate. Each variant only provides its
//! [`Preconditioner`]: how it is initialised, fitted to a (vector, Hessian-vector product)
//! pair, applied, and saved.
//!
//! Differences from Kron that come from the reference: the update decision is a random
//! draw (`u < p`, and always on the first two steps) rather than Kron's counter; momentum
//! may be Nesterov; the fit uses the raw gradient (whitening) or the given Hessian-vector
//! product, never the momentum; there is no RMS clip but an optional global-norm clip.

use crate::elementwise::{self, Flat};
use crate::error::{PsgdError, Result};
use crate::precision::{parse_dtype, Precision};
use crate::random::RandomSource;
use crate::schedule::Schedule;
use crate::state_io::{self, LoadedState, StateFile};
use crate::transform::{self, Curvature, LeafSpec, StepHyper};
use crate::Transform;
use candle_core::{DType, Device, Tensor};
use std::fmt::Debug;

/// How the preconditioner step is normalised (`step_normalizer_order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepNormalizer {
    /// `'1st'`: by the size of the gradient of the fitting loss.
    First,
    /// `'2nd'` (default): by an estimate of its second-order term.
    #[default]
    Second,
}

impl StepNormalizer {
    /// Parses `'1st'` or `'2nd'`.
    pub fn parse(name: &str, s: Option<&str>) -> Result<Self> {
        match s {
            Some("1st") => Ok(StepNormalizer::First),
            Some("2nd") => Ok(StepNormalizer::Second),
            other => Err(PsgdError::option_range(
                name,
                format!("must be '1st' or '2nd', got {other:?}"),
            )),
        }
    }
}

/// Options of XMat, LRA and Affine (psgd-jax 0.2.9's defaults); `variant` holds the
/// variant's own options.
#[derive(Debug, Clone)]
pub struct PsgdOptions<V> {
    /// Learning rate, or a schedule of the step count before this step. Default 0.01.
    pub learning_rate: Schedule,
    /// Probability of updating the preconditioner (a schedule gets the 1-based step count).
    /// Default 1.
    pub preconditioner_update_probability: Schedule,
    /// Momentum; 0 turns it off (no momentum state). Default 0.9.
    pub b1: f64,
    /// Nesterov momentum (with bias correction). Default false.
    pub nesterov: bool,
    /// Decoupled weight decay, applied to leaves whose [`LeafSpec::weight_decay`] is set.
    pub weight_decay: f64,
    /// Step size of the preconditioner fit, or a schedule of the 1-based step count.
    /// Default 0.1.
    pub precond_lr: Schedule,
    /// Initial scale of the preconditioner; `None` picks it from the first fit's inputs.
    pub precond_init_scale: Option<f64>,
    /// Clip the updates to this global norm. Default none.
    pub update_global_norm_clip: Option<f64>,
    /// See [`StepNormalizer`].
    pub step_normalizer_order: StepNormalizer,
    /// Seed of the default random source.
    pub seed: u64,
    /// Dtype of the momentum; `None` keeps the params' dtype.
    pub mu_dtype: Option<DType>,
    /// Matmul precision of the fit. Default `Tensorfloat32`.
    pub precision: Precision,
    /// The variant's own options.
    pub variant: V,
}

impl<V: Default> Default for PsgdOptions<V> {
    fn default() -> Self {
        PsgdOptions {
            learning_rate: Schedule::Constant(0.01),
            preconditioner_update_probability: Schedule::Constant(1.0),
            b1: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            precond_lr: Schedule::Constant(0.1),
            precond_init_scale: None,
            update_global_norm_clip: None,
            step_normalizer_order: StepNormalizer::Second,
            seed: 0,
            mu_dtype: None,
            precision: Precision::Tensorfloat32,
            variant: V::default(),
        }
    }
}

/// What a preconditioner fit gets.
pub struct FitInputs<'a> {
    /// The probe vectors, one per leaf (Hessian mode, or drawn for whitening when
    /// [`Preconditioner::WHITENING_VECTOR`] is set).
    pub vectors: Option<&'a [Tensor]>,
    /// The Hessian-vector products, or the gradients when whitening. Float32.
    pub hvps: &'a [Tensor],
    /// Whether the inputs are Hessian-vector products (else gradients).
    pub hessian: bool,
    /// Whether this is the first step (the initial scale is applied first).
    pub first: bool,
    /// The fit's step size this step.
    pub precond_lr: f64,
    /// The option `precond_init_scale`.
    pub init_scale: Option<f64>,
    /// The option `step_normalizer_order`.
    pub normalizer: StepNormalizer,
    /// The option `precision`.
    pub precision: Precision,
}

/// The variant-specific part of XMat, LRA and Affine.
pub trait Preconditioner: Sized + Clone + Debug + Send + Sync {
    /// psgd-jax's name of the variant (`xmat`, `lra`, `affine`), in errors and state files.
    const NAME: &'static str;
    /// Whether the whitening fit needs a probe vector per leaf, drawn after the update
    /// decision (XMat and LRA; Affine's whitening fit draws its own when it needs one).
    const WHITENING_VECTOR: bool;
    /// Whether `update_global_norm_clip = 0` disables the clip (psgd-jax's XMat tests the
    /// option's truth value; LRA and Affine test for `None`).
    const ZERO_CLIP_DISABLES: bool;
    /// Whether the fit runs on a worker of rayon's pool ([`transform::on_pool`]): worth it
    /// when it forks many small parallel jobs (Affine's per-leaf products), not for a
    /// fit of a few fused passes (XMat, LRA).
    const FIT_ON_POOL: bool = false;
    /// The variant's own options.
    type Options: Clone + Default + Debug + Send + Sync;
    /// The preconditioner's tensors.
    type State: Clone + Debug + Send + Sync;

    /// Reads the variant option `key`; returns false when the key is not one of them.
    fn parse_option(o: &mut Self::Options, key: &str, v: &serde_json::Value) -> Result<bool>;
    /// Checks the variant options.
    fn validate(_o: &Self::Options) -> Result<()> {
        Ok(())
    }
    /// The preconditioner for these leaves.
    fn new(leaves: &[LeafSpec], o: &Self::Options) -> Result<Self>;
    /// The initial preconditioner on `device`, drawing any random factors from `rng`.
    fn init(&self, device: &Device, rng: &mut dyn RandomSource) -> Result<Self::State>;
    /// One fit of the preconditioner to the inputs.
    fn update(
        &self,
        state: &Self::State,
        inputs: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<Self::State>;
    /// The preconditioned gradients (float32, one per leaf).
    fn apply(&self, state: &Self::State, grads: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Adds the preconditioner's tensors to a state file.
    fn save(&self, state: &Self::State, f: &mut StateFile);
    /// Reads them back, checking their shapes.
    fn load(&self, f: &mut LoadedState) -> Result<Self::State>;
    /// Checks that `state` fits this preconditioner (shapes), before a step uses it.
    fn check(&self, state: &Self::State) -> Result<()>;
}

/// The state of XMat, LRA or Affine: the step count, the momentum and the preconditioner.
#[derive(Debug, Clone)]
pub struct PsgdState<S> {
    /// Steps taken.
    pub count: u64,
    /// Momentum per leaf (none when `b1 == 0`).
    pub mu: Option<Vec<Tensor>>,
    /// The preconditioner.
    pub precond: S,
}

/// XMat, LRA or Affine: the shared step around a [`Preconditioner`].
#[derive(Debug, Clone)]
pub struct Psgd<P: Preconditioner> {
    options: PsgdOptions<P::Options>,
    leaves: Vec<LeafSpec>,
    precond: P,
}

impl<P: Preconditioner> Psgd<P> {
    /// The options.
    pub fn options(&self) -> &PsgdOptions<P::Options> {
        &self.options
    }

    /// The preconditioner.
    pub fn preconditioner(&self) -> &P {
        &self.precond
    }
}

fn validate<V>(o: &PsgdOptions<V>) -> Result<()> {
    transform::check_common_options(
        o.b1,
        o.weight_decay,
        &o.learning_rate,
        &o.preconditioner_update_probability,
    )?;
    if let Schedule::Constant(v) = o.precond_lr {
        transform::check_finite_option("precond_lr", v)?;
    }
    if let Some(s) = o.precond_init_scale {
        if !(s.is_finite() && s > 0.0) {
            return Err(PsgdError::option_range(
                "precond_init_scale",
                format!("must be > 0, got {s}"),
            ));
        }
    }
    if let Some(c) = o.update_global_norm_clip {
        if !(c.is_finite() && c >= 0.0) {
            return Err(PsgdError::option_range(
                "update_global_norm_clip",
                format!("must be >= 0, got {c}"),
            ));
        }
    }
    Ok(())
}

/// Options of the variant `P` from a JSON object with psgd-jax's snake_case keyword names.
/// `mask` (the weight-decay mask) belongs in the [`LeafSpec`]s and is skipped; any other
/// unknown key is an error.
pub fn options_from_json<P: Preconditioner>(
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<PsgdOptions<P::Options>> {
    {
        use crate::json::*;
        let mut o = PsgdOptions::<P::Options>::default();
        for (k, v) in obj {
            let opt_num = |v: &serde_json::Value| -> Result<Option<f64>> {
                if v.is_null() {
                    Ok(None)
                } else {
                    num(k, v).map(Some)
                }
            };
            match k.as_str() {
                "learning_rate" => o.learning_rate = Schedule::Constant(num(k, v)?),
                "preconditioner_update_probability" => {
                    o.preconditioner_update_probability = Schedule::Constant(num(k, v)?)
                }
                "b1" => o.b1 = num(k, v)?,
                "nesterov" => o.nesterov = boolean(k, v)?,
                "weight_decay" => o.weight_decay = num(k, v)?,
                "precond_lr" => o.precond_lr = Schedule::Constant(num(k, v)?),
                "precond_init_scale" => o.precond_init_scale = opt_num(v)?,
                "update_global_norm_clip" => o.update_global_norm_clip = opt_num(v)?,
                "step_normalizer_order" => {
                    o.step_normalizer_order = StepNormalizer::parse(k, opt_str(k, v)?)?
                }
                "seed" => o.seed = uint(k, v)? as u64,
                "mu_dtype" => o.mu_dtype = parse_dtype(k, opt_str(k, v)?)?,
                "precision" => o.precision = Precision::parse(k, opt_str(k, v)?)?,
                "mask" => {}
                _ => {
                    if !P::parse_option(&mut o.variant, k, v)? {
                        return Err(PsgdError::option_type(
                            k,
                            format!("unknown option for {}", P::NAME),
                        ));
                    }
                }
            }
        }
        validate(&o)?;
        P::validate(&o.variant)?;
        Ok(o)
    }
}

/// Flattens every leaf and concatenates them into one vector (the reference's global
/// parameter vector, leaves in order).
pub fn concat_flat(ts: &[Tensor]) -> Result<Tensor> {
    if let [t] = ts {
        return Ok(t.flatten_all()?);
    }
    let device = ts.first().map_or(Device::Cpu, |t| t.device().clone());
    // one parallel copy instead of candle's single-threaded `cat`
    let host = elementwise::with_host(&[ts], |x| {
        let [out] = elementwise::map_rows(x[0].len(), [1], |r, [out]| {
            let mut scratch = vec![];
            out.copy_from_slice(x[0].range(r.start, r.end, &mut scratch));
        });
        Tensor::from_vec(out, x[0].len(), &device)
    });
    if let Some(t) = host {
        return Ok(t?);
    }
    let flat = ts
        .iter()
        .map(|t| Ok(t.flatten_all()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&flat, 0)?)
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

/// The automatic initial scale of a global preconditioner (XMat, LRA), as a 0-d tensor:
/// `(Σv² / Σh²)^¼` with Hessian-vector products, `(n / Σh²)^¼` when whitening gradients.
pub fn global_init_scale(inputs: &FitInputs, v: Option<&Tensor>, h: &Tensor) -> Result<Tensor> {
    if let Some(s) = inputs.init_scale {
        return Ok(Tensor::new(s as f32, h.device())?);
    }
    let hh = h.sqr()?.sum_all()?;
    let num = match (inputs.hessian, v) {
        (true, Some(v)) => v.sqr()?.sum_all()?,
        _ => Tensor::new(h.elem_count() as f32, h.device())?,
    };
    Ok((num / hh)?.sqrt()?.sqrt()?)
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
    (num / hh).sqrt().sqrt()
}

/// `max(x, 1e-25)` for a 0-d tensor (psgd-jax's `add_eps`).
pub fn add_eps(x: &Tensor) -> Result<Tensor> {
    Ok(x.maximum(1e-25)?)
}

impl<P: Preconditioner> Transform for Psgd<P> {
    type Options = PsgdOptions<P::Options>;
    type State = PsgdState<P::State>;

    fn options_from_json(
        obj: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self::Options> {
        options_from_json::<P>(obj)
    }

    fn new(leaves: Vec<LeafSpec>, options: Self::Options) -> Result<Self> {
        validate(&options)?;
        P::validate(&options.variant)?;
        let precond = P::new(&leaves, &options.variant)?;
        Ok(Psgd {
            options,
            leaves,
            precond,
        })
    }

    fn leaves(&self) -> &[LeafSpec] {
        &self.leaves
    }

    fn seed(&self) -> u64 {
        self.options.seed
    }

    fn init_with(&self, params: &[Tensor], rng: &mut dyn RandomSource) -> Result<Self::State> {
        transform::check_leaves("params", &self.leaves, params)?;
        let device = params
            .first()
            .map(|p| p.device().clone())
            .unwrap_or(Device::Cpu);
        let mu = transform::init_momentum(self.options.b1, self.options.mu_dtype, params)?;
        Ok(PsgdState {
            count: 0,
            mu,
            precond: self.precond.init(&device, rng)?,
        })
    }

    fn count(state: &Self::State) -> u64 {
        state.count
    }

    fn hyper(&self, state: &Self::State) -> StepHyper {
        StepHyper {
            learning_rate: self.options.learning_rate.at(state.count),
            update_probability: self
                .options
                .preconditioner_update_probability
                .at(state.count + 1),
            precond_lr: Some(self.options.precond_lr.at(state.count + 1)),
        }
    }

    fn update_with(
        &self,
        grads: &[Tensor],
        state: &Self::State,
        params: Option<&[Tensor]>,
        hyper: StepHyper,
        curvature: Option<&Curvature>,
        rng: &mut dyn RandomSource,
    ) -> Result<(Vec<Tensor>, Self::State)> {
        let o = &self.options;
        transform::check_step_inputs(&self.leaves, grads, params, o.weight_decay)?;
        transform::check_hyper(&hyper)?;
        if let Some(c) = curvature {
            transform::check_leaves("hvp", &self.leaves, &c.hvp)?;
            transform::check_leaves("vector", &self.leaves, &c.vector)?;
            if c.update_preconditioner {
                transform::check_finite("hvp", &self.leaves, &c.hvp)?;
                transform::check_finite("vector", &self.leaves, &c.vector)?;
            }
        }
        self.check_state(state)?;
        let precond_lr = hyper
            .precond_lr
            .unwrap_or_else(|| o.precond_lr.at(state.count + 1));
        if !precond_lr.is_finite() {
            return Err(PsgdError::option_range(
                "precond_lr",
                format!("must be finite, got {precond_lr}"),
            ));
        }
        let count = state.count + 1;
        let f32s = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
            ts.iter().map(|t| Ok(t.to_dtype(DType::F32)?)).collect()
        };
        let g32 = f32s(grads)?;

        // the fit's inputs: given (Hessian mode) or the gradients with drawn probes
        let (do_update, vectors, hvps, hessian) = match curvature {
            Some(c) => (
                c.update_preconditioner,
                Some(f32s(&c.vector)?),
                f32s(&c.hvp)?,
                true,
            ),
            None => {
                let u = rng.uniform()?;
                let do_update = u < hyper.update_probability as f32 || state.count < 2;
                // the probes only feed the fit: a step without one skips their values
                let vectors = if P::WHITENING_VECTOR && do_update {
                    Some(
                        self.leaves
                            .iter()
                            .zip(&g32)
                            .map(|(l, g)| rng.normal(&l.shape, g.device()))
                            .collect::<Result<Vec<_>>>()?,
                    )
                } else {
                    if P::WHITENING_VECTOR {
                        for l in &self.leaves {
                            rng.skip_normal(&l.shape)?;
                        }
                    }
                    None
                };
                (do_update, vectors, g32.clone(), false)
            }
        };
        let precond = if do_update {
            let inputs = FitInputs {
                vectors: vectors.as_deref(),
                hvps: &hvps,
                hessian,
                first: state.count == 0,
                precond_lr,
                init_scale: o.precond_init_scale,
                normalizer: o.step_normalizer_order,
                precision: o.precision,
            };
            let mut fit = || self.precond.update(&state.precond, &inputs, rng);
            if P::FIT_ON_POOL {
                transform::on_pool(&self.leaves, fit)?
            } else {
                fit()?
            }
        } else {
            state.precond.clone()
        };

        let (mu, momentum) =
            transform::momentum_all(o.b1, o.nesterov, state.mu.as_ref(), &g32, count)?;

        let pre = self.precond.apply(&precond, &momentum)?;
        let clip = match o.update_global_norm_clip {
            Some(c) if !(c == 0.0 && P::ZERO_CLIP_DISABLES) => transform::Clip::GlobalNorm(c),
            _ => transform::Clip::None,
        };
        let updates = transform::finish_updates(
            &pre,
            params,
            &self.leaves,
            grads,
            o.weight_decay,
            hyper.learning_rate,
            clip,
        )?;

        let mu = transform::keep_dtypes(mu, state.mu.as_ref())?;
        Ok((updates, PsgdState { count, mu, precond }))
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.options.learning_rate = Schedule::Constant(lr);
    }

    fn learning_rate(&self, state: &Self::State) -> f64 {
        self.options.learning_rate.at(state.count)
    }

    fn state_to_bytes(&self, state: &Self::State) -> Result<Vec<u8>> {
        let mut f = StateFile::new(P::NAME, &self.leaves);
        f.meta("count", state.count.to_string());
        f.momentum(state.mu.as_ref());
        self.precond.save(&state.precond, &mut f);
        f.to_bytes()
    }

    fn state_from_bytes(&self, bytes: &[u8], device: &Device) -> Result<Self::State> {
        let mut f = state_io::LoadedState::parse(bytes, device, P::NAME, &self.leaves)?;
        let count = f.meta_u64("count")?;
        let mu = f.take_momentum(self.leaves.len(), self.options.b1 > 0.0)?;
        let state = PsgdState {
            count,
            mu,
            precond: self.precond.load(&mut f)?,
        };
        self.check_state(&state)?;
        Ok(state)
    }
}

impl<P: Preconditioner> Psgd<P> {
    fn check_state(&self, s: &PsgdState<P::State>) -> Result<()> {
        let bad = |m: String| Err(PsgdError::State(m));
        match (&s.mu, self.options.b1 > 0.0) {
            (Some(mu), true) => {
                for (m, l) in mu.iter().zip(&self.leaves) {
                    if m.dims() != l.shape.as_slice() {
                        return bad(format!(
                            "momentum of '{}' has shape {:?}, expected {:?}",
                            l.path,
                            m.dims(),
                            l.shape
                        ));
                    }
                }
                if mu.len() != self.leaves.len() {
                    return bad(format!(
                        "momentum has {} leaves, expected {}",
                        mu.len(),
                        self.leaves.len()
                    ));
                }
            }
            (None, false) => {}
            _ => return bad("momentum does not match b1".into()),
        }
        self.precond.check(&s.precond)
    }
}
