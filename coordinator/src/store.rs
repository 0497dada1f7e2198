//! Where the cluster's state lives: this coordinator group's own Raft log, or an existing etcd
//! cluster. Both apply the same [`ClusterState`] state machine to the same ordered log of
//! proposals, so the service above them does not care which it has.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result, joined};
use crate::etcd_store::EtcdStore;
use crate::replica::Replica;
use tandem_proto::contract::{ClusterState, Proposal, Reply};

#[derive(Clone)]
pub enum Store {
    Raft(Arc<Replica>),
    Etcd(Arc<EtcdStore>),
}

impl Store {
    /// Proposes `p`, waits until it is applied and returns what applying it returned.
    pub async fn propose(&self, p: Proposal, timeout: Duration) -> Result<Reply> {
        match self {
            Store::Raft(replica) => {
                let (replica, caller) = (replica.clone(), tracing::Span::current());
                let r = tokio::task::spawn_blocking(move || caller.in_scope(|| replica.propose(p, timeout))).await;
                joined(r)
            }
            Store::Etcd(etcd) => {
                tokio::time::timeout(timeout, etcd.propose(p)).await.map_err(|_| Error::Timeout("etcd"))?
            }
        }
    }

    /// A linearizable read: the state with everything acknowledged before the call applied.
    pub async fn read(&self, timeout: Duration) -> Result<ClusterState> {
        match self {
            Store::Raft(replica) => {
                let replica = replica.clone();
                let r = tokio::task::spawn_blocking(move || replica.read(timeout)).await;
                joined(r)
            }
            Store::Etcd(etcd) => {
                tokio::time::timeout(timeout, etcd.read()).await.map_err(|_| Error::Timeout("etcd"))?
            }
        }
    }
}
