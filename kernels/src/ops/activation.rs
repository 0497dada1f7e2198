//! Activations: the SwiGLU gate of Llama-style MLPs and the softmax over the last dim.

use rayon::prelude::*;

use crate::cpu::multiversion;
use crate::error::{Result, shape_err};
use crate::tensor::same_device;
use crate::{Device, Tensor, cuda};

/// Elements per parallel task of the elementwise ops: large enough that rayon's overhead
/// vanishes, small enough to spread over the threads.
const CHUNK: usize = 1 << 14;

/// `silu(gate) · up`, elementwise; both inputs share a shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let device = same_device("swiglu", &[gate, up])?;
    if gate.shape() != up.shape() {
        return shape_err("swiglu", format!("gate {:?} vs up {:?}", gate.shape(), up.shape()));
    }
    match device {
        Device::Cpu => {
            let (g, u) = (gate.cpu_f32()?, up.cpu_f32()?);
            let mut out = vec![0.0; g.len()];
            out.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(u.par_chunks(CHUNK))
                .for_each(|((o, g), u)| swiglu_chunk(o, g, u));
            Ok(Tensor::cpu_from_f32(out, gate.shape().to_vec(), gate.dtype()))
        }
        Device::Cuda(_) => cuda::swiglu(gate, up),
    }
}

/// Gradients of [`swiglu`]: `(dgate, dup)`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let device = same_device("swiglu_backward", &[gate, up, dy])?;
    if gate.shape() != up.shape() || gate.shape() != dy.shape() {
        return shape_err(
            "swiglu_backward",
            format!("gate {:?}, up {:?}, dy {:?}", gate.shape(), up.shape(), dy.shape()),
        );
    }
    match device {
        Device::Cpu => {
            let (g, u, dy) = (gate.cpu_f32()?, up.cpu_f32()?, dy.cpu_f32()?);
            let (mut dg, mut du) = (vec![0.0; g.len()], vec![0.0; g.len()]);
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
                .for_each(|((dg, du), ((g, u), dy))| {
                    for i in 0..dg.len() {
                        let s = sigmoid(g[i]);
                        // d silu(g)/dg = s·(1 + g·(1 − s)).
                        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                        du[i] = dy[i] * g[i] * s;
                    }
                });
            let shape = gate.shape().to_vec();
            Ok((Tensor::cpu_from_f32(dg, shape.clone(), gate.dtype()), Tensor::cpu_from_f32(du, shape, up.dtype())))
        }
        Device::Cuda(_) => cuda::swiglu_backward(gate, up, dy),
    }
}

/// Softmax over the last dim (max-subtracted, computed in f32).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let d = last_dim("softmax", x)?;
    match x.device() {
        Device::Cpu => {
            let mut out = x.cpu_f32()?.into_owned();
            if d > 0 {
                out.par_chunks_mut(d).for_each(softmax_in_place);
            }
            Ok(Tensor::cpu_from_f32(out, x.shape().to_vec(), x.dtype()))
        }
        Device::Cuda(_) => cuda::softmax(x, d),
    }
}

/// Gradient of [`softmax`] from its output `y`: `dx = y·(dy − Σ dy·y)`.
pub fn softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let device = same_device("softmax_backward", &[y, dy])?;
    let d = last_dim("softmax_backward", y)?;
    dy.expect_shape("softmax_backward", "dy", y.shape())?;
    match device {
        Device::Cpu => {
            let (ys, dys) = (y.cpu_f32()?, dy.cpu_f32()?);
            let mut dx = vec![0.0; ys.len()];
            if d > 0 {
                dx.par_chunks_mut(d).zip(ys.par_chunks(d)).zip(dys.par_chunks(d)).for_each(|((dx, y), dy)| {
                    let dot: f32 = y.iter().zip(dy).map(|(y, dy)| y * dy).sum();
                    dx.iter_mut().zip(y).zip(dy).for_each(|((dx, y), dy)| *dx = y * (dy - dot));
                });
            }
            Ok(Tensor::cpu_from_f32(dx, y.shape().to_vec(), y.dtype()))
        }
        Device::Cuda(_) => cuda::softmax_backward(y, dy, d),
    }
}

multiversion! {
    /// A chunk of [`swiglu`].
    pub(crate) fn swiglu_chunk(o: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    }
}

#[inline]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + crate::cpu::exp(-x))
}

multiversion! {
    /// Numerically stable softmax of one row, in place.
    pub(crate) fn softmax_in_place(row: &mut [f32]) {
        softmax_row(row)
    }
}

/// [`softmax_in_place`]'s body, for kernels that are multiversioned themselves.
#[inline]
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = crate::cpu::max(row);
    row.iter_mut().for_each(|v| *v = crate::cpu::exp(*v - max));
    let inv = 1.0 / crate::cpu::sum(row);
    row.iter_mut().for_each(|v| *v *= inv);
}

fn last_dim(op: &'static str, x: &Tensor) -> Result<usize> {
    match x.shape().last() {
        Some(&d) => Ok(d),
        None => shape_err(op, "a scalar has no last dim"),
    }
}
