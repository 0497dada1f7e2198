//! Helpers shared by the training and co-serving tests: random-weight models, random training
//! data, job specs, and weight comparisons.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses its own share of these

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tandem_kernels::{Device, Tensor};
use tandem_worker::init_model::{Preset, write_model};
use tandem_worker::model::Model;
use tandem_worker::rng::Xoshiro256;
use tandem_worker::train::data::Example;
use tandem_worker::train::job::{Hyperparams, Method, TrainSpec, Weights};

/// Free loopback ports for a group's ranks: the testkit's own picker (the testkit depends on
/// this crate, so its file is included rather than the crate).
#[path = "../../../testkit/src/ports.rs"]
pub mod ports;

/// The preset's random-weight model, written once per target folder. Tests of one binary run
/// on parallel threads: one writes while the others wait, so none reads a half-written model.
pub fn model(preset: Preset) -> Model {
    Model::load(&model_dir(preset), Device::Cpu).unwrap()
}

/// Where [`model`] writes the preset's model (with its tokenizer).
pub fn model_dir(preset: Preset) -> PathBuf {
    static WRITING: Mutex<()> = Mutex::new(());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("train-models").join(preset.name());
    let _one_writer = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    if !dir.join("model.safetensors").exists() {
        write_model(preset, &dir, 3).unwrap();
    }
    dir
}

/// `n` random sequences of 4..20 tokens; loss on everything after a random prompt.
pub fn examples(n: usize, vocab: usize, seed: u64) -> Arc<Vec<Example>> {
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let data = (0..n)
        .map(|_| {
            let len = 4 + rng.below(17) as usize;
            let tokens: Vec<u32> = (0..len).map(|_| rng.below(vocab as u64) as u32).collect();
            let prompt = rng.below(len as u64 / 2) as usize;
            let targets =
                (0..len).map(|i| if i >= prompt && i + 1 < len { tokens[i + 1] as i32 } else { -100 }).collect();
            Example { tokens, targets }
        })
        .collect();
    Arc::new(data)
}

pub fn lora(rank: usize, targets: &[&str]) -> Method {
    Method::Lora {
        rank,
        alpha: 2.0 * rank as f32,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        rslora: false,
    }
}

pub fn hyper(batch_size: usize, micro_batch_size: usize, lr: f32, seed: u64) -> Hyperparams {
    Hyperparams {
        epochs: 2,
        batch_size,
        micro_batch_size,
        lr,
        warmup_ratio: 0.2,
        weight_decay: 0.01,
        max_grad_norm: 0.5,
        seed,
        ..Hyperparams::default()
    }
}

pub fn spec(name: &str, method: Method, hyper: Hyperparams) -> TrainSpec {
    TrainSpec { name: name.into(), method, hyper }
}

pub fn values(w: &Weights) -> Vec<Vec<f32>> {
    let tensors: Vec<&Tensor> = match w {
        Weights::Lora(a) => a.modules.values().flat_map(|m| [&m.a, &m.bt]).collect(),
        Weights::Esft(e) => e.experts.values().flat_map(|x| [&x.gate, &x.up, &x.down]).collect(),
    };
    tensors.iter().map(|t| t.to_vec_f32().unwrap()).collect()
}

/// Largest |a − b| relative to the largest |b|, over all tensors.
pub fn rel_diff(a: &Weights, b: &Weights) -> f64 {
    let (mut diff, mut scale) = (0.0f32, 0.0f32);
    for (x, y) in values(a).iter().zip(values(b)) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(&y) {
            diff = diff.max((p - q).abs());
            scale = scale.max(q.abs());
        }
    }
    diff as f64 / scale as f64
}
