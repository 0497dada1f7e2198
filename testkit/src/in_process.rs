//! A whole cluster in one process: N coordinators (the real server, its cluster API on a
//! loopback port) whose Raft messages go over a [`MemNet`] the test can break, and M workers
//! (the real worker node over a tiny random model, each registered through its own
//! coordinator) that hold leases, take assignments and serve. It starts in about a second and
//! its faults are exact; what only whole processes show (kills, restarts from disk, the binary's
//! flags) is for [`Coordinators`](crate::Coordinators) and [`MiniCluster`](crate::MiniCluster).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_coordinator::replica::Timing;
use tandem_coordinator::server::{self, RaftLinks};
use tandem_proto::contract::{ClusterState, Command, Proposal, Reply};
use tandem_proto::{ClusterClient, Role, Security};
use tandem_worker::engine::{Engine, EngineConfig};
use tandem_worker::init_model::{Preset, write_model};
use tandem_worker::kernels::Device;
use tandem_worker::model::Model;
use tandem_worker::node::{EngineThread, Node};
use tandem_worker::tokenizer::TextTokenizer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::certs::TestCerts;
use crate::mem_net::MemNet;
use crate::ports::free_addr;
use crate::process::{Scratch, propose, wait_for};

/// Raft ticks of the in-process coordinators: elections in a fifth of a second, with room for
/// a loaded 2-core machine running the workers' engines beside them.
const TIMING: Timing =
    Timing { tick: Duration::from_millis(20), election_ticks: 10, heartbeat_ticks: 2, ..Timing::DEFAULT };

/// A cluster of coordinators `1..=N` and workers `w1..=wM` in this process. Worker `wI`
/// registers, heartbeats and reports through coordinator `(I - 1) % N + 1` only, so cutting a
/// coordinator off cuts its workers off too. Everything stops on drop.
pub struct InProcessCluster {
    rt: tokio::runtime::Runtime,
    net: MemNet,
    /// Coordinator id → its cluster API address.
    coordinators: BTreeMap<u64, String>,
    /// Worker id → (its gRPC address, the coordinator it reaches the cluster through).
    workers: BTreeMap<String, (String, u64)>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The cluster's CA: coordinators, workers and the test's clients talk mutual TLS.
    certs: TestCerts,
    dir: Scratch,
}

impl InProcessCluster {
    /// The workers' lease the coordinators grant.
    pub const LEASE: Duration = Duration::from_millis(1500);

    /// The base model's name in the catalogue.
    pub const MODEL: &'static str = "tiny";

    /// `coordinators` founders and `workers` whole-model workers of [`Self::MODEL`] (a tiny random
    /// model, registered in the catalogue), in a scratch folder named `tag`; returns once a
    /// leader is elected and every worker is alive.
    pub fn start(tag: &str, coordinators: u64, workers: usize) -> Self {
        let dir = Scratch::new(tag);
        let model_dir = dir.join(Self::MODEL);
        write_model(Preset::Tiny, &model_dir, 7).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let peers: BTreeMap<u64, String> = (1..=coordinators).map(|id| (id, free_addr())).collect();
        let (stop, stopped) = watch::channel(false);
        let mut cluster = InProcessCluster {
            rt,
            net: MemNet::default(),
            coordinators: peers.clone(),
            workers: BTreeMap::new(),
            stop,
            tasks: Vec::new(),
            certs: TestCerts::new(&dir.join("certs")),
            dir,
        };
        for &id in peers.keys() {
            cluster.start_coordinator(id, &peers, stopped.clone());
        }
        let leader = cluster.leader();
        let command =
            Command::RegisterModel { name: Self::MODEL.into(), uri: model_dir.to_string_lossy().into_owned() };
        assert_eq!(cluster.propose(leader, Proposal::new(format!("model-{}", Self::MODEL), command)), Reply::Done);
        for i in 1..=workers {
            let via = (i as u64 - 1) % coordinators + 1;
            cluster.start_worker(&format!("w{i}"), via, &model_dir, stopped.clone());
        }
        let all: Vec<String> = cluster.workers.keys().cloned().collect();
        cluster.wait_alive(leader, &all);
        cluster
    }

    fn start_coordinator(&mut self, id: u64, peers: &BTreeMap<u64, String>, stopped: watch::Receiver<bool>) {
        let opts = server::Options {
            id,
            peers: peers.clone(),
            dir: self.dir.join(format!("coordinator-{id}")),
            timing: TIMING,
            lease: Self::LEASE,
            join: false,
            etcd: None,
            etcd_tls: None,
            http: None,
            metrics: None,
            health: None,
            listen: None,
            security: self.certs.security(Role::Coordinator, &id.to_string()),
        };
        let net = self.net.clone();
        let links = RaftLinks::Given {
            transport: Box::new(self.net.transport(id)),
            connect: Box::new(move |inbox| net.connect(id, inbox)),
        };
        self.tasks.push(self.rt.spawn(async move {
            // Its end shows in the test as a coordinator that does not answer.
            if let Err(e) = server::serve_with(opts, links, until(stopped)).await {
                eprintln!("coordinator {id} stopped: {e}");
            }
        }));
    }

    fn start_worker(&mut self, id: &str, via: u64, model_dir: &Path, stopped: watch::Receiver<bool>) {
        let model = Model::load(model_dir, Device::Cpu).unwrap();
        let tokenizer = TextTokenizer::load(model_dir).unwrap();
        let engine = Engine::new(model, Vec::new(), Some(tokenizer), EngineConfig::default()).unwrap();
        let (engine, trained) = EngineThread::start(engine).unwrap();
        let listen = free_addr();
        let node = Node {
            id: id.into(),
            listen: listen.clone(),
            cluster: ClusterClient::new(&self.coordinators[&via], &self.certs.security(Role::Worker, id)).unwrap(),
            security: self.certs.security(Role::Worker, id),
            blobs: self.blobs(),
            metrics: None,
            health: None,
        };
        let name = id.to_string();
        self.tasks.push(self.rt.spawn(async move {
            if let Err(e) = node.serve_model(Self::MODEL.into(), engine, trained, until(stopped)).await {
                eprintln!("worker {name} stopped: {e}");
            }
        }));
        self.workers.insert(id.into(), (listen, via));
    }

    /// The network between the coordinators, to break and heal.
    pub fn net(&self) -> &MemNet {
        &self.net
    }

    /// The coordinators' ids.
    pub fn coordinator_ids(&self) -> Vec<u64> {
        self.coordinators.keys().copied().collect()
    }

    /// The coordinator worker `id` reaches the cluster through.
    pub fn coordinator_of(&self, worker: &str) -> u64 {
        self.workers[worker].1
    }

    /// Worker `id`'s gRPC address.
    pub fn worker_addr(&self, worker: &str) -> &str {
        &self.workers[worker].0
    }

    /// The shared folder of blobs the workers write jobs' files in.
    pub fn blobs(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    /// A client of coordinator `id` showing the certificate `name` of `role` (made on first use).
    pub fn client_as(&self, id: u64, role: Role, name: &str) -> ClusterClient {
        ClusterClient::new(&self.coordinators[&id], &self.certs.security(role, name)).unwrap()
    }

    /// The [`Security`] of a holder of certificate `name` of `role`, for the test's own calls.
    pub fn security(&self, role: Role, name: &str) -> Security {
        self.certs.security(role, name)
    }

    /// A client of coordinator `id`, as an operator.
    pub fn client(&self, id: u64) -> ClusterClient {
        ClusterClient::new(&self.coordinators[&id], &self.certs.operator()).unwrap()
    }

    /// Runs `f` on the cluster's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// `p` proposed through coordinator `via`, retried until the group answers ([`propose`]).
    pub fn propose(&self, via: u64, p: Proposal) -> Reply {
        propose(&self.client(via), p)
    }

    /// The state as coordinator `id` reads it (linearizable: `None` without a quorum).
    pub fn state(&self, id: u64) -> Option<ClusterState> {
        self.block_on(self.client(id).state()).ok()
    }

    /// The leader the reachable coordinators agree on, waiting up to 20 s for one.
    pub fn leader(&self) -> u64 {
        self.leader_among(&self.coordinator_ids())
    }

    /// The one of coordinators `ids` that they all name leader, waiting up to 20 s for them to
    /// agree on one (a leader cut off from them is not it).
    pub fn leader_among(&self, ids: &[u64]) -> u64 {
        wait_for(20, &format!("a leader among coordinators {ids:?}"), || {
            let leaders: Vec<u64> =
                ids.iter().map(|&id| self.block_on(self.client(id).status(false)).map_or(0, |s| s.leader)).collect();
            let first = leaders[0];
            (ids.contains(&first) && leaders.iter().all(|&l| l == first)).then_some(first)
        })
    }

    /// Whether worker `id` is alive in the state coordinator `via` reads.
    pub fn is_alive(&self, via: u64, worker: &str) -> Option<bool> {
        Some(self.state(via)?.workers.get(worker).is_some_and(|w| w.alive))
    }

    /// Waits up to 30 s until coordinator `via` reads every one of `workers` alive.
    pub fn wait_alive(&self, via: u64, workers: &[String]) {
        wait_for(30, &format!("workers {workers:?} alive"), || {
            workers.iter().all(|w| self.is_alive(via, w) == Some(true)).then_some(())
        });
    }
}

/// Resolves once `stopped` turns true (or its sender goes).
async fn until(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|&s| s).await;
}

impl Drop for InProcessCluster {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // Before the folder goes: their logs and blobs are in it.
        for task in std::mem::take(&mut self.tasks) {
            let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
        }
    }
}
