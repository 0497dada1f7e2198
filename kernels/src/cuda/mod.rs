//! The CUDA backend. With the `cuda` feature this is the real backend (`backend/`); without it,
//! `dummy.rs` provides the same names, and every one of them answers
//! [`crate::Error::CudaUnavailable`], so no call site needs a `cfg`.
//!
//! `dummy.rs` is also the contract: the list of functions the ops call, with their signatures.

#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
pub use backend::*;

#[cfg(not(feature = "cuda"))]
mod dummy;
#[cfg(not(feature = "cuda"))]
pub use dummy::*;
