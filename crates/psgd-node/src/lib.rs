//! Node bindings: conversion and dispatch only. Every number is computed in the `psgd`
//! crate; errors cross as JS exceptions whose message starts with `[TypeError]`,
//! `[RangeError]` or `[Error]`, which the TypeScript layer turns into those classes.

use candle_core::{DType, Device};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use psgd::{AnyState, AnyTransform, Curvature, ErrorKind, LeafSpec, PsgdError, StepHyper};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

fn js_err(e: PsgdError) -> Error {
    let class = match e.kind() {
        ErrorKind::Type => "TypeError",
        ErrorKind::Range => "RangeError",
        ErrorKind::Other => "Error",
    };
    Error::new(Status::GenericFailure, format!("[{class}] {e}"))
}

fn type_err(msg: String) -> Error {
    Error::new(Status::InvalidArg, format!("[TypeError] {msg}"))
}

fn range_err(msg: String) -> Error {
    Error::new(Status::InvalidArg, format!("[RangeError] {msg}"))
}

fn candle_err(e: candle_core::Error) -> Error {
    js_err(PsgdError::Candle(e))
}

/// Devices are created once per name: candle only combines tensors of the same device.
fn device(name: &str) -> Result<Device> {
    static CACHE: OnceLock<Mutex<HashMap<String, Device>>> = OnceLock::new();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    if let Some(d) = cache.get(name) {
        return Ok(d.clone());
    }
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .map_err(|_| range_err(format!("device '{name}': bad ordinal")))?,
        ),
        None => (name, 0),
    };
    let dev = match kind {
        "cuda" => Device::new_cuda(ordinal),
        "metal" => Device::new_metal(ordinal),
        _ => {
            return Err(range_err(format!(
                "device '{name}' is unknown (use 'cpu', 'cuda', 'cuda:N' or 'metal')"
            )))
        }
    }
    .map_err(|e| range_err(format!("device '{name}' is not available: {e}")))?;
    cache.insert(name.to_string(), dev.clone());
    Ok(dev)
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => format!("cuda:{}", d.location_ordinal()),
        Device::Metal(_) => "metal".into(),
    }
}

trait Ordinal {
    fn location_ordinal(&self) -> usize;
}

impl Ordinal for Device {
    fn location_ordinal(&self) -> usize {
        match self.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
            candle_core::DeviceLocation::Metal { gpu_id } => gpu_id,
            candle_core::DeviceLocation::Cpu => 0,
        }
    }
}

fn dtype(name: &str) -> Result<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "bfloat16" => Ok(DType::BF16),
        "float16" => Ok(DType::F16),
        "float64" => Ok(DType::F64),
        _ => Err(type_err(format!(
            "dtype '{name}' is not supported (float32, bfloat16, float16, float64)"
        ))),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        DType::U8 => "uint8",
        DType::U32 => "uint32",
        DType::I64 => "int64",
        _ => "other",
    }
}

/// A tensor in native memory (CPU or GPU), backed by candle.
#[napi(js_name = "NativeTensor", custom_finalize)]
pub struct Tensor {
    /// `None` once disposed. A cell, so that an in-place step can give the params new
    /// values through the shared references it gets (a leaf may appear twice).
    inner: RefCell<Option<candle_core::Tensor>>,
    /// What this wrapper told V8 it holds (see [`Tensor::wrap`]).
    reported: i64,
}

/// Bytes held by the native tensors of live JS wrappers (disposed or finalized ones
/// excluded): see [`live_tensor_bytes`].
static LIVE_BYTES: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

impl Tensor {
    /// Wraps a candle tensor and reports its bytes to V8 as external memory. V8 sees only
    /// the small wrapper object, so without this a loop of large steps would keep dozens of
    /// dead updates alive until the JS heap itself filled: memory grows and each step
    /// touches fresh pages. Shared storage is counted per wrapper, which only makes the
    /// collector run a little sooner.
    fn wrap(env: &Env, inner: candle_core::Tensor) -> Tensor {
        let bytes = (inner.elem_count() * inner.dtype().size_in_bytes()) as i64;
        let reported = match env.adjust_external_memory(bytes) {
            Ok(_) => bytes,
            Err(_) => 0,
        };
        LIVE_BYTES.fetch_add(reported, std::sync::atomic::Ordering::Relaxed);
        Tensor {
            inner: RefCell::new(Some(inner)),
            reported,
        }
    }

    /// The tensor (a cheap handle clone), or an error once disposed.
    fn live(&self) -> Result<candle_core::Tensor> {
        self.inner.borrow().clone().ok_or_else(|| {
            Error::new(
                Status::InvalidArg,
                "[TypeError] the tensor was disposed".to_string(),
            )
        })
    }

    /// Drops the native tensor now and takes back what [`Tensor::wrap`] reported.
    fn release(&mut self, env: &Env) -> Result<()> {
        self.inner.replace(None);
        if self.reported != 0 {
            LIVE_BYTES.fetch_sub(self.reported, std::sync::atomic::Ordering::Relaxed);
            let r = std::mem::take(&mut self.reported);
            env.adjust_external_memory(-r)?;
        }
        Ok(())
    }

    fn wrap_all(env: &Env, ts: Vec<candle_core::Tensor>) -> Vec<Tensor> {
        ts.into_iter().map(|t| Tensor::wrap(env, t)).collect()
    }
}

impl ObjectFinalize for Tensor {
    fn finalize(mut self, env: Env) -> Result<()> {
        self.release(&env)
    }
}

/// Bytes held by native tensors whose JS wrappers are alive or not yet finalized. N-API runs
/// the finalizers of collected wrappers only when the event loop turns, so a synchronous
/// loop that drops tensors without `dispose` shows here as growth.
#[napi]
pub fn live_tensor_bytes() -> f64 {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed) as f64
}

#[napi]
impl Tensor {
    /// A tensor from float32 data (row-major) and a shape, stored as `dtype` on `device`.
    #[napi(factory)]
    pub fn from_array(
        env: Env,
        data: &[f32],
        shape: Vec<u32>,
        dtype_name: String,
        device_name: String,
    ) -> Result<Tensor> {
        let shape: Vec<usize> = shape.into_iter().map(|d| d as usize).collect();
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(range_err(format!(
                "data has {} values, shape {:?} needs {n}",
                data.len(),
                shape
            )));
        }
        let (dev, dt) = (device(&device_name)?, dtype(&dtype_name)?);
        let t = candle_core::Tensor::from_slice(data, shape.as_slice(), &dev)
            .and_then(|t| t.to_dtype(dt))
            .map_err(candle_err)?;
        Ok(Tensor::wrap(&env, t))
    }

    /// The shape.
    #[napi(getter)]
    pub fn shape(&self) -> Result<Vec<u32>> {
        Ok(self.live()?.dims().iter().map(|&d| d as u32).collect())
    }

    /// The dtype name.
    #[napi(getter)]
    pub fn dtype(&self) -> Result<String> {
        Ok(dtype_name(self.live()?.dtype()).to_string())
    }

    /// The device name.
    #[napi(getter)]
    pub fn device(&self) -> Result<String> {
        Ok(device_name(self.live()?.device()))
    }

    /// Whether [`Self::dispose`] was called.
    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.inner.borrow().is_none()
    }

    /// Frees the native memory now, instead of when the garbage collector and then the event
    /// loop get to the wrapper; any later use of this tensor throws. Idempotent.
    #[napi]
    pub fn dispose(&mut self, env: Env) -> Result<()> {
        self.release(&env)
    }

    /// The values as float32, row-major (copied to the host).
    #[napi]
    pub fn to_array(&self) -> Result<Float32Array> {
        let v = self
            .live()?
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle_err)?;
        Ok(Float32Array::new(v))
    }

    /// `self + other` in `self`'s dtype.
    #[napi]
    pub fn add(&self, env: Env, other: &Tensor) -> Result<Tensor> {
        let r = psgd::apply_updates(
            std::slice::from_ref(&self.live()?),
            std::slice::from_ref(&other.live()?),
        )
        .map_err(js_err)?;
        Ok(Tensor::wrap(&env, r.into_iter().next().unwrap()))
    }

    /// Makes this tensor hold `other`'s values (same shape required).
    #[napi]
    pub fn assign(&mut self, other: &Tensor) -> Result<()> {
        let (src, dst) = (other.live()?, self.live()?);
        if src.dims() != dst.dims() {
            return Err(range_err(format!(
                "assign: shape {:?} into {:?}",
                src.dims(),
                dst.dims()
            )));
        }
        let next = src.to_dtype(dst.dtype()).map_err(candle_err)?;
        self.inner.replace(Some(next));
        Ok(())
    }

    /// A copy on `device`, as `dtype`.
    #[napi]
    pub fn to(&self, env: Env, dtype_name: String, device_name: String) -> Result<Tensor> {
        let (dev, dt) = (device(&device_name)?, dtype(&dtype_name)?);
        let t = self
            .live()?
            .to_device(&dev)
            .and_then(|t| t.to_dtype(dt))
            .map_err(candle_err)?;
        Ok(Tensor::wrap(&env, t))
    }
}

/// An optimizer's state: an opaque handle, advanced in place by `update`.
#[napi]
pub struct NativeState {
    inner: Arc<Mutex<AnyState>>,
}

#[napi]
impl NativeState {
    /// An independent copy (tensors are immutable, so this is cheap).
    #[napi(js_name = "clone")]
    pub fn clone_state(&self) -> NativeState {
        NativeState {
            inner: Arc::new(Mutex::new(self.inner.lock().unwrap().clone())),
        }
    }

    /// Steps taken.
    #[napi(getter)]
    pub fn count(&self) -> f64 {
        self.inner.lock().unwrap().count() as f64
    }
}

/// One leaf as the TypeScript layer describes it.
#[napi(object)]
pub struct LeafInfo {
    pub path: String,
    pub shape: Vec<u32>,
    pub scanned: bool,
    pub weight_decay: bool,
}

/// A PSGD optimizer of any variant for a fixed list of leaves.
#[napi]
pub struct NativeOptimizer {
    inner: Arc<AnyTransform>,
}

fn tensors(v: &[&Tensor]) -> Result<Vec<candle_core::Tensor>> {
    v.iter().map(|t| t.live()).collect()
}

/// This step's hyperparameters, with the schedules already evaluated by the caller.
#[napi(object)]
pub struct StepInput {
    pub learning_rate: f64,
    pub update_probability: f64,
    /// The preconditioner step size (XMat, LRA, Affine); the options' value when absent.
    pub precond_lr: Option<f64>,
    /// Hessian mode: whether to update the preconditioner this step (with `hvp` and
    /// `vector` given).
    pub update_preconditioner: Option<bool>,
}

fn step_parts(
    step: &StepInput,
    hvp: Option<Vec<&Tensor>>,
    vector: Option<Vec<&Tensor>>,
) -> Result<(StepHyper, Option<Curvature>)> {
    let hyper = StepHyper {
        learning_rate: step.learning_rate,
        update_probability: step.update_probability,
        precond_lr: step.precond_lr,
    };
    let curvature = match (hvp, vector, step.update_preconditioner) {
        (None, None, None) => None,
        (Some(h), Some(v), Some(flag)) => Some(Curvature {
            hvp: tensors(&h)?,
            vector: tensors(&v)?,
            update_preconditioner: flag,
        }),
        _ => {
            return Err(type_err(
                "the Hessian mode needs hvp, vector and updatePreconditioner together".into(),
            ))
        }
    };
    Ok((hyper, curvature))
}

/// One step on `state`, then `then` on its updates; the state advances only when both
/// succeed (a failure leaves it as it was).
fn run_update<R>(
    opt: &AnyTransform,
    state: &Mutex<AnyState>,
    grads: &[candle_core::Tensor],
    params: Option<&[candle_core::Tensor]>,
    hyper: StepHyper,
    curvature: Option<&Curvature>,
    then: impl FnOnce(Vec<candle_core::Tensor>) -> Result<R>,
) -> Result<R> {
    let mut guard = state.lock().unwrap();
    let (updates, next) = opt
        .update_seeded(grads, &guard, params, hyper, curvature)
        .map_err(js_err)?;
    let out = then(updates)?;
    // only a step that fully succeeded replaces the state
    *guard = next;
    Ok(out)
}

/// The work of `updateAsync`, run on the libuv thread pool.
pub struct UpdateTask {
    opt: Arc<AnyTransform>,
    state: Arc<Mutex<AnyState>>,
    grads: Vec<candle_core::Tensor>,
    params: Option<Vec<candle_core::Tensor>>,
    hyper: StepHyper,
    curvature: Option<Curvature>,
}

impl Task for UpdateTask {
    type Output = Vec<candle_core::Tensor>;
    type JsValue = Vec<Tensor>;

    fn compute(&mut self) -> Result<Self::Output> {
        run_update(
            &self.opt,
            &self.state,
            &self.grads,
            self.params.as_deref(),
            self.hyper,
            self.curvature.as_ref(),
            Ok,
        )
    }

    fn resolve(&mut self, env: Env, output: Self::Output) -> Result<Self::JsValue> {
        Ok(Tensor::wrap_all(&env, output))
    }
}

#[napi]
impl NativeOptimizer {
    /// `variant` is `'kron'`, `'xmat'`, `'lra'` or `'affine'`; `options_json` holds
    /// psgd-jax's snake_case options (without the schedules and masks, which the
    /// TypeScript layer resolves).
    #[napi(constructor)]
    pub fn new(variant: String, leaves: Vec<LeafInfo>, options_json: String) -> Result<Self> {
        let options: serde_json::Value =
            serde_json::from_str(&options_json).map_err(|e| type_err(format!("options: {e}")))?;
        let options = options
            .as_object()
            .ok_or_else(|| type_err("options must be an object".into()))?;
        let leaves = leaves
            .into_iter()
            .map(|l| LeafSpec {
                path: l.path,
                shape: l.shape.into_iter().map(|d| d as usize).collect(),
                scanned: l.scanned,
                weight_decay: l.weight_decay,
            })
            .collect();
        let inner = AnyTransform::new(&variant, leaves, options).map_err(js_err)?;
        Ok(NativeOptimizer {
            inner: Arc::new(inner),
        })
    }

    /// The initial state for `params`.
    #[napi]
    pub fn init(&self, params: Vec<&Tensor>) -> Result<NativeState> {
        let s = self.inner.init(&tensors(&params)?).map_err(js_err)?;
        Ok(NativeState {
            inner: Arc::new(Mutex::new(s)),
        })
    }

    /// One step: returns the updates and advances `state` in place (only on success).
    /// `hvp` and `vector` (with `step.updatePreconditioner`) select the Hessian mode.
    // the JS signature, plus the `Env` napi-rs injects
    #[allow(clippy::too_many_arguments)]
    #[napi]
    pub fn update(
        &self,
        env: Env,
        grads: Vec<&Tensor>,
        state: &NativeState,
        params: Option<Vec<&Tensor>>,
        step: StepInput,
        hvp: Option<Vec<&Tensor>>,
        vector: Option<Vec<&Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let p = params.as_deref().map(tensors).transpose()?;
        let (hyper, curvature) = step_parts(&step, hvp, vector)?;
        let u = run_update(
            &self.inner,
            &state.inner,
            &tensors(&grads)?,
            p.as_deref(),
            hyper,
            curvature.as_ref(),
            Ok,
        )?;
        Ok(Tensor::wrap_all(&env, u))
    }

    /// One step in place: `params ← params + updates` (each in its own dtype), with no
    /// updates handed back to JS, so a step costs no wrapper objects. Nothing changes on
    /// error. The same inputs as [`Self::update`], with the params required.
    #[allow(clippy::too_many_arguments)]
    #[napi]
    pub fn step(
        &self,
        grads: Vec<&Tensor>,
        state: &NativeState,
        params: Vec<&Tensor>,
        step: StepInput,
        hvp: Option<Vec<&Tensor>>,
        vector: Option<Vec<&Tensor>>,
    ) -> Result<()> {
        let p = tensors(&params)?;
        let (hyper, curvature) = step_parts(&step, hvp, vector)?;
        let next = run_update(
            &self.inner,
            &state.inner,
            &tensors(&grads)?,
            Some(&p),
            hyper,
            curvature.as_ref(),
            |u| psgd::apply_updates(&p, &u).map_err(js_err),
        )?;
        for (t, v) in params.iter().zip(next) {
            t.inner.replace(Some(v));
        }
        Ok(())
    }

    /// For the benchmark's binding-overhead figure: `n` whole steps run by a Rust loop, with
    /// no JS in between, each timed on the Rust side (seconds; the results are dropped).
    /// With `add`, each step also forms `params + updates`, the work of [`Self::step`].
    /// Taken in the same process as the Node API steps it is compared with, so both see
    /// the same allocator and page state. Advances `state` like `update`.
    #[napi]
    pub fn time_steps(
        &self,
        grads: Vec<&Tensor>,
        state: &NativeState,
        params: Option<Vec<&Tensor>>,
        step: StepInput,
        n: u32,
        add: Option<bool>,
    ) -> Result<Vec<f64>> {
        let grads = tensors(&grads)?;
        let params = params.as_deref().map(tensors).transpose()?;
        let (hyper, _) = step_parts(&step, None, None)?;
        let add = add.unwrap_or(false);
        (0..n)
            .map(|_| {
                let t0 = std::time::Instant::now();
                run_update(
                    &self.inner,
                    &state.inner,
                    &grads,
                    params.as_deref(),
                    hyper,
                    None,
                    |u| match (&params, add) {
                        (Some(p), true) => psgd::apply_updates(p, &u).map(drop).map_err(js_err),
                        _ => Ok(()),
                    },
                )?;
                Ok(t0.elapsed().as_secs_f64())
            })
            .collect()
    }

    /// [`Self::update`] on the libuv thread pool; resolves to the updates.
    #[napi(ts_return_type = "Promise<NativeTensor[]>")]
    pub fn update_async(
        &self,
        grads: Vec<&Tensor>,
        state: &NativeState,
        params: Option<Vec<&Tensor>>,
        step: StepInput,
        hvp: Option<Vec<&Tensor>>,
        vector: Option<Vec<&Tensor>>,
    ) -> Result<AsyncTask<UpdateTask>> {
        let (hyper, curvature) = step_parts(&step, hvp, vector)?;
        Ok(AsyncTask::new(UpdateTask {
            opt: self.inner.clone(),
            state: state.inner.clone(),
            grads: tensors(&grads)?,
            params: params.as_deref().map(tensors).transpose()?,
            hyper,
            curvature,
        }))
    }

    /// The state as safetensors bytes.
    #[napi]
    pub fn state_to_bytes(&self, state: &NativeState) -> Result<Buffer> {
        let s = state.inner.lock().unwrap();
        Ok(self.inner.state_to_bytes(&s).map_err(js_err)?.into())
    }

    /// A state from safetensors bytes, placed on `device`.
    #[napi]
    pub fn state_from_bytes(&self, bytes: &[u8], device_name: String) -> Result<NativeState> {
        let s = self
            .inner
            .state_from_bytes(bytes, &device(&device_name)?)
            .map_err(js_err)?;
        Ok(NativeState {
            inner: Arc::new(Mutex::new(s)),
        })
    }

    /// Makes `target` hold `source`'s state (both of this optimizer).
    #[napi]
    pub fn copy_state(&self, source: &NativeState, target: &NativeState) -> Result<()> {
        let s = source.inner.lock().unwrap().clone();
        self.inner.check_variant(&s).map_err(js_err)?;
        *target.inner.lock().unwrap() = s;
        Ok(())
    }
}

/// The result of one conformance case.
#[napi(object)]
pub struct ConformanceResult {
    pub name: String,
    pub max_rel_err: f64,
    pub detail: String,
    pub passed: bool,
}

/// Runs every fixture case under `dir` (see `conformance.md`).
#[napi]
pub fn run_conformance(dir: String) -> Result<Vec<ConformanceResult>> {
    let results = psgd::conformance::run_dir(std::path::Path::new(&dir)).map_err(js_err)?;
    Ok(results
        .into_iter()
        .map(|r| ConformanceResult {
            name: r.name,
            max_rel_err: r.max_rel_err,
            detail: r.detail,
            passed: r.passed,
        })
        .collect())
}

/// The tolerance a conformance case must meet.
#[napi]
pub fn conformance_tolerance() -> f64 {
    psgd::conformance::TOLERANCE
}
