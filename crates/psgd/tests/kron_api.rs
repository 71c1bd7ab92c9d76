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
