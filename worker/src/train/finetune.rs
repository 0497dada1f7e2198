//! One fine-tuning run from JSONL files to an exported adapter: the job, its validation loss,
//! checkpoints every N steps, resumption from the newest checkpoint, and an exact-match test
//! of greedy generation on held-out examples. What `tandem finetune` runs.
//!
//! Output folder: `adapter/` (the export), `checkpoints/step-NNNNNN/`, `log.jsonl` (one line
//! per optimizer step and validation), `summary.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tandem_proto::contract::{AutoHyperparams, BASE_LEARNING_RATE};

use super::data::{Example, load_jsonl};
use super::esft_select::select_experts;
use super::job::{Hyperparams, Job, Method, StepReport, TrainSpec};
use super::trainer::Trainer;
use super::{auto, checkpoint};
use crate::adapters::Adapter;
use crate::engine::{Engine, EngineConfig, GenerationRequest};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;
pub use tandem_proto::contract::MethodChoice;

/// The method `choice` names, ESFT's experts chosen from `data` when they were left open.
pub fn resolve_method(choice: &MethodChoice, model: &Model, data: &[Example]) -> Result<Method> {
    Ok(match choice {
        MethodChoice::Lora { rank, alpha, targets, rslora } => {
            Method::Lora { rank: *rank, alpha: *alpha, targets: targets.clone(), rslora: *rslora }
        }
        MethodChoice::Esft { experts: Some(e), .. } => Method::Esft { experts: e.clone() },
        MethodChoice::Esft { experts: None, threshold } => {
            Method::Esft { experts: select_experts(model, data, *threshold)? }
        }
    })
}

#[derive(Clone, Debug)]
pub struct FinetuneOptions {
    pub name: String,
    pub data: PathBuf,
    pub validation: Option<PathBuf>,
    /// Held-out examples whose first learned span greedy generation must reproduce exactly.
    pub test: Option<PathBuf>,
    pub out: PathBuf,
    pub method: MethodChoice,
    /// As asked; what `auto` leaves to Tandem is chosen for the data ([`auto::resolve`]).
    pub hyper: Hyperparams,
    pub auto: AutoHyperparams,
    pub max_seq_len: usize,
    /// Checkpoint every N optimizer steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Validation loss every N steps (0: only at the end).
    pub eval_every: u64,
    /// Continue from the newest checkpoint in `out/checkpoints`, if there is one.
    pub resume: bool,
}

/// Progress of a run, for a progress bar or a log.
pub enum Event<'a> {
    Started { total_steps: u64, step: u64, examples: usize, method: &'a Method, hyper: &'a Hyperparams },
    Step { report: &'a StepReport, tokens_per_s: f64 },
    Validation { step: u64, loss: f64 },
    Checkpoint { path: &'a Path },
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub steps: u64,
    /// Mean loss of the first and the last optimizer step of this run.
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub validation_loss: Option<f64>,
    /// Held-out examples generated exactly right, of how many.
    pub test_exact: Option<(usize, usize)>,
    pub tokens: usize,
    pub seconds: f64,
    pub adapter: PathBuf,
}

pub fn run(
    model: Arc<Model>,
    tokenizer: &TextTokenizer,
    opts: &FinetuneOptions,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Summary> {
    let load = |p: &Path| load_jsonl(p, tokenizer, opts.max_seq_len);
    let data = Arc::new(load(&opts.data)?);
    let validation = opts.validation.as_deref().map(load).transpose()?;
    let test = opts.test.as_deref().map(load).transpose()?;
    let method = resolve_method(&opts.method, &model, &data)?;
    let multiplier = f64::from(opts.hyper.lr) / BASE_LEARNING_RATE;
    let (hyper, _) = auto::resolve(&opts.hyper, multiplier, opts.auto, &data);
    let spec = TrainSpec { name: opts.name.clone(), method, hyper };
    let checkpoints = opts.out.join("checkpoints");
    let job = match checkpoint::latest(&checkpoints)?.filter(|_| opts.resume) {
        Some(path) => {
            let job = checkpoint::load(&path, &model.config, data.clone())?;
            if job.spec != spec {
                return Err(Error::InvalidRequest(format!(
                    "{}: this checkpoint was made with other settings ({:?}); resume with the same ones",
                    path.display(),
                    job.spec
                )));
            }
            job
        }
        None => Job::new(spec, &model, data.clone())?,
    };
    let mut log = Log::open(&opts.out)?;
    on_event(Event::Started {
        total_steps: job.progress.total_steps,
        step: job.progress.step,
        examples: data.len(),
        method: &job.spec.method,
        hyper: &job.spec.hyper,
    });
    let mut trainer = Trainer::new(&model, vec![job]);
    let (start, mut tokens) = (Instant::now(), 0);
    let (mut first_loss, mut last_loss) = (None, None);
    let mut last_saved = None;
    while !trainer.is_finished() {
        let t0 = Instant::now();
        let pass = trainer.pass()?;
        tokens += pass.tokens;
        for report in &pass.steps {
            first_loss.get_or_insert(report.loss);
            last_loss = Some(report.loss);
            log.write(report)?;
            on_event(Event::Step { report, tokens_per_s: pass.tokens as f64 / t0.elapsed().as_secs_f64() });
            let step = report.step;
            if let Some(v) = &validation
                && opts.eval_every > 0
                && step % opts.eval_every == 0
                && step < report.total_steps
            {
                let loss = trainer.evaluate(0, v)?;
                log.write(&serde_json::json!({ "step": step, "validation_loss": loss }))?;
                on_event(Event::Validation { step, loss });
            }
            if opts.checkpoint_every > 0 && step % opts.checkpoint_every == 0 {
                let path = checkpoint::save(&trainer.jobs[0], &model.config, &checkpoints)?;
                on_event(Event::Checkpoint { path: &path });
                last_saved = Some(step);
            }
        }
    }
    let job = &trainer.jobs[0];
    if last_saved != Some(job.progress.step) {
        let path = checkpoint::save(job, &model.config, &checkpoints)?;
        on_event(Event::Checkpoint { path: &path });
    }
    let adapter_dir = opts.out.join("adapter");
    checkpoint::export(job, &model.config, &adapter_dir)?;
    let validation_loss = validation.as_ref().map(|v| trainer.evaluate(0, v)).transpose()?;
    if let Some(loss) = validation_loss {
        log.write(&serde_json::json!({ "step": job.progress.step, "validation_loss": loss }))?;
        on_event(Event::Validation { step: job.progress.step, loss });
    }
    let adapter = job.weights.adapter();
    let steps = job.progress.step;
    drop(trainer);
    let test_exact = test.as_ref().map(|t| exact_match(model.clone(), adapter, t)).transpose()?;
    let summary = Summary {
        steps,
        first_loss,
        last_loss,
        validation_loss,
        test_exact,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
        adapter: adapter_dir,
    };
    let path = opts.out.join("summary.json");
    let text =
        serde_json::to_string_pretty(&summary).map_err(|e| Error::Json { path: path.clone(), msg: e.to_string() })?;
    std::fs::write(&path, text).map_err(Error::io(&path))?;
    Ok(summary)
}

/// How many `examples` greedy generation with `adapter` completes exactly: given the tokens up
/// to an example's first learned position, it must produce that learned span token for token
/// (its EOS included, when the span ends with one). Returns (right, total).
pub fn exact_match(model: Arc<Model>, adapter: Adapter, examples: &[Example]) -> Result<(usize, usize)> {
    let mut engine = Engine::new(model, vec![("job".into(), adapter)], None, EngineConfig::default())?;
    let mut expected = Vec::new();
    for e in examples {
        let Some(first) = e.targets.iter().position(|&t| t >= 0) else { continue };
        let span: Vec<u32> = e.targets[first..].iter().map_while(|&t| u32::try_from(t).ok()).collect();
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(span.len()) };
        engine.submit(GenerationRequest {
            prompt: e.tokens[..=first].to_vec(),
            adapter: Some("job".into()),
            params,
        })?;
        expected.push(span);
    }
    let outputs = engine.run_to_completion()?;
    let right = outputs.iter().zip(&expected).filter(|(o, want)| o.token_ids == **want).count();
    Ok((right, expected.len()))
}

/// `log.jsonl`: one JSON object per line, appended (a resumed run continues the same log).
struct Log(std::fs::File);

impl Log {
    fn open(out: &Path) -> Result<Log> {
        std::fs::create_dir_all(out).map_err(Error::io(out))?;
        let path = out.join("log.jsonl");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(Error::io(&path))?;
        Ok(Log(file))
    }

    fn write(&mut self, value: &impl Serialize) -> Result<()> {
        let line = serde_json::to_string(value).unwrap_or_default();
        writeln!(self.0, "{line}").map_err(Error::io("log.jsonl"))
    }
}
