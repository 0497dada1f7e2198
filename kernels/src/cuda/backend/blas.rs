//! Row-major GEMMs on cuBLAS sgemm, and the matmul op.
//!
//! cuBLAS is column-major. A row-major `C[m×n] = op(A)·op(B)` is, read column-major,
//! `Cᵀ[n×m] = op(B)ᵀ·op(A)ᵀ`, so each call passes `b` as cuBLAS's first operand and `a` as its
//! second, with the row strides as leading dimensions.

use std::ffi::{c_int, c_longlong};
use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::context::{CudaContext, blas_err};
use super::storage::{ctx_of, f32_in, f32_out};
use crate::ops::MatmulDims;
use crate::{Error, Result, Tensor};

/// One row-major GEMM (or a strided batch of them): `c = alpha·op(a)·op(b) + beta·c` with
/// `op(a)` `[m×k]`, `op(b)` `[k×n]`, `c` `[m×n]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `a` is stored `[k, m]`.
    pub trans_a: bool,
    /// `b` is stored `[n, k]`.
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    /// Matrices in the batch, and the element distance between consecutive ones (0: shared).
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl RowGemm {
    pub(crate) fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        RowGemm { m, n, k, trans_a, trans_b, alpha: 1.0, beta: 0.0, batch: 1, stride_a: 0, stride_b: 0, stride_c: 0 }
    }

    pub(crate) fn scaled(self, alpha: f32, beta: f32) -> Self {
        RowGemm { alpha, beta, ..self }
    }
}

/// Runs `g`. `k == 0` leaves `c` untouched: callers pass zeroed outputs or accumulate.
/// Operand sizes are checked against the views first, so a wrong call is an error rather than
/// an out-of-bounds access on the device.
pub(crate) fn gemm(
    ctx: &CudaContext,
    op: &'static str,
    g: &RowGemm,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    if g.m == 0 || g.n == 0 || g.k == 0 || g.batch == 0 {
        return Ok(());
    }
    let lda = if g.trans_a { g.m } else { g.k };
    let ldb = if g.trans_b { g.k } else { g.n };
    let ldc = g.n;
    let (a_rows, a_cols) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
    let (b_rows, b_cols) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
    let last = g.batch - 1;
    let checks = [
        ("a", a.len(), a_rows * a_cols + last * g.stride_a),
        ("b", b.len(), b_rows * b_cols + last * g.stride_b),
        ("c", c.len(), g.m * g.n + last * g.stride_c),
    ];
    for (what, have, need) in checks {
        if have < need {
            return Err(Error::Cuda {
                op,
                msg: format!("gemm operand {what}: {have} elements for {need} needed ({g:?})"),
            });
        }
    }
    let int = |v: usize| -> Result<c_int> {
        c_int::try_from(v).map_err(|_| Error::InvalidArgument { op, msg: format!("GEMM size {v} exceeds i32") })
    };
    let long = |v: usize| -> Result<c_longlong> {
        c_longlong::try_from(v).map_err(|_| Error::InvalidArgument { op, msg: format!("GEMM stride {v} exceeds i64") })
    };
    let trans = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    // Column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLAS's A is our b, its B our a, its m our n.
    let cfg = GemmConfig {
        transa: trans(g.trans_b),
        transb: trans(g.trans_a),
        m: int(g.n)?,
        n: int(g.m)?,
        k: int(g.k)?,
        alpha: g.alpha,
        lda: int(ldb)?,
        ldb: int(lda)?,
        beta: g.beta,
        ldc: int(ldc)?,
    };
    let blas = ctx.blas();
    // SAFETY: the operand spans were checked against the views above, and the views live on
    // the stream the cuBLAS handle is bound to.
    let result = if g.batch == 1 {
        unsafe { blas.gemm(cfg, b, a, c) }
    } else {
        let batched = StridedBatchedConfig {
            gemm: cfg,
            batch_size: int(g.batch)?,
            stride_a: long(g.stride_b)?,
            stride_b: long(g.stride_a)?,
            stride_c: long(g.stride_c)?,
        };
        unsafe { blas.gemm_strided_batched(batched, b, a, c) }
    };
    result.map_err(|e| blas_err(op, e))
}

/// A view of `len` elements of `buf` from `start`, or an error instead of cudarc's panic.
pub(crate) fn view<'a>(
    op: &'static str,
    buf: &'a CudaSlice<f32>,
    start: usize,
    len: usize,
) -> Result<CudaView<'a, f32>> {
    buf.try_slice(start..start + len).ok_or_else(|| Error::Cuda {
        op,
        msg: format!("view {start}..{} of a {}-element buffer", start + len, buf.len()),
    })
}

/// The mutable counterpart of [`view`].
pub(crate) fn view_mut<'a>(
    op: &'static str,
    buf: &'a mut CudaSlice<f32>,
    start: usize,
    len: usize,
) -> Result<CudaViewMut<'a, f32>> {
    let total = buf.len();
    buf.try_slice_mut(start..start + len)
        .ok_or_else(|| Error::Cuda { op, msg: format!("view {start}..{} of a {total}-element buffer", start + len) })
}

/// The matmul op: one tall GEMM when a shared `b` meets contiguous rows of `a` (as the CPU
/// does), one strided-batched GEMM otherwise (stride 0 for a shared `b`).
pub fn matmul(a: &Tensor, b: &Tensor, dims: &MatmulDims, out_shape: Vec<usize>) -> Result<Tensor> {
    const OP: &str = "matmul";
    let ctx: Arc<CudaContext> = ctx_of(OP, a)?;
    let (xa, xb) = (f32_in(OP, a)?, f32_in(OP, b)?);
    let d = *dims;
    let out_len = d.batch * d.m * d.n;
    let mut out = ctx.zeros::<f32>(OP, out_len)?;
    let g = if d.batch > 1 && !d.b_batched && !d.trans_a {
        RowGemm::new(d.batch * d.m, d.n, d.k, false, d.trans_b)
    } else {
        RowGemm {
            batch: d.batch,
            stride_a: d.m * d.k,
            stride_b: if d.b_batched { d.k * d.n } else { 0 },
            stride_c: d.m * d.n,
            ..RowGemm::new(d.m, d.n, d.k, d.trans_a, d.trans_b)
        }
    };
    {
        let av = view(OP, &xa, 0, a.elem_count())?;
        let bv = view(OP, &xb, 0, b.elem_count())?;
        let mut cv = view_mut(OP, &mut out, 0, out_len)?;
        gemm(&ctx, OP, &g, &av, &bv, &mut cv)?;
    }
    f32_out(OP, &ctx, out, out_shape, a.dtype())
}
