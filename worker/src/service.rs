//! The worker process: its engine on a thread of its own, the gRPC `Worker` service that streams
//! completions out of it, and the worker's membership in the cluster (it registers with the
//! coordinator and renews its lease by heartbeats).
//!
//! The engine is not thread-safe and its steps are long: one thread owns it, takes requests from
//! a channel between steps, and after each step sends every request's settled text to its
//! stream. A request whose client went away finishes anyway (the engine cannot cancel one yet);
//! its output is dropped.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use tandem_proto::v1::cluster_client::ClusterClient;
use tandem_proto::v1::worker_server::{Worker, WorkerServer};
use tandem_proto::v1::{GenerateEvent, GenerateRequest, HeartbeatRequest, RegisterWorkerRequest};
use tokio::sync::mpsc as async_mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, GenerationOutput, GenerationRequest, Progress};
use crate::error::Error;
use crate::sampling::SamplingParams;
use crate::tokenizer::ChatMessage;

type EventSender = async_mpsc::UnboundedSender<Result<GenerateEvent, Status>>;

/// A request on its way to the engine thread.
struct Job {
    req: GenerateRequest,
    events: EventSender,
}

/// A request the engine runs, and where its events go.
struct Stream {
    events: EventSender,
    logprobs: bool,
    /// Bytes of text and tokens already sent.
    text_sent: usize,
    tokens_sent: usize,
}

/// The handle to the thread that owns the engine.
#[derive(Clone)]
pub struct EngineThread {
    jobs: mpsc::Sender<Job>,
}

impl EngineThread {
    /// Moves `engine` onto a thread of its own, which runs until every handle is dropped.
    pub fn start(engine: Engine) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel();
        std::thread::Builder::new().name("engine".into()).spawn(move || run(engine, rx))?;
        Ok(EngineThread { jobs })
    }

    /// Queues `req`; its events arrive on the returned receiver.
    fn submit(
        &self,
        req: GenerateRequest,
    ) -> Result<async_mpsc::UnboundedReceiver<Result<GenerateEvent, Status>>, Status> {
        let (events, rx) = async_mpsc::unbounded_channel();
        self.jobs.send(Job { req, events }).map_err(|_| Status::unavailable("the engine stopped"))?;
        Ok(rx)
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

/// The engine's request for `req`: its prompt tokenized (chat messages through the model's chat
/// template) and its sampling parameters checked by the engine.
fn prepare(engine: &Engine, req: &GenerateRequest) -> Result<GenerationRequest, Error> {
    let tokenizer = engine.tokenizer().ok_or_else(|| Error::InvalidRequest("the model has no tokenizer".into()))?;
    let prompt = if req.messages.is_empty() {
        tokenizer.encode(&req.prompt, true)?
    } else {
        let messages: Vec<ChatMessage> = req.messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
        // The template writes the special tokens itself.
        tokenizer.encode(&tokenizer.apply_chat_template(&messages, true)?, false)?
    };
    let params = SamplingParams {
        max_tokens: req.max_tokens as usize,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop.clone(),
        logprobs: req.logprobs,
        ..SamplingParams::default()
    };
    let adapter = (!req.adapter.is_empty()).then(|| req.adapter.clone());
    Ok(GenerationRequest { prompt, adapter, params })
}

/// The engine thread: takes requests between steps, blocking only while there is no work.
fn run(mut engine: Engine, jobs: mpsc::Receiver<Job>) {
    let mut streams: HashMap<usize, Stream> = HashMap::new();
    loop {
        let mut next = if engine.has_work() {
            jobs.try_recv().ok()
        } else {
            match jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => return, // every handle is gone
            }
        };
        while let Some(Job { req, events }) = next.take() {
            match prepare(&engine, &req).and_then(|r| engine.submit(r)) {
                Ok(index) => {
                    let stream = Stream { events, logprobs: req.logprobs, text_sent: 0, tokens_sent: 0 };
                    streams.insert(index, stream);
                }
                Err(e) => drop(events.send(Err(status_of(e)))),
            }
            next = jobs.try_recv().ok();
        }
        if !engine.has_work() {
            continue;
        }
        match engine.step() {
            Ok(finished) => {
                for p in engine.progress() {
                    if let Some(s) = streams.get_mut(&p.index) {
                        s.send_progress(p);
                    }
                }
                for out in finished {
                    if let Some(s) = streams.remove(&out.index) {
                        s.finish(&out);
                    }
                }
            }
            Err(e) => {
                // The step failed part-way: tell every caller rather than leave them waiting.
                let status = status_of(e);
                for (_, s) in streams.drain() {
                    let _ = s.events.send(Err(status.clone()));
                }
            }
        }
    }
}

impl Stream {
    fn send_progress(&mut self, p: &Progress) {
        let event = GenerateEvent {
            text: p.text.clone(),
            token_ids: vec![p.token],
            logprobs: if self.logprobs { vec![p.logprob] } else { Vec::new() },
            ..GenerateEvent::default()
        };
        self.text_sent += p.text.len();
        self.tokens_sent += 1;
        let _ = self.events.send(Ok(event));
    }

    fn finish(self, out: &GenerationOutput) {
        let tokens = out.token_ids.get(self.tokens_sent..).unwrap_or_default();
        let logprobs = out.logprobs.get(self.tokens_sent..).unwrap_or_default();
        let event = GenerateEvent {
            text: out.text.get(self.text_sent..).unwrap_or_default().to_string(),
            token_ids: tokens.to_vec(),
            logprobs: if self.logprobs { logprobs.to_vec() } else { Vec::new() },
            finish_reason: out.finish_reason.as_openai_str().to_string(),
            prompt_tokens: out.prompt_tokens as u32,
            completion_tokens: out.token_ids.len() as u32,
        };
        let _ = self.events.send(Ok(event));
    }
}

/// The gRPC `Worker` service over an engine thread.
pub struct WorkerService {
    engine: EngineThread,
}

impl WorkerService {
    pub fn new(engine: EngineThread) -> WorkerServer<Self> {
        WorkerServer::new(WorkerService { engine })
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = UnboundedReceiverStream<Result<GenerateEvent, Status>>;

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let rx = self.engine.submit(req.into_inner())?;
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// Registers worker `id` (serving at `addr`, with base `model` loaded) with the coordinator at
/// `coordinator` and keeps its lease: a heartbeat every third of the lease, registering again
/// when the coordinator has forgotten it (it was marked dead) and retrying while it cannot be
/// reached. Runs until the task is dropped.
pub async fn keep_lease(coordinator: String, id: String, addr: String, model: String) {
    let gpus = serde_json::json!([{ "index": 0, "memory_bytes": 0, "models": [model] }]).to_string();
    let register = RegisterWorkerRequest { worker_id: id.clone(), addr, gpus_json: gpus };
    let mut registered = false;
    let mut pause = Duration::from_millis(500);
    loop {
        let result = async {
            let mut client =
                ClusterClient::connect(format!("http://{coordinator}")).await.map_err(|e| e.to_string())?;
            if !registered {
                let lease = client.register_worker(register.clone()).await.map_err(|e| e.to_string())?;
                registered = true;
                return Ok(Duration::from_millis(lease.into_inner().lease_ms / 3));
            }
            match client.heartbeat(HeartbeatRequest { worker_id: id.clone() }).await {
                Ok(r) => Ok(Duration::from_millis(r.into_inner().lease_ms / 3)),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    registered = false;
                    Ok(Duration::ZERO)
                }
                Err(s) => Err(s.to_string()),
            }
        }
        .await;
        match result {
            Ok(next) => pause = next.max(Duration::from_millis(50)),
            Err(e) => eprintln!("worker {id}: coordinator {coordinator}: {e}; retrying"),
        }
        tokio::time::sleep(pause).await;
    }
}
