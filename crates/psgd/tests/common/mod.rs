//! Helpers shared by the integration tests.

use candle_core::{Device, Tensor};
use psgd::{Curvature, Kron, KronState, RandomSource, SeededRandom, Transform, UpdateRule};

/// Every Kron update rule, EQ first.
pub const RULES: [UpdateRule; 7] = [
    UpdateRule::Eq,
    UpdateRule::Pro,
    UpdateRule::Quad,
    UpdateRule::Qeq,
    UpdateRule::Qep,
    UpdateRule::Pro4p,
    UpdateRule::Quad4p,
];

/// One Newton-form step of `kron` (step `k`): a seeded probe `v` per param and `product(v)`
/// as its Hessian-vector product, with the fit's own draws seeded too.
pub fn newton_step(
    kron: &Kron,
    grads: &[Tensor],
    state: &KronState,
    params: &[Tensor],
    k: u64,
    product: impl Fn(&Tensor) -> Tensor,
) -> psgd::Result<(Vec<Tensor>, KronState)> {
    let vector: Vec<Tensor> = params
        .iter()
        .map(|p| {
            SeededRandom::for_step(k, 17)
                .normal(p.dims(), &Device::Cpu)
                .unwrap()
        })
        .collect();
    let hvp = vector.iter().map(product).collect();
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
