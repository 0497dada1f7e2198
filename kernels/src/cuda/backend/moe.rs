//! Grouped expert matmul: one cuBLAS GEMM per segment on its rows and its expert's weight.

use crate::cuda::backend::blas::{RowGemm, gemm, view, view_mut};
use crate::cuda::backend::storage::{ctx_of, f32_in, f32_out};
use crate::ops::Segments;
use crate::{Result, Tensor};

/// `y[seg] = x[seg] · w[e]ᵀ`; rows of a -1 segment stay zero.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, segs: &Segments, n: usize, k: usize, out: usize) -> Result<Tensor> {
    const OP: &str = "grouped_matmul";
    let ctx = ctx_of(OP, x)?;
    let (xs, ws) = (f32_in(OP, x)?, f32_in(OP, w)?);
    let mut y = ctx.zeros::<f32>(OP, n * out)?;
    for (s, e, idx) in segs.iter() {
        let Ok(expert) = usize::try_from(idx) else { continue };
        let rows = e - s;
        let xv = view(OP, &xs, s * k, rows * k)?;
        let wv = view(OP, &ws, expert * out * k, out * k)?;
        let mut yv = view_mut(OP, &mut y, s * out, rows * out)?;
        gemm(&ctx, OP, &RowGemm::new(rows, out, k, false, true), &xv, &wv, &mut yv)?;
    }
    f32_out(OP, &ctx, y, vec![n, out], x.dtype())
}

/// `dx[seg] = dy[seg] · W_e`, and with `weight_grad` `dW_e += dy[seg]ᵀ · x[seg]` (zero for
/// unused experts).
#[allow(clippy::too_many_arguments)]
pub fn grouped_matmul_backward(
    x: &Tensor,
    w: &Tensor,
    segs: &Segments,
    dy: &Tensor,
    weight_grad: bool,
    n: usize,
    k: usize,
    out: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    const OP: &str = "grouped_matmul_backward";
    let ctx = ctx_of(OP, x)?;
    let (xs, ws, dys) = (f32_in(OP, x)?, f32_in(OP, w)?, f32_in(OP, dy)?);
    let mut dx = ctx.zeros::<f32>(OP, n * k)?;
    let mut dw = ctx.zeros::<f32>(OP, if weight_grad { w.elem_count() } else { 0 })?;
    for (s, e, idx) in segs.iter() {
        let Ok(expert) = usize::try_from(idx) else { continue };
        let rows = e - s;
        let xv = view(OP, &xs, s * k, rows * k)?;
        let wv = view(OP, &ws, expert * out * k, out * k)?;
        let dyv = view(OP, &dys, s * out, rows * out)?;
        {
            let mut dxv = view_mut(OP, &mut dx, s * k, rows * k)?;
            gemm(&ctx, OP, &RowGemm::new(rows, k, out, false, false), &dyv, &wv, &mut dxv)?;
        }
        if weight_grad {
            let mut dwv = view_mut(OP, &mut dw, expert * out * k, out * k)?;
            // Accumulate: several segments may use one expert.
            gemm(&ctx, OP, &RowGemm::new(out, k, rows, true, false).scaled(1.0, 1.0), &dyv, &xv, &mut dwv)?;
        }
    }
    let dw = if weight_grad { Some(f32_out(OP, &ctx, dw, w.shape().to_vec(), w.dtype())?) } else { None };
    Ok((f32_out(OP, &ctx, dx, vec![n, k], x.dtype())?, dw))
}
