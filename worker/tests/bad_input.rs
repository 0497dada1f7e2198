//! Bad checkpoints, adapters and requests get clear errors naming what is wrong, never a panic.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

use std::path::{Path, PathBuf};

use tandem_kernels::Device;
use tandem_worker::Error;
use tandem_worker::adapters::{EsftAdapter, LoraAdapter};
use tandem_worker::engine::{Engine, EngineConfig, GenerationRequest};
use tandem_worker::model::{Model, ModelConfig};
use tandem_worker::sampling::SamplingParams;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures").join(name)
}

/// A scratch copy of a fixture model that a test may break.
fn scratch_copy(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("tandem-bad-input-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dst.join(f)).unwrap();
    }
    dst
}

fn err_text<T>(r: Result<T, Error>) -> String {
    match r {
        Ok(_) => panic!("bad input was accepted"),
        Err(e) => e.to_string(),
    }
}

/// The error of loading the llama fixture after replacing `from` with `to` in its config.json.
fn load_error_after_config_edit(tag: &str, from: &str, to: &str) -> String {
    let dir = scratch_copy("llama", tag);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(cfg.contains(from), "the fixture config holds {from}");
    std::fs::write(dir.join("config.json"), cfg.replace(from, to)).unwrap();
    err_text(Model::load(&dir, Device::Cpu))
}

#[test]
fn unknown_architecture_is_named() {
    let msg = load_error_after_config_edit("arch", "LlamaForCausalLM", "GPT2LMHeadModel");
    assert!(msg.contains("GPT2LMHeadModel"), "{msg}");
}

#[test]
fn truncated_safetensors_is_refused() {
    let dir = scratch_copy("llama", "truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let msg = err_text(Model::load(&dir, Device::Cpu));
    assert!(msg.contains("model.safetensors") && msg.contains("not a valid safetensors"), "{msg}");
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let msg = load_error_after_config_edit("shape", "\"intermediate_size\": 96", "\"intermediate_size\": 100");
    assert!(msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains("expected [100, 64]"), "{msg}");
    let msg = load_error_after_config_edit("layers", "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    assert!(msg.contains("model.layers.2.") && msg.contains("missing"), "{msg}");
}

#[test]
fn an_adapter_for_another_base_is_refused() {
    // A Llama adapter (hidden 64) against the Qwen2-MoE base (hidden 32).
    let moe = ModelConfig::load(&fixture("qwen2_moe")).unwrap();
    let msg = err_text(LoraAdapter::load(&fixture("llama/adapters/attn_r8_layer1"), &moe));
    assert!(msg.contains("shape") && msg.contains("lora_A"), "{msg}");
    // An ESFT adapter against a dense base.
    let dense = ModelConfig::load(&fixture("qwen2")).unwrap();
    let msg = err_text(EsftAdapter::load(&fixture("mixtral/esft/esft_a"), &dense));
    assert!(msg.contains("has no experts"), "{msg}");
}

#[test]
fn unsupported_peft_fields_are_refused_not_ignored() {
    let cfg = ModelConfig::load(&fixture("llama")).unwrap();
    for (field, value) in [("use_dora", "true"), ("modules_to_save", "[\"lm_head\"]"), ("bias", "\"all\"")] {
        let dir = std::env::temp_dir().join(format!("tandem-peft-{field}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = fixture("llama/adapters/attn_r8_layer1");
        std::fs::copy(src.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
        json[field] = serde_json::from_str(value).unwrap();
        std::fs::write(dir.join("adapter_config.json"), json.to_string()).unwrap();
        let err = LoraAdapter::load(&dir, &cfg).expect_err(field);
        assert!(matches!(err, Error::Unsupported(_)), "{field}: {err}");
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn adapters_round_trip_through_save() {
    let cfg = ModelConfig::load(&fixture("mixtral")).unwrap();
    let lora = LoraAdapter::load(&fixture("mixtral/adapters/experts_r4"), &cfg).unwrap();
    let dir = std::env::temp_dir().join(format!("tandem-lora-save-{}", std::process::id()));
    lora.save(&dir, &cfg).unwrap();
    let again = LoraAdapter::load(&dir, &cfg).unwrap();
    assert_eq!(lora.modules.len(), again.modules.len());
    for (k, m) in &lora.modules {
        let n = &again.modules[k];
        assert_eq!(m.a.to_vec_f32().unwrap(), n.a.to_vec_f32().unwrap());
        assert_eq!(m.bt.to_vec_f32().unwrap(), n.bt.to_vec_f32().unwrap());
        assert_eq!(m.scale, n.scale);
    }
    let esft = EsftAdapter::load(&fixture("mixtral/esft/esft_a"), &cfg).unwrap();
    let dir = std::env::temp_dir().join(format!("tandem-esft-save-{}", std::process::id()));
    esft.save(&dir, &cfg).unwrap();
    let again = EsftAdapter::load(&dir, &cfg).unwrap();
    assert_eq!(esft.experts.keys().collect::<Vec<_>>(), again.experts.keys().collect::<Vec<_>>());
}

#[test]
fn bad_requests_are_refused() {
    let model = Model::load(&fixture("llama"), Device::Cpu).unwrap();
    let cfg = EngineConfig {
        pages: 8,
        block_size: 4,
        max_batch_tokens: 16,
        max_running: 4,
        max_waiting: 64,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, Vec::new(), None, cfg).unwrap();
    let req = |prompt: Vec<u32>, adapter: Option<&str>, max_tokens| GenerationRequest {
        prompt,
        adapter: adapter.map(str::to_string),
        params: SamplingParams { max_tokens, ..SamplingParams::default() },
    };
    let cases = [
        (req(vec![1, 2], Some("nope"), 4), "unknown adapter"),
        (req(vec![], None, 4), "empty"),
        (req(vec![1, 999], None, 4), "token id 999"),
        (req(vec![1; 20], None, 20), "exceeds the context"),
    ];
    for (r, want) in cases {
        let msg = err_text(engine.submit(r));
        assert!(msg.contains(want), "{msg}");
    }
    assert!(!engine.has_work(), "refused requests are not queued");
}
