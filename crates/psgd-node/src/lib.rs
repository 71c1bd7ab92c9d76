//! Node bindings: conversion and dispatch only. Every number is computed in the `psgd`
//! crate; errors cross as real `TypeError`/`RangeError`/`Error` objects (chosen by
//! [`psgd::ErrorKind`]), so the TypeScript layer never parses a message.

use candle_core::{DType, Device};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use psgd::any::{AnyFitted, AnyPendingFit, StepInputs};
use psgd::options::StateDType;
use psgd::{AnyState, AnyTransform, Curvature, ErrorKind, LeafSpec, PsgdError, StepHyper};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

#[cfg(feature = "bench")]
mod bench;

// The step allocates and frees tensors of several MiB each (momentum, preconditioned
// gradients, updates). glibc's malloc serves blocks that large with fresh mmap'd or
// trimmed pages and faults them in again on the next step, so how fast a step runs
// depended on how its frees happened to interleave (a scanned XMat apply moved from 77
// to 107 ms with no change in arithmetic). mimalloc keeps freed pages and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A JS error of the class `kind` names. The error object is made here and retained, so a
/// synchronous throw and a promise rejection both deliver it as it is.
fn error_of(env: &Env, kind: ErrorKind, msg: String) -> Error {
    let err = Error::new(Status::GenericFailure, msg);
    let value = match kind {
        ErrorKind::Type => JsTypeError::from(err).into_unknown(*env),
        ErrorKind::Range => JsRangeError::from(err).into_unknown(*env),
        ErrorKind::Other => JsError::from(err).into_unknown(*env),
    };
    Error::from_unknown_without_coercion(value)
}

/// A core error as the JS error of its kind.
fn js_err(env: &Env, e: PsgdError) -> Error {
    error_of(env, e.kind(), e.to_string())
}

fn type_err(env: &Env, msg: String) -> Error {
    error_of(env, ErrorKind::Type, msg)
}

fn range_err(env: &Env, msg: String) -> Error {
    error_of(env, ErrorKind::Range, msg)
}

/// A disposed tensor's error (a `TypeError`), or a candle error.
fn candle_err(env: &Env, e: candle_core::Error) -> Error {
    js_err(env, PsgdError::from(e))
}

/// Runs a call into the core with a panic turned into an error, as a last resort: a panic
/// that reached N-API would abort the process. The core checks its inputs before it
/// allocates or indexes, so this only catches bugs; the state is untouched either way,
/// since a step commits only after it succeeded.
fn no_panic<T>(f: impl FnOnce() -> psgd::Result<T>) -> psgd::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panicked(p)))
}

/// A caught panic's payload as the error [`no_panic`] gives.
fn panicked(p: Box<dyn std::any::Any + Send>) -> PsgdError {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    PsgdError::from(candle_core::Error::Msg(format!(
        "internal error (please report it): {what}"
    )))
}

/// Locks a state. A panic caught by [`no_panic`] while the lock was held poisons it, but
/// leaves the state as it was (a step replaces it only at its end), so it stays usable.
fn lock(m: &Mutex<Option<AnyState>>) -> std::sync::MutexGuard<'_, Option<AnyState>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The state a guard holds, or an error once [`NativeState::dispose`] dropped it (the
/// TypeScript layer refuses a disposed state first, with a `TypeError`).
fn held(s: &Option<AnyState>) -> psgd::Result<&AnyState> {
    s.as_ref()
        .ok_or_else(|| PsgdError::State("the state was disposed".to_string()))
}

/// Devices are created once per name: candle only combines tensors of the same device.
fn device(env: &Env, name: &str) -> Result<Device> {
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
                .map_err(|_| range_err(env, format!("device '{name}': bad ordinal")))?,
        ),
        None => (name, 0),
    };
    let dev = match kind {
        "cuda" => Device::new_cuda(ordinal),
        "metal" => Device::new_metal(ordinal),
        _ => {
            return Err(range_err(
                env,
                format!("device '{name}' is unknown (use 'cpu', 'cuda', 'cuda:N' or 'metal')"),
            ))
        }
    }
    .map_err(|e| {
        let e = PsgdError::from(e);
        range_err(env, format!("device '{name}' is not available: {e}"))
    })?;
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

fn dtype(env: &Env, name: &str) -> Result<DType> {
    StateDType::parse(name).ok_or_else(|| {
        type_err(
            env,
            format!("dtype '{name}' is not supported (float32, bfloat16, float16, float64)"),
        )
    })
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

    /// The tensor (a cheap handle clone), or a `TypeError` once disposed.
    fn live(&self, env: &Env) -> Result<candle_core::Tensor> {
        self.inner
            .borrow()
            .clone()
            .ok_or_else(|| type_err(env, "the tensor was disposed".to_string()))
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

/// Bytes held by native tensors whose JS wrappers are alive or not yet collected (disposed
/// ones excluded): a loop that drops tensors without `dispose` shows here what the next
/// collection will free.
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
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                range_err(
                    &env,
                    format!("shape {shape:?} has more elements than can be addressed"),
                )
            })?;
        if n != data.len() {
            return Err(range_err(
                &env,
                format!(
                    "data has {} values, shape {:?} needs {n}",
                    data.len(),
                    shape
                ),
            ));
        }
        let (dev, dt) = (device(&env, &device_name)?, dtype(&env, &dtype_name)?);
        let t = candle_core::Tensor::from_slice(data, shape.as_slice(), &dev)
            .and_then(|t| t.to_dtype(dt))
            .map_err(|e| candle_err(&env, e))?;
        Ok(Tensor::wrap(&env, t))
    }

    /// The shape.
    #[napi(getter)]
    pub fn shape(&self, env: Env) -> Result<Vec<u32>> {
        Ok(self.live(&env)?.dims().iter().map(|&d| d as u32).collect())
    }

    /// The dtype name.
    #[napi(getter)]
    pub fn dtype(&self, env: Env) -> Result<String> {
        Ok(StateDType::name(self.live(&env)?.dtype()).to_string())
    }

    /// The device name.
    #[napi(getter)]
    pub fn device(&self, env: Env) -> Result<String> {
        Ok(device_name(self.live(&env)?.device()))
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

    /// Copies the values as float32, row-major, into `out` (which must have the tensor's
    /// element count). The caller allocates it in JS: a typed array made here would be an
    /// external buffer that V8 does not count in its heap, freed by a finalizer, so a loop
    /// reading values could hold many copies before the collector noticed them.
    #[napi]
    pub fn copy_to(&self, env: Env, mut out: Float32ArraySlice) -> Result<()> {
        // SAFETY: this synchronous call runs on the JS thread, so no JS code touches the
        // array while it is written
        let out = unsafe { out.as_mut() };
        let t = self.live(&env)?;
        if t.elem_count() != out.len() {
            return Err(range_err(
                &env,
                format!(
                    "copyTo: {} values into an array of {}",
                    t.elem_count(),
                    out.len()
                ),
            ));
        }
        let v = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| candle_err(&env, e))?;
        out.copy_from_slice(&v);
        Ok(())
    }

    /// `self + other` in `self`'s dtype.
    #[napi]
    pub fn add(&self, env: Env, other: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.live(&env)?, other.live(&env)?);
        let r =
            no_panic(|| psgd::apply_updates(std::slice::from_ref(&a), std::slice::from_ref(&b)))
                .map_err(|e| js_err(&env, e))?;
        Ok(Tensor::wrap(&env, r.into_iter().next().unwrap()))
    }

    /// Makes this tensor hold `other`'s values (same shape required).
    #[napi]
    pub fn assign(&mut self, env: Env, other: &Tensor) -> Result<()> {
        let (src, dst) = (other.live(&env)?, self.live(&env)?);
        if src.dims() != dst.dims() {
            return Err(range_err(
                &env,
                format!("assign: shape {:?} into {:?}", src.dims(), dst.dims()),
            ));
        }
        let next = src.to_dtype(dst.dtype()).map_err(|e| candle_err(&env, e))?;
        self.inner.replace(Some(next));
        Ok(())
    }

    /// A copy on `device`, as `dtype`.
    #[napi]
    pub fn to(&self, env: Env, dtype_name: String, device_name: String) -> Result<Tensor> {
        let (dev, dt) = (device(&env, &device_name)?, dtype(&env, &dtype_name)?);
        let t = self
            .live(&env)?
            .to_device(&dev)
            .and_then(|t| t.to_dtype(dt))
            .map_err(|e| candle_err(&env, e))?;
        Ok(Tensor::wrap(&env, t))
    }
}

/// An optimizer's state: an opaque handle, advanced in place by `update`.
#[napi(custom_finalize)]
pub struct NativeState {
    /// `None` once disposed.
    inner: Arc<Mutex<Option<AnyState>>>,
    /// The state's step count, or [`DISPOSED`]: set with the state under its lock, read
    /// without it, so that `count` and `disposed` never wait for a step in flight.
    count: Arc<AtomicI64>,
    /// The fit of the last step when it runs on a worker thread (`overlapFit`): locked
    /// only while `inner` is, and settled (see [`settle`]) before anything reads or
    /// replaces the state.
    fit: FitSlot,
    /// What this wrapper told V8 it holds (see [`NativeState::of`]).
    reported: std::cell::Cell<i64>,
}

/// A state's fit in flight (`overlapFit`): see [`NativeState::fit`].
type FitSlot = Arc<FitCell>;

/// Where a state keeps its fit in flight.
type FitCell = Mutex<Option<Arc<PendingFit>>>;

/// A fit that runs after its step returned, shared by the state and its copies (`clone`,
/// `copyState`), which then need not wait for it: each puts its result in its own state
/// when it settles (see [`settle`]).
struct PendingFit {
    /// The thread the fit runs on, taken by the first to settle it. A state dropped with
    /// a fit in flight leaves the thread to finish and free what it owns.
    thread: Mutex<Option<std::thread::JoinHandle<psgd::Result<AnyFitted>>>>,
    /// What the fit gave, once settled (or at once, where no thread could be started).
    result: OnceLock<psgd::Result<AnyFitted>>,
}

/// Starts `job`, the fit of a step on `opt`, on a thread of its own: neither the JS thread
/// nor the libuv pool (which tfjs-node and the async steps use) waits for it.
fn start_fit(opt: &Arc<AnyTransform>, job: AnyPendingFit, count: u64) -> Arc<PendingFit> {
    // see [`fails_for_tests`]: the job is then dropped unrun
    let job = (!fails_for_tests(count)).then_some(job);
    let (worker_opt, slot) = (opt.clone(), Arc::new(Mutex::new(job)));
    let on_thread = slot.clone();
    let run = move || fit_in(&worker_opt, &on_thread);
    let pending = PendingFit {
        thread: Mutex::new(None),
        result: OnceLock::new(),
    };
    match std::thread::Builder::new()
        .name("psgd-fit".into())
        .spawn(run)
    {
        Ok(h) => *pending.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(h),
        // no thread (the closure and its slot were dropped unrun): fit here
        Err(_) => drop(pending.result.set(fit_in(opt, &slot))),
    }
    Arc::new(pending)
}

/// Runs the fit in `slot` (once), a panic turned into an error.
fn fit_in(opt: &AnyTransform, slot: &Mutex<Option<AnyPendingFit>>) -> psgd::Result<AnyFitted> {
    let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    no_panic(|| match job {
        Some(job) => job.run_apart(opt),
        None => Err(PsgdError::from(candle_core::Error::Msg(
            "the preconditioner fit failed (PSGD_TEST_FAIL_FIT)".into(),
        ))),
    })
}

/// For the package's own tests: `PSGD_TEST_FAIL_FIT=n` in the environment makes the
/// overlapped fit of step `n` fail with an `Error`. A fit checks nothing its step has not
/// checked already, so its error path (raised by the next call, the state as the step left
/// it) cannot be reached from JS otherwise.
fn fails_for_tests(count: u64) -> bool {
    std::env::var("PSGD_TEST_FAIL_FIT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        == Some(count)
}

impl PendingFit {
    /// Waits for the fit (joining its thread, the first time) and gives its result.
    fn wait(&self) -> &psgd::Result<AnyFitted> {
        self.result.get_or_init(|| {
            let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            match thread {
                Some(h) => h.join().unwrap_or_else(|p| Err(panicked(p))),
                None => Err(PsgdError::State("the fit was lost".into())),
            }
        })
    }
}

/// Waits for the fit in flight on a state, if any, and puts the fitted preconditioner in
/// `state` (the state's slot, whose lock the caller holds). A failed fit leaves the
/// state as its step left it (the preconditioner before the fit) and is returned, once:
/// the slot is empty afterwards, so the call after works.
fn settle(state: &mut Option<AnyState>, fit: &FitCell) -> psgd::Result<()> {
    let pending = fit.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(pending) = pending else {
        return Ok(());
    };
    let fitted = pending.wait().as_ref().map_err(|e| e.again())?;
    match state.as_mut() {
        Some(s) => fitted.clone().install(s),
        None => Ok(()),
    }
}

/// [`settle`] for a state about to be replaced or freed: waits for its fit and drops what
/// it gave, an error included (the fit's result would be replaced anyway).
fn discard_fit(fit: &FitCell) {
    let _ = settle(&mut None, fit);
}

/// The fit in flight on a state, shared (for a copy of the state).
fn share_fit(fit: &FitCell) -> Option<Arc<PendingFit>> {
    fit.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// [`NativeState::count`]'s value once the state was disposed.
const DISPOSED: i64 = -1;

/// Puts `next` in `slot` (a state's, under its lock) and its count in `count`.
fn commit(slot: &mut Option<AnyState>, count: &AtomicI64, next: AnyState) {
    count.store(next.count() as i64, Ordering::Release);
    *slot = Some(next);
}

impl NativeState {
    /// Wraps a state and reports its tensors' bytes to V8 as external memory, as
    /// [`Tensor::wrap`] does: a state dropped without `dispose` (an optimizer per trial
    /// in a sweep) is then collected in time, not when the small wrapper alone would be.
    fn of(env: &Env, s: AnyState, nbytes: usize) -> NativeState {
        let bytes = nbytes as i64;
        let reported = match env.adjust_external_memory(bytes) {
            Ok(_) => bytes,
            Err(_) => 0,
        };
        NativeState {
            count: Arc::new(AtomicI64::new(s.count() as i64)),
            inner: Arc::new(Mutex::new(Some(s))),
            fit: FitSlot::default(),
            reported: std::cell::Cell::new(reported),
        }
    }

    /// Takes back what [`NativeState::of`] reported.
    fn unreport(&self, env: &Env) -> Result<()> {
        let r = self.reported.replace(0);
        if r != 0 {
            env.adjust_external_memory(-r)?;
        }
        Ok(())
    }
}

impl ObjectFinalize for NativeState {
    fn finalize(self, env: Env) -> Result<()> {
        self.unreport(&env)
    }
}

#[napi]
impl NativeState {
    /// An independent copy (tensors are immutable, so this is cheap).
    #[napi(js_name = "clone")]
    /// A fit in flight (`overlapFit`) is not waited for: the copy shares it.
    pub fn clone_state(&self, env: Env) -> Result<NativeState> {
        let s = lock(&self.inner);
        let copy = held(&s).map_err(|e| js_err(&env, e))?.clone();
        let out = NativeState::of(&env, copy, self.reported.get() as usize);
        *out.fit.lock().unwrap_or_else(|e| e.into_inner()) = share_fit(&self.fit);
        Ok(out)
    }

    /// Steps taken. Does not wait for a step in flight: while `updateAsync` runs, this is
    /// the count before it.
    #[napi(getter)]
    pub fn count(&self, env: Env) -> Result<f64> {
        match self.count.load(Ordering::Acquire) {
            DISPOSED => Err(js_err(
                &env,
                PsgdError::State("the state was disposed".to_string()),
            )),
            n => Ok(n as f64),
        }
    }

    /// Sets the step count (see [`AnyState::set_count`]): a state that continues another
    /// count, as the TensorFlow.js adapter's per-set states continue the optimizer's.
    #[napi]
    pub fn set_count(&self, env: Env, count: f64) -> Result<()> {
        let count = whole(&env, "count", count)?;
        let mut s = lock(&self.inner);
        no_panic(|| settle(&mut s, &self.fit)).map_err(|e| js_err(&env, e))?;
        match s.as_mut() {
            Some(s) => {
                s.set_count(count);
                Ok(())
            }
            None => Err(js_err(
                &env,
                PsgdError::State("the state was disposed".into()),
            )),
        }
    }

    /// Frees the state's tensors now (the momentum and the preconditioner), instead of
    /// when the collector gets to this object; later use is an error. Idempotent. A
    /// pending async step keeps its own reference and finishes first (the lock); a fit in
    /// flight (`overlapFit`) is waited for and dropped, its error with it.
    #[napi]
    pub fn dispose(&self, env: Env) -> Result<()> {
        let mut s = lock(&self.inner);
        discard_fit(&self.fit);
        s.take();
        self.count.store(DISPOSED, Ordering::Release);
        drop(s);
        self.unreport(&env)
    }

    /// Whether [`Self::dispose`] was called (without waiting for a step in flight).
    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.count.load(Ordering::Acquire) == DISPOSED
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

fn tensors(env: &Env, v: &[&Tensor]) -> Result<Vec<candle_core::Tensor>> {
    v.iter().map(|t| t.live(env)).collect()
}

/// Overrides of this step's hyperparameters: the values of schedules given as JS
/// functions. What is absent comes from the options (a constant or the default schedule).
#[napi(object)]
#[derive(Clone, Copy)]
pub struct StepInput {
    pub learning_rate: Option<f64>,
    pub update_probability: Option<f64>,
    /// The preconditioner step size (XMat, LRA, Affine).
    pub precond_lr: Option<f64>,
    /// Hessian mode: whether to update the preconditioner this step (with `hvp` and
    /// `vector` given).
    pub update_preconditioner: Option<bool>,
}

/// The options' hyperparameters for the step after `state`, with `step`'s overrides.
fn hyper_of(opt: &AnyTransform, state: &AnyState, step: &StepInput) -> psgd::Result<StepHyper> {
    let h = opt.hyper(state)?;
    Ok(StepHyper {
        learning_rate: step.learning_rate.unwrap_or(h.learning_rate),
        update_probability: step.update_probability.unwrap_or(h.update_probability),
        precond_lr: step.precond_lr.or(h.precond_lr),
    })
}

fn curvature_of(
    env: &Env,
    step: &StepInput,
    hvp: Option<Vec<&Tensor>>,
    vector: Option<Vec<&Tensor>>,
) -> Result<Option<Curvature>> {
    match (hvp, vector, step.update_preconditioner) {
        (None, None, None) => Ok(None),
        (Some(h), Some(v), Some(flag)) => Ok(Some(Curvature {
            hvp: tensors(env, &h)?,
            vector: tensors(env, &v)?,
            update_preconditioner: flag,
        })),
        _ => Err(type_err(
            env,
            "the Hessian mode needs hvp, vector and updatePreconditioner together".into(),
        )),
    }
}

/// One step on `state` (a state's slot and its count), then `then` on its updates; the
/// state advances only when both succeed (a failure leaves it as it was).
fn run_update<R>(
    opt: &Arc<AnyTransform>,
    (state, count, fit): (&Mutex<Option<AnyState>>, &AtomicI64, &FitCell),
    grads: &[candle_core::Tensor],
    params: Option<&[candle_core::Tensor]>,
    step: &StepInput,
    curvature: Option<&Curvature>,
    then: impl FnOnce(Vec<candle_core::Tensor>) -> psgd::Result<R>,
) -> psgd::Result<R> {
    let mut guard = lock(state);
    // the last step's fit first: its error is this call's, and the step is not taken
    no_panic(|| settle(&mut guard, fit))?;
    no_panic(|| {
        let current = held(&guard)?;
        let hyper = hyper_of(opt, current, step)?;
        // under overlapFit, the fit (if the step has one) comes back as a job, started on
        // a thread of its own once the step is committed and settled by the next call
        // that reads or replaces the state
        let (updates, next, job) = match opt.overlap_fit() {
            true => {
                let inputs = StepInputs {
                    grads,
                    params,
                    hyper,
                    curvature,
                };
                opt.update_deferred(current, inputs)?
            }
            false => {
                let (u, next) = opt.update_seeded(grads, current, params, hyper, curvature)?;
                (u, next, None)
            }
        };
        let out = then(updates)?;
        let next_count = next.count();
        // only a step that fully succeeded replaces the state
        commit(&mut guard, count, next);
        if let Some(job) = job {
            *fit.lock().unwrap_or_else(|e| e.into_inner()) = Some(start_fit(opt, job, next_count));
        }
        Ok(out)
    })
}

/// The work of `updateAsync`, run on the libuv thread pool.
pub struct UpdateTask {
    opt: Arc<AnyTransform>,
    state: Arc<Mutex<Option<AnyState>>>,
    count: Arc<AtomicI64>,
    fit: FitSlot,
    grads: Vec<candle_core::Tensor>,
    params: Option<Vec<candle_core::Tensor>>,
    step: StepInput,
    curvature: Option<Curvature>,
    /// The core's error, kept for `reject` (which has the env to make its JS class).
    failure: Option<PsgdError>,
}

impl Task for UpdateTask {
    type Output = Vec<candle_core::Tensor>;
    type JsValue = Vec<Tensor>;

    fn compute(&mut self) -> Result<Self::Output> {
        run_update(
            &self.opt,
            (&self.state, &self.count, &self.fit),
            &self.grads,
            self.params.as_deref(),
            &self.step,
            self.curvature.as_ref(),
            Ok,
        )
        .map_err(|e| {
            let msg = e.to_string();
            self.failure = Some(e);
            Error::new(Status::GenericFailure, msg)
        })
    }

    fn resolve(&mut self, env: Env, output: Self::Output) -> Result<Self::JsValue> {
        Ok(Tensor::wrap_all(&env, output))
    }

    fn reject(&mut self, env: Env, err: Error) -> Result<Self::JsValue> {
        Err(match self.failure.take() {
            Some(e) => js_err(&env, e),
            None => err,
        })
    }
}

#[napi]
impl NativeOptimizer {
    /// `variant` is `'kron'`, `'xmat'`, `'lra'` or `'affine'`; `options_json` holds the
    /// options by their camelCase names (schedules given as functions and the masks stay
    /// in TypeScript).
    #[napi(constructor)]
    pub fn new(
        env: Env,
        variant: String,
        leaves: Vec<LeafInfo>,
        options_json: String,
    ) -> Result<Self> {
        let options = options_object(&env, &options_json)?;
        let leaves = leaf_specs(leaves);
        let inner = no_panic(|| AnyTransform::new(&variant, leaves, &options))
            .map_err(|e| js_err(&env, e))?;
        Ok(NativeOptimizer {
            inner: Arc::new(inner),
        })
    }

    /// The initial state for `params`.
    #[napi]
    pub fn init(&self, env: Env, params: Vec<&Tensor>) -> Result<NativeState> {
        let params = tensors(&env, &params)?;
        let s = no_panic(|| self.inner.init(&params)).map_err(|e| js_err(&env, e))?;
        let nbytes = self.inner.state_nbytes(&s);
        Ok(NativeState::of(&env, s, nbytes))
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
        let p = params.as_deref().map(|p| tensors(&env, p)).transpose()?;
        let curvature = curvature_of(&env, &step, hvp, vector)?;
        let u = run_update(
            &self.inner,
            (&state.inner, &state.count, &state.fit),
            &tensors(&env, &grads)?,
            p.as_deref(),
            &step,
            curvature.as_ref(),
            Ok,
        )
        .map_err(|e| js_err(&env, e))?;
        Ok(Tensor::wrap_all(&env, u))
    }

    /// One step in place: `params ← params + updates` (each in its own dtype), with no
    /// updates handed back to JS, so a step costs no wrapper objects. Nothing changes on
    /// error. The same inputs as [`Self::update`], with the params required.
    #[allow(clippy::too_many_arguments)]
    #[napi]
    pub fn step(
        &self,
        env: Env,
        grads: Vec<&Tensor>,
        state: &NativeState,
        params: Vec<&Tensor>,
        step: StepInput,
        hvp: Option<Vec<&Tensor>>,
        vector: Option<Vec<&Tensor>>,
    ) -> Result<()> {
        let p = tensors(&env, &params)?;
        let curvature = curvature_of(&env, &step, hvp, vector)?;
        let next = run_update(
            &self.inner,
            (&state.inner, &state.count, &state.fit),
            &tensors(&env, &grads)?,
            Some(&p),
            &step,
            curvature.as_ref(),
            |u| psgd::apply_updates(&p, &u),
        )
        .map_err(|e| js_err(&env, e))?;
        for (t, v) in params.iter().zip(next) {
            t.inner.replace(Some(v));
        }
        Ok(())
    }

    /// [`Self::update`] on the libuv thread pool; resolves to the updates.
    #[allow(clippy::too_many_arguments)]
    #[napi(ts_return_type = "Promise<NativeTensor[]>")]
    pub fn update_async(
        &self,
        env: Env,
        grads: Vec<&Tensor>,
        state: &NativeState,
        params: Option<Vec<&Tensor>>,
        step: StepInput,
        hvp: Option<Vec<&Tensor>>,
        vector: Option<Vec<&Tensor>>,
    ) -> Result<AsyncTask<UpdateTask>> {
        let curvature = curvature_of(&env, &step, hvp, vector)?;
        Ok(AsyncTask::new(UpdateTask {
            opt: self.inner.clone(),
            state: state.inner.clone(),
            count: state.count.clone(),
            fit: state.fit.clone(),
            grads: tensors(&env, &grads)?,
            params: params.as_deref().map(|p| tensors(&env, p)).transpose()?,
            step,
            curvature,
            failure: None,
        }))
    }

    /// The state as safetensors bytes, in an `ArrayBuffer` that V8 allocates and counts:
    /// bytes handed out as an external buffer would be freed by a finalizer that runs
    /// only once the event loop turns, so a synchronous loop of checkpoints would hold
    /// every one of them. The serialisation is freed here at once.
    #[napi(ts_return_type = "Uint8Array")]
    pub fn state_to_bytes<'env>(
        &self,
        env: &'env Env,
        state: &NativeState,
    ) -> Result<Uint8ArraySlice<'env>> {
        let bytes = {
            let mut s = lock(&state.inner);
            no_panic(|| {
                settle(&mut s, &state.fit)?;
                self.inner.state_to_bytes(held(&s)?)
            })
            .map_err(|e| js_err(env, e))?
        };
        Uint8ArraySlice::copy_from(env, bytes)
    }

    /// A state from safetensors bytes, placed on `device`.
    #[napi]
    pub fn state_from_bytes(
        &self,
        env: Env,
        bytes: &[u8],
        device_name: String,
    ) -> Result<NativeState> {
        let dev = device(&env, &device_name)?;
        let s =
            no_panic(|| self.inner.state_from_bytes(bytes, &dev)).map_err(|e| js_err(&env, e))?;
        let nbytes = self.inner.state_nbytes(&s);
        Ok(NativeState::of(&env, s, nbytes))
    }

    /// What the last step of `state` did and how its preconditioner stands (the only
    /// device reads of the telemetry are here). A fit in flight (`overlapFit`) is waited
    /// for first, so the stats hold it; its error is raised here.
    #[napi]
    pub fn stats(&self, env: Env, state: &NativeState) -> Result<NativeStepStats> {
        let mut s = lock(&state.inner);
        let st = no_panic(|| {
            settle(&mut s, &state.fit)?;
            self.inner.stats(held(&s)?)
        })
        .map_err(|e| js_err(&env, e))?;
        Ok(NativeStepStats::from(st))
    }

    /// Makes `target` hold `source`'s state (both of this optimizer).
    /// A fit in flight (`overlapFit`) on `source` is shared, not waited for; one on
    /// `target` is waited for and dropped, as the state it would fit is replaced.
    #[napi]
    pub fn copy_state(&self, env: Env, source: &NativeState, target: &NativeState) -> Result<()> {
        let (s, fit) = {
            let src = lock(&source.inner);
            let s = held(&src).map_err(|e| js_err(&env, e))?.clone();
            (s, share_fit(&source.fit))
        };
        self.inner.check_variant(&s).map_err(|e| js_err(&env, e))?;
        let mut t = lock(&target.inner);
        discard_fit(&target.fit);
        commit(&mut t, &target.count, s);
        *target.fit.lock().unwrap_or_else(|e| e.into_inner()) = fit;
        Ok(())
    }
}

/// Where one leaf of [`regroup_state`]'s result takes its tensors from.
#[napi(object)]
pub struct LeafPick {
    pub leaf: u32,
    pub source: u32,
    pub source_leaf: u32,
}

/// A state for a new set of leaves from `fresh` (its `init` state, as bytes) and the
/// per-leaf tensors of `sources` (see [`psgd::state_io::regroup`]), as bytes to load, in
/// an `ArrayBuffer` V8 allocates and counts (as [`NativeOptimizer::state_to_bytes`]): a
/// loop whose steps change their set of variables holds no external buffers.
#[napi(ts_return_type = "Uint8Array")]
pub fn regroup_state<'env>(
    env: &'env Env,
    fresh: &[u8],
    sources: Vec<Uint8Array>,
    picks: Vec<LeafPick>,
    spanning: Option<u32>,
    count: f64,
) -> Result<Uint8ArraySlice<'env>> {
    let count = whole(env, "count", count)?;
    let sources: Vec<&[u8]> = sources.iter().map(|b| b.as_ref()).collect();
    let picks: Vec<_> = picks
        .iter()
        .map(|p| psgd::state_io::LeafSource {
            leaf: p.leaf as usize,
            source: p.source as usize,
            source_leaf: p.source_leaf as usize,
        })
        .collect();
    let bytes = no_panic(|| {
        psgd::state_io::regroup(fresh, &sources, &picks, spanning.map(|s| s as usize), count)
    })
    .map_err(|e| js_err(env, e))?;
    Uint8ArraySlice::copy_from(env, bytes)
}

fn options_object(env: &Env, json: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_str(json) {
        Ok(serde_json::Value::Object(o)) => Ok(o),
        Ok(_) => Err(type_err(env, "options must be an object".into())),
        Err(e) => Err(type_err(env, format!("options: {e}"))),
    }
}

/// Checks a variant's options (camelCase JSON) as the optimizer will read them, without
/// building one: what `kron(options)` and friends call so bad options fail at once.
#[napi]
pub fn check_options(env: Env, variant: String, options_json: String) -> Result<()> {
    let options = options_object(&env, &options_json)?;
    AnyTransform::check_options(&variant, &options).map_err(|e| js_err(&env, e))
}

/// The core's leaves for the TypeScript layer's descriptions.
fn leaf_specs(leaves: Vec<LeafInfo>) -> Vec<LeafSpec> {
    leaves
        .into_iter()
        .map(|l| LeafSpec {
            path: l.path,
            shape: l.shape.into_iter().map(|d| d as usize).collect(),
            scanned: l.scanned,
            weight_decay: l.weight_decay,
        })
        .collect()
}

/// What Kron's state holds for one leaf (see [`kron_state_size`]).
#[napi(object)]
pub struct KronLeafSize {
    pub path: String,
    /// The factors' shapes, in the saved state's order.
    pub factors: Vec<Vec<u32>>,
    /// Bytes of the factors and their Lipschitz bounds.
    pub bytes: f64,
}

/// The factor shapes and bytes of Kron's state for `leaves` under the options (camelCase
/// JSON), without allocating (see [`psgd::kron::kron_state_size`]).
#[napi]
pub fn kron_state_size(
    env: Env,
    leaves: Vec<LeafInfo>,
    options_json: String,
) -> Result<Vec<KronLeafSize>> {
    let options = options_object(&env, &options_json)?;
    let leaves = leaf_specs(leaves);
    let sizes = no_panic(|| {
        let o = <psgd::KronOptions as psgd::Options>::from_json(&options)?;
        psgd::kron::kron_state_size(&leaves, &o)
    })
    .map_err(|e| js_err(&env, e))?;
    Ok(sizes
        .into_iter()
        .map(|s| KronLeafSize {
            path: s.path,
            factors: s
                .factors
                .into_iter()
                .map(|f| f.into_iter().map(|d| d as u32).collect())
                .collect(),
            bytes: s.bytes as f64,
        })
        .collect())
}

/// The parameters of `precondUpdateProbSchedule`; absent ones take psgd-jax's defaults.
#[napi(object)]
pub struct PrecondUpdateProbScheduleInput {
    pub max_prob: Option<f64>,
    pub min_prob: Option<f64>,
    pub decay: Option<f64>,
    pub flat_start: Option<f64>,
}

/// psgd-jax's update-probability schedule at 1-based step `n` (the one implementation,
/// which the Kron default uses too).
#[napi]
pub fn precond_update_prob(schedule: PrecondUpdateProbScheduleInput, n: f64) -> f64 {
    let d = psgd::PrecondUpdateProbSchedule::default();
    psgd::PrecondUpdateProbSchedule {
        max_prob: schedule.max_prob.unwrap_or(d.max_prob),
        min_prob: schedule.min_prob.unwrap_or(d.min_prob),
        decay: schedule.decay.unwrap_or(d.decay),
        flat_start: schedule.flat_start.unwrap_or(d.flat_start),
    }
    .at(n.max(0.0) as u64)
}

/// The draws of one Hessian-mode step (`hessianHelper`): the decision, and when it fits,
/// the probe and the two shifted points, all native on the params' device.
#[napi]
pub struct NativeProbe {
    inner: psgd::hessian::Probe,
}

fn whole(env: &Env, name: &str, v: f64) -> Result<u64> {
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= 9007199254740991.0 {
        Ok(v as u64)
    } else {
        Err(range_err(
            env,
            format!("option '{name}' must be a non-negative integer, got {v}"),
        ))
    }
}

/// Draws step `step`'s decision and probe for `params` (see [`psgd::hessian::probe`]).
#[napi]
pub fn hessian_probe(
    env: Env,
    params: Vec<&Tensor>,
    seed: f64,
    step: f64,
    update_probability: f64,
) -> Result<NativeProbe> {
    let (seed, step) = (whole(&env, "seed", seed)?, whole(&env, "step", step)?);
    let params = tensors(&env, &params)?;
    let p = no_panic(|| psgd::hessian::probe(&params, seed, step, update_probability))
        .map_err(|e| js_err(&env, e))?;
    Ok(NativeProbe { inner: p })
}

#[napi]
impl NativeProbe {
    /// Whether the preconditioner is fitted this step.
    #[napi(getter)]
    pub fn update_preconditioner(&self) -> bool {
        self.inner.update_preconditioner
    }

    /// The probe vector, one tensor per leaf (empty when not fitting).
    #[napi]
    pub fn vector(&self, env: Env) -> Vec<Tensor> {
        Tensor::wrap_all(&env, self.inner.vector.clone())
    }

    /// `params + δ·v` and `params − δ·v`, the points to take the gradient at.
    #[napi]
    pub fn points(&self, env: Env) -> Vec<Vec<Tensor>> {
        vec![
            Tensor::wrap_all(&env, self.inner.plus.clone()),
            Tensor::wrap_all(&env, self.inner.minus.clone()),
        ]
    }

    /// The central difference: `[hvp, vector]`, one tensor per leaf each (float32).
    #[napi]
    pub fn difference(
        &self,
        env: Env,
        grads_plus: Vec<&Tensor>,
        grads_minus: Vec<&Tensor>,
    ) -> Result<Vec<Vec<Tensor>>> {
        let (plus, minus) = (tensors(&env, &grads_plus)?, tensors(&env, &grads_minus)?);
        let (h, v) = no_panic(|| psgd::hessian::difference(&self.inner, &plus, &minus))
            .map_err(|e| js_err(&env, e))?;
        Ok(vec![Tensor::wrap_all(&env, h), Tensor::wrap_all(&env, v)])
    }
}

/// Node-API's module version, read by Node when it loads the addon. The experimental
/// version makes Node run the finalizers of collected wrappers during garbage collection,
/// instead of queueing them until the event loop turns: a synchronous loop that creates
/// `Tensor`s and drops them without `dispose` then gets their native memory back as soon
/// as V8 collects them (V8 collects early because every wrapper reports its bytes as
/// external memory). Our finalizers only free Rust memory and adjust that count, which
/// Node allows from the collector.
#[no_mangle]
pub extern "C" fn node_api_module_get_api_version_v1() -> i32 {
    i32::MAX // NAPI_VERSION_EXPERIMENTAL
}

/// [`psgd::telemetry::LeafStats`] for JS.
#[napi(object)]
pub struct NativeLeafStats {
    pub path: String,
    pub size: f64,
    pub pre_rms: Option<f64>,
    pub update_rms: Option<f64>,
    pub clipped: Option<bool>,
    pub whitening: Option<f64>,
    pub resets: f64,
    pub dropped: f64,
}

/// [`psgd::telemetry::FactorStats`] for JS.
#[napi(object)]
pub struct NativeFactorStats {
    pub path: String,
    pub factor: u32,
    pub condition: f64,
    pub normaliser: Option<f64>,
}

/// [`psgd::telemetry::StepTimes`] for JS.
#[napi(object)]
pub struct NativeStepTimes {
    pub fit_ms: f64,
    pub apply_ms: f64,
    pub total_ms: f64,
}

/// [`psgd::telemetry::StepStats`] for JS.
#[napi(object)]
pub struct NativeStepStats {
    pub count: f64,
    pub fitted: bool,
    pub fits: f64,
    pub leaves: Vec<NativeLeafStats>,
    pub factors: Vec<NativeFactorStats>,
    pub whitening: Option<f64>,
    pub whitening_on_fit_input: bool,
    pub clip: String,
    pub times: Option<NativeStepTimes>,
    pub skipped: f64,
}

impl From<psgd::telemetry::StepStats> for NativeStepStats {
    fn from(s: psgd::telemetry::StepStats) -> Self {
        NativeStepStats {
            count: s.count as f64,
            fitted: s.fitted,
            fits: s.fits as f64,
            leaves: s
                .leaves
                .into_iter()
                .map(|l| NativeLeafStats {
                    path: l.path,
                    size: l.size as f64,
                    pre_rms: l.pre_rms,
                    update_rms: l.update_rms,
                    clipped: l.clipped,
                    whitening: l.whitening,
                    resets: l.resets as f64,
                    dropped: l.dropped as f64,
                })
                .collect(),
            factors: s
                .factors
                .into_iter()
                .map(|f| NativeFactorStats {
                    path: f.path,
                    factor: f.factor as u32,
                    condition: f.condition,
                    normaliser: f.normaliser,
                })
                .collect(),
            whitening: s.whitening,
            whitening_on_fit_input: s.whitening_on_fit_input,
            clip: s.clip,
            times: s.times.map(|t| NativeStepTimes {
                fit_ms: t.fit_ms,
                apply_ms: t.apply_ms,
                total_ms: t.total_ms,
            }),
            skipped: s.skipped as f64,
        }
    }
}
