//! [`ClusterClient`]: the one way a process proposes to, reads, or reports to the coordinators.
//! It holds one channel per coordinator address, connected lazily and again after a failure,
//! with timeouts on connecting and on every call, so callers share it instead of dialling per
//! request.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;
use tonic::transport::Endpoint;

use crate::tls::{Role, Security};
use crate::trace_context::{Traced, traced};

use crate::cluster_service::cluster_client::ClusterClient as Rpc;
use crate::contract::{
    ClusterState, Command, GroupStatus, Heartbeat, LeaderTransfer, LeaseGrant, Member, MembershipChange, Proposal,
    Reply, StatusRequest, WorkerLoad, WorkerRegistration, WorkerView, fresh_id,
};

/// How long connecting to a coordinator may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call may take: a proposal waits up to 5 s for the group, plus a forward.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// What went wrong, by what a caller can do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The request broke the contract's rules (a bad id, name, path); retrying will not help.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// What it names does not exist (a worker without a lease, a coordinator not a member).
    #[error("not found: {0}")]
    NotFound(String),
    /// The caller's certificate does not allow it (another worker's name, an operator's call).
    #[error("denied: {0}")]
    Denied(String),
    /// The cluster refused it as things stand (a refused command, a stale epoch).
    #[error("refused: {0}")]
    Conflict(String),
    /// No coordinator (or no quorum) answered in time; retrying later may help.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Something that should not happen did; the message says what.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ClientError::Invalid(message),
            tonic::Code::NotFound => ClientError::NotFound(message),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => ClientError::Denied(message),
            tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists | tonic::Code::Aborted => {
                ClientError::Conflict(message)
            }
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                ClientError::Unavailable(message)
            }
            _ => ClientError::Internal(format!("{:?}: {message}", s.code())),
        }
    }
}

/// The status a server answers with when a call it forwarded failed so.
impl From<ClientError> for tonic::Status {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Invalid(m) => tonic::Status::invalid_argument(m),
            ClientError::NotFound(m) => tonic::Status::not_found(m),
            ClientError::Denied(m) => tonic::Status::permission_denied(m),
            ClientError::Conflict(m) => tonic::Status::failed_precondition(m),
            ClientError::Unavailable(m) => tonic::Status::unavailable(m),
            ClientError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

/// A client of the coordinator at one address (any member: a follower forwards to the leader).
/// Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct ClusterClient {
    endpoint: Endpoint,
    /// Made on the first call, inside the runtime that makes it (a channel needs one), so a
    /// client can be made anywhere.
    rpc: Arc<OnceCell<Rpc<Traced>>>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient").field("addr", &self.addr()).finish()
    }
}

impl ClusterClient {
    /// A client of the coordinator at `addr` (`HOST:PORT`), reached with `security`; nothing
    /// is dialled until a call.
    pub fn new(addr: &str, security: &Security) -> Result<Self, ClientError> {
        Self::with_timeouts(addr, security, CONNECT_TIMEOUT, CALL_TIMEOUT)
    }

    /// The same, with other timeouts (a probe that must fail fast).
    pub fn with_timeouts(
        addr: &str,
        security: &Security,
        connect: Duration,
        call: Duration,
    ) -> Result<Self, ClientError> {
        let endpoint = (security.endpoint(addr, Role::Coordinator))
            .map_err(|e| ClientError::Invalid(e.to_string()))?
            .connect_timeout(connect)
            .timeout(call);
        Ok(ClusterClient { endpoint, rpc: Arc::default() })
    }

    async fn rpc(&self) -> Rpc<Traced> {
        self.rpc.get_or_init(|| async { Rpc::new(traced(self.endpoint.connect_lazy())) }).await.clone()
    }

    /// The coordinator's address (`HOST:PORT`).
    pub fn addr(&self) -> &str {
        self.endpoint.uri().authority().map_or("", |a| a.as_str())
    }

    /// Proposes `command` under a fresh request id (named after `what`) and returns what
    /// applying it returned, a refusal included.
    pub async fn propose(&self, what: &str, command: Command) -> Result<Reply, ClientError> {
        self.propose_as(Proposal::new(fresh_id(what), command)).await
    }

    /// Proposes `p` as it is: a retry under the same request id applies once.
    pub async fn propose_as(&self, p: Proposal) -> Result<Reply, ClientError> {
        Ok(self.rpc().await.propose(p).await?.into_inner())
    }

    /// The replicated state, read linearizably.
    pub async fn state(&self) -> Result<ClusterState, ClientError> {
        self.status(true).await?.state.ok_or_else(|| ClientError::Unavailable("no quorum to read the state".into()))
    }

    /// This coordinator's view of its group; with the state when `with_state` (none if no
    /// linearizable read was possible).
    pub async fn status(&self, with_state: bool) -> Result<GroupStatus, ClientError> {
        Ok(self.rpc().await.status(StatusRequest { with_state }).await?.into_inner())
    }

    /// Registers (or registers again) a worker; returns its lease.
    pub async fn register_worker(&self, r: WorkerRegistration) -> Result<Duration, ClientError> {
        let LeaseGrant { lease_ms } = self.rpc().await.register_worker(r).await?.into_inner();
        Ok(Duration::from_millis(lease_ms))
    }

    /// Renews worker `id`'s lease; answers with what it is to do now. `NotFound`: it has no
    /// lease any more and must register again.
    pub async fn heartbeat(&self, id: &str, load: Option<WorkerLoad>) -> Result<WorkerView, ClientError> {
        Ok(self.rpc().await.heartbeat(Heartbeat { worker_id: id.to_string(), load }).await?.into_inner())
    }

    /// Adds and removes coordinators (a Raft membership change); returns the members after it.
    pub async fn change_members(&self, add: Vec<Member>, remove: Vec<u64>) -> Result<Vec<Member>, ClientError> {
        Ok(self.rpc().await.change_members(MembershipChange { add, remove }).await?.into_inner().members)
    }

    /// Hands leadership to coordinator `to`; returns the leader once it leads.
    pub async fn transfer_leader(&self, to: u64) -> Result<u64, ClientError> {
        Ok(self.rpc().await.transfer_leader(LeaderTransfer { to }).await?.into_inner().leader)
    }
}
