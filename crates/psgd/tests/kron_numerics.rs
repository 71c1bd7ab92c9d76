//! Kron's fit numerics (`normEstimator`, `damping`, `lipschitzBeta`, `procrustesMaxStep`,
//! `balanceProbability`, `balanceEvery`, `balanceWhen`) as a user sets them: defaults that
//! are the rule's own, every combination training, the state's bounds, the checks.

mod common;

use candle_core::{DType, Device, Tensor};
use psgd::{
    BalanceWhen, Kron, KronOptions, LeafSpec, NormEstimator, Options, RandomSource, Schedule,
    SeededRandom, Transform, UpdateRule,
};

use common::RULES;

/// A scalar, a vector, a matrix, a 3-D leaf and 3 scanned layers of 4×5 (fitted 2 layers
/// at a time).
fn leaves() -> Vec<LeafSpec> {
    let mut layers = LeafSpec::new("layers", &[3, 4, 5]);
    layers.scanned = true;
    vec![
        LeafSpec::new("s", &[]),
        LeafSpec::new("v", &[5]),
        LeafSpec::new("m", &[4, 3]),
        LeafSpec::new("t", &[2, 3, 4]),
        layers,
    ]
}

fn base(rule: UpdateRule) -> KronOptions {
    KronOptions {
        update_rule: rule,
        preconditioner_update_probability: Some(Schedule::Constant(1.0)),
        lax_map_scanned_layers: true,
        lax_map_batch_size: 2,
        ..Default::default()
    }
}

/// `steps` steps on fixed pseudo-random gradients, in the Newton form when `newton` (each
/// step also fits to a probe `v` and `0.5·v + 0.1·v²` in place of its Hessian-vector
/// product); returns every update and the state's bytes.
fn run_form(o: KronOptions, steps: u64, newton: bool) -> (Vec<Vec<f32>>, Vec<u8>) {
    let dev = Device::Cpu;
    let leaves = leaves();
    let params: Vec<Tensor> = leaves
        .iter()
        .map(|l| Tensor::ones(l.shape.as_slice(), DType::F32, &dev).unwrap())
        .collect();
    let kron = Kron::new(leaves, o).unwrap();
    let mut state = kron.init(&params).unwrap();
    let mut out = vec![];
    for k in 0..steps {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| SeededRandom::for_step(k, 7).normal(p.dims(), &dev).unwrap())
            .collect();
        let (u, s) = if newton {
            common::newton_step(&kron, &grads, &state, &params, k, |v| {
                ((v * 0.5).unwrap() + (v.sqr().unwrap() * 0.1).unwrap()).unwrap()
            })
            .unwrap()
        } else {
            kron.update(&grads, &state, Some(&params)).unwrap()
        };
        for t in &u {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
            out.push(v);
        }
        state = s;
    }
    let bytes = kron.state_to_bytes(&state).unwrap();
    (out, bytes)
}

/// Every option left null is the rule's own: spelled out, psgd-jax's EQ numerics and
/// psgd_torch's numerics of every other rule (QEP's balance before every fit) give the
/// same bits as the defaults, in the whitening and the Newton form.
#[test]
fn null_options_are_the_rules_own_numerics() {
    for newton in [false, true] {
        let jax = KronOptions {
            norm_estimator: Some(NormEstimator::RowNorm),
            balance_probability: Some(0.01),
            balance_when: Some(BalanceWhen::BeforeFit),
            procrustes_max_step: 0.125,
            ..base(UpdateRule::Eq)
        };
        assert_eq!(
            run_form(jax, 6, newton),
            run_form(base(UpdateRule::Eq), 6, newton)
        );
        for rule in RULES.into_iter().skip(1) {
            let qep = rule == UpdateRule::Qep;
            let torch = KronOptions {
                norm_estimator: Some(NormEstimator::Subspace),
                damping: Some(1e-9),
                lipschitz_beta: Some(0.9),
                balance_probability: (!qep).then_some(0.01),
                balance_every: qep.then_some(1),
                balance_when: Some(if qep {
                    BalanceWhen::BeforeFit
                } else {
                    BalanceWhen::AfterFit
                }),
                ..base(rule)
            };
            assert_eq!(
                run_form(torch, 6, newton),
                run_form(base(rule), 6, newton),
                "{rule:?} newton {newton}"
            );
        }
    }
}

/// Each option changes the run where it should (so none is silently ignored), and every
/// combination of rule, estimator, damping, bound and balancing trains with finite
/// updates on every leaf kind, scanned layers included, under every rule in the whitening
/// form (each option's effect also in the Newton form).
#[test]
fn every_combination_trains_and_each_option_acts() {
    let estimators = [
        NormEstimator::RowNorm,
        NormEstimator::Subspace,
        NormEstimator::Power,
    ];
    for (rule, newton) in RULES.into_iter().flat_map(|r| [(r, false), (r, true)]) {
        let run = |o: KronOptions, steps: u64| run_form(o, steps, newton);
        let (reference, _) = run(base(rule), 4);
        for est in estimators {
            for (damping, beta) in [(None, None), (Some(1e-3), Some(0.5))] {
                for (every, when) in [
                    (None, BalanceWhen::BeforeFit),
                    (Some(1), BalanceWhen::BeforeFit),
                    (Some(2), BalanceWhen::AfterFit),
                ] {
                    if newton {
                        continue;
                    }
                    let o = KronOptions {
                        norm_estimator: Some(est),
                        damping,
                        lipschitz_beta: beta,
                        balance_every: every,
                        balance_when: Some(when),
                        procrustes_max_step: 0.5,
                        ..base(rule)
                    };
                    run(o, 4);
                }
            }
        }
        let differs = |o: KronOptions, what: &str| {
            assert_ne!(
                run(o, 4).0,
                reference,
                "{rule:?} newton {newton}: {what} changed nothing"
            );
        };
        if rule == UpdateRule::Qep {
            // QEP's fit depends on its factors' balance: never balancing is not its own
            differs(
                KronOptions {
                    balance_probability: Some(0.0),
                    ..base(rule)
                },
                "balanceProbability",
            );
        }
        let own = if rule == UpdateRule::Eq {
            NormEstimator::RowNorm
        } else {
            NormEstimator::Subspace
        };
        for est in estimators.into_iter().filter(|e| *e != own) {
            differs(
                KronOptions {
                    norm_estimator: Some(est),
                    ..base(rule)
                },
                "normEstimator",
            );
        }
        differs(
            KronOptions {
                damping: Some(0.1),
                ..base(rule)
            },
            "damping",
        );
        differs(
            KronOptions {
                lipschitz_beta: Some(if rule == UpdateRule::Eq { 0.9 } else { 0.0 }),
                ..base(rule)
            },
            "lipschitzBeta",
        );
    }
}

/// Under EQ a number `lipschitzBeta` keeps a bound per factor in the state (saved as
/// `L.<leaf>.<axis>`); a state with bounds does not load into an optimizer that keeps
/// none, nor the other way round, and the message says why.
#[test]
fn eq_bounds_are_saved_and_refused_by_the_other_configuration() {
    let dev = Device::Cpu;
    let leaves = vec![LeafSpec::new("w", &[3, 4])];
    let params = vec![Tensor::ones((3, 4), DType::F32, &dev).unwrap()];
    let with = Kron::new(
        leaves.clone(),
        KronOptions {
            lipschitz_beta: Some(0.9),
            ..base(UpdateRule::Eq)
        },
    )
    .unwrap();
    let without = Kron::new(leaves, base(UpdateRule::Eq)).unwrap();
    let g = vec![SeededRandom::for_step(0, 1).normal(&[3, 4], &dev).unwrap()];
    let state = with.init(&params).unwrap();
    let state = with.update(&g, &state, Some(&params)).unwrap().1;
    let ls = &state.precond.ls[0];
    assert_eq!(ls.len(), 2);
    for l in ls {
        assert!(l.to_vec1::<f32>().unwrap()[0] > 0.0);
    }
    let bytes = with.state_to_bytes(&state).unwrap();
    let loaded = with.state_from_bytes(&bytes, &dev).unwrap();
    assert_eq!(with.state_to_bytes(&loaded).unwrap(), bytes);
    let err = without
        .state_from_bytes(&bytes, &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("L.0.0"), "{err}");
    let plain = without
        .state_to_bytes(&without.init(&params).unwrap())
        .unwrap();
    let err = with.state_from_bytes(&plain, &dev).unwrap_err().to_string();
    assert!(err.contains("L.0.0"), "{err}");
}

/// Out-of-range values are refused naming the option; both balancing triggers at once
/// are refused.
#[test]
fn numerics_options_are_checked() {
    let read = |v: serde_json::Value| KronOptions::from_json(v.as_object().unwrap());
    for (v, name) in [
        (
            serde_json::json!({ "procrustesMaxStep": 0.0 }),
            "procrustesMaxStep",
        ),
        (
            serde_json::json!({ "procrustesMaxStep": 1.5 }),
            "procrustesMaxStep",
        ),
        (serde_json::json!({ "balanceEvery": 0 }), "balanceEvery"),
        (
            serde_json::json!({ "balanceProbability": 1.5 }),
            "balanceProbability",
        ),
        (serde_json::json!({ "damping": -1.0 }), "damping"),
        (
            serde_json::json!({ "normEstimator": "exact" }),
            "normEstimator",
        ),
        (
            serde_json::json!({ "balanceWhen": "always" }),
            "balanceWhen",
        ),
        (serde_json::json!({ "lipschitzBeta": 1.0 }), "lipschitzBeta"),
    ] {
        let err = read(v.clone()).unwrap_err().to_string();
        assert!(err.contains(name), "{v}: {err}");
    }
    let o =
        read(serde_json::json!({ "normEstimator": "power", "balanceWhen": "afterFit" })).unwrap();
    assert_eq!(o.norm_estimator, Some(NormEstimator::Power));
    assert_eq!(o.balance_when, Some(BalanceWhen::AfterFit));
    let both = KronOptions {
        balance_every: Some(1),
        balance_probability: Some(0.5),
        ..Default::default()
    };
    let err = Kron::new(leaves(), both).unwrap_err().to_string();
    assert!(
        err.contains("balanceEvery") && err.contains("balanceProbability"),
        "{err}"
    );
}
