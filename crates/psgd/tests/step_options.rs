//! The step's options: `updatePreconditionerFirst` on every variant, and Kron's update
//! decision `'cumulative'`, momentum warm-up, update clip, initial-scale scope and power,
//! and `maxSkew`, as a user runs them.

use candle_core::{DType, Device, Tensor};
use psgd::kron::{InitScaleScope, KronUpdateDecision};
use psgd::{
    AffineOptions, Kron, KronOptions, LeafSpec, LraOptions, MomentumWarmup, Options,
    Preconditioner, Psgd, PsgdState, RandomSource, Schedule, SeededRandom, Transform, UpdateRule,
    XMatOptions,
};

fn leaves() -> Vec<LeafSpec> {
    vec![
        LeafSpec::new("w", &[4, 3]),
        LeafSpec::new("b", &[5]),
        LeafSpec::new("s", &[]),
    ]
}

fn randn(shape: &[usize], seed: u64, step: u64, scale: f64) -> Tensor {
    let t = SeededRandom::for_step(seed, step)
        .normal(shape, &Device::Cpu)
        .unwrap();
    (t * scale).unwrap()
}

fn grads(leaves: &[LeafSpec], step: u64, scale: f64) -> Vec<Tensor> {
    leaves
        .iter()
        .enumerate()
        .map(|(i, l)| randn(&l.shape, 100 + i as u64, step, scale))
        .collect()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn params(leaves: &[LeafSpec]) -> Vec<Tensor> {
    leaves
        .iter()
        .map(|l| Tensor::zeros(l.shape.as_slice(), DType::F32, &Device::Cpu).unwrap())
        .collect()
}

/// One step from `state` with the seeded draws of step `step`.
fn step<P: Preconditioner>(
    opt: &Psgd<P>,
    state: &PsgdState<P::State>,
    g: &[Tensor],
    step: u64,
) -> (Vec<Tensor>, PsgdState<P::State>) {
    let mut rng = SeededRandom::for_step(77, step);
    let p = params(opt.leaves());
    opt.update_with(g, state, Some(&p), opt.hyper(state), None, &mut rng)
        .unwrap()
}

/// `updatePreconditionerFirst: false` is a manual apply-then-fit: its updates are those
/// of a step that does not fit (the preconditioner as it was), and its new
/// preconditioner is the one the default order fits (the same draws in the same order),
/// bit for bit; the default order's updates differ.
fn apply_then_fit<P: Preconditioner>(make: impl Fn(bool, f64) -> P::Options) {
    let leaves = leaves();
    let first = Psgd::<P>::new(leaves.clone(), make(true, 1.0)).unwrap();
    let last = Psgd::<P>::new(leaves.clone(), make(false, 1.0)).unwrap();
    let never = Psgd::<P>::new(leaves.clone(), make(true, 0.0)).unwrap();
    // a few ordinary steps first (XMat, LRA and Affine fit on their first two whatever p)
    let mut state = first.init(&params(&leaves)).unwrap();
    for t in 1..=3 {
        state = step(&first, &state, &grads(&leaves, t, 1.0), t).1;
    }
    let g = grads(&leaves, 4, 1.0);
    let (u_last, s_last) = step(&last, &state, &g, 4);
    let (u_first, s_first) = step(&first, &state, &g, 4);
    let (u_old, s_old) = step(&never, &state, &g, 4);
    for (a, b) in u_last.iter().zip(&u_old) {
        assert_eq!(
            vals(a),
            vals(b),
            "{}: updates from the old preconditioner",
            P::NAME
        );
    }
    assert!(
        u_last.iter().zip(&u_first).any(|(a, b)| vals(a) != vals(b)),
        "{}: the fit changed nothing",
        P::NAME
    );
    let bytes = |o: &Psgd<P>, s| o.state_to_bytes(s).unwrap();
    assert_eq!(
        bytes(&last, &s_last),
        bytes(&first, &s_first),
        "{}",
        P::NAME
    );
    assert_ne!(bytes(&last, &s_last), bytes(&never, &s_old), "{}", P::NAME);
    // the next step reads the fitted preconditioner
    let g5 = grads(&leaves, 5, 1.0);
    let (u5_last, _) = step(&last, &s_last, &g5, 5);
    let (u5_old, _) = step(&never, &s_first, &g5, 5);
    for (a, b) in u5_last.iter().zip(&u5_old) {
        assert_eq!(vals(a), vals(b), "{}: step 5", P::NAME);
    }
}

#[test]
fn update_preconditioner_first_false_is_apply_then_fit_on_every_variant() {
    for rule in [UpdateRule::Eq, UpdateRule::Pro, UpdateRule::Quad] {
        apply_then_fit::<psgd::kron::KronPreconditioner>(|first, p| KronOptions {
            update_rule: rule,
            update_preconditioner_first: first,
            preconditioner_update_probability: Some(Schedule::Constant(p)),
            ..Default::default()
        });
    }
    // the draw decision: the fit's draws come after the decision's in either order
    apply_then_fit::<psgd::kron::KronPreconditioner>(|first, p| KronOptions {
        update_rule: UpdateRule::Pro,
        update_decision: KronUpdateDecision::Draw,
        update_preconditioner_first: first,
        preconditioner_update_probability: Some(Schedule::Constant(p)),
        ..Default::default()
    });
    apply_then_fit::<psgd::xmat::XMatPreconditioner>(|first, p| XMatOptions {
        update_preconditioner_first: first,
        preconditioner_update_probability: Some(Schedule::Constant(p)),
        ..Default::default()
    });
    apply_then_fit::<psgd::lra::LraPreconditioner>(|first, p| LraOptions {
        update_preconditioner_first: first,
        preconditioner_update_probability: Some(Schedule::Constant(p)),
        ..Default::default()
    });
    apply_then_fit::<psgd::affine::AffinePreconditioner>(|first, p| AffineOptions {
        update_preconditioner_first: first,
        preconditioner_update_probability: Some(Schedule::Constant(p)),
        ..Default::default()
    });
}

/// Kron on [`leaves`] with `o`, in the given order (`updatePreconditionerFirst`) and at
/// a constant update probability `p`.
fn kron_in_order(first: bool, p: f64, o: KronOptions) -> Kron {
    let o = KronOptions {
        update_preconditioner_first: first,
        preconditioner_update_probability: Some(Schedule::Constant(p)),
        ..o
    };
    Kron::new(leaves(), o).unwrap()
}

/// In the fit-last order a Kron fit leaves its factors' grams formed (the next apply
/// reads them and has nothing left to prepare), under every rule, and a step from that
/// state gives the same updates, bit for bit, as a step from the same factors without
/// them (which forms them first).
#[test]
fn the_fit_last_order_leaves_the_grams_formed() {
    for rule in [UpdateRule::Eq, UpdateRule::Pro, UpdateRule::Quad] {
        let leaves = leaves();
        let rule_only = KronOptions {
            update_rule: rule,
            ..Default::default()
        };
        let (last, first) = (
            kron_in_order(false, 1.0, rule_only.clone()),
            kron_in_order(true, 1.0, rule_only),
        );
        let mut state = last.init(&params(&leaves)).unwrap();
        for t in 1..=2 {
            state = step(&last, &state, &grads(&leaves, t, 1.0), t).1;
            assert!(
                state.precond.ps.is_some(),
                "{rule:?}: step {t} left no grams"
            );
        }
        // the default order's fit leaves none (its next step may fit again)
        let (_, s_first) = step(&first, &state, &grads(&leaves, 3, 1.0), 3);
        assert!(s_first.precond.ps.is_none(), "{rule:?}");
        let mut bare = state.clone();
        bare.precond.ps = None;
        let g = grads(&leaves, 3, 1.0);
        let (u, _) = step(&last, &state, &g, 3);
        let (u_bare, _) = step(&last, &bare, &g, 3);
        for (a, b) in u.iter().zip(&u_bare) {
            assert_eq!(vals(a), vals(b), "{rule:?}");
        }
    }
}

/// With the automatic initial scale, the first step of the fit-last order still takes
/// the scale first: its updates are those of a step that scales and does not fit.
#[test]
fn the_automatic_scale_comes_first_in_either_order() {
    let leaves = leaves();
    let base = || KronOptions {
        preconditioner_init_scale: None,
        ..Default::default()
    };
    let last = kron_in_order(false, 1.0, base());
    let never = kron_in_order(true, 0.0, base());
    let state = last.init(&params(&leaves)).unwrap();
    let g = grads(&leaves, 1, 30.0);
    let (u_last, _) = step(&last, &state, &g, 1);
    let (u_old, _) = step(&never, &state, &g, 1);
    for (a, b) in u_last.iter().zip(&u_old) {
        assert_eq!(vals(a), vals(b));
    }
}

fn fitted(a: &psgd::KronState, b: &psgd::KronState) -> bool {
    a.precond
        .qs
        .iter()
        .flatten()
        .zip(b.precond.qs.iter().flatten())
        .any(|(x, y)| vals(x) != vals(y))
}

/// `updateDecision: 'cumulative'` fits on exactly the steps where `floor(Σp)` grows, with
/// a schedule too; the sum is saved and a loaded state goes on as the run did; a state
/// loads only into an optimizer with the same decision, and the error names both.
#[test]
fn cumulative_decision_fits_where_the_sum_crosses_an_integer_and_survives_save_load() {
    let leaves = leaves();
    let sched = Schedule::from_fn(|t| if t <= 4 { 0.4 } else { 0.3 });
    let o = KronOptions {
        update_decision: KronUpdateDecision::Cumulative,
        preconditioner_update_probability: Some(sched.clone()),
        ..Default::default()
    };
    let kron = Kron::new(leaves.clone(), o.clone()).unwrap();
    let mut state = kron.init(&params(&leaves)).unwrap();
    let (mut got, mut want, mut c) = (vec![], vec![], 0.0f64);
    let mut saved = None;
    for t in 1..=14u64 {
        let p = sched.at(t);
        if (c + p).floor() > c.floor() {
            want.push(t);
        }
        c += p;
        let (_, next) = step(&kron, &state, &grads(&leaves, t, 1.0), t);
        if fitted(&state, &next) {
            got.push(t);
        }
        assert_eq!(next.update_cumulative, c, "step {t}");
        state = next;
        if t == 6 {
            saved = Some((kron.state_to_bytes(&state).unwrap(), state.clone()));
        }
    }
    assert_eq!(got, want);
    assert!(want.len() >= 3 && want.len() < 14, "{want:?}");
    // load at step 6 and go on: the same fits and the same state
    let (bytes, at6) = saved.unwrap();
    let mut loaded = kron.state_from_bytes(&bytes, &Device::Cpu).unwrap();
    assert_eq!(loaded.update_cumulative, at6.update_cumulative);
    for t in 7..=14u64 {
        loaded = step(&kron, &loaded, &grads(&leaves, t, 1.0), t).1;
    }
    assert_eq!(
        kron.state_to_bytes(&loaded).unwrap(),
        kron.state_to_bytes(&state).unwrap()
    );
    // another decision refuses the state, naming both
    for (other, saved_as) in [
        (KronUpdateDecision::Counter, "cumulative"),
        (KronUpdateDecision::Draw, "cumulative"),
    ] {
        let o2 = KronOptions {
            update_decision: other,
            ..o.clone()
        };
        let k2 = Kron::new(leaves.clone(), o2).unwrap();
        let err = k2.state_from_bytes(&bytes, &Device::Cpu).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("updateDecision") && msg.contains(&format!("'{saved_as}'")),
            "{msg}"
        );
    }
    // a 'draw' state into a 'counter' optimizer, and back
    let draw = Kron::new(
        leaves.clone(),
        KronOptions {
            update_decision: KronUpdateDecision::Draw,
            ..Default::default()
        },
    )
    .unwrap();
    let counter = Kron::new(leaves.clone(), KronOptions::default()).unwrap();
    let st = draw.init(&params(&leaves)).unwrap();
    let msg = counter
        .state_from_bytes(&draw.state_to_bytes(&st).unwrap(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("updateDecision 'draw'") && msg.contains("updateDecision 'counter'"),
        "{msg}"
    );
    let msg = draw
        .state_from_bytes(&counter.state_to_bytes(&st).unwrap(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("updateDecision 'counter'") && msg.contains("updateDecision 'draw'"),
        "{msg}"
    );
}

/// No fit (probability 0), the identity preconditioner, no momentum, learning rate 1:
/// the update is minus the clipped gradient.
fn clipped(o: KronOptions, g: &[Tensor], leaves: &[LeafSpec]) -> Vec<Vec<f32>> {
    let kron = Kron::new(
        leaves.to_vec(),
        KronOptions {
            b1: 0.0,
            learning_rate: Schedule::Constant(1.0),
            preconditioner_update_probability: Some(Schedule::Constant(0.0)),
            ..o
        },
    )
    .unwrap();
    let state = kron.init(&params(leaves)).unwrap();
    let mut state = state;
    state.count = 1; // a learning rate of 1 from the first step on
    step(&kron, &state, g, 2)
        .0
        .iter()
        .map(|u| vals(u).iter().map(|v| -v).collect())
        .collect()
}

#[test]
fn the_update_clip_caps_the_rms_and_clamps_elements() {
    let leaves = vec![LeafSpec::new("w", &[8, 6])];
    let g = vec![randn(&[8, 6], 5, 1, 10.0)];
    let gv = vals(&g[0]);
    let rms = (gv.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / gv.len() as f64).sqrt();
    let rms_of =
        |u: &[f32]| (u.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / u.len() as f64).sqrt();
    // default: RMS 1.1
    let d = clipped(KronOptions::default(), &g, &leaves);
    assert!((rms_of(&d[0]) - 1.1).abs() < 1e-5, "{}", rms_of(&d[0]));
    // RMS 2, then each element at most 0.5 in magnitude
    let o = KronOptions {
        update_clip_rms: Some(2.0),
        update_clip_element: Some(0.5),
        ..Default::default()
    };
    let c = clipped(o, &g, &leaves);
    for (u, v) in c[0].iter().zip(&gv) {
        let want = ((*v as f64) * 2.0 / rms).clamp(-0.5, 0.5);
        assert!((*u as f64 - want).abs() < 1e-5, "{u} vs {want}");
    }
    assert!(c[0].iter().any(|u| u.abs() == 0.5));
    // no clip at all: the gradient itself
    let o = KronOptions {
        update_clip_rms: None,
        ..Default::default()
    };
    assert_eq!(clipped(o, &g, &leaves)[0], gv);
    // a small gradient is below both caps: untouched
    let small = vec![randn(&[8, 6], 5, 1, 0.01)];
    let o = KronOptions {
        update_clip_rms: Some(2.0),
        update_clip_element: Some(10.0),
        ..Default::default()
    };
    assert_eq!(clipped(o, &small, &leaves)[0], vals(&small[0]));
}

/// psgd_torch's warm-up: `β_t = min((t−1)/t, b1)`, no bias correction.
#[test]
fn psgd_torch_momentum_warmup_follows_its_formula() {
    let leaves = leaves();
    let o = KronOptions {
        momentum_warmup: MomentumWarmup::PsgdTorch,
        ..Default::default()
    };
    let kron = Kron::new(leaves.clone(), o).unwrap();
    let mut state = kron.init(&params(&leaves)).unwrap();
    let mut want: Vec<Vec<f64>> = leaves
        .iter()
        .map(|l| vec![0.0; l.shape.iter().product()])
        .collect();
    for t in 1..=12u64 {
        let g = grads(&leaves, t, 1.0);
        let beta = ((t as f64 - 1.0) / t as f64).min(0.9);
        for (w, g) in want.iter_mut().zip(&g) {
            for (m, g) in w.iter_mut().zip(vals(g)) {
                *m = beta * *m + (1.0 - beta) * g as f64;
            }
        }
        state = step(&kron, &state, &g, t).1;
        for (m, w) in state.mu.as_ref().unwrap().iter().zip(&want) {
            for (a, b) in vals(m).iter().zip(w) {
                assert!((*a as f64 - b).abs() < 1e-5, "step {t}: {a} vs {b}");
            }
        }
        if t == 1 {
            for (m, g) in state.mu.as_ref().unwrap().iter().zip(&g) {
                assert_eq!(vals(m), vals(g), "the first momentum is the gradient");
            }
        }
    }
}

/// The automatic initial scale per leaf or over all leaves, and its power: with no fit,
/// no momentum, no clip and learning rate 1, the first update is `−s^(2k)·g`.
#[test]
fn initial_scale_scope_and_power() {
    let leaves = vec![LeafSpec::new("w", &[4, 3]), LeafSpec::new("b", &[5])];
    let g = vec![randn(&[4, 3], 1, 1, 0.01), randn(&[5], 2, 1, 3.0)];
    let fourth = |t: &Tensor| {
        let v = vals(t);
        v.iter().map(|x| (*x as f64).powi(4)).sum::<f64>() / v.len() as f64
    };
    let scale = |m4: f64| (m4 + 1e-36).powf(-1.0 / 8.0);
    let per_leaf: Vec<f64> = g.iter().map(|g| scale(fourth(g))).collect();
    let global = scale(fourth(&g[0]).max(fourth(&g[1])));
    for (scope, power) in [
        (InitScaleScope::Leaf, 1.0),
        (InitScaleScope::Global, 1.0),
        (InitScaleScope::Leaf, 0.5),
        (InitScaleScope::Global, 0.5),
    ] {
        let kron = Kron::new(
            leaves.clone(),
            KronOptions {
                b1: 0.0,
                learning_rate: Schedule::Constant(1.0),
                preconditioner_update_probability: Some(Schedule::Constant(0.0)),
                update_clip_rms: None,
                preconditioner_init_scale: None,
                init_scale_scope: scope,
                init_scale_power: power,
                ..Default::default()
            },
        )
        .unwrap();
        let mut state = kron.init(&params(&leaves)).unwrap();
        state.count = 0;
        let mut rng = SeededRandom::for_step(1, 1);
        let mut hyper = kron.hyper(&state);
        hyper.learning_rate = 1.0;
        let (u, _) = kron
            .update_with(&g, &state, None, hyper, None, &mut rng)
            .unwrap();
        for (l, (u, g)) in u.iter().zip(&g).enumerate() {
            let s = match scope {
                InitScaleScope::Leaf => per_leaf[l],
                InitScaleScope::Global => global,
            };
            let want = s.powf(2.0 * power);
            for (a, b) in vals(u).iter().zip(vals(g)) {
                let r = -(*a as f64) / b as f64;
                assert!(
                    (r - want).abs() <= 1e-5 * want,
                    "{scope:?} power {power} leaf {l}: {r} vs {want}"
                );
            }
        }
    }
    // the two leaves' scales differ, so the scopes do
    assert!((per_leaf[0] / per_leaf[1] - 1.0).abs() > 0.5);
}

/// `maxSkew`: an axis is diagonal when `d² > maxSkew·N`; size-1 axes change nothing.
#[test]
fn max_skew_makes_long_axes_diagonal() {
    let shapes = |skew: Option<f64>, shape: &[usize]| -> Vec<Vec<usize>> {
        let kron = Kron::new(
            vec![LeafSpec::new("w", shape)],
            KronOptions {
                max_skew: skew,
                ..Default::default()
            },
        )
        .unwrap();
        let st = kron
            .init(&[Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()])
            .unwrap();
        st.precond.qs[0].iter().map(|q| q.dims().to_vec()).collect()
    };
    assert_eq!(shapes(None, &[6, 3]), vec![vec![6, 6], vec![3, 3]]);
    assert_eq!(shapes(Some(1.0), &[6, 3]), vec![vec![6], vec![3, 3]]);
    assert_eq!(shapes(Some(2.0), &[6, 3]), vec![vec![6, 6], vec![3, 3]]);
    assert_eq!(shapes(Some(1.0), &[4, 4]), vec![vec![4, 4], vec![4, 4]]);
    // squeezable: (1, 6, 3, 1) has the factors of (6, 3)
    assert_eq!(
        shapes(Some(1.0), &[1, 6, 3, 1]),
        vec![vec![1], vec![6], vec![3, 3], vec![1]]
    );
    // a bad value is refused, naming the option
    let mut obj = serde_json::Map::new();
    obj.insert("maxSkew".into(), serde_json::json!(-1.0));
    let err = KronOptions::from_json(&obj).unwrap_err().to_string();
    assert!(err.contains("maxSkew"), "{err}");
}

/// `regroup` keeps the cumulative sum as it keeps the counter: the sources' largest, at
/// most the new count; the result loads under `'cumulative'`.
#[test]
fn regroup_keeps_the_cumulative_sum() {
    use psgd::state_io::{regroup, LeafSource};
    let leaves = leaves();
    let kron = Kron::new(
        leaves.clone(),
        KronOptions {
            update_decision: KronUpdateDecision::Cumulative,
            preconditioner_update_probability: Some(Schedule::Constant(0.3)),
            ..Default::default()
        },
    )
    .unwrap();
    let fresh = kron.init(&params(&leaves)).unwrap();
    let mut state = fresh.clone();
    for t in 1..=5 {
        state = step(&kron, &state, &grads(&leaves, t, 1.0), t).1;
    }
    let picks: Vec<LeafSource> = (0..leaves.len())
        .map(|l| LeafSource {
            leaf: l,
            source: 0,
            source_leaf: l,
        })
        .collect();
    let saved = kron.state_to_bytes(&state).unwrap();
    let fresh = kron.state_to_bytes(&fresh).unwrap();
    for (count, want) in [(5, state.update_cumulative), (1, 1.0)] {
        let bytes = regroup(&fresh, &[&saved], &picks, None, count).unwrap();
        let back = kron.state_from_bytes(&bytes, &Device::Cpu).unwrap();
        assert_eq!(back.update_cumulative, want, "count {count}");
    }
}
