//! The HTTP gateway every coordinator serves: OpenAI's completions and chat completions (whole
//! or streamed as server-sent events), models, files, fine-tuning jobs, Tandem's adapters and
//! API keys, health, metrics and the operators' dashboard. A request is authenticated (a bearer key names a tenant; the
//! operator's key is the admin), its model resolved in the replicated state inside the tenant's
//! namespace, and it goes to an alive worker that has the base model loaded, preferring the
//! one that last served its adapter; the worker's token stream is relayed to the client.

mod dashboard;
mod groups;
mod grpc;
mod history;
mod limits;
pub(crate) mod listen;
mod metrics;
mod openai;
mod resources;
mod staged;
mod traced;
mod view;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tandem_proto::contract::{ClusterState, Command, Invalid, Reply, check_role, fresh_id, sha256_hex, unix_now};
use tandem_proto::v1::{ChatMessage, GenerateEvent, GenerateRequest};
use tandem_proto::{ClusterClient, Security};
use tokio_stream::StreamExt;
use tracing::Instrument;

use crate::store::Store;
pub use grpc::{ApiService, MAX_API_MESSAGE, api_server};
pub use metrics::{Metrics, TOP_ADAPTERS};
pub use openai::ApiError;
use openai::{Body, ChatRequest, CompletionRequest, Sampling, parse};
pub use resources::new_key;

/// How long a read of the replicated state, or a proposal, may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most choices one request may ask for (`n`).
const MAX_CHOICES: u32 = 8;
/// How long a worker may stay silent, before a request's first event (its queue wait and
/// prefill) and between events; past it the worker is taken for failed.
const WORKER_SILENCE: Duration = Duration::from_secs(120);
/// Largest body of a JSON request (a prompt, a job); uploads have their own limits.
const MAX_BODY: usize = 4 << 20;
/// The admin's own namespace (the operator's key acts as this tenant).
pub const ADMIN_TENANT: &str = "admin";

/// What the gateway checks with the model runtime, which this crate does not link: the
/// binary that serves the gateway provides it.
pub trait Checks: Send + Sync {
    /// Checks the JSONL training file at `path`; returns how many examples it holds, or an
    /// error that names the line and field (not the path).
    fn training_file(&self, path: &std::path::Path) -> Result<u64, Invalid>;
    /// Checks an adapter folder (PEFT LoRA or ESFT) against the base model at `model_uri`.
    fn adapter(&self, dir: &std::path::Path, model_uri: &str) -> Result<(), Invalid>;
}

/// How a coordinator serves the gateway.
pub struct GatewayOptions {
    pub addr: std::net::SocketAddr,
    /// The operator's key.
    pub admin_key: String,
    /// Where uploaded files and adapters are stored: a folder every worker reads at the same
    /// path (a shared filesystem across hosts).
    pub blobs: std::path::PathBuf,
    pub checks: Arc<dyn Checks>,
    /// HTTPS with this certificate (`--tls-cert`); none: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Adapters named in the per-adapter request series (the rest are counted as `other`).
    pub top_adapters: usize,
}

/// Who is calling: the tenant its key belongs to.
#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant: String,
    pub admin: bool,
}

impl Caller {
    /// Refuses (403) a caller without the operator's key; `what` says what only it does.
    pub fn must_be_operator(&self, what: &str) -> Result<(), ApiError> {
        match self.admin {
            true => Ok(()),
            false => Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "permission_denied",
                format!("only the operator's key {what}"),
            )),
        }
    }
}

/// Every route but `/health` takes its caller this way: authenticated from the headers, before
/// the body is read.
impl axum::extract::FromRequestParts<Arc<Gateway>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, gw: &Arc<Gateway>) -> Result<Self, ApiError> {
        gw.authenticate(&parts.headers).instrument(tracing::info_span!("auth")).await
    }
}

/// Where a request for a `model` goes: its base model and, for an adapter, the adapter.
struct Target {
    /// The caller's tenant (the model name is the caller's).
    tenant: String,
    base: String,
    /// The worker's name for the adapter version (`tenant:name@version`) and where it is.
    adapter: Option<(String, String)>,
}

pub struct Gateway {
    store: Store,
    /// This coordinator's cluster service: proposals go through it (on a follower, it
    /// forwards them to the leader).
    cluster: ClusterClient,
    /// SHA-256 of the operator's key.
    admin_key_sha256: String,
    blobs: std::path::PathBuf,
    checks: Arc<dyn Checks>,
    /// Round-robin position over the workers of a model.
    turn: AtomicUsize,
    /// The worker that last served each adapter version: requests for it go there while it is
    /// alive, where the adapter is resident.
    affinity: std::sync::Mutex<std::collections::HashMap<String, String>>,
    metrics: metrics::Metrics,
    /// This process's metrics (the gateway's among them), served at `/metrics`.
    registry: Arc<prometheus_client::registry::Registry>,
    /// The state and worker channels requests are routed with.
    view: view::View,
    /// Tenants' rates and requests in flight on this gateway.
    limiter: Arc<limits::Limiter>,
    /// The last minutes of traffic and errors, for the dashboard.
    history: history::History,
}

impl Gateway {
    /// The gateway, with a task that keeps its view fresh for as long as it lives (call inside
    /// the runtime that serves it).
    /// A gateway over `store`, proposing through `cluster`; it reaches workers with `security`.
    /// `metrics` are its series, in the process's `registry`.
    pub fn new(
        store: Store,
        cluster: ClusterClient,
        security: Security,
        opts: &GatewayOptions,
        metrics: Metrics,
        registry: Arc<prometheus_client::registry::Registry>,
    ) -> Arc<Self> {
        let gateway = Arc::new(Gateway {
            store,
            cluster,
            admin_key_sha256: sha256_hex(opts.admin_key.as_bytes()),
            blobs: opts.blobs.clone(),
            checks: opts.checks.clone(),
            turn: AtomicUsize::new(0),
            affinity: Default::default(),
            metrics,
            registry,
            view: view::View::new(security),
            limiter: Arc::default(),
            history: history::History::default(),
        });
        let weak = Arc::downgrade(&gateway);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(view::REFRESH).await;
                let Some(gateway) = weak.upgrade() else { return };
                // A failed read keeps the last view; requests that need more read for themselves.
                let _ = gateway.state().await;
            }
        });
        let weak = Arc::downgrade(&gateway);
        tokio::spawn(async move {
            loop {
                let Some(gateway) = weak.upgrade() else { return };
                let leases = gateway.leader_leases().await;
                gateway.history.sample(&gateway.metrics.totals, leases.as_deref());
                drop(gateway);
                tokio::time::sleep(history::INTERVAL).await;
            }
        });
        gateway
    }

    /// The caller, from `Authorization: Bearer KEY`: the operator, or the tenant the key was
    /// made for.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(StatusCode::UNAUTHORIZED, "missing_api_key", "no API key: send Authorization: Bearer KEY")
            })?;
        let hash = sha256_hex(key.as_bytes());
        if hash == self.admin_key_sha256 {
            return Ok(Caller { tenant: ADMIN_TENANT.into(), admin: true });
        }
        // A key the view lacks may be newer than the view: read again before refusing it.
        let key = match self.view.state().api_keys.get(&hash) {
            Some(k) => k.clone(),
            None => (self.state().await?.api_keys.get(&hash).cloned()).ok_or_else(|| {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "the API key is not valid")
            })?,
        };
        if key.expired(unix_now()) {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "the API key has expired"));
        }
        Ok(Caller { tenant: key.tenant, admin: false })
    }

    /// The state, read linearizably (and kept as the view).
    async fn state(&self) -> Result<Arc<ClusterState>, ApiError> {
        let state = self.store.read(READ_TIMEOUT).await;
        let state = Arc::new(state.map_err(|e| ApiError::cluster("the cluster's state", e))?);
        self.view.offer(state.clone());
        Ok(state)
    }

    /// Proposes `command` (a refusal is a 409).
    async fn propose(&self, what: &str, command: Command) -> Result<Reply, ApiError> {
        match self.cluster.propose(what, command).await {
            Ok(Reply::Refused { reason }) => Err(ApiError::new(StatusCode::CONFLICT, "conflict", reason)),
            Ok(reply) => {
                // This gateway's next requests see its own write.
                let _ = self.state().await;
                Ok(reply)
            }
            Err(e) => Err(ApiError::cluster("the cluster could not record it", e.into())),
        }
    }

    /// The workers taking work that have base `model` loaded, and rank 0 of each formed worker group
    /// of it (the other ranks serve nothing themselves): the one that last served `adapter`
    /// first, then the rest in turn.
    fn workers_for(&self, state: &ClusterState, target: &Target) -> Result<Vec<String>, ApiError> {
        let mut workers: Vec<String> = (state.workers.values())
            .filter(|w| w.takes_work() && w.gpus.iter().any(|g| g.models.contains(&target.base)))
            .map(|w| w.addr.clone())
            .collect();
        let leaders = (state.placements.values())
            .filter(|p| p.formed && p.model == target.base)
            .filter_map(|p| state.workers.get(p.workers.first()?))
            .filter(|w| w.takes_work());
        workers.extend(leaders.map(|w| w.addr.clone()));
        if workers.is_empty() {
            return Err(ApiError::unavailable(format!("no worker serves {:?} right now", target.base)));
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) % workers.len();
        workers.rotate_left(turn);
        let resident = target.adapter.as_ref().and_then(|(key, _)| self.affinity.lock().ok()?.get(key).cloned());
        if let Some(i) = resident.and_then(|r| workers.iter().position(|w| *w == r)) {
            let w = workers.remove(i);
            workers.insert(0, w);
        }
        Ok(workers)
    }

    /// Resolves `model` (a base model, or an adapter of the caller's) in the caller's namespace.
    fn resolve(&self, state: &ClusterState, caller: &Caller, model: &str) -> Result<Target, ApiError> {
        if state.models.contains_key(model) {
            return Ok(Target { tenant: caller.tenant.clone(), base: model.to_string(), adapter: None });
        }
        let latest = state.adapters.get(&caller.tenant).and_then(|a| a.get(model)).and_then(|v| v.last());
        match latest {
            Some(v) => Ok(Target {
                tenant: caller.tenant.clone(),
                base: v.base_model.clone(),
                adapter: Some((format!("{}:{model}@{}", caller.tenant, v.version), v.uri.clone())),
            }),
            None => Err(ApiError::model_not_found(model)),
        }
    }

    /// Resolves `model` and lists the workers to try, best first: from the view, or when the
    /// view knows no such model or no worker for it, from a linearizable read.
    async fn route(&self, caller: &Caller, model: &str) -> Result<(Target, Vec<String>), ApiError> {
        let from = |state: &ClusterState| {
            let target = self.resolve(state, caller, model)?;
            let workers = self.workers_for(state, &target)?;
            Ok((target, workers))
        };
        match from(&self.view.state()) {
            Ok(route) => Ok(route),
            Err(_) => from(&*self.state().await?),
        }
    }
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics::serve))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .merge(resources::routes())
        .merge(groups::routes())
        .merge(dashboard::routes())
        // The same operations for programmatic clients, as gRPC (HTTP/2) on the same port: a
        // tenant needs its key there, and no certificate of the cluster's.
        .route_service("/tandem.v1.Api/{*method}", api_server(gateway.clone()))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(header_limits))
        .layer(axum::middleware::map_response(openai::error_body))
        .layer(axum::middleware::from_fn(traced::traced))
        .with_state(gateway)
}

/// Most headers one request may carry, and most bytes their names and values may take: past
/// either, a 431 in OpenAI's shape. hyper's own limits sit far above (`listen.rs`); past those
/// it answers with a bare 431 itself.
const MAX_HEADERS: usize = 100;
const MAX_HEADER_BYTES: usize = 64 << 10;

async fn header_limits(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = request.headers();
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        let msg = format!("{} headers of {bytes} bytes: at most {MAX_HEADERS}, of {MAX_HEADER_BYTES}", headers.len());
        return ApiError::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large", msg).into_response();
    }
    next.run(request).await
}

async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.store.read(Duration::from_secs(2)).await {
        Ok(state) => {
            let alive = state.workers.values().filter(|w| w.alive).count();
            axum::Json(json!({"status": "ok", "workers_alive": alive})).into_response()
        }
        Err(e) => ApiError::cluster("no quorum", e).into_response(),
    }
}

/// The gateway's OpenAPI document: every route, its body and its answers (`docs/security.md`
/// lists the same routes with the role each needs; a test checks the two agree).
async fn openapi() -> Response {
    const DOCUMENT: &str = include_str!("openapi.json");
    ([(axum::http::header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The base models and the caller's adapters.
async fn models(State(gw): State<Arc<Gateway>>, caller: Caller) -> Result<Response, ApiError> {
    let state = gw.state().await?;
    let adapters = state.adapters.get(&caller.tenant).into_iter().flatten().map(|(name, _)| name);
    let data: Vec<Value> =
        state.models.keys().chain(adapters).filter_map(|id| model_object(&state, &caller, id)).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// One base model or one of the caller's adapters, by the name requests give it.
async fn model(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let state = gw.state().await?;
    let found = model_object(&state, &caller, &id).ok_or_else(|| ApiError::model_not_found(&id))?;
    Ok(axum::Json(found).into_response())
}

/// `id` as OpenAI's model object: a base model, or the caller's adapter (with its base model as
/// `parent` and its newest version); none when the caller has no such model.
fn model_object(state: &ClusterState, caller: &Caller, id: &str) -> Option<Value> {
    if state.models.contains_key(id) {
        return Some(json!({"id": id, "object": "model", "created": 0, "owned_by": "tandem"}));
    }
    let v = state.adapters.get(&caller.tenant)?.get(id)?.last()?;
    Some(json!({
        "id": id, "object": "model", "created": 0, "owned_by": caller.tenant,
        "parent": v.base_model, "version": v.version,
    }))
}

/// Checks the sampling parameters before the request is routed, so a malformed request is a
/// 400 whether or not a worker serves its model yet.
fn check_sampling(s: &Sampling) -> Result<(), ApiError> {
    let n = s.n.unwrap_or(1);
    if n == 0 || n > MAX_CHOICES {
        return Err(ApiError::bad_request("n", format!("n must be between 1 and {MAX_CHOICES}")));
    }
    sampled_logprobs(s)?;
    if s.top_logprobs.is_some_and(|k| k > 0) {
        return Err(ApiError::bad_request(
            "top_logprobs",
            "alternatives per token are not served: top_logprobs must be 0",
        ));
    }
    if s.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::bad_request("temperature", "temperature must be between 0 and 2"));
    }
    if s.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::bad_request("top_p", "top_p must be above 0 and at most 1"));
    }
    if s.max_completion_tokens.or(s.max_tokens) == Some(0) {
        return Err(ApiError::bad_request("max_tokens", "max_tokens must be at least 1"));
    }
    Ok(())
}

/// Whether the sampled tokens' log-probabilities are asked for: the engine gives those, not
/// the best alternatives.
fn sampled_logprobs(s: &Sampling) -> Result<bool, ApiError> {
    match &s.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(false),
        Some(Value::Bool(true)) => Ok(true),
        Some(Value::Number(k)) if k.as_u64() == Some(0) => Ok(true),
        Some(_) => Err(ApiError::bad_request(
            "logprobs",
            "only logprobs of the sampled tokens are served (logprobs: true for chat, 0 for completions)",
        )),
    }
}

/// The worker's request for choice `i` (the sampling checked by [`check_sampling`]).
fn generate_request(s: &Sampling, target: &Target, i: u32) -> Result<GenerateRequest, ApiError> {
    let (adapter, adapter_uri) = target.adapter.clone().unwrap_or_default();
    Ok(GenerateRequest {
        logprobs: sampled_logprobs(s)?,
        adapter,
        adapter_uri,
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
        // A full queue drains in about a second at the rates a worker serves.
        tonic::Code::ResourceExhausted => {
            ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", s.message()) }
        }
        _ => ApiError::unavailable(format!("the worker failed: {}", s.message())),
    }
}

/// A worker's events for one choice.
type Events = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<GenerateEvent, tonic::Status>> + Send>>;

/// Opens a stream for `req` on the first of `workers` that gives its first event: a worker
/// that cannot be reached or fails before anything was sent is left for the next. A refusal
/// (bad request, full queue) is final. Returns the stream and the worker.
async fn start(view: &view::View, workers: &[String], req: GenerateRequest) -> Result<(Events, String), ApiError> {
    let mut last = None;
    for worker in workers {
        let attempt = async {
            let mut client = view.worker(worker)?;
            let mut stream = client.generate(req.clone()).await?.into_inner();
            let first = stream.message().await?;
            Ok::<_, tonic::Status>((first, stream))
        };
        let attempt = attempt.instrument(tracing::info_span!("worker", worker = %worker));
        let name = worker.clone();
        let silent =
            move || tonic::Status::deadline_exceeded(format!("worker {name} was silent for {WORKER_SILENCE:?}"));
        match tokio::time::timeout(WORKER_SILENCE, attempt).await.unwrap_or_else(|_| Err(silent())) {
            Ok((first, rest)) => {
                let rest = rest.timeout(WORKER_SILENCE).map(move |event| event.unwrap_or_else(|_| Err(silent())));
                let events: Events = Box::pin(tokio_stream::iter(first.map(Ok)).chain(rest));
                return Ok((events, worker.clone()));
            }
            Err(s) if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted) => {
                return Err(status_to_error(s));
            }
            Err(s) => last = Some(s),
        }
    }
    Err(last.map_or_else(|| ApiError::unavailable("no worker to send it to"), status_to_error))
}

/// One choice, whole.
#[derive(Default)]
struct Choice {
    text: String,
    finish_reason: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    /// Each token's text and log-probability, when asked for.
    tokens: Vec<String>,
    logprobs: Vec<f32>,
}

async fn collect(mut stream: Events) -> Result<Choice, ApiError> {
    let mut choice = Choice::default();
    while let Some(e) = stream.next().await.transpose().map_err(status_to_error)? {
        choice.text.push_str(&e.text);
        choice.tokens.extend(e.tokens);
        choice.logprobs.extend(e.logprobs);
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

    /// OpenAI's `logprobs` of a choice (or chunk) whose tokens are `tokens`, the first at byte
    /// `offset` of the completion; null when none were asked for.
    fn logprobs(self, tokens: &[String], logprobs: &[f32], offset: usize) -> Value {
        if tokens.is_empty() {
            return Value::Null;
        }
        match self {
            Kind::Completion => {
                let offsets: Vec<usize> =
                    tokens.iter().scan(offset, |at, t| Some(std::mem::replace(at, *at + t.len()))).collect();
                json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": null, "text_offset": offsets})
            }
            Kind::Chat => {
                let content: Vec<Value> = (tokens.iter().zip(logprobs))
                    .map(|(t, lp)| json!({"token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": []}))
                    .collect();
                json!({"content": content, "refusal": null})
            }
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

async fn completions(State(gw): State<Arc<Gateway>>, caller: Caller, Body(body): Body) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    let prompts = req.prompt.to_vec();
    let [prompt] = prompts.as_slice() else {
        return Err(ApiError::bad_request("prompt", "give one prompt (a string); lists of prompts are not supported"));
    };
    let make = |t: &Target, i| Ok(GenerateRequest { prompt: prompt.clone(), ..generate_request(&req.sampling, t, i)? });
    gw.respond(Kind::Completion, &caller, req.model.clone(), &req.sampling, make).await
}

async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages", "messages must not be empty"));
    }
    let messages = (req.messages.iter())
        .map(|m| {
            check_role(&m.role).map_err(|e| ApiError::bad_request("messages", e.0))?;
            Ok(ChatMessage { role: m.role.clone(), content: m.content.text()? })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let make =
        |t: &Target, i| Ok(GenerateRequest { messages: messages.clone(), ..generate_request(&req.sampling, t, i)? });
    gw.respond(Kind::Chat, &caller, req.model.clone(), &req.sampling, make).await
}

impl Gateway {
    /// Resolves `model` for the caller, runs the `n` choices on the first worker that answers,
    /// and responds whole or as a stream of chunks; counts the request, whatever its outcome.
    async fn respond(
        &self,
        kind: Kind,
        caller: &Caller,
        model: String,
        sampling: &Sampling,
        make: impl Fn(&Target, u32) -> Result<GenerateRequest, ApiError>,
    ) -> Result<Response, ApiError> {
        let arrived = Instant::now();
        let mut routed = None;
        let result = async {
            check_sampling(sampling)?;
            let (target, workers) = self.route(caller, &model).instrument(tracing::info_span!("route")).await?;
            let asked = Asked { kind, model: model.clone(), sampling, arrived };
            let answer = self.run_choices(asked, &target, &workers, |i| make(&target, i)).await;
            routed = Some(target);
            answer
        }
        .await;
        let status = result.as_ref().map_or_else(|e| e.status, |_| StatusCode::OK);
        let adapter = (routed.as_ref().and_then(|t| t.adapter.as_ref()))
            .map(|(version, _)| version.split_once('@').map_or(version.as_str(), |(name, _)| name));
        self.metrics.request(&caller.tenant, routed.as_ref().map(|t| t.base.as_str()), adapter, status);
        if let Err(e) = &result
            && status.is_server_error()
        {
            let (tenant, status, message) = (caller.tenant.clone(), status.as_u16(), e.message.clone());
            let event = history::ErrorEvent { at: unix_now(), tenant, model: model.clone(), status, message, count: 1 };
            self.history.error(event);
        }
        result
    }

    /// [`start`] on `workers` (the view's); when none of them could take it, once more on those a
    /// linearizable read names and the view did not: the view may be [`view::REFRESH`] behind a
    /// worker just drained and stopped, or another just back in service.
    async fn start_routed(
        &self,
        target: &Target,
        workers: &[String],
        req: GenerateRequest,
    ) -> Result<(Events, String), ApiError> {
        match start(&self.view, workers, req.clone()).await {
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                let fresh = self.workers_for(&*self.state().await?, target).unwrap_or_default();
                let untried: Vec<String> = fresh.into_iter().filter(|w| !workers.contains(w)).collect();
                if untried.is_empty() {
                    return Err(e);
                }
                start(&self.view, &untried, req).await
            }
            answer => answer,
        }
    }

    async fn run_choices(
        &self,
        asked: Asked<'_>,
        target: &Target,
        workers: &[String],
        make: impl Fn(u32) -> Result<GenerateRequest, ApiError>,
    ) -> Result<Response, ApiError> {
        let Asked { kind, model, sampling, arrived } = asked;
        let limits = self.view.state().limits.get(&target.tenant).cloned().unwrap_or_default();
        let permit = self.limiter.admit(&target.tenant, &limits)?;
        let charge = Charge { permit, limits, limiter: self.limiter.clone() };
        let n = sampling.n.unwrap_or(1);
        // Every choice's stream gives its first event before anything is answered, so a refused
        // request is an error status, not a broken stream, and a worker that fails first is
        // replaced by the next.
        let mut streams = Vec::new();
        let mut workers = workers.to_vec();
        for i in 0..n {
            let (stream, worker) = self.start_routed(target, &workers, make(i)?).await?;
            // The other choices go where the first one went (the adapter is resident there now).
            if let Some(at) = workers.iter().position(|w| *w == worker) {
                workers.rotate_left(at);
            }
            streams.push(stream);
        }
        // Every choice has given its first token.
        let first_token = arrived.elapsed();
        if let (Some((key, _)), Some(w)) = (&target.adapter, workers.first())
            && let Ok(mut affinity) = self.affinity.lock()
        {
            affinity.insert(key.clone(), w.clone());
        }
        let id = fresh_id(kind.id_prefix());
        if sampling.stream {
            let usage = sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
            let metrics = self.metrics.clone();
            let (tenant, base) = (target.tenant.clone(), target.base.clone());
            let count = move |prompt, completion| {
                metrics.tokens(&tenant, &base, prompt, completion);
                metrics.latency(&base, arrived, first_token, completion / n);
                charge.tokens(&tenant, prompt + completion);
            };
            return Ok(stream_chunks(kind, id, model, streams, usage, count));
        }
        let mut choices = Vec::new();
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        for (i, stream) in streams.into_iter().enumerate() {
            let c = collect(stream).await?;
            prompt_tokens = c.prompt_tokens;
            completion_tokens += c.completion_tokens;
            let logprobs = kind.logprobs(&c.tokens, &c.logprobs, 0);
            choices.push(match kind {
                Kind::Completion => {
                    json!({"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
                }
                Kind::Chat => json!({
                    "index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs, "finish_reason": c.finish_reason,
                }),
            });
        }
        self.metrics.tokens(&target.tenant, &target.base, prompt_tokens, completion_tokens);
        self.metrics.latency(&target.base, arrived, first_token, completion_tokens / n);
        charge.tokens(&target.tenant, prompt_tokens + completion_tokens);
        let body = json!({
            "id": id, "object": kind.object(false), "created": now(), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        });
        Ok(axum::Json(body).into_response())
    }
}

/// What a completion or chat request asked for, and when it arrived.
struct Asked<'a> {
    kind: Kind,
    /// The model as the caller named it (echoed in the response).
    model: String,
    sampling: &'a Sampling,
    arrived: Instant,
}

/// An admitted request's place under its tenant's limits, held until the answer (or stream)
/// ends, and what it used charged to the tenant then.
struct Charge {
    permit: limits::Permit,
    limits: tandem_proto::contract::TenantLimits,
    limiter: Arc<limits::Limiter>,
}

impl Charge {
    fn tokens(self, tenant: &str, tokens: u32) {
        self.limiter.charge(tenant, &self.limits, u64::from(tokens));
        drop(self.permit);
    }
}

/// The choices' events as OpenAI's chunks, then the usage when asked for, then `[DONE]`.
fn stream_chunks(
    kind: Kind,
    id: String,
    model: String,
    streams: Vec<Events>,
    include_usage: bool,
    count: impl FnOnce(u32, u32) + Send + 'static,
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
    let events = relay(merged, kind, chunk, include_usage, count);
    Sse::new(events).into_response()
}

/// Relays the merged worker streams as SSE events.
fn relay(
    mut merged: tokio_stream::StreamMap<usize, Events>,
    kind: Kind,
    chunk: impl Fn(Value, Value) -> Event + Send + 'static,
    include_usage: bool,
    count: impl FnOnce(u32, u32) + Send + 'static,
) -> impl tokio_stream::Stream<Item = Result<Event, Infallible>> + Send {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Relaying goes on after the handler returns: in a span of its own, in the request's trace.
    tokio::spawn(
        async move {
            let mut started = std::collections::HashSet::new();
            // Bytes of text each choice has sent (completions' `text_offset`).
            let mut offsets = std::collections::HashMap::new();
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
                let offset = offsets.entry(i).or_insert(0usize);
                let logprobs = kind.logprobs(&e.tokens, &e.logprobs, *offset);
                *offset += e.tokens.iter().map(String::len).sum::<usize>();
                let choice = match kind {
                    Kind::Completion => {
                        json!({"index": i, "text": e.text, "logprobs": logprobs, "finish_reason": finish})
                    }
                    Kind::Chat => {
                        let mut delta = json!({"content": e.text});
                        if started.insert(i) {
                            delta["role"] = json!("assistant");
                        }
                        json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
                    }
                };
                if tx.send(chunk(json!([choice]), Value::Null)).is_err() {
                    return; // the client went away
                }
            }
            count(prompt_tokens, completion_tokens);
            if include_usage {
                let _ = tx.send(chunk(json!([]), usage(prompt_tokens, completion_tokens)));
            }
            let _ = tx.send(Event::default().data("[DONE]"));
        }
        .instrument(tracing::info_span!("stream")),
    );
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok)
}
