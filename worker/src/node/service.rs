//! The gRPC `Worker` service: the gateway's completions go to whatever engine the worker
//! serves now, and their events stream back.

use tandem_proto::Role;
use tandem_proto::tls::Caller;
use tandem_proto::v1::worker_server::{Worker, WorkerServer};
use tandem_proto::v1::{GenerateEvent, GenerateRequest};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use super::engine_thread::Serving;

/// The gRPC `Worker` service over an engine thread.
pub struct WorkerService {
    serving: Serving,
}

impl WorkerService {
    /// The service over whatever `serving` holds at each request.
    pub fn serving(serving: Serving) -> WorkerServer<Self> {
        WorkerServer::new(WorkerService { serving })
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = UnboundedReceiverStream<Result<GenerateEvent, Status>>;

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        // The gateway (in a coordinator) resolves tenants' adapters before it calls here; an
        // operator may call directly. A worker never calls another.
        Caller::of(&req).require("Worker.Generate", &[Role::Coordinator, Role::Operator])?;
        let rx = self.serving.current()?.generate(req.into_inner())?;
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}
