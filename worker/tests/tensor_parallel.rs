//! Tensor parallelism in one process: shards of the tiny dense and MoE models on 2 and 4 ranks
//! (threads joined by the in-process collectives) give the logits of the whole model, over a
//! prefill of three sequences and a decode step that reads their cached keys and values, in a
//! batch that mixes adapters (two LoRAs of different ranks and targets, an ESFT adapter on the
//! MoE model, and the base); each rank sends what the ring's volume says.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use serde_json::json;
use tandem_kernels::Tensor;
use tandem_kernels::ops;
use tandem_worker::adapters::esft::ExpertWeights;
use tandem_worker::adapters::{Adapter, AdapterSet, EsftAdapter, LoraAdapter};
use tandem_worker::collective::LocalGroup;
use tandem_worker::init_model::Preset;
use tandem_worker::model::Model;
use tandem_worker::model::probe::greedy_logits;
use tandem_worker::model::weights::Mlp;
use tandem_worker::rng::Xoshiro256;

/// The adapter slot of each sequence (-1: the base model).
const SLOTS: [i32; 3] = [0, 1, -1];

/// Adapters of every kind the model takes, resolved against the whole model.
fn adapters(model: &Model) -> Vec<Adapter> {
    let mut rng = Xoshiro256::seed_from_u64(7);
    let mut lora = |config: serde_json::Value| {
        Adapter::Lora(LoraAdapter::init_random(&model.config, config, &mut rng, 0.5).unwrap())
    };
    let mut out = vec![
        lora(json!({"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})),
        lora(json!({"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]})),
    ];
    if let Some(Mlp::Moe(m)) = model.weights.layers.first().map(|l| &l.mlp) {
        // Experts 1 and 3 of layer 0 replaced by copies with doubled weights.
        let expert = |t: &Tensor, e: u32| {
            let w = ops::gather_rows(t, &[e]).unwrap();
            let w = w.reshape(t.shape()[1..].to_vec()).unwrap();
            ops::add(&w, &w).unwrap() // doubled
        };
        let experts = [1, 3].map(|e| {
            (
                (0, e as usize),
                ExpertWeights { gate: expert(&m.gate, e), up: expert(&m.up, e), down: expert(&m.down, e) },
            )
        });
        out[1] = Adapter::Esft(EsftAdapter { experts: experts.into_iter().collect() });
    }
    out
}

/// Three sequences (5, 9 and 3 tokens) prefilled, then two greedy decode steps: the logits
/// of each step, and the bytes this rank sent.
fn run(model: &Model, adapters: &[Adapter]) -> (Vec<Vec<f32>>, u64) {
    let sent = || model.tp.as_ref().map_or(0, |tp| tp.comm.bytes_sent());
    let start = sent();
    let prompts = [vec![1, 17, 400, 3, 99], vec![5, 6, 7, 8, 9, 10, 11, 12, 511], vec![300, 2, 77]];
    let shards = adapters.iter().map(|a| model.shard_adapter(a).unwrap()).collect();
    let adapters = AdapterSet::new(shards, model.device).unwrap();
    // Without adapters every sequence runs on the base.
    let slots = SLOTS.map(|s| if adapters.is_empty() { -1 } else { s });
    let logits = greedy_logits(model, &adapters, &prompts, &slots, 2).unwrap();
    (logits, sent() - start)
}

/// What one rank sends in a forward pass of `n` tokens with `rows` logit rows on `world` ranks:
/// one ring all-reduce of the hidden states for the embedding and two per layer (after o and
/// after the MLP), each 2(w-1)/w of the data; the ring all-gather of the logits, w-1 blocks of
/// `rows` x vocab/w.
fn theoretical_bytes(model: &Model, world: u64, n: u64, rows: u64) -> u64 {
    let c = &model.config;
    let (h, layers, vocab) = (c.hidden_size as u64, c.num_layers as u64, c.vocab_size as u64);
    let all_reduce = 2 * (world - 1) * n * h / world;
    4 * ((2 * layers + 1) * all_reduce + (world - 1) * rows * vocab / world)
}

fn check(preset: Preset) {
    let model = Arc::new(common::model(preset));
    let adapters = Arc::new(adapters(&model));
    let (want, _) = run(&model, &adapters);
    // The adapters change the answer (so the comparison below covers them).
    let (base, _) = run(&model, &[]);
    assert!(want[0][..model.config.vocab_size] != base[0][..model.config.vocab_size]);
    for world in [1, 2, 4] {
        let ranks: Vec<_> = LocalGroup::new(world)
            .into_iter()
            .map(|comm| {
                let (model, adapters) = (model.clone(), adapters.clone());
                std::thread::spawn(move || run(&model.shard(Arc::new(comm)).unwrap(), &adapters))
            })
            .collect();
        for (rank, handle) in ranks.into_iter().enumerate() {
            let (got, bytes) = handle.join().unwrap();
            let w = world as u64;
            let theory = theoretical_bytes(&model, w, 17, 3) + 2 * theoretical_bytes(&model, w, 3, 3);
            assert_eq!(bytes, theory, "{preset:?}, degree {world}, rank {rank}: bytes sent");
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), w.len());
                let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(diff < 1e-4, "{preset:?}, degree {world}, rank {rank}, step {step}: max difference {diff}");
            }
        }
    }
}

#[test]
fn dense_shards_give_the_whole_models_logits() {
    check(Preset::Tiny);
}

#[test]
fn moe_shards_give_the_whole_models_logits() {
    check(Preset::TinyMoe);
}

#[test]
fn a_split_that_does_not_divide_is_refused() {
    let model = common::model(Preset::Tiny);
    // 4 attention heads over 3 ranks.
    let comm = LocalGroup::new(3).into_iter().next().unwrap();
    let err = model.shard(Arc::new(comm)).err().unwrap().to_string();
    assert!(err.contains("attention heads"), "{err}");
}
