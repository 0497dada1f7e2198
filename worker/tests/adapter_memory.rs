//! Serving adapters keeps one copy of their weights. The registry holds every adapter; a batch
//! reads the resident ones in place (on the CPU the pages only count), so running requests of
//! many adapters allocates nothing near the adapters' size. Measured by counting the bytes this
//! process allocates (its own binary: the count is process-wide), which is exact where RSS is not.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_kernels::Device;
use tandem_worker::adapters::{Adapter, LoraAdapter};
use tandem_worker::engine::{Engine, EngineConfig, GenerationRequest};
use tandem_worker::model::Model;
use tandem_worker::rng::Xoshiro256;
use tandem_worker::sampling::SamplingParams;

/// The system allocator, counting the bytes live now and the most live since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn serving_many_adapters_allocates_no_second_copy_of_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures/llama");
    let model = Model::load(&dir, Device::Cpu).unwrap();
    // Rank 64 on every linear layer: each adapter is larger than the fixture model's weights, so
    // a copy of the batch's adapters stands far above everything else a step allocates.
    let lora = serde_json::json!({"r": 64, "lora_alpha": 16, "target_modules": "all-linear"});
    let adapters: Vec<(String, Adapter)> = (0..8)
        .map(|i| {
            let mut rng = Xoshiro256::seed_from_u64(300 + i);
            let a = LoraAdapter::init_random(&model.config, lora.clone(), &mut rng, 0.5).unwrap();
            (format!("a{i}"), Adapter::Lora(a))
        })
        .collect();
    let adapter_bytes: usize = adapters.iter().flat_map(|(_, a)| a.weights()).map(|(_, t)| 4 * t.elem_count()).sum();
    let cfg = EngineConfig { pages: 4096, block_size: 4, max_running: 16, ..EngineConfig::default() };
    let mut engine = Engine::new(model, adapters, None, cfg).unwrap();
    for i in 0..16 {
        let prompt = (0..5).map(|t| (3 * i + t) as u32 % 50).collect();
        let params = SamplingParams { max_tokens: 4, temperature: 0.0, ignore_eos: true, ..Default::default() };
        engine.submit(GenerationRequest { prompt, adapter: Some(format!("a{}", i % 8)), params }).unwrap();
    }
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = engine.run_to_completion().unwrap();
    let extra = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(out.len(), 16);
    assert!(out.iter().all(|o| o.token_ids.len() == 4));
    // Every step's batch holds all 8 adapters: one copy of them would be `adapter_bytes`.
    assert!(
        extra < adapter_bytes / 4,
        "serving allocated {extra} bytes at its peak beyond what it held before, against {adapter_bytes} bytes of adapters"
    );
}
