//! The four preconditioners, each a [`crate::step::Preconditioner`] with its options (one
//! `declare_options!`): Kron (a factor per axis), XMat (a global X-shaped matrix), LRA (a
//! global low-rank plus diagonal) and Affine (a left and a right factor per matrix). They
//! stand on the core (`step`, `stages`, `transform`, `options`, `state_io`) and the
//! kernels; `common` holds what XMat, LRA and Affine share.

pub mod affine;
pub(crate) mod common;
pub mod kron;
pub mod lra;
pub mod xmat;
