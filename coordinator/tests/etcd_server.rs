//! Two coordinators serving the cluster API over one real etcd (`--store etcd://`): a write
//! through either is read through the other, one of them holds the scheduler election and keeps
//! the workers' leases (the other forwards registrations and heartbeats to it), and membership
//! changes are refused with a pointer to etcd.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tandem_coordinator::replica::Timing;
use tandem_coordinator::server::{Options, serve};
use tandem_proto::contract::{Command, Proposal, Reply, WorkerRegistration};
use tandem_proto::{ClientError, ClusterClient, Role};
use tandem_testkit::{Etcd, Scratch, TestCerts, free_addr};

/// A coordinator over `etcd`, its certificate `id` from `certs`; an operator's client of it.
async fn coordinator(etcd: &Etcd, certs: &TestCerts, id: u64) -> ClusterClient {
    let addr = free_addr();
    let opts = Options {
        id: 1,
        peers: BTreeMap::from([(1, addr.clone())]),
        dir: Default::default(),
        timing: Timing::default(),
        lease: Duration::from_millis(2000),
        join: false,
        etcd: Some(etcd.url()),
        etcd_tls: None,
        http: None,
        metrics: None,
        health: None,
        listen: None,
        security: certs.security(Role::Coordinator, &id.to_string()),
    };
    tokio::spawn(async move { serve(opts, std::future::pending()).await.unwrap() });
    let client = ClusterClient::new(&addr, &certs.operator()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.status(false).await {
            Ok(_) => return client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("coordinator at {addr}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_over_etcd_share_the_state_and_one_keeps_the_leases() {
    let etcd = Etcd::start("server");
    let scratch = Scratch::new("etcd-server-certs");
    let certs = TestCerts::new(&scratch.join("certs"));
    let a = coordinator(&etcd, &certs, 1).await;
    let b = coordinator(&etcd, &certs, 2).await;

    let p = Proposal::new("m1", Command::RegisterModel { name: "base".into(), uri: "/m".into() });
    assert_eq!(a.propose_as(p).await.unwrap(), Reply::Done);
    assert!(b.state().await.unwrap().models.contains_key("base"));
    let status = b.status(false).await.unwrap();
    assert_eq!(status.store, etcd.url());
    assert_eq!(status.members.len(), 1, "{status:?}");

    // Registered through one, heartbeats through the other: whichever is not the scheduler
    // forwards to the one that is, and the lease holds.
    let reg = WorkerRegistration {
        worker_id: "w1".into(),
        addr: "10.0.0.1:7500".into(),
        gpus: Vec::new(),
        collective_addr: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = a.register_worker(reg.clone()).await {
        assert!(Instant::now() < deadline, "no scheduler elected: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..12 {
        b.heartbeat("w1", None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(a.state().await.unwrap().workers["w1"].alive);
    // Without heartbeats the lease runs out.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.state().await.unwrap().workers["w1"].alive {
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let err = a.change_members(vec![], vec![1]).await.unwrap_err();
    assert!(matches!(err, ClientError::Conflict(_)), "{err}");
    let err = a.transfer_leader(2).await.unwrap_err();
    assert!(matches!(err, ClientError::Conflict(_)), "{err}");
}
