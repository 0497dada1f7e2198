//! Three Raft replicas in one process, over the testkit's in-memory network: a leader is
//! elected, proposals commit everywhere and apply once, the leader's loss elects another
//! without losing an acknowledged write, a restarted replica recovers from its disk, a replica
//! cut off from the others answers no read, a leader cut from one follower commits through the
//! other, lost messages lose no acknowledged write, and members join and leave.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_coordinator::Error;
use tandem_proto::contract::{Command, Proposal, Reply};
use tandem_testkit::{FAST, Replicas, WAIT};

/// Replicas 1 to 3 founding a group, their logs under the test's own folder.
fn three(test: &str) -> Replicas {
    Replicas::start(dir(test), &[1, 2, 3])
}

fn dir(test: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("replica").join(test)
}

fn model(name: &str) -> Proposal {
    Proposal::new(format!("req-{name}"), Command::RegisterModel { name: name.into(), uri: "/m".into() })
}

#[test]
fn a_three_replica_group_elects_commits_fails_over_and_recovers() {
    let mut replicas = three("failover");
    let first = replicas.leader();
    assert_eq!(replicas[first].propose(model("a"), WAIT).unwrap(), Reply::Done);
    // A retry of the same request applies once; a follower refuses and names the leader.
    assert_eq!(replicas[first].propose(model("a"), WAIT).unwrap(), Reply::Done);
    let follower = (1..=3).find(|&id| id != first).unwrap();
    match replicas[follower].propose(model("b"), WAIT) {
        Err(Error::NotLeader { leader }) => assert_eq!(leader, first),
        other => panic!("{other:?}"),
    }
    for id in replicas.ids() {
        assert!(replicas[id].read(WAIT).unwrap().models.contains_key("a"));
    }

    // The leader dies: another is elected and the acknowledged write is still there.
    replicas.stop(first);
    let second = replicas.leader();
    assert_ne!(second, first);
    assert_eq!(replicas[second].propose(model("c"), WAIT).unwrap(), Reply::Done);
    // The old leader restarts from its disk and catches up.
    replicas.restart(first);
    let state = replicas[first].read(WAIT).unwrap();
    assert!(state.models.contains_key("a") && state.models.contains_key("c"), "{:?}", state.models);
}

#[test]
fn an_isolated_replica_steps_down_and_answers_no_read() {
    let replicas = three("partition");
    let old = replicas.leader();
    replicas[old].propose(model("a"), WAIT).unwrap();
    replicas.net().isolate(old);
    // check_quorum: the cut-off leader steps down; the majority elects a new one.
    let deadline = Instant::now() + WAIT;
    while replicas[old].status().is_leader && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!replicas[old].status().is_leader, "an isolated leader kept leading");
    let majority: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
    let new = replicas.leader_among(&majority);
    assert_eq!(replicas[new].propose(model("b"), WAIT).unwrap(), Reply::Done);
    // No split brain: the isolated replica neither accepts writes nor serves reads.
    assert!(replicas[old].propose(model("x"), Duration::from_millis(300)).is_err());
    assert!(matches!(replicas[old].read(Duration::from_millis(500)), Err(Error::Timeout(_))));
    // Callers that gave up are forgotten, not kept until the partition heals.
    std::thread::sleep(FAST.tick * 3);
    assert_eq!(replicas[old].status().waiting, 0);
    // Healed, it follows and sees the majority's write.
    replicas.net().heal();
    let state = replicas[old].read(WAIT).unwrap();
    assert!(state.models.contains_key("b"));
    assert!(!state.models.contains_key("x"));
}

#[test]
fn a_leader_cut_from_one_follower_still_commits_through_the_other() {
    let replicas = three("cut");
    let leader = replicas.leader();
    let (a, b) = {
        let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
        (followers[0], followers[1])
    };
    replicas.net().cut(leader, a);
    // A majority (the leader and b) still commits; a learns nothing while cut.
    assert_eq!(replicas[leader].propose(model("a"), WAIT).unwrap(), Reply::Done);
    assert!(replicas[b].read(WAIT).unwrap().models.contains_key("a"));
    assert!(replicas.net().dropped() > 0, "the cut lost no message");
    // Healed, the cut-off follower catches up (through whoever leads by then).
    replicas.net().heal();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(state) = replicas[a].read(Duration::from_millis(500))
            && state.models.contains_key("a")
        {
            break;
        }
        assert!(Instant::now() < deadline, "replica {a} never caught up after the cut healed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_lossy_network_slows_the_group_but_loses_no_acknowledged_write() {
    let replicas = three("lossy");
    let first = replicas.leader();
    // A fifth of every link's messages lost, and the next ten from the leader to one follower.
    for from in 1..=3 {
        for to in (1..=3).filter(|&to| to != from) {
            replicas.net().drop(from, to, 0.2);
        }
    }
    replicas.net().drop_next(first, (1..=3).find(|&id| id != first).unwrap(), 10);
    // Raft retries what is lost: each write commits (through whoever leads then), once.
    let mut acked = Vec::new();
    for i in 0..10 {
        let name = format!("m{i}");
        let deadline = Instant::now() + WAIT * 4;
        loop {
            let leader = replicas.leader();
            match replicas[leader].propose(model(&name), WAIT) {
                Ok(reply) => {
                    assert_eq!(reply, Reply::Done);
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "{name} never committed: {e}"),
            }
        }
        acked.push(name);
    }
    assert!(replicas.net().dropped() > 0, "no message was lost");
    replicas.net().heal();
    for id in 1..=3 {
        let state = replicas[id].read(WAIT).unwrap();
        assert!(acked.iter().all(|m| state.models.contains_key(m)), "replica {id}: {:?}", state.models);
    }
}

#[test]
fn members_join_and_leave_while_the_group_serves() {
    let mut replicas = three("members");
    let first = replicas.leader();
    replicas[first].propose(model("a"), WAIT).unwrap();

    // A fourth replica starts empty and is added; it learns the founders' configuration (from
    // the first snapshot), the log, and the addresses of members added later.
    replicas.join(4);
    let add = [(4, "127.0.0.1:7404".to_string())].into();
    replicas[first].change_members(&add, &[], WAIT).unwrap();
    replicas[first].propose(model("b"), WAIT).unwrap();
    let state = replicas[4].read(WAIT).unwrap();
    assert!(state.models.contains_key("a") && state.models.contains_key("b"));
    assert_eq!(state.coordinators, add);
    assert_eq!(replicas[4].status().voters, vec![1, 2, 3, 4]);

    // Leadership moves to the new member, which then removes the old leader.
    replicas[first].transfer_leader(4);
    let deadline = Instant::now() + WAIT;
    while !replicas[4].status().is_leader {
        assert!(Instant::now() < deadline, "leadership did not move to 4");
        std::thread::sleep(Duration::from_millis(10));
    }
    replicas[4].change_members(&BTreeMap::new(), &[first], WAIT).unwrap();
    replicas.stop(first);
    assert_eq!(replicas[4].propose(model("c"), WAIT).unwrap(), Reply::Done);
    for id in replicas.ids() {
        let mut want: Vec<u64> = vec![1, 2, 3, 4].into_iter().filter(|&v| v != first).collect();
        want.sort();
        assert_eq!(replicas[id].status().voters, want, "replica {id}");
        assert!(replicas[id].read(WAIT).unwrap().models.contains_key("c"));
    }
    // Still a majority of three: losing one more keeps the group writing.
    let other = *replicas.ids().iter().find(|&&id| id != 4).unwrap();
    replicas.stop(other);
    assert_eq!(replicas[4].propose(model("d"), WAIT).unwrap(), Reply::Done);
}
