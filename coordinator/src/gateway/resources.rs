//! What tenants keep in the cluster, over HTTP: files (training data, checked on upload),
//! fine-tuning jobs (OpenAI's shapes, with events and checkpoints), adapters (Tandem's own
//! routes: upload a PEFT or ESFT adapter, list, delete) and, for the operator, tenants' API
//! keys. Everything a tenant sees is in its namespace: another tenant's file, job or adapter is
//! not found, whatever its name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::adapter_source::{self, ADAPTER_FILES};
use super::limits::quota;
use super::openai::{Body, parse};
use super::staged::Staged;
use super::{ApiError, Caller, Gateway};
use tandem_proto::contract::{
    ApiKey, AutoHyperparams, BASE_LEARNING_RATE, ClusterState, Command, File, FileRef, Hyperparams, Job, JobSpec,
    JobStatus, MethodChoice, Reply, StepFigures, TenantLimits, check_name, check_tenant, dir_checksum, fresh_id,
    sha256_hex, to_hex, unix_now,
};

/// Largest training file accepted.
const MAX_FILE: usize = 256 << 20;
/// Largest adapter upload accepted (all its files together).
const MAX_ADAPTER: usize = 1 << 30;

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/admin/api-keys", post(create_key).get(list_keys))
        .route("/v1/admin/api-keys/{id}", axum::routing::delete(revoke_key))
        .route("/v1/admin/tenants/{tenant}/limits", get(tenant_limits).put(set_tenant_limits))
        .route("/v1/files", post(upload_file).layer(DefaultBodyLimit::max(MAX_FILE)).get(list_files))
        .route("/v1/files/{id}", get(file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/fine_tuning/jobs", post(create_job).get(list_jobs))
        .route("/v1/fine_tuning/jobs/{id}", get(job))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/fine_tuning/jobs/{id}/events", get(job_events))
        .route("/v1/fine_tuning/jobs/{id}/checkpoints", get(job_checkpoints))
        .route("/v1/adapters", post(upload_adapter).layer(DefaultBodyLimit::max(MAX_ADAPTER)).get(list_adapters))
        .route("/v1/adapters/{name}", axum::routing::delete(delete_adapter))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
}

fn ok(body: Value) -> Response {
    axum::Json(body).into_response()
}

/// A cursor page of a list (newest first where the list is): the items after the one named
/// `after`, at most `limit`.
#[derive(Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

impl Page {
    fn of(&self, items: Vec<Value>) -> Value {
        let start = match &self.after {
            Some(after) => items.iter().position(|v| v["id"] == after.as_str()).map_or(items.len(), |i| i + 1),
            None => 0,
        };
        let limit = self.limit.unwrap_or(20).clamp(1, 100);
        let data: Vec<Value> = items.iter().skip(start).take(limit).cloned().collect();
        let has_more = start + data.len() < items.len();
        json!({
            "object": "list", "data": data, "has_more": has_more,
            "first_id": data.first().map(|v| v["id"].clone()), "last_id": data.last().map(|v| v["id"].clone()),
        })
    }
}

/// What `tenant` may use (no limits unless the operator set some).
fn limits_of(state: &ClusterState, tenant: &str) -> TenantLimits {
    state.limits.get(tenant).cloned().unwrap_or_default()
}

fn bad_name(param: &'static str, what: &str, name: &str) -> Result<(), ApiError> {
    check_name(what, name).map_err(|e| ApiError::bad_request(param, e.0))
}

/// Runs blocking work (file checks, writes) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::unavailable(format!("a worker thread failed: {e}")))?
}

// --- API keys ---

async fn create_key(State(gw): State<Arc<Gateway>>, caller: Caller, Body(body): Body) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewKey {
        tenant: String,
        /// Seconds the key lasts; none: until revoked.
        #[serde(default)]
        expires_in: Option<u64>,
    }
    // The role before the body: a tenant learns nothing of what this route would accept.
    caller.must_be_operator("makes API keys")?;
    let NewKey { tenant, expires_in } = parse(&body)?;
    gw.create_key(&caller, &tenant, expires_in).await.map(ok)
}

async fn list_keys(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    Ok(ok(page.of(gw.list_keys(&caller).await?)))
}

async fn revoke_key(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    gw.revoke_key(&caller, &id).await.map(ok)
}

/// The `tenant.limits` object: every limit set, by name.
fn limits_object(tenant: &str, limits: &TenantLimits) -> Value {
    let mut object = json!(limits);
    object["object"] = json!("tenant.limits");
    object["tenant"] = json!(tenant);
    object
}

async fn tenant_limits(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(tenant): UrlPath<String>,
) -> Result<Response, ApiError> {
    caller.must_be_operator("reads tenants' limits")?;
    check_tenant(&tenant).map_err(|e| ApiError::bad_request("tenant", e.0))?;
    Ok(ok(limits_object(&tenant, &limits_of(&*gw.state().await?, &tenant))))
}

/// Sets what a tenant may use: the body is the whole set (a limit left out is lifted).
async fn set_tenant_limits(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(tenant): UrlPath<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    caller.must_be_operator("sets tenants' limits")?;
    check_tenant(&tenant).map_err(|e| ApiError::bad_request("tenant", e.0))?;
    let limits: TenantLimits = parse(&body)?;
    gw.propose("limits", Command::SetLimits { tenant: tenant.clone(), limits: limits.clone() }).await?;
    Ok(ok(limits_object(&tenant, &limits)))
}

/// The longest a key may be made to last: ten years.
const MAX_KEY_LIFETIME: u64 = 10 * 366 * 86_400;

/// The `api_key` object of the key whose SHA-256 is `hash` (never the key itself).
pub(super) fn key_object(hash: &str, k: &ApiKey) -> Value {
    json!({
        "object": "api_key", "id": ApiKey::id(hash), "tenant": k.tenant, "created_at": k.created_at,
        "expires_at": k.expires_at,
    })
}

impl Gateway {
    /// Makes an API key for `tenant` that lasts `expires_in` seconds, or until revoked (the
    /// operator only); the key is shown once.
    pub async fn create_key(&self, caller: &Caller, tenant: &str, expires_in: Option<u64>) -> Result<Value, ApiError> {
        caller.must_be_operator("makes API keys")?;
        check_tenant(tenant).map_err(|e| ApiError::bad_request("tenant", e.0))?;
        if let Some(s) = expires_in.filter(|s| !(1..=MAX_KEY_LIFETIME).contains(s)) {
            return Err(ApiError::bad_request("expires_in", format!("{s} is not 1 to {MAX_KEY_LIFETIME} seconds")));
        }
        let key = new_key().map_err(|e| ApiError::unavailable(format!("no randomness: {e}")))?;
        let key_sha256 = sha256_hex(key.as_bytes());
        let now = unix_now();
        let created = ApiKey { tenant: tenant.into(), created_at: now, expires_at: expires_in.map(|s| now + s) };
        let command = Command::CreateApiKey {
            tenant: tenant.into(),
            key_sha256: key_sha256.clone(),
            expires_at: created.expires_at,
        };
        self.propose("api-key", command).await?;
        let mut object = key_object(&key_sha256, &created);
        object["key"] = json!(key);
        Ok(object)
    }

    /// Every tenant's keys, by id and tenant, oldest first (the operator only).
    pub async fn list_keys(&self, caller: &Caller) -> Result<Vec<Value>, ApiError> {
        caller.must_be_operator("lists API keys")?;
        let state = self.state().await?;
        let mut keys: Vec<_> = state.api_keys.iter().collect();
        keys.sort_by(|a, b| (a.1.created_at, a.0).cmp(&(b.1.created_at, b.0)));
        Ok(keys.into_iter().map(|(hash, k)| key_object(hash, k)).collect())
    }

    /// Revokes the key `id` (the operator only): every gateway refuses it within a view
    /// refresh.
    pub async fn revoke_key(&self, caller: &Caller, id: &str) -> Result<Value, ApiError> {
        caller.must_be_operator("revokes API keys")?;
        let known = self.state().await?.api_keys.keys().any(|hash| ApiKey::id(hash) == id);
        if !known {
            return Err(ApiError::not_found("api_key_not_found", format!("no API key {id:?}")));
        }
        self.propose("revoke-api-key", Command::RevokeApiKey { id: id.into() }).await?;
        Ok(json!({"object": "api_key", "id": id, "deleted": true}))
    }
}

/// A key no one can guess: `tk-` and 24 random bytes, hex.
pub fn new_key() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("tk-{}", to_hex(&bytes)))
}

// --- files ---

fn file_object(id: &str, f: &File) -> Value {
    json!({
        "id": id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "filename": f.filename,
        "purpose": f.purpose, "status": "processed", "status_details": null, "expires_at": null,
    })
}

/// The caller's file `id` (another tenant's is not found).
fn own_file<'a>(state: &'a ClusterState, caller: &Caller, id: &str) -> Result<&'a File, ApiError> {
    match state.files.get(id) {
        Some(f) if f.tenant == caller.tenant => Ok(f),
        _ => Err(ApiError::not_found("file_not_found", format!("no file {id:?}"))),
    }
}

async fn upload_file(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let form = read_form(form, &gw.blobs).await?;
    let purpose = form.text("purpose")?;
    if purpose != "fine-tune" {
        return Err(ApiError::bad_request("purpose", format!("purpose must be \"fine-tune\", got {purpose:?}")));
    }
    let Ok([(filename, staged)]) = <[_; 1]>::try_from(form.files) else {
        return Err(ApiError::bad_request("file", "send exactly one file (the form field `file`)"));
    };
    gw.upload_file(&caller, &filename, staged).await.map(ok)
}

impl Gateway {
    /// Checks a training file (on disk already) and stores it in the caller's namespace.
    pub async fn upload_file(&self, caller: &Caller, filename: &str, mut staged: Staged) -> Result<Value, ApiError> {
        let state = self.state().await?;
        let held = state.files.values().filter(|f| f.tenant == caller.tenant).count();
        quota("training files", held, limits_of(&state, &caller.tenant).max_files)?;
        staged.finish().await?;
        let (checks, at, name) = (self.checks.clone(), staged.path().to_path_buf(), filename.to_string());
        let examples = blocking(move || {
            checks.training_file(&at).map_err(|e| ApiError::bad_request("file", format!("{name}: {e}")))
        })
        .await?;
        let id = fresh_id("file");
        let path = self.blobs.join("files").join(format!("{id}.jsonl"));
        let bytes = staged.len();
        staged.persist(&path).await?;
        let file = File {
            tenant: caller.tenant.clone(),
            filename: Path::new(filename).file_name().map_or("upload".into(), |n| n.to_string_lossy().into_owned()),
            bytes,
            purpose: "fine-tune".into(),
            examples,
            created_at: unix_now(),
            uri: path.to_string_lossy().into_owned(),
        };
        let object = file_object(&id, &file);
        self.propose("file", Command::PutFile { id, file }).await?;
        Ok(object)
    }
}

async fn list_files(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let state = gw.state().await?;
    let mut files: Vec<(&String, &File)> = state.files.iter().filter(|(_, f)| f.tenant == caller.tenant).collect();
    files.sort_by_key(|(id, f)| std::cmp::Reverse((f.created_at, *id)));
    Ok(ok(page.of(files.into_iter().map(|(id, f)| file_object(id, f)).collect())))
}

async fn file(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let state = gw.state().await?;
    Ok(ok(file_object(&id, own_file(&state, &caller, &id)?)))
}

async fn file_content(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let state = gw.state().await?;
    let path = PathBuf::from(&own_file(&state, &caller, &id)?.uri);
    let file = tokio::fs::File::open(&path).await.map_err(|e| ApiError::storage(&path, e))?;
    // Sent as it is read, 64 KiB at a time: a file is never held in memory whole.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut file = file;
        loop {
            let mut chunk = vec![0u8; 64 << 10];
            match file.read(&mut chunk).await {
                Ok(0) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.send(Ok(chunk)).await.is_err() {
                        return; // the client went away
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

async fn delete_file(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    own_file(&*gw.state().await?, &caller, &id)?;
    gw.propose("delete-file", Command::DeleteFile { tenant: caller.tenant, id: id.clone() }).await?;
    // The bytes stay: a job that was given the file may still be reading it.
    Ok(ok(json!({"id": id, "object": "file", "deleted": true})))
}

/// A multipart form: its text fields, and its files (name as sent) written to disk as they
/// arrived.
struct Form {
    texts: Vec<(String, String)>,
    files: Vec<(String, Staged)>,
}

impl Form {
    fn text(&self, name: &'static str) -> Result<String, ApiError> {
        (self.texts.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()))
            .ok_or_else(|| ApiError::bad_request(name, format!("the form field `{name}` is missing")))
    }
}

/// Reads a form, each file into a [`Staged`] file under `blobs` chunk by chunk (the route's
/// body limit stops an upload past its cap while it streams).
async fn read_form(
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
    blobs: &Path,
) -> Result<Form, ApiError> {
    let multipart_error = |status: StatusCode, msg: String| {
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "invalid_request_error" };
        ApiError::new(status, code, msg)
    };
    let mut form = form.map_err(|e| multipart_error(e.status(), e.body_text()))?;
    let mut out = Form { texts: Vec::new(), files: Vec::new() };
    while let Some(mut field) = form.next_field().await.map_err(|e| multipart_error(e.status(), e.body_text()))? {
        let name = field.name().unwrap_or_default().to_string();
        match field.file_name().map(str::to_string) {
            Some(file_name) => {
                let mut staged = Staged::create(blobs).await?;
                while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e.status(), e.body_text()))? {
                    staged.write(&chunk).await?;
                }
                out.files.push((file_name, staged));
            }
            None => {
                let text = field.text().await.map_err(|e| multipart_error(e.status(), e.body_text()))?;
                out.texts.push((name, text));
            }
        }
    }
    Ok(out)
}

// --- fine-tuning jobs ---

/// A hyperparameter given as a number or "auto" (the default), or left out (the default).
/// A hyperparameter as asked: a number, or none for "auto" (and when not given).
fn auto<T: serde::de::DeserializeOwned>(v: &Option<Value>, param: &'static str) -> Result<Option<T>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| ApiError::bad_request(param, format!("{param}: expected \"auto\" or a number, got {v}"))),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Hyperparameters {
    n_epochs: Option<Value>,
    batch_size: Option<Value>,
    learning_rate_multiplier: Option<Value>,
    /// Tandem's: the LoRA rank and alpha, and how often to checkpoint (optimizer steps).
    lora_rank: Option<u32>,
    lora_alpha: Option<f64>,
    checkpoint_every: Option<u64>,
}

#[derive(Deserialize)]
struct Method {
    #[serde(rename = "type")]
    kind: String,
    supervised: Option<MethodParams>,
    /// Tandem's: ESFT on an MoE base (experts chosen from the data).
    esft: Option<MethodParams>,
}

#[derive(Deserialize, Default)]
struct MethodParams {
    #[serde(default)]
    hyperparameters: Hyperparameters,
    /// ESFT: train the experts that get this share of a layer's routed tokens.
    threshold: Option<f64>,
}

#[derive(Deserialize)]
struct CreateJob {
    model: String,
    training_file: String,
    validation_file: Option<String>,
    #[serde(default)]
    hyperparameters: Hyperparameters,
    suffix: Option<String>,
    seed: Option<u64>,
    method: Option<Method>,
}

async fn create_job(State(gw): State<Arc<Gateway>>, caller: Caller, Body(body): Body) -> Result<Response, ApiError> {
    gw.create_job(&caller, &body).await.map(ok)
}

impl Gateway {
    /// Creates a fine-tuning job from OpenAI's request body; it is recorded before this returns.
    pub async fn create_job(&self, caller: &Caller, body: &[u8]) -> Result<Value, ApiError> {
        let req: CreateJob = parse(body)?;
        let state = self.state().await?;
        if !state.models.contains_key(&req.model) {
            return Err(ApiError::model_not_found(&req.model));
        }
        let file = |param: &'static str, id: &str| match state.files.get(id) {
            Some(f) if f.tenant == caller.tenant => Ok(FileRef { id: id.to_string(), uri: f.uri.clone() }),
            _ => Err(ApiError::bad_request(param, format!("no file {id:?} among yours"))),
        };
        let training_file = file("training_file", &req.training_file)?;
        let open = state.jobs.values().filter(|j| j.tenant == caller.tenant && !j.status.is_final()).count();
        quota("fine-tuning jobs queued or running", open, limits_of(&state, &caller.tenant).concurrent_jobs)?;
        let validation_file = req.validation_file.as_deref().map(|id| file("validation_file", id)).transpose()?;
        let suffix = req.suffix.clone().unwrap_or_default();
        if !suffix.is_empty() {
            bad_name("suffix", "suffix", &suffix)?;
            if suffix.len() > 64 || suffix.contains(':') {
                return Err(ApiError::bad_request("suffix", "suffix: at most 64 bytes, no `:`"));
            }
        }
        // The method, and where its hyperparameters are: OpenAI's `method.supervised`,
        // Tandem's `method.esft` (with the share of routed tokens that picks the experts), or
        // the top-level `hyperparameters`.
        let (params, esft_threshold) = match &req.method {
            None => (None, None),
            Some(m) => match m.kind.as_str() {
                "supervised" => (m.supervised.as_ref(), None),
                "esft" => (m.esft.as_ref(), Some(m.esft.as_ref().and_then(|p| p.threshold).unwrap_or(0.2))),
                other => {
                    let msg = format!("method {other:?}: supported are supervised and esft");
                    return Err(ApiError::bad_request("method", msg));
                }
            },
        };
        let hyper = params.map_or(&req.hyperparameters, |p| &p.hyperparameters);
        let epochs: Option<u32> = auto(&hyper.n_epochs, "hyperparameters.n_epochs")?;
        let batch_size: Option<u32> = auto(&hyper.batch_size, "hyperparameters.batch_size")?;
        let multiplier: Option<f64> =
            auto(&hyper.learning_rate_multiplier, "hyperparameters.learning_rate_multiplier")?;
        if epochs.is_some_and(|e| !(1..=100).contains(&e)) {
            return Err(ApiError::bad_request("hyperparameters.n_epochs", "n_epochs must be 1 to 100"));
        }
        if batch_size.is_some_and(|b| !(1..=512).contains(&b)) {
            return Err(ApiError::bad_request("hyperparameters.batch_size", "batch_size must be 1 to 512"));
        }
        if multiplier.is_some_and(|m| !(m.is_finite() && m > 0.0 && m <= 100.0)) {
            return Err(ApiError::bad_request("hyperparameters.learning_rate_multiplier", "must be in (0, 100]"));
        }
        let rank = hyper.lora_rank.unwrap_or(16);
        if !(1..=256).contains(&rank) {
            return Err(ApiError::bad_request("hyperparameters.lora_rank", "lora_rank must be 1 to 256"));
        }
        let method = match esft_threshold {
            Some(threshold) => MethodChoice::Esft { experts: None, threshold: threshold as f32 },
            None => {
                let alpha = hyper.lora_alpha.unwrap_or(2.0 * f64::from(rank));
                MethodChoice::Lora {
                    rank: rank as usize,
                    alpha: alpha as f32,
                    targets: vec!["all-linear".into()],
                    rslora: false,
                }
            }
        };
        let id = fresh_id("ftjob");
        let adapter = format!("ft:{}:{}:{suffix}:{id}", req.model, caller.tenant);
        // What is left "auto" keeps the defaults here until the worker resolves it.
        let defaults = Hyperparams::default();
        let batch = batch_size.map_or(defaults.batch_size, |b| b as usize);
        let spec = JobSpec {
            base_model: req.model.clone(),
            method,
            hyper: Hyperparams {
                epochs: epochs.map_or(defaults.epochs, |e| e as usize),
                batch_size: batch,
                micro_batch_size: batch,
                lr: (BASE_LEARNING_RATE * multiplier.unwrap_or(1.0)) as f32,
                seed: req.seed.unwrap_or(0),
                ..defaults
            },
            training_file,
            validation_file,
            checkpoint_every: hyper.checkpoint_every.unwrap_or(100),
            suffix: req.suffix.clone(),
            learning_rate_multiplier: multiplier.unwrap_or(1.0),
            auto: AutoHyperparams {
                n_epochs: epochs.is_none(),
                batch_size: batch_size.is_none(),
                learning_rate_multiplier: multiplier.is_none(),
            },
        };
        let command =
            Command::SubmitJob { id: id.clone(), tenant: caller.tenant.clone(), spec, adapter: Some(adapter) };
        self.propose("submit", command).await?;
        let state = self.state().await?;
        let job =
            state.jobs.get(&id).ok_or_else(|| ApiError::unavailable("the job was recorded but cannot be read"))?;
        Ok(job_object(&id, job))
    }
}

/// OpenAI's status name.
pub(super) fn status_name(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Queued | JobStatus::Placed => "queued",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    }
}

fn job_object(id: &str, job: &Job) -> Value {
    let spec = &job.spec;
    let steps_done = job.events.iter().filter_map(|e| e.step.as_ref()).next_back().map(|s| s.step);
    // What the attempt trains with once it started; until then, as asked ("auto" where left).
    let (asked, plan) = (spec.auto, job.plan.as_ref());
    let shown = |auto: bool, resolved: Option<Value>, asked_for: Value| match resolved {
        Some(v) => v,
        None if auto => json!("auto"),
        None => asked_for,
    };
    json!({
        "object": "fine_tuning.job",
        "id": id,
        "model": spec.base_model,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "fine_tuned_model": if job.status == JobStatus::Succeeded { json!(job.adapter) } else { Value::Null },
        "organization_id": job.tenant,
        "status": status_name(job.status),
        "hyperparameters": {
            "n_epochs": shown(asked.n_epochs, plan.map(|p| json!(p.n_epochs)), json!(spec.hyper.epochs)),
            "batch_size": shown(asked.batch_size, plan.map(|p| json!(p.batch_size)), json!(spec.hyper.batch_size)),
            "learning_rate_multiplier": shown(
                asked.learning_rate_multiplier,
                plan.map(|p| json!(p.learning_rate_multiplier)),
                json!(spec.learning_rate_multiplier),
            ),
        },
        "training_file": spec.training_file.id,
        "validation_file": spec.validation_file.as_ref().map(|f| &f.id),
        "result_files": [],
        "trained_tokens": (job.trained_steps > 0).then_some(job.trained_tokens),
        "steps_done": steps_done,
        "total_steps": plan.map(|p| p.total_steps),
        "error": job.error.as_ref().map(|m| json!({"code": "training_failed", "message": m, "param": null})),
        "seed": spec.hyper.seed,
        "suffix": spec.suffix,
        "estimated_finish": estimated_finish(job),
        "integrations": [],
        "method": {"type": spec.method.openai_name()},
        "attempts": job.attempts.len(),
    })
}

/// When a running job should finish (Unix seconds), at the pace of its latest run of steps
/// (those after its last resume); none before two of them are known.
fn estimated_finish(job: &Job) -> Option<u64> {
    if job.status != JobStatus::Running {
        return None;
    }
    let steps: Vec<(u64, &StepFigures)> = job.events.iter().filter_map(|e| Some((e.at, e.step.as_ref()?))).collect();
    let (&(last_at, last), rest) = steps.split_last()?;
    // Back to where the step numbers last went down (a resume from a checkpoint).
    let run = rest.iter().rev().take_while(|(_, s)| s.step < last.step).count();
    let &(first_at, first) = rest.get(rest.len().checked_sub(run).filter(|_| run > 0)?)?;
    let pace = last_at.saturating_sub(first_at) as f64 / (last.step - first.step) as f64;
    let left = last.total_steps.saturating_sub(last.step) as f64;
    Some(last_at + (pace * left).ceil() as u64)
}

/// Job `id` if it is the caller's (another tenant's is not found); the operator may reach any tenant's job by its id (to cancel
/// it from the dashboard), though its own list shows only its own.
fn own_job<'a>(state: &'a ClusterState, caller: &Caller, id: &str) -> Result<&'a Job, ApiError> {
    match state.jobs.get(id) {
        Some(j) if caller.admin || j.tenant == caller.tenant => Ok(j),
        _ => Err(ApiError::not_found("job_not_found", format!("no fine-tuning job {id:?}"))),
    }
}

async fn list_jobs(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    Ok(ok(page.of(gw.jobs(&caller).await?)))
}

impl Gateway {
    /// The caller's jobs, newest first.
    pub async fn jobs(&self, caller: &Caller) -> Result<Vec<Value>, ApiError> {
        let state = self.state().await?;
        let mut jobs: Vec<(&String, &Job)> = state.jobs.iter().filter(|(_, j)| j.tenant == caller.tenant).collect();
        jobs.sort_by_key(|(id, j)| std::cmp::Reverse((j.created_at, *id)));
        Ok(jobs.into_iter().map(|(id, j)| job_object(id, j)).collect())
    }

    pub async fn job(&self, caller: &Caller, id: &str) -> Result<Value, ApiError> {
        Ok(job_object(id, own_job(&*self.state().await?, caller, id)?))
    }

    pub async fn cancel_job(&self, caller: &Caller, id: &str) -> Result<Value, ApiError> {
        let state = self.state().await?;
        let job = own_job(&state, caller, id)?;
        if job.status.is_final() {
            let msg = format!("job {id:?} is {} already", status_name(job.status));
            return Err(ApiError::new(StatusCode::CONFLICT, "job_finished", msg));
        }
        self.propose("cancel", Command::CancelJob { id: id.into() }).await?;
        self.job(caller, id).await
    }

    /// The job's events, newest first: status changes and each optimizer step's figures.
    pub async fn job_events(&self, caller: &Caller, id: &str) -> Result<Vec<Value>, ApiError> {
        let state = self.state().await?;
        let job = own_job(&state, caller, id)?;
        let events = job.events.iter().enumerate().rev().map(|(i, e)| {
            let (kind, data) = match (&e.step, e.validation) {
                (Some(s), _) => (
                    "metrics",
                    json!({
                        "step": s.step, "total_steps": s.total_steps, "train_loss": s.loss,
                        "tokens_per_s": s.tokens_per_s,
                    }),
                ),
                (None, Some((step, loss))) => ("metrics", json!({"step": step, "valid_loss": loss})),
                (None, None) => ("message", json!({})),
            };
            json!({
                "object": "fine_tuning.job.event", "id": format!("ftevent-{id}-{i}"), "created_at": e.at,
                "level": "info", "message": e.message, "type": kind, "data": data,
            })
        });
        Ok(events.collect())
    }

    /// The job's checkpoints, newest first.
    pub async fn job_checkpoints(&self, caller: &Caller, id: &str) -> Result<Vec<Value>, ApiError> {
        let state = self.state().await?;
        let job = own_job(&state, caller, id)?;
        let adapter = job.adapter.clone().unwrap_or_default();
        let loss_at =
            |step: u64| job.events.iter().filter_map(|e| e.step.as_ref()).find(|s| s.step == step).map(|s| s.loss);
        let checkpoints = job.checkpoints.iter().rev().map(|c| {
            json!({
                "object": "fine_tuning.job.checkpoint", "id": format!("ftckpt-{id}-{}", c.step),
                "created_at": if c.at > 0 { c.at } else { job.created_at }, "fine_tuned_model_checkpoint": format!("{adapter}:ckpt-step-{}", c.step),
                "step_number": c.step, "metrics": {"step": c.step, "train_loss": loss_at(c.step)},
                "fine_tuning_job_id": id,
            })
        });
        Ok(checkpoints.collect())
    }
}

async fn job(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    gw.job(&caller, &id).await.map(ok)
}

async fn cancel_job(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    gw.cancel_job(&caller, &id).await.map(ok)
}

async fn job_events(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    Ok(ok(page.of(gw.job_events(&caller, &id).await?)))
}

async fn job_checkpoints(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    Ok(ok(page.of(gw.job_checkpoints(&caller, &id).await?)))
}

// --- adapters ---

fn adapter_object(tenant: &str, name: &str, v: &tandem_proto::contract::AdapterVersion) -> Value {
    json!({
        "object": "adapter", "id": name, "owned_by": tenant, "version": v.version, "base_model": v.base_model,
        "checksum": v.checksum,
    })
}

async fn upload_adapter(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let form = read_form(form, &gw.blobs).await?;
    let (name, base) = (form.text("name")?, form.text("base_model")?);
    gw.put_adapter(&caller, &name, &base, form.files).await.map(ok)
}

impl Gateway {
    /// Stores an uploaded adapter (its files: `adapter_config.json` and
    /// `adapter_model.safetensors` for PEFT LoRA, `esft_config.json` and
    /// `esft_model.safetensors` for ESFT), checks it against its base model, and records it as
    /// the next version of `name` in the caller's namespace.
    pub async fn put_adapter(
        &self,
        caller: &Caller,
        name: &str,
        base: &str,
        files: Vec<(String, Staged)>,
    ) -> Result<Value, ApiError> {
        bad_name("name", "adapter", name)?;
        let state = self.state().await?;
        let held = state.adapters.get(&caller.tenant).filter(|a| !a.contains_key(name)).map_or(0, |a| a.len());
        quota("adapters", held, limits_of(&state, &caller.tenant).max_adapters)?;
        let model = state.models.get(base).ok_or_else(|| ApiError::model_not_found(base))?.uri.clone();
        let known = ADAPTER_FILES.join(", ");
        if let Some((f, _)) = files.iter().find(|(f, _)| !ADAPTER_FILES.contains(&f.as_str())) {
            return Err(ApiError::bad_request("file", format!("unexpected file {f:?}: expected {known}")));
        }
        if files.is_empty() {
            return Err(ApiError::bad_request("file", format!("no files: send the adapter's {known}")));
        }
        let dir = self.blobs.join("adapters").join(&caller.tenant).join(name).join(fresh_id("v"));
        let persisted = async {
            for (f, staged) in files {
                staged.persist(&dir.join(f)).await?;
            }
            Ok::<_, ApiError>(())
        };
        if let Err(e) = persisted.await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        let checks = self.checks.clone();
        let folder = dir.clone();
        let checksum = blocking(move || {
            if let Err(e) = checks.adapter(&folder, &model) {
                let _ = std::fs::remove_dir_all(&folder);
                return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_adapter", e.0));
            }
            dir_checksum(&folder).map_err(|e| ApiError::storage(&folder, e))
        })
        .await?;
        let command = Command::PutAdapter {
            tenant: caller.tenant.clone(),
            name: name.into(),
            base_model: base.into(),
            checksum,
            uri: dir.to_string_lossy().into_owned(),
        };
        let Reply::Version { version } = self.propose("adapter", command).await? else {
            return Err(ApiError::unavailable("the adapter was not recorded"));
        };
        let state = self.state().await?;
        let v = state
            .adapters
            .get(&caller.tenant)
            .and_then(|a| a.get(name))
            .and_then(|v| v.iter().find(|v| v.version == version));
        v.map(|v| adapter_object(&caller.tenant, name, v))
            .ok_or_else(|| ApiError::unavailable("the adapter cannot be read back"))
    }

    pub async fn adapters(&self, caller: &Caller) -> Result<Vec<Value>, ApiError> {
        let state = self.state().await?;
        let own = state.adapters.get(&caller.tenant).into_iter().flatten();
        Ok(own.filter_map(|(name, versions)| Some(adapter_object(&caller.tenant, name, versions.last()?))).collect())
    }

    pub async fn delete_adapter(&self, caller: &Caller, name: &str) -> Result<Value, ApiError> {
        let state = self.state().await?;
        if !state.adapters.get(&caller.tenant).is_some_and(|a| a.contains_key(name)) {
            return Err(ApiError::model_not_found(name));
        }
        self.propose("delete-adapter", Command::DeleteAdapter { tenant: caller.tenant.clone(), name: name.into() })
            .await?;
        Ok(json!({"id": name, "object": "adapter", "deleted": true}))
    }
}

/// vLLM's body for loading an adapter from a path or URL; `base_model` (Tandem's) may be left
/// out where the cluster serves one model.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadLora {
    lora_name: String,
    lora_path: String,
    base_model: Option<String>,
    /// vLLM's: replacing a loaded adapter in place is what every load does here (a new version).
    #[serde(default, rename = "load_inplace")]
    _load_inplace: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadLora {
    lora_name: String,
    /// vLLM's; the name is enough.
    #[serde(default, rename = "lora_int_id")]
    _lora_int_id: Option<i64>,
}

/// vLLM's route: the adapter at `lora_path` becomes the caller's `lora_name`, a new version of
/// it if it exists (requests running on the old one finish on it).
async fn load_lora_adapter(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: LoadLora = parse(&body)?;
    let base = match req.base_model {
        Some(base) => base,
        None => {
            let state = gw.state().await?;
            let mut models = state.models.keys();
            match (models.next(), models.next()) {
                (Some(only), None) => only.clone(),
                _ => {
                    let msg = "give base_model: the cluster serves more than one model (or none)";
                    return Err(ApiError::bad_request("base_model", msg));
                }
            }
        }
    };
    gw.load_adapter(&caller, &req.lora_name, &base, &req.lora_path, "lora_path").await.map(ok)
}

/// vLLM's route: removes the caller's adapter (every version).
async fn unload_lora_adapter(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: UnloadLora = parse(&body)?;
    gw.delete_adapter(&caller, &req.lora_name).await.map(ok)
}

impl Gateway {
    /// Reads the adapter at `source` ([`adapter_source`]) and records it as the next version of
    /// the caller's `name`; `param` names the source's field in errors.
    pub async fn load_adapter(
        &self,
        caller: &Caller,
        name: &str,
        base: &str,
        source: &str,
        param: &str,
    ) -> Result<Value, ApiError> {
        bad_name("name", "adapter", name)?;
        let files = adapter_source::fetch(source, caller, &self.blobs, MAX_ADAPTER as u64, param).await?;
        self.put_adapter(caller, name, base, files).await
    }
}

async fn list_adapters(State(gw): State<Arc<Gateway>>, caller: Caller) -> Result<Response, ApiError> {
    Ok(ok(json!({"object": "list", "data": gw.adapters(&caller).await?})))
}

async fn delete_adapter(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, ApiError> {
    gw.delete_adapter(&caller, &name).await.map(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::contract::JobEvent;

    fn job(steps: &[(u64, u64)]) -> Job {
        let file = FileRef { id: "f".into(), uri: "/f".into() };
        let events = (steps.iter())
            .map(|&(at, step)| {
                let figures = StepFigures { step, total_steps: 100, loss: 1.0, tokens_per_s: 1.0, tokens: 1 };
                JobEvent { step: Some(figures), ..JobEvent::new(at, "step") }
            })
            .collect();
        Job {
            tenant: "t".into(),
            adapter: None,
            created_at: 0,
            finished_at: None,
            spec: JobSpec::new("m", MethodChoice::lora(4), file),
            status: JobStatus::Running,
            epoch: 1,
            attempts: Vec::new(),
            checkpoint: None,
            error: None,
            checkpoints: Vec::new(),
            events,
            plan: None,
            trained_tokens: 0,
            trained_steps: 0,
        }
    }

    #[test]
    fn the_finish_is_estimated_at_the_pace_of_the_steps_since_the_last_resume() {
        assert_eq!(estimated_finish(&job(&[])), None);
        assert_eq!(estimated_finish(&job(&[(1000, 10)])), None);
        // 2 s a step: 80 steps left.
        assert_eq!(estimated_finish(&job(&[(1000, 10), (1020, 20)])), Some(1180));
        // Resumed at step 11 after step 30 (slower then): only the new run's pace counts.
        assert_eq!(estimated_finish(&job(&[(1000, 10), (1010, 30), (2000, 11)])), None);
        assert_eq!(estimated_finish(&job(&[(1000, 10), (1010, 30), (2000, 11), (2009, 20)])), Some(2089));
        let done = Job { status: JobStatus::Succeeded, ..job(&[(1000, 10), (1020, 20)]) };
        assert_eq!(estimated_finish(&done), None);
    }
}
