//! Options shared by every variant: matmul precision and dtype names.

use crate::error::{PsgdError, Result};
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
    /// Parses `'bfloat16'`, `'tensorfloat32'`, `'float32'` (or null: float32).
    pub fn parse(name: &str, s: Option<&str>) -> Result<Self> {
        match s {
            None | Some("float32") | Some("highest") => Ok(Precision::Float32),
            Some("tensorfloat32") | Some("high") => Ok(Precision::Tensorfloat32),
            Some("bfloat16") | Some("default") => Ok(Precision::Bfloat16),
            Some(other) => Err(PsgdError::option_range(
                name,
                format!("must be 'bfloat16', 'tensorfloat32' or 'float32', got '{other}'"),
            )),
        }
    }

    /// `a · b` (batched like `Tensor::matmul`) at this precision.
    pub fn matmul(self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        use crate::triangular::{matmul_tri, Tri};
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

/// Parses a dtype name as psgd-jax accepts it (`'float32'`, `'bfloat16'`, ...).
pub fn parse_dtype(name: &str, s: Option<&str>) -> Result<Option<DType>> {
    match s {
        None => Ok(None),
        Some("float32") => Ok(Some(DType::F32)),
        Some("bfloat16") => Ok(Some(DType::BF16)),
        Some("float16") => Ok(Some(DType::F16)),
        Some("float64") => Ok(Some(DType::F64)),
        Some(other) => Err(PsgdError::option_type(
            name,
            format!("unsupported dtype '{other}' (float32, bfloat16, float16, float64)"),
        )),
    }
}
