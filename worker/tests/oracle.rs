//! Our runtime against Hugging Face transformers + PEFT: for every fixture model in
//! `tools/oracle/fixtures` (made by `tools/oracle/make_fixtures.py`), one batch that mixes the
//! base model and every adapter (LoRA of several ranks and targets, ESFT) must give the
//! reference logits within 1e-4, and continuous batching must reproduce the greedy
//! continuations token for token.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tandem_kernels::ops::SeqAttention;
use tandem_kernels::{DType, Device};
use tandem_worker::adapters::{Adapter, AdapterSet, EsftAdapter, LoraAdapter};
use tandem_worker::engine::{Engine, EngineConfig, GenerationRequest};
use tandem_worker::model::{ForwardInput, KvCache, Model};
use tandem_worker::safetensors_file::SafetensorsFile;
use tandem_worker::sampling::SamplingParams;

#[derive(Deserialize)]
struct Reference {
    requests: Vec<RefRequest>,
}

#[derive(Deserialize)]
struct RefRequest {
    adapter: Option<String>,
    prompt_ids: Vec<u32>,
    greedy: Vec<u32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures")
}

/// Every adapter of a fixture: `adapters/<name>` (PEFT LoRA) and `esft/<name>` (named
/// `esft:<name>` in reference.json).
fn load_adapters(dir: &Path, model: &Model) -> Vec<(String, Adapter)> {
    let mut out = Vec::new();
    for (sub, prefix) in [("adapters", ""), ("esft", "esft:")] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else { continue };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for p in paths {
            let name = format!("{prefix}{}", p.file_name().unwrap().to_string_lossy());
            let adapter = if sub == "esft" {
                Adapter::Esft(EsftAdapter::load(&p, &model.config).unwrap_or_else(|e| panic!("{name}: {e}")))
            } else {
                Adapter::Lora(LoraAdapter::load(&p, &model.config).unwrap_or_else(|e| panic!("{name}: {e}")))
            };
            // As the engine serves it: bf16 LoRA weights beside a bf16 base on the tiles.
            out.push((name, model.serving_adapter(adapter).unwrap()));
        }
    }
    out
}

/// The f32 reference: weights widened to f32 whatever the checkpoint holds.
fn check_model(name: &str) {
    check_against(name, DType::F32, "reference");
}

/// Checks the model `name` loaded with its weights in `dtype` against the reference logits and
/// continuations in `<stem>.json` and `<stem>.safetensors`.
fn check_against(name: &str, dtype: DType, stem: &str) {
    let dir = fixtures().join(name);
    let model = Model::load_as(&dir, Device::Cpu, Some(dtype)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let adapters = load_adapters(&dir, &model);
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap()).unwrap();
    let logits = SafetensorsFile::open(&dir.join(format!("{stem}.safetensors"))).unwrap();
    let slot = |a: &Option<String>| match a {
        None => -1,
        Some(n) => adapters.iter().position(|(m, _)| m == n).unwrap_or_else(|| panic!("{name}: no adapter {n}")) as i32,
    };
    assert!(reference.requests.iter().any(|r| r.adapter.is_none()), "{name}: the batch includes the base model");
    for (a, _) in &adapters {
        assert!(
            reference.requests.iter().any(|r| r.adapter.as_deref() == Some(a)),
            "{name}: adapter {a} has a reference"
        );
    }

    // One forward over all prompts at once: every adapter and the base in the same batch.
    let set = AdapterSet::new(adapters.iter().map(|(_, a)| a.clone()).collect(), Device::Cpu).unwrap();
    let block_size = 4;
    let mut input = ForwardInput::default();
    let mut next_block = 0u32;
    for r in &reference.requests {
        let len = r.prompt_ids.len();
        let blocks: Vec<u32> = (0..len.div_ceil(block_size) as u32).map(|b| next_block + b).collect();
        next_block += blocks.len() as u32;
        input.tokens.extend(&r.prompt_ids);
        input.positions.extend(0..len as u32);
        input.slots.extend((0..len).map(|p| blocks[p / block_size] * block_size as u32 + (p % block_size) as u32));
        input.adapters.extend(std::iter::repeat_n(slot(&r.adapter), len));
        input.seqs.push(SeqAttention { q_len: len, context_len: len, block_table: blocks });
    }
    input.logit_rows = (0..input.tokens.len() as u32).collect();
    let mut cache = KvCache::new(&model, next_block as usize, block_size, DType::F32).unwrap();
    let got = model.forward(&input, &mut cache, &set).unwrap().to_vec_f32().unwrap();
    let vocab = model.config.vocab_size;
    let mut row = 0;
    for (i, r) in reference.requests.iter().enumerate() {
        let want = logits.tensor(&format!("logits.{i}")).unwrap().to_vec_f32().unwrap();
        let ours = &got[row * vocab..(row + r.prompt_ids.len()) * vocab];
        let worst = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-4, "{name}: request {i} (adapter {:?}): logits differ by up to {worst}", r.adapter);
        row += r.prompt_ids.len();
    }

    // Greedy continuations through the engine: continuous batching with a small budget so
    // prefills are chunked and requests join and leave at different steps.
    let cfg = EngineConfig {
        pages: 64,
        block_size: 4,
        max_batch_tokens: 8,
        max_running: 4,
        max_waiting: 64,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, adapters, None, cfg).unwrap();
    for r in &reference.requests {
        let params = SamplingParams {
            max_tokens: r.greedy.len(),
            temperature: 0.0,
            ignore_eos: true,
            top_logprobs: 5,
            ..SamplingParams::default()
        };
        engine.submit(GenerationRequest { prompt: r.prompt_ids.clone(), adapter: r.adapter.clone(), params }).unwrap();
    }
    let outputs = engine.run_to_completion().unwrap();
    for (i, (r, out)) in reference.requests.iter().zip(&outputs).enumerate() {
        assert_eq!(out.token_ids, r.greedy, "{name}: greedy continuation with adapter {:?}", r.adapter);
        // The first token's alternatives are the best of torch's last row, log-softmaxed.
        let want = logits.tensor(&format!("logits.{i}")).unwrap().to_vec_f32().unwrap();
        let last: Vec<f64> = want[(r.prompt_ids.len() - 1) * vocab..].iter().map(|&l| f64::from(l)).collect();
        let lse = last.iter().map(|l| l.exp()).sum::<f64>().ln();
        let mut best: Vec<usize> = (0..vocab).collect();
        best.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        for (&(id, lp), &want_id) in out.top_logprobs[0].iter().zip(&best[..5]) {
            let gap = (f64::from(lp) - (last[want_id] - lse)).abs();
            assert!(gap <= 1e-4, "{name}: request {i}: top logprob of {id} vs torch's {want_id}: off by {gap}");
            assert!(id as usize == want_id || (last[id as usize] - last[want_id]).abs() < 1e-5, "{name}: request {i}");
        }
        assert_eq!(out.top_logprobs.len(), out.token_ids.len(), "{name}: alternatives at every token");
    }
}

#[test]
fn llama_with_llama3_rope_scaling() {
    check_model("llama");
}

#[test]
fn llama_tied_sharded_linear_rope() {
    check_model("llama_tied");
}

#[test]
fn mistral() {
    check_model("mistral");
}

#[test]
fn qwen2_bf16_with_biases() {
    check_model("qwen2");
}

/// The same bf16 checkpoint as this CPU serves it by default. With AMX tiles its weights stay
/// bf16 and every base linear layer's input is rounded to bf16: the reference is torch doing
/// exactly that (`tools/oracle/make_bf16_reference.py`). Without tiles the default is f32.
#[test]
fn qwen2_bf16_weights_as_served_here() {
    let dir = fixtures().join("qwen2");
    let model = Model::load(&dir, Device::Cpu).unwrap();
    if tandem_kernels::kernel_isa() >= tandem_kernels::Isa::Amx {
        assert_eq!(model.weights.embed.dtype(), DType::BF16, "a bf16 checkpoint stays bf16 where the tiles are");
        let adapter = load_adapters(&dir, &model).pop().unwrap().1;
        let Adapter::Lora(lora) = adapter else { panic!("qwen2's adapters are LoRA") };
        assert!(lora.modules.values().all(|m| m.a.dtype() == DType::BF16), "served adapters are bf16 there too");
        check_against("qwen2", DType::BF16, "reference_bf16_inputs");
    } else {
        // The f32 path is `qwen2_bf16_with_biases`.
        assert_eq!(model.weights.embed.dtype(), DType::F32, "without tiles the weights are widened once");
    }
}

#[test]
fn mixtral_per_expert_lora_and_esft() {
    check_model("mixtral");
}

#[test]
fn qwen2_moe_shared_expert_and_esft() {
    check_model("qwen2_moe");
}

#[test]
fn qwen2_moe_with_fused_experts_on_disk() {
    check_model("qwen2_moe_fused");
}

/// An embedding is the mean of the prompt's last hidden states after the final norm, scaled to
/// length 1. Torch's logits are those hidden states times the output projection `W`, so `W`
/// times our embedding must point where the sum of torch's logits over the prompt points (an
/// oracle for the pooled hidden states, with no hidden states in the fixtures). The prompts
/// go in chunks of 4 tokens, beside a generation in the same batches.
#[test]
fn embeddings_point_where_torchs_logits_do() {
    for name in ["llama", "mistral"] {
        let dir = fixtures().join(name);
        let model = Model::load(&dir, Device::Cpu).unwrap();
        let reference: Reference =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let logits = SafetensorsFile::open(&dir.join("reference.safetensors")).unwrap();
        let weights = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
        let w = weights.tensor("lm_head.weight").unwrap().to_vec_f32().unwrap();
        let (vocab, hidden) = (model.config.vocab_size, model.config.hidden_size);
        let cfg = EngineConfig { pages: 64, block_size: 4, max_batch_tokens: 4, ..EngineConfig::default() };
        let mut engine = Engine::new(Arc::new(model), Vec::new(), None, cfg).unwrap();
        let base: Vec<(usize, &RefRequest)> =
            reference.requests.iter().enumerate().filter(|(_, r)| r.adapter.is_none()).collect();
        let generation = GenerationRequest {
            prompt: base[0].1.prompt_ids.clone(),
            adapter: None,
            params: SamplingParams::greedy(8),
        };
        engine.submit(generation).unwrap();
        for (_, r) in &base {
            engine.submit_embedding(r.prompt_ids.clone(), None).unwrap();
        }
        let outputs = engine.run_to_completion().unwrap();
        assert_eq!(outputs[0].token_ids.len(), 8, "{name}: the generation beside them");
        for ((i, r), out) in base.iter().zip(&outputs[1..]) {
            let e = &out.embedding;
            assert_eq!((e.len(), out.prompt_tokens, out.token_ids.len()), (hidden, r.prompt_ids.len(), 0));
            let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{name}: length {norm}");
            let ours: Vec<f64> =
                (0..vocab).map(|v| (0..hidden).map(|k| f64::from(w[v * hidden + k] * e[k])).sum()).collect();
            let torch = logits.tensor(&format!("logits.{i}")).unwrap().to_vec_f32().unwrap();
            let summed: Vec<f64> = (0..vocab).map(|v| torch.chunks(vocab).map(|row| f64::from(row[v])).sum()).collect();
            let dot: f64 = ours.iter().zip(&summed).map(|(a, b)| a * b).sum();
            let cosine =
                dot / (ours.iter().map(|a| a * a).sum::<f64>() * summed.iter().map(|b| b * b).sum::<f64>()).sqrt();
            assert!(cosine > 1.0 - 1e-6, "{name}: request {i}: cosine {cosine}");
        }
    }
}
