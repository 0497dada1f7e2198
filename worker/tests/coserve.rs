//! Inference and fine-tuning in one engine loop: jobs trained beside inference traffic (their
//! rows in the same forward passes, their backward split over iterations) end where they end
//! trained alone, and inference answers as it does alone; an adapter being trained serves the
//! weights of its last completed step, one version per request.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{examples, hyper, lora, model, rel_diff, spec};
use tandem_worker::adapters::Adapter;
use tandem_worker::adapters::registry::Origin;
use tandem_worker::engine::{Engine, EngineConfig, GenerationOutput, GenerationRequest};
use tandem_worker::init_model::Preset;
use tandem_worker::model::Model;
use tandem_worker::sampling::SamplingParams;
use tandem_worker::train::data::Example;
use tandem_worker::train::job::{Job, Method, TrainSpec};
use tandem_worker::train::trainer::Trainer;

fn request(i: usize, adapter: Option<&str>, max_tokens: usize) -> GenerationRequest {
    let prompt = (0..2 + i % 5).map(|t| (11 * i + 5 * t + 2) as u32 % 60).collect();
    let params = SamplingParams { max_tokens, temperature: 0.0, ignore_eos: true, ..Default::default() };
    GenerationRequest { prompt, adapter: adapter.map(str::to_string), params }
}

fn config(tpot_target: Duration) -> EngineConfig {
    EngineConfig { pages: 4096, block_size: 4, max_batch_tokens: 32, tpot_target, ..EngineConfig::default() }
}

/// `req` alone on an idle engine, with `adapter` (if any) under the name it asks for.
fn alone(model: &Arc<Model>, req: GenerationRequest, adapter: Option<Adapter>) -> GenerationOutput {
    let adapters = match (&req.adapter, adapter) {
        (Some(name), Some(a)) => vec![(name.clone(), a)],
        _ => Vec::new(),
    };
    let mut e = Engine::new(model.clone(), adapters, None, config(Duration::from_secs(60))).unwrap();
    e.submit(req).unwrap();
    e.run_to_completion().unwrap().remove(0)
}

fn job_specs(preset: Preset, vocab: usize) -> Vec<(TrainSpec, Arc<Vec<Example>>)> {
    let mut specs = vec![
        (spec("a", lora(4, &["q_proj", "v_proj"]), hyper(4, 2, 1e-2, 1)), examples(8, vocab, 21)),
        (spec("b", lora(8, &["all-linear"]), hyper(3, 3, 5e-3, 2)), examples(6, vocab, 22)),
    ];
    if preset == Preset::TinyMoe {
        let experts = BTreeMap::from([(0, vec![1, 2]), (1, vec![5])]);
        specs.push((spec("esft", Method::Esft { experts }, hyper(4, 4, 1e-3, 4)), examples(8, vocab, 23)));
    }
    specs
}

/// Trains the jobs in an engine beside `requests` (half submitted at the start, half while
/// training runs); returns the engine's finished jobs and the requests' outputs, and checks
/// the pool is empty of KV pages at the end.
/// Also counts the iterations that ran fine-tuning rows forward, those that ran them together
/// with inference rows, and those that ran any backward.
fn coserve(
    model: &Arc<Model>,
    target: Duration,
    requests: &[GenerationRequest],
    jobs: Vec<Job>,
) -> (Vec<Job>, Vec<GenerationOutput>, [usize; 3]) {
    let mut e = Engine::new(model.clone(), vec![], None, config(target)).unwrap();
    for job in jobs {
        e.add_job(job).unwrap();
    }
    let (first, later) = requests.split_at(requests.len() / 2);
    for r in first {
        e.submit(r.clone()).unwrap();
    }
    let (mut out, mut forward, mut mixed, mut backward, mut steps) = (Vec::new(), 0, 0, 0, 0);
    let mut shared = false;
    while e.has_work() {
        out.extend(e.step().unwrap());
        steps += 1;
        if steps == 3 {
            for r in later {
                e.submit(r.clone()).unwrap();
            }
        }
        let m = e.metrics();
        // Each job's share of the engine's time: some, and never more than the engine had.
        let share: f64 = m.jobs.values().map(|j| j.engine_share).sum();
        assert!(share <= 1.0 + 1e-9, "jobs took {share} of the engine's time");
        shared |= m.jobs.values().any(|j| j.engine_share > 0.0 && j.learning_rate > 0.0);
        assert_eq!(m.iteration_seconds.count(), m.iterations, "every iteration timed");
        let last = m.last_iteration;
        if last.finetune > 0 && last.decode + last.prefill > 0 {
            mixed += 1;
        }
        forward += usize::from(last.finetune > 0);
        backward += usize::from(last.finetune_backward > 0);
    }
    assert_eq!(e.pool_usage().kv, 0, "KV pages leaked");
    assert!(shared, "no job was seen taking engine time at a learning rate");
    out.sort_by_key(|o| o.index);
    let mut jobs = e.take_finished_jobs();
    jobs.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    (jobs, out, [forward, mixed, backward])
}

/// `split`: the target is unreachable, so each backward must run one layer per iteration.
fn check_against_alone(preset: Preset, target: Duration, split: bool) {
    let model = Arc::new(model(preset));
    let specs = job_specs(preset, model.config.vocab_size);
    let jobs = || specs.iter().map(|(s, d)| Job::new(s.clone(), &model, d.clone()).unwrap()).collect::<Vec<_>>();
    let requests: Vec<_> = (0..6).map(|i| request(i, None, 5)).collect();
    let (trained, out, [forward, mixed, backward]) = coserve(&model, target, &requests, jobs());
    assert_eq!(trained.len(), specs.len(), "every job finished");
    assert_eq!(out.len(), requests.len(), "every request finished");
    if split {
        let layers = model.config.num_layers;
        assert!(backward >= layers * forward, "{forward} forwards, {backward} iterations with backward");
    } else {
        assert!(mixed > 0, "no iteration ran inference and fine-tuning rows together");
    }
    for (r, got) in requests.iter().zip(&out) {
        assert_eq!(got.token_ids, alone(&model, r.clone(), None).token_ids, "request {}", got.index);
    }
    for (job, init) in trained.iter().zip(jobs()) {
        let mut t = Trainer::new(&model, vec![init]);
        while !t.is_finished() {
            t.pass().unwrap();
        }
        let d = rel_diff(&job.weights, &t.jobs[0].weights);
        eprintln!("{}/{}: engine vs alone {d:.2e}", preset.name(), job.spec.name);
        assert_eq!(job.progress.step, t.jobs[0].progress.step);
        assert!(d < 1e-4, "{}/{}: engine vs alone differ by {d:.2e}", preset.name(), job.spec.name);
    }
}

#[test]
fn jobs_trained_beside_inference_match_jobs_trained_alone() {
    // A generous target: fine-tuning rows share the forward passes of the inference rows.
    for preset in [Preset::Tiny, Preset::TinyMoe] {
        check_against_alone(preset, Duration::from_secs(30), false);
    }
}

#[test]
fn a_backward_split_over_many_iterations_gives_the_same_weights() {
    // A target no iteration can meet: inference goes first, fine-tuning runs only when no
    // request is in the batch, one backward layer per iteration.
    for preset in [Preset::Tiny, Preset::TinyMoe] {
        check_against_alone(preset, Duration::from_nanos(1), true);
    }
}

#[test]
fn an_adapter_in_training_serves_its_last_completed_step() {
    let model = Arc::new(model(Preset::Tiny));
    let (s, data) = job_specs(Preset::Tiny, model.config.vocab_size).remove(0);
    let mut e = Engine::new(model.clone(), vec![], None, config(Duration::from_secs(30))).unwrap();
    e.add_job(Job::new(s, &model, data).unwrap()).unwrap();
    let v = e.registry().resolve("a").unwrap();
    assert_eq!((v.version, v.origin.clone()), (1, Origin::Training { job: "a".into(), step: 0 }));
    drop(v);
    while e.take_step_reports().is_empty() {
        e.step().unwrap();
    }
    let v = e.registry().resolve("a").unwrap();
    assert_eq!((v.version, v.origin.clone()), (2, Origin::Training { job: "a".into(), step: 1 }));
    let snapshot = v.adapter.clone();
    drop(v);
    // A long generation on step 1's weights while training goes on and publishes more steps.
    let req = request(3, Some("a"), 24);
    e.submit(req.clone()).unwrap();
    let mut out = Vec::new();
    let mut published = 0;
    while out.is_empty() {
        out.extend(e.step().unwrap());
        published += e.take_step_reports().len();
    }
    assert!(published > 0, "training published no step during the generation");
    assert!(e.registry().resolve("a").unwrap().version > 2);
    assert_eq!(out[0].token_ids, alone(&model, req.clone(), Some(snapshot.clone())).token_ids);
    // The check can fail: the newest weights answer differently.
    let newest = e.registry().resolve("a").unwrap().adapter.clone();
    assert_ne!(alone(&model, req, Some(newest)).token_ids, out[0].token_ids);
}
