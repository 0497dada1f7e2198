//! `config.json` of a Hugging Face checkpoint, read into one description that covers every
//! architecture Tandem runs.

use std::path::Path;

use serde_json::Value;
use tandem_kernels::ops::RopeScaling;

use crate::error::{Error, Result, read_json};

/// The architectures Tandem runs. All are Llama-style decoders (RMSNorm, RoPE, SwiGLU, GQA);
/// they differ in biases, tying and the MLP (dense or mixture of experts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Mixtral,
    Qwen2Moe,
}

impl Arch {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "MixtralForCausalLM" => Arch::Mixtral,
            "Qwen2MoeForCausalLM" => Arch::Qwen2Moe,
            _ => return None,
        })
    }
}

/// The mixture-of-experts part of a config.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Hidden size of one expert's MLP.
    pub expert_intermediate: usize,
    /// Divide the top-k routing weights by their sum (Mixtral always; Qwen2-MoE with
    /// `norm_topk_prob`).
    pub renormalize: bool,
    /// Qwen2-MoE's shared expert: its hidden size (it has its own sigmoid gate).
    pub shared_expert_intermediate: Option<usize>,
    /// Layers whose MLP is dense instead (Qwen2-MoE's `mlp_only_layers` and
    /// `decoder_sparse_step`).
    pub dense_layers: Vec<usize>,
}

/// Everything the runtime needs from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    /// Hidden size of the dense MLP (layers without experts).
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry biases (Qwen2, Qwen2-MoE, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// The o projection carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    pub moe: Option<MoeConfig>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let raw: Value = read_json(&path)?;
        Self::from_json(&raw).map_err(|e| match e {
            Error::Json { msg, .. } => Error::Json { path: path.clone(), msg },
            other => other,
        })
    }

    /// Parses a config already read as JSON.
    pub fn from_json(raw: &Value) -> Result<Self> {
        let fields = Fields(raw);
        let arch_name = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| json_err("`architectures` is missing"))?;
        let arch = Arch::from_name(arch_name).ok_or_else(|| {
            Error::Unsupported(format!(
                "architecture {arch_name} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, \
                 MixtralForCausalLM, Qwen2MoeForCausalLM)"
            ))
        })?;
        let hidden_size = fields.usize("hidden_size")?;
        let num_heads = fields.usize("num_attention_heads")?;
        let num_kv_heads = fields.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = fields.opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads.max(1));
        let num_layers = fields.usize("num_hidden_layers")?;
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(json_err(format!("{num_heads} attention heads are not a multiple of {num_kv_heads} kv heads")));
        }
        if fields.bool_or("mlp_bias", false)? {
            return Err(Error::Unsupported("`mlp_bias: true`".into()));
        }
        let (rope_theta, rope_scaling) = rope(raw)?;
        let attention_bias = fields.bool_or("attention_bias", false)?;
        let qwen = matches!(arch, Arch::Qwen2 | Arch::Qwen2Moe);
        let moe = match arch {
            Arch::Mixtral => Some(MoeConfig {
                num_experts: fields.usize("num_local_experts")?,
                top_k: fields.usize("num_experts_per_tok")?,
                expert_intermediate: fields.usize("intermediate_size")?,
                renormalize: true,
                shared_expert_intermediate: None,
                dense_layers: Vec::new(),
            }),
            Arch::Qwen2Moe => {
                let step = fields.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
                let only: Vec<usize> = match raw.get("mlp_only_layers") {
                    Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|v| v as usize).collect(),
                    _ => Vec::new(),
                };
                let num_experts = fields.usize("num_experts")?;
                // transformers: layer i has experts iff it is not listed and (i + 1) % step == 0.
                let dense_layers =
                    (0..num_layers).filter(|i| only.contains(i) || num_experts == 0 || (i + 1) % step != 0).collect();
                Some(MoeConfig {
                    num_experts,
                    top_k: fields.usize("num_experts_per_tok")?,
                    expert_intermediate: fields.usize("moe_intermediate_size")?,
                    renormalize: fields.bool_or("norm_topk_prob", false)?,
                    shared_expert_intermediate: fields.opt_usize("shared_expert_intermediate_size")?.filter(|&s| s > 0),
                    dense_layers,
                })
            }
            _ => None,
        };
        if let Some(m) = &moe
            && (m.top_k == 0 || m.top_k > m.num_experts)
        {
            return Err(json_err(format!("num_experts_per_tok {} must be in 1..={}", m.top_k, m.num_experts)));
        }
        let eos_token_ids = match raw.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
            _ => Vec::new(),
        };
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: fields.opt_usize("intermediate_size")?.unwrap_or(0),
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: fields.usize("vocab_size")?,
            rms_norm_eps: fields.f32_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: fields.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: fields.bool_or("tie_word_embeddings", false)?,
            qkv_bias: qwen || attention_bias,
            o_bias: attention_bias,
            moe,
            eos_token_ids,
        })
    }

    /// The MoE settings of layer `layer`, or `None` where its MLP is dense.
    pub fn moe_at(&self, layer: usize) -> Option<&MoeConfig> {
        self.moe.as_ref().filter(|m| !m.dense_layers.contains(&layer))
    }
}

/// `rope_theta` and `rope_scaling`, from the transformers 4 fields or transformers 5's
/// `rope_parameters`.
fn rope(raw: &Value) -> Result<(f32, RopeScaling)> {
    let params = raw.get("rope_parameters").filter(|v| v.is_object());
    let scaling = params.or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()));
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| raw.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0) as f32;
    let Some(s) = scaling else { return Ok((theta, RopeScaling::None)) };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let f = Fields(s);
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: f.f32("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: f.f32("factor")?,
            low_freq_factor: f.f32("low_freq_factor")?,
            high_freq_factor: f.f32("high_freq_factor")?,
            original_max_position_embeddings: f.usize("original_max_position_embeddings")?,
        },
        other => return Err(Error::Unsupported(format!("rope scaling type {other:?} (supported: linear, llama3)"))),
    };
    Ok((theta, scaling))
}

fn json_err(msg: impl Into<String>) -> Error {
    Error::Json { path: "config.json".into(), msg: msg.into() }
}

/// Typed access to the fields of a JSON object, with errors naming the field.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| json_err(format!("`{key}` must be a non-negative integer, got {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| json_err(format!("`{key}` is missing")))
    }

    fn f32(&self, key: &str) -> Result<f32> {
        match self.0.get(key) {
            Some(v) => {
                v.as_f64().map(|n| n as f32).ok_or_else(|| json_err(format!("`{key}` must be a number, got {v}")))
            }
            None => Err(json_err(format!("`{key}` is missing"))),
        }
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        if self.0.get(key).is_none_or(Value::is_null) { Ok(default) } else { self.f32(key) }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| json_err(format!("`{key}` must be true or false, got {v}"))),
        }
    }
}
