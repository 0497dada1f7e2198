//! The HTTP gateway every coordinator serves: OpenAI's completions and chat completions (whole
//! or streamed as server-sent events), models, files, fine-tuning jobs, Tandem's adapters
//! (uploaded, or read from a URL, S3 or the server's disk: `adapter_source.rs`) and API keys, health, metrics and the operators' dashboard. A request is authenticated (a bearer key names a tenant; the
//! operator's key is the admin), its model resolved in the replicated state inside the tenant's
//! namespace, and it goes to an alive worker that has the base model loaded, preferring the
//! one that last served its adapter; the worker's token stream is relayed to the client.

mod adapter_source;
mod completions;
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

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tandem_proto::contract::{Checkpoint, ClusterState, Command, Invalid, Job, Reply, sha256_hex, unix_now};
use tandem_proto::{ClusterClient, Security};
use tracing::Instrument;

use crate::store::Store;
pub use grpc::{ApiService, MAX_API_MESSAGE, api_server};
pub use metrics::{Metrics, TOP_ADAPTERS};
pub use openai::ApiError;
pub use resources::new_key;

/// How long a read of the replicated state, or a proposal, may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
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

    /// Resolves `model` (a base model, an adapter of the caller's, or a checkpoint of one of
    /// its fine-tuning jobs) in the caller's namespace.
    fn resolve(&self, state: &ClusterState, caller: &Caller, model: &str) -> Result<Target, ApiError> {
        let tenant = caller.tenant.clone();
        if state.models.contains_key(model) {
            return Ok(Target { tenant, base: model.to_string(), adapter: None });
        }
        if let Some((job, checkpoint)) = job_checkpoint(state, caller, model) {
            // Each checkpoint is an adapter of its own, which never changes: its one version.
            let uri = std::path::Path::new(&checkpoint.uri).join("adapter").to_string_lossy().into_owned();
            let adapter = Some((format!("{tenant}:{model}@1"), uri));
            return Ok(Target { tenant, base: job.spec.base_model.clone(), adapter });
        }
        let latest = state.adapters.get(&caller.tenant).and_then(|a| a.get(model)).and_then(|v| v.last());
        match latest {
            Some(v) => Ok(Target {
                tenant: tenant.clone(),
                base: v.base_model.clone(),
                adapter: Some((format!("{tenant}:{model}@{}", v.version), v.uri.clone())),
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
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/embeddings", post(completions::embeddings))
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
    if let Some((job, checkpoint)) = job_checkpoint(state, caller, id) {
        return Some(json!({
            "id": id, "object": "model", "created": checkpoint.at, "owned_by": caller.tenant,
            "parent": job.spec.base_model,
        }));
    }
    let v = state.adapters.get(&caller.tenant)?.get(id)?.last()?;
    Some(json!({
        "id": id, "object": "model", "created": 0, "owned_by": caller.tenant,
        "parent": v.base_model, "version": v.version,
    }))
}

/// The checkpoint `model` names (`ADAPTER:ckpt-step-N`, as a job's checkpoints list it) among
/// the caller's jobs, and its job.
fn job_checkpoint<'a>(state: &'a ClusterState, caller: &Caller, model: &str) -> Option<(&'a Job, &'a Checkpoint)> {
    let (adapter, step) = model.rsplit_once(":ckpt-step-")?;
    let step: u64 = step.parse().ok()?;
    // A job's adapter name ends with its id (`ft:BASE:TENANT:SUFFIX:ID`).
    let job = state.jobs.get(adapter.rsplit(':').next()?)?;
    let own = job.tenant == caller.tenant && job.adapter.as_deref() == Some(adapter);
    Some((job, job.checkpoints.iter().find(|c| c.step == step)?)).filter(|_| own)
}
