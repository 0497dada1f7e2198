//! The engine on a thread of its own. The engine is not thread-safe and its steps are long:
//! one thread owns it, takes orders from a channel between steps (requests, jobs to train or
//! stop), and after each step sends every request's settled text to its stream and every job's
//! progress (steps, checkpoints, its exported adapter) to the training events. A request whose caller went away is cancelled
//! before the next step. An adapter a request names that is not loaded yet is read from the
//! folder the request gives, on this thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tandem_proto::contract::check_role;
use tandem_proto::trace_context;
use tandem_proto::v1::{GenerateEvent, GenerateRequest, TopLogprobs};
use tokio::sync::mpsc as async_mpsc;
use tonic::Status;

use super::phases;
use crate::adapters::Adapter;
use crate::adapters::registry::Origin;
use crate::engine::metrics::EngineMetrics;
use crate::engine::{Engine, GenerationOutput, GenerationRequest, Progress};
use crate::error::Error;
use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::structured::Grammar;
use crate::tokenizer::{ChatMessage, TextTokenizer};
use crate::tools::{CallParser, ToolCalling};
use crate::train::checkpoint;
use crate::train::data::Example;
use crate::train::finetune::MethodChoice;
use crate::train::job::{Hyperparams, Job, StepReport};

pub(crate) type EventSender = async_mpsc::UnboundedSender<Result<GenerateEvent, Status>>;

/// What the engine thread is asked to do.
pub(crate) enum Order {
    Generate {
        req: Box<GenerateRequest>,
        events: EventSender,
        /// The caller's span: the request's phases here are its children.
        span: tracing::Span,
    },
    Train(Box<Training>),
    /// Stop training this job (its adapter is withdrawn).
    Stop(String),
    /// Stop training this job at its next step boundary, after a checkpoint there (its worker
    /// is draining): [`TrainEvent::Checkpoint`], then [`TrainEvent::HandedOff`].
    HandOff(String),
    /// What the engine measures about itself, now.
    Metrics(tokio::sync::oneshot::Sender<EngineMetrics>),
}

/// A job to train, and where its files go.
pub struct Training {
    pub job: JobStart,
    /// Checkpoints go to `checkpoints/step-NNNNNN` under it, the final adapter to `adapter/`.
    pub dir: PathBuf,
    /// Checkpoint every this many optimizer steps (0: only the final adapter).
    pub checkpoint_every: u64,
    /// Examples its final adapter is validated on.
    pub validation: Option<Arc<Vec<Example>>>,
}

/// The job of a [`Training`].
pub enum JobStart {
    /// Made already (resumed from its checkpoint).
    Ready(Box<Job>),
    /// To be made by the engine, on its thread ([`Engine::add_new_job`]).
    New { name: String, method: MethodChoice, hyper: Hyperparams, data: Arc<Vec<Example>> },
}

impl JobStart {
    pub fn name(&self) -> &str {
        match self {
            JobStart::Ready(job) => job.name(),
            JobStart::New { name, .. } => name,
        }
    }
}

/// Where an engine thread's jobs report.
pub type TrainEvents = async_mpsc::UnboundedSender<TrainEvent>;

/// What a job in training did.
#[derive(Debug)]
pub enum TrainEvent {
    Step {
        job: String,
        report: StepReport,
        tokens_per_s: f64,
    },
    Checkpoint {
        job: String,
        step: u64,
        path: PathBuf,
    },
    /// Trained to the end (`step` optimizer steps); its adapter is exported to `adapter`.
    Finished {
        job: String,
        step: u64,
        adapter: PathBuf,
        /// Its mean token loss on its validation examples, if it has them.
        validation_loss: Option<f64>,
    },
    Failed {
        job: String,
        error: String,
    },
    /// It cannot go on here: a checkpoint or its export could not be written (this worker's
    /// disk, not the job, is at fault); it resumes elsewhere from its last checkpoint.
    Interrupted {
        job: String,
        error: String,
    },
    /// Stopped at the checkpoint just reported, as [`EngineThread::hand_off`] asked.
    HandedOff {
        job: String,
    },
}

/// A request the engine runs, and where its events go.
struct Stream {
    events: EventSender,
    /// The caller's span, parent of the request's phases here.
    span: tracing::Span,
    logprobs: bool,
    /// What takes tool calls out of the text, when the request may call tools.
    calls: Option<CallParser>,
    /// Bytes of text (the engine's, calls included) and tokens already sent.
    text_sent: usize,
    tokens_sent: usize,
}

/// The handle to the thread that owns the engine.
#[derive(Clone)]
pub struct EngineThread {
    orders: mpsc::Sender<Order>,
    /// The engine's model (a shard, on a worker group's rank 0) and tokenizer: what jobs for
    /// it are made with.
    model: Arc<Model>,
    tokenizer: Option<Arc<TextTokenizer>>,
}

impl EngineThread {
    /// Moves `engine` onto a thread of its own, which runs until every handle is dropped; its
    /// jobs' progress arrives on the receiver.
    pub fn start(engine: Engine) -> std::io::Result<(Self, async_mpsc::UnboundedReceiver<TrainEvent>)> {
        let (train_events, train_rx) = async_mpsc::unbounded_channel();
        let (handle, rx) = EngineThread::of(&engine);
        std::thread::Builder::new().name("engine".into()).spawn(move || run(engine, rx, train_events))?;
        Ok((handle, train_rx))
    }

    /// A handle to `engine`, and the receiving end of its orders, for the thread that will own
    /// it (a worker group's rank 0 runs its own loop).
    pub(crate) fn of(engine: &Engine) -> (Self, mpsc::Receiver<Order>) {
        let (orders, rx) = mpsc::channel();
        (EngineThread { orders, model: engine.shared_model(), tokenizer: engine.shared_tokenizer() }, rx)
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn tokenizer(&self) -> Option<&Arc<TextTokenizer>> {
        self.tokenizer.as_ref()
    }

    /// Queues `req`; its events arrive on the returned receiver.
    pub fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<async_mpsc::UnboundedReceiver<Result<GenerateEvent, Status>>, Status> {
        let (events, rx) = async_mpsc::unbounded_channel();
        self.send(Order::Generate { req: Box::new(req), events, span: tracing::Span::current() })?;
        Ok(rx)
    }

    /// Trains a job beside inference.
    pub fn train(&self, training: Training) -> Result<(), Status> {
        self.send(Order::Train(Box::new(training)))
    }

    /// Stops training job `name`.
    pub fn stop(&self, name: &str) -> Result<(), Status> {
        self.send(Order::Stop(name.to_string()))
    }

    /// Stops training job `name` at its next step boundary, after a checkpoint there.
    pub fn hand_off(&self, name: &str) -> Result<(), Status> {
        self.send(Order::HandOff(name.to_string()))
    }

    /// The engine's figures, taken between two of its steps.
    pub async fn metrics(&self) -> Result<EngineMetrics, Status> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Order::Metrics(reply))?;
        answer.await.map_err(|_| Status::unavailable("the engine stopped"))
    }

    fn send(&self, order: Order) -> Result<(), Status> {
        self.orders.send(order).map_err(|_| Status::unavailable("the engine stopped"))
    }
}

fn status_of(e: Error) -> Status {
    match e {
        Error::InvalidRequest(m) => Status::invalid_argument(m),
        Error::Overloaded(m) => Status::resource_exhausted(m),
        Error::Tokenizer(m) => Status::invalid_argument(format!("tokenizer: {m}")),
        other => Status::internal(other.to_string()),
    }
}

/// The engine's request for `req`: its prompt tokenized (chat messages and tools through the
/// model's chat template) and its sampling parameters checked by the engine (an embedding has
/// none); and its tool calling, checked.
fn prepare(engine: &Engine, req: &GenerateRequest) -> Result<(GenerationRequest, Option<ToolCalling>), Error> {
    let tools = ToolCalling::of(req)?;
    let tokenizer = || engine.tokenizer().ok_or_else(|| Error::InvalidRequest("the model has no tokenizer".into()));
    let prompt = if !req.prompt_token_ids.is_empty() {
        if !req.prompt.is_empty() || !req.messages.is_empty() {
            return Err(Error::InvalidRequest("give the prompt as text, token ids or messages: one of them".into()));
        }
        req.prompt_token_ids.clone()
    } else if req.messages.is_empty() {
        tokenizer()?.encode(&req.prompt, true)?
    } else {
        for m in &req.messages {
            check_role(&m.role).map_err(|e| Error::InvalidRequest(e.0))?;
        }
        let messages: Vec<ChatMessage> = (req.messages.iter())
            .map(|m| ChatMessage {
                tool_calls: m.tool_calls.clone(),
                tool_call_id: m.tool_call_id.clone(),
                ..ChatMessage::new(&m.role, &m.content)
            })
            .collect();
        // The template writes the special tokens itself.
        let tokenizer = tokenizer()?;
        let shown = tools.as_ref().map(ToolCalling::shown).unwrap_or_default();
        tokenizer.encode(&tokenizer.apply_chat_template(&messages, &shown, true)?, false)?
    };
    let adapter = (!req.adapter.is_empty()).then(|| req.adapter.clone());
    if req.embed {
        // Nothing is sampled: the sampling fields are not read.
        return Ok((GenerationRequest { prompt, adapter, params: SamplingParams::greedy(1) }, None));
    }
    let max_tokens = match req.max_tokens {
        Some(n) => n as usize,
        None => {
            let version = adapter.as_deref().map(|name| engine.registry().resolve(name)).transpose()?;
            engine.room(prompt.len(), version.as_deref()).max(1)
        }
    };
    let grammar = match (tools.as_ref().and_then(ToolCalling::grammar), req.json_schema.as_str()) {
        (Some(calls), _) => Some(calls),
        (None, "") => None,
        (None, text) => Some(Grammar::JsonSchema(
            serde_json::from_str(text).map_err(|e| Error::InvalidRequest(format!("the JSON schema: {e}")))?,
        )),
    };
    let params = SamplingParams {
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop.clone(),
        logprobs: req.logprobs,
        top_logprobs: req.top_logprobs as usize,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        logit_bias: req.logit_bias.iter().map(|(&t, &b)| (t, b)).collect(),
        grammar,
        ..SamplingParams::default()
    };
    Ok((GenerationRequest { prompt, adapter, params }, tools))
}

/// Makes sure the adapter `req` names is loaded: read from `adapter_uri` the first time. A newer
/// version (`NAME@VERSION`) replaces the older ones of the same name for new requests.
fn load_adapter(engine: &mut Engine, req: &GenerateRequest) -> Result<(), Error> {
    if req.adapter.is_empty() && !req.adapter_uri.is_empty() {
        return Err(Error::InvalidRequest("adapter_uri names no adapter: give the adapter's name too".into()));
    }
    if req.adapter.is_empty() || req.adapter_uri.is_empty() || engine.registry().resolve(&req.adapter).is_ok() {
        return Ok(());
    }
    // A folder that is missing or holds no valid adapter is the request's error; a disk that
    // fails to read one is this worker's.
    let adapter = read_adapter(engine.model(), Path::new(&req.adapter_uri)).map_err(|e| match e {
        Error::Io { ref source, .. } if source.kind() != std::io::ErrorKind::NotFound => e,
        e => Error::InvalidRequest(format!("adapter {:?} at {:?}: {e}", req.adapter, req.adapter_uri)),
    })?;
    let family = req.adapter.rsplit_once('@').map_or(req.adapter.as_str(), |(name, _)| name);
    let older: Vec<String> = (engine.registry().list().iter())
        .filter(|v| v.name.rsplit_once('@').is_some_and(|(name, _)| name == family))
        .map(|v| v.name.clone())
        .collect();
    for name in older {
        engine.remove_adapter(&name)?;
    }
    engine.publish_adapter(&req.adapter, adapter, Origin::Upload { dir: Some(req.adapter_uri.clone().into()) })?;
    Ok(())
}

/// The adapter in `dir`, as `model` serves it: on a tensor-parallel shard, read against the
/// whole model and cut for the shard.
pub(crate) fn read_adapter(model: &Model, dir: &Path) -> Result<Adapter, Error> {
    let adapter = Adapter::load_dir(dir, model.whole_config(), model.serving_lora_dtype())?;
    model.serving_adapter(model.shard_adapter(&adapter)?)
}

/// Where a job's files go, how often it checkpoints, and what it is validated on.
struct JobFiles {
    dir: PathBuf,
    checkpoint_every: u64,
    validation: Option<Arc<Vec<Example>>>,
}

/// Jobs in training on the engine thread: where their files go, and checkpoints due.
#[derive(Default)]
struct Jobs {
    dirs: HashMap<String, JobFiles>,
    /// Jobs whose checkpoint is due at their next step boundary.
    due: Vec<String>,
    /// Jobs to stop after a checkpoint at their next step boundary.
    handing_off: Vec<String>,
}

/// The engine thread of a worker.
fn run(mut engine: Engine, orders: mpsc::Receiver<Order>, train_events: TrainEvents) {
    let _ = serve(&mut engine, &orders, &train_events, &mut Streams::default(), None);
}

/// What the engine loop of a worker group's rank 0 adds to a worker's.
pub(crate) struct Lead {
    /// The followers wait for the next plan only so long: something goes out at least this often.
    pub interval: Duration,
    /// Sends an idle plan if nothing went out for `interval`.
    pub keep_alive: Box<dyn FnMut() -> Result<(), Error> + Send>,
}

/// The engine loop: takes orders between steps, blocking only while there is no work (a
/// leader at most its interval). A worker's runs until every handle is gone and its work is
/// done; a failed step fails its requests and jobs, and it goes on. A leader's returns as soon
/// as every handle is gone (the group was re-formed or removed), or with the error of a failed
/// step (the group is broken); its jobs end without a report either way (the coordinator
/// queues them again when it re-forms the group).
pub(crate) fn serve(
    engine: &mut Engine,
    orders: &mpsc::Receiver<Order>,
    train_events: &TrainEvents,
    streams: &mut Streams,
    mut lead: Option<Lead>,
) -> Result<(), Error> {
    let mut jobs = Jobs::default();
    let send = |e: TrainEvent| drop(train_events.send(e));
    loop {
        let mut next = match (engine.has_work(), &lead) {
            (true, None) => orders.try_recv().ok(),
            (true, Some(_)) => match orders.try_recv() {
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                r => r.ok(),
            },
            (false, None) => match orders.recv() {
                Ok(order) => Some(order),
                Err(_) => return Ok(()), // every handle is gone
            },
            (false, Some(l)) => match orders.recv_timeout(l.interval) {
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                r => r.ok(),
            },
        };
        while let Some(order) = next.take() {
            match order {
                Order::Generate { req, events, span } => streams.submit(engine, &req, events, span),
                Order::Train(t) => {
                    let Training { job, dir, checkpoint_every, validation } = *t;
                    let name = job.name().to_string();
                    let added = match job {
                        JobStart::Ready(job) => engine.add_job(*job),
                        JobStart::New { name, method, hyper, data } => engine.add_new_job(&name, &method, hyper, data),
                    };
                    match added {
                        Ok(()) => drop(jobs.dirs.insert(name, JobFiles { dir, checkpoint_every, validation })),
                        // Making an ESFT job on a group takes collectives: their failure is the group's.
                        Err(e @ Error::Collective { .. }) if lead.is_some() => return Err(e),
                        Err(e) => send(TrainEvent::Failed { job: name, error: e.to_string() }),
                    }
                }
                Order::Stop(name) => jobs.stop(engine, &name),
                Order::HandOff(name) => jobs.handing_off.push(name),
                Order::Metrics(reply) => drop(reply.send(engine.metrics())),
            }
            next = orders.try_recv().ok();
        }
        streams.cancel_abandoned(engine);
        if engine.has_work() {
            match engine.step() {
                Ok(finished) => {
                    streams.deliver(engine, finished);
                    jobs.after_step(engine, &send);
                }
                Err(e) => {
                    if lead.is_some() {
                        return Err(e);
                    }
                    // The step failed part-way: tell every caller rather than leave them
                    // waiting, and fail the jobs (their state may be half-updated).
                    let status = status_of(e);
                    streams.fail_all(&status);
                    for (name, _) in jobs.dirs.drain() {
                        if engine.cancel_job(&name).is_ok() {
                            let _ = engine.remove_adapter(&name);
                        }
                        send(TrainEvent::Failed { job: name, error: status.message().to_string() });
                    }
                }
            }
        }
        if let Some(l) = &mut lead {
            (l.keep_alive)()?;
        }
    }
}

impl Jobs {
    /// Reports the optimizer steps taken, saves the checkpoints due (at a step boundary), and
    /// exports the jobs that finished.
    fn after_step(&mut self, engine: &mut Engine, send: &impl Fn(TrainEvent)) {
        engine.take_step_traces().iter().for_each(phases::finetune_step);
        let reports = engine.take_step_reports();
        for report in reports {
            let every = self.dirs.get(&report.job).map_or(0, |f| f.checkpoint_every);
            if every > 0 && report.step % every == 0 && report.step < report.total_steps {
                self.due.push(report.job.clone());
            }
            let tokens_per_s = engine.job_metrics(&report.job).map_or(0.0, |m| m.tokens_per_s);
            send(TrainEvent::Step { job: report.job.clone(), report, tokens_per_s });
        }
        self.due.retain(|name| checkpoint_now(engine, &self.dirs, name, send).is_none());
        self.export_finished(engine, send);
        for name in std::mem::take(&mut self.handing_off) {
            match checkpoint_now(engine, &self.dirs, &name, send) {
                None => self.handing_off.push(name),
                Some(saved) => {
                    self.stop(engine, &name);
                    if saved {
                        send(TrainEvent::HandedOff { job: name });
                    }
                }
            }
        }
    }

    /// Exports the jobs that trained to the end, and validates them.
    fn export_finished(&mut self, engine: &mut Engine, send: &impl Fn(TrainEvent)) {
        let finished = engine.take_finished_jobs();
        if finished.is_empty() {
            return;
        }
        let cfg = engine.model().whole_config().clone();
        for job in finished {
            let name = job.name().to_string();
            let Some(files) = self.dirs.remove(&name) else { continue };
            // Validated with its final weights, still published under its name.
            let validation_loss =
                files.validation.and_then(|examples| match engine.validation_loss(&name, &examples) {
                    Ok(loss) => Some(loss),
                    Err(e) => {
                        tracing::warn!(job = %name, "validation failed: {e}");
                        None
                    }
                });
            let adapter = files.dir.join("adapter");
            let _ = engine.remove_adapter(&name);
            let step = job.progress.step;
            match checkpoint::export(&job, &cfg, &adapter) {
                Ok(()) => send(TrainEvent::Finished { job: name, step, adapter, validation_loss }),
                Err(e) => send(TrainEvent::Interrupted { job: name, error: format!("export: {e}") }),
            }
        }
    }

    /// Stops training job `name` (its adapter is withdrawn).
    fn stop(&mut self, engine: &mut Engine, name: &str) {
        if engine.cancel_job(name).is_ok() {
            let _ = engine.remove_adapter(name);
        }
        self.dirs.remove(name);
    }
}

/// Saves job `name`'s checkpoint if it is at a step boundary: `None` while it is not (ask again
/// after the next step), else whether it was saved (reported as a checkpoint, or as an
/// interruption when it could not be written; `false` too when the job is gone).
fn checkpoint_now(
    engine: &Engine,
    dirs: &HashMap<String, JobFiles>,
    name: &str,
    send: &impl Fn(TrainEvent),
) -> Option<bool> {
    let (Some(job), Some(JobFiles { dir, .. })) = (engine.job(name), dirs.get(name)) else { return Some(false) };
    if !job.at_step_boundary() {
        return None;
    }
    let step = job.progress.step;
    Some(match checkpoint::save(job, engine.model().whole_config(), &dir.join("checkpoints")) {
        Ok(path) => {
            send(TrainEvent::Checkpoint { job: name.to_string(), step, path });
            true
        }
        Err(e) => {
            send(TrainEvent::Interrupted { job: name.to_string(), error: format!("checkpoint: {e}") });
            false
        }
    })
}

/// Each token's own text (for logprobs).
fn token_texts(tokenizer: Option<&TextTokenizer>, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&id| tokenizer.and_then(|t| t.decode(&[id], false).ok()).unwrap_or_default()).collect()
}

/// The alternatives at each token, as the wire carries them.
fn top_logprobs(tokenizer: Option<&TextTokenizer>, tops: &[Vec<(u32, f32)>]) -> Vec<TopLogprobs> {
    (tops.iter())
        .map(|top| {
            let ids: Vec<u32> = top.iter().map(|&(id, _)| id).collect();
            TopLogprobs { tokens: token_texts(tokenizer, &ids), logprobs: top.iter().map(|&(_, lp)| lp).collect() }
        })
        .collect()
}

impl Stream {
    fn new(events: EventSender, logprobs: bool, calls: Option<CallParser>, span: tracing::Span) -> Self {
        Stream { events, span, logprobs, calls, text_sent: 0, tokens_sent: 0 }
    }

    fn send_progress(&mut self, p: &Progress, tokenizer: Option<&TextTokenizer>) {
        let (text, tool_calls) = match &mut self.calls {
            Some(calls) => calls.push(&p.text),
            None => (p.text.clone(), Vec::new()),
        };
        let event = GenerateEvent {
            text,
            tool_calls,
            token_ids: vec![p.token],
            logprobs: if self.logprobs { vec![p.logprob] } else { Vec::new() },
            tokens: if self.logprobs { token_texts(tokenizer, &[p.token]) } else { Vec::new() },
            top_logprobs: top_logprobs(tokenizer, std::slice::from_ref(&p.top_logprobs)),
            ..GenerateEvent::default()
        };
        self.text_sent += p.text.len();
        self.tokens_sent += 1;
        let _ = self.events.send(Ok(event));
    }

    fn finish(mut self, out: &GenerationOutput, tokenizer: Option<&TextTokenizer>) {
        let tokens = out.token_ids.get(self.tokens_sent..).unwrap_or_default();
        let logprobs = out.logprobs.get(self.tokens_sent..).unwrap_or_default();
        let rest = out.text.get(self.text_sent..).unwrap_or_default();
        let (text, tool_calls) = match &mut self.calls {
            Some(calls) => calls.finish(rest),
            None => (rest.to_string(), Vec::new()),
        };
        // An answer that called tools and ended by itself ends for its calls (OpenAI's reason).
        let finish_reason =
            match (out.finish_reason.as_openai_str(), self.calls.as_ref().is_some_and(CallParser::called)) {
                ("stop", true) => "tool_calls",
                (reason, _) => reason,
            };
        let event = GenerateEvent {
            text,
            tool_calls,
            token_ids: tokens.to_vec(),
            logprobs: if self.logprobs { logprobs.to_vec() } else { Vec::new() },
            tokens: if self.logprobs { token_texts(tokenizer, tokens) } else { Vec::new() },
            top_logprobs: top_logprobs(tokenizer, out.top_logprobs.get(self.tokens_sent..).unwrap_or_default()),
            embedding: out.embedding.clone(),
            finish_reason: finish_reason.to_string(),
            prompt_tokens: out.prompt_tokens as u32,
            completion_tokens: out.token_ids.len() as u32,
        };
        let _ = self.events.send(Ok(event));
    }
}

/// The requests an engine thread runs, by engine index, and where their events go.
#[derive(Default)]
pub(crate) struct Streams(HashMap<usize, Stream>);

impl Streams {
    /// Submits `req` to `engine` (its adapter loaded first); its events go to `events`, and an
    /// error at once if it cannot run.
    pub(crate) fn submit(
        &mut self,
        engine: &mut Engine,
        req: &GenerateRequest,
        events: EventSender,
        span: tracing::Span,
    ) {
        // Where the adapter was before this request made it ready (none: read from disk now).
        let tier = (!req.adapter.is_empty()).then(|| engine.adapter_tier(&req.adapter).unwrap_or("disk"));
        let started = Instant::now();
        let loaded = load_adapter(engine, req);
        if let (Some(tier), Ok(())) = (tier, &loaded) {
            phases::adapter_load(&span, &req.adapter, tier, started);
            if tier == "disk" {
                engine.record_disk_load(started.elapsed().as_secs_f64());
            }
        }
        let submitted = loaded.and_then(|()| prepare(engine, req)).and_then(|(r, tools)| {
            let index = match req.embed {
                true => engine.submit_embedding(r.prompt, r.adapter),
                false => engine.submit(r),
            }?;
            Ok((index, tools.and_then(|t| t.parser())))
        });
        match submitted {
            Ok((index, calls)) => {
                if let Some(traceparent) = trace_context::traceparent(&span) {
                    engine.trace(index, traceparent);
                }
                drop(self.0.insert(index, Stream::new(events, req.logprobs, calls, span)))
            }
            Err(e) => drop(events.send(Err(status_of(e)))),
        }
    }

    /// Requests whose callers went away stop here rather than run to the end.
    pub(crate) fn cancel_abandoned(&mut self, engine: &mut Engine) {
        self.0.retain(|&index, s| {
            let gone = s.events.is_closed();
            if gone {
                engine.cancel(index);
            }
            !gone
        });
    }

    /// A step's new tokens and finished requests, to their callers.
    pub(crate) fn deliver(&mut self, engine: &Engine, finished: Vec<GenerationOutput>) {
        for p in engine.progress() {
            if let Some(s) = self.0.get_mut(&p.index) {
                s.send_progress(p, engine.tokenizer());
            }
        }
        for out in finished {
            if let Some(s) = self.0.remove(&out.index) {
                if let Some(t) = engine.timings().iter().find(|t| t.index == out.index) {
                    phases::finished(&s.span, t);
                }
                s.finish(&out, engine.tokenizer());
            }
        }
    }

    /// Every request still running ends with `status`.
    pub(crate) fn fail_all(&mut self, status: &Status) {
        for (_, s) in self.0.drain() {
            let _ = s.events.send(Err(status.clone()));
        }
    }
}

/// The engine a worker's `Generate` goes to: its own for the whole model, or for a group
/// worker, its group's while it is rank 0 of a formed group (else why it serves nothing now).
#[derive(Clone)]
pub struct Serving(Arc<Mutex<Slot>>);

#[derive(Clone)]
enum Slot {
    Engine(EngineThread),
    Nothing { why: String },
}

impl Serving {
    pub fn engine(engine: EngineThread) -> Self {
        Serving(Arc::new(Mutex::new(Slot::Engine(engine))))
    }

    /// Nothing served yet, for `why`.
    pub fn nothing(why: impl Into<String>) -> Self {
        Serving(Arc::new(Mutex::new(Slot::Nothing { why: why.into() })))
    }

    /// From now on, requests go to `engine`.
    pub fn serve(&self, engine: EngineThread) {
        self.put(Slot::Engine(engine));
    }

    /// From now on, requests are refused, for `why`.
    pub fn withdraw(&self, why: impl Into<String>) {
        self.put(Slot::Nothing { why: why.into() });
    }

    fn put(&self, slot: Slot) {
        if let Ok(mut held) = self.0.lock() {
            *held = slot;
        }
    }

    /// The engine requests and jobs go to now, or why there is none.
    pub fn current(&self) -> Result<EngineThread, Status> {
        match &*self.0.lock().map_err(|_| Status::internal("the serving slot is poisoned"))? {
            Slot::Engine(engine) => Ok(engine.clone()),
            Slot::Nothing { why } => Err(Status::unavailable(why.clone())),
        }
    }
}
