//! The base model's weights, read from a checkpoint by their Hugging Face names.

use std::path::Path;

use tandem_kernels::{DType, Device, Tensor};

use super::config::{Arch, ModelConfig};
use super::tensor_parallel::Split;
use crate::error::{Error, Result, read_json};
use crate::safetensors_file::{SafetensorsFile, TensorSource};

/// A linear layer in HF layout: `weight` `[out, in]`, optional `bias` `[out]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// A SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
#[derive(Clone, Debug)]
pub struct DenseMlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// A mixture-of-experts MLP. Expert weights are stacked per projection, `[experts, out, in]`,
/// the layout of the grouped expert matmul.
#[derive(Clone, Debug)]
pub struct MoeMlp {
    pub router: Linear,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    /// Qwen2-MoE's shared expert and its sigmoid gate (`[1, hidden]`).
    pub shared: Option<(DenseMlp, Linear)>,
}

// One per layer: the size difference between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Mlp {
    Dense(DenseMlp),
    Moe(MoeMlp),
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub input_norm: Tensor,
    pub post_attention_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp: Mlp,
}

#[derive(Clone, Debug)]
pub struct Weights {
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when the embeddings are tied.
    pub lm_head: Option<Tensor>,
}

/// Opens the checkpoint of `dir`: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn open_checkpoint(dir: &Path) -> Result<TensorSource> {
    let index = dir.join("model.safetensors.index.json");
    let files = if index.exists() {
        let raw: serde_json::Value = read_json(&index)?;
        let map = raw
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Json { path: index.clone(), msg: "`weight_map` is missing".into() })?;
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
            .into_iter()
            .map(|s| {
                if s.contains('/') || s.contains("..") {
                    return Err(Error::Format(format!("{}: shard name {s:?} is not a file name", index.display())));
                }
                SafetensorsFile::open(&dir.join(s))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        vec![SafetensorsFile::open(&dir.join("model.safetensors"))?]
    };
    TensorSource::new(files)
}

/// Reads every weight the config calls for, checks its shape, converts it to `dtype` and moves
/// it to `device`. A missing or mis-shaped tensor is an error naming it.
pub fn load_weights(cfg: &ModelConfig, src: &TensorSource, dtype: DType, device: Device) -> Result<Weights> {
    load_weights_cut(cfg, src, dtype, device, None)
}

/// [`load_weights`], keeping of each weight only the part `cut` says (a tensor-parallel
/// rank's): the whole model never exists at once, only one layer of it before it is cut.
pub(super) fn load_weights_cut(
    cfg: &ModelConfig,
    src: &TensorSource,
    dtype: DType,
    device: Device,
    cut: Option<&Split>,
) -> Result<Weights> {
    let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
        Ok(src.get(name, shape)?.into_dtype(dtype)?.into_device(device)?)
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let (q_out, kv_out) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        Ok(Linear {
            weight: get(&format!("{name}.weight"), &[out, inp])?,
            bias: if bias { Some(get(&format!("{name}.bias"), &[out])?) } else { None },
        })
    };
    let dense = |prefix: &str, inter: usize| -> Result<DenseMlp> {
        Ok(DenseMlp {
            gate: linear(&format!("{prefix}.gate_proj"), inter, h, false)?,
            up: linear(&format!("{prefix}.up_proj"), inter, h, false)?,
            down: linear(&format!("{prefix}.down_proj"), h, inter, false)?,
        })
    };
    let vocab = |t: Tensor| match cut {
        Some(sp) => sp.vocab_rows(&t),
        None => Ok(t),
    };
    // The largest tensor first, while nothing else is held: its read and conversion need room
    // for both dtypes at once, which at the end of the load would set the process's peak.
    let embed = vocab(get("model.embed_tokens.weight", &[v, h])?)?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let mlp = match cfg.moe_at(i) {
            None => Mlp::Dense(dense(&format!("{p}.mlp"), cfg.intermediate_size)?),
            Some(moe) => {
                let (e, inter) = (moe.num_experts, moe.expert_intermediate);
                let shared = match moe.shared_expert_intermediate {
                    Some(si) => Some((
                        dense(&format!("{p}.mlp.shared_expert"), si)?,
                        linear(&format!("{p}.mlp.shared_expert_gate"), 1, h, false)?,
                    )),
                    None => None,
                };
                let fused = format!("{p}.mlp.experts.gate_up_proj");
                let (block, gate, up, down) = if src.contains(&fused) {
                    // transformers 5 with `save_original_format=False`: `gate_up_proj`
                    // `[E, 2I, H]` (gate rows, then up rows) and `down_proj` `[E, H, I]`.
                    let gate_up = src.get(&fused, &[e, 2 * inter, h])?.into_dtype(dtype)?.to_vec_f32()?;
                    let half = |second: bool| -> Result<Tensor> {
                        let rows = inter * h;
                        let data = (0..e).flat_map(|x| {
                            let start = x * 2 * rows + if second { rows } else { 0 };
                            gate_up[start..start + rows].iter().copied()
                        });
                        Ok(Tensor::from_vec(data.collect(), [e, inter, h])?.into_dtype(dtype)?.into_device(device)?)
                    };
                    ("mlp", half(false)?, half(true)?, get(&format!("{p}.mlp.experts.down_proj"), &[e, h, inter])?)
                } else {
                    let (block, names) = expert_names(cfg.arch);
                    let stacked = |proj: &str, out: usize, inp: usize| -> Result<Tensor> {
                        let per_expert: Vec<Tensor> = (0..e)
                            .map(|x| get(&format!("{p}.{block}.experts.{x}.{proj}.weight"), &[out, inp]))
                            .collect::<Result<_>>()?;
                        stack(&per_expert, device)
                    };
                    (block, stacked(names[0], inter, h)?, stacked(names[1], inter, h)?, stacked(names[2], h, inter)?)
                };
                Mlp::Moe(MoeMlp { router: linear(&format!("{p}.{block}.gate"), e, h, false)?, gate, up, down, shared })
            }
        };
        let layer = Layer {
            input_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
            post_attention_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            q: linear(&format!("{p}.self_attn.q_proj"), q_out, h, cfg.qkv_bias)?,
            k: linear(&format!("{p}.self_attn.k_proj"), kv_out, h, cfg.qkv_bias)?,
            v: linear(&format!("{p}.self_attn.v_proj"), kv_out, h, cfg.qkv_bias)?,
            o: linear(&format!("{p}.self_attn.o_proj"), h, q_out, cfg.o_bias)?,
            mlp,
        };
        layers.push(match cut {
            Some(sp) => sp.layer(&layer)?,
            None => layer,
        });
    }
    let lm_head = if cfg.tie_word_embeddings { None } else { Some(vocab(get("lm_head.weight", &[v, h])?)?) };
    Ok(Weights { embed, layers, norm: get("model.norm.weight", &[h])?, lm_head })
}

/// The module holding the experts, and the names of an expert's gate, up and down projections
/// (the per-expert layout of transformers 4 checkpoints).
pub fn expert_names(arch: Arch) -> (&'static str, [&'static str; 3]) {
    match arch {
        Arch::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
        _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
    }
}

/// Stacks equally shaped tensors along a new first dim.
pub fn stack(parts: &[Tensor], device: Device) -> Result<Tensor> {
    let Some(first) = parts.first() else { return Err(Error::Format("nothing to stack".into())) };
    let mut shape = vec![parts.len()];
    shape.extend_from_slice(first.shape());
    let mut data = Vec::with_capacity(first.elem_count() * parts.len());
    for p in parts {
        data.extend(p.to_vec_f32()?);
    }
    Ok(Tensor::from_vec(data, shape)?.into_dtype(first.dtype())?.into_device(device)?)
}
