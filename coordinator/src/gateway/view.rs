//! The gateway's view of the cluster, for the per-request path (authentication, resolving a
//! model, picking a worker): the replicated state as of at most [`REFRESH`] ago, kept as one
//! shared copy that requests borrow rather than read and clone, and one channel per worker that
//! every request to it reuses.
//!
//! Staleness is bounded and never refuses what exists: a key, model or worker the view lacks is
//! looked up again with a linearizable read before the request is refused, and the gateway's
//! own writes refresh the view at once (a deleted adapter stops being served here immediately).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tandem_proto::contract::ClusterState;
use tandem_proto::trace_context::{Traced, traced};
use tandem_proto::v1::worker_client::WorkerClient;
use tandem_proto::{ClientError, ClusterClient, Role, Security};

/// How often the view is read afresh.
pub const REFRESH: Duration = Duration::from_millis(200);
/// How long connecting to a worker may take before the next one is tried.
const WORKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to, and asking, another coordinator for its status may take.
const COORDINATOR_TIMEOUT: Duration = Duration::from_secs(1);

pub struct View {
    state: RwLock<Arc<ClusterState>>,
    /// One lazily connected channel per worker address.
    workers: Mutex<HashMap<String, WorkerClient<Traced>>>,
    /// One client per other coordinator's address (the dashboard asks each for its status).
    coordinators: Mutex<HashMap<String, ClusterClient>>,
    security: Security,
}

impl View {
    pub fn new(security: Security) -> Self {
        View { state: RwLock::default(), workers: Mutex::default(), coordinators: Mutex::default(), security }
    }

    /// The state as last read.
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Takes `state` unless the view already holds a newer one (reads may finish out of order).
    pub fn offer(&self, state: Arc<ClusterState>) {
        if let Ok(mut held) = self.state.write()
            && state.applied >= held.applied
        {
            *held = state;
        }
    }

    /// The client of the worker at `addr` (its channel connects on first use and again after
    /// a failure).
    pub fn worker(&self, addr: &str) -> Result<WorkerClient<Traced>, tonic::Status> {
        let mut workers = self.workers.lock().map_err(|_| tonic::Status::internal("worker channels poisoned"))?;
        if let Some(c) = workers.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = (self.security.endpoint(addr, Role::Worker))
            .map_err(|e| tonic::Status::unavailable(format!("worker {addr}: {e}")))?
            .connect_timeout(WORKER_CONNECT_TIMEOUT);
        let client = WorkerClient::new(traced(endpoint.connect_lazy()));
        workers.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// The client of the coordinator at `addr`, with short timeouts: a coordinator that does not
    /// answer at once is shown as unreachable.
    pub fn coordinator(&self, addr: &str) -> Result<ClusterClient, ClientError> {
        let mut clients = self.coordinators.lock().map_err(|_| ClientError::Internal("clients poisoned".into()))?;
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let client = ClusterClient::with_timeouts(addr, &self.security, COORDINATOR_TIMEOUT, COORDINATOR_TIMEOUT)?;
        clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }
}
