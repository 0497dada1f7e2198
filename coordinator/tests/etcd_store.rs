//! The etcd store against a real etcd: coordinators appending at once take distinct indices and
//! agree, a late coordinator restores from the snapshot, an etcd killed with SIGKILL keeps what
//! was acknowledged, the scheduler election has one holder at a time and fails over, a bad
//! URL is an error, and an etcd that requires client certificates is reached with one of its
//! CA's and refuses plain text and another CA's.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use tandem_coordinator::Error;
use tandem_coordinator::etcd_store::{EtcdOptions, EtcdStore, Leadership};
use tandem_coordinator::store::Store;
use tandem_proto::contract::{Command, Proposal, Reply};
use tandem_testkit::{Etcd, EtcdClientFiles, free_addr};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

const PREFIX: &str = "/tandem";
const WAIT: Duration = Duration::from_secs(10);

fn model(name: &str) -> Proposal {
    Proposal::new(format!("model-{name}"), Command::RegisterModel { name: name.into(), uri: format!("/models/{name}") })
}

fn adapter(uri: &str) -> Proposal {
    let command = Command::PutAdapter {
        tenant: "t".into(),
        name: "a".into(),
        base_model: "m".into(),
        checksum: "ab".into(),
        uri: uri.into(),
    };
    Proposal::new(uri, command)
}

async fn propose(store: &EtcdStore, p: Proposal) -> Reply {
    tokio::time::timeout(WAIT, store.propose(p)).await.unwrap().unwrap()
}

fn options(compact_every: u64) -> EtcdOptions {
    EtcdOptions { compact_every, ..EtcdOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_appending_at_once_apply_every_acknowledged_proposal_once() {
    let etcd = Etcd::start("concurrent");
    let a = Arc::new(EtcdStore::connect(&etcd.url(), PREFIX).await.unwrap());
    let b = Arc::new(EtcdStore::connect(&etcd.url(), PREFIX).await.unwrap());
    assert_eq!(propose(&a, model("m")).await, Reply::Done);

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (s, store) in [&a, &b].into_iter().enumerate() {
        for t in 0..4 {
            let store = store.clone();
            tasks.spawn(async move {
                let mut acked = Vec::new();
                for i in 0..15 {
                    let uri = format!("s{s}-t{t}-{i}");
                    match propose(&store, adapter(&uri)).await {
                        Reply::Version { version } => acked.push((uri, version)),
                        other => panic!("{other:?}"),
                    }
                }
                acked
            });
        }
    }
    let mut acked = Vec::new();
    while let Some(r) = tasks.join_next().await {
        acked.extend(r.unwrap());
    }
    eprintln!("{} proposals from 8 tasks in {:?}", acked.len(), start.elapsed());

    let (sa, sb) = (a.read().await.unwrap(), b.read().await.unwrap());
    assert_eq!(sa, sb);
    assert_eq!(sa.applied, 1 + 120);
    // Each acknowledged proposal made exactly one version, the one its reply named.
    let versions: HashMap<&str, Vec<u64>> = sa.adapters["t"]["a"].iter().fold(HashMap::new(), |mut m, v| {
        m.entry(v.uri.as_str()).or_default().push(v.version);
        m
    });
    assert_eq!(versions.len(), acked.len());
    for (uri, version) in &acked {
        assert_eq!(versions[uri.as_str()], [*version], "{uri}");
    }

    let status = a.status().await.unwrap();
    assert_eq!(status.members.len(), 1);
    assert_eq!(status.members[0].name, "t");
    assert_eq!(status.leader, status.members[0].id);
    assert!(status.raft_term >= 1 && status.revision > 121, "{status:?}");
    assert_eq!((status.head, status.applied, status.snapshot), (121, 121, 0));
}

#[tokio::test]
async fn a_coordinator_behind_the_snapshot_restores_from_it_and_the_old_log_is_gone() {
    let etcd = Etcd::start("compaction");
    let a = EtcdStore::connect_with(&etcd.url(), PREFIX, options(10)).await.unwrap();
    let behind = EtcdStore::connect_with(&etcd.url(), PREFIX, options(10)).await.unwrap();
    propose(&a, model("m")).await;
    for i in 0..4 {
        propose(&a, adapter(&format!("early-{i}"))).await;
    }
    assert_eq!(behind.read().await.unwrap().applied, 5);
    for i in 0..30 {
        propose(&a, adapter(&format!("late-{i}"))).await;
    }

    // Entries 1..=30 went into snapshots; the store that was at 5 and a new one both catch up.
    let state = a.read().await.unwrap();
    assert_eq!(state.applied, 35);
    assert_eq!(behind.read().await.unwrap(), state);
    let fresh = EtcdStore::connect_with(&etcd.url(), PREFIX, options(10)).await.unwrap();
    assert_eq!(fresh.read().await.unwrap(), state);
    let status = fresh.status().await.unwrap();
    assert_eq!((status.head, status.snapshot, status.compaction_error), (35, 30, None));

    // Only the entries after the snapshot are left.
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let keys =
        client.get(format!("{PREFIX}/log/"), Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    let left: Vec<String> = keys.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
    let expected: Vec<String> = (31..=35).map(|i| format!("{PREFIX}/log/{i:020}")).collect();
    assert_eq!(left, expected);

    // A request applied before the snapshot is still recognised as a retry.
    assert_eq!(propose(&fresh, adapter("early-0")).await, Reply::Version { version: 1 });
    assert_eq!(a.read().await.unwrap().adapters["t"]["a"].len(), 34);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_restarted_keeps_every_acknowledged_proposal() {
    let mut etcd = Etcd::start("restart");
    let store = Arc::new(EtcdStore::connect(&etcd.url(), PREFIX).await.unwrap());
    for i in 0..20 {
        assert_eq!(propose(&store, model(&format!("m{i}"))).await, Reply::Done);
    }

    etcd.kill9();
    // While etcd is down, calls fail (within their timeout) instead of hanging.
    let s = Store::Etcd(store.clone());
    assert!(s.propose(model("during"), Duration::from_millis(500)).await.is_err());
    assert!(s.read(Duration::from_millis(500)).await.is_err());

    etcd.restart();
    let deadline = Instant::now() + WAIT;
    let state = loop {
        match s.read(Duration::from_secs(2)).await {
            Ok(state) => break state,
            Err(e) => assert!(Instant::now() < deadline, "no read after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for i in 0..20 {
        assert!(state.models.contains_key(&format!("m{i}")), "m{i} was lost");
    }
    assert_eq!(propose(&store, model("after")).await, Reply::Done);
    // A new coordinator reads the same state from etcd's disk.
    let other = EtcdStore::connect(&etcd.url(), PREFIX).await.unwrap();
    assert_eq!(other.read().await.unwrap(), store.read().await.unwrap());
}

const TTL: Duration = Duration::from_secs(2);

/// Waits until exactly one of `candidates` leads, one other than `old`, and returns its
/// position; never more than one leads meanwhile.
async fn new_leader(candidates: &[&Leadership], old: Option<usize>, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let leading: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].is_leader()).collect();
        assert!(leading.len() <= 1, "two leaders at once: {leading:?}");
        if let [one] = leading[..]
            && Some(one) != old
        {
            return one;
        }
        assert!(Instant::now() < deadline, "no new leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scheduler_at_a_time_and_another_takes_over_when_it_resigns_or_dies() {
    let etcd = Etcd::start("election");
    let store = EtcdStore::connect(&etcd.url(), PREFIX).await.unwrap();

    // The first holder runs on its own runtime: shutting that down stops its keep-alives
    // without a word to etcd, as if its process died.
    let doomed_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let url = etcd.url();
    let doomed = doomed_rt
        .spawn(async move {
            let store = EtcdStore::connect(&url, PREFIX).await.unwrap();
            let lead = store.campaign("doomed", TTL).await.unwrap();
            (store, lead)
        })
        .await
        .unwrap();
    assert_eq!(new_leader(&[&doomed.1], None, WAIT).await, 0);
    let b = store.campaign("b", TTL).await.unwrap();
    let c = store.campaign("c", TTL).await.unwrap();
    // Over a few renewals, the holder stays the only leader.
    let until = Instant::now() + TTL * 2;
    while Instant::now() < until {
        assert_eq!(new_leader(&[&doomed.1, &b, &c], None, WAIT).await, 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.scheduler().await.unwrap().as_deref(), Some("doomed"));

    let died = Instant::now();
    doomed_rt.shutdown_background();
    // Its handle stops claiming the lead before another candidate gets it.
    let next = new_leader(&[&doomed.1, &b, &c], Some(0), TTL + Duration::from_secs(4)).await;
    let took = died.elapsed();
    assert!(took > Duration::from_millis(500), "took over after {took:?}, before the lease expired");
    eprintln!("took over {took:?} after the holder died (TTL {TTL:?})");

    // The new holder resigns (its handle dropped): the last candidate takes over at once.
    let (holder, last) = if next == 1 { (b, c) } else { (c, b) };
    let resigned = Instant::now();
    drop(holder);
    assert_eq!(new_leader(&[&last], None, TTL + Duration::from_secs(2)).await, 0);
    eprintln!("took over {:?} after the holder resigned", resigned.elapsed());
    assert_eq!(store.scheduler().await.unwrap().as_deref(), Some(last.candidate()));
    drop(doomed);
}

#[tokio::test]
async fn a_bad_url_is_an_error_not_a_panic() {
    for url in [
        "",
        "127.0.0.1:2379",
        "http://127.0.0.1:2379",
        "etcd://",
        "etcd://host:port",
        "etcd://host:99999",
        "etcd://host:0",
        "etcd://a:1,,b:2",
        "etcd://user@host:1",
        "etcd://host:1/path",
        "etcd://[::1",
        "etcd://:2379",
    ] {
        match EtcdStore::connect(url, PREFIX).await {
            Err(Error::Invalid(m)) if m.starts_with("bad etcd URL") => {}
            Err(e) => panic!("{url:?}: {e}"),
            Ok(_) => panic!("{url:?} connected"),
        }
    }
    let endpoints = tandem_coordinator::etcd_store::parse_url("etcd://a:1, b ,[::1]:3").unwrap();
    assert_eq!(endpoints, ["http://a:1", "http://b:2379", "http://[::1]:3"]);

    // Nobody listens there: a connection error, in time.
    let start = Instant::now();
    let opts = EtcdOptions { connect_timeout: Duration::from_millis(500), ..EtcdOptions::default() };
    let unreachable = EtcdStore::connect_with(&format!("etcd://{}", free_addr()), PREFIX, opts).await;
    let refused = matches!(&unreachable, Err(Error::Unavailable(m)) if m.starts_with("cannot reach etcd"));
    assert!(refused, "{:?}", unreachable.err());
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// TLS to the etcd of `files` with client certificate `cert`, `key`.
fn tls(files: &EtcdClientFiles, cert: &std::path::Path, key: &std::path::Path) -> EtcdOptions {
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&files.ca)))
        .identity(Identity::from_pem(read(cert), read(key)));
    EtcdOptions { tls: Some(config), connect_timeout: Duration::from_secs(3), ..EtcdOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_requires_client_certificates_answers_only_its_cas() {
    let (etcd, files) = Etcd::start_tls("tls");
    let store = EtcdStore::connect_with(&etcd.url(), PREFIX, tls(&files, &files.cert, &files.key)).await.unwrap();
    assert_eq!(propose(&store, model("m")).await, Reply::Done);
    assert!(store.read().await.unwrap().models.contains_key("m"));

    let plain = EtcdOptions { connect_timeout: Duration::from_secs(3), ..EtcdOptions::default() };
    let refused = EtcdStore::connect_with(&etcd.url(), PREFIX, plain).await;
    assert!(matches!(&refused, Err(Error::Unavailable(_))), "plain text: {:?}", refused.err());
    let stranger = tls(&files, &files.stranger_cert, &files.stranger_key);
    let refused = EtcdStore::connect_with(&etcd.url(), PREFIX, stranger).await;
    assert!(matches!(&refused, Err(Error::Unavailable(_))), "another CA's certificate: {:?}", refused.err());
}
