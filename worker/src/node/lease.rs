//! Registration and the lease: a worker registers with the coordinators and renews its lease by
//! heartbeats; each answer says what it is to do now, published for the agents.

use std::time::Duration;

use tandem_proto::contract::{Assignment, Gpu, Membership, WorkerRegistration};
use tandem_proto::{ClientError, ClusterClient};

use super::Serving;

/// How long a heartbeat waits for the engine's figures before going without them.
const LOAD_WAIT: Duration = Duration::from_millis(250);

/// Who a worker is to the coordinator, and where the heartbeats' news goes.
pub struct Lease {
    /// A coordinator (a follower forwards to the leader).
    pub cluster: ClusterClient,
    pub id: String,
    /// Its gRPC address.
    pub addr: String,
    /// The base models it serves whole (none for a group worker).
    pub models: Vec<String>,
    /// Where it listens for its worker groups' collectives (empty: not a group worker).
    pub collective_addr: String,
    /// The fine-tuning attempts it is to run.
    pub assignments: tokio::sync::watch::Sender<Vec<Assignment>>,
    /// The worker groups it is a member of.
    pub groups: tokio::sync::watch::Sender<Vec<Membership>>,
    /// The engine serving here, whose figures each heartbeat carries.
    pub serving: Serving,
    /// Whether the lease is held (its last heartbeat answered), or why not: its health.
    pub held: tokio::sync::watch::Sender<Result<(), String>>,
}

/// Publishes `new` on `tx` when it differs from what is there.
fn publish<T: PartialEq>(tx: &tokio::sync::watch::Sender<T>, new: T) {
    tx.send_if_modified(|old| {
        let changed = *old != new;
        if changed {
            *old = new;
        }
        changed
    });
}

/// Registers the worker with the coordinator and keeps its lease: a heartbeat every third of
/// the lease, registering again when the coordinator has forgotten it (it was marked dead) and
/// retrying while it cannot be reached. Each heartbeat carries what the engine is doing (for the
/// operators' dashboard); each answer carries the fine-tuning
/// attempts this worker is to run and its worker groups, published on `lease`'s channels. Runs
/// until the task is dropped.
pub async fn keep_lease(lease: Lease) {
    let Lease { cluster, id, addr, models, collective_addr, assignments, groups, serving, held } = lease;
    let gpus = vec![Gpu { index: 0, memory_bytes: 0, models }];
    let register = WorkerRegistration { worker_id: id.clone(), addr, gpus, collective_addr };
    let mut registered = false;
    let mut pause = Duration::from_millis(500);
    loop {
        let result = async {
            if !registered {
                let lease = cluster.register_worker(register.clone()).await?;
                registered = true;
                return Ok(lease / 3);
            }
            // A busy engine answers after its iteration: the lease must not wait on it.
            let load = match serving.current() {
                Ok(engine) => match tokio::time::timeout(LOAD_WAIT, engine.metrics()).await {
                    Ok(Ok(m)) => Some(super::metrics::load(&m)),
                    _ => None,
                },
                Err(_) => None,
            };
            match cluster.heartbeat(&id, load).await {
                Ok(view) => {
                    publish(&assignments, view.assignments);
                    publish(&groups, view.groups);
                    Ok(Duration::from_millis(view.lease_ms / 3))
                }
                Err(ClientError::NotFound(_)) => {
                    registered = false;
                    Ok(Duration::ZERO)
                }
                Err(e) => Err(e),
            }
        }
        .await;
        match result {
            Ok(next) => {
                pause = next.max(Duration::from_millis(50));
                publish(&held, Ok(()));
            }
            Err(e) => {
                tracing::warn!(worker = %id, coordinator = cluster.addr(), "lease: {e}; retrying");
                publish(&held, Err(format!("no lease: the coordinators did not answer ({e})")));
            }
        }
        tokio::time::sleep(pause).await;
    }
}
