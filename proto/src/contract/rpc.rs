//! The requests and answers of the coordinators' `tandem.v1.Cluster` service that are not
//! commands or state: the group's own status, workers' registration and heartbeats, and
//! membership changes.

use serde::{Deserialize, Serialize};

use super::cluster::{ClusterState, Gpu};

/// A coordinator and the gRPC address it is reached at ("" when not known here).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    pub addr: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// Also read the replicated state (linearizably).
    pub with_state: bool,
}

/// One coordinator's view of its group, and (when asked and a quorum answered) the state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub id: u64,
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<u64>,
    /// The voters with the addresses this coordinator knows them by.
    pub members: Vec<Member>,
    /// "raft" or "etcd://...": where the state is kept.
    pub store: String,
    /// Read through ReadIndex; none when not asked or no linearizable read was possible.
    pub state: Option<ClusterState>,
    /// The workers' leases as this coordinator keeps them: the leader's, empty on a follower.
    #[serde(default)]
    pub leases: Vec<WorkerLease>,
}

/// A worker's lease as the leader keeps it: when it was last heard from and what it said.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerLease {
    pub worker_id: String,
    /// Milliseconds since its last heartbeat (or registration).
    pub heard_ms_ago: u64,
    /// What its last heartbeat said it was doing; none before its first.
    pub load: Option<WorkerLoad>,
}

/// What a worker's engine holds and does, as its heartbeat tells it: for operators (the
/// dashboard), kept by the leader beside the lease and never replicated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerLoad {
    pub requests_running: u64,
    pub requests_waiting: u64,
    /// The page pool: all its pages, and those holding KV cache and adapter weights.
    pub pages: u64,
    pub kv_pages: u64,
    pub adapter_pages: u64,
    /// Adapters resident in the page pool (worker names, `tenant:name@version`); the rest of the
    /// registered ones are in host memory only.
    pub adapters_pool: Vec<String>,
    pub adapters_host: u64,
    /// Output tokens (after each request's first) timed since the engine started, and those of
    /// them within its TPOT target: the SLO attainment over any interval is the ratio of their
    /// increases.
    pub output_tokens_timed: u64,
    pub tokens_within_target: u64,
    /// Fine-tuning jobs training in the engine now.
    pub jobs_training: u64,
}

/// A worker joining (or rejoining) the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRegistration {
    pub worker_id: String,
    /// Its gRPC address (HOST:PORT).
    pub addr: String,
    pub gpus: Vec<Gpu>,
    /// Where it listens for its worker groups' collectives; empty: not a group worker.
    pub collective_addr: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// How long a lease lasts without a heartbeat, milliseconds.
    pub lease_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: String,
    /// What it is doing (none: it has no engine yet).
    #[serde(default)]
    pub load: Option<WorkerLoad>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    pub add: Vec<Member>,
    pub remove: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub members: Vec<Member>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderTransfer {
    pub to: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    pub leader: u64,
}
