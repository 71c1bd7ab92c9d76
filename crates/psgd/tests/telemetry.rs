//! The step's telemetry (`Psgd::stats`): each field on a case checked by hand.

use candle_core::{DType, Device, Tensor};
use psgd::telemetry::StepStats;
use psgd::{AnyState, AnyTransform, LeafSpec};
use serde_json::{json, Map, Value};

fn opt(variant: &str, leaves: &[LeafSpec], o: Value) -> AnyTransform {
    let o: Map<String, Value> = o.as_object().unwrap().clone();
    AnyTransform::new(variant, leaves.to_vec(), &o).unwrap()
}

/// Gaussian draws from a fixed generator (Box–Muller on an LCG).
struct Gauss(u64);
impl Gauss {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (a, b) = (self.uniform(), self.uniform());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }
    /// A tensor of `shape` whose entry `i` has standard deviation `scale(i)`.
    fn tensor(&mut self, shape: &[usize], scale: impl Fn(usize) -> f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| self.normal() * scale(i)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

fn leaves() -> Vec<LeafSpec> {
    vec![LeafSpec::new("w", &[4, 6]), LeafSpec::new("b", &[6])]
}

fn rms(t: &Tensor) -> f64 {
    let t = t.to_dtype(DType::F64).unwrap();
    (t.sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap())
    .sqrt()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-12)
}

fn step(
    o: &AnyTransform,
    s: &AnyState,
    g: &mut Gauss,
    params: &[Tensor],
) -> (Vec<Tensor>, AnyState) {
    let grads: Vec<Tensor> = o
        .leaves()
        .iter()
        .map(|l| g.tensor(&l.shape, |_| 1.0))
        .collect();
    let hyper = o.hyper(s).unwrap();
    o.update_seeded(&grads, s, Some(params), hyper, None)
        .unwrap()
}

fn zeros(leaves: &[LeafSpec]) -> Vec<Tensor> {
    leaves
        .iter()
        .map(|l| Tensor::zeros(l.shape.as_slice(), DType::F32, &Device::Cpu).unwrap())
        .collect()
}

#[test]
fn before_a_step_the_step_values_are_none_and_the_factors_are_read() {
    let ls = leaves();
    for v in ["kron", "xmat", "lra", "affine"] {
        let o = opt(v, &ls, json!({}));
        let s = o.init(&zeros(&ls)).unwrap();
        let st = o.stats(&s).unwrap();
        assert_eq!((st.count, st.fitted, st.fits), (0, false, 0), "{v}");
        assert_eq!(st.leaves.len(), 2);
        assert!(st.leaves.iter().all(|l| l.pre_rms.is_none()
            && l.update_rms.is_none()
            && l.clipped.is_none()
            && l.whitening.is_none()));
        assert_eq!(st.leaves[1].size, 6);
        assert!(st.times.is_none() && st.whitening.is_none());
        // identity-scaled initial factors: every diagonal ratio is 1
        assert!(!st.factors.is_empty(), "{v}");
        assert!(
            st.factors.iter().all(|f| f.condition == 1.0),
            "{v}: {:?}",
            st.factors
        );
    }
}

#[test]
fn update_rms_is_the_rms_of_the_update_and_pre_rms_its_unclipped_source() {
    let ls = leaves();
    let mut g = Gauss(7);
    let params = zeros(&ls);
    for v in ["kron", "xmat", "lra", "affine"] {
        // no clip, no weight decay: the update is −lr · P·m
        let o = opt(v, &ls, json!({ "learningRate": 0.5, "b1": 0.0 }));
        let o = match v {
            "kron" => opt(
                v,
                &ls,
                json!({ "learningRate": 0.5, "b1": 0.0, "updateClipRms": null }),
            ),
            _ => o,
        };
        let mut s = o.init(&params).unwrap();
        for _ in 0..3 {
            let (u, next) = step(&o, &s, &mut g, &params);
            s = next;
            let st = o.stats(&s).unwrap();
            for (l, leaf) in st.leaves.iter().enumerate() {
                let want = rms(&u[l]);
                let got = leaf.update_rms.unwrap();
                assert!(close(got, want, 1e-5), "{v} {}: {got} vs {want}", leaf.path);
                let pre = leaf.pre_rms.unwrap();
                assert!(
                    close(pre * 0.5, want, 1e-5),
                    "{v}: pre {pre} vs update {want}"
                );
                assert_eq!(leaf.clipped, Some(false));
            }
        }
    }
}

#[test]
fn clipped_tells_when_the_rms_cap_or_the_global_norm_acted() {
    let ls = leaves();
    let params = zeros(&ls);
    // Kron's default RMS cap 1.1 on gradients scaled up: P·m has RMS far above it
    let o = opt(
        "kron",
        &ls,
        json!({ "b1": 0.0, "preconditionerInitScale": 100.0 }),
    );
    let s = o.init(&params).unwrap();
    let (u, s) = step(&o, &s, &mut Gauss(3), &params);
    let st = o.stats(&s).unwrap();
    assert_eq!(st.clip, "rms");
    for (l, leaf) in st.leaves.iter().enumerate() {
        assert!(leaf.pre_rms.unwrap() > 1.1);
        assert_eq!(leaf.clipped, Some(true));
        // what was added is capped at RMS 1.1 times the learning rate
        assert!(close(leaf.update_rms.unwrap(), rms(&u[l]), 1e-5));
        assert!(rms(&u[l]) <= 1.1 * 0.001 * 1.0001);
    }
    // the element clamp alone: acts when some |P·m| is past it
    for (e, acted) in [(1e-6, true), (1e6, false)] {
        let o = opt(
            "kron",
            &ls,
            json!({ "b1": 0.0, "updateClipRms": null, "updateClipElement": e }),
        );
        let s = o.init(&params).unwrap();
        let (_, s) = step(&o, &s, &mut Gauss(3), &params);
        let st = o.stats(&s).unwrap();
        assert_eq!(st.clip, "element");
        assert!(st.leaves.iter().all(|l| l.clipped == Some(acted)), "{e}");
    }
    // the global norm: XMat's updateGlobalNormClip caps ‖P·g‖ over the tree
    for (cap, acted) in [(1e-3, true), (1e6, false)] {
        let o = opt(
            "xmat",
            &ls,
            json!({ "updateGlobalNormClip": cap, "b1": 0.0 }),
        );
        let s = o.init(&params).unwrap();
        let (_, s) = step(&o, &s, &mut Gauss(3), &params);
        let st = o.stats(&s).unwrap();
        assert_eq!(st.clip, "globalNorm");
        let norm: f64 = st
            .leaves
            .iter()
            .map(|l| l.pre_rms.unwrap().powi(2) * l.size as f64)
            .sum::<f64>()
            .sqrt();
        assert_eq!(norm > cap, acted);
        assert!(st.leaves.iter().all(|l| l.clipped == Some(acted)));
    }
}

#[test]
fn fitted_and_fits_follow_the_update_probability() {
    let ls = leaves();
    let params = zeros(&ls);
    let mut g = Gauss(11);
    for (p, every) in [(1.0, true), (0.0, false)] {
        let o = opt("kron", &ls, json!({ "preconditionerUpdateProbability": p }));
        let mut s = o.init(&params).unwrap();
        for k in 1..=4u64 {
            s = step(&o, &s, &mut g, &params).1;
            let st = o.stats(&s).unwrap();
            assert_eq!(st.count, k);
            assert_eq!(st.fitted, every);
            assert_eq!(st.fits, if every { k } else { 0 });
            let t = st.times.unwrap();
            assert!(t.total_ms >= t.fit_ms + t.apply_ms && t.apply_ms > 0.0);
            assert_eq!(t.fit_ms > 0.0, every);
            // no fit yet: no whitening estimate
            assert_eq!(st.whitening.is_some(), every);
        }
    }
    // p = 0.5 under the counter: every second step fits
    let o = opt(
        "kron",
        &ls,
        json!({ "preconditionerUpdateProbability": 0.5 }),
    );
    let mut s = o.init(&params).unwrap();
    let mut got = vec![];
    for _ in 0..6 {
        s = step(&o, &s, &mut g, &params).1;
        got.push(o.stats(&s).unwrap().fitted);
    }
    assert_eq!(got, [false, true, false, true, false, true]);
    assert_eq!(o.stats(&s).unwrap().fits, 3);
}

#[test]
fn the_condition_of_a_known_diagonal_factor_and_the_kept_lipschitz_bound() {
    let ls = vec![LeafSpec::new("v", &[3])];
    let params = zeros(&ls);
    for rule in ["EQ", "PRO"] {
        let o = opt("kron", &ls, json!({ "updateRule": rule }));
        let mut s = o.init(&params).unwrap();
        let AnyState::Kron(k) = &mut s else { panic!() };
        k.precond.qs[0][0] = Tensor::new(&[1f32, -2.0, 4.0], &Device::Cpu).unwrap();
        k.precond.ps = None;
        let st = o.stats(&s).unwrap();
        assert_eq!(st.factors.len(), 1);
        assert_eq!(st.factors[0].condition, 4.0);
        assert_eq!(
            (st.factors[0].path.as_str(), st.factors[0].factor),
            ("v", 0)
        );
        // PRO keeps its running bound (0 before a fit); EQ's memoryless normaliser comes
        // from a fit
        let before = st.factors[0].normaliser;
        assert_eq!(
            before,
            if rule == "PRO" { Some(0.0) } else { None },
            "{rule}"
        );
        let s = step(&o, &s, &mut Gauss(5), &params).1;
        let st = o.stats(&s).unwrap();
        let n = st.factors[0].normaliser.unwrap();
        assert!(n > 0.0 && n.is_finite(), "{rule}: {n}");
        if let AnyState::Kron(k) = &s {
            if rule == "PRO" {
                let l = k.precond.ls[0][0].to_vec1::<f32>().unwrap()[0] as f64;
                assert_eq!(n, l);
            } else {
                assert!(k.precond.ls[0].is_empty());
            }
        }
    }
    // a zero on the diagonal: infinite
    let o = opt("kron", &ls, json!({}));
    let mut s = o.init(&params).unwrap();
    let AnyState::Kron(k) = &mut s else { panic!() };
    k.precond.qs[0][0] = Tensor::new(&[1f32, 0.0, 4.0], &Device::Cpu).unwrap();
    assert_eq!(o.stats(&s).unwrap().factors[0].condition, f64::INFINITY);
}

#[test]
fn the_whitening_estimate_approaches_1_on_a_stationary_gaussian_stream() {
    // gradients with per-entry scales from 0.1 to 10: P must learn them to whiten
    let ls = vec![LeafSpec::new("w", &[8, 8])];
    let params = zeros(&ls);
    let o = opt(
        "kron",
        &ls,
        json!({ "b1": 0.0, "preconditionerUpdateProbability": 1.0, "learningRate": 0.0 }),
    );
    let mut s = o.init(&params).unwrap();
    let mut g = Gauss(42);
    let scale = |i: usize| 10f32.powf((i / 8) as f32 / 3.5 - 1.0);
    let mut first = None;
    for _ in 0..2000 {
        let grads = vec![g.tensor(&[8, 8], scale)];
        let hyper = o.hyper(&s).unwrap();
        s = o
            .update_seeded(&grads, &s, Some(&params), hyper, None)
            .unwrap()
            .1;
        first.get_or_insert(o.stats(&s).unwrap().whitening.unwrap());
    }
    let st = o.stats(&s).unwrap();
    assert!(st.whitening_on_fit_input);
    let w = st.whitening.unwrap();
    assert!((w - 1.0).abs() < 0.25, "whitening {w} (first {first:?})");
    assert!((first.unwrap() - 1.0).abs() > (w - 1.0).abs());
    // the factors learnt the spread of scales
    assert!(
        st.factors.iter().any(|f| f.condition > 3.0),
        "{:?}",
        st.factors
    );
}

#[test]
fn stats_are_read_only_and_restart_on_a_loaded_state() {
    let ls = leaves();
    let params = zeros(&ls);
    let o = opt(
        "kron",
        &ls,
        json!({ "preconditionerUpdateProbability": 1.0 }),
    );
    let s = o.init(&params).unwrap();
    let (_, s) = step(&o, &s, &mut Gauss(9), &params);
    let bytes = o.state_to_bytes(&s).unwrap();
    let a: StepStats = o.stats(&s).unwrap();
    let b = o.stats(&s).unwrap();
    assert_eq!(a, b);
    assert_eq!(o.state_to_bytes(&s).unwrap(), bytes);
    // the telemetry is not saved: a loaded state has the step count and the factors, and
    // no step of its own yet
    let loaded = o.state_from_bytes(&bytes, &Device::Cpu).unwrap();
    let l = o.stats(&loaded).unwrap();
    assert_eq!((l.count, l.fitted, l.fits), (1, false, 0));
    assert!(l.leaves.iter().all(|x| x.pre_rms.is_none()) && l.times.is_none());
    assert_eq!(
        l.factors.iter().map(|f| f.condition).collect::<Vec<_>>(),
        a.factors.iter().map(|f| f.condition).collect::<Vec<_>>()
    );
}

#[test]
fn xmat_and_affine_keep_their_last_fits_normaliser_and_lra_none() {
    let ls = leaves();
    let params = zeros(&ls);
    for (v, kept) in [("xmat", true), ("affine", true), ("lra", false)] {
        let o = opt(v, &ls, json!({ "preconditionerUpdateProbability": 1.0 }));
        let s = o.init(&params).unwrap();
        assert!(o
            .stats(&s)
            .unwrap()
            .factors
            .iter()
            .all(|f| f.normaliser.is_none()));
        let s = step(&o, &s, &mut Gauss(13), &params).1;
        for f in o.stats(&s).unwrap().factors {
            match (kept, f.normaliser) {
                (true, Some(n)) => assert!(n > 0.0 && n.is_finite(), "{v}: {n}"),
                (false, None) => {}
                other => panic!("{v}: {other:?}"),
            }
        }
        // not saved: a loaded state has none until its next fit
        let loaded = o
            .state_from_bytes(&o.state_to_bytes(&s).unwrap(), &Device::Cpu)
            .unwrap();
        assert!(o
            .stats(&loaded)
            .unwrap()
            .factors
            .iter()
            .all(|f| f.normaliser.is_none()));
    }
}
