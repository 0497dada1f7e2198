//! The gateway's operations over gRPC (`tandem.v1.Api`), for programmatic clients and the
//! `tandem` CLI: the same calls as the HTTP routes, with the same JSON objects in the replies,
//! on the coordinator's gRPC address. A call is authenticated like an HTTP request, from its
//! `authorization: Bearer KEY` metadata; a gateway error becomes the gRPC status its HTTP
//! status stands for, with the same message.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;
use tandem_proto::v1::api_server::{Api, ApiServer};
use tandem_proto::v1::{
    ApiList, ApiObject, CreateJobRequest, CreateKeyRequest, DeleteAdapterRequest, JobRequest, JobUpdate,
    ListAdaptersRequest, ListJobsRequest, ListKeysRequest, PutAdapterRequest, RevokeKeyRequest, UploadFileRequest,
};
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::staged::Staged;
use super::{ApiError, Caller, Gateway};

/// Largest request the service decodes: a training file or an adapter, whole.
pub const MAX_API_MESSAGE: usize = 256 << 20;
/// How often `WatchJob` reads the job.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// Reads in a row that may find the cluster unavailable before a watch gives up (a leader
/// change takes a few seconds; a watch should outlive it).
const WATCH_PATIENCE: u32 = 40;
/// Statuses that end a job.
const FINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// The `tandem.v1.Api` service over a gateway.
pub struct ApiService {
    gateway: Arc<Gateway>,
}

/// The service, ready to add to a tonic server (uploads travel whole in one message).
pub fn api_server(gateway: Arc<Gateway>) -> ApiServer<ApiService> {
    ApiServer::new(ApiService { gateway }).max_decoding_message_size(MAX_API_MESSAGE)
}

/// The gRPC status a gateway error stands for, by its HTTP status; the message is kept.
pub(crate) fn to_status(e: ApiError) -> Status {
    let code = match e.status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => tonic::Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
        StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
        StatusCode::NOT_FOUND => tonic::Code::NotFound,
        StatusCode::CONFLICT => tonic::Code::FailedPrecondition,
        StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::OutOfRange,
        StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
        _ => tonic::Code::Internal,
    };
    Status::new(code, e.message)
}

/// The caller a request's metadata names (`authorization: Bearer KEY`), checked as the HTTP
/// gateway checks its header.
pub(crate) async fn caller(gateway: &Gateway, metadata: &MetadataMap) -> Result<Caller, Status> {
    gateway.authenticate(&metadata.clone().into_headers()).await.map_err(to_status)
}

fn object(v: Result<Value, ApiError>) -> Result<Response<ApiObject>, Status> {
    Ok(Response::new(ApiObject { json: v.map_err(to_status)?.to_string() }))
}

fn list(v: Result<Vec<Value>, ApiError>) -> Result<Response<ApiList>, Status> {
    Ok(Response::new(ApiList { json: v.map_err(to_status)?.iter().map(Value::to_string).collect() }))
}

type Updates = Pin<Box<dyn tokio_stream::Stream<Item = Result<JobUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Api for ApiService {
    async fn create_key(&self, req: Request<CreateKeyRequest>) -> Result<Response<ApiObject>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        let CreateKeyRequest { tenant, expires_in } = req.get_ref();
        object(self.gateway.create_key(&caller, tenant, *expires_in).await)
    }

    async fn list_keys(&self, req: Request<ListKeysRequest>) -> Result<Response<ApiList>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        list(self.gateway.list_keys(&caller).await)
    }

    async fn revoke_key(&self, req: Request<RevokeKeyRequest>) -> Result<Response<ApiObject>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        object(self.gateway.revoke_key(&caller, &req.get_ref().id).await)
    }

    async fn upload_file(&self, req: Request<UploadFileRequest>) -> Result<Response<ApiObject>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        let UploadFileRequest { filename, content } = req.into_inner();
        let upload = async {
            let staged = Staged::of(&self.gateway.blobs, &content).await?;
            self.gateway.upload_file(&caller, &filename, staged).await
        };
        object(upload.await)
    }

    async fn create_job(&self, req: Request<CreateJobRequest>) -> Result<Response<ApiObject>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        object(self.gateway.create_job(&caller, req.get_ref().request_json.as_bytes()).await)
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<ApiList>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        list(self.gateway.jobs(&caller).await)
    }

    async fn get_job(&self, req: Request<JobRequest>) -> Result<Response<ApiObject>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        object(self.gateway.job(&caller, &req.get_ref().id).await)
    }

    async fn cancel_job(&self, req: Request<JobRequest>) -> Result<Response<ApiObject>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        object(self.gateway.cancel_job(&caller, &req.get_ref().id).await)
    }

    async fn job_events(&self, req: Request<JobRequest>) -> Result<Response<ApiList>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        list(self.gateway.job_events(&caller, &req.get_ref().id).await)
    }

    async fn job_checkpoints(&self, req: Request<JobRequest>) -> Result<Response<ApiList>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        list(self.gateway.job_checkpoints(&caller, &req.get_ref().id).await)
    }

    type WatchJobStream = Updates;

    async fn watch_job(&self, req: Request<JobRequest>) -> Result<Response<Updates>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        let id = req.into_inner().id;
        // An unknown job is an error status, not an empty stream.
        self.gateway.job(&caller, &id).await.map_err(to_status)?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(watch(self.gateway.clone(), caller, id, tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_adapters(&self, req: Request<ListAdaptersRequest>) -> Result<Response<ApiList>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        list(self.gateway.adapters(&caller).await)
    }

    async fn put_adapter(&self, req: Request<PutAdapterRequest>) -> Result<Response<ApiObject>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        let PutAdapterRequest { name, base_model, files, source } = req.into_inner();
        if !source.is_empty() {
            if !files.is_empty() {
                return Err(Status::invalid_argument("give the adapter's files or its source, not both"));
            }
            return object(self.gateway.load_adapter(&caller, &name, &base_model, &source, "source").await);
        }
        let upload = async {
            let mut staged = Vec::new();
            for f in files {
                staged.push((f.name, Staged::of(&self.gateway.blobs, &f.content).await?));
            }
            self.gateway.put_adapter(&caller, &name, &base_model, staged).await
        };
        object(upload.await)
    }

    async fn delete_adapter(&self, req: Request<DeleteAdapterRequest>) -> Result<Response<ApiObject>, Status> {
        let caller = caller(&self.gateway, req.metadata()).await?;
        object(self.gateway.delete_adapter(&caller, &req.get_ref().name).await)
    }
}

/// Sends `id`'s updates to `tx` until the job is final, the client goes away, or the cluster
/// stays unavailable too long.
async fn watch(gateway: Arc<Gateway>, caller: Caller, id: String, tx: mpsc::Sender<Result<JobUpdate, Status>>) {
    let mut last_job = Value::Null;
    let mut last_event: Option<Value> = None;
    let mut unavailable = 0;
    loop {
        // The job first, then its events: the events are then at least as new as the job, so
        // the update that shows a final status carries the events that led to it.
        let read =
            async { Ok::<_, ApiError>((gateway.job(&caller, &id).await?, gateway.job_events(&caller, &id).await?)) };
        let (job, events) = match read.await {
            Ok(r) => r,
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE && unavailable < WATCH_PATIENCE => {
                unavailable += 1;
                tokio::time::sleep(WATCH_EVERY).await;
                continue;
            }
            Err(e) => {
                let _ = tx.send(Err(to_status(e))).await;
                return;
            }
        };
        unavailable = 0;
        let fresh = new_events(events, last_event.as_ref());
        if job != last_job || !fresh.is_empty() {
            last_event = fresh.last().cloned().or(last_event);
            let update =
                JobUpdate { job_json: job.to_string(), events_json: fresh.iter().map(Value::to_string).collect() };
            if tx.send(Ok(update)).await.is_err() {
                return; // the client went away
            }
            last_job = job;
        }
        if last_job["status"].as_str().is_some_and(|s| FINAL.contains(&s)) {
            return;
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// The events (given newest first) after `last`, oldest first. Events are matched by content,
/// not id: an event's id is its position, which shifts when the oldest step events give way.
fn new_events(mut events: Vec<Value>, last: Option<&Value>) -> Vec<Value> {
    events.reverse();
    let Some(last) = last else { return events };
    match events.iter().rposition(|e| same_event(e, last)) {
        Some(i) => events.split_off(i + 1),
        // Not there any more (hardly possible: it was the newest): the newest one only, rather
        // than everything again.
        None => events.split_off(events.len().saturating_sub(1)),
    }
}

fn same_event(a: &Value, b: &Value) -> bool {
    ["created_at", "message", "type", "data"].iter().all(|k| a[k] == b[k])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(i: u64, message: &str) -> Value {
        json!({"id": format!("ftevent-j-{i}"), "created_at": i, "message": message, "type": "message", "data": {}})
    }

    #[test]
    fn new_events_are_those_after_the_last_one_sent_oldest_first() {
        let newest_first = vec![event(3, "c"), event(2, "b"), event(1, "a")];
        assert_eq!(new_events(newest_first.clone(), None).len(), 3);
        let after_a = new_events(newest_first.clone(), Some(&event(1, "a")));
        assert_eq!(after_a, vec![event(2, "b"), event(3, "c")]);
        assert!(new_events(newest_first.clone(), Some(&event(3, "c"))).is_empty());
        // Ids shift when old events give way; the content still matches.
        let mut shifted = event(2, "b");
        shifted["id"] = json!("ftevent-j-0");
        assert_eq!(new_events(newest_first, Some(&shifted)), vec![event(3, "c")]);
    }

    #[test]
    fn gateway_errors_keep_their_meaning_and_message() {
        let e = ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "the API key is not valid");
        let s = to_status(e);
        assert_eq!((s.code(), s.message()), (tonic::Code::Unauthenticated, "the API key is not valid"));
        assert_eq!(to_status(ApiError::bad_request("x", "bad")).code(), tonic::Code::InvalidArgument);
        assert_eq!(to_status(ApiError::unavailable("down")).code(), tonic::Code::Unavailable);
        let conflict = ApiError::new(StatusCode::CONFLICT, "job_finished", "done");
        assert_eq!(to_status(conflict).code(), tonic::Code::FailedPrecondition);
        let teapot = ApiError::new(StatusCode::IM_A_TEAPOT, "x", "y");
        assert_eq!(to_status(teapot).code(), tonic::Code::Internal);
    }
}
