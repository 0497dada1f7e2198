//! The tensor: a shape over contiguous, row-major storage on one device.

use std::borrow::Cow;
use std::sync::Arc;

use crate::cuda;
use crate::error::{Error, Result, shape_err};
use crate::storage::{CpuStorage, Storage};
use crate::{DType, Device};

/// A dense, contiguous, row-major tensor. Ops are free functions in [`crate::ops`] with an
/// explicit backward for each forward; there is no autograd tape.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// An f32 tensor on the CPU from its elements.
    pub fn from_vec(data: Vec<f32>, shape: impl Into<Vec<usize>>) -> Result<Self> {
        Self::from_cpu(CpuStorage::F32(data), shape)
    }

    /// A CPU tensor over given storage; the element count must match the shape.
    pub fn from_cpu(storage: CpuStorage, shape: impl Into<Vec<usize>>) -> Result<Self> {
        let shape = shape.into();
        let n: usize = shape.iter().product();
        if n != storage.len() {
            return shape_err("from_cpu", format!("shape {shape:?} holds {n} elements, data has {}", storage.len()));
        }
        Ok(Tensor { shape, storage: Storage::Cpu(Arc::new(storage)) })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Vec<usize>>, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        let n = shape.iter().product();
        let storage = match device {
            Device::Cpu => Storage::Cpu(Arc::new(CpuStorage::zeros(n, dtype))),
            Device::Cuda(ordinal) => Storage::Cuda(cuda::zeros(n, dtype, ordinal)?),
        };
        Ok(Tensor { shape, storage })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }

    /// The same elements under another shape with the same element count.
    pub fn reshape(self, shape: impl Into<Vec<usize>>) -> Result<Self> {
        let shape = shape.into();
        if shape.iter().product::<usize>() != self.elem_count() {
            return shape_err("reshape", format!("{:?} -> {shape:?}", self.shape));
        }
        Ok(Tensor { shape, storage: self.storage })
    }

    /// A copy in another dtype (the same tensor when the dtype already matches).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let storage = match &self.storage {
            // To f32, the converted values are the storage: no second copy of a large tensor.
            Storage::Cpu(s) if dtype == DType::F32 => Storage::Cpu(Arc::new(CpuStorage::F32(s.to_f32().into_owned()))),
            Storage::Cpu(s) => Storage::Cpu(Arc::new(CpuStorage::from_f32_slice(&s.to_f32(), dtype))),
            Storage::Cuda(s) => Storage::Cuda(cuda::to_dtype(s, dtype)?),
        };
        Ok(Tensor { shape: self.shape.clone(), storage })
    }

    /// A copy on another device (the same tensor when it is already there).
    pub fn to_device(&self, device: Device) -> Result<Self> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let host = self.to_cpu_storage()?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(Arc::new(host)),
            Device::Cuda(ordinal) => Storage::Cuda(cuda::upload(&host, ordinal)?),
        };
        Ok(Tensor { shape: self.shape.clone(), storage })
    }

    /// `self` on `device`: moved without a copy when it is already there.
    pub fn into_device(self, device: Device) -> Result<Self> {
        if device == self.device() { Ok(self) } else { self.to_device(device) }
    }

    /// `self` in `dtype`: moved without a copy when it already is.
    pub fn into_dtype(self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() { Ok(self) } else { self.to_dtype(dtype) }
    }

    /// The elements, copied to the host and converted to f32.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        Ok(match &self.storage {
            Storage::Cpu(s) => s.to_f32().into_owned(),
            Storage::Cuda(s) => cuda::download(s)?.to_f32().into_owned(),
        })
    }

    /// [`Tensor::to_vec_f32`], taking the elements without a copy where this is the only handle
    /// on an f32 CPU tensor (a step's logits: tens of MB).
    pub fn into_vec_f32(self) -> Result<Vec<f32>> {
        match self.storage {
            Storage::Cpu(s) => Ok(match Arc::try_unwrap(s) {
                Ok(CpuStorage::F32(v)) => v,
                Ok(other) => other.to_f32().into_owned(),
                Err(shared) => shared.to_f32().into_owned(),
            }),
            Storage::Cuda(s) => Ok(cuda::download(&s)?.to_f32().into_owned()),
        }
    }

    /// The storage, copied to the host in the tensor's own dtype.
    pub fn to_cpu_storage(&self) -> Result<CpuStorage> {
        match &self.storage {
            Storage::Cpu(s) => Ok(CpuStorage::clone(s)),
            Storage::Cuda(s) => cuda::download(s),
        }
    }

    /// The dimensions of a rank-2 tensor, or a shape error naming `op`.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [a, b] => Ok((a, b)),
            _ => shape_err(op, format!("expected a rank-2 tensor, got {:?}", self.shape)),
        }
    }

    /// The dimensions of a rank-3 tensor, or a shape error naming `op`.
    pub fn dims3(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        match self.shape[..] {
            [a, b, c] => Ok((a, b, c)),
            _ => shape_err(op, format!("expected a rank-3 tensor, got {:?}", self.shape)),
        }
    }

    /// The dimensions of a rank-4 tensor, or a shape error naming `op`.
    pub fn dims4(&self, op: &'static str) -> Result<(usize, usize, usize, usize)> {
        match self.shape[..] {
            [a, b, c, d] => Ok((a, b, c, d)),
            _ => shape_err(op, format!("expected a rank-4 tensor, got {:?}", self.shape)),
        }
    }

    /// Checks the exact shape, or a shape error naming `op` and `what`.
    pub(crate) fn expect_shape(&self, op: &'static str, what: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return shape_err(op, format!("{what} must be {shape:?}, got {:?}", self.shape));
        }
        Ok(())
    }

    // ----- crate-internal access used by the ops and the CUDA backend -----

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn from_storage(storage: Storage, shape: Vec<usize>) -> Self {
        Tensor { shape, storage }
    }

    /// The elements as f32 on the host; only called on the CPU path of an op.
    pub(crate) fn cpu_f32(&self) -> Result<Cow<'_, [f32]>> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s.to_f32()),
            Storage::Cuda(_) => Err(Error::DeviceMismatch { op: "cpu_f32", lhs: Device::Cpu, rhs: self.device() }),
        }
    }

    /// Host storage of a CPU tensor, read in place.
    pub(crate) fn cpu_storage(&self) -> Result<&CpuStorage> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s),
            Storage::Cuda(_) => Err(Error::DeviceMismatch { op: "cpu_storage", lhs: Device::Cpu, rhs: self.device() }),
        }
    }

    /// The elements of a CPU bf16 tensor as they lie; `None` for any other tensor.
    pub(crate) fn cpu_bf16(&self) -> Option<&[half::bf16]> {
        match self.cpu_storage() {
            Ok(CpuStorage::BF16(v)) => Some(v),
            _ => None,
        }
    }

    /// Runs an in-place f32 update on a CPU tensor (any dtype).
    pub(crate) fn cpu_update<R>(&mut self, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
        Ok(self.cpu_storage_mut()?.update_f32(f))
    }

    /// Mutable host storage of a CPU tensor: copied first when a clone of the tensor shares it
    /// (clones share their elements until one of them is written, as on the GPU).
    pub(crate) fn cpu_storage_mut(&mut self) -> Result<&mut CpuStorage> {
        let device = self.device();
        match &mut self.storage {
            Storage::Cpu(s) => Ok(Arc::make_mut(s)),
            Storage::Cuda(_) => Err(Error::DeviceMismatch { op: "cpu_storage_mut", lhs: Device::Cpu, rhs: device }),
        }
    }

    /// A CPU tensor from f32 results, stored in `dtype`.
    pub(crate) fn cpu_from_f32(data: Vec<f32>, shape: Vec<usize>, dtype: DType) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Tensor { shape, storage: Storage::Cpu(Arc::new(CpuStorage::from_f32(data, dtype))) }
    }
}

/// The one device all `tensors` live on, or an error naming `op`.
pub(crate) fn same_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let device = tensors.first().map_or(Device::Cpu, |t| t.device());
    for t in tensors {
        if t.device() != device {
            return Err(Error::DeviceMismatch { op, lhs: device, rhs: t.device() });
        }
    }
    Ok(device)
}
