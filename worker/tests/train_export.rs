//! A LoRA adapter trained and exported by Tandem loads in PEFT itself and gives our logits.
//!
//! The round trip, for a dense model (`llama`, transformers 5, `all-linear`) and an MoE model
//! (`mixtral`, transformers 4 per-expert modules; attention, the router and every expert's
//! projections, rsLoRA):
//!
//! 1. train a LoRA job on the fixture's `train/train.json` sequences and export it
//!    ([`checkpoint::export`]: `adapter_config.json` + `adapter_model.safetensors`);
//! 2. the export must match the committed one in `tools/oracle/fixtures/<model>/train/export/`
//!    (same keys, shapes and config; values within 1e-3 of each tensor's largest entry);
//! 3. `tools/oracle/check_export.py` loaded that committed export with
//!    `PeftModel.from_pretrained` onto the transformers base (checking that PEFT wraps exactly
//!    the modules the config targets and takes every tensor of the file), and stored PEFT's
//!    logits (and the base model's) for a few prompts in `peft_logits.{json,safetensors}`;
//! 4. our forward with that committed adapter, read by our loader, must give PEFT's logits
//!    within 1e-4 (relative to the largest logit of the prompt), and PEFT's logits must differ
//!    from the base model's by far more than that, so the adapter really changes the result.
//!
//! CI has no torch, so step 3 is a committed fixture. Bootstrap (after changing training or the
//! export format): `TANDEM_WRITE_FIXTURES=1 cargo test -p tandem-worker --test train_export`
//! writes the fresh exports into the fixtures and passes without checking; then run
//! `check_export.py` under both virtual environments (see `tools/oracle/FIXTURES.md`, section
//! "Exported adapters"), then this test again.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tandem_kernels::ops::SeqAttention;
use tandem_kernels::{DType, Device};
use tandem_worker::adapters::{Adapter, AdapterSet, LoraAdapter};
use tandem_worker::model::{ForwardInput, KvCache, Model};
use tandem_worker::safetensors_file::SafetensorsFile;
use tandem_worker::train::checkpoint;
use tandem_worker::train::data::Example;
use tandem_worker::train::job::{Hyperparams, Job, Method, TrainSpec};
use tandem_worker::train::trainer::Trainer;

/// Fresh export vs the committed one: max |Δ| relative to the tensor's largest |value|.
/// Training is deterministic on one machine, but a CPU of another SIMD width rounds GEMMs
/// differently, and AdamW's normalisation turns last-bit differences of small gradients into
/// visible ones over the steps (reordering the sums of attention moved these exports by 1e-5).
/// The exact check is the logits one, on the committed export that PEFT loaded.
const EXPORT_TOL: f32 = 1e-3;
/// Our logits vs PEFT's: max |Δ| relative to the prompt's largest |logit|.
const LOGIT_TOL: f32 = 1e-4;
/// PEFT's logits must differ from the base model's by at least this many times [`LOGIT_TOL`].
const ADAPTER_EFFECT: f32 = 100.0;

#[derive(Deserialize)]
struct TrainFixture {
    sequences: Vec<FixtureSeq>,
}

#[derive(Deserialize)]
struct FixtureSeq {
    tokens: Vec<u32>,
    targets: Vec<i32>,
}

#[derive(Deserialize)]
struct PeftPrompts {
    prompts: Vec<Vec<u32>>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures")
}

fn bootstrap() -> bool {
    std::env::var("TANDEM_WRITE_FIXTURES").is_ok_and(|v| v == "1")
}

/// Trains a LoRA job with `method` on every sequence of the model's `train/train.json` and
/// exports it; returns the model and the export's folder.
fn train_and_export(name: &str, method: Method) -> (Model, PathBuf) {
    let dir = fixtures().join(name);
    // PEFT's logits are of the f32 model: the weights widened on any CPU.
    let model = Model::load_as(&dir, Device::Cpu, Some(DType::F32)).unwrap();
    let fixture: TrainFixture =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train/train.json")).unwrap()).unwrap();
    let data: Vec<Example> =
        fixture.sequences.into_iter().map(|s| Example { tokens: s.tokens, targets: s.targets }).collect();
    let hyper = Hyperparams {
        epochs: 2,
        batch_size: 4,
        micro_batch_size: 2,
        lr: 1e-2,
        warmup_ratio: 0.1,
        seed: 5,
        ..Hyperparams::default()
    };
    let spec = TrainSpec { name: format!("{name}_export"), method, hyper };
    let job = Job::new(spec, &model, Arc::new(data)).unwrap();
    let mut trainer = Trainer::new(&model, vec![job]);
    while !trainer.is_finished() {
        trainer.pass().unwrap();
    }
    let job = &trainer.jobs[0];
    assert_eq!(job.progress.step, job.progress.total_steps);
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("train-export").join(name);
    let _ = std::fs::remove_dir_all(&out);
    checkpoint::export(job, &model.config, &out).unwrap();
    (model, out)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Every tensor of a safetensors file: name -> (shape, values).
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let file = SafetensorsFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n).unwrap();
            (n, (t.shape().to_vec(), t.to_vec_f32().unwrap()))
        })
        .collect()
}

/// Largest |a − b| over the largest |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    let scale = b.iter().fold(0.0f32, |m, y| m.max(y.abs()));
    diff / scale.max(f32::MIN_POSITIVE)
}

/// The fresh export equals the committed one (tensor names, shapes, values; the config).
fn compare_with_committed(name: &str, fresh: &Path, committed: &Path) {
    let (ours, theirs) =
        (tensors(&fresh.join("adapter_model.safetensors")), tensors(&committed.join("adapter_model.safetensors")));
    let (our_names, their_names): (Vec<&String>, Vec<&String>) = (ours.keys().collect(), theirs.keys().collect());
    assert_eq!(our_names, their_names, "{name}: exported tensor names differ from the committed export");
    let mut worst = (-1.0f32, String::new());
    for (key, (shape, values)) in &ours {
        let (want_shape, want) = &theirs[key];
        assert_eq!(shape, want_shape, "{name}: {key}: shape");
        let d = rel_diff(values, want);
        assert!(d <= EXPORT_TOL, "{name}: {key}: differs from the committed export by {d:.2e} of its max");
        if d > worst.0 {
            worst = (d, key.clone());
        }
    }
    assert_eq!(
        read_json(&fresh.join("adapter_config.json")),
        read_json(&committed.join("adapter_config.json")),
        "{name}: adapter_config.json differs from the committed export"
    );
    eprintln!("{name}: {} tensors equal the committed export (worst {:.2e}, {})", ours.len(), worst.0, worst.1);
}

/// Our logits at every position of every prompt, each prompt run in one batch twice: with the
/// adapter (slot 0) and without it (the base model).
fn our_logits(model: &Model, adapter: LoraAdapter, prompts: &[Vec<u32>]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let set = AdapterSet::new(vec![Adapter::Lora(adapter)], Device::Cpu).unwrap();
    let block_size = 4;
    let mut input = ForwardInput::default();
    let mut next_block = 0u32;
    let runs: Vec<(&Vec<u32>, i32)> = prompts.iter().flat_map(|p| [(p, 0), (p, -1)]).collect();
    for &(prompt, slot) in &runs {
        let len = prompt.len();
        let blocks: Vec<u32> = (0..len.div_ceil(block_size) as u32).map(|b| next_block + b).collect();
        next_block += blocks.len() as u32;
        input.tokens.extend(prompt);
        input.positions.extend(0..len as u32);
        input.slots.extend((0..len).map(|p| blocks[p / block_size] * block_size as u32 + (p % block_size) as u32));
        input.adapters.extend(std::iter::repeat_n(slot, len));
        input.seqs.push(SeqAttention { q_len: len, context_len: len, block_table: blocks });
    }
    input.logit_rows = (0..input.tokens.len() as u32).collect();
    let mut cache = KvCache::new(model, next_block as usize, block_size, DType::F32).unwrap();
    let all = model.forward(&input, &mut cache, &set).unwrap().to_vec_f32().unwrap();
    let vocab = model.config.vocab_size;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let mut row = 0;
    for &(prompt, slot) in &runs {
        let rows = all[row * vocab..(row + prompt.len()) * vocab].to_vec();
        row += prompt.len();
        if slot == 0 { with.push(rows) } else { without.push(rows) }
    }
    (with, without)
}

fn check_model(name: &str, method: Method) {
    let (model, fresh) = train_and_export(name, method);
    let committed = fixtures().join(name).join("train/export");
    if bootstrap() {
        std::fs::create_dir_all(&committed).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fresh.join(f), committed.join(f)).unwrap();
        }
        eprintln!(
            "{name}: TANDEM_WRITE_FIXTURES=1: wrote {}; now run tools/oracle/check_export.py, then this test again",
            committed.display()
        );
        return;
    }
    compare_with_committed(name, &fresh, &committed);

    let adapter = LoraAdapter::load(&committed, &model.config).unwrap();
    let modules = adapter.modules.len();
    let prompts: PeftPrompts = serde_json::from_value(read_json(&committed.join("peft_logits.json"))).unwrap();
    assert!(!prompts.prompts.is_empty(), "{name}: no prompts in peft_logits.json");
    let reference = SafetensorsFile::open(&committed.join("peft_logits.safetensors")).unwrap();
    assert_eq!(reference.names().len(), 2 * prompts.prompts.len(), "{name}: peft_logits.safetensors entries");
    let (with, without) = our_logits(&model, adapter, &prompts.prompts);
    let vocab = model.config.vocab_size;
    let (mut worst, mut worst_base, mut least_effect) = (0.0f32, 0.0f32, f32::INFINITY);
    for (i, prompt) in prompts.prompts.iter().enumerate() {
        let load = |key: String| {
            let t = reference.tensor(&key).unwrap_or_else(|e| panic!("{name}: {key}: {e}"));
            assert_eq!(t.shape(), [prompt.len(), vocab], "{name}: {key}: shape");
            t.to_vec_f32().unwrap()
        };
        let (peft, base) = (load(format!("logits.{i}")), load(format!("base_logits.{i}")));
        let d = rel_diff(&with[i], &peft);
        assert!(
            d <= LOGIT_TOL,
            "{name}: prompt {i}: our logits with the exported adapter differ from PEFT's by {d:.2e}"
        );
        let d_base = rel_diff(&without[i], &base);
        assert!(d_base <= LOGIT_TOL, "{name}: prompt {i}: our base logits differ from transformers' by {d_base:.2e}");
        let effect = rel_diff(&base, &peft);
        assert!(
            effect >= ADAPTER_EFFECT * LOGIT_TOL,
            "{name}: prompt {i}: the adapter moves PEFT's logits by only {effect:.2e}: too little to test"
        );
        (worst, worst_base, least_effect) = (worst.max(d), worst_base.max(d_base), least_effect.min(effect));
    }
    eprintln!(
        "{name}: {modules} LoRA modules; vs PEFT worst {worst:.2e}, base vs transformers worst {worst_base:.2e}, \
         adapter effect at least {least_effect:.2e} (all relative to max |logit|)"
    );
}

#[test]
fn llama_all_linear_export_loads_in_peft() {
    check_model("llama", Method::Lora { rank: 4, alpha: 8.0, targets: vec!["all-linear".into()], rslora: false });
}

#[test]
fn mixtral_router_and_expert_export_loads_in_peft() {
    let targets = ["q_proj", "gate", "w1", "w2", "w3"].map(String::from).to_vec();
    check_model("mixtral", Method::Lora { rank: 2, alpha: 6.0, targets, rslora: true });
}
