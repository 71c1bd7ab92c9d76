//! The kernel layer: the hot operations of the preconditioners, each declared once and
//! implemented per device.
//!
//! Every operation has a CPU host path (contiguous float32 on the CPU: fused,
//! multithreaded passes and direct GEMM calls) and a candle-op fallback that runs on any
//! device and dtype; the slot for a CUDA or Metal kernel is the operation's own dispatch
//! (`candle_core::CustomOp`/`InplaceOp` with `cuda_fwd`/`metal_fwd`), where the fallback
//! is taken today. The variants call these operations and never test a tensor's device or
//! layout themselves. The tests that hold each host path equal to its fallback live beside
//! the operation.
//!
//! - [`elementwise`]: the host-side building blocks (flat views, blocked parallel passes
//!   and reductions over float32 data).
//! - [`fused`]: the step's fused elementwise operations (momentum, clips, damping, the
//!   finish pass, the finiteness scan).
//! - [`triangular`]: products that skip a triangular operand's zeros, and the blocked
//!   triangular solve.
//! - [`linalg`]: Gram products, the norm lower bound, the small dense solve.
//! - [`precision`]: matmul precision (a product at bfloat16/float32).
//! - [`subspace`]: the randomised norm bounds and the Procrustes step of the
//!   inverse-free Kron rules.

pub mod elementwise;
pub mod fused;
pub mod linalg;
pub mod precision;
pub mod subspace;
pub mod triangular;

use elementwise::Flat;

/// The one place an operation's implementation is chosen: `host` on contiguous float32
/// CPU data (every tensor of `groups` viewed as one flat slice per group), else `ops`,
/// the candle-op path that runs on every device and dtype. A device kernel (candle
/// `CustomOp`/`InplaceOp` with `cuda_fwd`/`metal_fwd`) goes here, chosen by the tensors'
/// device before the fallback.
pub fn dispatch<R>(
    groups: &[&[candle_core::Tensor]],
    host: impl FnOnce(&[Flat<'_>]) -> R,
    ops: impl FnOnce() -> R,
) -> R {
    elementwise::with_host(groups, host).unwrap_or_else(ops)
}
