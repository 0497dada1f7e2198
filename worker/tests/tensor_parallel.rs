//! Tensor parallelism in one process: shards of the tiny dense and MoE models on 2 and 4 ranks
//! (threads joined by the in-process collectives) give the logits of the whole model, over a
//! prefill of three sequences and a decode step that reads their cached keys and values, in a
//! batch that mixes adapters (two LoRAs of different ranks and targets, an ESFT adapter on the
//! MoE model, and the base); each rank sends what the ring's volume says. One training step over
//! such a batch gives every rank the whole model's adapter gradients, equal to a group of one's,
//! and jobs trained on shards export the adapters a group of one trains.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use tandem_worker::adapters::{Adapter, AdapterSet, LoraAdapter};
use tandem_worker::collective::{Collective, LocalGroup};
use tandem_worker::init_model::Preset;
use tandem_worker::model::probe::{adapter_gradients, greedy_logits, mixed_adapters};
use tandem_worker::model::tensor_parallel::Site;
use tandem_worker::model::{Model, MoeSplit};
use tandem_worker::train::checkpoint::export;
use tandem_worker::train::data::Example;
use tandem_worker::train::job::Job;
use tandem_worker::train::trainer::Trainer;

/// The adapter slot of each sequence (-1: the base model).
const SLOTS: [i32; 3] = [0, 1, -1];

fn adapters(model: &Model) -> Vec<Adapter> {
    mixed_adapters(model).unwrap()
}

/// Three sequences (5, 9 and 3 tokens) prefilled, then two greedy decode steps: the logits
/// of each step, and the bytes this rank sent.
fn run(model: &Model, adapters: &[Adapter]) -> (Vec<Vec<f32>>, u64) {
    // Bytes of the tensor-parallel collectives: expert dispatch (expert parallelism) apart.
    let sent = || {
        model.tp.as_ref().map_or(0, |tp| {
            let experts = tp.traffic.lock().unwrap().bytes.get(&Site::Experts).copied().unwrap_or(0);
            tp.comm.bytes_sent() - experts
        })
    };
    let start = sent();
    let prompts = [vec![1, 17, 400, 3, 99], vec![5, 6, 7, 8, 9, 10, 11, 12, 511], vec![300, 2, 77]];
    let shards = adapters.iter().map(|a| model.shard_adapter(a).unwrap()).collect();
    let adapters = AdapterSet::new(shards, model.device).unwrap();
    // Without adapters every sequence runs on the base.
    let slots = SLOTS.map(|s| if adapters.is_empty() { -1 } else { s });
    let logits = greedy_logits(model, &adapters, &prompts, &slots, 2).unwrap();
    (logits, sent() - start)
}

/// `f` on every rank's shard of `model` in a group of `world` (threads joined by the in-process
/// collectives); the results in rank order.
fn on_shards<T: Send>(model: &Model, world: usize, moe: MoeSplit, f: impl Fn(&Model) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let ranks: Vec<_> = (LocalGroup::new(world).into_iter())
            .map(|comm| s.spawn(move || f(&model.shard_with(Arc::new(comm), moe).unwrap())))
            .collect();
        ranks.into_iter().map(|rank| rank.join().unwrap()).collect()
    })
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

fn check(preset: Preset, moe: MoeSplit) {
    let model = common::model(preset);
    let adapters = adapters(&model);
    let (want, _) = run(&model, &adapters);
    // The adapters change the answer (so the comparison below covers them).
    let (base, _) = run(&model, &[]);
    assert!(want[0][..model.config.vocab_size] != base[0][..model.config.vocab_size]);
    for world in [1, 2, 4] {
        let ranks = on_shards(&model, world, moe, |shard| {
            let out = run(shard, &adapters);
            let experts = shard.tp.as_ref().unwrap().traffic.lock().unwrap().bytes.get(&Site::Experts).copied();
            (out, experts.unwrap_or(0))
        });
        for (rank, ((got, bytes), expert_bytes)) in ranks.into_iter().enumerate() {
            // Expert parallelism moves tokens between ranks (all of them, over enough steps).
            let moves_tokens = moe == MoeSplit::Experts && model.config.moe.is_some() && world > 1;
            assert_eq!(expert_bytes > 0, moves_tokens, "{preset:?}, {moe:?}, degree {world}: {expert_bytes} bytes");
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
    check(Preset::Tiny, MoeSplit::Intermediate);
}

#[test]
fn moe_shards_give_the_whole_models_logits() {
    check(Preset::TinyMoe, MoeSplit::Intermediate);
}

#[test]
fn expert_parallel_shards_give_the_whole_models_logits() {
    check(Preset::TinyMoe, MoeSplit::Experts);
}

#[test]
fn a_split_that_does_not_divide_is_refused() {
    let model = common::model(Preset::Tiny);
    // 4 attention heads over 3 ranks.
    let comm = LocalGroup::new(3).into_iter().next().unwrap();
    let err = model.shard(Arc::new(comm)).err().unwrap().to_string();
    assert!(err.contains("attention heads"), "{err}");
}

/// Four training sequences on the two adapters and the base (a prompt without targets, then
/// targets), and the base model, under one mean loss.
fn training_batch() -> (Vec<Example>, Vec<usize>) {
    let example = |tokens: Vec<u32>, prompt: usize| {
        let mut targets: Vec<i32> = tokens[1..].iter().map(|&t| t as i32).collect();
        targets.push(-1);
        targets[..prompt].fill(-1);
        Example { tokens, targets }
    };
    let examples = vec![
        example(vec![1, 17, 400, 3, 99, 12, 8], 2),
        example(vec![5, 6, 7, 8, 9, 10, 11, 12, 511, 40], 3),
        example(vec![300, 2, 77, 4], 0),
        example(vec![9, 250, 31, 64, 2], 1),
    ];
    (examples, vec![0, 1, 0, 1])
}

fn gradients_match(preset: Preset, moe: MoeSplit) {
    let model = common::model(preset);
    let adapters = adapters(&model);

    let (examples, slots) = training_batch();
    let (want_losses, want) = adapter_gradients(&model, &adapters, &examples, &slots).unwrap();
    // Every (layer, projection) of both adapters has a gradient, and not all of it is zero.
    assert!(want.len() >= 2 * model.config.num_layers, "{preset:?}: {} gradients", want.len());
    for (name, g) in &want {
        assert!(g.iter().any(|&v| v != 0.0), "{preset:?}: {name} is all zeros");
    }
    for world in [2, 4] {
        let ranks = on_shards(&model, world, moe, |shard| {
            let (examples, slots) = training_batch();
            adapter_gradients(shard, &adapters, &examples, &slots).unwrap()
        });
        for (rank, (losses, got)) in ranks.into_iter().enumerate() {
            let what = format!("{preset:?}, {moe:?}, degree {world}, rank {rank}");
            for (l, w) in losses.iter().zip(&want_losses) {
                assert!((l - w).abs() < 1e-4 * (1.0 + w.abs()), "{what}: loss {l} vs {w}");
            }
            assert_eq!(got.len(), want.len(), "{what}: gradients");
            for ((name, g), (want_name, w)) in got.iter().zip(&want) {
                assert_eq!(name, want_name, "{what}");
                assert_eq!(g.len(), w.len(), "{what}: {name} is not the whole model's shape");
                let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(diff <= 1e-4 * scale.max(1e-3), "{what}: {name} differs by {diff} (largest {scale})");
            }
        }
    }
}

#[test]
fn dense_shards_give_the_whole_models_adapter_gradients() {
    gradients_match(Preset::Tiny, MoeSplit::Intermediate);
}

#[test]
fn moe_shards_give_the_whole_models_adapter_gradients() {
    gradients_match(Preset::TinyMoe, MoeSplit::Intermediate);
}

#[test]
fn expert_parallel_shards_give_the_whole_models_adapter_gradients() {
    gradients_match(Preset::TinyMoe, MoeSplit::Experts);
}

/// Two LoRA jobs trained together for a few optimizer steps, on the whole model or on the
/// shards of a group of `world`; rank 0's exported adapters (ordinary PEFT folders), read back.
fn train_and_export(preset: Preset, world: usize, moe: MoeSplit) -> Vec<LoraAdapter> {
    let whole = common::model(preset);
    let data = common::examples(12, whole.config.vocab_size, 5);
    let jobs = |model: &Model| {
        let all = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        [("a", common::lora(4, &all)), ("b", common::lora(8, &["q_proj", "down_proj"]))]
            .into_iter()
            .map(|(name, method)| {
                Job::new(common::spec(name, method, common::hyper(4, 2, 1e-2, 3)), model, data.clone()).unwrap()
            })
            .collect::<Vec<_>>()
    };
    let train = |model: &Model| {
        let mut trainer = Trainer::new(model, jobs(&whole));
        for _ in 0..6 {
            trainer.pass().unwrap();
        }
        trainer.jobs
    };
    let mut per_rank = if world > 1 { on_shards(&whole, world, moe, train) } else { vec![train(&whole)] };
    let dir =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tp-export-{preset:?}-{moe:?}-{world}"));
    (per_rank.swap_remove(0).iter())
        .map(|job| {
            let out = dir.join(job.name());
            export(job, &whole.config, &out).unwrap();
            LoraAdapter::load(&out, &whole.config).unwrap()
        })
        .collect()
}

fn same_exports(preset: Preset, moe: MoeSplit) {
    let want = train_and_export(preset, 1, moe);
    // The jobs took steps: B starts at zero.
    assert!(want.iter().all(|a| a.modules.values().any(|m| m.bt.to_vec_f32().unwrap().iter().any(|&v| v != 0.0))));
    for world in [2, 4] {
        for (got, want) in train_and_export(preset, world, moe).iter().zip(&want) {
            assert_eq!(got.modules.keys().collect::<Vec<_>>(), want.modules.keys().collect::<Vec<_>>());
            let (mut diff, mut scale) = (0.0f32, 0.0f32);
            for (g, w) in got.modules.values().zip(want.modules.values()) {
                for (g, w) in [(&g.a, &w.a), (&g.bt, &w.bt)] {
                    for (x, y) in g.to_vec_f32().unwrap().iter().zip(w.to_vec_f32().unwrap()) {
                        diff = diff.max((x - y).abs());
                        scale = scale.max(y.abs());
                    }
                }
            }
            // Sharded products add in another order (and some kernels fuse multiply-adds), and
            // AdamW's normalised steps (lr 1e-2) carry those roundings into the weights: a few
            // hundredths of one step. A wrong shard would be off by whole steps.
            assert!(diff <= 5e-4 * scale, "{preset:?}, {moe:?}, degree {world}: weights differ by {diff} of {scale}");
        }
    }
}

#[test]
fn jobs_trained_on_dense_shards_export_the_same_peft_adapters() {
    same_exports(Preset::Tiny, MoeSplit::Intermediate);
}

#[test]
fn jobs_trained_on_expert_parallel_shards_export_the_same_peft_adapters() {
    same_exports(Preset::TinyMoe, MoeSplit::Experts);
}

/// A shard read straight from the checkpoint (`Model::load_shard`, layer by layer) is the shard
/// cut from the whole model: the same logits, bit for bit; it joins only the group it was cut for.
fn loaded_shards_match(preset: Preset, moe: MoeSplit) {
    let whole = common::model(preset);
    let adapters = adapters(&whole);
    let dir = common::model_dir(preset);
    let cut = on_shards(&whole, 2, moe, |shard| run(shard, &adapters).0);
    let loaded = std::thread::scope(|s| {
        let ranks: Vec<_> = (LocalGroup::new(2).into_iter())
            .map(|comm| {
                let (dir, adapters) = (&dir, &adapters);
                s.spawn(move || {
                    let loaded = Model::load_shard(dir, whole.device, comm.rank(), comm.world_size(), moe).unwrap();
                    let shard = loaded.join(Arc::new(comm)).unwrap();
                    run(&shard, adapters).0
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect::<Vec<_>>()
    });
    assert_eq!(loaded, cut, "{preset:?}, {moe:?}");
    let shard = Model::load_shard(&dir, whole.device, 1, 2, moe).unwrap();
    let err = shard.join(Arc::new(LocalGroup::new(2).remove(0))).err().unwrap().to_string();
    assert!(err.contains("rank 1 of 2 cannot join as rank 0 of 2"), "{err}");
}

#[test]
fn shards_read_from_the_checkpoint_are_the_shards_cut_from_the_whole_model() {
    loaded_shards_match(Preset::Tiny, MoeSplit::Intermediate);
    loaded_shards_match(Preset::TinyMoe, MoeSplit::Intermediate);
    loaded_shards_match(Preset::TinyMoe, MoeSplit::Experts);
}
