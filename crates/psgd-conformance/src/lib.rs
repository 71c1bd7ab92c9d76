//! Replays golden fixture cases made by psgd-jax 0.2.9, psgd_torch's `psgd.py`,
//! distributed-kron 2.0.0 or heavyball 3.2.1 (see
//! `scripts/reference`) through our optimizers with the reference's own random draws, and
//! measures the difference. A test and development tool: not part of the published crate
//! or the Node addon.

use candle_core::{DType, Device, Tensor};
use psgd::random::{Draw, ReplayRandom};
use psgd::{AnyTransform, Curvature, LeafSpec, PsgdError, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A case passes when every update is within this error relative to the update's RMS.
pub const TOLERANCE: f64 = 1e-3;

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case directory's name.
    pub name: String,
    /// The largest `max|ours − ref| / rms(ref)` over steps and leaves (∞ on error).
    pub max_rel_err: f64,
    /// Where the largest error was (`step 3 leaf 'w'`), or the error message.
    pub detail: String,
    /// Whether the case is within [`TOLERANCE`] and ran without error.
    pub passed: bool,
}

fn bad(msg: impl Into<String>) -> PsgdError {
    PsgdError::State(format!("fixture: {}", msg.into()))
}

fn shape_of(v: &Value) -> Result<Vec<usize>> {
    v.as_array()
        .ok_or_else(|| bad("shape is not a list"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(|| bad("bad dim")))
        .collect()
}

fn mask_value(
    options: &serde_json::Map<String, Value>,
    key: &str,
    path: &str,
    default: bool,
) -> bool {
    match options.get(key) {
        Some(Value::Object(m)) => m.get(path).and_then(Value::as_bool).unwrap_or(default),
        Some(Value::Bool(b)) => *b,
        _ => default,
    }
}

fn get(ts: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    ts.get(name)
        .cloned()
        .ok_or_else(|| bad(format!("tensor '{name}' missing")))
}

/// The tensor `name` in the shape `case.json` declares (a writer may store 0-d arrays as
/// shape `[1]`; the element count must agree).
fn get_shaped(ts: &HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = get(ts, name)?;
    if t.elem_count() != shape.iter().product::<usize>() {
        return Err(bad(format!(
            "tensor '{name}' has shape {:?}, case.json says {shape:?}",
            t.dims()
        )));
    }
    Ok(t.reshape(shape)?)
}

fn draws(ts: &HashMap<String, Tensor>, prefix: &str, list: Option<&Value>) -> Result<Vec<Draw>> {
    let list = match list {
        Some(Value::Array(l)) => l,
        _ => return Ok(vec![]),
    };
    list.iter()
        .enumerate()
        .map(|(k, d)| {
            let t = get(ts, &format!("{prefix}.{k}"))?;
            match d.get("kind").and_then(Value::as_str) {
                Some("uniform") => Ok(Draw::Uniform(t.flatten_all()?.to_vec1::<f32>()?[0])),
                Some("normal") => Ok(Draw::Normal {
                    shape: match d.get("shape") {
                        Some(s) => shape_of(s)?,
                        None => t.dims().to_vec(),
                    },
                    data: t.flatten_all()?.to_vec1::<f32>()?,
                }),
                other => Err(bad(format!("unknown draw kind {other:?}"))),
            }
        })
        .collect()
}

fn max_rel_err(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    let r = reference.to_dtype(DType::F64)?;
    let o = ours.to_dtype(DType::F64)?;
    let rms = r.sqr()?.mean_all()?.sqrt()?.to_scalar::<f64>()?;
    let diff = (o - &r)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    if diff == 0.0 {
        return Ok(0.0);
    }
    Ok(if diff.is_nan() {
        f64::INFINITY
    } else {
        diff / rms.max(1e-30)
    })
}

/// The reference a case names: `"psgd-jax"` when it names none (or, as the psgd-jax
/// fixtures do, an object with its package and version).
fn reference_of(case: &Value) -> Result<&str> {
    match case.get("reference") {
        None | Some(Value::Null) | Some(Value::Object(_)) => Ok("psgd-jax"),
        Some(Value::String(r))
            if ["psgd-jax", "psgd-torch", "distributed-kron", "heavyball"]
                .contains(&r.as_str()) =>
        {
            Ok(r.as_str())
        }
        Some(other) => Err(bad(format!(
            "reference {other} is not one the checker replays ('psgd-jax', 'psgd-torch', \
             'distributed-kron', 'heavyball')"
        ))),
    }
}

/// Our Kron options for a psgd-torch case: psgd_torch `KronWhiten`'s keyword arguments
/// (`options`) mapped to this package's, for the case's leaves (its update clip
/// `grad_clip_max_amps` to `updateClipRms` and `updateClipElement`, its momentum to `b1`
/// with `momentumWarmup: 'psgdTorch'`, its automatic initial scale to the global scope).
/// Refuses, naming the option, what cannot be mapped yet.
pub fn psgd_torch_options(
    options: &Map<String, Value>,
    leaves: &[LeafSpec],
) -> Result<Map<String, Value>> {
    let refuse = |msg: String| -> Result<Map<String, Value>> {
        Err(bad(format!("psgd-torch case not replayable: {msg}")))
    };
    let num = |key: &str, default: f64| -> Result<f64> {
        match options.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(format!("psgd-torch option {key} is not a number: {v}"))),
        }
    };
    let flag = |key: &str| options.get(key).and_then(Value::as_bool).unwrap_or(true);
    const KNOWN: [&str; 14] = [
        "grad_clip_max_norm",
        "dQ",
        "lr_params",
        "lr_preconditioner",
        "betaL",
        "damping",
        "momentum",
        "grad_clip_max_amps",
        "preconditioner_max_size",
        "preconditioner_max_skew",
        "preconditioner_init_scale",
        "preconditioner_update_probability",
        "whiten_grad",
        "update_preconditioner_first",
    ];
    if let Some(k) = options.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return refuse(format!(
            "'{k}' is not a KronWhiten option (nor a KronNewton one)"
        ));
    }
    if options
        .get("grad_clip_max_norm")
        .is_some_and(|v| !v.is_null())
    {
        return refuse(
            "grad_clip_max_norm (KronNewton's clip of the global norm, applied to the \
             learning rate) has no counterpart here"
                .into(),
        );
    }
    let rule = match options
        .get("dQ")
        .and_then(Value::as_str)
        .unwrap_or("Q0.5EQ1.5")
    {
        "Q0.5EQ1.5" | "Q0p5EQ1p5" => "Q0.5EQ1.5",
        rule @ ("QUAD" | "QEQ" | "QEP" | "PRO4P" | "QUAD4P") => rule,
        // psgd_torch's EQ: psgd-jax's rule with its own numerics (set below)
        "EQ" => "EQ",
        other => return refuse(format!("dQ '{other}' has no counterpart here")),
    };
    // psgd_torch keeps no momentum outside (0, 1); whiten_grad false whitens it
    let momentum = num("momentum", 0.0)?;
    let momentum = if momentum > 0.0 && momentum < 1.0 {
        momentum
    } else {
        0.0
    };
    let whiten_momentum = !flag("whiten_grad");
    if whiten_momentum && momentum == 0.0 {
        return refuse(
            "whiten_grad false needs a momentum in (0, 1) (psgd_torch asserts it)".into(),
        );
    }
    let damping = num("damping", 1e-9)?;
    if !(damping.is_finite() && damping >= 0.0) {
        return refuse(format!("damping {damping} is not a finite number >= 0"));
    }
    // the update clip: (max RMS, max element), psgd_torch's default (2, 10)
    let (clip_rms, clip_element) = match options.get("grad_clip_max_amps") {
        None => (2.0, 10.0),
        Some(v) => match v
            .as_array()
            .map(|a| a.iter().map(Value::as_f64).collect::<Vec<_>>())
        {
            Some(a) if a.len() == 2 && a.iter().all(Option::is_some) => {
                (a[0].unwrap_or(2.0), a[1].unwrap_or(10.0))
            }
            _ => return refuse(format!("grad_clip_max_amps {v} is not two numbers")),
        },
    };
    // which axes are dense: psgd_torch's rule against ours
    let largest = leaves
        .iter()
        .flat_map(|l| l.shape.iter().copied())
        .max()
        .unwrap_or(1);
    let max_size = match options.get("preconditioner_max_size") {
        None | Some(Value::Null) => largest,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| bad("preconditioner_max_size is not a number"))?
            .floor()
            .clamp(0.0, largest as f64) as usize,
    };
    let skew = num("preconditioner_max_skew", 1.0)?;
    // psgd_torch squeezes size-1 axes away; `mergeDims: 'twoD'` does the same to a leaf
    // that squeezes to at most 2 axes, and keeps a leaf of at most 2 axes without them
    let squeezed =
        |l: &LeafSpec| -> Vec<usize> { l.shape.iter().copied().filter(|&d| d != 1).collect() };
    let squeeze = leaves.iter().any(|l| l.shape.contains(&1));
    for l in leaves {
        let shape = squeezed(l);
        if squeeze && (shape.len() > 2 || l.shape.len() > 2 && !l.shape.contains(&1)) {
            return refuse(format!(
                "leaf '{}' has shape {:?}: psgd_torch squeezes its size-1 axes, which \
                 mergeDims 'twoD' matches only for leaves of at most 2 axes once squeezed",
                l.path, l.shape
            ));
        }
        let numel = shape.iter().product::<usize>() as f64;
        for (axis, &d) in shape.iter().enumerate() {
            let skewed = (d as f64) * (d as f64) > skew * numel;
            let theirs = d <= 1 || d > max_size || skewed;
            // the mapped options: maxSkew, maxSizeTriangular, minNdimTriangular 1
            let ours = d == 1 || d > max_size || skewed;
            if theirs != ours {
                return refuse(format!(
                    "preconditioner_max_skew {skew} makes axis {axis} of leaf '{}' (shape \
                     {:?}) {} in psgd_torch, {} here",
                    l.path,
                    l.shape,
                    if theirs { "diagonal" } else { "dense" },
                    if ours { "diagonal" } else { "dense" }
                ));
            }
        }
    }
    // null: one scale from the first gradients of every leaf
    let init_scale = options
        .get("preconditioner_init_scale")
        .cloned()
        .unwrap_or(Value::Null);
    let mut out = Map::new();
    out.insert("updateRule".into(), json!(rule));
    out.insert("learningRate".into(), json!(num("lr_params", 0.001)?));
    out.insert(
        "preconditionerLr".into(),
        json!(num("lr_preconditioner", 0.1)?),
    );
    out.insert("lipschitzBeta".into(), json!(num("betaL", 0.9)?));
    out.insert("damping".into(), json!(damping));
    if rule == "EQ" {
        // psgd_torch's numerics, which are the inverse-free rules' own
        out.insert("normEstimator".into(), json!("subspace"));
        out.insert("balanceWhen".into(), json!("afterFit"));
    }
    out.insert("b1".into(), json!(momentum));
    out.insert("momentumWarmup".into(), json!("psgdTorch"));
    out.insert("momentumIntoPrecondUpdate".into(), json!(whiten_momentum));
    out.insert(
        "updatePreconditionerFirst".into(),
        json!(flag("update_preconditioner_first")),
    );
    out.insert("updateClipRms".into(), json!(clip_rms));
    out.insert("updateClipElement".into(), json!(clip_element));
    out.insert("maxSizeTriangular".into(), json!(max_size));
    out.insert("maxSkew".into(), json!(skew));
    out.insert("minNdimTriangular".into(), json!(1));
    out.insert("preconditionerInitScale".into(), init_scale);
    out.insert("initScaleScope".into(), json!("global"));
    out.insert(
        "preconditionerUpdateProbability".into(),
        json!(num("preconditioner_update_probability", 1.0)?),
    );
    out.insert("updateDecision".into(), json!("draw"));
    if squeeze {
        out.insert("mergeDims".into(), json!("twoD"));
    }
    Ok(out)
}

/// Our Kron options for a distributed-kron case: the keyword arguments of its `pro`
/// (`options`) mapped to this package's: every leaf merged to 1-D or 2-D (`mergeDims:
/// 'twoD'`), blocks of `block_size`, the fit at `preconditioner_lr` with its fixed
/// Lipschitz smoothing 0.95, fitted on every step. Refuses, naming the option, what has no
/// counterpart here yet.
pub fn distributed_kron_options(options: &Map<String, Value>) -> Result<Map<String, Value>> {
    let refuse = |msg: String| -> Result<Map<String, Value>> {
        Err(bad(format!("distributed-kron case not replayable: {msg}")))
    };
    let num = |key: &str, default: f64| -> Result<f64> {
        match options.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                bad(format!(
                    "distributed-kron option {key} is not a number: {v}"
                ))
            }),
        }
    };
    const KNOWN: [&str; 11] = [
        "learning_rate",
        "lr_style",
        "b1",
        "weight_decay",
        "max_size_dense",
        "preconditioner_lr",
        "preconditioner_init_scale",
        "preconditioner_update_style",
        "scanned_layers",
        "block_size",
        "noise_scale",
    ];
    if let Some(k) = options.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return refuse(format!("'{k}' is not a pro option the checker maps"));
    }
    let rule = match options
        .get("preconditioner_update_style")
        .and_then(Value::as_str)
        .unwrap_or("PRO")
    {
        "PRO" => "Q0.5EQ1.5",
        "QUAD" => "QUAD",
        other => return refuse(format!("preconditioner_update_style '{other}'")),
    };
    match options.get("lr_style") {
        Some(Value::Null) => {}
        other => {
            return refuse(format!(
                "lr_style {} (pro's default 'adam' divides the update by 5): only null maps",
                other.map_or("absent".to_string(), Value::to_string)
            ))
        }
    }
    let wd = num("weight_decay", 0.1)?;
    if wd != 0.0 {
        return refuse(format!(
            "weight_decay {wd}: pro adds its decay to the update before the learning rate \
             (optax add_decayed_weights), not decoupled as here"
        ));
    }
    let scale = num("preconditioner_init_scale", 1.0)?;
    if scale != 1.0 {
        return refuse(format!(
            "preconditioner_init_scale {scale}: pro scales every factor by it, this package \
             each by its k-th root (an init-scale mode is not an option here yet)"
        ));
    }
    let noise = num("noise_scale", 1e-9)?;
    if noise != 1e-9 {
        return refuse(format!(
            "noise_scale {noise}: the inverse-free rules here damp with 1e-9 + eps·|g|"
        ));
    }
    let mut out = Map::new();
    out.insert("updateRule".into(), json!(rule));
    out.insert("learningRate".into(), json!(num("learning_rate", 0.001)?));
    out.insert("b1".into(), json!(num("b1", 0.95)?));
    out.insert("weightDecay".into(), json!(0.0));
    out.insert(
        "maxSizeTriangular".into(),
        json!(num("max_size_dense", 16384.0)? as usize),
    );
    out.insert(
        "preconditionerLr".into(),
        json!(num("preconditioner_lr", 0.5)?),
    );
    out.insert("lipschitzBeta".into(), json!(0.95));
    // pro balances deterministically before the fit of every 100th step
    out.insert("balanceEvery".into(), json!(100));
    out.insert("balanceWhen".into(), json!("beforeFit"));
    out.insert("preconditionerInitScale".into(), json!(1.0));
    out.insert("preconditionerUpdateProbability".into(), json!(1.0));
    out.insert("momentumIntoPrecondUpdate".into(), json!(true));
    out.insert("mergeDims".into(), json!("twoD"));
    out.insert(
        "blockSize".into(),
        json!(num("block_size", 256.0)? as usize),
    );
    Ok(out)
}

/// PSGDPRO keyword arguments the checker takes only at heavyball's defaults (as JSON; null
/// stands for heavyball's `C.use_default`), since this package has no counterpart to
/// another value.
const HEAVYBALL_DEFAULT_ONLY: [(&str, &[&str]); 18] = [
    ("cautious_weight_decay", &["false"]),
    ("warmup_steps", &["0"]),
    ("merge_dims", &["false"]),
    ("split", &["false"]),
    ("multi_tensor", &["true"]),
    ("q_dtype", &["\"float32\""]),
    ("storage_dtype", &["\"float32\""]),
    ("mars", &["false"]),
    ("caution", &["false"]),
    ("mars_gamma", &["0.0025"]),
    ("cached", &["null", "false"]),
    ("exp_avg_input", &["null", "true"]),
    ("gradient_clipping", &["null"]),
    ("update_clipping", &["null"]),
    ("precond_grad_accum", &["false"]),
    ("compile_step", &["null"]),
    ("ecc", &["null"]),
    ("param_ecc", &["null"]),
];

/// Whether `v` is the JSON `text` (numbers compared by value).
fn is_json(v: &Value, text: &str) -> bool {
    let d: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    match (v.as_f64(), d.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => *v == d,
    }
}

/// Our Kron options for a heavyball case: heavyball 3.2.1 `PSGDPRO`'s keyword arguments
/// (`options`) mapped onto the `heavyballPro` preset, for the case's leaves (`lr`, `beta`
/// or `betas[0]`, `weight_decay`, `precond_lr`, `lower_bound_beta`, `dampening`, the
/// initial scale with its power, the factor kinds, what is whitened, and the fit
/// probability: null is heavyball's anneal, as the preset's, a number a constant under
/// its cumulative decision). Refuses, naming the option, what has no counterpart here:
/// heavyball's other `memory_save_mode`s, `precond_init_scale_scale` other than 1 with
/// the automatic scale, power iterations other than 2, the options it takes only at their
/// defaults, and leaves Kron would lay out otherwise (a size-1 axis, which heavyball
/// squeezes away; two leaves of one shape, which heavyball stacks in one bucket with one
/// initial scale).
pub fn heavyball_options(
    options: &Map<String, Value>,
    leaves: &[LeafSpec],
) -> Result<psgd::KronOptions> {
    let refuse = |msg: String| -> Result<psgd::KronOptions> {
        Err(bad(format!("heavyball case not replayable: {msg}")))
    };
    let num = |key: &str, default: f64| -> Result<f64> {
        match options.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(format!("heavyball option {key} is not a number: {v}"))),
        }
    };
    const MAPPED: [&str; 16] = [
        "lr",
        "beta",
        "betas",
        "weight_decay",
        "preconditioner_update_probability",
        "max_size_triangular",
        "min_ndim_triangular",
        "memory_save_mode",
        "momentum_into_precond_update",
        "lower_bound_beta",
        "dampening",
        "precond_update_power_iterations",
        "precond_init_scale",
        "precond_init_scale_scale",
        "precond_init_scale_power",
        "precond_lr",
    ];
    for (k, v) in options {
        if MAPPED.contains(&k.as_str()) {
            continue;
        }
        match HEAVYBALL_DEFAULT_ONLY.iter().find(|(name, _)| name == k) {
            Some((_, defaults)) if defaults.iter().any(|d| is_json(v, d)) => {}
            Some(_) => {
                return refuse(format!(
                    "{k} {v}: only heavyball's default maps (this package has no counterpart)"
                ))
            }
            None => return refuse(format!("'{k}' is not a PSGDPRO option the checker maps")),
        }
    }
    let mut shapes = std::collections::HashMap::new();
    for l in leaves {
        if l.shape.contains(&1) {
            return refuse(format!(
                "leaf '{}' has shape {:?}: heavyball squeezes size-1 axes away, Kron keeps \
                 a one-entry factor for each",
                l.path, l.shape
            ));
        }
        if let Some(other) = shapes.insert(l.shape.clone(), l.path.clone()) {
            return refuse(format!(
                "leaves '{other}' and '{}' have one shape {:?}: heavyball stacks them in one \
                 bucket with one automatic initial scale",
                l.path, l.shape
            ));
        }
    }
    let b1 = match (options.get("beta"), options.get("betas")) {
        (Some(v), _) if !v.is_null() => num("beta", 0.9)?,
        (_, None) | (_, Some(Value::Null)) => 0.9,
        (_, Some(v)) => match v.as_array().and_then(|a| a.first()).and_then(Value::as_f64) {
            Some(b) => b,
            None => return refuse(format!("betas {v} is not a list of numbers")),
        },
    };
    let iterations = num("precond_update_power_iterations", 2.0)?;
    if iterations != 2.0 {
        return refuse(format!(
            "precond_update_power_iterations {iterations}: normEstimator 'power' iterates twice"
        ));
    }
    let memory_save_mode = match options.get("memory_save_mode") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(m)) if m == "one_diag" || m == "all_diag" => json!(m),
        Some(other) => {
            return refuse(format!(
                "memory_save_mode {other} (only null, 'one_diag' and 'all_diag' have a \
                 counterpart)"
            ))
        }
    };
    // null: the automatic scale `(scale_scale·mean(|g|⁴)^(-1/8))^power`; a number is taken
    // as it is (heavyball then ignores the scale's scale and power, with a warning)
    let init_scale = match options.get("precond_init_scale") {
        None | Some(Value::Null) => {
            let scale_scale = num("precond_init_scale_scale", 1.0)?;
            if scale_scale != 1.0 {
                return refuse(format!(
                    "precond_init_scale_scale {scale_scale}: the automatic initial scale here \
                     has no factor"
                ));
            }
            Value::Null
        }
        Some(_) => json!(num("precond_init_scale", 1.0)?),
    };
    let mut ours = psgd::kron_presets()
        .into_iter()
        .find(|p| p.name == "heavyballPro")
        .ok_or_else(|| bad("no heavyballPro preset"))?;
    let o = &mut ours.options;
    o.insert("learningRate".into(), json!(num("lr", 0.001)?));
    o.insert("b1".into(), json!(b1));
    o.insert("weightDecay".into(), json!(num("weight_decay", 0.0)?));
    o.insert(
        "maxSizeTriangular".into(),
        json!(num("max_size_triangular", 2048.0)?.max(0.0) as usize),
    );
    o.insert(
        "minNdimTriangular".into(),
        json!(num("min_ndim_triangular", 2.0)?.max(0.0) as usize),
    );
    o.insert("memorySaveMode".into(), memory_save_mode);
    o.insert(
        "momentumIntoPrecondUpdate".into(),
        json!(options
            .get("momentum_into_precond_update")
            .and_then(Value::as_bool)
            .unwrap_or(true)),
    );
    o.insert("lipschitzBeta".into(), json!(num("lower_bound_beta", 0.9)?));
    o.insert("damping".into(), json!(num("dampening", 1e-9)?));
    o.insert("preconditionerLr".into(), json!(num("precond_lr", 0.1)?));
    o.insert("preconditionerInitScale".into(), init_scale);
    o.insert(
        "initScalePower".into(),
        json!(num("precond_init_scale_power", 0.5)?),
    );
    // null: heavyball's anneal (the preset's); a number: that probability every step
    if options
        .get("preconditioner_update_probability")
        .is_some_and(|v| !v.is_null())
    {
        let p = num("preconditioner_update_probability", 1.0)?;
        o.insert("preconditionerUpdateProbability".into(), json!(p));
        ours.anneal = None;
    }
    ours.kron_options()
}

/// Runs the case in `dir`.
pub fn run_case(dir: &Path) -> Result<CaseResult> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let text = std::fs::read_to_string(dir.join("case.json"))
        .map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    let case: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let variant = case["variant"].as_str().ok_or_else(|| bad("no variant"))?;
    let options = case["options"].as_object().cloned().unwrap_or_default();
    let steps = case["steps"].as_u64().ok_or_else(|| bad("no steps"))? as usize;
    let hessian = case["hessian"].as_bool().unwrap_or(false);
    let dev = Device::Cpu;
    let ts = candle_core::safetensors::load(dir.join("tensors.safetensors"), &dev)?;
    let leaves = case["params"]
        .as_array()
        .ok_or_else(|| bad("no params"))?
        .iter()
        .map(|p| {
            let path = p["path"]
                .as_str()
                .ok_or_else(|| bad("param without path"))?;
            Ok(LeafSpec {
                path: path.to_string(),
                shape: shape_of(&p["shape"])?,
                scanned: mask_value(&options, "scanned_layers", path, false),
                // kron calls the weight-decay mask `weight_decay_mask`, the others `mask`
                weight_decay: mask_value(&options, "weight_decay_mask", path, true)
                    && mask_value(&options, "mask", path, true),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let ours = match reference_of(&case)? {
        "psgd-torch" => {
            if variant != "kron" {
                return Err(bad("psgd-torch cases are Kron cases"));
            }
            let mut ours = psgd_torch_options(&options, &leaves)?;
            if hessian {
                // KronNewton clips nothing (its grad_clip_max_norm is refused)
                ours.insert("updateClipRms".into(), Value::Null);
                ours.insert("updateClipElement".into(), Value::Null);
            }
            ours
        }
        "distributed-kron" => {
            if variant != "kron" || hessian {
                return Err(bad("distributed-kron cases are Kron whitening cases"));
            }
            distributed_kron_options(&options)?
        }
        "heavyball" => Map::new(),
        _ => psgd::options::from_psgd_jax_names(&options),
    };
    let opt = if reference_of(&case)? == "heavyball" {
        if variant != "kron" || hessian {
            return Err(bad("heavyball cases are Kron whitening cases"));
        }
        AnyTransform::Kron(<psgd::Kron as psgd::Transform>::new(
            leaves.clone(),
            heavyball_options(&options, &leaves)?,
        )?)
    } else {
        AnyTransform::new(variant, leaves.clone(), &ours)?
    };
    let mut params = leaves
        .iter()
        .map(|l| get_shaped(&ts, &format!("param.{}", l.path), &l.shape))
        .collect::<Result<Vec<_>>>()?;
    let init_draws = draws(&ts, "draw.init", case.get("init_draws"))?;
    let mut rng = ReplayRandom::new(format!("{name} init"), init_draws);
    let mut state = opt.init_with(&params, &mut rng)?;
    if rng.remaining() > 0 {
        return Err(PsgdError::Draw(format!(
            "{name} init: the reference made {} more draws than we asked for",
            rng.remaining()
        )));
    }
    let mut worst = (0.0f64, String::from("-"));
    for t in 0..steps {
        let grads = leaves
            .iter()
            .map(|l| get_shaped(&ts, &format!("grad.{t}.{}", l.path), &l.shape))
            .collect::<Result<Vec<_>>>()?;
        let recorded = draws(&ts, &format!("draw.{t}"), case["draws"].get(t))?;
        let mut rng = ReplayRandom::new(format!("{name} step {t}"), recorded);
        let hyper = opt.hyper(&state)?;
        let curvature = if hessian {
            let per_leaf = |kind: &str| -> Result<Vec<Tensor>> {
                leaves
                    .iter()
                    .map(|l| get_shaped(&ts, &format!("{kind}.{t}.{}", l.path), &l.shape))
                    .collect()
            };
            let flag = get(&ts, &format!("update_precond.{t}"))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Some(Curvature {
                hvp: per_leaf("hvp")?,
                vector: per_leaf("vector")?,
                update_preconditioner: flag.first().copied().unwrap_or(0.0) != 0.0,
            })
        } else {
            None
        };
        let (updates, next) = opt.update_with(
            &grads,
            &state,
            Some(&params),
            hyper,
            curvature.as_ref(),
            &mut rng,
        )?;
        if rng.remaining() > 0 {
            return Err(PsgdError::Draw(format!(
                "{name} step {t}: the reference made {} more draws than we asked for",
                rng.remaining()
            )));
        }
        state = next;
        let mut next_params = Vec::with_capacity(params.len());
        for ((l, u), p) in leaves.iter().zip(&updates).zip(&params) {
            let r = get_shaped(&ts, &format!("update.{t}.{}", l.path), &l.shape)?;
            let e = max_rel_err(u, &r)?;
            if e > worst.0 || e.is_nan() {
                worst = (e, format!("step {t} leaf '{}'", l.path));
            }
            // follow the reference trajectory so errors do not compound
            next_params.push((p + r)?);
        }
        params = next_params;
    }
    Ok(CaseResult {
        name,
        max_rel_err: worst.0,
        detail: worst.1,
        passed: worst.0 <= TOLERANCE,
    })
}

/// `dir` itself when it is a case (holds `case.json`), else every case directory under it, sorted.
pub fn case_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join("case.json").is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut out = vec![];
    let rd = std::fs::read_dir(dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    for entry in rd.flatten() {
        let p = entry.path();
        if p.join("case.json").is_file() {
            out.push(p);
        } else if p.is_dir() {
            out.extend(case_dirs(&p)?);
        }
    }
    out.sort();
    Ok(out)
}

/// Runs every case under `dir`; a case that errors counts as failed with the message.
pub fn run_dir(dir: &Path) -> Result<Vec<CaseResult>> {
    Ok(case_dirs(dir)?
        .iter()
        .map(|d| {
            run_case(d).unwrap_or_else(|e| CaseResult {
                name: d
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
                max_rel_err: f64::INFINITY,
                detail: e.to_string(),
                passed: false,
            })
        })
        .collect())
}
