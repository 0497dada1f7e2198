//! Tensor parallelism in one process: shards of the tiny dense and MoE models on 2 and 4 ranks
//! (threads joined by the in-process collectives) give the logits of the whole model, over a
//! prefill of two sequences and a decode step that reads their cached keys and values.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use tandem_kernels::ops::{SeqAttention, cache_slots};
use tandem_kernels::{DType, Tensor};
use tandem_worker::adapters::AdapterSet;
use tandem_worker::collective::LocalGroup;
use tandem_worker::init_model::Preset;
use tandem_worker::model::{ForwardInput, KvCache, Model};

const BLOCK: usize = 4;

/// Two sequences (5 and 9 tokens) prefilled, then one decode token each: the logits of both
/// steps, and the bytes this rank sent in each.
fn run(model: &Model) -> (Vec<Vec<f32>>, Vec<u64>) {
    let sent = || model.tp.as_ref().map_or(0, |tp| tp.comm.bytes_sent());
    let start = sent();
    let prompts: [Vec<u32>; 2] = [vec![1, 17, 400, 3, 99], vec![5, 6, 7, 8, 9, 10, 11, 12, 511]];
    let tables: Vec<Vec<u32>> = vec![vec![0, 1, 2], vec![3, 4, 5, 6]];
    let mut cache = KvCache::new(model, 8, BLOCK, DType::F32).unwrap();
    let adapters = AdapterSet::new(Vec::new(), model.device).unwrap();
    let mut input = ForwardInput::default();
    for (p, table) in prompts.iter().zip(&tables) {
        let seq = SeqAttention { q_len: p.len(), context_len: p.len(), block_table: table.clone() };
        input.slots.extend(cache_slots(&seq, BLOCK));
        input.seqs.push(seq);
        input.tokens.extend(p);
        input.positions.extend(0..p.len() as u32);
        input.adapters.extend(std::iter::repeat_n(-1, p.len()));
        input.logit_rows.push(input.tokens.len() as u32 - 1);
    }
    let prefill = model.forward(&input, &mut cache, &adapters).unwrap();
    let after_prefill = sent();
    let mut decode = ForwardInput::default();
    for (i, (p, table)) in prompts.iter().zip(&tables).enumerate() {
        let seq = SeqAttention { q_len: 1, context_len: p.len() + 1, block_table: table.clone() };
        decode.slots.push(*cache_slots(&seq, BLOCK).last().unwrap());
        decode.seqs.push(seq);
        decode.tokens.push(42 + i as u32);
        decode.positions.push(p.len() as u32);
        decode.adapters.push(-1);
        decode.logit_rows.push(i as u32);
    }
    let next = model.forward(&decode, &mut cache, &adapters).unwrap();
    let bytes = vec![after_prefill - start, sent() - after_prefill];
    ([prefill, next].iter().map(|t: &Tensor| t.to_vec_f32().unwrap()).collect(), bytes)
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
    let (want, _) = run(&model);
    for world in [1, 2, 4] {
        let ranks: Vec<_> = LocalGroup::new(world)
            .into_iter()
            .map(|comm| {
                let model = model.clone();
                std::thread::spawn(move || run(&model.shard(Arc::new(comm)).unwrap()))
            })
            .collect();
        for (rank, handle) in ranks.into_iter().enumerate() {
            let (got, bytes) = handle.join().unwrap();
            let theory =
                [theoretical_bytes(&model, world as u64, 14, 2), theoretical_bytes(&model, world as u64, 2, 2)];
            assert_eq!(bytes, theory, "{preset:?}, degree {world}, rank {rank}: bytes sent in prefill and decode");
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
