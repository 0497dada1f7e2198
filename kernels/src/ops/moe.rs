//! Mixture-of-experts: the router's gate (softmax, top-k, optional renormalisation) and the
//! grouped expert matmul over tokens sorted by expert.

use rayon::prelude::*;

use crate::cpu::{Gemm, threads};
use crate::error::{Result, arg_err, shape_err};
use crate::ops::Segments;
use crate::tensor::same_device;
use crate::{DType, Device, Tensor, cuda};

/// The router's decision for a batch of tokens.
#[derive(Clone, Debug)]
pub struct MoeRouting {
    /// `[tokens, top_k]` routing weights (f32), in the order of `experts`.
    pub weights: Tensor,
    /// `tokens × top_k` chosen experts, best first (ties: lower expert id first).
    pub experts: Vec<u32>,
    pub top_k: usize,
}

/// Softmax of the router `logits` (`[tokens, experts]`), then the `top_k` largest
/// probabilities; with `renormalize` they are divided by their sum (Mixtral, and Qwen2-MoE
/// with `norm_topk_prob`).
pub fn moe_gate(logits: &Tensor, top_k: usize, renormalize: bool) -> Result<MoeRouting> {
    let (t, e) = logits.dims2("moe_gate")?;
    if top_k == 0 || top_k > e {
        return arg_err("moe_gate", format!("top_k {top_k} must be in 1..={e}"));
    }
    let probs = crate::ops::softmax(&logits.to_dtype(DType::F32)?)?.to_vec_f32()?;
    let mut experts = Vec::with_capacity(t * top_k);
    let mut weights = Vec::with_capacity(t * top_k);
    for row in probs.chunks_exact(e) {
        let mut order: Vec<u32> = (0..e as u32).collect();
        // Stable sort by descending probability keeps the lower id first on ties.
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        let chosen = &order[..top_k];
        let sum: f32 = chosen.iter().map(|&x| row[x as usize]).sum();
        let norm = if renormalize { sum } else { 1.0 };
        experts.extend_from_slice(chosen);
        weights.extend(chosen.iter().map(|&x| row[x as usize] / norm));
    }
    let weights = Tensor::from_vec(weights, [t, top_k])?.to_device(logits.device())?;
    Ok(MoeRouting { weights, experts, top_k })
}

/// Gradient of [`moe_gate`] w.r.t. the router logits, for upstream `dweights` (`[tokens,
/// top_k]`). No gradient flows through the discrete choice of experts.
pub fn moe_gate_backward(
    logits: &Tensor,
    routing: &MoeRouting,
    dweights: &Tensor,
    renormalize: bool,
) -> Result<Tensor> {
    let (t, e) = logits.dims2("moe_gate_backward")?;
    let k = routing.top_k;
    dweights.expect_shape("moe_gate_backward", "dweights", &[t, k])?;
    let probs = crate::ops::softmax(&logits.to_dtype(DType::F32)?)?;
    let p = probs.to_vec_f32()?;
    let (w, dw) = (routing.weights.to_vec_f32()?, dweights.to_vec_f32()?);
    // Gradient w.r.t. the probabilities (zero off the chosen experts).
    let mut dp = vec![0.0f32; t * e];
    for i in 0..t {
        let chosen = &routing.experts[i * k..(i + 1) * k];
        let (wi, dwi) = (&w[i * k..(i + 1) * k], &dw[i * k..(i + 1) * k]);
        if renormalize {
            // w_j = p_j / S  =>  dp_j = (dw_j − Σ_l dw_l·w_l) / S.
            let sum: f32 = chosen.iter().map(|&x| p[i * e + x as usize]).sum();
            let dot: f32 = dwi.iter().zip(wi).map(|(a, b)| a * b).sum();
            for (j, &x) in chosen.iter().enumerate() {
                dp[i * e + x as usize] += (dwi[j] - dot) / sum;
            }
        } else {
            for (j, &x) in chosen.iter().enumerate() {
                dp[i * e + x as usize] += dwi[j];
            }
        }
    }
    let dp = Tensor::from_vec(dp, [t, e])?.to_device(logits.device())?;
    crate::ops::softmax_backward(&probs, &dp)?.to_dtype(logits.dtype())
}

/// Grouped expert matmul: rows of `x` (`[n, in]`) in segments, each multiplied by its
/// expert's weight `w[e]` (`w` is `[experts, out, in]`, the HF `[out, in]` layout per expert):
/// `y[seg] = x[seg] · w[e]ᵀ`. Rows of a segment with index -1 get zeros.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, segs: &Segments) -> Result<Tensor> {
    const OP: &str = "grouped_matmul";
    let device = same_device(OP, &[x, w])?;
    let (n, k) = x.dims2(OP)?;
    let (experts, out, wk) = w.dims3(OP)?;
    if wk != k {
        return shape_err(OP, format!("x has {k} features, expert weights take {wk}"));
    }
    segs.validate(OP, n, experts)?;
    match device {
        Device::Cpu => {
            let (xs, ws) = (x.cpu_f32()?, w.cpu_f32()?);
            let mut y = vec![0.0; n * out];
            let parts = segs.split_rows_mut(&mut y, out);
            parts.into_par_iter().zip(segs.iter().collect::<Vec<_>>()).for_each(|(ys, (s, e, idx))| {
                if idx >= 0 {
                    let wi = &ws[idx as usize * out * k..];
                    Gemm::new(e - s, out, k, false, true).run(ys, &xs[s * k..], wi, 1.0, false, threads());
                }
            });
            Ok(Tensor::cpu_from_f32(y, vec![n, out], x.dtype()))
        }
        Device::Cuda(_) => cuda::grouped_matmul(x, w, segs, n, k, out),
    }
}

/// Gradients of [`grouped_matmul`]: `(dx, dw)`; `dw` is shaped like `w`, zero for experts no
/// segment used, and computed only with `weight_grad` (frozen experts need just `dx`, and
/// `dw` would cost as much again).
pub fn grouped_matmul_backward(
    x: &Tensor,
    w: &Tensor,
    segs: &Segments,
    dy: &Tensor,
    weight_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    const OP: &str = "grouped_matmul_backward";
    let device = same_device(OP, &[x, w, dy])?;
    let (n, k) = x.dims2(OP)?;
    let (experts, out, wk) = w.dims3(OP)?;
    if wk != k {
        return shape_err(OP, format!("x has {k} features, expert weights take {wk}"));
    }
    dy.expect_shape(OP, "dy", &[n, out])?;
    segs.validate(OP, n, experts)?;
    match device {
        Device::Cpu => {
            let (xs, ws, dys) = (x.cpu_f32()?, w.cpu_f32()?, dy.cpu_f32()?);
            let mut dx = vec![0.0; n * k];
            let mut dw = if weight_grad { vec![0.0; experts * out * k] } else { Vec::new() };
            for ((s, e, idx), dxs) in segs.iter().zip(segs.split_rows_mut(&mut dx, k)) {
                if idx < 0 {
                    continue;
                }
                let off = idx as usize * out * k;
                // dx = dy·W_e ; dW_e += dyᵀ·x.
                Gemm::new(e - s, k, out, false, false).run(dxs, &dys[s * out..], &ws[off..], 1.0, false, threads());
                if weight_grad {
                    let (dw_e, dy_s, x_s) = (&mut dw[off..], &dys[s * out..], &xs[s * k..]);
                    Gemm::new(out, k, e - s, true, false).run(dw_e, dy_s, x_s, 1.0, true, threads());
                }
            }
            let dw = weight_grad.then(|| Tensor::cpu_from_f32(dw, vec![experts, out, k], w.dtype()));
            Ok((Tensor::cpu_from_f32(dx, vec![n, k], x.dtype()), dw))
        }
        Device::Cuda(_) => cuda::grouped_matmul_backward(x, w, segs, dy, weight_grad, n, k, out),
    }
}
