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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: String,
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
