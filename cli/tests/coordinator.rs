//! Three `tandem coordinator` processes on loopback talking gRPC: a leader is elected, a write
//! sent to a follower reaches the leader, the leader's process is killed and another takes
//! over with no acknowledged write lost, and the killed one restarts from its disk; a leader
//! cut off by a partition steps down while the majority goes on; every coordinator killed at
//! once loses no acknowledged write; members join and leave under load; workers' leases.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_proto::contract::{
    Command as StateCommand, FileRef, JobSpec, MethodChoice, Proposal, Reply, WorkerRegistration,
};
use tandem_proto::{ClientError, ClusterClient};
use tokio::sync::watch;

/// The workers' lease the coordinators grant.
const LEASE_MS: u64 = 1500;

/// Coordinator processes on loopback. With `proxied`, every directed link between two of them
/// goes through a TCP proxy of this test, so the test can cut a coordinator off (a partition),
/// each coordinator's `--peers` naming the proxies it reaches the others through.
struct Group {
    dir: PathBuf,
    /// Where each coordinator listens (and what the test talks to).
    addrs: BTreeMap<u64, String>,
    /// Each coordinator's `--peers`.
    peers: BTreeMap<u64, String>,
    procs: BTreeMap<u64, Child>,
    /// (from, to) → the switch cutting that link.
    links: BTreeMap<(u64, u64), watch::Sender<bool>>,
    rt: tokio::runtime::Runtime,
}

fn free_addr() -> String {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

fn peers_arg(addrs: &BTreeMap<u64, String>) -> String {
    addrs.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",")
}

impl Group {
    fn start(dir: &Path, proxied: bool) -> Self {
        let addrs: BTreeMap<u64, String> = (1..=3).map(|id| (id, free_addr())).collect();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut peers, mut links) = (BTreeMap::new(), BTreeMap::new());
        for from in 1..=3u64 {
            let mut view = addrs.clone();
            for to in (1..=3).filter(|&to| proxied && to != from) {
                let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
                view.insert(to, listener.local_addr().unwrap().to_string());
                let (cut, cut_rx) = watch::channel(false);
                rt.spawn(proxy(listener, addrs[&to].clone(), cut_rx));
                links.insert((from, to), cut);
            }
            peers.insert(from, peers_arg(&view));
        }
        let mut g = Group { dir: dir.to_path_buf(), addrs, peers, procs: BTreeMap::new(), links, rt };
        for id in 1..=3 {
            g.spawn(id, &[]);
        }
        g
    }

    fn spawn(&mut self, id: u64, extra: &[&str]) {
        let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            // Short ticks and leases keep the tests quick; not so short that a loaded 2-core
            // machine (three coordinators per test, tests in parallel) misses elections.
            .args(["coordinator", "--id", &id.to_string(), "--peers", &self.peers[&id], "--tick-ms", "50"])
            .args(["--lease-ms", &LEASE_MS.to_string()])
            .args(extra)
            .arg("--data-dir")
            .arg(self.dir.join(id.to_string()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.procs.insert(id, child);
    }

    /// Starts coordinator `id` empty, to join the running group (the others learn its address
    /// from the membership change).
    fn spawn_joiner(&mut self, id: u64) {
        self.addrs.insert(id, free_addr());
        self.peers.insert(id, peers_arg(&self.addrs));
        self.spawn(id, &["--join"]);
    }

    fn kill(&mut self, id: u64) {
        let mut child = self.procs.remove(&id).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Cuts (or heals) every link to and from coordinator `id`.
    fn isolate(&self, id: u64, cut: bool) {
        for ((from, to), switch) in &self.links {
            if *from == id || *to == id {
                switch.send_replace(cut);
            }
        }
    }

    /// `tandem status --json` asked at coordinator `id` (None while it does not answer).
    fn status(&self, id: u64) -> Option<Value> {
        let (ok, out, _) = common::tandem(&["status", "--json", "--coordinator", &self.addrs[&id]]);
        ok.then(|| serde_json::from_str(&out).unwrap())
    }

    /// The leader as the live coordinators agree on it, waiting for one.
    fn leader(&self) -> u64 {
        self.leader_among(&self.procs.keys().copied().collect::<Vec<_>>())
    }

    /// The leader as one of `ids` sees it, waiting for one of them to know it.
    fn leader_among(&self, ids: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        // What each last said (leader, term, commit), for the failure message.
        let mut seen = BTreeMap::new();
        while Instant::now() < deadline {
            for &id in ids {
                let Some(s) = self.status(id) else {
                    seen.insert(id, "no answer".to_string());
                    continue;
                };
                let leader = s["leader"].as_u64().unwrap();
                if leader != 0 && ids.contains(&leader) {
                    return leader;
                }
                seen.insert(id, format!("leader {leader} term {} commit {}", s["term"], s["commit"]));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no leader elected among {ids:?}: {seen:?}");
    }

    /// Proposes `command` once through coordinator `via`.
    fn try_propose(&self, via: u64, request_id: &str, command: &StateCommand) -> Result<Reply, String> {
        let p = Proposal::new(request_id, command.clone());
        let c = ClusterClient::new(&self.addrs[&via]).map_err(|e| e.to_string())?;
        self.rt.block_on(c.propose_as(p)).map_err(|e| e.to_string())
    }

    /// Proposes through `via`, retrying while the group is busy electing (the same request id:
    /// it applies once).
    fn propose(&self, via: u64, request_id: &str, command: StateCommand) -> Reply {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.try_propose(via, request_id, &command) {
                Ok(reply) => return reply,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("retrying: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("proposing {request_id} via {via}: {e}"),
            }
        }
    }

    /// Registers worker `name` through coordinator `via`.
    fn register(&self, via: u64, name: &str) {
        let command = StateCommand::RegisterWorker {
            id: name.into(),
            addr: format!("{name}:1"),
            gpus: vec![],
            collective_addr: String::new(),
        };
        assert_eq!(self.propose(via, &format!("register-{name}"), command), Reply::Done);
    }

    /// `workers[name].alive` as coordinator `id` reads it.
    fn alive(&self, id: u64, name: &str) -> bool {
        self.status(id).unwrap()["workers"][name]["alive"].as_bool().unwrap()
    }

    /// The keys of the state's `what` map (workers, models, ...) as coordinator `id` reads it.
    fn names(&self, id: u64, what: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.status(id)
                && let Some(w) = s[what].as_object()
            {
                return w.keys().cloned().collect();
            }
            assert!(Instant::now() < deadline, "coordinator {id} never served a read: {:?}", self.status(id));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn workers(&self, id: u64) -> Vec<String> {
        self.names(id, "workers")
    }

    /// Waits until coordinator `id` reads `want` as its `what` (it is catching up).
    fn wait_for(&self, id: u64, what: &str, want: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.names(id, what) != want {
            assert!(Instant::now() < deadline, "coordinator {id} did not catch up on {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `tandem members ... --coordinator <via>`.
    fn members(&self, via: u64, change: &[&str]) -> String {
        let mut args = vec!["members", "--coordinator", &self.addrs[&via]];
        args.extend(change);
        let (ok, out, err) = common::tandem(&args);
        if !ok {
            let all: Vec<_> = self.procs.keys().map(|&id| self.status(id).map(|s| s.to_string())).collect();
            panic!("tandem {args:?}: {err}\n{all:?}");
        }
        out
    }
}

/// Forwards connections to `target` until `cut` is set; then drops them and refuses new ones.
async fn proxy(listener: tokio::net::TcpListener, target: String, cut: watch::Receiver<bool>) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        if *cut.borrow() {
            continue;
        }
        let (target, mut cut) = (target.clone(), cut.clone());
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.wait_for(|c| *c) => {}
            }
        });
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
    let mut g = Group::start(&dir, false);
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
    g.spawn(leader, &[]);
    g.wait_for(leader, "workers", &["w1".into(), "w2".into()]);

    // A follower killed and restarted recovers too.
    let follower = (1..=3).find(|&id| id != new_leader).unwrap();
    g.kill(follower);
    g.register(new_leader, "w3");
    g.spawn(follower, &[]);
    g.wait_for(follower, "workers", &["w1".into(), "w2".into(), "w3".into()]);
    let status = g.status(leader).unwrap();
    assert_eq!(status["members"], serde_json::json!([1, 2, 3]));
    assert!(status["term"].as_u64().unwrap() >= 2);
}

#[test]
fn a_worker_keeps_its_lease_by_heartbeats_and_its_job_moves_when_it_stops() {
    let dir = common::scratch("leases");
    let g = Group::start(&dir, false);
    let leader = g.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = ClusterClient::new(&g.addrs[&follower]).unwrap();
    // A job, which the scheduler places on the first of the two idle workers below (submitted
    // first, so that the workers' heartbeats start as soon as they register).
    g.propose(follower, "model", StateCommand::RegisterModel { name: "m".into(), uri: "/m".into() });
    let spec = JobSpec::new("m", MethodChoice::lora(8), FileRef { id: "f".into(), uri: "/files/f".into() });
    let job = StateCommand::SubmitJob { id: "j".into(), tenant: "t".into(), spec, adapter: None };
    g.propose(follower, "job", job);
    // Registered through a follower (forwarded to the leader).
    let reg = WorkerRegistration {
        worker_id: "gpu-box".into(),
        addr: "10.0.0.9:7500".into(),
        gpus: vec![],
        collective_addr: String::new(),
    };
    let lease = rt.block_on(client.register_worker(reg.clone())).unwrap();
    assert_eq!(lease, Duration::from_millis(LEASE_MS));
    let spare = WorkerRegistration { worker_id: "spare".into(), ..reg.clone() };
    rt.block_on(client.register_worker(spare)).unwrap();
    let beat = |who: &str| {
        rt.block_on(client.heartbeat(who)).unwrap();
    };
    // Heartbeats every 150 ms for two leases: still alive.
    for _ in 0..2 * LEASE_MS / 150 {
        beat("gpu-box");
        beat("spare");
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(g.alive(leader, "gpu-box"));
    let job = |id| g.status(id).unwrap()["jobs"]["j"].clone();
    assert_eq!((job(leader)["status"].as_str(), job(leader)["epoch"].as_u64()), (Some("placed"), Some(1)));
    assert_eq!(job(leader)["attempts"][0]["worker"], "gpu-box");
    // Silence from gpu-box: its lease runs out and it is marked dead (a Raft entry: every
    // coordinator agrees); its job starts a second attempt on the spare.
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.alive(leader, "gpu-box") {
        assert!(Instant::now() < deadline, "the worker's lease never expired");
        beat("spare");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!g.alive(follower, "gpu-box"));
    while job(follower)["epoch"].as_u64() != Some(2) {
        assert!(Instant::now() < deadline, "the dead worker's job was not placed again: {}", job(follower));
        beat("spare");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(job(follower)["attempts"][1]["worker"], "spare");
    assert_eq!(job(follower)["attempts"][0]["ended"], "its worker's lease expired");
    // A dead worker's heartbeat is refused until it registers again.
    let err = rt.block_on(client.heartbeat("gpu-box")).unwrap_err();
    assert!(matches!(err, ClientError::NotFound(_)), "{err}");
    rt.block_on(client.register_worker(reg)).unwrap();
    assert!(g.alive(leader, "gpu-box"));
}

#[test]
fn a_partitioned_leader_steps_down_and_the_majority_goes_on() {
    let dir = common::scratch("partition");
    let g = Group::start(&dir, true);
    let old = g.leader();
    g.register(old, "w1");
    g.isolate(old, true);
    // check_quorum: cut off from both others, the old leader stops leading.
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.status(old).unwrap()["leader"].as_u64() == Some(old) {
        assert!(Instant::now() < deadline, "an isolated leader kept leading");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
    let new = g.leader_among(&rest);
    g.register(new, "w2");
    // No split brain: the cut-off coordinator acknowledges no write and serves no read.
    let command = StateCommand::RegisterWorker {
        id: "lost".into(),
        addr: "x:1".into(),
        gpus: vec![],
        collective_addr: String::new(),
    };
    assert!(g.try_propose(old, "register-lost", &command).is_err());
    assert!(g.status(old).unwrap()["workers"].is_null());
    // Healed, it follows the new leader and has the majority's writes, not its own.
    g.isolate(old, false);
    g.wait_for(old, "workers", &["w1".into(), "w2".into()]);
    assert_eq!(g.leader(), new);
}

#[test]
fn every_coordinator_killed_at_once_loses_no_acknowledged_write() {
    let dir = common::scratch("restart-all");
    let mut g = Group::start(&dir, false);
    g.leader();
    let names: Vec<String> = (0..30).map(|i| format!("w{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        g.register(1 + i as u64 % 3, name);
    }
    for id in 1..=3 {
        g.kill(id);
    }
    for id in 1..=3 {
        g.spawn(id, &[]);
    }
    for id in 1..=3 {
        g.wait_for(id, "workers", &names);
    }
}

#[test]
fn members_join_and_leave_under_load() {
    let dir = common::scratch("members");
    let mut g = Group::start(&dir, false);
    let first = g.leader();
    // One writer keeps proposing through the coordinators that stay, one write at a time.
    let stay: Vec<u64> = (1..=3).filter(|&id| id != first).collect();
    g.spawn_joiner(4);
    let addr4 = g.addrs[&4].clone();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let acked = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut acked = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let name = format!("m{i:04}");
                let command = StateCommand::RegisterModel { name: name.clone(), uri: "/m".into() };
                g.propose(stay[i % 2], &name, command);
                acked.push(name);
            }
            acked
        });
        let _stop_writer = StopOnDrop(&stop);
        let out = g.members(stay[0], &["add", &format!("4={addr4}")]);
        assert!(out.contains(&format!("4={addr4}")), "{out}");
        let out = g.members(stay[1], &["transfer-leader", "4"]);
        assert_eq!(out.trim(), "leader: 4");
        g.members(4, &["remove", &first.to_string()]);
        std::thread::sleep(Duration::from_millis(500));
        drop(_stop_writer);
        writer.join().unwrap()
    });
    g.kill(first);
    assert!(acked.len() >= 10, "only {} writes went through", acked.len());
    for id in [stay[0], stay[1], 4] {
        let models = g.names(id, "models");
        assert!(acked.iter().all(|m| models.contains(m)), "coordinator {id} lost a write");
        let s = g.status(id).unwrap();
        let mut want = vec![stay[0], stay[1], 4];
        want.sort();
        assert_eq!(s["members"], serde_json::json!(want), "coordinator {id}");
        assert_eq!(s["addresses"]["4"], addr4.as_str(), "coordinator {id}");
    }
    // The group goes on without the removed coordinator.
    g.register(4, "after");
}

/// Stops the writer however the test's main thread leaves the scope (a failed assert must not
/// leave it writing forever).
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn a_followers_gateway_forwards_its_writes_to_the_leader() {
    let dir = common::scratch("follower-gateway");
    let mut g = Group::start(&dir, false);
    let leader = g.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    // The follower again, now serving the HTTP gateway.
    g.kill(follower);
    let (http, blobs) = (free_addr(), dir.join("blobs"));
    g.spawn(follower, &["--http", &http, "--api-key", "sk-op", "--blobs", blobs.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&http).is_err() {
        assert!(Instant::now() < deadline, "the follower's gateway never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(g.leader(), follower, "the test needs the gateway on a follower");
    // A write (a key is a log entry) through the follower, then a read that needs it.
    let (status, body) = common::http(&http, "POST", "/v1/admin/api-keys", Some("sk-op"), Some(r#"{"tenant": "t1"}"#));
    assert_eq!(status, 200, "{body}");
    let key: Value = serde_json::from_str(&body).unwrap();
    let (status, body) = common::http(&http, "GET", "/v1/models", key["key"].as_str(), None);
    assert_eq!(status, 200, "{body}");
}
