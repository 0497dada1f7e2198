//! Adapters in the engine's unified page pool: paged in on demand and evicted when idle, without
//! the pool ever growing; versions replaced and adapters removed under traffic without dropping
//! a request; the bounded queue refusing cleanly.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

use std::path::{Path, PathBuf};

use tandem_kernels::Device;
use tandem_worker::adapters::registry::Origin;
use tandem_worker::adapters::{Adapter, LoraAdapter};
use tandem_worker::engine::{Engine, EngineConfig, GenerationOutput, GenerationRequest, adapter_pages};
use tandem_worker::error::Error;
use tandem_worker::model::Model;
use tandem_worker::rng::Xoshiro256;
use tandem_worker::sampling::SamplingParams;

const BLOCK: usize = 4;
const MAX_TOKENS: usize = 6;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures/llama")
}

fn model() -> Model {
    Model::load(&fixture(), Device::Cpu).unwrap()
}

/// A LoRA on every linear layer with random A and B.
fn random_lora(model: &Model, seed: u64) -> Adapter {
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let config = serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": "all-linear"});
    Adapter::Lora(LoraAdapter::init_random(&model.config, config, &mut rng, 0.5).unwrap())
}

fn adapters(model: &Model) -> Vec<(String, Adapter)> {
    (0..6).map(|i| (format!("a{i}"), random_lora(model, 100 + i as u64))).collect()
}

fn request(i: usize, adapter: Option<String>) -> GenerationRequest {
    let prompt = (0..3 + i % 4).map(|t| (7 * i + 3 * t + 1) as u32 % 50).collect();
    let params = SamplingParams { max_tokens: MAX_TOKENS, temperature: 0.0, ignore_eos: true, ..Default::default() };
    GenerationRequest { prompt, adapter, params }
}

fn kv_pages(req: &GenerationRequest) -> usize {
    (req.prompt.len() + MAX_TOKENS).div_ceil(BLOCK)
}

/// `req` alone in an engine with room for everything.
fn alone(req: GenerationRequest, adapter: Option<(String, Adapter)>) -> GenerationOutput {
    let cfg = EngineConfig { pages: 4096, block_size: BLOCK, ..EngineConfig::default() };
    let mut e = Engine::new(model(), adapter.into_iter().collect(), None, cfg).unwrap();
    e.submit(req).unwrap();
    e.run_to_completion().unwrap().remove(0)
}

#[test]
fn the_pool_never_exceeds_its_size_and_idle_adapters_make_room() {
    let model = model();
    let adapters = adapters(&model);
    let per_adapter = adapter_pages(&adapters[0].1, &model.config, BLOCK);
    let requests: Vec<_> = (0..12).map(|i| request(i, Some(format!("a{}", i % 6)))).collect();
    let kv = requests.iter().map(kv_pages).max().unwrap();
    // Room for two requests with their two adapters, out of six adapters in all.
    let pages = 2 * (kv + per_adapter);
    let cfg = EngineConfig {
        pages,
        block_size: BLOCK,
        max_batch_tokens: 16,
        max_running: 8,
        max_waiting: 64,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(model, adapters.clone(), None, cfg).unwrap();
    for r in &requests {
        e.submit(r.clone()).unwrap();
    }
    let mut out = Vec::new();
    while e.has_work() {
        out.extend(e.step().unwrap());
        let u = e.pool_usage();
        assert!(u.kv + u.adapter <= u.capacity, "pool over its size: {u:?}");
        assert_eq!(u.capacity, pages);
    }
    let u = e.pool_usage();
    assert_eq!(u.kv, 0, "KV pages leaked: {u:?}");
    assert!(u.adapter <= 2 * per_adapter, "{u:?}");
    let stats = e.adapter_cache_stats();
    assert!(stats.evictions >= 4 && stats.misses >= 6, "{stats:?}");
    // Every page-in was timed (prefetches too), and every iteration.
    let m = e.metrics();
    assert!(m.adapter_page_ins.count() >= stats.misses, "{stats:?}");
    assert!(m.adapter_page_ins.sum > 0.0 && m.iteration_seconds.count() == m.iterations);
    out.sort_by_key(|o| o.index);
    assert_eq!(out.len(), requests.len());
    for (i, (r, got)) in requests.into_iter().zip(&out).enumerate() {
        let want = alone(r, Some(adapters[i % 6].clone()));
        assert_eq!(got.token_ids, want.token_ids, "request {i}");
    }
}

#[test]
fn a_resident_adapter_is_a_hit() {
    let model = model();
    let adapters = adapters(&model);
    let cfg = EngineConfig { pages: 1024, block_size: BLOCK, ..EngineConfig::default() };
    let mut e = Engine::new(model, adapters, None, cfg).unwrap();
    for _ in 0..3 {
        e.submit(request(1, Some("a1".into()))).unwrap();
        e.run_to_completion().unwrap();
    }
    let stats = e.adapter_cache_stats();
    assert_eq!((stats.misses, stats.hits, stats.evictions), (1, 2, 0));
}

#[test]
fn replacing_and_removing_an_adapter_under_traffic_drops_no_request() {
    let model = model();
    let (v1, v2) = (random_lora(&model, 1), random_lora(&model, 2));
    let cfg = EngineConfig {
        pages: 1024,
        block_size: BLOCK,
        max_batch_tokens: 8,
        max_running: 8,
        max_waiting: 64,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(model, vec![("x".into(), v1.clone())], None, cfg).unwrap();
    let early: Vec<_> = (0..3).map(|i| request(i, Some("x".into()))).collect();
    for r in &early {
        e.submit(r.clone()).unwrap();
    }
    let mut out = Vec::new();
    out.extend(e.step().unwrap()); // the early requests are mid-flight on version 1
    assert_eq!(e.publish_adapter("x", v2.clone(), Origin::Upload { dir: None }).unwrap().version, 2);
    let late: Vec<_> = (3..6).map(|i| request(i, Some("x".into()))).collect();
    for r in &late {
        e.submit(r.clone()).unwrap();
    }
    out.extend(e.step().unwrap());
    e.remove_adapter("x").unwrap();
    let err = e.submit(request(9, Some("x".into()))).unwrap_err();
    assert!(err.to_string().contains("unknown adapter \"x\""), "{err}");
    out.extend(e.run_to_completion().unwrap());
    out.sort_by_key(|o| o.index);
    assert_eq!(out.len(), 6, "every request submitted before the removal finishes");
    for (r, got) in early.into_iter().zip(&out[..3]) {
        assert_eq!(got.token_ids, alone(r, Some(("x".into(), v1.clone()))).token_ids, "version 1 request");
    }
    for (r, got) in late.into_iter().zip(&out[3..]) {
        assert_eq!(got.token_ids, alone(r, Some(("x".into(), v2.clone()))).token_ids, "version 2 request");
    }
    // Both versions are gone from the pool once nothing holds them.
    assert_eq!(e.pool_usage().adapter, 0);
}

#[test]
fn the_bounded_queue_refuses_cleanly_and_recovers() {
    let cfg = EngineConfig {
        pages: 64,
        block_size: BLOCK,
        max_batch_tokens: 16,
        max_running: 1,
        max_waiting: 2,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(model(), Vec::new(), None, cfg).unwrap();
    for i in 0..2 {
        e.submit(request(i, None)).unwrap();
    }
    match e.submit(request(2, None)) {
        Err(Error::Overloaded(msg)) => assert!(msg.contains("2 requests are already waiting"), "{msg}"),
        other => panic!("expected an overload error, got {other:?}"),
    }
    e.step().unwrap(); // one request is admitted: the queue has room again
    e.submit(request(3, None)).unwrap();
    let out = e.run_to_completion().unwrap();
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|o| o.token_ids.len() == MAX_TOKENS));
    assert_eq!(e.pool_usage().kv, 0);
}

#[test]
fn bad_adapter_names_are_refused() {
    let model = model();
    let a = random_lora(&model, 3);
    let mut e = Engine::new(model, Vec::new(), None, EngineConfig::default()).unwrap();
    for name in ["", "../x", "a/b", "a\\b", "..", "a\u{7}"] {
        let err = e.publish_adapter(name, a.clone(), Origin::Upload { dir: None }).unwrap_err();
        assert!(err.to_string().contains("is not allowed"), "{name:?}: {err}");
    }
}

#[test]
fn a_full_host_tier_drops_the_least_recently_requested_upload_and_finishes_its_requests() {
    let model = std::sync::Arc::new(model());
    let lora = |i: u64| random_lora(&model, 200 + i);
    let cfg = EngineConfig { pages: 4096, block_size: BLOCK, host_adapters: Some(2), ..EngineConfig::default() };
    // One adapter given at start: never counted against the tier, never dropped.
    let mut e = Engine::new(model.clone(), vec![("start".into(), lora(9))], None, cfg).unwrap();
    let upload = |n: &str| Origin::Upload { dir: Some(PathBuf::from(format!("/blobs/{n}"))) };
    e.publish_adapter("u1", lora(1), upload("u1")).unwrap();
    e.publish_adapter("u2", lora(2), upload("u2")).unwrap();
    // u1 requested after u2: u2 is the least recently requested when u3 arrives; its request,
    // submitted before, still finishes on the version it holds.
    e.submit(request(0, Some("u2".into()))).unwrap();
    e.submit(request(1, Some("u1".into()))).unwrap();
    e.publish_adapter("u3", lora(3), upload("u3")).unwrap();
    let names: Vec<String> = e.registry().list().iter().map(|v| v.name.clone()).collect();
    assert_eq!(names, ["start", "u1", "u3"]);
    let outputs = e.run_to_completion().unwrap();
    assert_eq!(outputs.len(), 2);
    assert!(outputs.iter().all(|o| o.token_ids.len() == MAX_TOKENS));
    assert!(e.submit(request(2, Some("u2".into()))).is_err(), "a dropped adapter is unknown until read again");
}

#[test]
fn the_maximum_model_length_bounds_what_is_admitted_and_the_model_bounds_it() {
    let model = std::sync::Arc::new(model());
    let cfg = EngineConfig { pages: 4096, block_size: BLOCK, max_model_len: Some(8), ..EngineConfig::default() };
    let mut e = Engine::new(model.clone(), vec![], None, cfg).unwrap();
    let mut long = request(3, None); // 6 prompt tokens + 6
    assert!(matches!(e.submit(long.clone()), Err(Error::InvalidRequest(m)) if m.contains("context of 8 tokens")));
    long.params.max_tokens = 2;
    e.submit(long).unwrap();
    let past = Some(model.config.max_position_embeddings + 1);
    let cfg = EngineConfig { max_model_len: past, ..EngineConfig::default() };
    assert!(Engine::new(model, vec![], None, cfg).is_err());
}
