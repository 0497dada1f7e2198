//! One state-machine suite, driven only through `Store`, run on both stores: a single-voter
//! Raft replica and a real etcd. Whatever the store, the same proposals give the same replies
//! and the same state.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::etcd_store::EtcdStore;
use tandem_coordinator::store::Store;
use tandem_proto::contract::{
    ClusterState, Command, FileRef, Gpu, JobReport, JobSpec, JobStatus, MethodChoice, Placement, Proposal, Reply,
};
use tandem_testkit::{Etcd, Replicas};

const WAIT: Duration = Duration::from_secs(10);

async fn propose(store: &Store, request_id: &str, command: Command) -> Reply {
    store.propose(Proposal::new(request_id, command), WAIT).await.unwrap()
}

fn worker(id: &str) -> Command {
    let gpus = vec![Gpu { index: 0, memory_bytes: 80 << 30, models: vec!["m".into()] }];
    Command::RegisterWorker { id: id.into(), addr: format!("{id}:7000"), gpus, collective_addr: String::new() }
}

fn put_adapter(tenant: &str, uri: &str) -> Command {
    Command::PutAdapter {
        tenant: tenant.into(),
        name: "a".into(),
        base_model: "m".into(),
        checksum: "ab".into(),
        uri: uri.into(),
    }
}

fn report(epoch: u64, report: JobReport) -> Command {
    Command::ReportJob { id: "j".into(), epoch, report }
}

async fn suite(store: &Store) {
    // A model and two workers.
    let model = Command::RegisterModel { name: "m".into(), uri: "/models/m".into() };
    assert_eq!(propose(store, "model", model).await, Reply::Done);
    assert_eq!(propose(store, "w1", worker("w1")).await, Reply::Done);
    assert_eq!(propose(store, "w2", worker("w2")).await, Reply::Done);

    // Adapter versions count per tenant and name.
    assert_eq!(propose(store, "t1-a-1", put_adapter("t1", "/a/1")).await, Reply::Version { version: 1 });
    assert_eq!(propose(store, "t1-a-2", put_adapter("t1", "/a/2")).await, Reply::Version { version: 2 });
    assert_eq!(propose(store, "t2-a-1", put_adapter("t2", "/b/1")).await, Reply::Version { version: 1 });

    // A job placed on w1, running, checkpointed; w1 also serves a placement.
    let submit = Command::SubmitJob {
        id: "j".into(),
        tenant: "t1".into(),
        spec: JobSpec::new("m", MethodChoice::lora(8), FileRef { id: "f".into(), uri: "/files/f".into() }),
        adapter: None,
    };
    assert_eq!(propose(store, "submit", submit).await, Reply::Done);
    let place = |w: &str| Command::PlaceJob { id: "j".into(), worker: w.into() };
    assert_eq!(propose(store, "place-1", place("w1")).await, Reply::Epoch { epoch: 1 });
    assert_eq!(propose(store, "running-1", report(1, JobReport::Running { step: 0, plan: None })).await, Reply::Done);
    let ckpt = JobReport::Checkpoint { step: 10, uri: "/ckpt/10".into() };
    assert_eq!(propose(store, "ckpt-1", report(1, ckpt)).await, Reply::Done);
    let placement = Placement::new("m", vec!["w1".into()]);
    let set = Command::SetPlacement { group: "g1".into(), placement };
    assert_eq!(propose(store, "placement", set).await, Reply::Done);

    // w1 dies: the job goes back to the queue with its checkpoint, its shard moves to w2.
    assert_eq!(propose(store, "w1-dead", Command::MarkWorkerDead { id: "w1".into() }).await, Reply::Done);
    let state = store.read(WAIT).await.unwrap();
    assert!(!state.workers["w1"].alive);
    assert_eq!(state.jobs["j"].status, JobStatus::Queued);
    assert_eq!(state.jobs["j"].checkpoint.as_ref().unwrap().step, 10);
    assert_eq!(state.placements["g1"].workers, vec!["w2".to_string()]);

    // Placed again: a new epoch; the old attempt's report is refused and changes nothing.
    assert_eq!(propose(store, "place-2", place("w2")).await, Reply::Epoch { epoch: 2 });
    let stale =
        propose(store, "stale", report(1, JobReport::Succeeded { uri: "/out/j".into(), checksum: String::new() }))
            .await;
    assert!(matches!(&stale, Reply::Refused { reason } if reason.contains("stale attempt")), "{stale:?}");
    assert_eq!(store.read(WAIT).await.unwrap().jobs["j"].status, JobStatus::Placed);
    assert_eq!(
        propose(store, "done-2", report(2, JobReport::Succeeded { uri: "/out/j".into(), checksum: String::new() }))
            .await,
        Reply::Done
    );

    // A retried request applies once and gets its first reply again.
    assert_eq!(propose(store, "t1-a-3", put_adapter("t1", "/a/3")).await, Reply::Version { version: 3 });
    assert_eq!(propose(store, "t1-a-3", put_adapter("t1", "/a/3")).await, Reply::Version { version: 3 });

    let state = store.read(WAIT).await.unwrap();
    let uris: Vec<&str> = state.adapters["t1"]["a"].iter().map(|v| v.uri.as_str()).collect();
    assert_eq!(uris, ["/a/1", "/a/2", "/a/3"]);
    assert_eq!(state.adapters["t2"]["a"].len(), 1);
    assert_eq!(state.jobs["j"].status, JobStatus::Succeeded);
    assert_eq!(state.jobs["j"].attempts.len(), 2);
    // 17 proposals; a Raft log also holds its leaders' empty entries.
    assert!(state.applied >= 17, "applied {}", state.applied);
    assert_eq!(serde_json::from_slice::<ClusterState>(&serde_json::to_vec(&state).unwrap()).unwrap(), state);
}

#[tokio::test]
async fn suite_on_raft() {
    // A single voter elects itself (the harness waits for it) and sends nothing.
    let replicas = Replicas::start(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("store").join("raft"), &[1]);
    assert_eq!(replicas.leader(), 1, "a single voter did not elect itself");
    suite(&Store::Raft(replicas.shared(1))).await;
}

#[tokio::test]
async fn suite_on_etcd() {
    let etcd = Etcd::start("store-suite");
    let store = EtcdStore::connect(&etcd.url(), "/tandem-test").await.unwrap();
    suite(&Store::Etcd(Arc::new(store))).await;
}
