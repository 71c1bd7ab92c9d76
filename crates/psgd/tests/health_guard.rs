//! The health guard (`onUnhealthy`, `maxCondition`) on every variant: a non-finite or
//! ill-conditioned factor under 'throw', 'reset' and 'skip', a step whose updates overflow,
//! the counts, and a healthy run that the guard leaves bit for bit as it is.

use candle_core::{DType, Device, Tensor};
use psgd::guard::OnUnhealthy;
use psgd::{
    Affine, AffineOptions, ErrorKind, Kron, KronOptions, LeafSpec, Lra, LraOptions, Options,
    Preconditioner, Psgd, PsgdError, PsgdState, RandomSource, Schedule, SeededRandom, Transform,
    XMat, XMatOptions,
};

const DEFAULT: Option<f64> = Some(psgd::guard::DEFAULT_MAX_CONDITION);

fn leaves() -> Vec<LeafSpec> {
    vec![LeafSpec::new("w", &[4, 3]), LeafSpec::new("b", &[5])]
}

fn grads(step: u64, scale: f64) -> Vec<Tensor> {
    leaves()
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let t = SeededRandom::for_step(100 + i as u64, step)
                .normal(&l.shape, &Device::Cpu)
                .unwrap();
            (t * scale).unwrap()
        })
        .collect()
}

fn params() -> Vec<Tensor> {
    leaves()
        .iter()
        .map(|l| Tensor::ones(l.shape.as_slice(), DType::F32, &Device::Cpu).unwrap())
        .collect()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn finite(ts: &[Tensor]) -> bool {
    ts.iter().all(|t| vals(t).iter().all(|x| x.is_finite()))
}

fn zero(ts: &[Tensor]) -> bool {
    ts.iter().all(|t| vals(t).iter().all(|&x| x == 0.0))
}

type Out<P> = psgd::Result<(Vec<Tensor>, PsgdState<<P as Preconditioner>::State>)>;

fn step<P: Preconditioner>(opt: &Psgd<P>, s: &PsgdState<P::State>, t: u64, scale: f64) -> Out<P> {
    let mut rng = SeededRandom::for_step(7, t);
    let p = params();
    opt.update_with(&grads(t, scale), s, Some(&p), opt.hyper(s), None, &mut rng)
}

/// A few healthy steps.
fn warmed<P: Preconditioner>(opt: &Psgd<P>) -> PsgdState<P::State> {
    let mut s = opt.init(&params()).unwrap();
    for t in 1..=3 {
        s = step(opt, &s, t, 1.0).unwrap().1;
    }
    s
}

fn momentum_eq<S>(a: &PsgdState<S>, b: &PsgdState<S>) -> bool {
    let flat = |s: &PsgdState<S>| s.mu.iter().flatten().flat_map(vals).collect::<Vec<_>>();
    flat(a) == flat(b)
}

/// The guard on one variant: `make(guard, update_first, max_condition)` its options (fitting every step),
/// `poison(state, value)` writes `value` into the first diagonal entry of a factor that
/// preconditions leaf 0 (every leaf for XMat and LRA), `shared` whether one
/// preconditioner serves every leaf.
fn guard_paths<P: Preconditioner>(
    make: impl Fn(OnUnhealthy, bool, Option<f64>) -> P::Options,
    poison: impl Fn(&mut P::State, f32),
    shared: bool,
) {
    let name = P::NAME;
    for first in [true, false] {
        let throw = Psgd::<P>::new(leaves(), make(OnUnhealthy::Throw, first, DEFAULT)).unwrap();
        let reset = Psgd::<P>::new(leaves(), make(OnUnhealthy::Reset, first, DEFAULT)).unwrap();
        let skip = Psgd::<P>::new(leaves(), make(OnUnhealthy::Skip, first, DEFAULT)).unwrap();
        let healthy = warmed(&throw);

        // healthy steps: the guard changes nothing, bit for bit
        for opt in [&reset, &skip] {
            let (u, s) = step(opt, &healthy, 4, 1.0).unwrap();
            let (u0, s0) = step(&throw, &healthy, 4, 1.0).unwrap();
            assert_eq!(
                u.iter().map(vals).collect::<Vec<_>>(),
                u0.iter().map(vals).collect::<Vec<_>>(),
                "{name}"
            );
            assert_eq!(
                opt.state_to_bytes(&s).unwrap(),
                throw.state_to_bytes(&s0).unwrap(),
                "{name}"
            );
            assert_eq!(s.guard, psgd::guard::GuardCounts::new(2), "{name}");
        }

        // a NaN factor
        let mut sick = healthy.clone();
        poison(&mut sick.precond, f32::NAN);
        // 'throw': refused, as before
        let e = step(&throw, &sick, 4, 1.0).unwrap_err();
        assert!(
            matches!(e, PsgdError::NonFiniteUpdate { .. }),
            "{name}: {e}"
        );
        assert_eq!(e.kind(), ErrorKind::Range);
        // 'reset': the leaf's factors start over; later steps run
        let (u, s) = step(&reset, &sick, 4, 1.0).unwrap();
        assert!(finite(&u), "{name} first={first}");
        assert_eq!(s.count, 4);
        let want = if shared { vec![1, 1] } else { vec![1, 0] };
        assert_eq!(s.guard.resets, want, "{name} first={first}");
        assert!(
            reset
                .preconditioner()
                .conditions(&s.precond)
                .unwrap()
                .iter()
                .all(|c| c.is_finite()),
            "{name}"
        );
        let (u5, s5) = step(&reset, &s, 5, 1.0).unwrap();
        assert!(finite(&u5) && !zero(&u5), "{name}");
        assert_eq!(s5.guard.resets, want, "{name}: no second reset");
        // with the fit first the reset comes before the apply: the step is not skipped
        assert_eq!(s.guard.skipped, u64::from(!first), "{name} first={first}");
        // 'skip': zero updates, momentum and preconditioner kept, the step counted
        let (u, s) = step(&skip, &sick, 4, 1.0).unwrap();
        assert!(zero(&u), "{name}");
        assert_eq!(s.count, 4);
        assert_eq!(s.guard.skipped, 1, "{name}");
        assert!(momentum_eq(&s, &sick), "{name}: momentum kept");
        assert_eq!(
            skip.state_to_bytes(&PsgdState {
                count: 3,
                ..s.clone()
            })
            .unwrap(),
            skip.state_to_bytes(&sick).unwrap(),
            "{name}: the preconditioner kept"
        );

        // an ill-conditioned factor: reset past maxCondition (default 1e6), kept without a bound
        let mut ill = healthy.clone();
        poison(&mut ill.precond, 1e9);
        let (u, s) = step(&reset, &ill, 4, 1.0).unwrap();
        assert!(finite(&u));
        if first {
            assert_eq!(s.guard.resets, want, "{name}: ill-conditioned");
            let unbounded =
                Psgd::<P>::new(leaves(), make(OnUnhealthy::Reset, first, None)).unwrap();
            let (_, s) = step(&unbounded, &ill, 4, 1.0).unwrap();
            assert_eq!(s.guard.resets, vec![0, 0], "{name}: no bound");
            // 'skip' drops the fit for that leaf: its factors stay as they were
            let (_, s) = step(&skip, &ill, 4, 1.0).unwrap();
            let want_dropped = if shared { vec![1, 1] } else { vec![1, 0] };
            assert_eq!(s.guard.dropped, want_dropped, "{name}: dropped");
            let c = skip.preconditioner().conditions(&s.precond).unwrap();
            let c0 = skip.preconditioner().conditions(&ill.precond).unwrap();
            assert_eq!(c[0], c0[0], "{name}: leaf 0 kept its factors");
        }
    }
}

fn diag_poison(q: &Tensor, v: f32) -> Tensor {
    let mut x = vals(q);
    x[0] = v;
    Tensor::from_vec(x, q.dims(), q.device())
        .unwrap()
        .to_dtype(q.dtype())
        .unwrap()
}

#[test]
fn kron_guard_paths() {
    guard_paths::<psgd::kron::KronPreconditioner>(
        |on_unhealthy, first, max_condition| KronOptions {
            on_unhealthy,
            max_condition,
            update_preconditioner_first: first,
            preconditioner_update_probability: Some(Schedule::Constant(1.0)),
            ..Default::default()
        },
        |st, v| {
            st.qs[0][0] = diag_poison(&st.qs[0][0], v);
            st.ps = None;
        },
        false,
    );
}

#[test]
fn affine_guard_paths() {
    guard_paths::<psgd::affine::AffinePreconditioner>(
        |on_unhealthy, first, max_condition| AffineOptions {
            on_unhealthy,
            max_condition,
            update_preconditioner_first: first,
            ..Default::default()
        },
        |st, v| {
            st[0] = psgd::affine::AffineFactors::new(diag_poison(&st[0].ql, v), st[0].qr.clone())
                .unwrap();
        },
        false,
    );
}

#[test]
fn xmat_guard_paths() {
    guard_paths::<psgd::xmat::XMatPreconditioner>(
        |on_unhealthy, first, max_condition| XMatOptions {
            on_unhealthy,
            max_condition,
            update_preconditioner_first: first,
            ..Default::default()
        },
        |st, v| st.a = diag_poison(&st.a, v),
        true,
    );
}

#[test]
fn lra_guard_paths() {
    guard_paths::<psgd::lra::LraPreconditioner>(
        |on_unhealthy, first, max_condition| LraOptions {
            on_unhealthy,
            max_condition,
            update_preconditioner_first: first,
            ..Default::default()
        },
        |st, v| st.d = diag_poison(&st.d, v),
        true,
    );
}

/// Updates that overflow float32 with healthy factors (a far too large learning rate):
/// 'throw' refuses the step, 'skip' makes zero updates and counts it, 'reset' resets the
/// leaf at fault and makes zero updates; the next step runs either way.
#[test]
fn overflowing_updates_under_each_mode() {
    let make = |on_unhealthy| {
        let o = KronOptions {
            on_unhealthy,
            learning_rate: Schedule::Constant(3e38),
            ..Default::default()
        };
        Kron::new(leaves(), o).unwrap()
    };
    let (throw, reset, skip) = (
        make(OnUnhealthy::Throw),
        make(OnUnhealthy::Reset),
        make(OnUnhealthy::Skip),
    );
    let s = throw.init(&params()).unwrap();
    assert!(matches!(
        step(&throw, &s, 1, 1e3).unwrap_err(),
        PsgdError::NonFiniteUpdate { .. }
    ));
    for (opt, resets) in [(&skip, vec![0, 0]), (&reset, vec![1, 0])] {
        let (u, s1) = step(opt, &s, 1, 1e3).unwrap();
        assert!(zero(&u));
        assert_eq!((s1.count, s1.guard.skipped), (1, 1));
        assert_eq!(s1.guard.resets, resets);
        assert!(momentum_eq(&s1, &s));
        // a small gradient then steps normally
        let (u2, s2) = step(opt, &s1, 2, 1e-30).unwrap();
        assert!(finite(&u2));
        assert_eq!(s2.guard.skipped, 1);
    }
}

/// Finite updates that would take a param past float32's range: 'throw' makes them (as
/// before), 'reset' and 'skip' refuse them like non-finite updates and count the step.
#[test]
fn updates_that_would_overflow_the_params_under_each_mode() {
    let make = |on_unhealthy| {
        let o = KronOptions {
            on_unhealthy,
            learning_rate: Schedule::Constant(1e37),
            ..Default::default()
        };
        Kron::new(leaves(), o).unwrap()
    };
    let big: Vec<Tensor> = leaves()
        .iter()
        .map(|l| Tensor::full(3.4e38f32, l.shape.as_slice(), &Device::Cpu).unwrap())
        .collect();
    for mode in [OnUnhealthy::Throw, OnUnhealthy::Reset, OnUnhealthy::Skip] {
        let opt = make(mode);
        let s = opt.init(&big).unwrap();
        // a gradient whose step, finite in itself, pushes params near float32's largest
        // value past it
        let g: Vec<Tensor> = grads(1, 1.0)
            .into_iter()
            .map(|t| (t.abs().unwrap() * -1.0).unwrap())
            .collect();
        let mut rng = SeededRandom::for_step(7, 1);
        let (u, s1) = opt
            .update_with(&g, &s, Some(&big), opt.hyper(&s), None, &mut rng)
            .unwrap();
        assert!(finite(&u), "{mode:?}: the updates are finite");
        let next = psgd::apply_updates(&big, &u).unwrap();
        match mode {
            OnUnhealthy::Throw => {
                assert!(!finite(&next), "'throw' makes the step as before");
                assert_eq!(s1.guard.skipped, 0);
            }
            _ => {
                assert!(zero(&u), "{mode:?}: zero updates");
                assert!(finite(&next), "{mode:?}: the params stay finite");
                assert_eq!((s1.count, s1.guard.skipped), (1, 1), "{mode:?}");
            }
        }
    }
}

/// XMat and LRA keep one preconditioner for every leaf: a step whose updates overflow
/// under 'reset' resets it, counted on every leaf.
#[test]
fn a_shared_preconditioner_is_reset_and_counted_whole() {
    let o = XMatOptions {
        on_unhealthy: OnUnhealthy::Reset,
        learning_rate: Schedule::Constant(3e38),
        ..Default::default()
    };
    let xmat = XMat::new(leaves(), o).unwrap();
    let s = xmat.init(&params()).unwrap();
    let (u, s1) = step(&xmat, &s, 1, 1e3).unwrap();
    assert!(zero(&u));
    assert_eq!((s1.guard.resets.clone(), s1.guard.skipped), (vec![1, 1], 1));
}

/// With `allowNonFinite` a NaN factor can come from a saved state: 'reset' recovers from it.
#[test]
fn a_loaded_nan_factor_is_reset() {
    let o = |on_unhealthy| KronOptions {
        on_unhealthy,
        allow_non_finite: true,
        ..Default::default()
    };
    let kron = Kron::new(leaves(), o(OnUnhealthy::Reset)).unwrap();
    let mut s = warmed(&kron);
    s.precond.qs[1][0] = diag_poison(&s.precond.qs[1][0], f32::INFINITY);
    s.precond.ps = None;
    let bytes = kron.state_to_bytes(&s).unwrap();
    let loaded = kron.state_from_bytes(&bytes, &Device::Cpu).unwrap();
    assert_eq!(
        loaded.guard,
        psgd::guard::GuardCounts::new(2),
        "counts are not saved"
    );
    let mut s = loaded;
    let mut resets = 0;
    for t in 4..=10 {
        let (u, next) = step(&kron, &s, t, 1.0).unwrap();
        assert!(finite(&u), "step {t}");
        s = next;
        resets = s.guard.resets[1];
    }
    assert_eq!(resets, 1);
    assert_eq!(s.guard.resets[0], 0);
}

#[test]
fn bad_guard_options_are_typed_errors() {
    let parse = |k: &str, v: serde_json::Value| {
        let mut m = serde_json::Map::new();
        m.insert(k.into(), v);
        KronOptions::from_json(&m)
            .and_then(|o| o.validate().map(|_| o))
            .err()
            .map(|e| (e.kind(), e.to_string()))
    };
    let (kind, msg) = parse("onUnhealthy", serde_json::json!("retry")).unwrap();
    assert_eq!(kind, ErrorKind::Type);
    assert!(
        msg.contains("onUnhealthy") && msg.contains("'reset'"),
        "{msg}"
    );
    for bad in [serde_json::json!(1.0), serde_json::json!(-5.0)] {
        let (kind, msg) = parse("maxCondition", bad).unwrap();
        assert_eq!(kind, ErrorKind::Range);
        assert!(msg.contains("maxCondition") && msg.contains("> 1"), "{msg}");
    }
    let (kind, _) = parse("maxCondition", serde_json::json!("big")).unwrap();
    assert_eq!(kind, ErrorKind::Type);
    assert!(parse("maxCondition", serde_json::Value::Null).is_none());
    assert!(parse("onUnhealthy", serde_json::json!("skip")).is_none());
    for o in [
        Affine::new(leaves(), AffineOptions::default()).is_ok(),
        XMat::new(leaves(), XMatOptions::default()).is_ok(),
        Lra::new(leaves(), LraOptions::default()).is_ok(),
    ] {
        assert!(o);
    }
}
