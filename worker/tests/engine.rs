//! Continuous batching: a request's result does not depend on what else shares its batches,
//! when it joined, or how its prompt was chunked.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

use std::path::{Path, PathBuf};

use tandem_kernels::Device;
use tandem_worker::adapters::{Adapter, EsftAdapter, LoraAdapter};
use tandem_worker::engine::{Engine, EngineConfig, GenerationOutput, GenerationRequest, adapter_pages};
use tandem_worker::model::Model;
use tandem_worker::sampling::SamplingParams;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures").join(name)
}

/// An engine whose pool has `cfg.pages` pages for KV blocks plus room for both adapters.
fn engine(mut cfg: EngineConfig) -> Engine {
    let dir = fixture("qwen2_moe");
    let model = Model::load(&dir, Device::Cpu).unwrap();
    let lora = LoraAdapter::load(&dir.join("adapters/fused_experts_shared_r4"), &model.config).unwrap();
    let esft = EsftAdapter::load(&dir.join("esft/esft_a"), &model.config).unwrap();
    let adapters = vec![("lora".to_string(), Adapter::Lora(lora)), ("esft".to_string(), Adapter::Esft(esft))];
    cfg.pages += adapters.iter().map(|(_, a)| adapter_pages(a, &model.config, cfg.block_size)).sum::<usize>();
    Engine::new(model, adapters, None, cfg).unwrap()
}

fn request(prompt: Vec<u32>, adapter: Option<&str>, seed: u64) -> GenerationRequest {
    let params = SamplingParams {
        max_tokens: 12,
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    GenerationRequest { prompt, adapter: adapter.map(str::to_string), params }
}

fn workload() -> Vec<GenerationRequest> {
    vec![
        request(vec![3, 14, 15, 92, 65, 35, 89, 79, 32, 38], Some("lora"), 1),
        request(vec![7, 7, 7], None, 2),
        request(vec![100, 20, 30, 40, 50, 60], Some("esft"), 3),
        request(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], Some("lora"), 4),
        request(vec![42], Some("esft"), 5),
    ]
}

fn alone(req: GenerationRequest) -> GenerationOutput {
    let mut e = engine(EngineConfig {
        pages: 32,
        block_size: 8,
        max_batch_tokens: 64,
        max_running: 1,
        max_waiting: 64,
        ..EngineConfig::default()
    });
    e.submit(req).unwrap();
    e.run_to_completion().unwrap().remove(0)
}

#[test]
fn batched_results_equal_each_request_alone() {
    // Small budget and blocks: prompts are chunked, and the batch changes at every step.
    let mut e = engine(EngineConfig {
        pages: 24,
        block_size: 4,
        max_batch_tokens: 6,
        max_running: 3,
        max_waiting: 64,
        ..EngineConfig::default()
    });
    for r in workload() {
        e.submit(r).unwrap();
    }
    let batched = e.run_to_completion().unwrap();
    for (r, got) in workload().into_iter().zip(&batched) {
        let want = alone(r);
        assert_eq!(got.token_ids, want.token_ids, "request {}", got.index);
        for (a, b) in got.logprobs.iter().zip(&want.logprobs) {
            assert!((a - b).abs() < 1e-4, "request {}: logprob {a} vs {b}", got.index);
        }
    }
}

#[test]
fn a_request_joining_mid_flight_gets_the_same_result() {
    let mut e = engine(EngineConfig {
        pages: 32,
        block_size: 4,
        max_batch_tokens: 16,
        max_running: 8,
        max_waiting: 64,
        ..EngineConfig::default()
    });
    let mut reqs = workload();
    let late = reqs.pop().unwrap();
    for r in reqs {
        e.submit(r).unwrap();
    }
    let mut done = Vec::new();
    for _ in 0..5 {
        done.extend(e.step().unwrap());
    }
    let index = e.submit(late.clone()).unwrap();
    while e.has_work() {
        done.extend(e.step().unwrap());
    }
    let got = done.into_iter().find(|o| o.index == index).unwrap();
    assert_eq!(got.token_ids, alone(late).token_ids);
}

#[test]
fn requests_wait_for_blocks_instead_of_failing() {
    // Room for about one request at a time: the rest queue, and all finish.
    let mut e = engine(EngineConfig {
        pages: 7,
        block_size: 4,
        max_batch_tokens: 32,
        max_running: 8,
        max_waiting: 64,
        ..EngineConfig::default()
    });
    for r in workload() {
        e.submit(r).unwrap();
    }
    let out = e.run_to_completion().unwrap();
    assert_eq!(out.len(), 5);
    assert!(out.iter().all(|o| o.token_ids.len() == 12));
}

#[test]
fn a_cancelled_request_stops_and_gives_back_its_pages() {
    let mut e = engine(EngineConfig {
        pages: 32,
        block_size: 8,
        max_batch_tokens: 64,
        max_running: 2,
        max_waiting: 64,
        ..EngineConfig::default()
    });
    let requests = workload();
    let indices: Vec<usize> = requests.into_iter().map(|r| e.submit(r).unwrap()).collect();
    e.step().unwrap();
    let kv_before = e.pool_usage().kv;
    assert!(kv_before > 0);
    // One running (admitted first), one still waiting.
    assert!(e.cancel(indices[0]));
    assert!(e.cancel(indices[4]));
    assert!(!e.cancel(indices[0]), "cancelled twice");
    assert!(e.pool_usage().kv < kv_before, "the running request's pages were not given back");
    let outputs = e.run_to_completion().unwrap();
    let done: Vec<usize> = outputs.iter().map(|o| o.index).collect();
    assert_eq!(done, vec![indices[1], indices[2], indices[3]]);
    // The others are unaffected: each equals its run alone.
    for (out, req) in outputs.iter().zip([1, 2, 3].map(|i| workload().swap_remove(i))) {
        assert_eq!(out.token_ids, alone(req).token_ids);
    }
    assert_eq!(e.pool_usage().kv, 0);
}
