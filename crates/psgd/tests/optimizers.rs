//! Every variant as a `candle_nn::Optimizer` (a drop-in for AdamW), and XMat's Hessian
//! mode through the Rust API.

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use psgd::{
    Affine, AffineOptions, Curvature, Kron, KronOptions, Lra, LraOptions, PsgdOptimizer, Schedule,
    StepHyper, Transform, XMat, XMatOptions,
};

fn loss_of(vars: &[Var]) -> Tensor {
    let sums: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().sqr().unwrap().sum_all().unwrap())
        .collect();
    Tensor::stack(&sums, 0).unwrap().sum_all().unwrap()
}

fn trains<T: Transform>(config: T::Options, steps: usize) -> (f32, f32) {
    let dev = Device::Cpu;
    let w =
        Var::from_tensor(&Tensor::new(&[[1f32, 2., 3.], [-1., 0.5, 2.]], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[1f32, -2.], &dev).unwrap()).unwrap();
    let vars = vec![w, b];
    let mut opt = PsgdOptimizer::<T>::new(vars.clone(), config).unwrap();
    let start = loss_of(&vars).to_scalar::<f32>().unwrap();
    for _ in 0..steps {
        opt.backward_step(&loss_of(&vars)).unwrap();
    }
    (start, loss_of(&vars).to_scalar::<f32>().unwrap())
}

#[test]
fn every_variant_is_a_candle_nn_optimizer() {
    let lr = Schedule::Constant(0.05);
    let kron = KronOptions {
        learning_rate: lr.clone(),
        preconditioner_update_probability: Schedule::Constant(1.0),
        ..Default::default()
    };
    let xmat = XMatOptions {
        learning_rate: lr.clone(),
        ..Default::default()
    };
    let lra = LraOptions {
        learning_rate: lr.clone(),
        ..Default::default()
    };
    let affine = AffineOptions {
        learning_rate: lr,
        ..Default::default()
    };
    for (name, (start, end)) in [
        ("kron", trains::<Kron>(kron, 200)),
        ("xmat", trains::<XMat>(xmat, 200)),
        ("lra", trains::<Lra>(lra, 200)),
        ("affine", trains::<Affine>(affine, 200)),
    ] {
        assert!(end < 1e-2 * start, "{name}: {start} -> {end}");
    }
}

#[test]
fn xmat_hessian_mode_is_newton_on_a_quadratic() {
    // the seed README's second example: loss 14 -> ~1e-13 in one step
    let dev = Device::Cpu;
    let xmat = XMat::new(
        vec![psgd::LeafSpec::new("p", &[3])],
        XMatOptions {
            learning_rate: Schedule::Constant(1.0),
            b1: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let p = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
    let state = xmat.init(std::slice::from_ref(&p)).unwrap();
    let v = Tensor::new(&[0.3f32, -1.2, 0.7], &dev).unwrap();
    let curvature = Curvature {
        hvp: vec![(&v * 2.0).unwrap()],
        vector: vec![v],
        update_preconditioner: true,
    };
    let grads = vec![(&p * 2.0).unwrap()];
    let mut rng = psgd::SeededRandom::for_step(0, 1);
    let (u, next) = xmat
        .update_with(
            &grads,
            &state,
            None,
            StepHyper::new(1.0, 1.0),
            Some(&curvature),
            &mut rng,
        )
        .unwrap();
    let p1 = (&p + &u[0]).unwrap();
    let loss = p1
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(loss < 1e-6, "loss after one step {loss}");
    assert_eq!(XMat::count(&next), 1);
}
