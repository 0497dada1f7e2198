//! Pointwise, row-wise and index ops: one kernel each (`elementwise.cu`, `rowwise.cu`), inputs
//! read as f32, results in the dtype the CPU path gives.

use crate::cuda::backend::compile::Module;
use crate::cuda::backend::launch::{self, grid_1d};
use crate::cuda::backend::storage::{ctx_of, f32_in, f32_out};
use crate::{DType, Result, Tensor};

pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    let ctx = ctx_of(OP, a)?;
    let (x, y) = (f32_in(OP, a)?, f32_in(OP, b)?);
    let n = a.elem_count();
    let mut out = ctx.zeros::<f32>(OP, n)?;
    let n64 = n as u64;
    launch!(ctx, OP, Module::Elementwise, "add_f32", grid_1d(n), &*x, &*y, &mut out, &n64)?;
    f32_out(OP, &ctx, out, a.shape().to_vec(), a.dtype())
}

pub fn sum_batch(x: &Tensor, b: usize, n: usize) -> Result<Tensor> {
    const OP: &str = "sum_batch";
    let ctx = ctx_of(OP, x)?;
    let xs = f32_in(OP, x)?;
    let mut out = ctx.zeros::<f32>(OP, n)?;
    let (b64, n64) = (b as u64, n as u64);
    launch!(ctx, OP, Module::Elementwise, "sum_batch_f32", grid_1d(n), &*xs, &mut out, &b64, &n64)?;
    f32_out(OP, &ctx, out, vec![n], x.dtype())
}

pub fn transpose(x: &Tensor, r: usize, c: usize, out_shape: Vec<usize>) -> Result<Tensor> {
    const OP: &str = "transpose";
    let ctx = ctx_of(OP, x)?;
    let xs = f32_in(OP, x)?;
    let len = x.elem_count();
    let batch = len.checked_div(r * c).unwrap_or(0);
    let mut out = ctx.zeros::<f32>(OP, len)?;
    let (b64, r64, c64) = (batch as u64, r as u64, c as u64);
    launch!(ctx, OP, Module::Elementwise, "transpose_f32", grid_1d(len), &*xs, &mut out, &b64, &r64, &c64)?;
    f32_out(OP, &ctx, out, out_shape, x.dtype())
}

pub fn gather_rows(x: &Tensor, idx: &[u32], d: usize) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    let ctx = ctx_of(OP, x)?;
    let xs = f32_in(OP, x)?;
    let ids = ctx.upload(OP, idx)?;
    let m = idx.len();
    let mut out = ctx.zeros::<f32>(OP, m * d)?;
    let (m64, d64) = (m as u64, d as u64);
    launch!(ctx, OP, Module::Elementwise, "gather_rows_f32", grid_1d(m * d), &*xs, &ids, &mut out, &m64, &d64)?;
    f32_out(OP, &ctx, out, vec![m, d], x.dtype())
}

pub fn scatter_add_rows(x: &Tensor, idx: &[u32], n: usize, d: usize) -> Result<Tensor> {
    const OP: &str = "scatter_add_rows";
    let ctx = ctx_of(OP, x)?;
    let xs = f32_in(OP, x)?;
    let ids = ctx.upload(OP, idx)?;
    let m = idx.len();
    let mut out = ctx.zeros::<f32>(OP, n * d)?;
    let (m64, d64) = (m as u64, d as u64);
    launch!(ctx, OP, Module::Elementwise, "scatter_add_rows_f32", grid_1d(m * d), &*xs, &ids, &mut out, &m64, &d64)?;
    f32_out(OP, &ctx, out, vec![n, d], x.dtype())
}

pub fn scale_rows(x: &Tensor, s: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    const OP: &str = "scale_rows";
    let ctx = ctx_of(OP, x)?;
    let (xs, ss) = (f32_in(OP, x)?, f32_in(OP, s)?);
    let mut out = ctx.zeros::<f32>(OP, n * d)?;
    let (n64, d64) = (n as u64, d as u64);
    launch!(ctx, OP, Module::Elementwise, "scale_rows_f32", grid_1d(n * d), &*xs, &*ss, &mut out, &n64, &d64)?;
    f32_out(OP, &ctx, out, vec![n, d], x.dtype())
}

pub fn row_dot(a: &Tensor, b: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    const OP: &str = "row_dot";
    let ctx = ctx_of(OP, a)?;
    let (x, y) = (f32_in(OP, a)?, f32_in(OP, b)?);
    let mut out = ctx.zeros::<f32>(OP, n)?;
    let d64 = d as u64;
    launch!(ctx, OP, Module::Rowwise, "row_dot_f32", launch::rows(OP, n)?, &*x, &*y, &mut out, &d64)?;
    f32_out(OP, &ctx, out, vec![n], a.dtype())
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32, n: usize, d: usize) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let ctx = ctx_of(OP, x)?;
    let (xs, ws) = (f32_in(OP, x)?, f32_in(OP, w)?);
    let mut out = ctx.zeros::<f32>(OP, n * d)?;
    let d64 = d as u64;
    let rows = launch::rows(OP, if d == 0 { 0 } else { n })?;
    launch!(ctx, OP, Module::Rowwise, "rms_norm_f32", rows, &*xs, &*ws, &mut out, &d64, &eps)?;
    f32_out(OP, &ctx, out, vec![n, d], x.dtype())
}

pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    n: usize,
    d: usize,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rms_norm_backward";
    let ctx = ctx_of(OP, x)?;
    let (xs, ws, dys) = (f32_in(OP, x)?, f32_in(OP, w)?, f32_in(OP, dy)?);
    let mut dx = ctx.zeros::<f32>(OP, n * d)?;
    let mut dw = ctx.zeros::<f32>(OP, d)?;
    let d64 = d as u64;
    let rows = launch::rows(OP, if d == 0 { 0 } else { n })?;
    launch!(ctx, OP, Module::Rowwise, "rms_norm_bwd_f32", rows, &*xs, &*ws, &*dys, &mut dx, &mut dw, &d64, &eps)?;
    Ok((f32_out(OP, &ctx, dx, vec![n, d], x.dtype())?, f32_out(OP, &ctx, dw, vec![d], w.dtype())?))
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "swiglu";
    let ctx = ctx_of(OP, gate)?;
    let (g, u) = (f32_in(OP, gate)?, f32_in(OP, up)?);
    let n = gate.elem_count();
    let mut out = ctx.zeros::<f32>(OP, n)?;
    let n64 = n as u64;
    launch!(ctx, OP, Module::Elementwise, "swiglu_f32", grid_1d(n), &*g, &*u, &mut out, &n64)?;
    f32_out(OP, &ctx, out, gate.shape().to_vec(), gate.dtype())
}

pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "swiglu_backward";
    let ctx = ctx_of(OP, gate)?;
    let (g, u, d) = (f32_in(OP, gate)?, f32_in(OP, up)?, f32_in(OP, dy)?);
    let n = gate.elem_count();
    let (mut dg, mut du) = (ctx.zeros::<f32>(OP, n)?, ctx.zeros::<f32>(OP, n)?);
    let n64 = n as u64;
    launch!(ctx, OP, Module::Elementwise, "swiglu_bwd_f32", grid_1d(n), &*g, &*u, &*d, &mut dg, &mut du, &n64)?;
    let shape = gate.shape().to_vec();
    Ok((f32_out(OP, &ctx, dg, shape.clone(), gate.dtype())?, f32_out(OP, &ctx, du, shape, up.dtype())?))
}

pub fn softmax(x: &Tensor, d: usize) -> Result<Tensor> {
    const OP: &str = "softmax";
    let ctx = ctx_of(OP, x)?;
    let xs = f32_in(OP, x)?;
    let len = x.elem_count();
    let mut out = ctx.zeros::<f32>(OP, len)?;
    let d64 = d as u64;
    let rows = launch::rows(OP, len.checked_div(d).unwrap_or(0))?;
    launch!(ctx, OP, Module::Rowwise, "softmax_f32", rows, &*xs, &mut out, &d64)?;
    f32_out(OP, &ctx, out, x.shape().to_vec(), x.dtype())
}

pub fn softmax_backward(y: &Tensor, dy: &Tensor, d: usize) -> Result<Tensor> {
    const OP: &str = "softmax_backward";
    let ctx = ctx_of(OP, y)?;
    let (ys, dys) = (f32_in(OP, y)?, f32_in(OP, dy)?);
    let len = y.elem_count();
    let mut out = ctx.zeros::<f32>(OP, len)?;
    let d64 = d as u64;
    let rows = launch::rows(OP, len.checked_div(d).unwrap_or(0))?;
    launch!(ctx, OP, Module::Rowwise, "softmax_bwd_f32", rows, &*ys, &*dys, &mut out, &d64)?;
    f32_out(OP, &ctx, out, y.shape().to_vec(), y.dtype())
}

pub fn rope(
    x: &Tensor,
    positions: &[u32],
    inv_freq: &[f32],
    direction: f32,
    t: usize,
    h: usize,
    d: usize,
) -> Result<Tensor> {
    const OP: &str = "rope";
    let ctx = ctx_of(OP, x)?;
    let xs = f32_in(OP, x)?;
    let pos = ctx.upload(OP, positions)?;
    let freq = ctx.upload(OP, inv_freq)?;
    let mut out = ctx.zeros::<f32>(OP, t * h * d)?;
    let (t64, h64, d64) = (t as u64, h as u64, d as u64);
    let cfg = grid_1d(t * h * (d / 2));
    launch!(ctx, OP, Module::Elementwise, "rope_f32", cfg, &*xs, &pos, &freq, &mut out, &t64, &h64, &d64, &direction)?;
    f32_out(OP, &ctx, out, vec![t, h, d], x.dtype())
}

pub fn cross_entropy(logits: &Tensor, targets: &[i32], n: usize, vocab: usize) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let ctx = ctx_of(OP, logits)?;
    let ls = f32_in(OP, logits)?;
    let tg = ctx.upload(OP, targets)?;
    let mut out = ctx.zeros::<f32>(OP, n)?;
    let v64 = vocab as u64;
    launch!(ctx, OP, Module::Rowwise, "cross_entropy_f32", launch::rows(OP, n)?, &*ls, &tg, &mut out, &v64)?;
    f32_out(OP, &ctx, out, vec![n], DType::F32)
}

pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &[i32],
    dloss: &Tensor,
    n: usize,
    vocab: usize,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy_backward";
    let ctx = ctx_of(OP, logits)?;
    let (ls, dl) = (f32_in(OP, logits)?, f32_in(OP, dloss)?);
    let tg = ctx.upload(OP, targets)?;
    let mut out = ctx.zeros::<f32>(OP, n * vocab)?;
    let v64 = vocab as u64;
    let rows = launch::rows(OP, if vocab == 0 { 0 } else { n })?;
    launch!(ctx, OP, Module::Rowwise, "cross_entropy_bwd_f32", rows, &*ls, &tg, &*dl, &mut out, &v64)?;
    f32_out(OP, &ctx, out, vec![n, vocab], logits.dtype())
}
