//! Matmul precision: products at bfloat16 or float32 operand precision.

use crate::error::Result;
use candle_core::{DType, Tensor, D};

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
    /// `a · b` (batched like `Tensor::matmul`) at this precision.
    pub fn matmul(self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        use crate::kernels::triangular::{matmul_tri, Tri};
        matmul_tri(a, Tri::Full, b, Tri::Full, Tri::Full, self)
    }

    /// An operand as a product at this precision reads it: rounded to bfloat16 (and back
    /// to float32) for `Bfloat16`, unchanged otherwise.
    pub fn round(self, t: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Precision::Bfloat16 => t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
            _ => t.clone(),
        })
    }
}

/// `a · b` for equal batch shapes. On the CPU a batch of large matrices goes one matrix at
/// a time: candle's batched CPU product parallelises each matrix less well (measured up
/// to 1.5× slower for `4 × (512×2048)·(2048×2048)`), and scanned layers are such batches.
pub(crate) fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = (a.dim(D::Minus2)?, a.dim(D::Minus1)?);
    let n = b.dim(D::Minus1)?;
    if a.rank() != 3 || !a.device().is_cpu() || a.dim(0)? < 2 || m * k * n < 1 << 24 {
        return Ok(a.matmul(b)?);
    }
    let outs = (0..a.dim(0)?)
        .map(|i| a.get(i)?.matmul(&b.get(i)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&outs, 0)?)
}
