//! Random-weight models in Hugging Face format, for demos, tests and benchmarks; no downloads.
//!
//! [`write_model`] writes `config.json` (keys as transformers writes them for the architecture),
//! `generation_config.json`, `model.safetensors` (HF tensor names and shapes), `tokenizer.json`
//! and `tokenizer_config.json` (ChatML template). The tokenizer is a byte-level BPE learned in
//! code from a small embedded English text (see [`build_tokenizer`]), so common words are one or
//! two tokens.
//!
//! | preset         | architecture          | hidden | layers | heads/kv | inter.            | vocab  | dtype |
//! |----------------|-----------------------|--------|--------|----------|-------------------|--------|-------|
//! | `tiny`         | `LlamaForCausalLM`    | 64     | 2      | 4/2      | 128               | 512    | f32   |
//! | `tiny-moe`     | `Qwen2MoeForCausalLM` | 64     | 2      | 4/2      | 8 experts × 32, top-2, shared 64 | 512 | f32 |
//! | `small`        | `LlamaForCausalLM`    | 256    | 4      | 8/4      | 688               | 512    | bf16  |
//! | `qwen2.5-0.5b` | `Qwen2ForCausalLM`    | 896    | 24     | 14/2     | 4864              | 151936 | bf16  |
//!
//! Tiny presets are f32 so CPU tests compare numerics without bf16 rounding; the larger ones are
//! bf16 like the checkpoints they stand in for. Weights are uniform with standard deviation 0.02
//! (the `initializer_range` of the configs), biases uniform with std 0.01, RMSNorm weights 1.
//! Values come from a counter-based generator keyed by (seed, tensor name, element index), so the
//! bytes depend only on the seed, not on thread scheduling, and each tensor is generated,
//! converted and written on its own (peak memory ≈ the largest tensor, 272 MB for Qwen2.5's
//! embedding).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use rayon::prelude::*;
use serde_json::{Value, json};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

use crate::error::{Error, Result};
use crate::rng::splitmix64;

/// Special tokens of the generated tokenizer, in id order after the BPE vocabulary.
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
const SPECIAL_TOKENS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];

/// Size of the generated tokenizer's BPE vocabulary (256 bytes + merges); with the three special
/// tokens the tokenizer has exactly 512 tokens, a kernel-friendly vocab size.
const BPE_VOCAB_SIZE: usize = 509;

/// ChatML (as in HF's docs and Qwen's tokenizer_config), with tools the way Qwen2.5's template
/// shows them: their signatures in the system turn, calls as `<tool_call>` JSON
/// ([`crate::tools`]). Without tools it is the classic ChatML template.
pub const CHATML_TEMPLATE: &str = r#"{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}
{{- '# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nTo call a function, answer with its name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if not (tools and loop.first and message['role'] == 'system') %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] }}
{%- for call in message['tool_calls'] or [] %}
{%- if not loop.first or message['content'] %}{{- '\n' }}{%- endif %}
{{- '<tool_call>\n{"name": "' + call['function']['name'] + '", "arguments": ' + (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"#;

/// The transformers version the written configs claim; their keys follow that version.
const TRANSFORMERS_VERSION: &str = "4.46.3";

const WEIGHT_STD: f32 = 0.02;
const BIAS_STD: f32 = 0.01;

/// A random-weight model shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    Tiny,
    TinyMoe,
    Small,
    Qwen25_05b,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::Tiny, Preset::TinyMoe, Preset::Small, Preset::Qwen25_05b];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::TinyMoe => "tiny-moe",
            Preset::Small => "small",
            Preset::Qwen25_05b => "qwen2.5-0.5b",
        }
    }

    /// The model dimensions of the preset.
    pub fn spec(self) -> ModelSpec {
        match self {
            Preset::Tiny => ModelSpec {
                architecture: Architecture::Llama,
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                intermediate_size: 128,
                vocab_size: None,
                max_position_embeddings: 512,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
                tie_word_embeddings: false,
                dtype: WeightDtype::F32,
                moe: None,
            },
            Preset::TinyMoe => ModelSpec {
                architecture: Architecture::Qwen2Moe,
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                // Only used by dense (`mlp_only_layers`) layers, of which there are none.
                intermediate_size: 128,
                vocab_size: None,
                max_position_embeddings: 512,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                tie_word_embeddings: false,
                dtype: WeightDtype::F32,
                moe: Some(MoeSpec {
                    num_experts: 8,
                    num_experts_per_tok: 2,
                    moe_intermediate_size: 32,
                    shared_expert_intermediate_size: 64,
                    norm_topk_prob: false,
                }),
            },
            Preset::Small => ModelSpec {
                architecture: Architecture::Llama,
                hidden_size: 256,
                num_hidden_layers: 4,
                num_attention_heads: 8,
                num_key_value_heads: 4,
                intermediate_size: 688,
                vocab_size: None,
                max_position_embeddings: 2048,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
                tie_word_embeddings: false,
                dtype: WeightDtype::Bf16,
                moe: None,
            },
            Preset::Qwen25_05b => ModelSpec {
                architecture: Architecture::Qwen2,
                hidden_size: 896,
                num_hidden_layers: 24,
                num_attention_heads: 14,
                num_key_value_heads: 2,
                intermediate_size: 4864,
                vocab_size: Some(151_936),
                max_position_embeddings: 32768,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                tie_word_embeddings: true,
                dtype: WeightDtype::Bf16,
                moe: None,
            },
        }
    }
}

impl FromStr for Preset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Preset::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            Error::InvalidRequest(format!("unknown model preset `{s}`; expected one of: {}", names.join(", ")))
        })
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The HF architecture a preset imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `LlamaForCausalLM`: no attention biases.
    Llama,
    /// `Qwen2ForCausalLM`: q/k/v biases.
    Qwen2,
    /// `Qwen2MoeForCausalLM`: q/k/v biases, routed experts plus a gated shared expert.
    Qwen2Moe,
}

impl Architecture {
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen2Moe => "qwen2_moe",
        }
    }

    fn has_qkv_bias(self) -> bool {
        !matches!(self, Architecture::Llama)
    }
}

/// Storage dtype of the written weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    Bf16,
}

impl WeightDtype {
    pub fn size_in_bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 => 2,
        }
    }

    /// `torch_dtype` in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
        }
    }

    fn safetensors_dtype(self) -> safetensors::Dtype {
        match self {
            WeightDtype::F32 => safetensors::Dtype::F32,
            WeightDtype::Bf16 => safetensors::Dtype::BF16,
        }
    }
}

/// Mixture-of-experts dimensions (Qwen2-MoE naming).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeSpec {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    pub norm_topk_prob: bool,
}

/// Model dimensions of a preset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelSpec {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    /// `None`: the generated tokenizer's size.
    pub vocab_size: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub dtype: WeightDtype,
    pub moe: Option<MoeSpec>,
}

impl ModelSpec {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Uniform with mean 0 and this standard deviation.
    Uniform { std: f32 },
    /// All ones (RMSNorm weights).
    Ones,
}

/// One tensor of the checkpoint: HF name, shape (row-major, `[out, in]` for linear weights).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    fn new(name: String, shape: &[usize], init: Init) -> Self {
        TensorSpec { name, shape: shape.to_vec(), init }
    }

    fn weight(name: String, shape: &[usize]) -> Self {
        TensorSpec::new(name, shape, Init::Uniform { std: WEIGHT_STD })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor of the checkpoint for `spec` with `vocab_size` rows of embeddings, sorted by
/// name (the order of the safetensors file).
pub fn tensor_specs(spec: &ModelSpec, vocab_size: usize) -> Vec<TensorSpec> {
    let h = spec.hidden_size;
    let mut tensors = vec![
        TensorSpec::weight("model.embed_tokens.weight".into(), &[vocab_size, h]),
        TensorSpec::new("model.norm.weight".into(), &[h], Init::Ones),
    ];
    if !spec.tie_word_embeddings {
        tensors.push(TensorSpec::weight("lm_head.weight".into(), &[vocab_size, h]));
    }
    for layer in 0..spec.num_hidden_layers {
        let prefix = format!("model.layers.{layer}");
        tensors.push(TensorSpec::new(format!("{prefix}.input_layernorm.weight"), &[h], Init::Ones));
        tensors.push(TensorSpec::new(format!("{prefix}.post_attention_layernorm.weight"), &[h], Init::Ones));
        push_attention(&mut tensors, spec, &format!("{prefix}.self_attn"));
        match spec.moe {
            Some(moe) => push_moe_mlp(&mut tensors, h, &moe, &format!("{prefix}.mlp")),
            None => push_mlp(&mut tensors, h, spec.intermediate_size, &format!("{prefix}.mlp")),
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    tensors
}

fn push_attention(tensors: &mut Vec<TensorSpec>, spec: &ModelSpec, prefix: &str) {
    let h = spec.hidden_size;
    let q_dim = spec.num_attention_heads * spec.head_dim();
    let kv_dim = spec.num_key_value_heads * spec.head_dim();
    for (proj, out_dim) in [("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)] {
        tensors.push(TensorSpec::weight(format!("{prefix}.{proj}.weight"), &[out_dim, h]));
        if spec.architecture.has_qkv_bias() {
            tensors.push(TensorSpec::new(format!("{prefix}.{proj}.bias"), &[out_dim], Init::Uniform { std: BIAS_STD }));
        }
    }
    tensors.push(TensorSpec::weight(format!("{prefix}.o_proj.weight"), &[h, q_dim]));
}

/// SwiGLU MLP: gate/up `[inter, hidden]`, down `[hidden, inter]`.
fn push_mlp(tensors: &mut Vec<TensorSpec>, hidden: usize, inter: usize, prefix: &str) {
    tensors.push(TensorSpec::weight(format!("{prefix}.gate_proj.weight"), &[inter, hidden]));
    tensors.push(TensorSpec::weight(format!("{prefix}.up_proj.weight"), &[inter, hidden]));
    tensors.push(TensorSpec::weight(format!("{prefix}.down_proj.weight"), &[hidden, inter]));
}

/// Qwen2-MoE sparse block: router, per-expert MLPs, shared expert and its scalar gate.
fn push_moe_mlp(tensors: &mut Vec<TensorSpec>, hidden: usize, moe: &MoeSpec, prefix: &str) {
    tensors.push(TensorSpec::weight(format!("{prefix}.gate.weight"), &[moe.num_experts, hidden]));
    for expert in 0..moe.num_experts {
        push_mlp(tensors, hidden, moe.moe_intermediate_size, &format!("{prefix}.experts.{expert}"));
    }
    push_mlp(tensors, hidden, moe.shared_expert_intermediate_size, &format!("{prefix}.shared_expert"));
    tensors.push(TensorSpec::weight(format!("{prefix}.shared_expert_gate.weight"), &[1, hidden]));
}

/// Token ids of the generated tokenizer's special tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    pub endoftext: u32,
    pub im_start: u32,
    pub im_end: u32,
}

impl SpecialIds {
    pub fn of(tokenizer: &Tokenizer) -> Result<Self> {
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| Error::Format(format!("generated tokenizer lacks special token {token}")))
        };
        Ok(SpecialIds { endoftext: id(ENDOFTEXT)?, im_start: id(IM_START)?, im_end: id(IM_END)? })
    }
}

/// `config.json` of `preset`, as [`write_model`] writes it (builds the tokenizer for its size and
/// special ids, but writes nothing).
pub fn config_json(preset: Preset) -> Result<Value> {
    let tokenizer = build_tokenizer()?;
    let spec = preset.spec();
    Ok(config_for(&spec, vocab_size_for(&spec, &tokenizer), SpecialIds::of(&tokenizer)?))
}

fn vocab_size_for(spec: &ModelSpec, tokenizer: &Tokenizer) -> usize {
    spec.vocab_size.unwrap_or_else(|| tokenizer.get_vocab_size(true))
}

/// The keys transformers writes for the architecture (sorted, as `save_pretrained` does).
fn config_for(spec: &ModelSpec, vocab_size: usize, ids: SpecialIds) -> Value {
    let arch = spec.architecture;
    let mut config = json!({
        "architectures": [arch.class_name()],
        "attention_dropout": 0.0,
        "bos_token_id": ids.endoftext,
        "eos_token_id": ids.im_end,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": WEIGHT_STD,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": arch.model_type(),
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": null,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": spec.dtype.torch_name(),
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": true,
        "vocab_size": vocab_size,
    });
    let extra = match arch {
        Architecture::Llama => json!({
            "attention_bias": false,
            "head_dim": spec.head_dim(),
            "mlp_bias": false,
            "pretraining_tp": 1,
        }),
        Architecture::Qwen2 | Architecture::Qwen2Moe => json!({
            "max_window_layers": spec.num_hidden_layers,
            "sliding_window": spec.max_position_embeddings,
            "use_sliding_window": false,
        }),
    };
    merge_into(&mut config, extra);
    if let Some(moe) = spec.moe {
        merge_into(
            &mut config,
            json!({
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "moe_intermediate_size": moe.moe_intermediate_size,
                "norm_topk_prob": moe.norm_topk_prob,
                "num_experts": moe.num_experts,
                "num_experts_per_tok": moe.num_experts_per_tok,
                "output_router_logits": false,
                "router_aux_loss_coef": 0.001,
                "shared_expert_intermediate_size": moe.shared_expert_intermediate_size,
            }),
        );
    }
    config
}

fn merge_into(target: &mut Value, extra: Value) {
    if let (Value::Object(target), Value::Object(extra)) = (target, extra) {
        target.extend(extra);
    }
}

fn generation_config_for(ids: SpecialIds) -> Value {
    json!({
        "bos_token_id": ids.endoftext,
        "eos_token_id": [ids.im_end, ids.endoftext],
        "pad_token_id": ids.endoftext,
        "transformers_version": TRANSFORMERS_VERSION,
    })
}

/// Writes the random-weight model `preset` into `out` (created if missing; files overwritten).
pub fn write_model(preset: Preset, out: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    let tokenizer = build_tokenizer()?;
    let ids = SpecialIds::of(&tokenizer)?;
    let spec = preset.spec();
    let vocab_size = vocab_size_for(&spec, &tokenizer);
    write_json(&out.join("config.json"), &config_for(&spec, vocab_size, ids))?;
    write_json(&out.join("generation_config.json"), &generation_config_for(ids))?;
    write_tokenizer_files(out, &tokenizer, spec.max_position_embeddings)?;
    write_safetensors(&out.join("model.safetensors"), &tensor_specs(&spec, vocab_size), spec.dtype, seed)
}

/// Writes `tokenizer.json` and `tokenizer_config.json` of the generated tokenizer into `out`.
pub fn write_tokenizer(out: &Path, model_max_length: usize) -> Result<()> {
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    write_tokenizer_files(out, &build_tokenizer()?, model_max_length)
}

fn write_tokenizer_files(out: &Path, tokenizer: &Tokenizer, model_max_length: usize) -> Result<()> {
    let path = out.join("tokenizer.json");
    let text = tokenizer.to_string(true).map_err(|e| Error::Json { path: path.clone(), msg: e.to_string() })?;
    std::fs::write(&path, text).map_err(Error::io(&path))?;
    write_json(&out.join("tokenizer_config.json"), &tokenizer_config_for(SpecialIds::of(tokenizer)?, model_max_length))
}

/// `tokenizer_config.json` as transformers writes it for a Qwen-style fast tokenizer.
fn tokenizer_config_for(ids: SpecialIds, model_max_length: usize) -> Value {
    let added = |content: &str| {
        json!({
            "content": content, "lstrip": false, "normalized": false, "rstrip": false,
            "single_word": false, "special": true,
        })
    };
    json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": {
            ids.endoftext.to_string(): added(ENDOFTEXT),
            ids.im_start.to_string(): added(IM_START),
            ids.im_end.to_string(): added(IM_END),
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": ENDOFTEXT,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": null,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })?;
    std::fs::write(path, text + "\n").map_err(Error::io(path))
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// Writes the checkpoint one tensor at a time: the header is known from the shapes alone, so
/// no tensor waits in memory for the others. Written to a temporary name and renamed, so an
/// interrupted run leaves no truncated `model.safetensors`.
fn write_safetensors(path: &Path, tensors: &[TensorSpec], dtype: WeightDtype, seed: u64) -> Result<()> {
    let header = safetensors_header(tensors, dtype)?;
    let partial = path.with_extension("safetensors.partial");
    let file = File::create(&partial).map_err(Error::io(&partial))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let write_err = Error::io(&partial);
    let result = (|| {
        writer.write_all(&(header.len() as u64).to_le_bytes())?;
        writer.write_all(&header)?;
        for tensor in tensors {
            writer.write_all(&tensor_bytes(tensor, dtype, seed))?;
        }
        writer.flush()
    })();
    result.map_err(write_err)?;
    drop(writer);
    std::fs::rename(&partial, path).map_err(Error::io(path))
}

/// The JSON header (via the safetensors crate's own `Metadata`, so the format is the crate's),
/// padded with spaces to a multiple of 8 bytes as the format recommends.
fn safetensors_header(tensors: &[TensorSpec], dtype: WeightDtype) -> Result<Vec<u8>> {
    let mut offset = 0;
    let infos = tensors
        .iter()
        .map(|t| {
            let size = t.numel() * dtype.size_in_bytes();
            let info = safetensors::tensor::TensorInfo {
                dtype: dtype.safetensors_dtype(),
                shape: t.shape.clone(),
                data_offsets: (offset, offset + size),
            };
            offset += size;
            (t.name.clone(), info)
        })
        .collect();
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = safetensors::tensor::Metadata::new(Some(format), infos)
        .map_err(|e| Error::Format(format!("safetensors header: {e}")))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| Error::Format(format!("safetensors header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

/// Elements per parallel work item.
const CHUNK_ELEMS: usize = 1 << 16;

/// The little-endian bytes of one tensor, generated in parallel.
fn tensor_bytes(tensor: &TensorSpec, dtype: WeightDtype, seed: u64) -> Vec<u8> {
    let elem = dtype.size_in_bytes();
    let key = tensor_key(seed, &tensor.name);
    let init = tensor.init;
    let mut bytes = vec![0u8; tensor.numel() * elem];
    bytes.par_chunks_mut(CHUNK_ELEMS * elem).enumerate().for_each(|(chunk, out)| {
        let first = chunk * CHUNK_ELEMS;
        for (i, dst) in out.chunks_exact_mut(elem).enumerate() {
            let value = init_value(init, key, (first + i) as u64);
            match dtype {
                WeightDtype::F32 => dst.copy_from_slice(&value.to_le_bytes()),
                WeightDtype::Bf16 => dst.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
            }
        }
    });
    bytes
}

/// Per-tensor stream key: the seed mixed with a stable (FNV-1a) hash of the name, so a tensor's
/// values do not depend on which other tensors exist.
fn tensor_key(seed: u64, name: &str) -> u64 {
    let fnv = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    splitmix64(seed ^ splitmix64(fnv))
}

/// Element `index` of a tensor: counter-based, so any chunking gives the same values.
fn init_value(init: Init, key: u64, index: u64) -> f32 {
    match init {
        Init::Ones => 1.0,
        Init::Uniform { std } => {
            let bits = splitmix64(key.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            // 24 random bits → u in [0, 1); U(-a, a) has std a/√3.
            let u = (bits >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
            (2.0 * u - 1.0) * std * 3f32.sqrt()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tokenizer

/// Text the BPE merges are learned from: everyday English plus chat and code-ish words, so
/// prompts in demos and tests tokenize into short sequences.
const CORPUS: &str = "\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran away into the forest.
Hello, world! How are you today? I am fine, thank you. What is your name? My name is Tandem.
Once upon a time, there was a little girl who lived in a village near the forest. She would often go \
to the river with her mother and father. They would sit by the water and talk about the day.
The system serves large language models and fine-tunes them at the same time. It can answer questions, \
write stories, translate text, and explain how things work. The model reads the prompt, then it \
generates one token after another until it reaches the end of the answer or the maximum number of tokens.
You are a helpful assistant. Please answer the question below. The user asked a question about the \
weather in the city, and the assistant said that it would be sunny in the morning and rainy in the evening.
In the beginning of the year, the company made a plan for the future. The people who work there said \
that they would like to have more time for their families, and the company agreed with them.
There are many things that we do not know about the world. Some of them are small and some of them are \
very large, but all of them are important. When we learn something new, we understand the world better.
Water is made of hydrogen and oxygen. The sun is a star, and the earth moves around the sun once every \
year. The moon moves around the earth. Light from the sun takes about eight minutes to reach us.
This is a test of the tokenizer. This is only a test. If this were a real message, you would have been \
told what to do. Thank you for your time and attention.
def main():\n    print(\"hello world\")\n    return 0\n\nfor i in range(10):\n    if i % 2 == 0:\n        print(i)\n
The numbers one, two, three, four, five, six, seven, eight, nine and ten are small numbers. 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025.
What do you think about this idea? I think that it is a good idea, but we should ask the others first. \
Would you like to come with me? Yes, I would like that very much. No, thank you, I have to go home now.
He said that he was going to the store to buy some bread, milk, and eggs. She said that she would meet \
him there after work. They had dinner together and then they went for a walk in the park.
The training data is used to learn the weights of the model. The learning rate controls how large each \
step of the optimizer is. A small learning rate is slow, and a large learning rate can be unstable.
Please write a short poem about the sea. The sea is blue and deep and wide; it moves with every wind and tide.
";

/// The byte-level BPE tokenizer of the generated models: GPT-2 byte alphabet (ids 0..=255 are
/// the bytes), merges learned greedily from [`CORPUS`] until the BPE vocabulary has 509 tokens,
/// then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as special tokens (ids 509, 510, 511).
/// Deterministic: ties between equally frequent pairs go to the pair of lower ids.
pub fn build_tokenizer() -> Result<Tokenizer> {
    let alphabet = byte_alphabet();
    let (vocab, merges) = learn_bpe(CORPUS, &alphabet, BPE_VOCAB_SIZE)?;
    let vocab: Vocab = vocab.into_iter().enumerate().map(|(id, token)| (token, id as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    // No prefix space: decoding then reproduces the input text byte for byte.
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, false, true)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, true)));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, false, true)));
    tokenizer
        .add_special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)))
        .map_err(|e| Error::Tokenizer(format!("adding special tokens: {e}")))?;
    Ok(tokenizer)
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`): printable Latin-1 bytes map to
/// themselves, the others to U+0100 onwards in byte order.
fn byte_alphabet() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next_shifted = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next_shifted).unwrap_or('\u{FFFD}');
            next_shifted += 1;
            c
        };
    }
    table
}

type Merges = Vec<(String, String)>;

/// Greedy BPE learning over the words of `corpus` (split by the same ByteLevel pre-tokenizer
/// the tokenizer uses). Returns the vocabulary by id and the merges in rank order.
fn learn_bpe(corpus: &str, alphabet: &[char; 256], target: usize) -> Result<(Vec<String>, Merges)> {
    let char_ids: HashMap<char, u32> = alphabet.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
    let mut words: Vec<(Vec<u32>, usize)> = word_counts(corpus)?
        .into_iter()
        .map(|(word, count)| (word.chars().filter_map(|c| char_ids.get(&c).copied()).collect(), count))
        .collect();
    let mut vocab: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    let mut ids: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut merges = Vec::new();
    while vocab.len() < target {
        let Some(((a, b), count)) = most_frequent_pair(&words) else { break };
        if count < 2 {
            break;
        }
        let (left, right) = (vocab[a as usize].clone(), vocab[b as usize].clone());
        let merged = format!("{left}{right}");
        // Two different merges can spell the same token ("a"+"bc", "ab"+"c"); it keeps one id.
        let id = *ids.entry(merged.clone()).or_insert_with(|| {
            vocab.push(merged);
            (vocab.len() - 1) as u32
        });
        merges.push((left, right));
        for (symbols, _) in &mut words {
            merge_pair(symbols, (a, b), id);
        }
    }
    Ok((vocab, merges))
}

/// Pre-tokenized words of `corpus` (in byte-level characters) with their counts, in a sorted map
/// so learning is deterministic.
fn word_counts(corpus: &str) -> Result<BTreeMap<String, usize>> {
    let mut pre = PreTokenizedString::from(corpus);
    ByteLevel::new(false, false, true)
        .pre_tokenize(&mut pre)
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizing the corpus: {e}")))?;
    let mut counts = BTreeMap::new();
    for (word, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *counts.entry(word.to_string()).or_insert(0) += 1;
    }
    Ok(counts)
}

/// The most frequent adjacent pair; ties go to the smallest pair of ids.
fn most_frequent_pair(words: &[(Vec<u32>, usize)]) -> Option<((u32, u32), usize)> {
    let mut counts: HashMap<(u32, u32), usize> = HashMap::new();
    for (symbols, count) in words {
        for pair in symbols.windows(2) {
            *counts.entry((pair[0], pair[1])).or_insert(0) += count;
        }
    }
    counts.into_iter().max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0)))
}

/// Replaces each non-overlapping occurrence of `pair` (left to right) by `merged`.
fn merge_pair(symbols: &mut Vec<u32>, pair: (u32, u32), merged: u32) {
    let mut out = Vec::with_capacity(symbols.len());
    let mut i = 0;
    while i < symbols.len() {
        if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
            out.push(merged);
            i += 2;
        } else {
            out.push(symbols[i]);
            i += 1;
        }
    }
    *symbols = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection_onto_printables() {
        let table = byte_alphabet();
        let distinct: std::collections::HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn uniform_init_has_the_requested_std() {
        let n = 100_000;
        let values: Vec<f64> = (0..n).map(|i| f64::from(init_value(Init::Uniform { std: 0.02 }, 42, i))).collect();
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "std {}", var.sqrt());
    }

    #[test]
    fn merge_pair_is_left_to_right_and_non_overlapping() {
        let mut s = vec![1, 1, 1, 2];
        merge_pair(&mut s, (1, 1), 9);
        assert_eq!(s, vec![9, 1, 2]);
    }
}
