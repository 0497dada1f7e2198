//! Stand-ins for the CUDA backend in builds without the `cuda` feature. [`CudaStorage`] is
//! uninhabited, so no tensor can be on a CUDA device; every function returns
//! [`Error::CudaUnavailable`].

use std::sync::Arc;

use crate::ops::{AdamW, AttentionDims, LoraBank, MatmulDims, Segments, SeqAttention};
use crate::{CpuStorage, DType, Error, Result, Tensor};

fn unavailable() -> Error {
    Error::CudaUnavailable("this build has no CUDA backend (rebuild with `--features cuda`)".into())
}

/// Device storage; uninhabited without the `cuda` feature.
#[derive(Clone, Debug)]
pub enum CudaStorage {}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        match *self {}
    }
    pub fn ordinal(&self) -> usize {
        match *self {}
    }
    pub fn len(&self) -> usize {
        match *self {}
    }
    pub fn is_empty(&self) -> bool {
        match *self {}
    }
}

/// A CUDA device context; never obtainable without the `cuda` feature.
#[derive(Debug)]
pub struct CudaContext(());

impl CudaContext {
    pub fn get(_ordinal: usize) -> Result<Arc<CudaContext>> {
        Err(unavailable())
    }
}

macro_rules! unavailable_fns {
    ($(fn $name:ident($($ty:ty),* $(,)?) -> $ret:ty;)*) => {
        $(
            #[allow(clippy::too_many_arguments)]
            pub fn $name($(_: $ty),*) -> $ret {
                Err(unavailable())
            }
        )*
    };
}

unavailable_fns! {
    fn synchronize(usize) -> Result<()>;
    fn free_memory(usize) -> Result<u64>;
    fn compile_all_kernels(&str) -> Result<()>;
    fn zeros(usize, DType, usize) -> Result<CudaStorage>;
    fn upload(&CpuStorage, usize) -> Result<CudaStorage>;
    fn download(&CudaStorage) -> Result<CpuStorage>;
    fn to_dtype(&CudaStorage, DType) -> Result<CudaStorage>;
    fn matmul(&Tensor, &Tensor, &MatmulDims, Vec<usize>) -> Result<Tensor>;
    fn add(&Tensor, &Tensor) -> Result<Tensor>;
    fn sum_batch(&Tensor, usize, usize) -> Result<Tensor>;
    fn transpose(&Tensor, usize, usize, Vec<usize>) -> Result<Tensor>;
    fn gather_rows(&Tensor, &[u32], usize) -> Result<Tensor>;
    fn scatter_add_rows(&Tensor, &[u32], usize, usize) -> Result<Tensor>;
    fn scale_rows(&Tensor, &Tensor, usize, usize) -> Result<Tensor>;
    fn row_dot(&Tensor, &Tensor, usize, usize) -> Result<Tensor>;
    fn rms_norm(&Tensor, &Tensor, f32, usize, usize) -> Result<Tensor>;
    fn rms_norm_backward(&Tensor, &Tensor, &Tensor, f32, usize, usize) -> Result<(Tensor, Tensor)>;
    fn swiglu(&Tensor, &Tensor) -> Result<Tensor>;
    fn swiglu_backward(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>;
    fn softmax(&Tensor, usize) -> Result<Tensor>;
    fn softmax_backward(&Tensor, &Tensor, usize) -> Result<Tensor>;
    fn rope(&Tensor, &[u32], &[f32], f32, usize, usize, usize) -> Result<Tensor>;
    fn write_kv(&mut Tensor, &Tensor, &[u32], usize) -> Result<()>;
    fn paged_attention(&Tensor, &Tensor, &Tensor, &[SeqAttention], &AttentionDims, f32) -> Result<Tensor>;
    fn paged_attention_backward(&Tensor, &Tensor, &Tensor, &[SeqAttention], &Tensor, &Tensor, &AttentionDims, f32) -> Result<(Tensor, Tensor, Tensor)>;
    fn cross_entropy(&Tensor, &[i32], usize, usize) -> Result<Tensor>;
    fn cross_entropy_backward(&Tensor, &[i32], &Tensor, usize, usize) -> Result<Tensor>;
    fn grouped_matmul(&Tensor, &Tensor, &Segments, usize, usize, usize) -> Result<Tensor>;
    fn grouped_matmul_backward(&Tensor, &Tensor, &Segments, &Tensor, bool, usize, usize, usize) -> Result<(Tensor, Option<Tensor>)>;
    fn sgmv(&mut Tensor, &Tensor, &LoraBank, &Segments, usize, usize, usize) -> Result<()>;
    fn bgmv(&mut Tensor, &Tensor, &LoraBank, &[i32], usize, usize, usize) -> Result<()>;
    fn lora_backward(&Tensor, &LoraBank, &[i32], &Tensor, usize, usize, usize) -> Result<crate::ops::LoraGrads>;
    fn adamw_step(&mut Tensor, &Tensor, &mut Tensor, &mut Tensor, &AdamW, f32, f32) -> Result<()>;
    fn sum_squares(&Tensor) -> Result<f64>;
    fn scale_in_place(&mut Tensor, f32) -> Result<()>;
}
