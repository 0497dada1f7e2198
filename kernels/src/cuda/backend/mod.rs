//! The real CUDA backend (feature `cuda`): cudarc with the CUDA libraries opened at run time,
//! kernels from `../kernels/*.cu` compiled by NVRTC on first use, GEMMs on cuBLAS.
//!
//! Every op computes in f32: bf16/f16 inputs are converted to an f32 device buffer first
//! (`storage::f32_in`) and results converted back to the dtype the CPU path returns
//! (`storage::f32_out`, `storage::update_f32` for in-place ops). The paged KV caches are the
//! exception: the attention kernels read and write them in their own dtype, so a bf16 cache is
//! never converted whole. Index metadata (token ids, slots, segments) is uploaded per call.
//!
//! Map: `context.rs` (device singleton, library checks, kernel cache), `compile.rs` (NVRTC),
//! `storage.rs` (buffers, transfers, casts), `launch.rs` (grid shapes), `blas.rs` (GEMM and
//! matmul), `elementwise.rs` (pointwise, row and index ops), `attention.rs` (KV cache and paged
//! attention), `moe.rs` (grouped expert matmul), `lora.rs` (SGMV/BGMV), `optim.rs` (AdamW,
//! norms).

/// Launches kernel `$name` of `$module` on the context's stream with `$cfg` and the arguments
/// in order (references to device buffers and to scalars that outlive the call). A grid with a
/// zero dimension launches nothing: the op had no elements.
macro_rules! launch {
    ($ctx:expr, $op:expr, $module:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 || cfg.grid_dim.2 == 0 {
            $crate::Result::Ok(())
        } else {
            let func = $ctx.function($module, $name)?;
            let stream = $ctx.stream();
            let mut builder = stream.launch_builder(&func);
            $( cudarc::driver::PushKernelArg::arg(&mut builder, $arg); )*
            // SAFETY: the arguments match the kernel's parameter list in its .cu file, and
            // every buffer holds at least the elements the sizes passed with it index.
            unsafe { builder.launch(cfg) }.map(|_| ()).map_err($crate::cuda::backend::context::drv($op))
        }
    }};
}

mod attention;
mod blas;
mod compile;
mod context;
mod elementwise;
mod launch;
mod lora;
mod moe;
mod optim;
mod storage;

pub use attention::{paged_attention, paged_attention_backward, write_kv};
pub use blas::matmul;
pub use compile::compile_all_kernels;
pub use context::{CudaContext, free_memory, synchronize};
pub use elementwise::{
    add, cross_entropy, cross_entropy_backward, gather_rows, rms_norm, rms_norm_backward, rope, row_dot, scale_rows,
    scatter_add_rows, softmax, softmax_backward, sum_batch, swiglu, swiglu_backward, transpose,
};
pub use lora::{bgmv, lora_backward, sgmv};
pub use moe::{grouped_matmul, grouped_matmul_backward};
pub use optim::{adamw_step, scale_in_place, sum_squares};
pub use storage::{CudaStorage, download, to_dtype, upload, zeros};
