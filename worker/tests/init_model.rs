//! Random-weight model presets: files, config values, tensor names/shapes/dtypes, determinism.

// A failed call is a failed test; helpers outside `#[test]` fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use tandem_worker::init_model::{Preset, config_json, write_model};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("init_model").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn read_config(dir: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// Expected `name -> shape`, written from the HF modeling code's module names.
struct Dims {
    vocab: usize,
    hidden: usize,
    layers: usize,
    q_dim: usize,
    kv_dim: usize,
    inter: usize,
    tied: bool,
    qkv_bias: bool,
    /// (experts, expert intermediate, shared intermediate)
    moe: Option<(usize, usize, usize)>,
}

fn expected_tensors(d: &Dims) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    let mut add = |name: String, shape: &[usize]| {
        m.insert(name, shape.to_vec());
    };
    add("model.embed_tokens.weight".into(), &[d.vocab, d.hidden]);
    add("model.norm.weight".into(), &[d.hidden]);
    if !d.tied {
        add("lm_head.weight".into(), &[d.vocab, d.hidden]);
    }
    for i in 0..d.layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[d.hidden]);
        add(format!("{p}.post_attention_layernorm.weight"), &[d.hidden]);
        add(format!("{p}.self_attn.q_proj.weight"), &[d.q_dim, d.hidden]);
        add(format!("{p}.self_attn.k_proj.weight"), &[d.kv_dim, d.hidden]);
        add(format!("{p}.self_attn.v_proj.weight"), &[d.kv_dim, d.hidden]);
        add(format!("{p}.self_attn.o_proj.weight"), &[d.hidden, d.q_dim]);
        if d.qkv_bias {
            add(format!("{p}.self_attn.q_proj.bias"), &[d.q_dim]);
            add(format!("{p}.self_attn.k_proj.bias"), &[d.kv_dim]);
            add(format!("{p}.self_attn.v_proj.bias"), &[d.kv_dim]);
        }
        match d.moe {
            None => {
                add(format!("{p}.mlp.gate_proj.weight"), &[d.inter, d.hidden]);
                add(format!("{p}.mlp.up_proj.weight"), &[d.inter, d.hidden]);
                add(format!("{p}.mlp.down_proj.weight"), &[d.hidden, d.inter]);
            }
            Some((experts, expert_inter, shared_inter)) => {
                add(format!("{p}.mlp.gate.weight"), &[experts, d.hidden]);
                for e in 0..experts {
                    add(format!("{p}.mlp.experts.{e}.gate_proj.weight"), &[expert_inter, d.hidden]);
                    add(format!("{p}.mlp.experts.{e}.up_proj.weight"), &[expert_inter, d.hidden]);
                    add(format!("{p}.mlp.experts.{e}.down_proj.weight"), &[d.hidden, expert_inter]);
                }
                add(format!("{p}.mlp.shared_expert.gate_proj.weight"), &[shared_inter, d.hidden]);
                add(format!("{p}.mlp.shared_expert.up_proj.weight"), &[shared_inter, d.hidden]);
                add(format!("{p}.mlp.shared_expert.down_proj.weight"), &[d.hidden, shared_inter]);
                add(format!("{p}.mlp.shared_expert_gate.weight"), &[1, d.hidden]);
            }
        }
    }
    m
}

fn assert_checkpoint(dir: &std::path::Path, expected: &BTreeMap<String, Vec<usize>>, dtype: Dtype) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let actual: BTreeMap<String, Vec<usize>> = st.iter().map(|(n, t)| (n.to_string(), t.shape().to_vec())).collect();
    assert_eq!(&actual, expected);
    for (name, t) in st.iter() {
        assert_eq!(t.dtype(), dtype, "{name}");
    }
    // Norm weights are exactly one; projections are small and not constant.
    let norm = st.tensor("model.norm.weight").unwrap();
    let first = match dtype {
        Dtype::F32 => f32::from_le_bytes(norm.data()[..4].try_into().unwrap()),
        _ => half::bf16::from_le_bytes(norm.data()[..2].try_into().unwrap()).to_f32(),
    };
    assert_eq!(first, 1.0);
}

fn tiny_dims(vocab: usize) -> Dims {
    Dims { vocab, hidden: 64, layers: 2, q_dim: 64, kv_dim: 32, inter: 128, tied: false, qkv_bias: false, moe: None }
}

#[test]
fn preset_names_parse_and_unknown_names_list_the_choices() {
    for p in Preset::ALL {
        assert_eq!(p.name().parse::<Preset>().unwrap(), p);
    }
    assert_eq!("qwen2.5-0.5b".parse::<Preset>().unwrap(), Preset::Qwen25_05b);
    let err = "huge".parse::<Preset>().unwrap_err().to_string();
    for name in ["tiny", "tiny-moe", "small", "qwen2.5-0.5b", "huge"] {
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn tiny_writes_a_llama_checkpoint() {
    let dir = scratch_dir("tiny");
    write_model(Preset::Tiny, &dir, 0).unwrap();
    for file in
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    let config = read_config(&dir);
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["hidden_size"], 64);
    assert_eq!(config["num_hidden_layers"], 2);
    assert_eq!(config["num_attention_heads"], 4);
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["head_dim"], 16);
    assert_eq!(config["intermediate_size"], 128);
    assert_eq!(config["max_position_embeddings"], 512);
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["torch_dtype"], "float32");
    assert!(config["rope_scaling"].is_null());
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(vocab, tokenizer.get_vocab_size(true));
    assert!(vocab >= 300);
    assert_eq!(config["eos_token_id"].as_u64().unwrap() as u32, tokenizer.token_to_id("<|im_end|>").unwrap());
    assert_eq!(config["bos_token_id"].as_u64().unwrap() as u32, tokenizer.token_to_id("<|endoftext|>").unwrap());
    assert_checkpoint(&dir, &expected_tensors(&tiny_dims(vocab)), Dtype::F32);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiny_moe_writes_a_qwen2_moe_checkpoint() {
    let dir = scratch_dir("tiny-moe");
    write_model(Preset::TinyMoe, &dir, 1).unwrap();
    let config = read_config(&dir);
    assert_eq!(config["architectures"][0], "Qwen2MoeForCausalLM");
    assert_eq!(config["model_type"], "qwen2_moe");
    assert_eq!(config["num_experts"], 8);
    assert_eq!(config["num_experts_per_tok"], 2);
    assert_eq!(config["moe_intermediate_size"], 32);
    assert_eq!(config["shared_expert_intermediate_size"], 64);
    assert_eq!(config["norm_topk_prob"], false);
    assert_eq!(config["decoder_sparse_step"], 1);
    assert_eq!(config["mlp_only_layers"], serde_json::json!([]));
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    let dims = Dims { qkv_bias: true, moe: Some((8, 32, 64)), ..tiny_dims(vocab) };
    assert_checkpoint(&dir, &expected_tensors(&dims), Dtype::F32);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn small_writes_a_bf16_llama_checkpoint() {
    let dir = scratch_dir("small");
    write_model(Preset::Small, &dir, 2).unwrap();
    let config = read_config(&dir);
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["hidden_size"], 256);
    assert_eq!(config["num_hidden_layers"], 4);
    assert_eq!(config["num_attention_heads"], 8);
    assert_eq!(config["num_key_value_heads"], 4);
    assert_eq!(config["intermediate_size"], 688);
    assert_eq!(config["torch_dtype"], "bfloat16");
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    let dims = Dims { hidden: 256, layers: 4, q_dim: 256, kv_dim: 128, inter: 688, ..tiny_dims(vocab) };
    assert_checkpoint(&dir, &expected_tensors(&dims), Dtype::BF16);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn qwen25_05b_config_has_the_real_shapes() {
    let config = config_json(Preset::Qwen25_05b).unwrap();
    assert_eq!(config["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(config["model_type"], "qwen2");
    assert_eq!(config["hidden_size"], 896);
    assert_eq!(config["num_hidden_layers"], 24);
    assert_eq!(config["num_attention_heads"], 14);
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["intermediate_size"], 4864);
    assert_eq!(config["vocab_size"], 151_936);
    assert_eq!(config["max_position_embeddings"], 32768);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rope_theta"].as_f64(), Some(1_000_000.0));
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-6));
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["use_sliding_window"], false);
    assert!(config["rope_scaling"].is_null());
    // Qwen2 derives head_dim (64) from hidden_size / num_attention_heads.
    assert!(config.get("head_dim").is_none());
}

#[test]
fn qwen25_05b_tensor_list_matches_the_hf_checkpoint() {
    let spec = Preset::Qwen25_05b.spec();
    let specs = tandem_worker::init_model::tensor_specs(&spec, 151_936);
    let actual: BTreeMap<String, Vec<usize>> = specs.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    let dims = Dims {
        vocab: 151_936,
        hidden: 896,
        layers: 24,
        q_dim: 896,
        kv_dim: 128,
        inter: 4864,
        tied: true,
        qkv_bias: true,
        moe: None,
    };
    assert_eq!(actual, expected_tensors(&dims));
    // Qwen2.5-0.5B has 494,032,768 parameters.
    assert_eq!(specs.iter().map(|t| t.numel()).sum::<usize>(), 494_032_768);
}

#[test]
fn same_seed_gives_identical_bytes_and_another_seed_other_weights() {
    let (a, b, c) = (scratch_dir("seed-a"), scratch_dir("seed-b"), scratch_dir("seed-c"));
    write_model(Preset::Tiny, &a, 5).unwrap();
    write_model(Preset::Tiny, &b, 5).unwrap();
    write_model(Preset::Tiny, &c, 6).unwrap();
    for file in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(a.join(file)).unwrap(), std::fs::read(b.join(file)).unwrap(), "{file}");
    }
    let (wa, wc) =
        (std::fs::read(a.join("model.safetensors")).unwrap(), std::fs::read(c.join("model.safetensors")).unwrap());
    assert_eq!(wa.len(), wc.len());
    let (sa, sc) = (SafeTensors::deserialize(&wa).unwrap(), SafeTensors::deserialize(&wc).unwrap());
    let name = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(sa.tensor(name).unwrap().data(), sc.tensor(name).unwrap().data());
    // Norms are ones whatever the seed.
    assert_eq!(sa.tensor("model.norm.weight").unwrap().data(), sc.tensor("model.norm.weight").unwrap().data());
    for dir in [a, b, c] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn generated_tokenizer_round_trips_text_and_keeps_common_words_short() {
    let tokenizer = tandem_worker::init_model::build_tokenizer().unwrap();
    for text in ["Hello, world! How are you today?", "  two spaces\nnew line\ttab", "émoji 🚀 and 中文", ""] {
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    }
    let ids = tokenizer.encode("the model", false).unwrap().get_ids().to_vec();
    assert!(ids.len() <= 3, "{ids:?}");
    let ids = tokenizer.encode("<|im_start|>user", false).unwrap().get_ids().to_vec();
    assert_eq!(ids[0], tokenizer.token_to_id("<|im_start|>").unwrap());
}
