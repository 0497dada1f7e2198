//! Contiguous element storage on each device.

use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
use half::vec::HalfFloatVecExt;
use half::{bf16, f16};

use crate::DType;

/// Host storage. bf16 and f16 keep their width in memory; ops read them as f32.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn zeros(len: usize, dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; len]),
        }
    }

    /// The elements as f32: borrowed when already f32, converted otherwise.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            CpuStorage::F32(v) => Cow::Borrowed(v),
            CpuStorage::BF16(v) => Cow::Owned(v.to_f32_vec()),
            CpuStorage::F16(v) => Cow::Owned(v.to_f32_vec()),
        }
    }

    /// Wraps f32 results in the requested dtype (rounding to nearest even for bf16/f16).
    pub fn from_f32(data: Vec<f32>, dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(data),
            _ => CpuStorage::from_f32_slice(&data, dtype),
        }
    }

    /// [`CpuStorage::from_f32`] from borrowed elements: a conversion takes no f32 copy first
    /// (a copy of another size between the allocations that stay fragments the heap: loading
    /// 2,000 adapters into bf16 took 10% more memory with one).
    pub fn from_f32_slice(data: &[f32], dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(data.to_vec()),
            DType::BF16 => CpuStorage::BF16(Vec::from_f32_slice(data)),
            DType::F16 => CpuStorage::F16(Vec::from_f32_slice(data)),
        }
    }

    /// Reads elements `start..start + dst.len()` into `dst` as f32, converting only that range
    /// (a row gather from a bf16 embedding table).
    pub(crate) fn read_f32(&self, start: usize, dst: &mut [f32]) {
        let end = start + dst.len();
        match self {
            CpuStorage::F32(v) => dst.copy_from_slice(&v[start..end]),
            CpuStorage::BF16(v) => v[start..end].convert_to_f32_slice(dst),
            CpuStorage::F16(v) => v[start..end].convert_to_f32_slice(dst),
        }
    }

    /// Overwrites elements `start..start + src.len()` with `src`, converting only that range
    /// (a KV-cache write touches a few rows of a large buffer).
    pub(crate) fn write_f32(&mut self, start: usize, src: &[f32]) {
        let end = start + src.len();
        match self {
            CpuStorage::F32(v) => v[start..end].copy_from_slice(src),
            CpuStorage::BF16(v) => v[start..end].convert_from_f32_slice(src),
            CpuStorage::F16(v) => v[start..end].convert_from_f32_slice(src),
        }
    }

    /// Runs `f` on the elements as a mutable f32 slice and writes the result back, so in-place
    /// ops (optimizer steps, KV-cache writes) have one code path for every dtype.
    pub(crate) fn update_f32<R>(&mut self, f: impl FnOnce(&mut [f32]) -> R) -> R {
        match self {
            CpuStorage::F32(v) => f(v),
            CpuStorage::BF16(v) => {
                let mut tmp = v.to_f32_vec();
                let r = f(&mut tmp);
                v.convert_from_f32_slice(&tmp);
                r
            }
            CpuStorage::F16(v) => {
                let mut tmp = v.to_f32_vec();
                let r = f(&mut tmp);
                v.convert_from_f32_slice(&tmp);
                r
            }
        }
    }
}

/// Storage on any device. The CUDA variant exists in every build; without the `cuda` feature
/// its type is uninhabited, so the arm costs nothing and call sites need no `cfg`. Both are
/// shared by a tensor's clones and copied on the first write to a shared one, so a clone (an
/// adapter's weights in a batch's LoRA bank, a published version of a job's weights) costs no
/// memory until it differs.
#[derive(Clone, Debug)]
pub(crate) enum Storage {
    Cpu(std::sync::Arc<CpuStorage>),
    Cuda(crate::cuda::CudaStorage),
}
