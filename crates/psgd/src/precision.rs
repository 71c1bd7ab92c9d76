//! Options shared by every variant: matmul precision and dtype names.

use crate::error::{PsgdError, Result};
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
        Ok(match self {
            Precision::Bfloat16 => {
                let r = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
                };
                r(a)?.matmul(&r(b)?)?
            }
            _ => a.matmul(b)?,
        })
    }
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
