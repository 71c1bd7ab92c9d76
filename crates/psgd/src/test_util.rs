//! Helpers shared by the unit tests.

use candle_core::{Device, Tensor};

/// A `(b, m, n)` tensor of uniform draws in `[-0.5, 0.5)` from a fixed LCG, so tests need
/// no random crate state.
pub fn rand(shape: (usize, usize, usize), seed: u64) -> Tensor {
    let n = shape.0 * shape.1 * shape.2;
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The largest absolute entry of `a − b`.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
