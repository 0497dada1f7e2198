//! Three Raft replicas in one process, joined by channels: a leader is elected, proposals
//! commit everywhere and apply once, the leader's loss elects another without losing an
//! acknowledged write, a restarted replica recovers from its disk, and a replica cut off from
//! the others answers no read.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft::eraftpb::Message;
use tandem_coordinator::replica::{Inbox, Replica, ReplicaError, Timing, Transport};
use tandem_proto::contract::{Command, Proposal, Reply};

/// Who can reach whom.
#[derive(Clone, Default)]
struct Net {
    inboxes: Arc<Mutex<HashMap<u64, Inbox>>>,
    /// Replicas cut off from everyone.
    isolated: Arc<Mutex<HashSet<u64>>>,
}

struct ChannelTransport {
    from: u64,
    net: Net,
}

impl Transport for ChannelTransport {
    fn send(&self, msg: Message) {
        let cut = self.net.isolated.lock().unwrap();
        if cut.contains(&self.from) || cut.contains(&msg.to) {
            return;
        }
        if let Some(inbox) = self.net.inboxes.lock().unwrap().get(&msg.to) {
            inbox.deliver(msg);
        }
    }
}

const TIMING: Timing = Timing { tick: Duration::from_millis(10), election_ticks: 10, heartbeat_ticks: 2 };
const WAIT: Duration = Duration::from_secs(5);

fn dir(test: &str, id: u64) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("replica").join(test).join(id.to_string())
}

fn start(test: &str, id: u64, net: &Net) -> Replica {
    start_with(test, id, &[1, 2, 3], net)
}

/// Replica `id` of a group founded by `voters` (none: it joins a running group).
fn start_with(test: &str, id: u64, voters: &[u64], net: &Net) -> Replica {
    let r =
        Replica::start(id, voters, &dir(test, id), ChannelTransport { from: id, net: net.clone() }, TIMING).unwrap();
    net.inboxes.lock().unwrap().insert(id, r.inbox());
    r
}

fn leader(replicas: &HashMap<u64, Replica>) -> u64 {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some((id, _)) = replicas.iter().find(|(_, r)| r.status().is_leader) {
            return *id;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no leader elected");
}

fn model(name: &str) -> Proposal {
    Proposal::new(format!("req-{name}"), Command::RegisterModel { name: name.into(), uri: "/m".into() })
}

#[test]
fn a_three_replica_group_elects_commits_fails_over_and_recovers() {
    let test = "failover";
    let _ = std::fs::remove_dir_all(dir(test, 0).parent().unwrap());
    let net = Net::default();
    let mut replicas: HashMap<u64, Replica> = (1..=3).map(|id| (id, start(test, id, &net))).collect();
    let first = leader(&replicas);
    assert_eq!(replicas[&first].propose(model("a"), WAIT).unwrap(), Reply::Done);
    // A retry of the same request applies once; a follower refuses and names the leader.
    assert_eq!(replicas[&first].propose(model("a"), WAIT).unwrap(), Reply::Done);
    let follower = (1..=3).find(|&id| id != first).unwrap();
    match replicas[&follower].propose(model("b"), WAIT) {
        Err(ReplicaError::NotLeader { leader }) => assert_eq!(leader, first),
        other => panic!("{other:?}"),
    }
    for r in replicas.values() {
        assert!(r.read(WAIT).unwrap().models.contains_key("a"));
    }

    // The leader dies: another is elected and the acknowledged write is still there.
    net.inboxes.lock().unwrap().remove(&first);
    drop(replicas.remove(&first));
    let second = leader(&replicas);
    assert_ne!(second, first);
    assert_eq!(replicas[&second].propose(model("c"), WAIT).unwrap(), Reply::Done);
    // The old leader restarts from its disk and catches up.
    replicas.insert(first, start(test, first, &net));
    let state = replicas[&first].read(WAIT).unwrap();
    assert!(state.models.contains_key("a") && state.models.contains_key("c"), "{:?}", state.models);
}

#[test]
fn an_isolated_replica_steps_down_and_answers_no_read() {
    let test = "partition";
    let _ = std::fs::remove_dir_all(dir(test, 0).parent().unwrap());
    let net = Net::default();
    let replicas: HashMap<u64, Replica> = (1..=3).map(|id| (id, start(test, id, &net))).collect();
    let old = leader(&replicas);
    replicas[&old].propose(model("a"), WAIT).unwrap();
    net.isolated.lock().unwrap().insert(old);
    // check_quorum: the cut-off leader steps down; the majority elects a new one.
    let deadline = Instant::now() + WAIT;
    while replicas[&old].status().is_leader && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!replicas[&old].status().is_leader, "an isolated leader kept leading");
    let majority: HashMap<u64, &Replica> =
        replicas.iter().filter(|(id, _)| **id != old).map(|(i, r)| (*i, r)).collect();
    let deadline = Instant::now() + WAIT;
    let new = loop {
        if let Some((id, _)) = majority.iter().find(|(_, r)| r.status().is_leader) {
            break *id;
        }
        assert!(Instant::now() < deadline, "the majority elected no leader");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(replicas[&new].propose(model("b"), WAIT).unwrap(), Reply::Done);
    // No split brain: the isolated replica neither accepts writes nor serves reads.
    assert!(replicas[&old].propose(model("x"), Duration::from_millis(300)).is_err());
    assert!(matches!(replicas[&old].read(Duration::from_millis(500)), Err(ReplicaError::Timeout)));
    // Callers that gave up are forgotten, not kept until the partition heals.
    std::thread::sleep(TIMING.tick * 3);
    assert_eq!(replicas[&old].status().waiting, 0);
    // Healed, it follows and sees the majority's write.
    net.isolated.lock().unwrap().clear();
    let state = replicas[&old].read(WAIT).unwrap();
    assert!(state.models.contains_key("b"));
    assert!(!state.models.contains_key("x"));
}

#[test]
fn members_join_and_leave_while_the_group_serves() {
    let test = "members";
    let _ = std::fs::remove_dir_all(dir(test, 0).parent().unwrap());
    let net = Net::default();
    let mut replicas: HashMap<u64, Replica> = (1..=3).map(|id| (id, start(test, id, &net))).collect();
    let first = leader(&replicas);
    replicas[&first].propose(model("a"), WAIT).unwrap();

    // A fourth replica starts empty and is added; it learns the founders' configuration (from
    // the first snapshot), the log, and the addresses of members added later.
    replicas.insert(4, start_with(test, 4, &[], &net));
    let add = [(4, "127.0.0.1:7404".to_string())].into();
    replicas[&first].change_members(&add, &[], WAIT).unwrap();
    replicas[&first].propose(model("b"), WAIT).unwrap();
    let state = replicas[&4].read(WAIT).unwrap();
    assert!(state.models.contains_key("a") && state.models.contains_key("b"));
    assert_eq!(state.coordinators, add);
    assert_eq!(replicas[&4].status().voters, vec![1, 2, 3, 4]);

    // Leadership moves to the new member, which then removes the old leader.
    replicas[&first].transfer_leader(4);
    let deadline = Instant::now() + WAIT;
    while !replicas[&4].status().is_leader {
        assert!(Instant::now() < deadline, "leadership did not move to 4");
        std::thread::sleep(Duration::from_millis(10));
    }
    replicas[&4].change_members(&BTreeMap::new(), &[first], WAIT).unwrap();
    net.inboxes.lock().unwrap().remove(&first);
    drop(replicas.remove(&first));
    assert_eq!(replicas[&4].propose(model("c"), WAIT).unwrap(), Reply::Done);
    for (id, r) in &replicas {
        let mut want: Vec<u64> = vec![1, 2, 3, 4].into_iter().filter(|&v| v != first).collect();
        want.sort();
        assert_eq!(r.status().voters, want, "replica {id}");
        assert!(r.read(WAIT).unwrap().models.contains_key("c"));
    }
    // Still a majority of three: losing one more keeps the group writing.
    let other = *replicas.keys().find(|&&id| id != 4).unwrap();
    net.inboxes.lock().unwrap().remove(&other);
    drop(replicas.remove(&other));
    assert_eq!(replicas[&4].propose(model("d"), WAIT).unwrap(), Reply::Done);
}
