//! Device storage, host transfers, dtype casts, and the f32 views every op computes through.
//!
//! Buffers are shared on clone and copied on the first write after it (copy-on-write): `Clone`
//! cannot fail, and a device copy can (out of memory), so the copy happens where an error can
//! be returned, in [`CudaStorage::slice_mut`].

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr};
use half::{bf16, f16};

use super::compile::Module;
use super::context::{CudaContext, drv};
use super::launch;
use crate::storage::Storage;
use crate::{CpuStorage, DType, Error, Result, Tensor};

/// A device buffer of one dtype.
#[derive(Clone)]
pub(crate) enum Buf {
    F32(Arc<CudaSlice<f32>>),
    BF16(Arc<CudaSlice<bf16>>),
    F16(Arc<CudaSlice<f16>>),
}

/// Elements on one CUDA device. The device buffer may hold one spare element (the driver
/// refuses zero-byte allocations); `len` is the logical length.
#[derive(Clone)]
pub struct CudaStorage {
    ctx: Arc<CudaContext>,
    len: usize,
    buf: Buf,
}

impl fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaStorage({} x {} on cuda:{})", self.len, self.dtype(), self.ordinal())
    }
}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        match self.buf {
            Buf::F32(_) => DType::F32,
            Buf::BF16(_) => DType::BF16,
            Buf::F16(_) => DType::F16,
        }
    }
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn buf(&self) -> &Buf {
        &self.buf
    }

    pub(crate) fn f32(ctx: Arc<CudaContext>, len: usize, buf: CudaSlice<f32>) -> Self {
        CudaStorage { ctx, len, buf: Buf::F32(Arc::new(buf)) }
    }

    /// The buffer for writing, copied first if a clone still shares it.
    pub(crate) fn slice_mut(&mut self, op: &'static str) -> Result<BufMut<'_>> {
        let stream = self.ctx.stream();
        Ok(match &mut self.buf {
            Buf::F32(b) => BufMut::F32(unique(b, op, stream)?),
            Buf::BF16(b) => BufMut::BF16(unique(b, op, stream)?),
            Buf::F16(b) => BufMut::F16(unique(b, op, stream)?),
        })
    }
}

/// A writable device buffer of one dtype.
pub(crate) enum BufMut<'a> {
    F32(&'a mut CudaSlice<f32>),
    BF16(&'a mut CudaSlice<bf16>),
    F16(&'a mut CudaSlice<f16>),
}

fn unique<'a, T: DeviceRepr>(
    arc: &'a mut Arc<CudaSlice<T>>,
    op: &'static str,
    stream: &Arc<cudarc::driver::CudaStream>,
) -> Result<&'a mut CudaSlice<T>> {
    if Arc::get_mut(arc).is_none() {
        let copy = stream.clone_dtod(arc.as_ref()).map_err(drv(op))?;
        *arc = Arc::new(copy);
    }
    Arc::get_mut(arc).ok_or_else(|| Error::Cuda { op, msg: "device buffer still shared after copying it".into() })
}

/// The CUDA storage of a tensor, or a device-mismatch error.
pub(crate) fn cuda_storage<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(s) => Ok(s),
        Storage::Cpu(_) => Err(not_cuda(op)),
    }
}

pub(crate) fn cuda_storage_mut<'a>(op: &'static str, t: &'a mut Tensor) -> Result<&'a mut CudaStorage> {
    match t.storage_mut() {
        Storage::Cuda(s) => Ok(s),
        Storage::Cpu(_) => Err(not_cuda(op)),
    }
}

fn not_cuda(op: &'static str) -> Error {
    Error::Cuda { op, msg: "a CPU tensor reached the CUDA backend".into() }
}

/// The context a tensor lives on.
pub(crate) fn ctx_of(op: &'static str, t: &Tensor) -> Result<Arc<CudaContext>> {
    Ok(cuda_storage(op, t)?.ctx.clone())
}

/// An f32 device buffer: the tensor's own when it is f32, a converted copy otherwise.
pub(crate) enum F32Buf<'a> {
    Borrowed(&'a CudaSlice<f32>),
    Owned(CudaSlice<f32>),
}

impl Deref for F32Buf<'_> {
    type Target = CudaSlice<f32>;
    fn deref(&self) -> &CudaSlice<f32> {
        match self {
            F32Buf::Borrowed(b) => b,
            F32Buf::Owned(b) => b,
        }
    }
}

/// The elements of `t` as f32 on its device (the one helper every op reads its inputs with).
pub(crate) fn f32_in<'a>(op: &'static str, t: &'a Tensor) -> Result<F32Buf<'a>> {
    let s = cuda_storage(op, t)?;
    Ok(match &s.buf {
        Buf::F32(b) => F32Buf::Borrowed(b),
        Buf::BF16(b) => F32Buf::Owned(cast_new(op, &s.ctx, &**b, "cast_bf16_f32", s.len)?),
        Buf::F16(b) => F32Buf::Owned(cast_new(op, &s.ctx, &**b, "cast_f16_f32", s.len)?),
    })
}

/// An op's f32 result as a tensor of `shape` in `dtype` (the one helper every op writes with).
pub(crate) fn f32_out(
    op: &'static str,
    ctx: &Arc<CudaContext>,
    buf: CudaSlice<f32>,
    shape: Vec<usize>,
    dtype: DType,
) -> Result<Tensor> {
    let len = shape.iter().product();
    let storage = CudaStorage::f32(ctx.clone(), len, buf);
    let storage = if dtype == DType::F32 { storage } else { to_dtype_op(op, &storage, dtype)? };
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape))
}

/// Runs `f` on the elements of a CUDA tensor as a writable f32 buffer and stores the result
/// back in the tensor's dtype: the in-place counterpart of [`f32_in`] / [`f32_out`].
pub(crate) fn update_f32<R>(
    op: &'static str,
    t: &mut Tensor,
    f: impl FnOnce(&Arc<CudaContext>, &mut CudaSlice<f32>, usize) -> Result<R>,
) -> Result<R> {
    let s = cuda_storage_mut(op, t)?;
    let (ctx, len) = (s.ctx.clone(), s.len);
    match s.slice_mut(op)? {
        BufMut::F32(b) => f(&ctx, b, len),
        BufMut::BF16(b) => {
            let mut tmp = cast_new(op, &ctx, &*b, "cast_bf16_f32", len)?;
            let r = f(&ctx, &mut tmp, len)?;
            cast_into(op, &ctx, &tmp, b, "cast_f32_bf16", len)?;
            Ok(r)
        }
        BufMut::F16(b) => {
            let mut tmp = cast_new(op, &ctx, &*b, "cast_f16_f32", len)?;
            let r = f(&ctx, &mut tmp, len)?;
            cast_into(op, &ctx, &tmp, b, "cast_f32_f16", len)?;
            Ok(r)
        }
    }
}

/// A new buffer holding `src` converted by the cast kernel `kernel`.
fn cast_new<S: DeviceRepr, D: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    op: &'static str,
    ctx: &Arc<CudaContext>,
    src: &CudaSlice<S>,
    kernel: &'static str,
    len: usize,
) -> Result<CudaSlice<D>> {
    let mut dst = ctx.zeros::<D>(op, len)?;
    cast_into(op, ctx, src, &mut dst, kernel, len)?;
    Ok(dst)
}

/// Converts `len` elements of `src` into `dst` with the cast kernel `kernel`.
fn cast_into<S, D>(
    op: &'static str,
    ctx: &Arc<CudaContext>,
    src: &CudaSlice<S>,
    dst: &mut CudaSlice<D>,
    kernel: &'static str,
    len: usize,
) -> Result<()> {
    let n = len as u64;
    launch!(ctx, op, Module::Cast, kernel, launch::grid_1d(len), src, dst, &n)
}

// ----- the contract's storage functions -----

pub fn zeros(len: usize, dtype: DType, ordinal: usize) -> Result<CudaStorage> {
    const OP: &str = "zeros";
    let ctx = CudaContext::get(ordinal)?;
    let buf = match dtype {
        DType::F32 => Buf::F32(Arc::new(ctx.zeros(OP, len)?)),
        DType::BF16 => Buf::BF16(Arc::new(ctx.zeros(OP, len)?)),
        DType::F16 => Buf::F16(Arc::new(ctx.zeros(OP, len)?)),
    };
    Ok(CudaStorage { ctx, len, buf })
}

pub fn upload(host: &CpuStorage, ordinal: usize) -> Result<CudaStorage> {
    const OP: &str = "upload";
    let ctx = CudaContext::get(ordinal)?;
    let buf = match host {
        CpuStorage::F32(v) => Buf::F32(Arc::new(ctx.upload(OP, v)?)),
        CpuStorage::BF16(v) => Buf::BF16(Arc::new(ctx.upload(OP, v)?)),
        CpuStorage::F16(v) => Buf::F16(Arc::new(ctx.upload(OP, v)?)),
    };
    Ok(CudaStorage { ctx, len: host.len(), buf })
}

pub fn download(s: &CudaStorage) -> Result<CpuStorage> {
    const OP: &str = "download";
    fn get<T: DeviceRepr + Default + Clone>(s: &CudaStorage, b: &CudaSlice<T>) -> Result<Vec<T>> {
        if s.len == 0 {
            return Ok(Vec::new());
        }
        let view =
            b.try_slice(..s.len).ok_or_else(|| Error::Cuda { op: OP, msg: "buffer shorter than its length".into() })?;
        let v = s.ctx.stream().clone_dtoh(&view).map_err(drv(OP))?;
        // The copy into pageable memory has finished when it returns; synchronising also
        // surfaces any error of the kernels that produced the data.
        s.ctx.stream().synchronize().map_err(drv(OP))?;
        Ok(v)
    }
    Ok(match &s.buf {
        Buf::F32(b) => CpuStorage::F32(get(s, b)?),
        Buf::BF16(b) => CpuStorage::BF16(get(s, b)?),
        Buf::F16(b) => CpuStorage::F16(get(s, b)?),
    })
}

pub fn to_dtype(s: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
    to_dtype_op("to_dtype", s, dtype)
}

fn to_dtype_op(op: &'static str, s: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
    let (ctx, len) = (&s.ctx, s.len);
    let buf = match (&s.buf, dtype) {
        (Buf::F32(_), DType::F32) | (Buf::BF16(_), DType::BF16) | (Buf::F16(_), DType::F16) => s.buf.clone(),
        (Buf::F32(b), DType::BF16) => Buf::BF16(Arc::new(cast_new(op, ctx, &**b, "cast_f32_bf16", len)?)),
        (Buf::F32(b), DType::F16) => Buf::F16(Arc::new(cast_new(op, ctx, &**b, "cast_f32_f16", len)?)),
        (Buf::BF16(b), DType::F32) => Buf::F32(Arc::new(cast_new(op, ctx, &**b, "cast_bf16_f32", len)?)),
        (Buf::F16(b), DType::F32) => Buf::F32(Arc::new(cast_new(op, ctx, &**b, "cast_f16_f32", len)?)),
        (Buf::BF16(b), DType::F16) => Buf::F16(Arc::new(cast_new(op, ctx, &**b, "cast_bf16_f16", len)?)),
        (Buf::F16(b), DType::BF16) => Buf::BF16(Arc::new(cast_new(op, ctx, &**b, "cast_f16_bf16", len)?)),
    };
    Ok(CudaStorage { ctx: ctx.clone(), len, buf })
}
