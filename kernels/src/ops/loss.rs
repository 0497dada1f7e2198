//! Cross-entropy over the vocabulary, per token, with ignored positions.

use rayon::prelude::*;

use super::reduce::log_sum_exp;
use crate::error::{Result, arg_err, shape_err};
use crate::tensor::same_device;
use crate::{Device, Tensor, cuda};

/// Per-token cross-entropy of `logits` (`[n, vocab]`) against `targets` (`n` ids; a negative id,
/// such as PyTorch's -100, marks a token that carries no loss). Returns `[n]` f32 losses, zero
/// where ignored; callers reduce (mean over a job's tokens, for instance) as they need.
pub fn cross_entropy(logits: &Tensor, targets: &[i32]) -> Result<Tensor> {
    let (n, vocab) = check("cross_entropy", logits, targets)?;
    match logits.device() {
        Device::Cpu => {
            let ls = logits.cpu_f32()?;
            let out = (0..n)
                .into_par_iter()
                .map(|i| match usize::try_from(targets[i]) {
                    Ok(t) => {
                        let row = &ls[i * vocab..(i + 1) * vocab];
                        log_sum_exp(row) - row[t]
                    }
                    Err(_) => 0.0,
                })
                .collect();
            Ok(Tensor::cpu_from_f32(out, vec![n], crate::DType::F32))
        }
        Device::Cuda(_) => cuda::cross_entropy(logits, targets, n, vocab),
    }
}

/// Gradient of [`cross_entropy`] for upstream per-token gradients `dloss` (`[n]`):
/// `dlogits[i] = dloss[i]·(softmax(logits[i]) − onehot(target[i]))`, zero where ignored.
pub fn cross_entropy_backward(logits: &Tensor, targets: &[i32], dloss: &Tensor) -> Result<Tensor> {
    let (n, vocab) = check("cross_entropy_backward", logits, targets)?;
    same_device("cross_entropy_backward", &[logits, dloss])?;
    dloss.expect_shape("cross_entropy_backward", "dloss", &[n])?;
    match logits.device() {
        Device::Cpu => {
            let (ls, dl) = (logits.cpu_f32()?, dloss.cpu_f32()?);
            let mut out = vec![0.0; n * vocab];
            if vocab > 0 {
                out.par_chunks_mut(vocab).enumerate().for_each(|(i, g)| {
                    let Ok(t) = usize::try_from(targets[i]) else { return };
                    let row = &ls[i * vocab..(i + 1) * vocab];
                    let lse = log_sum_exp(row);
                    g.iter_mut().zip(row).for_each(|(g, l)| *g = dl[i] * crate::cpu::exp(l - lse));
                    g[t] -= dl[i];
                });
            }
            Ok(Tensor::cpu_from_f32(out, vec![n, vocab], logits.dtype()))
        }
        Device::Cuda(_) => cuda::cross_entropy_backward(logits, targets, dloss, n, vocab),
    }
}

/// [`cross_entropy`] and [`cross_entropy_backward`] in one pass, the logits turned into their
/// gradient in place: training's LM head then never holds logits and gradient at once (each is
/// `[tokens, vocab]`, the largest tensors of a step), and computes each exponential once.
/// Returns the per-token losses (`[n]`, f32) and the gradient.
pub fn cross_entropy_with_grad(logits: Tensor, targets: &[i32], dloss: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "cross_entropy_with_grad";
    let (n, vocab) = check(OP, &logits, targets)?;
    same_device(OP, &[&logits, dloss])?;
    dloss.expect_shape(OP, "dloss", &[n])?;
    match logits.device() {
        Device::Cpu => {
            let dl = dloss.cpu_f32()?;
            let mut losses = vec![0.0; n];
            let mut grad = logits;
            if vocab > 0 {
                grad.cpu_update(|g| {
                    g.par_chunks_mut(vocab).zip(losses.par_iter_mut()).enumerate().for_each(|(i, (row, loss))| {
                        let Ok(t) = usize::try_from(targets[i]) else {
                            row.fill(0.0);
                            return;
                        };
                        let target_logit = row[t];
                        let max = crate::cpu::max(row);
                        row.iter_mut().for_each(|v| *v = crate::cpu::exp(*v - max));
                        let sum = crate::cpu::sum(row);
                        *loss = max + sum.ln() - target_logit;
                        let scale = dl[i] / sum;
                        row.iter_mut().for_each(|v| *v *= scale);
                        row[t] -= dl[i];
                    })
                })?;
            }
            Ok((Tensor::cpu_from_f32(losses, vec![n], crate::DType::F32), grad))
        }
        Device::Cuda(_) => {
            let losses = cuda::cross_entropy(&logits, targets, n, vocab)?;
            let grad = cuda::cross_entropy_backward(&logits, targets, dloss, n, vocab)?;
            Ok((losses, grad))
        }
    }
}

fn check(op: &'static str, logits: &Tensor, targets: &[i32]) -> Result<(usize, usize)> {
    let (n, vocab) = logits.dims2(op)?;
    if targets.len() != n {
        return shape_err(op, format!("{} targets for {n} rows of logits", targets.len()));
    }
    if let Some(t) = targets.iter().find(|&&t| t >= 0 && t as usize >= vocab) {
        return arg_err(op, format!("target {t} outside the vocabulary of {vocab}"));
    }
    Ok((n, vocab))
}
