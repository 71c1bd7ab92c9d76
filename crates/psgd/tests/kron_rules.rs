//! Kron's update rules (`updateRule`): psgd-jax's EQ and psgd_torch's inverse-free
//! `Q0.5EQ1.5` (PRO), `QUAD`, `QEQ`, `QEP`, `PRO4P` and `QUAD4P`, as a user runs them:
//! whitening a gradient of known covariance, fitting a known Hessian (the Newton form),
//! state bytes, every leaf kind, scanned layers, training.

use candle_core::{DType, Device, Tensor};
use psgd::{
    Curvature, Kron, KronOptions, LeafSpec, RandomSource, Schedule, SeededRandom, Transform,
    UpdateRule,
};

const RULES: [UpdateRule; 7] = [
    UpdateRule::Eq,
    UpdateRule::Pro,
    UpdateRule::Quad,
    UpdateRule::Qeq,
    UpdateRule::Qep,
    UpdateRule::Pro4p,
    UpdateRule::Quad4p,
];

/// A factor's contribution to `P`: `QᵀQ`, or the factor itself under the 4P rules
/// (float64).
fn factor_of_p(rule: UpdateRule, q: &Tensor) -> Tensor {
    let q = q.to_dtype(DType::F64).unwrap();
    if rule.fits_p() {
        q
    } else {
        q.t().unwrap().matmul(&q).unwrap()
    }
}

fn options(rule: UpdateRule) -> KronOptions {
    KronOptions {
        update_rule: rule,
        preconditioner_update_probability: Some(Schedule::Constant(1.0)),
        ..Default::default()
    }
}

/// A float64 matrix from a function of its indices.
fn matrix(n: usize, f: impl Fn(usize, usize) -> f64) -> Tensor {
    let v: Vec<f64> = (0..n * n).map(|k| f(k / n, k % n)).collect();
    Tensor::from_vec(v, (n, n), &Device::Cpu).unwrap()
}

/// `‖(P₁C₁P₁) ⊗ (P₂C₂P₂) − I‖_F / √n`: how far `P·C·P` is from the identity for a
/// Kronecker covariance `C = C₁ ⊗ C₂` and preconditioner `P = P₁ ⊗ P₂` (float64).
fn whitening_distance(ps: &[Tensor], cs: &[Tensor]) -> f64 {
    let ms: Vec<Tensor> = ps
        .iter()
        .zip(cs)
        .map(|(p, c)| p.matmul(c).unwrap().matmul(p).unwrap())
        .collect();
    let scalar = |t: Tensor| t.to_scalar::<f64>().unwrap();
    let fro2 = |m: &Tensor| scalar(m.sqr().unwrap().sum_all().unwrap());
    let trace = |m: &Tensor| {
        let eye = matrix(m.dim(0).unwrap(), |i, j| f64::from(i == j));
        scalar((m * eye).unwrap().sum_all().unwrap())
    };
    let n = (ms[0].dim(0).unwrap() * ms[1].dim(0).unwrap()) as f64;
    let d2 = fro2(&ms[0]) * fro2(&ms[1]) - 2.0 * trace(&ms[0]) * trace(&ms[1]) + n;
    (d2.max(0.0) / n).sqrt()
}

/// Gradients `G = A₁ Z A₂ᵀ` (Z standard normal) of an 8×4 leaf have the covariance
/// `C₁ ⊗ C₂` with `Cᵢ = AᵢAᵢᵀ`; fitting on them, every rule whitens: `P·C·P` gets close
/// to `I`, at two fit step sizes; the inverse-free rules end closer to `I` than EQ. The
/// distances per rule and step count are printed (`--nocapture`).
#[test]
fn every_rule_whitens_a_kronecker_covariance() {
    let dev = Device::Cpu;
    let a1 = matrix(8, |i, j| {
        if i == j {
            1.0 + 0.25 * i as f64
        } else {
            0.3 * ((i * 3 + j * 5) % 7) as f64 / 7.0
        }
    });
    let a2 = matrix(4, |i, j| {
        if i == j {
            2.0 - 0.3 * i as f64
        } else {
            0.2 * ((i + 2 * j) % 3) as f64
        }
    });
    let cs = [&a1, &a2].map(|a| a.matmul(&a.t().unwrap()).unwrap());
    let eyes = [8, 4].map(|n| matrix(n, |i, j| f64::from(i == j)));
    let start = whitening_distance(&eyes, &cs);
    let steps = 3000;
    for lr in [0.1, 0.3] {
        let mut late_by_rule = vec![];
        for rule in RULES {
            let o = KronOptions {
                b1: 0.0,
                momentum_into_precond_update: false,
                learning_rate: Schedule::Constant(0.0),
                preconditioner_lr: lr,
                ..options(rule)
            };
            let kron = Kron::new(vec![LeafSpec::new("w", &[8, 4])], o).unwrap();
            let params = vec![Tensor::zeros((8, 4), DType::F32, &dev).unwrap()];
            let mut state = kron.init(&params).unwrap();
            let mut dists = vec![];
            for step in 1..=steps {
                let z = SeededRandom::for_step(7, step as u64)
                    .normal(&[8, 4], &dev)
                    .unwrap();
                let z = z.to_dtype(DType::F64).unwrap();
                let g = a1.matmul(&z).unwrap().matmul(&a2.t().unwrap()).unwrap();
                let g = g.to_dtype(DType::F32).unwrap();
                state = kron.update(&[g], &state, Some(&params)).unwrap().1;
                let ps: Vec<Tensor> = state.precond.qs[0]
                    .iter()
                    .map(|q| factor_of_p(rule, q))
                    .collect();
                dists.push(whitening_distance(&ps, &cs));
            }
            let first_below = |x: f64| dists.iter().position(|&d| d < x).map(|i| i + 1);
            let mean =
                |r: std::ops::Range<usize>| dists[r.clone()].iter().sum::<f64>() / r.len() as f64;
            let (reach, late) = (first_below(0.5), mean(1000..steps));
            eprintln!(
                "whitening {rule:?} (preconditionerLr {lr}, from {start:.2}): after \
                 10/20/50/100 fits {:.3}/{:.3}/{:.3}/{:.3}; first below 0.5 at fit {reach:?}; \
                 mean over fits 1001-3000 {late:.3}",
                dists[9], dists[19], dists[49], dists[99]
            );
            assert!(start > 10.0);
            assert!(
                reach.is_some_and(|n| n <= 100),
                "{rule:?}, lr {lr}: first below 0.5 at {reach:?}"
            );
            assert!(late < 1.0, "{rule:?}, lr {lr}: mean distance {late}");
            late_by_rule.push(late);
        }
        // the inverse-free rules settle closer to white than EQ at the same step size
        assert!(
            late_by_rule[1] < late_by_rule[0] && late_by_rule[2] < late_by_rule[0],
            "lr {lr}: {late_by_rule:?}"
        );
    }
}

/// One step of `kron`: whitening, or the Newton form with the probe `v` and the product
/// `h ⊙ v` of a fixed diagonal curvature (`newton`).
fn step_form(
    kron: &Kron,
    grads: &[Tensor],
    state: &psgd::KronState,
    params: &[Tensor],
    newton: bool,
    k: u64,
) -> psgd::Result<(Vec<Tensor>, psgd::KronState)> {
    if !newton {
        return kron.update(grads, state, Some(params));
    }
    let dev = Device::Cpu;
    let vector: Vec<Tensor> = params
        .iter()
        .map(|p| {
            SeededRandom::for_step(k, 17)
                .normal(p.dims(), &dev)
                .unwrap()
        })
        .collect();
    let hvp = vector
        .iter()
        .map(|v| {
            let n = v.elem_count();
            let h = Tensor::arange(0f32, n as f32, &dev).unwrap();
            let h = ((h * 0.1).unwrap() + 0.5)
                .unwrap()
                .reshape(v.dims())
                .unwrap();
            (v * h).unwrap()
        })
        .collect();
    let c = Curvature {
        hvp,
        vector,
        update_preconditioner: true,
    };
    let mut rng = SeededRandom::for_step(99, k);
    kron.update_with(
        grads,
        state,
        Some(params),
        kron.hyper(state),
        Some(&c),
        &mut rng,
    )
}

/// A scanned 2-D leaf (3 layers), a 3-D leaf with one diagonal axis, a 1-D leaf and a
/// scalar, under each rule, in both forms (whitening and Newton) and with and without
/// `memorySaveMode`: finite updates, the Lipschitz bounds (every rule but EQ) positive,
/// and the state bytes round-trip bit for bit and continue identically.
#[test]
fn every_leaf_kind_runs_and_the_state_round_trips_under_every_rule() {
    let dev = Device::Cpu;
    let mut scanned = LeafSpec::new("layers", &[3, 4, 5]);
    scanned.scanned = true;
    let leaves = vec![
        scanned,
        LeafSpec::new("conv", &[2, 3, 40]),
        LeafSpec::new("bias", &[6]),
        LeafSpec::new("scale", &[]),
    ];
    let params: Vec<Tensor> = leaves
        .iter()
        .enumerate()
        .map(|(k, l)| {
            SeededRandom::for_step(11, k as u64)
                .normal(&l.shape, &dev)
                .unwrap()
        })
        .collect();
    let forms = [
        (false, None),
        (true, None),
        (false, Some(psgd::MemorySaveMode::OneDiag)),
    ];
    for rule in RULES {
        for (newton, memory_save_mode) in forms {
            let case = format!("{rule:?} newton {newton} {memory_save_mode:?}");
            let o = KronOptions {
                max_size_triangular: 32,
                lax_map_scanned_layers: true,
                lax_map_batch_size: 2,
                memory_save_mode,
                ..options(rule)
            };
            let kron = Kron::new(leaves.clone(), o).unwrap();
            let grads = |k: u64| -> Vec<Tensor> {
                params
                    .iter()
                    .map(|p| {
                        let n = SeededRandom::for_step(k, 5).normal(p.dims(), &dev).unwrap();
                        (p + (n * 0.1).unwrap()).unwrap()
                    })
                    .collect()
            };
            let mut state = kron.init(&params).unwrap();
            for k in 0..4 {
                let (u, s) = step_form(&kron, &grads(k), &state, &params, newton, k)
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
                for t in &u {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert!(v.iter().all(|x| x.is_finite()), "{case}: {v:?}");
                }
                state = s;
            }
            let ls = &state.precond.ls;
            if rule == UpdateRule::Eq {
                assert!(ls.iter().all(|l| l.is_empty()));
            } else {
                assert_eq!(ls.iter().map(|l| l.len()).collect::<Vec<_>>(), [2, 3, 1, 1]);
                for (l, b) in ls.iter().zip([3usize, 1, 1, 1]) {
                    for t in l {
                        let v = t.to_vec1::<f32>().unwrap();
                        assert_eq!(v.len(), b);
                        assert!(v.iter().all(|x| *x > 0.0), "{case}: {v:?}");
                    }
                }
                // the dense factors are full, not triangular (axis 1 of `conv` is dense
                // unless memorySaveMode made the largest axis, 2, diagonal)
                let q = state.precond.qs[1][2].to_vec2::<f32>().unwrap_or_default();
                let q0 = state.precond.qs[1][1].to_vec2::<f32>().unwrap();
                assert!(q.is_empty(), "axis 2 of 40 > 32 is diagonal");
                assert!(q0[1][0] != 0.0, "{case}: {q0:?}");
            }
            let bytes = kron.state_to_bytes(&state).unwrap();
            let loaded = kron.state_from_bytes(&bytes, &dev).unwrap();
            assert_eq!(kron.state_to_bytes(&loaded).unwrap(), bytes, "{case}");
            let values = |u: &[Tensor]| -> Vec<Vec<f32>> {
                u.iter()
                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .collect()
            };
            let (u1, s1) = step_form(&kron, &grads(9), &state, &params, newton, 9).unwrap();
            let (u2, s2) = step_form(&kron, &grads(9), &loaded, &params, newton, 9).unwrap();
            assert_eq!(values(&u1), values(&u2), "{case}");
            assert_eq!(
                kron.state_to_bytes(&s1).unwrap(),
                kron.state_to_bytes(&s2).unwrap(),
                "{case}"
            );
        }
    }
}

/// A source whose every draw depends only on the position of the value within a period
/// of 4: a `(B, …)` draw for scanned layers then holds, for each layer, what a draw for
/// that layer alone holds, so a scanned leaf and its layers as separate leaves see the
/// same numbers (and the count of draws does not matter). Uniform draws are 0.5.
struct Periodic;

impl RandomSource for Periodic {
    fn uniform(&mut self) -> psgd::Result<f32> {
        Ok(0.5)
    }
    fn normal(&mut self, shape: &[usize], device: &Device) -> psgd::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|k| [0.9, -1.3, 0.4, -0.2][k % 4]).collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

/// A scanned leaf's layers equal the same layers run as separate leaves, under every
/// inverse-free rule and both forms (with draws that agree between the two layouts, see
/// [`Periodic`]). EQ is psgd-jax's, whose damping `sqrt(eps)·mean|g|` takes the mean over
/// all the layers of a scanned leaf, so its layers are not independent there.
#[test]
fn scanned_layers_equal_separate_leaves_under_every_rule_and_form() {
    let dev = Device::Cpu;
    let (b, shape) = (3usize, [4usize, 6]);
    let mut spec = LeafSpec::new("layers", &[b, shape[0], shape[1]]);
    spec.scanned = true;
    let separate: Vec<LeafSpec> = (0..b)
        .map(|i| LeafSpec::new(format!("l{i}"), &shape))
        .collect();
    let stacked = SeededRandom::for_step(4, 4)
        .normal(&[b, shape[0], shape[1]], &dev)
        .unwrap();
    let layers: Vec<Tensor> = (0..b).map(|i| stacked.get(i).unwrap()).collect();
    let curvature = |xs: &[Tensor]| Curvature {
        hvp: xs.iter().map(|x| (x * 1.5).unwrap()).collect(),
        vector: xs.to_vec(),
        update_preconditioner: true,
    };
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for rule in &RULES[1..] {
        let rule = *rule;
        for newton in [false, true] {
            let o = KronOptions {
                max_size_triangular: 5,
                ..options(rule)
            };
            let one = Kron::new(vec![spec.clone()], o.clone()).unwrap();
            let many = Kron::new(separate.clone(), o).unwrap();
            let mut s1 = one.init(std::slice::from_ref(&stacked)).unwrap();
            let mut s2 = many.init(&layers).unwrap();
            for k in 0..3 {
                let g1 = vec![(&stacked * (1.0 + k as f64)).unwrap()];
                let g2: Vec<Tensor> = layers
                    .iter()
                    .map(|l| (l * (1.0 + k as f64)).unwrap())
                    .collect();
                let (c1, c2) = (curvature(&g1), curvature(&g2));
                let h1 = one.hyper(&s1);
                let (u1, n1) = one
                    .update_with(&g1, &s1, None, h1, newton.then_some(&c1), &mut Periodic)
                    .unwrap();
                let h2 = many.hyper(&s2);
                let (u2, n2) = many
                    .update_with(&g2, &s2, None, h2, newton.then_some(&c2), &mut Periodic)
                    .unwrap();
                // the factors and bounds of each layer, and (before the clip acts: this
                // package caps the RMS of a whole leaf, all its layers together) the
                // updates
                let mut pairs = vec![];
                for (i, u) in u2.iter().enumerate() {
                    let (fa, fb) = (&n1.precond, &n2.precond);
                    for (qa, qb) in fa.qs[0].iter().zip(&fb.qs[i]) {
                        pairs.push(("factor", flat(&qa.get(i).unwrap()), flat(qb)));
                    }
                    for (la, lb) in fa.ls[0].iter().zip(&fb.ls[i]) {
                        pairs.push(("bound", flat(&la.get(i).unwrap()), flat(lb)));
                    }
                    if k == 0 {
                        pairs.push(("update", flat(&u1[0].get(i).unwrap()), flat(u)));
                    }
                }
                for (what, a, c) in pairs {
                    let scale = c.iter().fold(0f32, |m, x| m.max(x.abs()));
                    for (x, y) in a.iter().zip(&c) {
                        assert!(
                            (x - y).abs() <= 1e-5 * scale,
                            "{rule:?} newton {newton} step {k} {what}: {a:?} vs {c:?}"
                        );
                    }
                }
                (s1, s2) = (n1, n2);
            }
        }
    }
}

/// The Newton form fits `P` to the inverse of the Hessian: on a quadratic whose Hessian is
/// `H = H₁ ⊗ H₂` (a 4×3 leaf), with probes `v` and exact products `H·v`, the fitted
/// `P = P₁ ⊗ P₂` gets close to `H⁻¹` under every rule. The relative distance
/// `‖P·H − I‖_F / √n` after each number of fits is printed (`--nocapture`).
#[test]
fn the_newton_form_fits_the_inverse_hessian_under_every_rule() {
    let dev = Device::Cpu;
    let h1 = matrix(4, |i, j| if i == j { 1.0 + i as f64 } else { 0.3 });
    let h2 = matrix(3, |i, j| {
        if i == j {
            0.5 * (1.0 + 2.0 * j as f64)
        } else {
            0.1
        }
    });
    let scalar = |t: Tensor| t.to_scalar::<f64>().unwrap();
    let fro2 = |m: &Tensor| scalar(m.sqr().unwrap().sum_all().unwrap());
    let trace = |m: &Tensor| {
        let eye = matrix(m.dim(0).unwrap(), |i, j| f64::from(i == j));
        scalar((m * eye).unwrap().sum_all().unwrap())
    };
    for rule in RULES {
        let o = KronOptions {
            b1: 0.0,
            learning_rate: Schedule::Constant(0.0),
            preconditioner_lr: 0.2,
            ..options(rule)
        };
        let kron = Kron::new(vec![LeafSpec::new("w", &[4, 3])], o).unwrap();
        let params = vec![Tensor::zeros((4, 3), DType::F32, &dev).unwrap()];
        let mut state = kron.init(&params).unwrap();
        let mut dists = vec![];
        for k in 0..400u64 {
            let v = SeededRandom::for_step(21, k).normal(&[4, 3], &dev).unwrap();
            let v64 = v.to_dtype(DType::F64).unwrap();
            // (H₁ ⊗ H₂)·vec(V) = H₁·V·H₂ (both symmetric), row-major
            let hv = h1.matmul(&v64).unwrap().matmul(&h2).unwrap();
            let c = Curvature {
                hvp: vec![hv.to_dtype(DType::F32).unwrap()],
                vector: vec![v],
                update_preconditioner: true,
            };
            let mut rng = SeededRandom::for_step(22, k);
            let hyper = kron.hyper(&state);
            state = kron
                .update_with(&params, &state, None, hyper, Some(&c), &mut rng)
                .unwrap()
                .1;
            let ps: Vec<Tensor> = state.precond.qs[0]
                .iter()
                .map(|q| factor_of_p(rule, q))
                .collect();
            // ‖(P₁H₁) ⊗ (P₂H₂) − I‖_F / √n from the two small products
            let (m1, m2) = (ps[0].matmul(&h1).unwrap(), ps[1].matmul(&h2).unwrap());
            let d2 = fro2(&m1) * fro2(&m2) - 2.0 * trace(&m1) * trace(&m2) + 12.0;
            dists.push((d2.max(0.0) / 12.0).sqrt());
        }
        eprintln!(
            "newton {rule:?}: |P·H − I|/√n after 1/10/50/100/400 fits \
             {:.3}/{:.3}/{:.3}/{:.3}/{:.3}",
            dists[0], dists[9], dists[49], dists[99], dists[399]
        );
        let late = dists[300..].iter().sum::<f64>() / 100.0;
        assert!(dists[0] > 0.5, "{rule:?}: starts at {}", dists[0]);
        assert!(
            late < 0.25,
            "{rule:?}: mean distance over the last 100 fits {late}"
        );
    }
}

/// A state saved under one rule does not load into an optimizer with another (any pair
/// of the seven rules): the Lipschitz bounds are missing or left over, or the state names
/// the rule that wrote it, and the error says so.
#[test]
fn a_state_of_another_rule_is_refused() {
    let dev = Device::Cpu;
    let leaves = vec![LeafSpec::new("w", &[3, 4])];
    let params = vec![Tensor::ones((3, 4), DType::F32, &dev).unwrap()];
    let eq = Kron::new(leaves.clone(), options(UpdateRule::Eq)).unwrap();
    let pro = Kron::new(leaves.clone(), options(UpdateRule::Pro)).unwrap();
    let eq_bytes = eq.state_to_bytes(&eq.init(&params).unwrap()).unwrap();
    let err = pro
        .state_from_bytes(&eq_bytes, &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("L.0.0"), "{err}");
    let pro_bytes = pro.state_to_bytes(&pro.init(&params).unwrap()).unwrap();
    assert!(eq.state_from_bytes(&pro_bytes, &dev).is_err());
    let make = |rule| Kron::new(leaves.clone(), options(rule)).unwrap();
    for saved in RULES {
        let k = make(saved);
        let bytes = k.state_to_bytes(&k.init(&params).unwrap()).unwrap();
        for load in RULES {
            let got = make(load).state_from_bytes(&bytes, &dev);
            if saved == load {
                assert!(got.is_ok(), "{saved:?}");
                continue;
            }
            let err = got.unwrap_err().to_string();
            assert!(
                err.contains("updateRule") || err.contains("L.0.0"),
                "{saved:?} into {load:?}: {err}"
            );
        }
    }
}

/// The rule's spellings: `'PRO'` is `'Q0.5EQ1.5'`; an unknown one is a TypeError naming
/// `updateRule` and listing the valid names; `lipschitzBeta` outside [0, 1) is refused.
#[test]
fn update_rule_names_and_lipschitz_beta_are_checked() {
    use psgd::Options;
    let read = |v: serde_json::Value| {
        KronOptions::from_json(v.as_object().unwrap()).map(|o| (o.update_rule, o.lipschitz_beta))
    };
    assert_eq!(read(serde_json::json!({})).unwrap(), (UpdateRule::Eq, 0.9));
    for (name, rule) in [
        ("EQ", UpdateRule::Eq),
        ("Q0.5EQ1.5", UpdateRule::Pro),
        ("PRO", UpdateRule::Pro),
        ("QUAD", UpdateRule::Quad),
        ("QEQ", UpdateRule::Qeq),
        ("QEP", UpdateRule::Qep),
        ("PRO4P", UpdateRule::Pro4p),
        ("QUAD4P", UpdateRule::Quad4p),
    ] {
        assert_eq!(
            read(serde_json::json!({ "updateRule": name })).unwrap().0,
            rule
        );
    }
    let err = read(serde_json::json!({ "updateRule": "pro" }))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("updateRule") && err.contains("'Q0.5EQ1.5'"),
        "{err}"
    );
    for bad in [1.0, -0.1] {
        let err = read(serde_json::json!({ "lipschitzBeta": bad }))
            .unwrap_err()
            .to_string();
        assert!(err.contains("lipschitzBeta"), "{err}");
    }
}

/// With `laxMapScannedLayers`, a step that does not fit the factors applies the kept
/// grams to each slice of layers, whatever the rule (a slice is fewer layers than the
/// leaf has).
#[test]
fn apply_only_steps_run_on_slices_of_scanned_layers() {
    let dev = Device::Cpu;
    let mut scanned = LeafSpec::new("layers", &[3, 4, 5]);
    scanned.scanned = true;
    let params = vec![SeededRandom::for_step(1, 1)
        .normal(&[3, 4, 5], &dev)
        .unwrap()];
    for rule in RULES {
        let o = KronOptions {
            lax_map_scanned_layers: true,
            lax_map_batch_size: 2,
            preconditioner_update_probability: Some(Schedule::Constant(0.0)),
            ..options(rule)
        };
        let kron = Kron::new(vec![scanned.clone()], o).unwrap();
        let mut state = kron.init(&params).unwrap();
        for _ in 0..2 {
            let (u, s) = kron
                .update(&params, &state, Some(&params))
                .unwrap_or_else(|e| panic!("{rule:?}: {e}"));
            let v = u[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
            state = s;
        }
    }
}

/// The recorded draws of one PRO fit of a `[3, 4]` leaf (both factors dense), as
/// psgd_torch makes them: ν, then per factor the norm-bound and Procrustes subspaces,
/// then the balance decision.
fn pro_fit_draws() -> Vec<psgd::random::Draw> {
    use psgd::random::Draw;
    let normal = |shape: &[usize]| Draw::Normal {
        shape: shape.to_vec(),
        data: (0..shape.iter().product::<usize>())
            .map(|k| ((k * 7 % 11) as f32 - 5.0) / 5.0)
            .collect(),
    };
    vec![
        normal(&[3, 4]),
        normal(&[32, 3]),
        normal(&[32, 3]),
        normal(&[32, 4]),
        normal(&[32, 4]),
        Draw::Uniform(0.5),
    ]
}

/// `updateDecision: 'draw'` takes one uniform at the start of every step, even at
/// probability 1, and fits when it is below the probability (not on the first steps
/// regardless, as XMat's draw does); `'counter'` (the default) draws nothing for the
/// decision. A replayed source refuses any draw of another kind or order, and every
/// recorded draw must be used.
#[test]
fn update_decision_draw_takes_one_uniform_every_step() {
    use psgd::random::{Draw, ReplayRandom};
    use psgd::{KronUpdateDecision, Options};
    let dev = Device::Cpu;
    let leaves = vec![LeafSpec::new("w", &[3, 4])];
    let params = vec![Tensor::ones((3, 4), DType::F32, &dev).unwrap()];
    let grads = vec![Tensor::arange(0f32, 12., &dev)
        .unwrap()
        .reshape((3, 4))
        .unwrap()];
    let make = |decision: KronUpdateDecision, p: f64| {
        Kron::new(
            leaves.clone(),
            KronOptions {
                update_decision: decision,
                preconditioner_update_probability: Some(Schedule::Constant(p)),
                ..options(UpdateRule::Pro)
            },
        )
        .unwrap()
    };
    let step = |kron: &Kron, state: &psgd::KronState, draws: Vec<Draw>| {
        let mut rng = ReplayRandom::new("test", draws);
        let out = kron
            .update_with(
                &grads,
                state,
                Some(&params),
                kron.hyper(state),
                None,
                &mut rng,
            )
            .unwrap();
        assert_eq!(rng.remaining(), 0, "a recorded draw was not used");
        out
    };
    let factors = |s: &psgd::KronState| -> Vec<Vec<f32>> {
        s.precond.qs[0]
            .iter()
            .map(|q| q.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };

    // probability 0.5: a draw of 0.7 skips the fit on the very first step (and draws
    // nothing else); 0.2 fits
    let kron = make(KronUpdateDecision::Draw, 0.5);
    let s0 = kron.init(&params).unwrap();
    let (_, s1) = step(&kron, &s0, vec![Draw::Uniform(0.7)]);
    assert_eq!(factors(&s1), factors(&s0), "a step above p must not fit");
    let mut fit = vec![Draw::Uniform(0.2)];
    fit.extend(pro_fit_draws());
    let (_, s2) = step(&kron, &s1, fit.clone());
    assert_ne!(factors(&s2), factors(&s1), "a step below p must fit");

    // probability 1: the uniform is still drawn (0.999 < 1 fits)
    let kron = make(KronUpdateDecision::Draw, 1.0);
    let mut fit1 = vec![Draw::Uniform(0.999)];
    fit1.extend(pro_fit_draws());
    let s0 = kron.init(&params).unwrap();
    let (u_draw, _) = step(&kron, &s0, fit1);

    // the counter draws no decision uniform: the fit's own draws alone, same numbers
    let counter = make(KronUpdateDecision::Counter, 1.0);
    let (u_counter, _) = step(&counter, &counter.init(&params).unwrap(), pro_fit_draws());
    assert_eq!(
        u_draw[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        u_counter[0]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );

    // the option's names
    let read = |v: serde_json::Value| {
        KronOptions::from_json(v.as_object().unwrap()).map(|o| o.update_decision)
    };
    assert_eq!(
        read(serde_json::json!({})).unwrap(),
        KronUpdateDecision::Counter
    );
    assert_eq!(
        read(serde_json::json!({ "updateDecision": "draw" })).unwrap(),
        KronUpdateDecision::Draw
    );
    let err = read(serde_json::json!({ "updateDecision": "random" }))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("updateDecision") && err.contains("'draw'"),
        "{err}"
    );
}
