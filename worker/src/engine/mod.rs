//! The inference engine of one process: continuous batching over a paged KV cache. Every step
//! builds one batch: first one decode token for each running sequence, then prefill chunks of
//! the sequences still reading their prompts, under a token budget; requests join as soon as
//! their KV pages (and their adapter's, when it is not resident) can be had and leave the moment
//! they finish. Each request may use a different adapter (or none) in the same batch; it holds
//! the adapter version it was submitted with until it finishes.

mod budget;
mod coserve;
pub mod group_plan;
pub mod metrics;
mod paged;
pub mod pool;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_kernels::DType;
use tandem_kernels::ops::SeqAttention;

use budget::Budget;
use coserve::{EngineJob, InFlight, Member, Training};
use group_plan::TrainingRows;
use metrics::{EngineMetrics, JobMetrics, Samples, TokenCounts};
use paged::PagedAdapters;
pub use paged::{CacheStats, adapter_pages};
use pool::{PagePool, PageUse, PoolUsage};

use crate::adapters::registry::{AdapterRegistry, AdapterVersion, Origin};
use crate::adapters::{Adapter, AdapterSet};
use crate::error::{Error, Result};
use crate::model::{AdapterGrads, ForwardInput, KvCache, Model, PendingBackward};
use crate::sampling::{FinishReason, Sampler, SamplingParams, StopChecker};
use crate::tokenizer::TextTokenizer;
use crate::train::data::Example;
use crate::train::finetune::{MethodChoice, resolve_method};
use crate::train::job::{Hyperparams, Job, Method, StepReport, TrainSpec};
use crate::train::trainer::validation_loss;

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
    /// Decoded text (empty without a tokenizer), cut at a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// A token sampled for a request that goes on, for streaming: the text it settled (empty while
/// it may still become part of a stop string or of a character being decoded).
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Index of the request in submission order.
    pub index: usize,
    pub token: u32,
    pub logprob: f32,
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
    /// Bytes of its text already reported in [`Progress`].
    streamed: usize,
    submitted_at: Instant,
    /// When its last token was sampled.
    last_token_at: Option<Instant>,
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
    eos: Vec<u32>,
    cfg: EngineConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    submitted: usize,
    training: Training,
    /// Optimizer steps taken since the last [`Engine::take_step_reports`].
    reports: Vec<StepReport>,
    budget: Budget,
    /// When the last iteration sampled tokens.
    last_sample: Option<Instant>,
    counters: Counters,
    /// Tokens the last step sampled for requests that go on.
    progress: Vec<Progress>,
    /// Rank 0 of a worker group: where each forward pass's plan goes first.
    plans: Option<Box<dyn group_plan::PlanSink>>,
}

fn job_metrics(j: &EngineJob) -> JobMetrics {
    let secs = j.added.elapsed().as_secs_f64();
    JobMetrics {
        step: j.job.progress.step,
        total_steps: j.job.progress.total_steps,
        tokens: j.tokens,
        tokens_per_s: if secs > 0.0 { j.tokens as f64 / secs } else { 0.0 },
        last_loss: j.last_loss,
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
        if cfg.block_size == 0 || cfg.pages == 0 || cfg.max_batch_tokens == 0 || cfg.max_running == 0 {
            return Err(Error::InvalidRequest(format!("engine sizes must be positive: {cfg:?}")));
        }
        let model = model.into();
        let mut registry = AdapterRegistry::default();
        for (name, adapter) in adapters {
            if registry.resolve(&name).is_ok() {
                return Err(Error::InvalidRequest(format!("adapter {name:?} given twice")));
            }
            registry.publish(&name, adapter, Origin::Upload { dir: None })?;
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
            eos,
            budget: Budget::new(cfg.tpot_target),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            submitted: 0,
            training: Training::default(),
            reports: Vec::new(),
            last_sample: None,
            counters: Counters::default(),
            progress: Vec::new(),
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
        self.paged.drop_unused(&mut self.pool);
        Ok(v)
    }

    /// Removes adapter `name`; requests already submitted on it finish.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        self.registry.remove(name)?;
        self.paged.drop_unused(&mut self.pool);
        Ok(())
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
        self.training.jobs.push(EngineJob { job, added: Instant::now(), tokens: 0, last_loss: None });
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
    /// for the other jobs in their groups; its adapter stays published at its last step).
    pub fn cancel_job(&mut self, name: &str) -> Result<Job> {
        let i = self.training.jobs.iter().position(|j| j.job.spec.name == name);
        let i = i.ok_or_else(|| Error::InvalidRequest(format!("no fine-tuning job {name:?} in this engine")))?;
        Ok(self.training.jobs.remove(i).job)
    }

    /// Removes the jobs that have finished (their adapters stay published) and returns them.
    pub fn take_finished_jobs(&mut self) -> Vec<Job> {
        let in_flight = &self.training.in_flight;
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.training.jobs).into_iter().partition(|j| {
            j.job.is_finished() && !in_flight.iter().any(|g| g.members.iter().any(|m| m.job == j.job.spec.name))
        });
        self.training.jobs = running;
        done.into_iter().map(|j| j.job).collect()
    }

    /// The optimizer steps taken since the last call.
    pub fn take_step_reports(&mut self) -> Vec<StepReport> {
        std::mem::take(&mut self.reports)
    }

    pub fn metrics(&self) -> EngineMetrics {
        let c = &self.counters;
        let jobs = self.training.jobs.iter().map(|j| (j.job.spec.name.clone(), job_metrics(j))).collect();
        EngineMetrics {
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
            pool: self.pool.usage(),
            iteration_limit_s: self.budget.limit(),
        }
    }

    /// The figures of job `name` in training (cheaper than all of [`Engine::metrics`]).
    pub fn job_metrics(&self, name: &str) -> Option<JobMetrics> {
        self.training.jobs.iter().find(|j| j.job.spec.name == name).map(job_metrics)
    }

    /// Queues a request after checking it; returns its index.
    pub fn submit(&mut self, req: GenerationRequest) -> Result<usize> {
        req.params.validate()?;
        let c = &self.model.config;
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::InvalidRequest(format!("token id {t} outside the vocabulary of {}", c.vocab_size)));
        }
        let total = req.prompt.len() + req.params.max_tokens;
        let capacity = (self.cfg.pages * self.cfg.block_size).min(c.max_position_embeddings);
        if total > capacity {
            return Err(Error::InvalidRequest(format!(
                "prompt ({}) plus max_tokens ({}) exceeds the context of {capacity} tokens",
                req.prompt.len(),
                req.params.max_tokens
            )));
        }
        if !req.params.stop.is_empty() && self.tokenizer.is_none() {
            return Err(Error::InvalidRequest("stop strings need a tokenizer (tokenizer.json)".into()));
        }
        let adapter = req.adapter.as_deref().map(|name| self.registry.resolve(name)).transpose()?;
        let adapter_pages = adapter.as_ref().map_or(0, |v| adapter_pages(&v.adapter, c, self.cfg.block_size));
        if total.div_ceil(self.cfg.block_size) + adapter_pages > self.cfg.pages {
            return Err(Error::InvalidRequest(format!(
                "the request's KV cache plus its adapter need more than the {} pages of the pool",
                self.cfg.pages
            )));
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(Error::Overloaded(format!("{} requests are already waiting", self.waiting.len())));
        }
        let index = self.submitted;
        self.submitted += 1;
        self.waiting.push_back(Sequence {
            index,
            prompt_len: req.prompt.len(),
            max_tokens: req.params.max_tokens,
            tokens: req.prompt,
            computed: 0,
            blocks: Vec::new(),
            adapter,
            sampler: Sampler::new(&req.params),
            stop: StopChecker::new(&req.params, &self.eos),
            logprobs: Vec::new(),
            streamed: 0,
            submitted_at: Instant::now(),
            last_token_at: None,
        });
        Ok(index)
    }

    /// The tokens the last step sampled for requests that go on, with the text each settled:
    /// what a streaming caller sends on after each step. A request's streamed texts followed by
    /// the rest of its [`GenerationOutput::text`] make its whole text.
    pub fn progress(&self) -> &[Progress] {
        &self.progress
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
        self.progress.clear();
        self.admit()?;
        let decoding = self.running.iter().filter(|s| s.computed >= s.prompt_len).count();
        // A decoding request waits from one sample to the next: this iteration gets the target
        // minus what already passed since the last sample (the loss of the last iteration's
        // fine-tuning rows, this iteration's admission).
        let since = match self.last_sample {
            Some(t) if decoding > 0 => t.elapsed().as_secs_f64(),
            _ => 0.0,
        };
        let limit = self.budget.limit() - since;
        let inference_tokens = match self.budget.forward.units_within(limit.max(0.0)) {
            Some(n) => n.max(decoding + self.cfg.block_size).min(self.cfg.max_batch_tokens),
            None => self.cfg.max_batch_tokens,
        };
        let (mut input, scheduled, ids) = self.build_batch(inference_tokens);
        let n_inf = input.tokens.len();
        let plan = self.plan_finetune(n_inf, ids.len(), limit);
        self.counters.last = TokenCounts::default();
        if scheduled.is_empty() && plan.is_none() && self.training.in_flight.is_empty() {
            return Ok(Vec::new());
        }
        // Backward layers first, in what the planned forward pass leaves of the budget (at
        // least one when no request shares the iteration).
        let mut planned = if n_inf > 0 { self.budget.forward.predict(n_inf).unwrap_or(0.0) } else { 0.0 };
        if let Some(p) = &plan {
            planned += self.budget.finetune.predict_high(p.input.tokens.len()).unwrap_or(0.0);
        }
        // (Capped: a target of `Duration::MAX`, throughput runs, must not overflow the clock.)
        let left = Duration::from_secs_f64((limit - planned).clamp(0.0, 3600.0));
        self.run_backward(Instant::now() + left, n_inf == 0)?;

        // The batch's adapters: the inference versions (from their pages), then, when
        // fine-tuning rows join, the jobs' live weights.
        let t0 = Instant::now();
        let load = |e: &Self| ids.iter().map(|&id| e.paged.load(id, &e.cache)).collect::<Result<Vec<_>>>();
        // The jobs' versions are their current weights (published at every optimizer step).
        let job_versions = match &plan {
            Some(p) => (p.microbatches.iter())
                .map(|(j, _)| self.registry.resolve(&self.training.jobs[*j].job.spec.name))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let training_set = match &plan {
            Some(_) => {
                let mut adapters = load(self)?;
                adapters.extend(job_versions.iter().map(|v| v.adapter.clone()));
                Some(AdapterSet::new(adapters, self.model.device)?)
            }
            None => {
                if self.batch_adapters.as_ref().is_none_or(|(cached, _)| *cached != ids) {
                    self.batch_adapters = Some((ids.clone(), AdapterSet::new(load(self)?, self.model.device)?));
                }
                None
            }
        };
        let mut outputs = Vec::new();
        if n_inf > 0 || plan.is_some() {
            let set = match (&training_set, &self.batch_adapters) {
                (Some(set), _) | (None, Some((_, set))) => set,
                (None, None) => return Err(Error::InvalidRequest("engine: batch built without its adapters".into())),
            };
            let versions = match &self.plans {
                Some(_) => (ids.iter().map(|&id| self.paged.version(id).cloned()))
                    .chain(job_versions.iter().map(|v| Some(v.clone())))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| Error::InvalidRequest("engine: a batch adapter is not resident".into()))?,
                None => Vec::new(),
            };
            // The fine-tuning rows join the inference rows' pass as its last rows (from the
            // first row and sequence given); under expert parallelism, whose activations cannot
            // be cut by rows, they get a pass of their own after it.
            let (n_seqs, own_pass) = (input.seqs.len(), n_inf > 0 && self.model.is_expert_parallel());
            let passes = match &plan {
                Some(p) if own_pass => vec![(input, None), (p.input.clone(), Some((0, 0)))],
                Some(p) => {
                    append(&mut input, &p.input);
                    vec![(input, Some((n_inf, n_seqs)))]
                }
                None => vec![(input, None)],
            };
            let (mut logits, mut fine_tuned) = (Vec::new(), None);
            for (i, (input, training)) in passes.into_iter().enumerate() {
                if let Some(sink) = &mut self.plans {
                    let training = (plan.as_ref().zip(training)).map(|(p, (first_row, first_seq))| TrainingRows {
                        id: self.training.next_id,
                        first_row,
                        first_seq,
                        targets: p.targets.clone(),
                        loss_weights: p.loss_weights.clone(),
                    });
                    sink.forward(&input, &versions, training)?;
                }
                let mut tape = Vec::new();
                let hidden = match (&plan, training) {
                    (Some(p), Some((first, _))) => {
                        let model = &self.model;
                        let mut keep = |acts: crate::model::LayerActs| {
                            let layer = tape.len();
                            tape.push(if first == 0 {
                                Ok(acts)
                            } else {
                                acts.tail(first, layer, &p.input, set, model)
                            });
                        };
                        self.model.hidden_states(&input, &mut self.cache, set, &mut keep)?
                    }
                    _ => self.model.hidden_states(&input, &mut self.cache, set, &mut drop)?,
                };
                // The first pass holds the inference rows (a group's followers compute logits
                // when, and only when, the pass has logit rows too).
                if i == 0 && !input.logit_rows.is_empty() {
                    logits = self.model.logits(&hidden, &input.logit_rows)?.to_vec_f32()?;
                }
                if let Some((first, _)) = training {
                    let rows: Vec<u32> = (first as u32..input.tokens.len() as u32).collect();
                    fine_tuned = Some((tape, tandem_kernels::ops::gather_rows(&hidden, &rows)?));
                }
            }
            outputs = self.sample(&scheduled, &logits)?;
            if plan.is_none() {
                self.budget.forward.observe(n_inf, t0.elapsed().as_secs_f64());
            }
            if let (Some(p), Some(set), Some((tape, hidden))) = (plan, training_set, fine_tuned) {
                let tape = tape.into_iter().collect::<Result<Vec<_>>>()?;
                let rows = hidden.shape()[0];
                self.queue_backward(p, set, tape, &hidden, ids.len())?;
                // What the fine-tuning rows added to the iteration: packing their adapters, their
                // share of the forward pass, their loss.
                let inference = if n_inf > 0 { self.budget.forward.predict(n_inf).unwrap_or(0.0) } else { 0.0 };
                self.budget.finetune.observe(rows, (t0.elapsed().as_secs_f64() - inference).max(0.0));
            }
        }
        self.counters.iterations += 1;
        Ok(outputs)
    }

    /// The loss of planned microbatches whose forward pass produced `tape` and `hidden` (their
    /// rows only), and their backward, queued. The jobs' adapters have slots from `first_slot`.
    fn queue_backward(
        &mut self,
        p: coserve::Planned,
        adapters: AdapterSet,
        tape: Vec<crate::model::LayerActs>,
        hidden: &tandem_kernels::Tensor,
        first_slot: usize,
    ) -> Result<()> {
        let (losses, dhidden) = self.model.loss_backward(hidden, &p.targets, &p.loss_weights)?;
        let mut members = Vec::new();
        let mut row = 0;
        for (i, (j, mb)) in p.microbatches.into_iter().enumerate() {
            let job = &mut self.training.jobs[j];
            let len: usize = mb.examples.iter().map(|&e| job.job.example(e).tokens.len()).sum();
            let loss = losses[row..row + len].iter().map(|&l| l as f64).sum();
            row += len;
            job.tokens += len as u64;
            members.push(Member { job: job.job.spec.name.clone(), slot: first_slot + i, examples: mb.examples, loss });
        }
        let tokens = p.input.tokens.len() as u64;
        self.counters.last.finetune = tokens;
        self.counters.tokens.finetune += tokens;
        let backward = PendingBackward::new(&self.model, p.input, tape, dhidden)?;
        let grads = AdapterGrads::default();
        let id = self.training.next_id;
        self.training.next_id += 1;
        self.training.in_flight.push_back(InFlight { id, backward, adapters, grads, members, blocks: p.blocks });
        Ok(())
    }

    /// Fine-tuning microbatches for an iteration whose inference part has `n_inf` tokens over
    /// `slots` adapters: as many as the time left by the inference tokens holds. With no
    /// inference at all, or before the costs are measured, one runs whatever its cost.
    fn plan_finetune(&mut self, n_inf: usize, slots: usize, limit: f64) -> Option<coserve::Planned> {
        let (budget, paged, pool) = (&self.budget, &mut self.paged, &mut self.pool);
        let inference = if n_inf > 0 { budget.forward.predict(n_inf).unwrap_or(0.0) } else { 0.0 };
        let unmeasured = budget.finetune.predict(1).is_none();
        let mut first = true;
        let fits = |tokens: usize| {
            let cost = inference + budget.finetune.predict_high(tokens).unwrap_or(0.0);
            let ok = cost <= limit || (first && (n_inf == 0 || unmeasured));
            first = false;
            ok
        };
        let pages = |n: usize| if paged.make_room(n, pool) { pool.alloc(n, PageUse::Kv) } else { None };
        self.training.plan(slots, self.cfg.block_size, fits, pages)
    }

    /// Backward layers of the groups in flight, oldest first, until `deadline` (at least one
    /// layer when `idle`: no inference shares the iteration). A group that completes hands
    /// each job its gradients; a job whose optimizer step that completes publishes its new
    /// weights.
    fn run_backward(&mut self, deadline: Instant, idle: bool) -> Result<()> {
        let mut at_least_one = idle;
        while let Some(group) = self.training.in_flight.front_mut() {
            let tokens = group.backward.tokens();
            let left = deadline.saturating_duration_since(Instant::now()).as_secs_f64();
            let per_layer = self.budget.backward.predict_high(tokens).filter(|&c| c > 0.0);
            let mut layers = per_layer.map_or(1, |c| (left / c) as usize);
            // The last layer also pays for finishing the group.
            let finish = self.budget.finish.predict_high(group.members.len()).unwrap_or(0.0);
            if layers >= group.backward.layers_left() && per_layer.is_some_and(|c| c * layers as f64 + finish > left) {
                layers = group.backward.layers_left() - 1;
            }
            let layers = if at_least_one { layers.max(1) } else { layers };
            if layers == 0 {
                return Ok(());
            }
            at_least_one = false;
            let t = Instant::now();
            let run = layers.min(group.backward.layers_left());
            if let Some(sink) = &mut self.plans {
                sink.backward(group.id, run)?;
            }
            let done =
                self.model.backward_layers(&mut group.backward, &self.cache, &group.adapters, &mut group.grads, run)?;
            self.counters.last.finetune_backward += (tokens * run) as u64;
            self.counters.tokens.finetune_backward += (tokens * run) as u64;
            self.budget.backward.observe(tokens, t.elapsed().as_secs_f64() / run.max(1) as f64);
            if !done {
                return Ok(());
            }
            let t = Instant::now();
            let Some(group) = self.training.in_flight.pop_front() else { break };
            self.pool.release(&group.blocks, PageUse::Kv);
            for m in &group.members {
                let Some(job) = self.training.job_mut(&m.job) else { continue };
                let report = job.job.microbatch_done(&group.adapters, &group.grads, m.slot, &m.examples, m.loss)?;
                if let Some(report) = report {
                    job.last_loss = Some(report.loss);
                    let (step, whole) = (report.step, job.job.weights.adapter());
                    self.reports.push(report);
                    self.publish_job_weights(&m.job, step, whole)?;
                }
            }
            self.budget.finish.observe(group.members.len(), t.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Samples the next token of each sequence whose scheduled tokens reached its end, and
    /// retires the finished ones.
    fn sample(&mut self, scheduled: &[(usize, usize)], logits: &[f32]) -> Result<Vec<GenerationOutput>> {
        let vocab = self.model.config.vocab_size;
        let target = self.cfg.tpot_target.as_secs_f64();
        let now = Instant::now();
        if let Some(last) = self
            .last_sample
            .filter(|_| scheduled.iter().any(|&(i, _)| self.running[i].computed >= self.running[i].prompt_len))
        {
            self.budget.observe_wait((now - last).as_secs_f64());
        }
        self.last_sample = Some(now);
        let mut finished = Vec::new();
        let mut row = 0;
        for &(i, chunk) in scheduled {
            let seq = &mut self.running[i];
            if seq.computed >= seq.prompt_len {
                self.counters.last.decode += chunk as u64;
            } else {
                self.counters.last.prefill += chunk as u64;
            }
            seq.computed += chunk;
            if seq.computed < seq.tokens.len() {
                continue; // a prefill chunk that did not reach the end of the prompt
            }
            let sampled = seq.sampler.sample(&logits[row * vocab..(row + 1) * vocab]);
            row += 1;
            seq.tokens.push(sampled.token);
            seq.logprobs.push(sampled.logprob);
            match seq.last_token_at {
                None => self.counters.ttft.push((now - seq.submitted_at).as_secs_f64()),
                Some(t) => {
                    let gap = (now - t).as_secs_f64();
                    self.counters.tpot.push(gap);
                    self.counters.timed += 1;
                    self.counters.within_target += u64::from(gap <= target);
                }
            }
            seq.last_token_at = Some(now);
            let generated = &seq.tokens[seq.prompt_len..];
            let text = match &self.tokenizer {
                Some(t) => t.decode(generated, true)?,
                None => String::new(),
            };
            if let Some(f) = seq.stop.check(generated, &text) {
                finished.push((i, f.reason, f.text.to_string()));
            } else {
                // A trailing U+FFFD is a character whose bytes are still coming.
                let settled = seq.stop.streamable_len(text.trim_end_matches('\u{FFFD}')).max(seq.streamed);
                let new_text = text.get(seq.streamed..settled).unwrap_or_default().to_string();
                seq.streamed = settled;
                self.progress.push(Progress {
                    index: seq.index,
                    token: sampled.token,
                    logprob: sampled.logprob,
                    text: new_text,
                });
            }
        }
        self.counters.tokens.decode += self.counters.last.decode;
        self.counters.tokens.prefill += self.counters.last.prefill;
        // Remove finished sequences from the back so the indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut outputs = Vec::with_capacity(finished.len());
        for (i, reason, text) in finished {
            let seq = self.retire(i);
            outputs.push(GenerationOutput {
                index: seq.index,
                prompt_tokens: seq.prompt_len,
                token_ids: seq.tokens[seq.prompt_len..].to_vec(),
                logprobs: seq.logprobs,
                text,
                finish_reason: reason,
            });
        }
        Ok(outputs)
    }

    /// Takes running sequence `i` out, giving back its KV pages and its hold on its adapter.
    fn retire(&mut self, i: usize) -> Sequence {
        let mut seq = self.running.swap_remove(i);
        self.pool.release(&seq.blocks, PageUse::Kv);
        if let Some(id) = seq.adapter.take().map(|v| v.id) {
            self.paged.release(id, &mut self.pool); // after dropping our hold on the version
        }
        seq
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

    /// Moves waiting requests into the running set, first come first served, while their KV
    /// pages (prompt plus `max_tokens`, reserved up front so nothing is ever preempted) and their
    /// adapter's pages fit, evicting idle adapters for room. Then pages in the adapters of the
    /// requests next in line, into free pages only.
    fn admit(&mut self) -> Result<()> {
        while self.running.len() < self.cfg.max_running {
            let Some(seq) = self.waiting.front() else { break };
            let need = (seq.prompt_len + seq.max_tokens).div_ceil(self.cfg.block_size);
            let adapter = seq.adapter.clone();
            if let Some(v) = &adapter
                && !self.paged.acquire(v, &mut self.pool, &mut self.cache)?
            {
                break;
            }
            let blocks = match self.paged.make_room(need, &mut self.pool) {
                true => self.pool.alloc(need, PageUse::Kv),
                false => None,
            };
            let Some(blocks) = blocks else {
                if let Some(v) = &adapter {
                    self.paged.release(v.id, &mut self.pool);
                }
                break;
            };
            let Some(mut seq) = self.waiting.pop_front() else { break };
            seq.blocks = blocks;
            self.running.push(seq);
        }
        for seq in self.waiting.iter().take(self.cfg.max_running) {
            if let Some(v) = &seq.adapter {
                self.paged.prefetch(v, &mut self.pool, &mut self.cache)?;
            }
        }
        Ok(())
    }

    /// Decode tokens first, then prefill chunks, within the token budget. Returns the batch and
    /// (running index, tokens scheduled) per sequence in batch order.
    /// Also returns the ids of the batch's adapter versions, in slot order.
    fn build_batch(&self, max_tokens: usize) -> (ForwardInput, Vec<(usize, usize)>, Vec<u64>) {
        let mut budget = max_tokens;
        let mut ids: Vec<u64> = Vec::new();
        let mut scheduled = Vec::new();
        let decoding = |s: &Sequence| s.computed >= s.prompt_len;
        let order = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, s)| decoding(s))
            .chain(self.running.iter().enumerate().filter(|(_, s)| !decoding(s)));
        let mut input = ForwardInput::default();
        for (i, seq) in order {
            let chunk = (seq.tokens.len() - seq.computed).min(budget);
            if chunk == 0 {
                continue;
            }
            budget -= chunk;
            let (start, end) = (seq.computed, seq.computed + chunk);
            let bs = self.cfg.block_size;
            input.tokens.extend_from_slice(&seq.tokens[start..end]);
            input.positions.extend((start..end).map(|p| p as u32));
            input.slots.extend((start..end).map(|p| seq.blocks[p / bs] * bs as u32 + (p % bs) as u32));
            let slot = match &seq.adapter {
                None => -1,
                Some(v) => match ids.iter().position(|&id| id == v.id) {
                    Some(p) => p as i32,
                    None => {
                        ids.push(v.id);
                        ids.len() as i32 - 1
                    }
                },
            };
            input.adapters.extend(std::iter::repeat_n(slot, chunk));
            input.seqs.push(SeqAttention { q_len: chunk, context_len: end, block_table: seq.blocks.clone() });
            if end == seq.tokens.len() {
                input.logit_rows.push((input.tokens.len() - 1) as u32);
            }
            scheduled.push((i, chunk));
        }
        (input, scheduled, ids)
    }
}

/// Appends `tail`'s rows to `input` (the fine-tuning rows after the inference rows).
fn append(input: &mut ForwardInput, tail: &ForwardInput) {
    input.tokens.extend_from_slice(&tail.tokens);
    input.positions.extend_from_slice(&tail.positions);
    input.slots.extend_from_slice(&tail.slots);
    input.adapters.extend_from_slice(&tail.adapters);
    input.seqs.extend(tail.seqs.iter().cloned());
}
