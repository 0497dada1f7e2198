//! The HTTP gateway every coordinator serves: OpenAI's completions and chat completions (whole
//! or streamed as server-sent events), models, and health. A request is authenticated, its
//! model resolved in the replicated state, and it goes to an alive worker that has the base
//! model loaded (in turn); the worker's token stream is relayed to the client.
//!
//! Not yet (issue 7): tenants' keys, adapters, files and fine-tuning jobs, metrics, retries on
//! another worker, logprobs.

mod openai;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tandem_proto::v1::worker_client::WorkerClient;
use tandem_proto::v1::{ChatMessage, GenerateEvent, GenerateRequest};
use tokio_stream::StreamExt;

use crate::server::fresh_id;
use crate::state::ClusterState;
use crate::store::Store;
use openai::{ApiError, ChatRequest, CompletionRequest, Sampling, parse};

/// How long a read of the replicated state may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most choices one request may ask for (`n`).
const MAX_CHOICES: u32 = 8;

pub struct Gateway {
    store: Store,
    /// The operator's key (bearer token).
    admin_key: String,
    /// Round-robin position over the workers of a model.
    turn: AtomicUsize,
}

impl Gateway {
    pub fn new(store: Store, admin_key: String) -> Arc<Self> {
        Arc::new(Gateway { store, admin_key, turn: AtomicUsize::new(0) })
    }

    /// The caller, from `Authorization: Bearer KEY`.
    fn authenticate(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(StatusCode::UNAUTHORIZED, "missing_api_key", "no API key: send Authorization: Bearer KEY")
            })?;
        if key != self.admin_key {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "the API key is not valid"));
        }
        Ok(())
    }

    async fn state(&self) -> Result<ClusterState, ApiError> {
        self.store.read(READ_TIMEOUT).await.map_err(|e| ApiError::unavailable(format!("the cluster's state: {e}")))
    }

    /// The address of the worker to send a request for base `model` to (alive, model loaded;
    /// in turn).
    fn pick_worker(&self, state: &ClusterState, model: &str) -> Result<String, ApiError> {
        let workers: Vec<&str> = (state.workers.values())
            .filter(|w| w.alive && w.gpus.iter().any(|g| g.models.iter().any(|m| m == model)))
            .map(|w| w.addr.as_str())
            .collect();
        if workers.is_empty() {
            return Err(ApiError::unavailable(format!("no worker serves {model:?} right now")));
        }
        Ok(workers[self.turn.fetch_add(1, Ordering::Relaxed) % workers.len()].to_string())
    }

    /// Resolves `model` and picks a worker for it.
    async fn route(&self, model: &str) -> Result<String, ApiError> {
        let state = self.state().await?;
        if !state.models.contains_key(model) {
            let msg = format!("the model {model:?} does not exist or you do not have access to it");
            return Err(ApiError {
                param: Some("model"),
                ..ApiError::new(StatusCode::NOT_FOUND, "model_not_found", msg)
            });
        }
        self.pick_worker(&state, model)
    }
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(gateway)
}

async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.store.read(Duration::from_secs(2)).await {
        Ok(state) => {
            let alive = state.workers.values().filter(|w| w.alive).count();
            axum::Json(json!({"status": "ok", "workers_alive": alive})).into_response()
        }
        Err(e) => ApiError::unavailable(format!("no quorum: {e}")).into_response(),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Response, ApiError> {
    gw.authenticate(&headers)?;
    let state = gw.state().await?;
    let data: Vec<Value> = (state.models.keys())
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "tandem"}))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// The worker request for `prompt` or `messages` under `s`, choice `i` of `n`.
fn generate_request(s: &Sampling, i: u32) -> Result<GenerateRequest, ApiError> {
    let n = s.n.unwrap_or(1);
    if n == 0 || n > MAX_CHOICES {
        return Err(ApiError::bad_request("n", format!("n must be between 1 and {MAX_CHOICES}")));
    }
    Ok(GenerateRequest {
        max_tokens: s.max_completion_tokens.or(s.max_tokens).unwrap_or(16),
        temperature: s.temperature.unwrap_or(1.0),
        top_p: s.top_p.unwrap_or(1.0),
        // Choices of one seeded request differ, and repeat with the seed.
        seed: s.seed.map(|seed| seed.wrapping_add(u64::from(i))),
        stop: s.stop.as_ref().map(|st| st.to_vec()).unwrap_or_default(),
        ..GenerateRequest::default()
    })
}

fn status_to_error(s: tonic::Status) -> ApiError {
    match s.code() {
        tonic::Code::InvalidArgument => ApiError::bad_request("body", s.message()),
        tonic::Code::ResourceExhausted => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", s.message()),
        _ => ApiError::unavailable(format!("the worker failed: {}", s.message())),
    }
}

/// Opens the worker's stream for `req`.
async fn start(worker: &str, req: GenerateRequest) -> Result<tonic::Streaming<GenerateEvent>, ApiError> {
    let mut client = WorkerClient::connect(format!("http://{worker}"))
        .await
        .map_err(|e| ApiError::unavailable(format!("worker {worker}: {e}")))?;
    Ok(client.generate(req).await.map_err(status_to_error)?.into_inner())
}

/// One choice, whole.
struct Choice {
    text: String,
    finish_reason: String,
    prompt_tokens: u32,
    completion_tokens: u32,
}

async fn collect(mut stream: tonic::Streaming<GenerateEvent>) -> Result<Choice, ApiError> {
    let mut choice =
        Choice { text: String::new(), finish_reason: String::new(), prompt_tokens: 0, completion_tokens: 0 };
    while let Some(e) = stream.message().await.map_err(status_to_error)? {
        choice.text.push_str(&e.text);
        if !e.finish_reason.is_empty() {
            choice.finish_reason = e.finish_reason;
            choice.prompt_tokens = e.prompt_tokens;
            choice.completion_tokens = e.completion_tokens;
        }
    }
    Ok(choice)
}

/// What differs between the two endpoints' responses.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }

    /// The `object` of a whole response or of a streamed chunk.
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

async fn completions(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    gw.authenticate(&headers)?;
    let req: CompletionRequest = parse(&body)?;
    let prompts = req.prompt.to_vec();
    let [prompt] = prompts.as_slice() else {
        return Err(ApiError::bad_request("prompt", "give one prompt (a string); lists of prompts are not supported"));
    };
    let worker = gw.route(&req.model).await?;
    let make = |i| Ok(GenerateRequest { prompt: prompt.clone(), ..generate_request(&req.sampling, i)? });
    respond(Kind::Completion, &worker, req.model.clone(), &req.sampling, make).await
}

async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    gw.authenticate(&headers)?;
    let req: ChatRequest = parse(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages", "messages must not be empty"));
    }
    let messages = (req.messages.iter())
        .map(|m| Ok(ChatMessage { role: m.role.clone(), content: m.content.text()? }))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let worker = gw.route(&req.model).await?;
    let make = |i| Ok(GenerateRequest { messages: messages.clone(), ..generate_request(&req.sampling, i)? });
    respond(Kind::Chat, &worker, req.model.clone(), &req.sampling, make).await
}

/// Runs the `n` choices on `worker` and answers whole or as a stream of chunks.
async fn respond(
    kind: Kind,
    worker: &str,
    model: String,
    sampling: &Sampling,
    make: impl Fn(u32) -> Result<GenerateRequest, ApiError>,
) -> Result<Response, ApiError> {
    let n = sampling.n.unwrap_or(1);
    // Every choice's stream opens before anything is answered, so a refused request is an
    // error status, not a broken stream.
    let mut streams = Vec::new();
    for i in 0..n {
        streams.push(start(worker, make(i)?).await?);
    }
    let id = fresh_id(kind.id_prefix());
    if sampling.stream {
        let usage = sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(stream_chunks(kind, id, model, streams, usage));
    }
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (i, stream) in streams.into_iter().enumerate() {
        let c = collect(stream).await?;
        prompt_tokens = c.prompt_tokens;
        completion_tokens += c.completion_tokens;
        choices.push(match kind {
            Kind::Completion => {
                json!({"index": i, "text": c.text, "logprobs": null, "finish_reason": c.finish_reason})
            }
            Kind::Chat => json!({
                "index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": null, "finish_reason": c.finish_reason,
            }),
        });
    }
    let body = json!({
        "id": id, "object": kind.object(false), "created": now(), "model": model, "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    });
    Ok(axum::Json(body).into_response())
}

/// The choices' events as OpenAI's chunks, then the usage when asked for, then `[DONE]`.
fn stream_chunks(
    kind: Kind,
    id: String,
    model: String,
    streams: Vec<tonic::Streaming<GenerateEvent>>,
    include_usage: bool,
) -> Response {
    let created = now();
    let object = kind.object(true);
    let chunk = move |choices: Value, usage: Value| {
        let body =
            json!({"id": id, "object": object, "created": created, "model": model, "choices": choices, "usage": usage});
        Event::default().data(body.to_string())
    };
    // The choices' streams, merged, each event tagged with its choice.
    let merged = tokio_stream::StreamMap::from_iter(streams.into_iter().enumerate());
    let events = relay(merged, kind, chunk, include_usage);
    Sse::new(events).into_response()
}

/// Relays the merged worker streams as SSE events.
fn relay(
    mut merged: tokio_stream::StreamMap<usize, tonic::Streaming<GenerateEvent>>,
    kind: Kind,
    chunk: impl Fn(Value, Value) -> Event + Send + 'static,
    include_usage: bool,
) -> impl tokio_stream::Stream<Item = Result<Event, Infallible>> + Send {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut started = std::collections::HashSet::new();
        let (mut prompt_tokens, mut completion_tokens) = (0u32, 0u32);
        while let Some((i, event)) = merged.next().await {
            let e = match event {
                Ok(e) => e,
                Err(s) => {
                    let error =
                        json!({"error": {"message": s.message(), "type": "server_error", "code": "worker_failed"}});
                    let _ = tx.send(Event::default().data(error.to_string()));
                    break;
                }
            };
            let finish = (!e.finish_reason.is_empty()).then(|| e.finish_reason.clone());
            if finish.is_some() {
                prompt_tokens = e.prompt_tokens;
                completion_tokens += e.completion_tokens;
            }
            let choice = match kind {
                Kind::Completion => json!({"index": i, "text": e.text, "logprobs": null, "finish_reason": finish}),
                Kind::Chat => {
                    let mut delta = json!({"content": e.text});
                    if started.insert(i) {
                        delta["role"] = json!("assistant");
                    }
                    json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": finish})
                }
            };
            if tx.send(chunk(json!([choice]), Value::Null)).is_err() {
                return; // the client went away
            }
        }
        if include_usage {
            let _ = tx.send(chunk(json!([]), usage(prompt_tokens, completion_tokens)));
        }
        let _ = tx.send(Event::default().data("[DONE]"));
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok)
}
