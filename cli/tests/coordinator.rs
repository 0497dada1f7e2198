//! Three `tandem coordinator` processes on loopback talking gRPC: a leader is elected, a write
//! sent to a follower reaches the leader, the leader's process is killed and another takes
//! over with no acknowledged write lost, and the killed one restarts from its disk; a leader
//! cut off by a partition steps down while the majority goes on; every coordinator killed at
//! once loses no acknowledged write; members join and leave under load; workers' leases; a key
//! revoked through one coordinator's gateway is refused by another's within a second.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_proto::ClientError;
use tandem_proto::contract::{Command as StateCommand, FileRef, JobSpec, MethodChoice, Reply, WorkerRegistration};
use tandem_testkit::{CoordinatorOptions, Coordinators, free_addr, http};

use common::TANDEM;

/// The workers' lease the coordinators grant.
const LEASE_MS: u64 = 1500;

/// Coordinators 1 to 3 granting [`LEASE_MS`] leases; with `proxied`, their links can be cut.
fn start(tag: &str, proxied: bool) -> Coordinators {
    let opts = CoordinatorOptions { proxied, lease_ms: Some(LEASE_MS), ..CoordinatorOptions::default() };
    Coordinators::start(TANDEM, tag, opts)
}

/// Registers worker `name` through coordinator `via`.
fn register(g: &Coordinators, via: u64, name: &str) {
    let command = StateCommand::RegisterWorker {
        id: name.into(),
        addr: format!("{name}:1"),
        gpus: vec![],
        collective_addr: String::new(),
    };
    assert_eq!(g.propose(via, &format!("register-{name}"), command), Reply::Done);
}

/// `workers[name].alive` as coordinator `id` reads it.
fn alive(g: &Coordinators, id: u64, name: &str) -> bool {
    g.status(id).unwrap()["workers"][name]["alive"].as_bool().unwrap()
}

fn workers(g: &Coordinators, id: u64) -> Vec<String> {
    g.names(id, "workers")
}

#[test]
fn a_coordinator_group_fails_over_without_losing_a_write() {
    let mut g = start("coordinators", false);
    let leader = g.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    // Sent to a follower: forwarded to the leader.
    register(&g, follower, "w1");
    for id in 1..=3 {
        assert_eq!(workers(&g, id), vec!["w1".to_string()], "coordinator {id}");
    }

    g.kill(leader);
    let new_leader = g.leader();
    assert_ne!(new_leader, leader);
    register(&g, new_leader, "w2");

    // The killed coordinator comes back from its disk and catches up.
    g.spawn(leader, &[]);
    g.wait_for_names(leader, "workers", &["w1".into(), "w2".into()]);

    // A follower killed and restarted recovers too.
    let follower = (1..=3).find(|&id| id != new_leader).unwrap();
    g.kill(follower);
    register(&g, new_leader, "w3");
    g.spawn(follower, &[]);
    g.wait_for_names(follower, "workers", &["w1".into(), "w2".into(), "w3".into()]);
    let status = g.status(leader).unwrap();
    assert_eq!(status["members"], serde_json::json!([1, 2, 3]));
    assert!(status["term"].as_u64().unwrap() >= 2);
}

#[test]
fn a_client_given_every_coordinator_outlives_the_one_it_talks_to() {
    let mut g = start("client-failover", false);
    g.leader();
    let client = g.client_of(&[1, 2, 3]);
    let first = g.block_on(client.status(false)).unwrap().id;
    assert_eq!(client.addr(), g.addr(first));
    g.kill(first);
    // The next call finds another coordinator, and the calls after it start there.
    let t = Instant::now();
    let next = g.block_on(client.status(false)).unwrap().id;
    assert!(next != first && t.elapsed() < Duration::from_secs(5), "{next} after {:?}", t.elapsed());
    assert_eq!(client.addr(), g.addr(next));
    let command = StateCommand::RegisterWorker {
        id: "w1".into(),
        addr: "w1:1".into(),
        gpus: vec![],
        collective_addr: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    // Retried while the two left elect a leader (when the killed one led).
    let proposal = tandem_proto::contract::Proposal::new("register-w1", command);
    while g.block_on(client.propose_as(proposal.clone())) != Ok(Reply::Done) {
        assert!(Instant::now() < deadline, "no coordinator took the proposal");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A dead address first in a new client's list costs one refused connection.
    let dead_first = g.client_of(&[first, next]);
    assert_eq!(g.block_on(dead_first.status(false)).unwrap().id, next);
    assert_eq!(workers(&g, next), vec!["w1".to_string()]);
}

#[test]
fn a_worker_keeps_its_lease_by_heartbeats_and_its_job_moves_when_it_stops() {
    let g = start("leases", false);
    let leader = g.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = g.client(follower);
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
        rt.block_on(client.heartbeat(who, None)).unwrap();
    };
    // Heartbeats every 150 ms for two leases: still alive.
    for _ in 0..2 * LEASE_MS / 150 {
        beat("gpu-box");
        beat("spare");
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(alive(&g, leader, "gpu-box"));
    let job = |id| g.status(id).unwrap()["jobs"]["j"].clone();
    assert_eq!((job(leader)["status"].as_str(), job(leader)["epoch"].as_u64()), (Some("placed"), Some(1)));
    assert_eq!(job(leader)["attempts"][0]["worker"], "gpu-box");
    // Silence from gpu-box: its lease runs out and it is marked dead (a Raft entry: every
    // coordinator agrees); its job starts a second attempt on the spare.
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(&g, leader, "gpu-box") {
        assert!(Instant::now() < deadline, "the worker's lease never expired");
        beat("spare");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(&g, follower, "gpu-box"));
    while job(follower)["epoch"].as_u64() != Some(2) {
        assert!(Instant::now() < deadline, "the dead worker's job was not placed again: {}", job(follower));
        beat("spare");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(job(follower)["attempts"][1]["worker"], "spare");
    assert_eq!(job(follower)["attempts"][0]["ended"], "its worker's lease expired");
    // A dead worker's heartbeat is refused until it registers again.
    let err = rt.block_on(client.heartbeat("gpu-box", None)).unwrap_err();
    assert!(matches!(err, ClientError::NotFound(_)), "{err}");
    rt.block_on(client.register_worker(reg)).unwrap();
    assert!(alive(&g, leader, "gpu-box"));
}

#[test]
fn a_partitioned_leader_steps_down_and_the_majority_goes_on() {
    let g = start("partition", true);
    let old = g.leader();
    register(&g, old, "w1");
    g.isolate(old);
    // check_quorum: cut off from both others, the old leader stops leading.
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.status(old).unwrap()["leader"].as_u64() == Some(old) {
        assert!(Instant::now() < deadline, "an isolated leader kept leading");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
    let new = g.leader_among(&rest);
    register(&g, new, "w2");
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
    g.heal();
    g.wait_for_names(old, "workers", &["w1".into(), "w2".into()]);
    assert_eq!(g.leader(), new);
}

#[test]
fn every_coordinator_killed_at_once_loses_no_acknowledged_write() {
    let mut g = start("restart-all", false);
    g.leader();
    let names: Vec<String> = (0..30).map(|i| format!("w{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        register(&g, 1 + i as u64 % 3, name);
    }
    for id in 1..=3 {
        g.kill(id);
    }
    for id in 1..=3 {
        g.spawn(id, &[]);
    }
    for id in 1..=3 {
        g.wait_for_names(id, "workers", &names);
    }
}

#[test]
fn members_join_and_leave_under_load() {
    let mut g = start("members", false);
    let first = g.leader();
    // One writer keeps proposing through the coordinators that stay, one write at a time.
    let stay: Vec<u64> = (1..=3).filter(|&id| id != first).collect();
    g.spawn_joiner(4);
    let addr4 = g.addr(4).to_string();
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
        let out = g.coordinators(stay[0], &["add", &format!("4={addr4}")]);
        assert!(out.contains(&format!("4={addr4}")), "{out}");
        let out = g.coordinators(stay[1], &["transfer-leader", "4"]);
        assert_eq!(out.trim(), "leader: 4");
        g.coordinators(4, &["remove", &first.to_string()]);
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
    register(&g, 4, "after");
}

/// Stops the writer however the test's main thread leaves the scope (a failed assert must not
/// leave it writing forever).
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Restarts coordinator `id` serving the HTTP gateway (operator key `sk-op`); its address once
/// it listens.
fn serve_gateway(g: &mut Coordinators, id: u64) -> String {
    g.kill(id);
    let (http, blobs) = (free_addr(), g.dir().join("blobs"));
    let key_file = tandem_testkit::secret_file(&g.dir().join("admin-key"), "sk-op");
    g.spawn(id, &["--http", &http, "--api-key-file", key_file.to_str().unwrap(), "--blobs", blobs.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&http).is_err() {
        assert!(Instant::now() < deadline, "coordinator {id}'s gateway never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    http
}

#[test]
fn a_followers_gateway_forwards_its_writes_to_the_leader() {
    let mut g = start("follower-gateway", false);
    let leader = g.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let http = serve_gateway(&mut g, follower);
    assert_ne!(g.leader(), follower, "the test needs the gateway on a follower");
    // A write (a key is a log entry) through the follower, then a read that needs it.
    let (status, body) = http::http(&http, "POST", "/v1/admin/api-keys", Some("sk-op"), Some(r#"{"tenant": "t1"}"#));
    assert_eq!(status, 200, "{body}");
    let key: Value = serde_json::from_str(&body).unwrap();
    let (status, body) = http::http(&http, "GET", "/v1/models", key["key"].as_str(), None);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_revoked_key_is_refused_by_every_gateway_within_a_second() {
    let mut g = start("revoke", false);
    let (a, b) = (serve_gateway(&mut g, 1), serve_gateway(&mut g, 2));
    g.leader(); // elected again after the restarts
    let models = |addr: &str, key: &str| http::http(addr, "GET", "/v1/models", Some(key), None);
    let (status, body) = http::http(&a, "POST", "/v1/admin/api-keys", Some("sk-op"), Some(r#"{"tenant": "t1"}"#));
    assert_eq!(status, 200, "{body}");
    let made: Value = serde_json::from_str(&body).unwrap();
    let (key, id) = (made["key"].as_str().unwrap(), made["id"].as_str().unwrap());
    assert_eq!(models(&b, key).0, 200, "gateway b accepts the key");
    // Listed on the other gateway by id and tenant, never with the key.
    let (status, listed) = http::http(&b, "GET", "/v1/admin/api-keys", Some("sk-op"), None);
    assert_eq!(status, 200, "{listed}");
    assert!(!listed.contains(key), "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["data"][0]["id"], id);
    assert_eq!(listed["data"][0]["tenant"], "t1");
    assert_eq!(http::http(&b, "GET", "/v1/admin/api-keys", Some(key), None).0, 403, "a tenant lists no keys");

    let (status, body) = http::http(&a, "DELETE", &format!("/v1/admin/api-keys/{id}"), Some("sk-op"), None);
    assert_eq!(status, 200, "{body}");
    let revoked = Instant::now();
    while models(&b, key).0 != 401 {
        assert!(revoked.elapsed() < Duration::from_secs(1), "gateway b still accepts a revoked key");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(models(&a, key).0, 401);
    let (status, body) = http::http(&b, "DELETE", &format!("/v1/admin/api-keys/{id}"), Some("sk-op"), None);
    assert_eq!(status, 404, "{body}");
}
