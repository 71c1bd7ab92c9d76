//! `overlapFit`: a step's fit handed back as a job ([`AnyTransform::update_deferred`]) and
//! run on another thread gives the numbers of `updatePreconditionerFirst: false` run in
//! order, bit for bit, on every variant and Kron update rule; a failed fit leaves the
//! state as its step left it; the option refuses the other order.

use candle_core::{DType, Device, Tensor};
use psgd::any::StepInputs;
use psgd::{
    AnyTransform, Curvature, ErrorKind, Kron, KronOptions, LeafSpec, RandomSource, Schedule,
    SeededRandom, Transform,
};
use serde_json::{json, Map, Value};

fn leaves() -> Vec<LeafSpec> {
    vec![
        LeafSpec::new("w", &[6, 4]),
        LeafSpec::new("b", &[5]),
        LeafSpec::new("s", &[]),
    ]
}

fn grads(leaves: &[LeafSpec], step: u64) -> Vec<Tensor> {
    leaves
        .iter()
        .enumerate()
        .map(|(i, l)| {
            SeededRandom::for_step(100 + i as u64, step)
                .normal(&l.shape, &Device::Cpu)
                .unwrap()
        })
        .collect()
}

fn params(leaves: &[LeafSpec]) -> Vec<Tensor> {
    leaves
        .iter()
        .map(|l| Tensor::ones(l.shape.as_slice(), DType::F32, &Device::Cpu).unwrap())
        .collect()
}

fn bits(ts: &[Tensor]) -> Vec<Vec<u32>> {
    ts.iter()
        .map(|t| {
            let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
            v.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

fn options(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(o) => o,
        _ => unreachable!(),
    }
}

/// `steps` steps with `overlapFit: true` (each fit run on a thread of its own while the
/// next gradient is made) and with `updatePreconditionerFirst: false` run in order, from
/// the same start: the params and the saved states agree bit for bit after every step.
fn overlapped_equals_sequential(variant: &str, extra: Value, steps: u64) -> usize {
    run_both(variant, extra, steps, false)
}

/// The Hessian mode's inputs of step `n`: fitting on odd steps.
fn curvature(leaves: &[LeafSpec], n: u64) -> Curvature {
    Curvature {
        hvp: grads(leaves, 500 + n),
        vector: grads(leaves, 700 + n),
        update_preconditioner: n % 2 == 1,
    }
}

/// [`overlapped_equals_sequential`], in the Hessian mode when `hessian`.
fn run_both(variant: &str, extra: Value, steps: u64, hessian: bool) -> usize {
    let leaves = leaves();
    let with = |k: &str| {
        let mut o = options(extra.clone());
        o.insert(k.into(), json!(k == "overlapFit"));
        AnyTransform::new(variant, leaves.clone(), &o).unwrap()
    };
    let (overlap, sequential) = (with("overlapFit"), with("updatePreconditionerFirst"));
    assert!(overlap.overlap_fit() && !sequential.overlap_fit());
    let overlap = std::sync::Arc::new(overlap);
    let (mut p_o, mut p_s) = (params(&leaves), params(&leaves));
    let mut s_o = overlap.init(&p_o).unwrap();
    let mut s_s = sequential.init(&p_s).unwrap();
    let (mut fits, mut resets) = (0, 0);
    for n in 1..=steps {
        let g = grads(&leaves, n);
        let c = hessian.then(|| curvature(&leaves, n));
        let hyper = sequential.hyper(&s_s).unwrap();
        let (u_s, next) = sequential
            .update_seeded(&g, &s_s, Some(&p_s), hyper, c.as_ref())
            .unwrap();
        s_s = next;
        p_s = psgd::apply_updates(&p_s, &u_s).unwrap();

        let hyper = overlap.hyper(&s_o).unwrap();
        let inputs = StepInputs {
            grads: &g,
            params: Some(&p_o),
            hyper,
            curvature: c.as_ref(),
        };
        let (u_o, mut next, job) = overlap.update_deferred(&s_o, inputs).unwrap();
        p_o = psgd::apply_updates(&p_o, &u_o).unwrap();
        if let Some(job) = job {
            fits += 1;
            let opt = overlap.clone();
            let fitted = std::thread::spawn(move || job.run_apart(&opt))
                .join()
                .unwrap();
            fitted.unwrap().install(&mut next).unwrap();
        }
        s_o = next;
        assert_eq!(
            bits(&u_o),
            bits(&u_s),
            "{variant} {extra}: updates of step {n}"
        );
        assert_eq!(
            bits(&p_o),
            bits(&p_s),
            "{variant} {extra}: params after step {n}"
        );
        assert_eq!(
            overlap.state_to_bytes(&s_o).unwrap(),
            sequential.state_to_bytes(&s_s).unwrap(),
            "{variant} {extra}: state after step {n}"
        );
        // what the state keeps beside its file: the fit count and the guard's counts
        let (st_o, st_s) = (
            overlap.stats(&s_o).unwrap(),
            sequential.stats(&s_s).unwrap(),
        );
        let counts = |st: &psgd::telemetry::StepStats| {
            let per_leaf: Vec<(u64, u64)> =
                st.leaves.iter().map(|l| (l.resets, l.dropped)).collect();
            (st.fitted, st.fits, st.skipped, per_leaf)
        };
        assert_eq!(
            counts(&st_o),
            counts(&st_s),
            "{variant} {extra}: stats after step {n}"
        );
        resets += st_o
            .leaves
            .iter()
            .map(|l| l.resets + l.dropped)
            .sum::<u64>();
    }
    if extra.get("onUnhealthy").is_some() {
        assert!(resets > 0, "{variant} {extra}: the guard never acted");
    }
    fits
}

#[test]
fn overlapped_fit_equals_the_sequential_delayed_order_on_every_variant_and_rule() {
    for rule in ["EQ", "Q0.5EQ1.5", "QUAD", "QEQ", "QEP", "PRO4P", "QUAD4P"] {
        let every = json!({ "updateRule": rule, "preconditionerUpdateProbability": 1.0 });
        assert_eq!(
            overlapped_equals_sequential("kron", every, 12),
            12,
            "{rule}"
        );
        // the default schedule, and a sparse one: steps without a fit hand back no job
        let fits = overlapped_equals_sequential("kron", json!({ "updateRule": rule }), 12);
        assert_eq!(
            fits, 12,
            "{rule}: the default schedule fits every early step"
        );
        let sparse = json!({ "updateRule": rule, "preconditionerUpdateProbability": 0.5 });
        assert_eq!(
            overlapped_equals_sequential("kron", sparse, 12),
            6,
            "{rule}"
        );
    }
    let draw = json!({ "updateDecision": "draw", "preconditionerUpdateProbability": 0.7 });
    assert!(overlapped_equals_sequential("kron", draw, 12) > 0);
    for variant in ["xmat", "lra", "affine"] {
        let every = json!({ "preconditionerUpdateProbability": 1.0, "learningRate": 0.01 });
        assert_eq!(
            overlapped_equals_sequential(variant, every, 12),
            12,
            "{variant}"
        );
        let default = json!({ "learningRate": 0.01 });
        assert_eq!(
            overlapped_equals_sequential(variant, default, 12),
            12,
            "{variant}"
        );
        let sparse = json!({ "preconditionerUpdateProbability": 0.3, "learningRate": 0.01 });
        let fits = overlapped_equals_sequential(variant, sparse, 12);
        assert!((2..12).contains(&fits), "{variant}: {fits} fits");
    }
}

#[test]
fn overlapped_fit_equals_the_sequential_delayed_order_under_the_health_guard() {
    // a bound every fitted factor passes: the guard resets or drops at every fit, on the
    // worker as in the step
    for mode in ["reset", "skip"] {
        for rule in ["EQ", "QUAD"] {
            let o = json!({ "updateRule": rule, "onUnhealthy": mode, "maxCondition": 1.0001,
                            "preconditionerUpdateProbability": 1.0 });
            assert_eq!(
                overlapped_equals_sequential("kron", o, 8),
                8,
                "{mode} {rule}"
            );
        }
        for variant in ["xmat", "lra", "affine"] {
            let o = json!({ "onUnhealthy": mode, "maxCondition": 1.0001, "learningRate": 0.01,
                            "preconditionerUpdateProbability": 1.0 });
            assert_eq!(
                overlapped_equals_sequential(variant, o, 8),
                8,
                "{mode} {variant}"
            );
        }
    }
}

#[test]
fn overlapped_fit_equals_the_sequential_delayed_order_in_the_hessian_mode() {
    for rule in ["EQ", "QUAD", "PRO4P"] {
        let o = json!({ "updateRule": rule });
        assert_eq!(run_both("kron", o, 10, true), 5, "{rule}");
    }
    for variant in ["xmat", "lra", "affine"] {
        let o = json!({ "learningRate": 0.01 });
        assert_eq!(run_both(variant, o, 10, true), 5, "{variant}");
    }
}

#[test]
fn overlap_fit_refuses_an_explicit_update_preconditioner_first_true() {
    for variant in ["kron", "xmat", "lra", "affine"] {
        let both = options(json!({ "overlapFit": true, "updatePreconditionerFirst": true }));
        for e in [
            AnyTransform::new(variant, leaves(), &both).unwrap_err(),
            AnyTransform::check_options(variant, &both).unwrap_err(),
        ] {
            assert_eq!(e.kind(), ErrorKind::Range, "{variant}");
            let m = e.to_string();
            assert!(
                m.contains("overlapFit") && m.contains("updatePreconditionerFirst"),
                "{m}"
            );
        }
        // false with it is the order it implies; absent follows it
        for o in [
            json!({ "overlapFit": true, "updatePreconditionerFirst": false }),
            json!({ "overlapFit": true }),
        ] {
            let t = AnyTransform::new(variant, leaves(), &options(o)).unwrap();
            assert!(t.overlap_fit(), "{variant}");
        }
        let off = AnyTransform::new(variant, leaves(), &options(json!({}))).unwrap();
        assert!(!off.overlap_fit(), "{variant}");
    }
}

/// A source whose draws fail once `ok` draws were made.
struct Failing {
    inner: SeededRandom,
    ok: usize,
}

impl RandomSource for Failing {
    fn uniform(&mut self) -> psgd::Result<f32> {
        self.take()?;
        self.inner.uniform()
    }
    fn normal(&mut self, shape: &[usize], device: &Device) -> psgd::Result<Tensor> {
        self.take()?;
        self.inner.normal(shape, device)
    }
}

impl Failing {
    fn take(&mut self) -> psgd::Result<()> {
        if self.ok == 0 {
            return Err(psgd::PsgdError::State("the test's source failed".into()));
        }
        self.ok -= 1;
        Ok(())
    }
}

/// A fit that fails after its step handed out the updates: its error comes from
/// `run_fit`, and the state the step made (count, momentum, the preconditioner as it was)
/// is untouched by it, so a later step runs from it.
#[test]
fn a_failed_deferred_fit_leaves_the_state_as_its_step_left_it() {
    let leaves = leaves();
    let o = KronOptions {
        overlap_fit: true,
        preconditioner_update_probability: Some(Schedule::Constant(1.0)),
        ..Default::default()
    };
    let opt = Kron::new(leaves.clone(), o).unwrap();
    assert!(!opt.step_options().update_first);
    let p = params(&leaves);
    let s0 = opt.init(&p).unwrap();
    let g = grads(&leaves, 1);
    // Kron's fit draws; the step before it draws nothing under the counter decision
    let mut rng = Failing {
        inner: SeededRandom::for_step(0, 1),
        ok: 0,
    };
    let (u, s1, job) = opt
        .update_deferred(&g, &s0, Some(&p), opt.hyper(&s0), None, &mut rng)
        .unwrap();
    let before = opt.state_to_bytes(&s1).unwrap();
    let err = opt.run_fit(job.expect("a fit"), &mut rng).unwrap_err();
    assert!(err.to_string().contains("the test's source failed"));
    assert_eq!(opt.state_to_bytes(&s1).unwrap(), before);
    assert_eq!(s1.count, 1);
    // the updates were those of the preconditioner as it was: the inline step's
    let (u_inline, _) = opt.update(&g, &s0, Some(&p)).unwrap();
    assert_eq!(bits(&u), bits(&u_inline));
    // the next step works from the state the step left
    let (_, s2) = opt.update(&grads(&leaves, 2), &s1, Some(&p)).unwrap();
    assert_eq!(s2.count, 2);
}
