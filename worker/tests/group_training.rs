//! Fine-tuning on a worker group (`group::join`, each rank a thread with its own shard, joined
//! over loopback TCP): rank 0's engine trains a LoRA job beside streamed requests, and the
//! followers make every model call of its plans on their shards (forward passes mixing
//! inference and fine-tuning rows, backward layers, the validation pass). The job's step
//! losses, its checkpoint, its exported adapter and its validation loss, and the base model's
//! answer to the request, are those of the same job and request on an engine over the whole
//! model (within 1e-4), for dense and MoE models, MoE experts sliced over the ranks or spread
//! whole (expert parallelism, where the fine-tuning rows get a pass of their own), LoRA and
//! ESFT jobs (ESFT's experts chosen from the data on the group, or given).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tandem_proto::v1::GenerateRequest;
use tandem_worker::adapters::Adapter;
use tandem_worker::adapters::esft::EsftAdapter;
use tandem_worker::collective::CollectiveOptions;
use tandem_worker::engine::{Engine, EngineConfig};
use tandem_worker::init_model::Preset;
use tandem_worker::model::{Model, MoeSplit};
use tandem_worker::node::group::{self, DataPlane, Ended, GroupSpec, Member};
use tandem_worker::node::{EngineThread, JobStart, TrainEvent, Training};
use tandem_worker::tokenizer::TextTokenizer;
use tandem_worker::train::checkpoint;
use tandem_worker::train::finetune::MethodChoice;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// What a run of the job and the request gave.
struct Outcome {
    losses: Vec<f64>,
    checkpoint: PathBuf,
    adapter: Adapter,
    validation_loss: f64,
    /// The base model's greedy answer to the request.
    answer: Vec<u32>,
}

fn lora() -> MethodChoice {
    let targets = ["q_proj", "v_proj", "o_proj", "down_proj"].map(String::from).to_vec();
    MethodChoice::Lora { rank: 4, alpha: 8.0, targets, rslora: false }
}

/// The job, made by the engine (ESFT's experts chosen and copied there).
fn training(model: &Model, method: &MethodChoice, dir: &Path) -> Training {
    let vocab = model.config.vocab_size;
    let data = common::examples(24, vocab, 3);
    let job = JobStart::New { name: "job".into(), method: method.clone(), hyper: common::hyper(8, 4, 1e-2, 5), data };
    let _ = std::fs::remove_dir_all(dir);
    let validation = Some(common::examples(6, vocab, 11));
    Training { job, dir: dir.to_path_buf(), checkpoint_every: 2, validation }
}

fn request(adapter: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: "the group trains".into(),
        adapter: adapter.into(),
        max_tokens: Some(24),
        top_p: 1.0,
        ..Default::default()
    }
}

/// Runs the job and two requests (the base model's, and one on the job's adapter as it is
/// then) on `engine` until the job ends.
fn run_job(
    engine: &EngineThread,
    method: &MethodChoice,
    dir: &Path,
    mut events: UnboundedReceiver<TrainEvent>,
) -> Outcome {
    engine.train(training(engine.model(), method, dir)).unwrap();
    let mut base = engine.generate(request("")).unwrap();
    let mut tuned = engine.generate(request("job")).unwrap();
    let (mut losses, mut checkpoint) = (Vec::new(), None);
    let (adapter, validation_loss) = loop {
        match events.blocking_recv().unwrap() {
            TrainEvent::Step { report, .. } => losses.push(report.loss),
            TrainEvent::Checkpoint { path, .. } => checkpoint = checkpoint.or(Some(path)),
            TrainEvent::Finished { adapter, validation_loss, .. } => break (adapter, validation_loss.unwrap()),
            TrainEvent::Failed { error, .. } | TrainEvent::Interrupted { error, .. } => {
                panic!("the job ended: {error}")
            }
            TrainEvent::HandedOff { .. } => panic!("the job was handed off, unasked"),
        }
    };
    let mut answer = Vec::new();
    while let Some(event) = base.blocking_recv() {
        answer.extend(event.unwrap().token_ids);
    }
    while let Some(event) = tuned.blocking_recv() {
        event.unwrap(); // the job's adapter, sent to the followers as weights, serves
    }
    let adapter = Adapter::load_dir(&adapter, engine.model().whole_config(), tandem_kernels::DType::F32).unwrap();
    Outcome { losses, checkpoint: checkpoint.unwrap(), adapter, validation_loss, answer }
}

/// The group's members for `preset` over `world` ranks, and where they report how they ended
/// and where rank 0's jobs report.
fn form(
    preset: Preset,
    world: usize,
    moe: MoeSplit,
) -> (Vec<Member>, UnboundedReceiver<Ended>, UnboundedReceiver<TrainEvent>) {
    let whole = common::model(preset);
    let peers: Vec<String> = (0..world).map(|_| common::ports::free_addr()).collect();
    let (ended, ends) = unbounded_channel();
    let (train_events, events) = unbounded_channel();
    let members = thread::scope(|s| {
        let ranks: Vec<_> = (0..world)
            .map(|rank| {
                let spec = GroupSpec {
                    group: "g".into(),
                    epoch: 1,
                    rank,
                    peers: peers.clone(),
                    options: CollectiveOptions {
                        timeout: Duration::from_secs(20),
                        setup_timeout: Duration::from_secs(20),
                    },
                    security: tandem_proto::Security::Insecure,
                    engine: EngineConfig::default(),
                    moe,
                    data: DataPlane::Tcp,
                };
                let shard = whole.cut(rank, world, moe).unwrap();
                let (tokenizer, train_events, ended) = (
                    (rank == 0).then(|| TextTokenizer::load(&common::model_dir(preset)).unwrap()),
                    train_events.clone(),
                    ended.clone(),
                );
                s.spawn(move || group::join(&spec, shard, tokenizer, train_events, ended).unwrap())
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    (members, ends, events)
}

fn on_group(preset: Preset, world: usize, moe: MoeSplit, method: &MethodChoice, dir: &Path) -> Outcome {
    let (mut members, mut ends, events) = form(preset, world, moe);
    let Member::Leader(engine) = members.remove(0) else { panic!("rank 0 does not lead") };
    let outcome = run_job(&engine, method, dir, events);
    // Rank 0 leaves (every handle gone): the followers are told to stop; nobody failed.
    drop(engine);
    for _ in 0..world {
        let end = ends.blocking_recv().unwrap();
        assert_eq!(end.error, None, "rank {} ended with an error", end.rank);
    }
    drop(members);
    outcome
}

fn alone(preset: Preset, method: &MethodChoice, dir: &Path) -> Outcome {
    let model = Arc::new(common::model(preset));
    let tokenizer = TextTokenizer::load(&common::model_dir(preset)).unwrap();
    let engine = Engine::new(model, vec![], Some(tokenizer), EngineConfig::default()).unwrap();
    let (engine, events) = EngineThread::start(engine).unwrap();
    run_job(&engine, method, dir, events)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * b.abs().max(1.0)
}

/// Each tensor's largest |a − b|, relative to the largest |b| of all tensors.
fn tensor_rel_diffs(a: &Adapter, b: &Adapter) -> Vec<f64> {
    let pairs: Vec<(Vec<f32>, Vec<f32>)> = (a.weights().into_iter().zip(b.weights()))
        .map(|((_, x), (_, y))| {
            assert_eq!(x.shape(), y.shape());
            (x.to_vec_f32().unwrap(), y.to_vec_f32().unwrap())
        })
        .collect();
    let scale = pairs.iter().flat_map(|(_, y)| y.iter()).fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = |(x, y): &(Vec<f32>, Vec<f32>)| x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
    pairs.iter().map(|p| (diff(p) / scale) as f64).collect()
}

fn weights_rel_diff(a: &Adapter, b: &Adapter) -> f64 {
    tensor_rel_diffs(a, b).into_iter().fold(0.0, f64::max)
}

#[test]
fn a_job_trained_on_a_group_matches_the_whole_model() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("group-training");
    let (sliced, spread) = (MoeSplit::Intermediate, MoeSplit::Experts);
    let esft = |experts: Option<BTreeMap<usize, Vec<usize>>>| MethodChoice::Esft { experts, threshold: 0.3 };
    for (preset, world, moe, method) in [
        (Preset::Tiny, 2, sliced, lora()),
        (Preset::Tiny, 4, sliced, lora()),
        (Preset::TinyMoe, 2, sliced, lora()),
        (Preset::TinyMoe, 2, spread, lora()),
        (Preset::TinyMoe, 4, spread, lora()),
        // ESFT, its experts chosen from the data on the group, or given.
        (Preset::TinyMoe, 2, sliced, esft(None)),
        (Preset::TinyMoe, 4, sliced, esft(Some(BTreeMap::from([(0, vec![1, 6]), (1, vec![3])])))),
        (Preset::TinyMoe, 2, spread, esft(None)),
        (Preset::TinyMoe, 4, spread, esft(Some(BTreeMap::from([(0, vec![1, 6]), (1, vec![3, 4])])))),
    ] {
        let kind = if matches!(method, MethodChoice::Lora { .. }) { "lora" } else { "esft" };
        let what = format!("{} over {world} ranks, {moe:?}, {kind}", preset.name());
        let reference = alone(preset, &method, &root.join(format!("{}-alone", preset.name())));
        let dir = root.join(format!("{}-{world}-{moe:?}", preset.name()));
        let got = on_group(preset, world, moe, &method, &dir);
        assert_eq!(got.losses.len(), reference.losses.len(), "{what}: steps");
        assert!(got.losses.len() >= 6, "{what}: {} steps", got.losses.len());
        for (i, (a, b)) in got.losses.iter().zip(&reference.losses).enumerate() {
            assert!(close(*a, *b), "{what}: step {} loss {a} vs {b}", i + 1);
        }
        // Trained: LoRA's B (every second tensor) starts at zero, PEFT's init, and an ESFT
        // expert as the base's.
        let moved = match &got.adapter {
            Adapter::Lora(_) => (got.adapter.weights().iter().skip(1).step_by(2))
                .any(|(_, t)| t.to_vec_f32().unwrap().iter().any(|v| *v != 0.0)),
            Adapter::Esft(e) => {
                let mut chosen: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                e.experts.keys().for_each(|&(layer, x)| chosen.entry(layer).or_default().push(x));
                let base = EsftAdapter { experts: common::model(preset).base_experts(&chosen).unwrap() };
                weights_rel_diff(&got.adapter, &Adapter::Esft(base)) > 1e-6
            }
        };
        assert!(moved, "{what}: the adapter did not move");
        // AdamW moves each weight by about the learning rate whatever its gradient's size, so a
        // weight whose gradient is near zero moves as the rounding of the shards' partial sums
        // says; in a MoE model such noise can also tip a near tie of the router. Measured here
        // (printed with --nocapture): dense within 5e-5, MoE within 1.3e-3, most LoRA tensors
        // within 1e-5 (the batches, hence the rounding, follow the engine's timing).
        let tolerance = if preset == Preset::TinyMoe { 3e-3 } else { 1e-4 };
        let diffs = tensor_rel_diffs(&got.adapter, &reference.adapter);
        let diff = diffs.iter().copied().fold(0.0, f64::max);
        assert!(diff < tolerance, "{what}: exported adapter differs by {diff} (relative)");
        let close_tensors = diffs.iter().filter(|&&d| d < 1e-5).count();
        eprintln!("{what}: {close_tensors} of {} tensors within 1e-5, largest difference {diff:.1e}", diffs.len());
        assert!(
            close(got.validation_loss, reference.validation_loss),
            "{what}: validation {} vs {}",
            got.validation_loss,
            reference.validation_loss
        );
        assert_eq!(got.answer, reference.answer, "{what}: the base model's answer");
        assert!(!got.answer.is_empty());
        // The checkpoint holds the whole adapter (an ordinary one, whatever the group's size).
        let config = &common::model(preset).config;
        let resumed = checkpoint::load(&got.checkpoint, config, common::examples(24, config.vocab_size, 3)).unwrap();
        let saved =
            checkpoint::load(&reference.checkpoint, config, common::examples(24, config.vocab_size, 3)).unwrap();
        assert_eq!(resumed.progress.step, saved.progress.step, "{what}");
        let diff = common::rel_diff(&resumed.weights, &saved.weights);
        assert!(diff < tolerance, "{what}: checkpoint differs by {diff}");
    }
}
