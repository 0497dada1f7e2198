//! Small tensor ops the models need around the big ones: sums, transposes, row gathers and
//! per-row scaling (MoE dispatch and combine). Each has its backward beside it.

use rayon::prelude::*;

use crate::error::{Result, arg_err, shape_err};
use crate::tensor::same_device;
use crate::{Device, Tensor, cuda};

/// `a + b`, same shapes; the result has `a`'s dtype. Backward: the gradient passes to both.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let device = same_device("add", &[a, b])?;
    if a.shape() != b.shape() {
        return shape_err("add", format!("{:?} + {:?}", a.shape(), b.shape()));
    }
    match device {
        Device::Cpu => {
            let (x, y) = (a.cpu_f32()?, b.cpu_f32()?);
            let out = x.iter().zip(y.iter()).map(|(x, y)| x + y).collect();
            Ok(Tensor::cpu_from_f32(out, a.shape().to_vec(), a.dtype()))
        }
        Device::Cuda(_) => cuda::add(a, b),
    }
}

/// `x + b` for every row of `x` (`[n, d]`, `b` is `[d]`): a linear layer's bias. Built from
/// [`gather_rows`] and [`add`], so every backend has it. Backward: `dx = dy`, `db` =
/// [`sum_batch`] of `dy`.
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2("add_bias")?;
    b.expect_shape("add_bias", "bias", &[d])?;
    let rows = gather_rows(&b.clone().reshape([1, d])?, &vec![0; n])?;
    add(x, &rows.to_dtype(x.dtype())?)
}

/// Sums a `[b, n]` tensor over its first dim into `[n]`. Backward: broadcast back.
pub fn sum_batch(x: &Tensor) -> Result<Tensor> {
    let (b, n) = x.dims2("sum_batch")?;
    match x.device() {
        Device::Cpu => {
            let xs = x.cpu_f32()?;
            let mut out = vec![0.0; n];
            for row in xs.chunks_exact(n.max(1)).take(b) {
                out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
            Ok(Tensor::cpu_from_f32(out, vec![n], x.dtype()))
        }
        Device::Cuda(_) => cuda::sum_batch(x, b, n),
    }
}

/// Swaps the last two dims (`[.., r, c]` -> `[.., c, r]`). Its own backward.
pub fn transpose(x: &Tensor) -> Result<Tensor> {
    let rank = x.rank();
    if rank < 2 {
        return shape_err("transpose", format!("rank must be >= 2, got {:?}", x.shape()));
    }
    let (r, c) = (x.shape()[rank - 2], x.shape()[rank - 1]);
    let mut out_shape = x.shape().to_vec();
    out_shape.swap(rank - 2, rank - 1);
    match x.device() {
        Device::Cpu => {
            let xs = x.cpu_f32()?;
            let mut out = vec![0.0; xs.len()];
            if r * c > 0 {
                out.par_chunks_mut(r * c).zip(xs.par_chunks(r * c)).for_each(|(o, m)| {
                    for i in 0..r {
                        for j in 0..c {
                            o[j * r + i] = m[i * c + j];
                        }
                    }
                });
            }
            Ok(Tensor::cpu_from_f32(out, out_shape, x.dtype()))
        }
        Device::Cuda(_) => cuda::transpose(x, r, c, out_shape),
    }
}

/// Picks rows: `out[i] = x[idx[i]]` along the first dimension of `x` (of any rank from 1 up;
/// `out` keeps the other dimensions). Used to dispatch tokens to experts. Backward:
/// [`scatter_add_rows`] of the gradient with the same indices.
pub fn gather_rows(x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    let Some((&n, rest)) = x.shape().split_first() else {
        return shape_err("gather_rows", "a scalar has no rows".to_string());
    };
    let out = gather_flat_rows(x, n, rest.iter().product(), idx)?;
    if rest.len() == 1 { Ok(out) } else { out.reshape([&[idx.len()], rest].concat()) }
}

/// [`gather_rows`] of a tensor of any shape whose elements are `n` rows of `d`, in place (a KV
/// cache, without copying it into a 2-D tensor first).
pub(crate) fn gather_flat_rows(x: &Tensor, n: usize, d: usize, idx: &[u32]) -> Result<Tensor> {
    if n * d > x.elem_count() {
        return shape_err("gather_rows", format!("{n} rows of {d} from {:?}", x.shape()));
    }
    check_indices("gather_rows", idx, n)?;
    match x.device() {
        Device::Cpu => {
            // Only the rows gathered are converted (a bf16 table stays as it is).
            let xs = x.cpu_storage()?;
            let mut out = vec![0.0; idx.len() * d];
            if d > 0 {
                out.par_chunks_mut(d).zip(idx).for_each(|(o, &i)| xs.read_f32(i as usize * d, o));
            }
            Ok(Tensor::cpu_from_f32(out, vec![idx.len(), d], x.dtype()))
        }
        Device::Cuda(_) => cuda::gather_rows(x, idx, d),
    }
}

/// Adds rows into an `[n, d]` result: `out[idx[i]] += x[i]`. The backward of
/// [`gather_rows`] (and how MoE combines expert outputs back onto tokens).
pub fn scatter_add_rows(x: &Tensor, idx: &[u32], n: usize) -> Result<Tensor> {
    let (m, d) = x.dims2("scatter_add_rows")?;
    if idx.len() != m {
        return shape_err("scatter_add_rows", format!("{} indices for {m} rows", idx.len()));
    }
    check_indices("scatter_add_rows", idx, n)?;
    match x.device() {
        Device::Cpu => {
            let xs = x.cpu_f32()?;
            let mut out = vec![0.0; n * d];
            for (row, &i) in xs.chunks_exact(d.max(1)).zip(idx) {
                let i = i as usize;
                out[i * d..(i + 1) * d].iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
            Ok(Tensor::cpu_from_f32(out, vec![n, d], x.dtype()))
        }
        Device::Cuda(_) => cuda::scatter_add_rows(x, idx, n, d),
    }
}

/// Scales each row of `x` (`[n, d]`) by `s[i]` (`s` is `[n]`): the MoE routing weight applied to
/// an expert's output.
pub fn scale_rows(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let device = same_device("scale_rows", &[x, s])?;
    let (n, d) = x.dims2("scale_rows")?;
    s.expect_shape("scale_rows", "s", &[n])?;
    match device {
        Device::Cpu => {
            let (xs, ss) = (x.cpu_f32()?, s.cpu_f32()?);
            let mut out = xs.into_owned();
            if d > 0 {
                out.par_chunks_mut(d).zip(ss.par_iter()).for_each(|(row, &s)| row.iter_mut().for_each(|v| *v *= s));
            }
            Ok(Tensor::cpu_from_f32(out, vec![n, d], x.dtype()))
        }
        Device::Cuda(_) => cuda::scale_rows(x, s, n, d),
    }
}

/// Gradients of [`scale_rows`]: `(dx, ds)` with `dx = dy·s` and `ds[i] = <dy[i], x[i]>`.
pub fn scale_rows_backward(x: &Tensor, s: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, d) = x.dims2("scale_rows_backward")?;
    dy.expect_shape("scale_rows_backward", "dy", &[n, d])?;
    let dx = scale_rows(dy, s)?;
    let ds = row_dot(x, dy)?;
    Ok((dx, ds))
}

/// Per-row dot product of two `[n, d]` tensors, `[n]`.
pub fn row_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let device = same_device("row_dot", &[a, b])?;
    let (n, d) = a.dims2("row_dot")?;
    b.expect_shape("row_dot", "b", &[n, d])?;
    match device {
        Device::Cpu => {
            let (x, y) = (a.cpu_f32()?, b.cpu_f32()?);
            let out = (0..n)
                .into_par_iter()
                .map(|i| x[i * d..(i + 1) * d].iter().zip(&y[i * d..(i + 1) * d]).map(|(a, b)| a * b).sum())
                .collect();
            Ok(Tensor::cpu_from_f32(out, vec![n], a.dtype()))
        }
        Device::Cuda(_) => cuda::row_dot(a, b, n, d),
    }
}

pub(crate) fn check_indices(op: &'static str, idx: &[u32], n: usize) -> Result<()> {
    match idx.iter().find(|&&i| i as usize >= n) {
        Some(i) => arg_err(op, format!("index {i} out of range for {n} rows")),
        None => Ok(()),
    }
}
