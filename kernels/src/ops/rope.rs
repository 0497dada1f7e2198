//! Rotary position embedding, in the "rotate half" layout Hugging Face Llama uses (element `i`
//! pairs with `i + head_dim/2`), with the frequency scalings HF configs name.

use std::f32::consts::PI;

use rayon::prelude::*;

use crate::cpu::multiversion;
use crate::error::{Result, arg_err, shape_err};
use crate::{Device, Tensor, cuda};

/// `rope_scaling` of an HF config.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (`"type": "linear"`).
    Linear { factor: f32 },
    /// Llama 3.1's wavelength-dependent scaling (`"rope_type": "llama3"`).
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
}

/// The rotation frequencies of one model: `head_dim / 2` inverse frequencies.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for `head_dim` (even) and base `theta`, scaled as HF's
    /// `ROPE_INIT_FUNCTIONS` do.
    pub fn new(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return arg_err("rope", format!("head_dim must be even and positive, got {head_dim}"));
        }
        let base: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        let inv_freq = match *scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f32;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Ok(Rope { inv_freq })
    }

    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }
}

/// Rotates `x` (`[tokens, heads, head_dim]`), token `t` by `positions[t]`.
pub fn rope(x: &Tensor, positions: &[u32], rope: &Rope) -> Result<Tensor> {
    rotate("rope", x, positions, rope, 1.0)
}

/// Gradient of [`rope`]: the inverse rotation of `dy`.
pub fn rope_backward(dy: &Tensor, positions: &[u32], rope: &Rope) -> Result<Tensor> {
    rotate("rope_backward", dy, positions, rope, -1.0)
}

/// Rotation by `direction · angle` (the backward of a rotation is the rotation back).
fn rotate(op: &'static str, x: &Tensor, positions: &[u32], rope: &Rope, direction: f32) -> Result<Tensor> {
    let (t, h, d) = x.dims3(op)?;
    if d != rope.head_dim() {
        return shape_err(op, format!("head_dim {d} but rope built for {}", rope.head_dim()));
    }
    if positions.len() != t {
        return shape_err(op, format!("{} positions for {t} tokens", positions.len()));
    }
    match x.device() {
        Device::Cpu => {
            let mut out = x.cpu_f32()?.into_owned();
            if t * h * d > 0 {
                out.par_chunks_mut(h * d).zip(positions.par_iter()).for_each(|(tok, &pos)| {
                    let (sin, cos): (Vec<f32>, Vec<f32>) = rope
                        .inv_freq
                        .iter()
                        .map(|f| (pos as f32 * f).sin_cos())
                        .map(|(s, c)| (direction * s, c))
                        .unzip();
                    rotate_token(tok, &sin, &cos);
                });
            }
            Ok(Tensor::cpu_from_f32(out, vec![t, h, d], x.dtype()))
        }
        Device::Cuda(_) => cuda::rope(x, positions, &rope.inv_freq, direction, t, h, d),
    }
}

multiversion! {
    /// Rotates every head of one token (`tok`: `[heads, 2·half]`) by the angles whose sines and
    /// cosines (`half` each) are given.
    pub(crate) fn rotate_token(tok: &mut [f32], sin: &[f32], cos: &[f32]) {
        let half = sin.len();
        for head in tok.chunks_exact_mut(2 * half) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * cos[i] - b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}
