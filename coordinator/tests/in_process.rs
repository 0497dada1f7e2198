//! The control plane in one process (the testkit's `InProcessCluster`): three coordinator
//! servers whose Raft messages go over an in-memory network, and three workers, each reaching
//! the cluster through its own coordinator.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use tandem_proto::contract::{Command, Proposal, Reply};
use tandem_testkit::{InProcessCluster, wait_for};

#[test]
fn a_coordinator_cut_off_strands_its_worker_while_the_rest_goes_on_and_all_recover_when_healed() {
    let cluster = InProcessCluster::start("in-process-isolate", 3, 3);
    let workers: Vec<String> = (1..=3).map(|i| format!("w{i}")).collect();
    let old = cluster.leader();
    cluster.net().isolate(old);
    let majority: Vec<u64> = cluster.coordinator_ids().into_iter().filter(|&id| id != old).collect();
    let new = cluster.leader_among(&majority);

    // The majority takes writes, through a follower too.
    let follower = *majority.iter().find(|&&id| id != new).unwrap();
    let command = Command::RegisterModel { name: "second".into(), uri: cluster.blobs().to_string_lossy().into() };
    assert_eq!(cluster.propose(follower, Proposal::new("model-second", command)), Reply::Done);

    // The worker that reaches the cluster only through the cut-off coordinator loses its
    // lease; the others keep theirs; the cut-off coordinator reads nothing (no quorum).
    let stranded = workers.iter().find(|w| cluster.coordinator_of(w) == old).unwrap();
    wait_for(30, &format!("{stranded}'s lease to expire"), || {
        (cluster.is_alive(new, stranded) == Some(false)).then_some(())
    });
    for w in workers.iter().filter(|w| *w != stranded) {
        assert_eq!(cluster.is_alive(new, w), Some(true), "{w} reaches the majority");
    }
    assert!(cluster.state(old).is_none(), "a coordinator without a quorum read the state");

    // Healed: the cut-off coordinator catches up with the write made without it, and its
    // worker registers again.
    cluster.net().heal();
    cluster.wait_alive(old, &workers);
    let state = cluster.state(old).unwrap();
    assert!(state.models.contains_key("second"), "coordinator {old} missed a write made while it was cut off");
    assert_eq!(cluster.leader(), new, "a healed replica of an older term does not depose the leader");
}
