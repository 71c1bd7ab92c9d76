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
//! - [`elementwise`]: fused elementwise passes and reductions over flat float32 data.
//! - [`triangular`]: products that skip a triangular operand's zeros, and the blocked
//!   triangular solve.
//! - [`linalg`]: Gram products, the norm lower bound, the small dense solve.
//! - [`precision`]: matmul precision (a product at bfloat16/float32).

pub mod elementwise;
pub mod linalg;
pub mod precision;
pub mod triangular;
