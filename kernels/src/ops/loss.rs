//! Cross-entropy over the vocabulary, per token, with ignored positions.

use rayon::prelude::*;

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
                    g.iter_mut().zip(row).for_each(|(g, l)| *g = dl[i] * (l - lse).exp());
                    g[t] -= dl[i];
                });
            }
            Ok(Tensor::cpu_from_f32(out, vec![n, vocab], logits.dtype()))
        }
        Device::Cuda(_) => cuda::cross_entropy_backward(logits, targets, dloss, n, vocab),
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

pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}
