//! RMSNorm (Llama, Mistral, Qwen2): `y = x / sqrt(mean(x²) + eps) · w` over the last dim.

use rayon::prelude::*;

use crate::cpu::multiversion;
use crate::error::Result;
use crate::tensor::same_device;
use crate::{Device, Tensor, cuda};

/// RMSNorm of `x` (`[n, d]`) with weight `w` (`[d]`); computed in f32, result in `x`'s dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let device = same_device("rms_norm", &[x, w])?;
    let (n, d) = x.dims2("rms_norm")?;
    w.expect_shape("rms_norm", "weight", &[d])?;
    match device {
        Device::Cpu => {
            let (xs, ws) = (x.cpu_f32()?, w.cpu_f32()?);
            let mut out = vec![0.0; n * d];
            if d > 0 {
                out.par_chunks_mut(d).zip(xs.par_chunks(d)).for_each(|(y, x)| norm_row(y, x, &ws, eps));
            }
            Ok(Tensor::cpu_from_f32(out, vec![n, d], x.dtype()))
        }
        Device::Cuda(_) => cuda::rms_norm(x, w, eps, n, d),
    }
}

/// Gradients of [`rms_norm`]: `(dx, dw)`.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let device = same_device("rms_norm_backward", &[x, w, dy])?;
    let (n, d) = x.dims2("rms_norm_backward")?;
    w.expect_shape("rms_norm_backward", "weight", &[d])?;
    dy.expect_shape("rms_norm_backward", "dy", &[n, d])?;
    match device {
        Device::Cpu => {
            let (xs, ws, dys) = (x.cpu_f32()?, w.cpu_f32()?, dy.cpu_f32()?);
            let mut dx = vec![0.0; n * d];
            if d == 0 {
                return Ok((Tensor::cpu_from_f32(dx, vec![n, d], x.dtype()), w.clone()));
            }
            // Each row returns its contribution to dw; summed after the parallel pass.
            let dw = dx
                .par_chunks_mut(d)
                .zip(xs.par_chunks(d))
                .zip(dys.par_chunks(d))
                .fold(
                    || vec![0.0f32; d],
                    |mut dw, ((dx, x), dy)| {
                        let r = inv_rms(x, eps);
                        // xhat = x·r, g = dy·w;  dx = r·(g − xhat·mean(g·xhat)).
                        let mean_gx: f32 = (0..d).map(|i| dy[i] * ws[i] * x[i] * r).sum::<f32>() / d as f32;
                        for i in 0..d {
                            let xhat = x[i] * r;
                            dx[i] = r * (dy[i] * ws[i] - xhat * mean_gx);
                            dw[i] += dy[i] * xhat;
                        }
                        dw
                    },
                )
                .reduce(|| vec![0.0f32; d], |a, b| a.iter().zip(&b).map(|(a, b)| a + b).collect());
            Ok((Tensor::cpu_from_f32(dx, vec![n, d], x.dtype()), Tensor::cpu_from_f32(dw, vec![d], w.dtype())))
        }
        Device::Cuda(_) => cuda::rms_norm_backward(x, w, dy, eps, n, d),
    }
}

multiversion! {
    /// One row of [`rms_norm`].
    pub(crate) fn norm_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let r = inv_rms(x, eps);
        y.iter_mut().zip(x).zip(w).for_each(|((y, x), w)| *y = x * r * w);
    }
}

#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = crate::cpu::dot(x, x) / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}
