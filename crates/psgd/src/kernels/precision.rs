//! Matmul precision: products at bfloat16 or float32 operand precision.

use crate::error::Result;
use candle_core::{DType, Tensor};

/// Matmul precision (`precond_update_precision`, `precond_grads_precision`).
///
/// candle has no TF32 switch per product, so `Tensorfloat32` and `Float32` both compute in
/// float32 (on the CPU this is also what JAX does). `Bfloat16` rounds both operands of each
/// product to bfloat16 and accumulates in float32, as bfloat16 matrix units do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Operands rounded to bfloat16, float32 accumulation.
    Bfloat16,
    /// TF32 in JAX; float32 here.
    Tensorfloat32,
    /// Full float32.
    #[default]
    Float32,
}

impl Precision {
    /// An operand as a product at this precision reads it: rounded to bfloat16 (and back
    /// to float32) for `Bfloat16`, unchanged otherwise.
    pub fn round(self, t: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Precision::Bfloat16 => t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
            _ => t.clone(),
        })
    }
}
