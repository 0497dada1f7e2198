//! The inference engine of one process: continuous batching over a paged KV cache. Every step
//! builds one batch: first one decode token for each running sequence, then prefill chunks of
//! the sequences still reading their prompts, under a token budget; requests join as soon as
//! their KV pages (and their adapter's, when it is not resident) can be had and leave the moment
//! they finish. Each request may use a different adapter (or none) in the same batch; it holds
//! the adapter version it was submitted with until it finishes.
//!
//! [`Engine::step`] is schedule, execute, book:
//! - `schedule.rs`: admission, the batch under the token budget, the fine-tuning microbatches
//!   that fit ([`coserve`]), the time left for backward layers.
//! - `execute.rs`: backward layers of the batches in flight, then the forward pass through
//!   [`crate::model::Model::pass`], its plan sent first when this engine leads a worker group
//!   ([`group_plan`]).
//! - `bookkeeping.rs`: sampling and streaming, latency figures, retiring requests, booking
//!   losses and gradients to their jobs, the measured costs ([`budget`]).
//!
//! Also here: `paged.rs` (adapters' pages in the unified pool, `pool.rs`) and `metrics.rs`.

mod bookkeeping;
mod budget;
mod coserve;
mod execute;
pub mod group_plan;
pub mod metrics;
mod paged;
pub mod pool;
mod schedule;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_kernels::DType;

use budget::Budget;
use coserve::{EngineJob, Training};
pub use coserve::{MicrobatchTrace, StepTrace};
use metrics::{Buckets, EngineMetrics, JobMetrics, Samples, TokenCounts};
use paged::PagedAdapters;
pub use paged::{CacheStats, adapter_pages};
use pool::{PagePool, PoolUsage};

use crate::adapters::registry::{AdapterRegistry, AdapterVersion, Origin};
use crate::adapters::{Adapter, AdapterSet};
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
use crate::sampling::{FinishReason, Sampler, SamplingParams, StopChecker};
use crate::structured::Grammars;
use crate::tokenizer::TextTokenizer;
use crate::train::data::Example;
use crate::train::finetune::{MethodChoice, resolve_method};
use crate::train::job::{Hyperparams, Job, Method, StepReport, TrainSpec};
use crate::train::trainer::validation_loss;

/// Step traces an engine keeps for [`Engine::take_step_traces`].
pub const STEP_TRACES: usize = 64;

/// Sizes of the engine's cache and batches.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Pages of the unified pool (each one KV block of `block_size` tokens in every layer; KV
    /// blocks and resident adapters' weights share them).
    pub pages: usize,
    pub block_size: usize,
    /// Tokens one step may process (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests that may wait for admission; past this, [`Engine::submit`] refuses with
    /// [`Error::Overloaded`].
    pub max_waiting: usize,
    /// The time-per-output-token target: how long an iteration may take while requests are
    /// decoding. Fine-tuning gets what the inference tokens leave of it.
    pub tpot_target: Duration,
    /// The longest prompt plus completion admitted, in tokens; `None`: the model's context
    /// (and never more than the pool holds).
    pub max_model_len: Option<usize>,
    /// Uploaded adapters kept in host memory (the tier below the pool): past this, the least
    /// recently requested one is dropped and read from its folder again when next asked for.
    /// `None`: every one is kept. Adapters given at start and jobs' adapters are always kept.
    pub host_adapters: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            pages: 512,
            block_size: 16,
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 1024,
            tpot_target: Duration::from_millis(200),
            max_model_len: None,
            host_adapters: None,
        }
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// Name of a loaded adapter, or `None` for the base model.
    pub adapter: Option<String>,
    pub params: SamplingParams,
}

/// A finished request.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOutput {
    /// Index of the request in submission order.
    pub index: usize,
    pub prompt_tokens: usize,
    pub token_ids: Vec<u32>,
    /// Log-probability of each generated token (always computed; reporting is the caller's).
    pub logprobs: Vec<f32>,
    /// The most likely alternatives at each generated token, when the request asked for them
    /// (`top_logprobs`); empty otherwise.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// An embedding request's embedding ([`Engine::submit_embedding`]); empty otherwise.
    pub embedding: Vec<f32>,
    /// Decoded text (empty without a tokenizer), cut at a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// When a finished request passed each phase on this engine, for its trace.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    pub index: usize,
    pub submitted: Instant,
    /// Taken off the queue for its prefill.
    pub scheduled: Instant,
    pub first_token: Instant,
    pub finished: Instant,
    /// Decode iterations it took part in (after its first token).
    pub decode_batches: u32,
}

/// A token sampled for a request that goes on, for streaming: the text it settled (empty while
/// it may still become part of a stop string or of a character being decoded).
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Index of the request in submission order.
    pub index: usize,
    pub token: u32,
    pub logprob: f32,
    /// The most likely alternatives, when asked for.
    pub top_logprobs: Vec<(u32, f32)>,
    pub text: String,
}

struct Sequence {
    index: usize,
    prompt_len: usize,
    max_tokens: usize,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    adapter: Option<Arc<AdapterVersion>>,
    sampler: Sampler,
    stop: StopChecker,
    logprobs: Vec<f32>,
    top_logprobs: Vec<Vec<(u32, f32)>>,
    /// An embedding request's sum of its tokens' last hidden states so far (it generates
    /// nothing); `None` for a generation.
    embedding: Option<Vec<f32>>,
    /// Bytes of its text already reported in [`Progress`].
    streamed: usize,
    submitted_at: Instant,
    /// When it left the queue, and when its first and last tokens were sampled.
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    decode_batches: u32,
    /// The request's W3C `traceparent`, which a worker group's plans carry to its other ranks.
    trace: Option<String>,
}

/// Latency and token counters behind [`Engine::metrics`].
#[derive(Default)]
struct Counters {
    iterations: u64,
    tokens: TokenCounts,
    last: TokenCounts,
    ttft: Samples,
    tpot: Samples,
    within_target: u64,
    timed: u64,
    iteration: Buckets,
    disk_loads: Buckets,
}

pub struct Engine {
    model: Arc<Model>,
    cache: KvCache,
    pool: PagePool,
    paged: PagedAdapters,
    registry: AdapterRegistry,
    /// The packed adapters of the last batch, by adapter version id in slot order: reused while
    /// the batches use the same versions.
    batch_adapters: Option<(Vec<u64>, AdapterSet)>,
    tokenizer: Option<Arc<TextTokenizer>>,
    /// Compiles structured outputs' schemas (made on the first request with one).
    grammars: Option<Arc<Grammars>>,
    eos: Vec<u32>,
    cfg: EngineConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    submitted: usize,
    /// The uploaded adapters' last request (its index), which decides which one leaves the
    /// host tier when it is full.
    last_requested: HashMap<String, usize>,
    training: Training,
    /// Optimizer steps taken since the last [`Engine::take_step_reports`].
    reports: Vec<StepReport>,
    /// The optimizer steps taken since the last call to [`Engine::take_step_traces`] (the
    /// latest [`STEP_TRACES`]), as they ran.
    step_traces: Vec<StepTrace>,
    budget: Budget,
    /// When the last iteration sampled tokens.
    last_sample: Option<Instant>,
    counters: Counters,
    /// Tokens the last step sampled for requests that go on.
    progress: Vec<Progress>,
    /// The phases of the requests the last step finished.
    timings: Vec<Timings>,
    /// Rank 0 of a worker group: where each forward pass's plan goes first.
    plans: Option<Box<dyn group_plan::PlanSink>>,
}

fn job_metrics(j: &EngineJob) -> JobMetrics {
    let secs = j.added.elapsed().as_secs_f64();
    let per_second = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
    let p = &j.job.progress;
    JobMetrics {
        step: p.step,
        total_steps: p.total_steps,
        tokens: j.tokens,
        tokens_per_s: per_second(j.tokens as f64),
        last_loss: j.last_loss,
        learning_rate: f64::from(j.job.spec.hyper.lr_at((p.step + 1).min(p.total_steps), p.total_steps)),
        engine_share: per_second(j.engine_seconds).min(1.0),
    }
}

impl Engine {
    /// An engine over `model` serving `adapters` (by name) and the base model.
    pub fn new(
        model: impl Into<Arc<Model>>,
        adapters: Vec<(String, Adapter)>,
        tokenizer: Option<TextTokenizer>,
        cfg: EngineConfig,
    ) -> Result<Self> {
        let optional = [cfg.max_model_len, cfg.host_adapters].map(|n| n.unwrap_or(1));
        if [cfg.block_size, cfg.pages, cfg.max_batch_tokens, cfg.max_running].iter().chain(&optional).any(|&n| n == 0) {
            return Err(Error::InvalidRequest(format!("engine sizes must be positive: {cfg:?}")));
        }
        let model = model.into();
        if let Some(len) = cfg.max_model_len.filter(|&len| len > model.config.max_position_embeddings) {
            return Err(Error::InvalidRequest(format!(
                "a maximum model length of {len} tokens is past the model's context of {}",
                model.config.max_position_embeddings
            )));
        }
        let mut registry = AdapterRegistry::default();
        for (name, adapter) in adapters {
            if registry.resolve(&name).is_ok() {
                return Err(Error::InvalidRequest(format!("adapter {name:?} given twice")));
            }
            registry.publish(&name, model.serving_adapter(adapter)?, Origin::Upload { dir: None })?;
        }
        let cache = KvCache::new(&model, cfg.pages, cfg.block_size, DType::F32)?;
        let mut eos = model.config.eos_token_ids.clone();
        if let Some(t) = &tokenizer {
            eos.extend(t.eos_token_ids());
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Engine {
            model,
            cache,
            pool: PagePool::new(cfg.pages),
            paged: PagedAdapters::default(),
            registry,
            batch_adapters: None,
            tokenizer: tokenizer.map(Arc::new),
            grammars: None,
            eos,
            budget: Budget::new(cfg.tpot_target),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            submitted: 0,
            last_requested: HashMap::new(),
            training: Training::default(),
            reports: Vec::new(),
            step_traces: Vec::new(),
            last_sample: None,
            counters: Counters::default(),
            progress: Vec::new(),
            timings: Vec::new(),
            plans: None,
        })
    }

    /// Makes this engine (over rank 0's shard) lead a worker group: the plan of every model
    /// call that holds collectives (forward passes, backward layers, validation passes) goes to
    /// `plans` before the call, for the other ranks to make it too.
    pub fn lead_group(&mut self, plans: Box<dyn group_plan::PlanSink>) {
        self.plans = Some(plans);
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> Option<&TextTokenizer> {
        self.tokenizer.as_deref()
    }

    pub(crate) fn shared_model(&self) -> Arc<Model> {
        self.model.clone()
    }

    pub(crate) fn shared_tokenizer(&self) -> Option<Arc<TextTokenizer>> {
        self.tokenizer.clone()
    }

    pub fn registry(&self) -> &AdapterRegistry {
        &self.registry
    }

    /// Publishes a new version of adapter `name` (or its first); requests submitted from now on
    /// use it, requests already submitted finish with the version they hold.
    pub fn publish_adapter(&mut self, name: &str, adapter: Adapter, origin: Origin) -> Result<Arc<AdapterVersion>> {
        let v = self.registry.publish(name, adapter, origin)?;
        if matches!(v.origin, Origin::Upload { dir: Some(_) }) {
            self.trim_host_tier(name);
        }
        self.paged.drop_unused(&mut self.pool);
        Ok(v)
    }

    /// Removes adapter `name`; requests already submitted on it finish.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        self.registry.remove(name)?;
        self.last_requested.remove(name);
        self.paged.drop_unused(&mut self.pool);
        Ok(())
    }

    /// Drops the least recently requested uploaded adapters (never `keep`, just published)
    /// until the host tier holds `host_adapters`; requests already holding one finish with it.
    fn trim_host_tier(&mut self, keep: &str) {
        let Some(cap) = self.cfg.host_adapters else { return };
        let mut droppable: Vec<(usize, String)> = (self.registry.list().into_iter())
            .filter(|v| matches!(v.origin, Origin::Upload { dir: Some(_) }) && v.name != keep)
            .map(|v| (self.last_requested.get(&v.name).copied().unwrap_or(0), v.name.clone()))
            .collect();
        let excess = (droppable.len() + 1).saturating_sub(cap);
        droppable.sort_unstable();
        for (_, name) in droppable.into_iter().take(excess) {
            let _ = self.registry.remove(&name);
            self.last_requested.remove(&name);
        }
    }

    /// Pool pages in use by kind.
    pub fn pool_usage(&self) -> PoolUsage {
        self.pool.usage()
    }

    pub fn adapter_cache_stats(&self) -> CacheStats {
        self.paged.stats
    }

    /// Trains `job` inside this engine's loop, beside inference. Its adapter is served under the
    /// job's name from now on: version 1 is its initial weights, and every optimizer step
    /// publishes the next.
    pub fn add_job(&mut self, job: Job) -> Result<()> {
        let name = job.spec.name.clone();
        if self.registry.resolve(&name).is_ok() {
            return Err(Error::InvalidRequest(format!("an adapter named {name:?} exists already")));
        }
        self.publish_job_weights(&name, job.progress.step, job.weights.adapter())?;
        self.training.jobs.push(EngineJob {
            job,
            added: Instant::now(),
            tokens: 0,
            last_loss: None,
            engine_seconds: 0.0,
            microbatches: Vec::new(),
        });
        Ok(())
    }

    /// Makes a new job for this engine's model and trains it ([`Engine::add_job`]): ESFT's
    /// experts are chosen from its data when left open and copied from the base, which takes
    /// forward passes and, on a group, collectives the followers join (hence here, on the
    /// engine's thread, between steps).
    pub fn add_new_job(
        &mut self,
        name: &str,
        method: &MethodChoice,
        hyper: Hyperparams,
        data: Arc<Vec<Example>>,
    ) -> Result<()> {
        // Checked before any plan goes out: a follower must not start a call rank 0 never makes.
        Job::check(name, &hyper, &data)?;
        if let (Some(sink), MethodChoice::Esft { experts: None, threshold }) = (&mut self.plans, method) {
            sink.select_experts(*threshold, &data)?;
        }
        let method = resolve_method(method, &self.model, &data)?;
        if let (Some(sink), Method::Esft { experts }) = (&mut self.plans, &method) {
            sink.base_experts(experts)?;
        }
        self.add_job(Job::new(TrainSpec { name: name.to_string(), method, hyper }, &self.model, data)?)
    }

    /// Publishes job `name`'s weights after optimizer step `step` (`whole`, for the whole
    /// model) under its name, cut for this shard; the group's followers get them through the
    /// plans when this engine leads one.
    fn publish_job_weights(&mut self, name: &str, step: u64, whole: Adapter) -> Result<()> {
        let origin = Origin::Training { job: name.to_string(), step: step as usize };
        let v = self.publish_adapter(name, self.model.shard_adapter(&whole)?, origin)?;
        if let Some(sink) = &mut self.plans {
            sink.published(&v, whole);
        }
        Ok(())
    }

    /// The mean token loss of adapter `name` (as it is now) on `examples`: a job's validation.
    pub fn validation_loss(&mut self, name: &str, examples: &[Example]) -> Result<f64> {
        let v = self.registry.resolve(name)?;
        if let Some(sink) = &mut self.plans {
            sink.validate(&v, examples)?;
        }
        validation_loss(&self.model, v.adapter.clone(), examples)
    }

    /// Job `name` in training.
    pub fn job(&self, name: &str) -> Option<&Job> {
        self.training.jobs.iter().map(|j| &j.job).find(|j| j.spec.name == name)
    }

    /// Stops training job `name` and returns it as it stands (its microbatches in flight finish
    /// for the other jobs in their batches; its adapter stays published at its last step).
    pub fn cancel_job(&mut self, name: &str) -> Result<Job> {
        let i = self.training.jobs.iter().position(|j| j.job.spec.name == name);
        let i = i.ok_or_else(|| Error::InvalidRequest(format!("no fine-tuning job {name:?} in this engine")))?;
        Ok(self.training.jobs.remove(i).job)
    }

    /// Removes the jobs that have finished (their adapters stay published) and returns them.
    pub fn take_finished_jobs(&mut self) -> Vec<Job> {
        let in_flight = &self.training.in_flight;
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.training.jobs).into_iter().partition(|j| {
            j.job.is_finished() && !in_flight.iter().any(|b| b.members.iter().any(|m| m.job == j.job.spec.name))
        });
        self.training.jobs = running;
        done.into_iter().map(|j| j.job).collect()
    }

    /// The optimizer steps taken since the last call.
    pub fn take_step_reports(&mut self) -> Vec<StepReport> {
        std::mem::take(&mut self.reports)
    }

    /// How the optimizer steps taken since the last call ran, for their traces (the latest
    /// [`STEP_TRACES`] of them: an engine nobody asks keeps no more).
    pub fn take_step_traces(&mut self) -> Vec<StepTrace> {
        std::mem::take(&mut self.step_traces)
    }

    pub fn metrics(&self) -> EngineMetrics {
        let c = &self.counters;
        let jobs = self.training.jobs.iter().map(|j| (j.job.spec.name.clone(), job_metrics(j))).collect();
        let adapters = self.registry.list();
        EngineMetrics {
            running: self.running.len(),
            waiting: self.waiting.len(),
            iterations: c.iterations,
            tokens: c.tokens,
            last_iteration: c.last,
            time_to_first_token: c.ttft.summary(),
            time_per_output_token: c.tpot.summary(),
            tpot_target_s: self.cfg.tpot_target.as_secs_f64(),
            tokens_within_target: c.within_target,
            output_tokens_timed: c.timed,
            jobs,
            adapter_cache: self.paged.stats,
            adapters_host: adapters.len(),
            adapters_pool: (adapters.iter()).filter(|v| self.paged.is_resident(v.id)).map(|v| v.name.clone()).collect(),
            pool: self.pool.usage(),
            iteration_limit_s: self.budget.limit(),
            iteration_seconds: c.iteration.clone(),
            adapter_disk_loads: c.disk_loads.clone(),
            adapter_page_ins: self.paged.page_ins.clone(),
        }
    }

    /// The figures of job `name` in training (cheaper than all of [`Engine::metrics`]).
    pub fn job_metrics(&self, name: &str) -> Option<JobMetrics> {
        self.training.jobs.iter().find(|j| j.job.spec.name == name).map(job_metrics)
    }

    /// What compiles structured outputs' schemas for this model, made on first use.
    fn grammars(&mut self) -> Result<Arc<Grammars>> {
        if self.grammars.is_none() {
            let tokenizer = (self.tokenizer.as_deref())
                .ok_or_else(|| Error::InvalidRequest("structured outputs need a tokenizer (tokenizer.json)".into()))?;
            let eos = self.eos.first().copied().unwrap_or(0);
            self.grammars = Some(Arc::new(Grammars::new(tokenizer, self.model.config.vocab_size, eos)?));
        }
        self.grammars.clone().ok_or_else(|| Error::Internal("no grammars".into()))
    }

    /// Most tokens a request of `prompt_len` tokens for `adapter` may generate: what is left of
    /// the context (the model's, `max_model_len`, the pool's pages less those its adapter takes).
    pub fn room(&self, prompt_len: usize, adapter: Option<&AdapterVersion>) -> usize {
        let c = &self.model.config;
        let adapter_pages = adapter.map_or(0, |v| adapter_pages(&v.adapter, c, self.cfg.block_size));
        let context = (self.cfg.pages.saturating_sub(adapter_pages) * self.cfg.block_size)
            .min(c.max_position_embeddings)
            .min(self.cfg.max_model_len.unwrap_or(usize::MAX));
        context.saturating_sub(prompt_len)
    }

    /// Queues a request after checking it; returns its index.
    pub fn submit(&mut self, req: GenerationRequest) -> Result<usize> {
        self.enqueue(req, false)
    }

    /// Queues an embedding request for `prompt` through `adapter` (none: the base model); it
    /// runs in the batches beside generation and training, generates nothing, and its output's
    /// `embedding` is the mean of its tokens' last hidden states (after the final norm), scaled
    /// to length 1. Returns its index.
    pub fn submit_embedding(&mut self, prompt: Vec<u32>, adapter: Option<String>) -> Result<usize> {
        self.enqueue(GenerationRequest { prompt, adapter, params: SamplingParams::greedy(1) }, true)
    }

    fn enqueue(&mut self, req: GenerationRequest, embed: bool) -> Result<usize> {
        req.params.validate()?;
        let c = &self.model.config;
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::InvalidRequest(format!("token id {t} outside the vocabulary of {}", c.vocab_size)));
        }
        if let Some((t, _)) = req.params.logit_bias.iter().find(|&&(t, _)| t as usize >= c.vocab_size) {
            return Err(Error::InvalidRequest(format!(
                "logit_bias names token id {t}, outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        if !req.params.stop.is_empty() && self.tokenizer.is_none() {
            return Err(Error::InvalidRequest("stop strings need a tokenizer (tokenizer.json)".into()));
        }
        let adapter = req.adapter.as_deref().map(|name| self.registry.resolve(name)).transpose()?;
        let constraint = req.params.grammar.as_ref().map(|g| self.grammars()?.constraint(g)).transpose()?;
        let room = self.room(req.prompt.len(), adapter.as_deref());
        if req.params.max_tokens > room {
            return Err(Error::InvalidRequest(format!(
                "prompt ({}) plus max_tokens ({}) exceeds the context of {} tokens (the model's, the pool's, less \
                 its adapter's pages)",
                req.prompt.len(),
                req.params.max_tokens,
                req.prompt.len() + room
            )));
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(Error::Overloaded(format!("{} requests are already waiting", self.waiting.len())));
        }
        let index = self.submitted;
        self.submitted += 1;
        // Kept only where a bounded host tier needs it to choose what leaves.
        if let (Some(name), Some(_)) = (&req.adapter, self.cfg.host_adapters) {
            self.last_requested.insert(name.clone(), index);
        }
        self.waiting.push_back(Sequence {
            index,
            prompt_len: req.prompt.len(),
            max_tokens: req.params.max_tokens,
            tokens: req.prompt,
            computed: 0,
            blocks: Vec::new(),
            adapter,
            sampler: Sampler::new(&req.params).constrained(constraint, self.eos.first().copied().unwrap_or(0)),
            stop: StopChecker::new(&req.params, &self.eos),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            embedding: embed.then(Vec::new),
            streamed: 0,
            submitted_at: Instant::now(),
            scheduled_at: None,
            first_token_at: None,
            last_token_at: None,
            decode_batches: 0,
            trace: None,
        });
        Ok(index)
    }

    /// Names the trace waiting request `index` belongs to (its W3C `traceparent`), so that
    /// the plans of the passes it joins carry it to a worker group's other ranks.
    pub fn trace(&mut self, index: usize, traceparent: String) {
        if let Some(seq) = self.waiting.iter_mut().find(|s| s.index == index) {
            seq.trace = Some(traceparent);
        }
    }

    /// The tokens the last step sampled for requests that go on, with the text each settled:
    /// what a streaming caller sends on after each step. A request's streamed texts followed by
    /// the rest of its [`GenerationOutput::text`] make its whole text.
    pub fn progress(&self) -> &[Progress] {
        &self.progress
    }

    /// When each request the last step finished passed its phases.
    pub fn timings(&self) -> &[Timings] {
        &self.timings
    }

    /// Whether any request is queued or running.
    pub fn has_requests(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Whether any request is queued or running, or any fine-tuning is left.
    pub fn has_work(&self) -> bool {
        self.has_requests() || !self.training.is_idle()
    }

    /// Runs one iteration: the inference tokens, then fine-tuning microbatches in what the
    /// time budget leaves, all in one forward pass; then the loss of those microbatches and as
    /// much backward as still fits. Returns the requests that finished.
    pub fn step(&mut self) -> Result<Vec<GenerationOutput>> {
        let started = Instant::now();
        self.progress.clear();
        self.timings.clear();
        self.counters.last = TokenCounts::default();
        let Some(iteration) = self.schedule()? else { return Ok(Vec::new()) };
        // Backward layers first, in what the planned forward pass leaves of the budget (at
        // least one when no request shares the iteration).
        let idle = iteration.input.tokens.is_empty();
        self.run_backward(Instant::now() + iteration.backward_time, idle)?;
        let outputs = match self.execute(iteration)? {
            Some(ran) => self.book(ran)?,
            None => Vec::new(),
        };
        self.counters.iterations += 1;
        self.counters.iteration.observe(started.elapsed().as_secs_f64());
        Ok(outputs)
    }

    /// Counts an adapter's load from disk into host memory, which took `seconds` (it happens
    /// outside the engine, before the request that needs it is submitted).
    pub fn record_disk_load(&mut self, seconds: f64) {
        self.counters.disk_loads.observe(seconds);
    }

    /// Whether request `index` is still queued (not yet scheduled for its prefill).
    pub fn is_waiting(&self, index: usize) -> bool {
        self.waiting.iter().any(|s| s.index == index)
    }

    /// Where adapter `name` is now: `resident` in the page pool, or only in `host` memory;
    /// `None` if it is not registered here.
    pub fn adapter_tier(&self, name: &str) -> Option<&'static str> {
        let v = self.registry.resolve(name).ok()?;
        Some(if self.paged.is_resident(v.id) { "resident" } else { "host" })
    }

    /// Drops request `index` (its caller went away), waiting or running, and frees what it
    /// held; `false` when it is not here (it finished).
    pub fn cancel(&mut self, index: usize) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.index == index) {
            self.waiting.remove(i);
            return true;
        }
        match self.running.iter().position(|s| s.index == index) {
            Some(i) => {
                self.retire(i);
                true
            }
            None => false,
        }
    }

    /// Runs until every queued request has finished; outputs in submission order.
    pub fn run_to_completion(&mut self) -> Result<Vec<GenerationOutput>> {
        let mut out = Vec::new();
        while self.has_work() {
            out.extend(self.step()?);
        }
        out.sort_by_key(|o| o.index);
        Ok(out)
    }
}
