//! A worker process, in one folder: what it does from start to stop. It registers with the
//! coordinators and keeps its lease by heartbeats; each heartbeat's answer (its `WorkerView`)
//! drives two agents: the jobs agent starts and stops the fine-tuning attempts placed on it and
//! reports their progress, and on a group worker the groups agent joins the worker groups it is
//! a member of. Its engine runs on a thread of its own, and the gRPC `Worker` service streams
//! completions out of it.
//!
//! Map:
//! - `mod.rs`: [`Node`]: a worker's life, whole-model ([`Node::serve_model`]) or group worker
//!   ([`Node::serve_groups`]); the agents' reports to the cluster, retried until recorded.
//! - `lease.rs`: registration and the lease: heartbeats carry the engine's load, and their
//!   answers are published for the agents.
//! - `jobs_agent.rs`: the fine-tuning attempts assigned here, started, stopped, reported.
//! - `groups_agent.rs`: the worker groups this worker is a rank of, joined and reported.
//! - `group/`: a rank of a worker group: rank 0's engine loop broadcasting plans, followers.
//! - `engine_thread.rs`: the engine on its own thread, fed by orders; what `Generate` and the
//!   agents talk to ([`Serving`]).
//! - `service.rs`: the gRPC `Worker` service.
//! - `metrics.rs`: the worker's series on its metrics port, from its engine's figures.
//! - `phases.rs`: a request's adapter load, queue wait, prefill and decode as spans, and each
//!   fine-tuning step as a trace.

mod engine_thread;
pub mod group;
mod groups_agent;
mod jobs_agent;
mod lease;
mod metrics;
mod phases;
mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_kernels::Device;
use tandem_proto::contract::{Command, Proposal, Reply};
use tandem_proto::{ClientError, ClusterClient, Security};
use tandem_proto::{health_port, metrics_port};
use tokio::sync::mpsc::UnboundedReceiver;

pub use engine_thread::{EngineThread, JobStart, Serving, TrainEvent, TrainEvents, Training};
use groups_agent::GroupsAgent;
use jobs_agent::JobsAgent;
use lease::{Lease, keep_lease};
pub use service::WorkerService;

use crate::collective::CollectiveOptions;
use crate::engine::EngineConfig;
use crate::error::{Error, Result};

/// Who a worker is in the cluster.
pub struct Node {
    /// Its id.
    pub id: String,
    /// Where it serves gRPC (HOST:PORT); the gateway reaches it there.
    pub listen: String,
    /// The coordinators (any member: a follower forwards to the leader).
    pub cluster: ClusterClient,
    /// How it answers the gateway (mutual TLS with the cluster's certificates).
    pub security: Security,
    /// The shared folder of uploaded files and adapters; jobs' checkpoints and exported
    /// adapters go under `jobs/` there.
    pub blobs: PathBuf,
    /// Where it serves its metrics for Prometheus (`--metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Where it answers health probes (`--health`), if anywhere: ready while it holds its lease.
    pub health: Option<SocketAddr>,
}

/// What a group worker needs to serve as the ranks the coordinator places on it.
pub struct GroupWorker {
    /// Where it listens for its groups' collectives (HOST:PORT, reachable by the other ranks).
    pub collective_addr: String,
    /// Its own copy of a base model, named `model_name`: used when the catalogue's uri of a
    /// group's model is not a folder here.
    pub model_dir: PathBuf,
    pub model_name: String,
    pub device: Device,
    /// Timeouts of the groups' collectives and of forming a group.
    pub collective: CollectiveOptions,
    pub engine: EngineConfig,
    /// What carries the model collectives (TCP, or NCCL on a GPU).
    pub data: group::DataPlane,
}

impl Node {
    /// Serves base model `model` whole, on `engine` (whose jobs report on `trained`), until
    /// `shutdown` resolves.
    pub async fn serve_model(
        self,
        model: String,
        engine: EngineThread,
        trained: UnboundedReceiver<TrainEvent>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        self.serve(Serving::engine(engine), trained, vec![model], String::new(), None, shutdown).await
    }

    /// Serves as the ranks of the worker groups the coordinator places here (one at a time),
    /// until `shutdown` resolves.
    pub async fn serve_groups(self, g: GroupWorker, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let serving = Serving::nothing(format!("worker {} is in no worker group yet", self.id));
        let (train_events, trained) = tokio::sync::mpsc::unbounded_channel();
        let agent = GroupsAgent {
            id: self.id.clone(),
            cluster: self.cluster.clone(),
            serving: serving.clone(),
            train_events,
            model_dir: g.model_dir,
            model_name: g.model_name,
            device: g.device,
            options: g.collective,
            security: self.security.clone(),
            engine: g.engine,
            data: g.data,
        };
        self.serve(serving, trained, Vec::new(), g.collective_addr, Some(agent), shutdown).await
    }

    /// The rest of a worker's life: it holds its lease (registered with the `models` it serves
    /// whole and its collective address), runs the jobs agent on `serving` (and a group
    /// worker's groups agent) and serves `Generate` from `serving` until `shutdown`.
    async fn serve(
        self,
        serving: Serving,
        trained: UnboundedReceiver<TrainEvent>,
        models: Vec<String>,
        collective_addr: String,
        groups_agent: Option<GroupsAgent>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let addr = (self.listen.parse())
            .map_err(|e| Error::InvalidRequest(format!("listen address {:?}: {e}", self.listen)))?;
        let jobs = JobsAgent { serving: serving.clone(), cluster: self.cluster.clone(), blobs: self.blobs.clone() };
        let (assignments, assigned) = tokio::sync::watch::channel(Vec::new());
        let (groups, memberships) = tokio::sync::watch::channel(Vec::new());
        let kind = if groups_agent.is_some() { "group worker" } else { "worker" };
        let (held, lease_held) = tokio::sync::watch::channel(Err("not registered yet".to_string()));
        let lease = tokio::spawn(keep_lease(Lease {
            cluster: self.cluster.clone(),
            id: self.id.clone(),
            addr: self.listen.clone(),
            models,
            collective_addr,
            assignments,
            groups,
            serving: serving.clone(),
            held,
        }));
        let jobs = tokio::spawn(jobs.run(assigned, trained));
        let groups = groups_agent.map(|agent| tokio::spawn(agent.run(memberships)));
        let metrics_port = match self.metrics {
            Some(at) => Some(self.spawn_metrics_port(at, serving.clone()).await?),
            None => None,
        };
        let health_port = match self.health {
            Some(at) => {
                let ready: health_port::Ready = Arc::new(move || {
                    let held = lease_held.borrow().clone();
                    Box::pin(async move { held })
                });
                let port = health_port::spawn(at, ready).await;
                Some(port.map_err(|e| Error::Unavailable(format!("--health {at}: {e}")))?)
            }
            None => None,
        };
        tracing::info!(worker = %self.id, listen = %self.listen, "{kind} serving");
        let mut server = (self.security.server(tonic::transport::Server::builder()))
            .map_err(|e| Error::InvalidRequest(format!("TLS: {e}")))?;
        let served = server.add_service(WorkerService::serving(serving)).serve_with_shutdown(addr, shutdown).await;
        lease.abort();
        jobs.abort();
        groups.inspect(|g| g.abort());
        metrics_port.inspect(|m| m.abort());
        health_port.inspect(|h| h.abort());
        served.map_err(|e| Error::Unavailable(format!("serving on {}: {e}", self.listen)))
    }
}

impl Node {
    /// The metrics port: each scrape asks the engine serving here (none: an empty scrape).
    async fn spawn_metrics_port(&self, at: SocketAddr, serving: Serving) -> Result<tokio::task::JoinHandle<()>> {
        let id = self.id.clone();
        let render: metrics_port::Render = Arc::new(move || {
            let (serving, id) = (serving.clone(), id.clone());
            Box::pin(async move {
                let figures = match serving.current() {
                    Ok(engine) => engine.metrics().await.ok(),
                    Err(_) => None,
                };
                figures.map_or_else(|| metrics_port::text(&[]), |m| metrics::render(&id, m))
            })
        });
        let port = metrics_port::spawn(at, &self.security, render).await;
        port.map_err(|e| Error::Unavailable(format!("--metrics {at}: {e}")))
    }
}

/// Proposes `command` under `request_id` (a retry applies once), trying `tries` times, `pause`
/// apart, while the cluster cannot be reached. Answers whether the news is stale: refused or
/// denied (the job or group has moved to other workers), which retrying cannot change. `what`
/// names the sender in the log.
async fn propose_until_recorded(
    cluster: &ClusterClient,
    what: &str,
    request_id: String,
    command: Command,
    tries: u32,
    pause: Duration,
) -> bool {
    let proposal = Proposal::new(request_id, command);
    for attempt in 0..tries {
        match cluster.propose_as(proposal.clone()).await {
            Ok(Reply::Refused { reason }) => {
                tracing::warn!("{what}: report refused: {reason}");
                return true;
            }
            Ok(_) => return false,
            Err(e @ (ClientError::Invalid(_) | ClientError::Conflict(_) | ClientError::Denied(_))) => {
                tracing::warn!("{what}: report refused: {e}");
                return true;
            }
            Err(e) => {
                tracing::warn!("{what}: reporting (try {attempt}): {e:#}");
                tokio::time::sleep(pause).await;
            }
        }
    }
    false
}
