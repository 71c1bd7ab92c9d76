//! The Rust side of the benchmark suite (`cargo bench -p psgd`, or driven per case by
//! `npm run bench`). For each workload of `benches/workloads.json` and each variant it
//! times, in one process and side by side:
//!
//! - a step that updates the preconditioner and one that only applies it;
//! - candle-nn's AdamW step on the same parameters;
//! - candle's own matmul on exactly the products the step's math needs (the "matmul
//!   limit", see [`products`]), so the achieved fraction is `limit / step`;
//!
//! and reports the state's tensor bytes, the peak resident memory, and how much the
//! resident memory grew over the timed steps.
//!
//! Arguments (after `--`): `--workload NAME`, `--variant NAME` (default: all),
//! `--repeats N`, `--warmup N` (else the workload's own counts, else the file's),
//! `--workloads PATH`, `--json` (one JSON line per case, for the Node runner). Speed is
//! never asserted here: it is measured and printed.

// The same allocator as the Node addon (crates/psgd-node), so the figures are the
// package's: with glibc's default malloc the large-leaf rows vary with how the step's
// frees interleave (see the README's "Allocator" note).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use psgd::affine::shape_as_matrix;
use psgd::{AnyState, AnyTransform, LeafSpec, StepHyper, Transform};
use serde_json::{json, Map, Value};
use std::time::Instant;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One batched product `(b × m×k) · (b × k×n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Product {
    b: usize,
    m: usize,
    k: usize,
    n: usize,
}

impl Product {
    fn flops(&self) -> f64 {
        2.0 * (self.b * self.m * self.k * self.n) as f64
    }
}

fn p(b: usize, m: usize, k: usize, n: usize) -> Product {
    Product { b, m, k, n }
}

/// The matrix products one step needs, from the factors in the state (which sides are
/// triangular) and the leaf shapes. Per triangular factor `Q` of size `d` on an axis of a
/// leaf with `N` entries (batch `b`, `r = N/d`):
///
/// - apply: `G ×ᵢ P` with `P = QᵀQ` kept from the last update: one `(r×d)·(d×d)`;
/// - update, in addition: `A = G ×ᵢ Q` `(r×d)·(d×d)`, `conj(B)` (a triangular solve, counted
///   as a product of the same shape), the two Gram matrices `AAᵀ`, `BBᵀ` `(d×r)·(r×d)`,
///   the step `triu(·)·Q` `(d×d)·(d×d)`, and applying the new factors: Kron forms the new
///   `P = QᵀQ` `(d×d)·(d×d)` when `r ≥ d` and otherwise multiplies by `Qᵀ` and `Q` in turn
///   (one more `(r×d)·(d×d)`), leaving `P` to the next apply-only step; Affine always
///   forms `P`.
///
/// Under Kron's inverse-free rules (`inverse_free`: PRO, QUAD) the update is instead, per
/// dense factor: `P = QᵀQ` `(d×d)·(d×d)`, `P·G` `(r×d)·(d×d)`, `t1 = gram(P·G)`
/// `(d×r)·(r×d)`, `t1·Q` `(d×d)·(d×d)` and one more `(d×d)·(d×d)` (PRO: the Procrustes
/// rotation's `R·Q` and `R·RQ` count as two; QUAD: `p·t1`), then the new `P` and the apply
/// product; the subspace bounds (`32×d` blocks) are left out.
///
/// Affine is the same on its matrix view, except where psgd-jax integrates the probe out
/// (one side diagonal): there `B` is replaced by `(QᵀQ)⁻¹`, one triangular inverse `(d×d)·(d×d)`
/// and one product `(d×d)·(d×d)`. XMat and LRA have no matrix-matrix products (XMat is
/// elementwise; LRA multiplies by rank-r factors), so they get no limit.
fn products(
    t: &AnyTransform,
    state: &AnyState,
    update: bool,
    inverse_free: Option<&str>,
) -> Option<Vec<Product>> {
    let mut out = vec![];
    let kron = matches!(t, AnyTransform::Kron(_));
    let mut axis = |b: usize, d: usize, numel: usize, full_b: bool| {
        let r = numel / d;
        out.push(p(b, r, d, d));
        if let (true, Some(rule)) = (update, inverse_free) {
            out.push(p(b, d, d, d));
            out.push(p(b, r, d, d));
            out.push(p(b, d, r, d));
            out.push(p(b, d, d, d));
            out.push(p(b, d, d, d));
            if rule == "PRO" || rule == "Q0.5EQ1.5" {
                out.push(p(b, d, d, d));
            }
            out.push(p(b, d, d, d));
        } else if update {
            out.push(p(b, r, d, d));
            if full_b {
                out.push(p(b, r, d, d));
                out.push(p(b, d, r, d));
            } else {
                out.push(p(b, d, d, d));
            }
            out.push(p(b, d, r, d));
            out.push(p(b, d, d, d));
            out.push(if kron && r < d {
                p(b, r, d, d)
            } else {
                p(b, d, d, d)
            });
        }
    };
    match (t, state) {
        (AnyTransform::Kron(k), AnyState::Kron(s)) => {
            for (leaf, qs) in k.leaves().iter().zip(&s.precond.qs) {
                let (b, dims) = if leaf.scanned {
                    (leaf.shape[0], &leaf.shape[1..])
                } else {
                    (1, &leaf.shape[..])
                };
                let lead = usize::from(leaf.scanned);
                let numel: usize = dims.iter().product();
                for (q, &d) in qs.iter().zip(dims) {
                    if q.rank() == lead + 2 {
                        axis(b, d, numel, true);
                    }
                }
            }
        }
        (AnyTransform::Affine(a), AnyState::Affine(s)) => {
            for (leaf, f) in a.leaves().iter().zip(&s.precond) {
                let ms = shape_as_matrix(&leaf.shape);
                let (dl, dr) = (f.ql.rank() == 2, f.qr.rank() == 2);
                // the probe is integrated out when exactly one side is triangular and it
                // is the shorter one (see affine.rs `fit_whitening`)
                let closed =
                    (dl != dr) && ((dl && ms.cols >= ms.rows) || (dr && ms.rows >= ms.cols));
                let numel = ms.rows * ms.cols;
                if dl {
                    axis(1, ms.rows, numel, !closed);
                }
                if dr {
                    axis(1, ms.cols, numel, !closed);
                }
            }
        }
        _ => return None,
    }
    Some(out)
}

/// Times candle's matmul on `products` (each on fresh contiguous operands), best of
/// `repeats`, in seconds.
fn matmul_limit(products: &[Product], device: &Device, repeats: usize) -> Res<(f64, f64)> {
    let mut grouped: Vec<(Product, usize)> = vec![];
    let mut sorted = products.to_vec();
    sorted.sort();
    for q in sorted {
        match grouped.last_mut() {
            Some((last, n)) if *last == q => *n += 1,
            _ => grouped.push((q, 1)),
        }
    }
    let mut total = 0.0;
    for (q, count) in &grouped {
        let a = Tensor::randn(0f32, 1.0, (q.b, q.m, q.k), device)?;
        let b = Tensor::randn(0f32, 1.0, (q.b, q.k, q.n), device)?;
        let _ = a.matmul(&b)?;
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) {
            let t0 = Instant::now();
            let c = a.matmul(&b)?;
            device.synchronize()?;
            best = best.min(t0.elapsed().as_secs_f64());
            drop(c);
        }
        total += best * *count as f64;
    }
    let flops = products.iter().map(Product::flops).sum();
    Ok((total, flops))
}

fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn stats(times: &[f64]) -> Value {
    let mut s = times.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let median = if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    json!({ "times_s": times, "min": s.first().copied().unwrap_or(f64::NAN), "median": median })
}

fn leaves_of(workload: &Value, variant: &str) -> Vec<LeafSpec> {
    workload["leaves"]
        .as_array()
        .expect("workload leaves")
        .iter()
        .map(|l| {
            let shape: Vec<usize> = l["shape"]
                .as_array()
                .expect("leaf shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            let mut spec = LeafSpec::new(l["path"].as_str().expect("leaf path"), &shape);
            // only Kron has psgd-jax's `scanned_layers`; the others see the stacked leaf
            spec.scanned = variant == "kron" && l["scanned"].as_bool().unwrap_or(false);
            spec
        })
        .collect()
}

fn random_tree(leaves: &[LeafSpec], std: f32, device: &Device) -> Res<Vec<Tensor>> {
    Ok(leaves
        .iter()
        .map(|l| Tensor::randn(0f32, std, l.shape.as_slice(), device))
        .collect::<candle_core::Result<Vec<_>>>()?)
}

/// Runs `steps` steps from `state` at update probability `prob`, returning per-step
/// seconds and the final state.
fn run_steps(
    t: &AnyTransform,
    mut state: AnyState,
    grads: &[Tensor],
    params: &[Tensor],
    prob: f64,
    steps: usize,
    device: &Device,
) -> Res<(Vec<f64>, AnyState)> {
    let lr = 1e-3;
    let mut times = vec![];
    for _ in 0..steps {
        let t0 = Instant::now();
        let (updates, next) =
            t.update_seeded(grads, &state, Some(params), StepHyper::new(lr, prob), None)?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        drop(updates);
        state = next;
    }
    Ok((times, state))
}

fn state_tensor_bytes(t: &AnyTransform, s: &AnyState) -> Res<u64> {
    let bytes = t.state_to_bytes(s)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    Ok(st
        .tensors()
        .iter()
        .map(|(_, v)| v.data().len() as u64)
        .sum())
}

fn adamw_times(
    params: &[Tensor],
    grads: &[Tensor],
    warmup: usize,
    repeats: usize,
    device: &Device,
) -> Res<Vec<f64>> {
    let vars = params
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    // a loss whose gradient is exactly `grads`, to get a GradStore the public way
    let mut loss = Tensor::zeros((), DType::F32, device)?;
    for (v, g) in vars.iter().zip(grads) {
        loss = (loss + (v.as_tensor() * g)?.sum_all()?)?;
    }
    let store = loss.backward()?;
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )?;
    let mut times = vec![];
    for i in 0..warmup + repeats {
        let t0 = Instant::now();
        opt.step(&store)?;
        device.synchronize()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

struct Args {
    workloads: String,
    workload: Option<String>,
    variant: Option<String>,
    repeats: Option<usize>,
    warmup: Option<usize>,
    json: bool,
    device: String,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        workloads: format!(
            "{}/../../benches/workloads.json",
            env!("CARGO_MANIFEST_DIR")
        ),
        workload: None,
        variant: None,
        repeats: None,
        warmup: None,
        json: false,
        device: "cpu".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--workloads" => a.workloads = val("--workloads")?,
            "--workload" => a.workload = Some(val("--workload")?),
            "--variant" => a.variant = Some(val("--variant")?),
            "--repeats" => a.repeats = Some(val("--repeats")?.parse()?),
            "--warmup" => a.warmup = Some(val("--warmup")?.parse()?),
            "--device" => a.device = val("--device")?,
            "--json" => a.json = true,
            // cargo bench passes --bench; other harness flags are ignored as well
            _ => {}
        }
    }
    Ok(a)
}

fn device_of(name: &str) -> Res<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => return Err(format!("unknown device '{other}'").into()),
    })
}

/// Benchmarks one (workload, variant) and returns the JSON record.
fn run_case(
    workload: &Value,
    variant: &str,
    options: &Map<String, Value>,
    warmup: usize,
    repeats: usize,
    device: &Device,
) -> Res<Value> {
    // a variant entry with a `base` is that variant with other options (kron-pro: Kron
    // with `update_rule: "PRO"`)
    let mut options = options.clone();
    let base = match options.remove("base") {
        Some(Value::String(b)) => b,
        _ => variant.to_string(),
    };
    let leaves = leaves_of(workload, &base);
    let t = AnyTransform::new(
        &base,
        leaves.clone(),
        &psgd::options::from_psgd_jax_names(&options),
    )?;
    let params = random_tree(&leaves, 0.02, device)?;
    let grads = random_tree(&leaves, 1.0, device)?;
    let rss_before = proc_status_bytes("VmRSS:");
    let state = t.init(&params)?;
    let state_bytes = state_tensor_bytes(&t, &state)?;

    // update steps first: they also take the count past psgd-jax's forced first updates
    let (_, state) = run_steps(&t, state, &grads, &params, 1.0, warmup, device)?;
    let (upd, state) = run_steps(&t, state, &grads, &params, 1.0, repeats, device)?;
    let (_, state) = run_steps(&t, state, &grads, &params, 0.0, warmup, device)?;
    let rss_mid = proc_status_bytes("VmRSS:");
    let (app, state) = run_steps(&t, state, &grads, &params, 0.0, repeats, device)?;
    // the same number of apply steps again: resident memory must not keep growing
    let (_, state) = run_steps(&t, state, &grads, &params, 0.0, repeats, device)?;
    let rss_after = proc_status_bytes("VmRSS:");
    let peak = proc_status_bytes("VmHWM:");

    let adamw = adamw_times(&params, &grads, warmup, repeats, device)?;
    let mut limits = Map::new();
    for (kind, update) in [("update", true), ("apply", false)] {
        let rule = options
            .get("update_rule")
            .and_then(Value::as_str)
            .filter(|r| *r != "EQ");
        if let Some(ps) = products(&t, &state, update, rule) {
            let (secs, flops) = matmul_limit(&ps, device, repeats.max(3))?;
            limits.insert(
                kind.into(),
                json!({ "seconds": secs, "flops": flops, "products": ps.len() }),
            );
        }
    }
    Ok(json!({
        "impl": "psgd-rs",
        "workload": workload["name"],
        "variant": variant,
        "device": format!("{device:?}"),
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "kinds": { "update": stats(&upd), "apply": stats(&app) },
        "adamw": stats(&adamw),
        "matmul_limit": limits,
        "state_bytes": state_bytes,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "rss_growth_bytes": rss_after as i64 - rss_mid as i64,
    }))
}

fn ms(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |s| format!("{:.2}", s * 1e3))
}

fn print_row(r: &Value) {
    let upd = &r["kinds"]["update"]["median"];
    let app = &r["kinds"]["apply"]["median"];
    let lim = &r["matmul_limit"]["apply"]["seconds"];
    let frac = match (lim.as_f64(), app.as_f64()) {
        (Some(l), Some(a)) => format!("{:.0}%", 100.0 * l / a),
        _ => "n/a".into(),
    };
    let vs_adam = match (app.as_f64(), r["adamw"]["median"].as_f64()) {
        (Some(a), Some(b)) => format!("{:.1}x", a / b),
        _ => "-".into(),
    };
    println!(
        "{:<12} {:<7} update {:>9} ms  apply {:>9} ms  adamw {:>8} ms  apply/adamw {:>7}  apply at {:>4} of matmul limit  state {:>7.1} MiB  peak RSS {:>7.1} MiB  RSS growth {:>6} KiB",
        r["workload"].as_str().unwrap_or(""),
        r["variant"].as_str().unwrap_or(""),
        ms(upd),
        ms(app),
        ms(&r["adamw"]["median"]),
        vs_adam,
        frac,
        r["state_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        r["rss_growth_bytes"].as_i64().unwrap_or(0) / 1024,
    );
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(&args.workloads)?)?;
    let device = device_of(&args.device)?;
    // the command line, else the workload's own entry, else the file's top level
    let count = |arg: Option<usize>, w: &Value, key: &str, default: u64| {
        arg.unwrap_or(w[key].as_u64().or(spec[key].as_u64()).unwrap_or(default) as usize)
    };
    for w in spec["workloads"].as_array().ok_or("workloads")? {
        let name = w["name"].as_str().unwrap_or("");
        if args.workload.as_deref().is_some_and(|x| x != name) {
            continue;
        }
        let warmup = count(args.warmup, w, "warmup", 2);
        let repeats = count(args.repeats, w, "repeats", 5);
        for v in w["variants"].as_array().ok_or("variants")? {
            let v = v.as_str().ok_or("variant name")?;
            if args.variant.as_deref().is_some_and(|x| x != v) {
                continue;
            }
            let r = if args.workload.is_some() && args.variant.is_some() {
                let options = spec["variants"][v].as_object().cloned().unwrap_or_default();
                run_case(w, v, &options, warmup, repeats, &device)?
            } else {
                // one process per case, so its peak resident memory is its own
                let out = std::process::Command::new(std::env::current_exe()?)
                    .args(["--workload", name, "--variant", v, "--json"])
                    .args(["--workloads", &args.workloads, "--device", &args.device])
                    .args([
                        "--warmup",
                        &warmup.to_string(),
                        "--repeats",
                        &repeats.to_string(),
                    ])
                    .stderr(std::process::Stdio::inherit())
                    .output()?;
                if !out.status.success() {
                    return Err(format!("case {name}/{v} failed").into());
                }
                serde_json::from_slice(&out.stdout)?
            };
            if args.json {
                println!("{r}");
            } else {
                print_row(&r);
            }
        }
    }
    Ok(())
}
