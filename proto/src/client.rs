//! [`ClusterClient`]: the one way a process proposes to, reads, or reports to the coordinators.
//! It holds one channel per coordinator address, connected lazily and again after a failure,
//! with timeouts on connecting and on every call, so callers share it instead of dialling per
//! request.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// How long a worker's registration or lease renewal waits for one coordinator before it tries
/// the next: a third of the default lease, so a stopped or cut-off coordinator costs a worker
/// one renewal, not its lease.
const LEASE_CALL_BOUND: Duration = Duration::from_secs(1);

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
            // tonic's word for a connection that broke under the call (the coordinator died or
            // was cut off after the channel connected): another coordinator may answer.
            tonic::Code::Unknown
                if std::error::Error::source(&s).is_some_and(|e| e.is::<tonic::transport::Error>()) =>
            {
                ClientError::Unavailable(format!("the connection broke: {message}"))
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

/// A client of the coordinators at one or more addresses (any member: a follower forwards to
/// the leader). A call goes to the coordinator that last answered and, when that one cannot be
/// reached or does not answer in time, to the next: a process given every coordinator's address
/// outlives the loss of any one of them. Repeating a call this way is safe: proposals carry a
/// request id that applies once; reads, registrations and renewals are idempotent; a membership
/// change or leader transfer repeated after its answer was lost is refused as done already.
/// Cheap to clone; clones share the channels.
#[derive(Clone)]
pub struct ClusterClient {
    endpoints: Arc<[Endpoint]>,
    /// Each endpoint's channel, made on its first call inside the runtime that makes it (a
    /// channel needs one), so a client can be made anywhere.
    rpcs: Arc<[OnceCell<Rpc<Traced>>]>,
    /// The endpoint that last answered: calls start there.
    current: Arc<AtomicUsize>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient").field("addr", &self.addr()).finish()
    }
}

impl ClusterClient {
    /// A client of the coordinators at `addrs` (`HOST:PORT`, several separated by commas),
    /// reached with `security`; nothing is dialled until a call.
    pub fn new(addrs: &str, security: &Security) -> Result<Self, ClientError> {
        Self::with_timeouts(addrs, security, CONNECT_TIMEOUT, CALL_TIMEOUT)
    }

    /// The same, with other timeouts (a probe that must fail fast).
    pub fn with_timeouts(
        addrs: &str,
        security: &Security,
        connect: Duration,
        call: Duration,
    ) -> Result<Self, ClientError> {
        let endpoints = (addrs.split(',').map(str::trim))
            .map(|addr| {
                let endpoint = (security.endpoint(addr, Role::Coordinator))
                    .map_err(|e| ClientError::Invalid(format!("{addr}: {e}")))?;
                Ok(endpoint.connect_timeout(connect).timeout(call))
            })
            .collect::<Result<Arc<[Endpoint]>, ClientError>>()?;
        let rpcs = endpoints.iter().map(|_| OnceCell::new()).collect();
        Ok(ClusterClient { endpoints, rpcs, current: Arc::default() })
    }

    async fn rpc(&self, i: usize) -> Rpc<Traced> {
        self.rpcs[i].get_or_init(|| async { Rpc::new(traced(self.endpoints[i].connect_lazy())) }).await.clone()
    }

    /// Calls `f` on the coordinator that last answered, then on each other in turn while the
    /// answer is "unavailable" (or none comes within `bound`, when given): the first other
    /// answer, or the last coordinator's failure.
    async fn call<T, F, Fut>(&self, bound: Option<Duration>, f: F) -> Result<T, ClientError>
    where
        F: Fn(Rpc<Traced>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let first = self.current.load(Ordering::Relaxed);
        let mut failure = ClientError::Unavailable("no coordinator address".into());
        for i in (0..self.endpoints.len()).map(|k| (first + k) % self.endpoints.len()) {
            let attempt = f(self.rpc(i).await);
            let result = match bound {
                Some(bound) => tokio::time::timeout(bound, attempt).await.unwrap_or_else(|_| {
                    Err(tonic::Status::unavailable(format!("no answer within {} ms", bound.as_millis())))
                }),
                None => attempt.await,
            };
            match result.map_err(ClientError::from) {
                Err(e @ ClientError::Unavailable(_)) => {
                    failure = ClientError::Unavailable(format!("{}: {e}", self.address(i)))
                }
                other => {
                    self.current.store(i, Ordering::Relaxed);
                    return other;
                }
            }
        }
        Err(failure)
    }

    fn address(&self, i: usize) -> &str {
        self.endpoints[i].uri().authority().map_or("", |a| a.as_str())
    }

    /// The address (`HOST:PORT`) of the coordinator calls go to first.
    pub fn addr(&self) -> &str {
        self.address(self.current.load(Ordering::Relaxed))
    }

    /// Proposes `command` under a fresh request id (named after `what`) and returns what
    /// applying it returned, a refusal included.
    pub async fn propose(&self, what: &str, command: Command) -> Result<Reply, ClientError> {
        self.propose_as(Proposal::new(fresh_id(what), command)).await
    }

    /// Proposes `p` as it is: a retry under the same request id applies once.
    pub async fn propose_as(&self, p: Proposal) -> Result<Reply, ClientError> {
        self.call(None, |mut rpc| {
            let p = p.clone();
            async move { Ok(rpc.propose(p).await?.into_inner()) }
        })
        .await
    }

    /// The replicated state, read linearizably.
    pub async fn state(&self) -> Result<ClusterState, ClientError> {
        self.status(true).await?.state.ok_or_else(|| ClientError::Unavailable("no quorum to read the state".into()))
    }

    /// This coordinator's view of its group; with the state when `with_state` (none if no
    /// linearizable read was possible).
    pub async fn status(&self, with_state: bool) -> Result<GroupStatus, ClientError> {
        self.call(None, |mut rpc| async move { Ok(rpc.status(StatusRequest { with_state }).await?.into_inner()) }).await
    }

    /// Registers (or registers again) a worker; returns its lease.
    pub async fn register_worker(&self, r: WorkerRegistration) -> Result<Duration, ClientError> {
        let register = |mut rpc: Rpc<Traced>| {
            let r = r.clone();
            async move { Ok(rpc.register_worker(r).await?.into_inner()) }
        };
        let LeaseGrant { lease_ms } = self.call(Some(LEASE_CALL_BOUND), register).await?;
        Ok(Duration::from_millis(lease_ms))
    }

    /// Renews worker `id`'s lease; answers with what it is to do now. `NotFound`: it has no
    /// lease any more and must register again.
    pub async fn heartbeat(&self, id: &str, load: Option<WorkerLoad>) -> Result<WorkerView, ClientError> {
        let beat = |mut rpc: Rpc<Traced>| {
            let h = Heartbeat { worker_id: id.to_string(), load: load.clone() };
            async move { Ok(rpc.heartbeat(h).await?.into_inner()) }
        };
        self.call(Some(LEASE_CALL_BOUND), beat).await
    }

    /// Adds and removes coordinators (a Raft membership change); returns the members after it.
    pub async fn change_members(&self, add: Vec<Member>, remove: Vec<u64>) -> Result<Vec<Member>, ClientError> {
        let change = |mut rpc: Rpc<Traced>| {
            let m = MembershipChange { add: add.clone(), remove: remove.clone() };
            async move { Ok(rpc.change_members(m).await?.into_inner().members) }
        };
        self.call(None, change).await
    }

    /// Hands leadership to coordinator `to`; returns the leader once it leads.
    pub async fn transfer_leader(&self, to: u64) -> Result<u64, ClientError> {
        self.call(
            None,
            |mut rpc| async move { Ok(rpc.transfer_leader(LeaderTransfer { to }).await?.into_inner().leader) },
        )
        .await
    }
}
