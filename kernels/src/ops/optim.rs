//! Optimizer kernels: the AdamW step (decoupled weight decay, as `torch.optim.AdamW`) and
//! global gradient-norm clipping (as `torch.nn.utils.clip_grad_norm_`). These update tensors in
//! place; they are the end of the backward pass and have no backward of their own.

use rayon::prelude::*;

use crate::error::{Result, arg_err};
use crate::tensor::same_device;
use crate::{Device, Tensor, cuda};

/// AdamW hyper-parameters for one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    /// PyTorch's defaults.
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// One AdamW step on `param` with gradient `grad` and moments `m`, `v` (all one shape);
/// `step` counts from 1. Order and bias correction follow PyTorch: decay the weight by
/// `1 − lr·wd`, update the moments, then `p −= lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps)`.
pub fn adamw_step(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    cfg: &AdamW,
    step: u64,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let device = same_device(OP, &[param, grad, m, v])?;
    for (what, t) in [("grad", grad), ("m", &*m), ("v", &*v)] {
        t.expect_shape(OP, what, param.shape())?;
    }
    if step == 0 {
        return arg_err(OP, "step counts from 1");
    }
    let bc1 = 1.0 - cfg.beta1.powi(step.min(i32::MAX as u64) as i32);
    let bc2 = 1.0 - cfg.beta2.powi(step.min(i32::MAX as u64) as i32);
    match device {
        Device::Cpu => {
            let g = grad.cpu_f32()?;
            param.cpu_update(|p| {
                m.cpu_update(|m| {
                    v.cpu_update(|v| {
                        let step_size = cfg.lr / bc1;
                        let bc2_sqrt = bc2.sqrt();
                        p.par_iter_mut().zip(m.par_iter_mut()).zip(v.par_iter_mut()).zip(g.par_iter()).for_each(
                            |(((p, m), v), &g)| {
                                *p *= 1.0 - cfg.lr * cfg.weight_decay;
                                *m = cfg.beta1 * *m + (1.0 - cfg.beta1) * g;
                                *v = cfg.beta2 * *v + (1.0 - cfg.beta2) * g * g;
                                *p -= step_size * *m / (v.sqrt() / bc2_sqrt + cfg.eps);
                            },
                        );
                    })
                })
            })???;
            Ok(())
        }
        Device::Cuda(_) => cuda::adamw_step(param, grad, m, v, cfg, bc1, bc2),
    }
}

/// Sum of squares of all elements (f64 accumulation). On the CPU the partial sums are over
/// fixed chunks added in order, so the result does not depend on how rayon split the work
/// (training is bit-for-bit reproducible).
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    match t.device() {
        Device::Cpu => {
            let partial: Vec<f64> =
                t.cpu_f32()?.par_chunks(1 << 14).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum()).collect();
            Ok(partial.iter().sum())
        }
        Device::Cuda(_) => cuda::sum_squares(t),
    }
}

/// Multiplies every element by `s`, in place.
pub fn scale_in_place(t: &mut Tensor, s: f32) -> Result<()> {
    match t.device() {
        Device::Cpu => t.cpu_update(|x| x.par_iter_mut().for_each(|x| *x *= s)),
        Device::Cuda(_) => cuda::scale_in_place(t, s),
    }
}

/// The global L2 norm of several gradients taken together.
pub fn grad_norm(grads: &[&Tensor]) -> Result<f32> {
    let mut total = 0.0;
    for g in grads {
        total += sum_squares(g)?;
    }
    Ok(total.sqrt() as f32)
}

/// Scales all `grads` together so their global L2 norm is at most `max_norm` (PyTorch's
/// coefficient `max_norm / (norm + 1e-6)`, capped at 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut Tensor], max_norm: f32) -> Result<f32> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return arg_err("clip_grad_norm", format!("max_norm must be positive, got {max_norm}"));
    }
    let norm = grad_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>())?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            scale_in_place(g, coef)?;
        }
    }
    Ok(norm)
}
