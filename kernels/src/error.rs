//! The one error type of the kernels crate.

use crate::{DType, Device};

/// Why a kernel call was refused or failed. Every variant names the op (or operation) so a
/// message reads on its own in a log. Cloneable, so a failure found once (a missing CUDA
/// library) is answered to every later call.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that do not fit together (or a shape that does not match the data).
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    /// Tensors of one call live on different devices.
    #[error("{op}: tensors on different devices ({lhs} and {rhs})")]
    DeviceMismatch { op: &'static str, lhs: Device, rhs: Device },

    /// A tensor with a dtype the op does not take here.
    #[error("{op}: unsupported dtype {dtype}")]
    DType { op: &'static str, dtype: DType },

    /// An argument outside its domain: an index out of range, a bad segment list, a zero size.
    #[error("{op}: invalid argument: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    /// A CUDA device was asked for, but this build or this machine cannot provide one
    /// (built without the `cuda` feature, or a CUDA library is missing).
    #[error("CUDA is unavailable: {0}")]
    CudaUnavailable(String),

    /// A CUDA driver, NVRTC or cuBLAS call failed.
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: &'static str, msg: String },
}

/// Result of every fallible kernel call.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for a shape error.
pub(crate) fn shape_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(Error::Shape { op, msg: msg.into() })
}

/// Shorthand for an invalid-argument error.
pub(crate) fn arg_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(Error::InvalidArgument { op, msg: msg.into() })
}
