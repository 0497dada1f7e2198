//! Tandem's tensors and compute kernels.
//!
//! Map of the crate:
//! - [`Tensor`] (`tensor.rs`): a shape over contiguous row-major storage ([`DType`] f32, bf16 or
//!   f16) on a [`Device`] (`Cpu` or `Cuda(ordinal)`).
//! - [`ops`]: every op the models need, forward and backward, as free functions; shapes are
//!   checked once there, then the CPU kernel or the CUDA one runs.
//! - `cpu/`: the GEMM wrapper over the `gemm` crate that the CPU kernels share and which
//!   instruction set it runs with here ([`gemm_instruction_set`]); the vector instructions our
//!   own kernels run with, found at run time ([`kernel_isa`], `isa.rs`); the matmuls of
//!   decoding and of LoRA deltas, `x · Wᵀ` where either has few rows (`few_rows.rs`) and `x · W`
//!   where `W` has few rows (`low_rank.rs`), reading f32 or bf16 weights (`weight.rs`);
//!   products with bf16 weights on Intel AMX tiles (`amx.rs`).
//! - `cuda/`: the CUDA backend (feature `cuda`): cudarc with the libraries loaded at run time,
//!   `.cu` kernels compiled by NVRTC, cuBLAS GEMMs. Without the feature the same names exist
//!   and answer [`Error::CudaUnavailable`], so callers need no `cfg`.
//!
//! bf16 and f16 tensors keep their width in memory; the CPU computes in f32, except that a bf16
//! weight is multiplied on the AMX tiles where the CPU has them (inputs rounded to bf16, sums in
//! f32). bf16 LoRA weights are widened to f32 as the kernels load them.

mod cpu;
pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod ops;
mod storage;
mod tensor;

pub use cpu::{Isa, gemm_instruction_set, kernel_isa, multiplies_bf16_weights};
pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use storage::CpuStorage;
pub use tensor::Tensor;
