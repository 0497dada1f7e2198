//! Two coordinators serving the cluster API over one real etcd (`--store etcd://`): a write
//! through either is read through the other, one of them holds the scheduler election and keeps
//! the workers' leases (the other forwards registrations and heartbeats to it), and membership
//! changes are refused with a pointer to etcd.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::etcd::{Etcd, free_port};
use tandem_coordinator::replica::Timing;
use tandem_coordinator::server::{Options, serve};
use tandem_coordinator::state::ClusterState;
use tandem_proto::v1::cluster_client::ClusterClient;
use tandem_proto::v1::{
    ChangeMembersRequest, HeartbeatRequest, ProposeRequest, RegisterWorkerRequest, StatusRequest, TransferLeaderRequest,
};

type Client = ClusterClient<tonic::transport::Channel>;

async fn coordinator(etcd: &Etcd) -> Client {
    let addr = format!("127.0.0.1:{}", free_port());
    let opts = Options {
        id: 1,
        peers: BTreeMap::from([(1, addr.clone())]),
        dir: Default::default(),
        timing: Timing::default(),
        lease: Duration::from_millis(2000),
        join: false,
        etcd: Some(etcd.url()),
        http: None,
    };
    tokio::spawn(async move { serve(opts, std::future::pending()).await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ClusterClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("coordinator at {addr}: {e}"),
        }
    }
}

async fn state(c: &mut Client) -> ClusterState {
    let s = c.status(StatusRequest {}).await.unwrap().into_inner();
    serde_json::from_str(&s.state_json).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_over_etcd_share_the_state_and_one_keeps_the_leases() {
    let etcd = Etcd::start("server");
    let mut a = coordinator(&etcd).await;
    let mut b = coordinator(&etcd).await;

    let p = r#"{"request_id":"m1","command":{"op":"register_model","name":"base","uri":"/m"}}"#;
    let reply = a.propose(ProposeRequest { proposal_json: p.into() }).await.unwrap().into_inner();
    assert_eq!(reply.reply_json, r#"{"result":"done"}"#);
    assert!(state(&mut b).await.models.contains_key("base"));
    let status = b.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.store, etcd.url());
    assert_eq!(status.members.len(), 1, "{status:?}");

    // Registered through one, heartbeats through the other: whichever is not the scheduler
    // forwards to the one that is, and the lease holds.
    let reg = RegisterWorkerRequest {
        worker_id: "w1".into(),
        addr: "10.0.0.1:7500".into(),
        gpus_json: String::new(),
        collective_addr: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = a.register_worker(reg.clone()).await {
        assert!(Instant::now() < deadline, "no scheduler elected: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..12 {
        b.heartbeat(HeartbeatRequest { worker_id: "w1".into() }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(state(&mut a).await.workers["w1"].alive);
    // Without heartbeats the lease runs out.
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(&mut b).await.workers["w1"].alive {
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let err = a.change_members(ChangeMembersRequest { add: vec![], remove: vec![1] }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let err = a.transfer_leader(TransferLeaderRequest { to: 2 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
}
