//! The Rust API as a candle user meets it: `Kron` as a `candle_nn::Optimizer`, the
//! optax-style pair, state bytes, and bad input that leaves the state as it was.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use psgd::{Kron, KronOptions, LeafSpec, PsgdError, PsgdOptimizer, Schedule, Transform};

fn quadratic_loss(vars: &[Var]) -> Tensor {
    let mut loss = vars[0].as_tensor().sqr().unwrap().sum_all().unwrap();
    for v in &vars[1..] {
        loss = (loss + v.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
    }
    loss
}

#[test]
fn kron_is_a_candle_nn_optimizer_and_converges() {
    let dev = Device::Cpu;
    let w =
        Var::from_tensor(&Tensor::new(&[[1f32, 2., 3.], [-1., 0.5, 2.]], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[1f32, -2.], &dev).unwrap()).unwrap();
    let options = KronOptions {
        learning_rate: Schedule::Constant(0.05),
        preconditioner_update_probability: Some(Schedule::Constant(1.0)),
        ..Default::default()
    };
    let mut opt = PsgdOptimizer::<Kron>::new(vec![w.clone(), b.clone()], options).unwrap();
    let start = quadratic_loss(&[w.clone(), b.clone()])
        .to_scalar::<f32>()
        .unwrap();
    for _ in 0..300 {
        let loss = quadratic_loss(&[w.clone(), b.clone()]);
        opt.backward_step(&loss).unwrap();
    }
    let end = quadratic_loss(&[w.clone(), b.clone()])
        .to_scalar::<f32>()
        .unwrap();
    assert!(end < 1e-2 * start, "{start} -> {end}");
    assert_eq!(Kron::count(opt.state()), 300);
    assert_eq!(opt.learning_rate(), 0.05);
}

fn small() -> (Kron, Vec<Tensor>) {
    let dev = Device::Cpu;
    let leaves = vec![
        LeafSpec::new("w".to_string(), &[3, 4]),
        LeafSpec::new("s".to_string(), &[]),
    ];
    let kron = Kron::new(leaves, KronOptions::default()).unwrap();
    let params = vec![
        Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap(),
        Tensor::new(0.5f32, &dev).unwrap(),
    ];
    (kron, params)
}

#[test]
fn state_bytes_round_trip_and_continue_identically() {
    let (kron, params) = small();
    let grads = |k: f64| -> Vec<Tensor> {
        params
            .iter()
            .map(|p| ((p * k).unwrap() + 0.1).unwrap())
            .collect()
    };
    let mut state = kron.init(&params).unwrap();
    for k in 0..3 {
        state = kron
            .update(&grads(k as f64), &state, Some(&params))
            .unwrap()
            .1;
    }
    let bytes = kron.state_to_bytes(&state).unwrap();
    assert_eq!(
        bytes,
        kron.state_to_bytes(&state).unwrap(),
        "equal states give equal bytes"
    );
    let loaded = kron.state_from_bytes(&bytes, &Device::Cpu).unwrap();
    let (u1, _) = kron.update(&grads(3.0), &state, Some(&params)).unwrap();
    let (u2, _) = kron.update(&grads(3.0), &loaded, Some(&params)).unwrap();
    let values = |u: &[Tensor]| -> Vec<Vec<f32>> {
        u.iter()
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    assert_eq!(values(&u1), values(&u2));
}

#[test]
fn bad_input_is_an_error_naming_the_leaf() {
    let (kron, params) = small();
    let state = kron.init(&params).unwrap();
    let before = kron.state_to_bytes(&state).unwrap();

    let wrong_shape = vec![
        Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
        params[1].clone(),
    ];
    let e = kron.update(&wrong_shape, &state, None).unwrap_err();
    assert!(matches!(e, PsgdError::Shape { .. }), "{e}");
    assert!(e.to_string().contains("'w'"), "{e}");

    let nan = vec![
        params[0].clone(),
        Tensor::new(f32::NAN, &Device::Cpu).unwrap(),
    ];
    let e = kron.update(&nan, &state, None).unwrap_err();
    assert!(matches!(e, PsgdError::NonFinite { .. }), "{e}");
    assert!(e.to_string().contains("'s'"), "{e}");

    let ints = vec![params[0].to_dtype(DType::U32).unwrap(), params[1].clone()];
    let e = kron.update(&ints, &state, None).unwrap_err();
    assert!(matches!(e, PsgdError::Dtype { .. }), "{e}");

    assert_eq!(kron.state_to_bytes(&state).unwrap(), before);
    assert_eq!(Kron::count(&state), 0);
}

#[test]
fn unknown_option_is_named() {
    let mut o = serde_json::Map::new();
    o.insert("maxSizeTriangle".into(), serde_json::json!(3));
    let e = <KronOptions as psgd::Options>::from_json(&o).unwrap_err();
    assert!(e.to_string().contains("maxSizeTriangle"), "{e}");
    assert_eq!(e.kind(), psgd::ErrorKind::Type);
    // serde reads the same names, with the same checks
    let o: KronOptions =
        serde_json::from_str(r#"{"b1": 0.5, "memorySaveMode": "one_diag"}"#).unwrap();
    assert_eq!(o.b1, 0.5);
    assert_eq!(o.memory_save_mode, Some(psgd::MemorySaveMode::OneDiag));
    assert!(serde_json::from_str::<KronOptions>(r#"{"b1": 1.5}"#).is_err());
    assert!(serde_json::from_str::<KronOptions>(r#"{"b2": 0.5}"#).is_err());
}

/// Kron with `preconditioner_init_scale: None` and no fit (probability 0), so that the
/// factors after one step are exactly the initial ones.
fn auto_scaled_kron(scale: Option<f64>, leaves: Vec<LeafSpec>) -> Kron {
    let options = KronOptions {
        preconditioner_init_scale: scale,
        preconditioner_update_probability: Some(Schedule::Constant(0.0)),
        ..Default::default()
    };
    Kron::new(leaves, options).unwrap()
}

/// `mean(|g|⁴)^(-1/8)` in float64, per slice of `per` values.
fn expected_scales(g: &[f32], per: usize) -> Vec<f64> {
    g.chunks(per)
        .map(|c| {
            let m4 = c.iter().map(|&x| (x as f64).powi(4)).sum::<f64>() / c.len() as f64;
            m4.powf(-0.125)
        })
        .collect()
}

fn first_factors(kron: &Kron, grads: &[Tensor]) -> Vec<Vec<Tensor>> {
    let params: Vec<Tensor> = grads.iter().map(|g| g.zeros_like().unwrap()).collect();
    let state = kron.init(&params).unwrap();
    let (updates, state) = kron.update(grads, &state, Some(&params)).unwrap();
    for u in &updates {
        let v = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "finite updates: {v:?}");
    }
    state.precond.qs
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs()
}

#[test]
fn automatic_initial_scale_is_mean_g4_to_the_minus_eighth_per_leaf_and_layer() {
    let dev = Device::Cpu;
    let mut scanned = LeafSpec::new("layers", &[2, 3, 2]);
    scanned.scanned = true;
    let leaves = vec![
        LeafSpec::new("w", &[3, 4]),
        LeafSpec::new("s", &[]),
        scanned,
    ];
    let data = |n: usize, k: f32| {
        (0..n)
            .map(|i| k * ((i as f32) * 0.7 - 1.3))
            .collect::<Vec<_>>()
    };
    let (gw, gs, gl) = (data(12, 1.0), vec![-0.25f32], data(12, 3e4));
    let grads = vec![
        Tensor::from_slice(&gw, (3, 4), &dev).unwrap(),
        Tensor::from_slice(&gs, (), &dev).unwrap(),
        Tensor::from_slice(&gl, (2, 3, 2), &dev).unwrap(),
    ];
    let qs = first_factors(&auto_scaled_kron(None, leaves.clone()), &grads);

    // w: two triangular factors, each s^(1/2)·I
    let s = expected_scales(&gw, 12)[0];
    for (q, d) in qs[0].iter().zip([3, 4]) {
        let q = q.to_vec2::<f32>().unwrap();
        for (i, row) in q.iter().enumerate().take(d) {
            for (j, &x) in row.iter().enumerate() {
                let want = if i == j { s.sqrt() } else { 0.0 };
                assert!(close(x as f64, want), "w: Q[{i}][{j}] = {x}, want {want}");
            }
        }
    }
    // the scalar: one diagonal factor s
    let q = qs[1][0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(close(q[0] as f64, expected_scales(&gs, 1)[0]), "{q:?}");
    // scanned: each layer its own scale, each of its two factors s^(1/2)
    let per_layer = expected_scales(&gl, 6);
    assert!(per_layer[0] != per_layer[1]);
    for q in &qs[2] {
        let v = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = (v.len() / 2) as f64;
        for (layer, &s) in per_layer.iter().enumerate() {
            let block = &v[layer * v.len() / 2..(layer + 1) * v.len() / 2];
            let trace: f64 = block.iter().map(|&x| x as f64).sum();
            // the sum of a diagonal block is its trace: d·s^(1/2) (d²=len for a dense one)
            let dim = if q.rank() == 3 { d.sqrt() } else { d };
            assert!(
                close(trace, dim * s.sqrt()),
                "layer {layer}: {trace} vs {}",
                dim * s.sqrt()
            );
        }
    }

    // the default (psgd-jax's scale 1) keeps the identity
    let qs = first_factors(&auto_scaled_kron(Some(1.0), leaves), &grads);
    let q = qs[0][0].to_vec2::<f32>().unwrap();
    assert_eq!(q[0][0], 1.0);
}

#[test]
fn automatic_initial_scale_without_signal_or_with_huge_gradients_stays_finite() {
    let dev = Device::Cpu;
    let leaves = vec![LeafSpec::new("w", &[3, 4])];
    let kron = auto_scaled_kron(None, leaves);
    // an all-zero gradient (an unused parameter): the scale is 1, not Inf
    let qs = first_factors(&kron, &[Tensor::zeros((3, 4), DType::F32, &dev).unwrap()]);
    assert_eq!(qs[0][0].to_vec2::<f32>().unwrap()[1][1], 1.0);
    // values whose fourth power overflows float32: still mean(|g|⁴)^(-1/8)
    let g: Vec<f32> = (0..12).map(|i| 1e30 * (1.0 + i as f32)).collect();
    let qs = first_factors(&kron, &[Tensor::from_slice(&g, (3, 4), &dev).unwrap()]);
    let want = expected_scales(&g, 12)[0].sqrt();
    let got = qs[0][1].to_vec2::<f32>().unwrap()[2][2] as f64;
    assert!(close(got, want), "{got} vs {want}");
}
