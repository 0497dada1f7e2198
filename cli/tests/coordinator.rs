//! Three `tandem coordinator` processes on loopback talking gRPC: a leader is elected, a write
//! sent to a follower reaches the leader, the leader's process is killed and another takes
//! over with no acknowledged write lost, and the killed one restarts from its disk.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_coordinator::state::{Command as StateCommand, Proposal};
use tandem_proto::v1::cluster_client::ClusterClient;
use tandem_proto::v1::{HeartbeatRequest, ProposeRequest, RegisterWorkerRequest};

struct Group {
    dir: PathBuf,
    peers: String,
    addrs: BTreeMap<u64, String>,
    procs: BTreeMap<u64, Child>,
}

impl Group {
    fn start(dir: &Path) -> Self {
        // Free loopback ports, released for the coordinators to take.
        let addrs: BTreeMap<u64, String> = (1..=3)
            .map(|id| (id, TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()))
            .collect();
        let peers = addrs.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
        let mut g = Group { dir: dir.to_path_buf(), peers, addrs, procs: BTreeMap::new() };
        for id in 1..=3 {
            g.spawn(id);
        }
        g
    }

    fn spawn(&mut self, id: u64) {
        let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["coordinator", "--id", &id.to_string(), "--peers", &self.peers, "--tick-ms", "20"])
            .args(["--lease-ms", "600", "--data-dir"])
            .arg(self.dir.join(id.to_string()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.procs.insert(id, child);
    }

    fn kill(&mut self, id: u64) {
        let mut child = self.procs.remove(&id).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// `tandem status --json` asked at coordinator `id` (None while it does not answer).
    fn status(&self, id: u64) -> Option<Value> {
        let (ok, out, _) = common::tandem(&["status", "--json", "--coordinator", &self.addrs[&id]]);
        ok.then(|| serde_json::from_str(&out).unwrap())
    }

    /// The leader as the live coordinators agree on it, waiting for one.
    fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            for &id in self.procs.keys() {
                if let Some(s) = self.status(id) {
                    let leader = s["leader"].as_u64().unwrap();
                    if leader != 0 && self.procs.contains_key(&leader) {
                        return leader;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no leader elected");
    }

    /// Registers worker `name` through coordinator `via`, retrying while the group is busy
    /// electing (the same request id: it applies once).
    fn register(&self, via: u64, name: &str) {
        let p = Proposal {
            request_id: format!("register-{name}"),
            command: StateCommand::RegisterWorker { id: name.into(), addr: format!("{name}:1"), gpus: vec![] },
        };
        let json = serde_json::to_string(&p).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let result = rt.block_on(async {
                let mut c = ClusterClient::connect(format!("http://{}", self.addrs[&via])).await?;
                let r = c.propose(ProposeRequest { proposal_json: json.clone() }).await?;
                Ok::<_, Box<dyn std::error::Error>>(r.into_inner().reply_json)
            });
            match result {
                Ok(reply) => return assert_eq!(reply, r#"{"result":"done"}"#),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("retrying: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("registering {name} via {via}: {e}"),
            }
        }
    }

    /// `workers[name].alive` as coordinator `id` reads it.
    fn alive(&self, id: u64, name: &str) -> bool {
        self.status(id).unwrap()["workers"][name]["alive"].as_bool().unwrap()
    }

    fn workers(&self, id: u64) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.status(id)
                && let Some(w) = s["workers"].as_object()
            {
                return w.keys().cloned().collect();
            }
            assert!(Instant::now() < deadline, "coordinator {id} never served a read");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_coordinator_group_fails_over_without_losing_a_write() {
    let dir = common::scratch("coordinators");
    let mut g = Group::start(&dir);
    let leader = g.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    // Sent to a follower: forwarded to the leader.
    g.register(follower, "w1");
    for id in 1..=3 {
        assert_eq!(g.workers(id), vec!["w1".to_string()], "coordinator {id}");
    }

    g.kill(leader);
    let new_leader = g.leader();
    assert_ne!(new_leader, leader);
    g.register(new_leader, "w2");

    // The killed coordinator comes back from its disk and catches up.
    g.spawn(leader);
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.workers(leader) != vec!["w1".to_string(), "w2".to_string()] {
        assert!(Instant::now() < deadline, "the restarted coordinator did not catch up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = g.status(leader).unwrap();
    assert_eq!(status["members"], serde_json::json!([1, 2, 3]));
    assert!(status["term"].as_u64().unwrap() >= 2);
}

#[test]
fn a_worker_keeps_its_lease_by_heartbeats_and_loses_it_without() {
    let dir = common::scratch("leases");
    let g = Group::start(&dir);
    let leader = g.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("http://{}", g.addrs[&follower]);
    let mut client = rt.block_on(ClusterClient::connect(url)).unwrap();
    // Registered through a follower (forwarded to the leader).
    let reg =
        RegisterWorkerRequest { worker_id: "gpu-box".into(), addr: "10.0.0.9:7500".into(), gpus_json: String::new() };
    let lease = rt.block_on(client.register_worker(reg.clone())).unwrap().into_inner().lease_ms;
    assert_eq!(lease, 600);
    // Heartbeats every 150 ms for 1.5 s (over two leases): still alive.
    for _ in 0..10 {
        rt.block_on(client.heartbeat(HeartbeatRequest { worker_id: "gpu-box".into() })).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(g.alive(leader, "gpu-box"));
    // Silence: the lease runs out and the worker is marked dead (a Raft entry: every
    // coordinator agrees).
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.alive(leader, "gpu-box") {
        assert!(Instant::now() < deadline, "the worker's lease never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!g.alive(follower, "gpu-box"));
    // A dead worker's heartbeat is refused until it registers again.
    let err = rt.block_on(client.heartbeat(HeartbeatRequest { worker_id: "gpu-box".into() })).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    rt.block_on(client.register_worker(reg)).unwrap();
    assert!(g.alive(leader, "gpu-box"));
}
