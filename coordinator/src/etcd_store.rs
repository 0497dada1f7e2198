//! The cluster's state kept in an existing etcd cluster, for operators who already run one.
//!
//! etcd holds the same ordered log of [`Proposal`]s that the Raft replicas keep, and every
//! coordinator applies it to its own in-memory [`ClusterState`], so both stores share one
//! deterministic state machine and its tests. Under `{prefix}`:
//! - `log/{index:020}`: one proposal (JSON). An append is one transaction that writes the entry
//!   and moves `head` (the last index) only if `head`'s mod revision is the one the appender
//!   saw: two coordinators appending at once never take the same index; the loser learns the
//!   new head from the same transaction and tries the next index.
//! - `snapshot` and `snapshot_index`: every `compact_every` entries, the coordinator that
//!   appended the entry writes its state and deletes the log up to it in one transaction
//!   (guarded so that a slow one never replaces a newer snapshot). A coordinator behind the
//!   snapshot restores from it. etcd itself keeps old revisions until its own compaction: run
//!   etcd with `--auto-compaction-retention`.
//! - `scheduler/…`: the active scheduler's election (etcd's election API over a lease kept
//!   alive by the holder, so a holder that dies loses it after the lease's TTL).
//!
//! Reads are linearizable: a read fetches `head` with a quorum read and applies the log up to
//! it. A proposal, and a snapshot, must fit in etcd's request size limit (`--max-request-bytes`,
//! 1.5 MiB by default).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse,
};
use tokio::sync::{Mutex, mpsc};

use tandem_proto::contract::{ClusterState, Proposal, Reply};

use crate::error::{Error, Result};
use crate::state::StateMachine;

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Log entries between two snapshots (0: never compact).
    pub compact_every: u64,
    /// How long [`EtcdStore::connect_with`] waits for etcd to answer.
    pub connect_timeout: Duration,
    /// TLS to etcd (its CA, and this coordinator's client certificate); none: plain text.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions { compact_every: 1000, connect_timeout: Duration::from_secs(5), tls: None }
    }
}

/// An etcd member, as an operator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdMember {
    pub id: u64,
    pub name: String,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// What [`EtcdStore::status`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdStatus {
    pub members: Vec<EtcdMember>,
    /// The etcd member that leads etcd's Raft group, and its term.
    pub leader: u64,
    pub raft_term: u64,
    /// etcd's current revision.
    pub revision: i64,
    pub version: String,
    /// The last index of the log in etcd.
    pub head: u64,
    /// The index of the last snapshot (the log before it is gone).
    pub snapshot: u64,
    /// The index this store has applied.
    pub applied: u64,
    /// The candidate that holds the scheduler election, if any.
    pub scheduler: Option<String>,
    /// Why the last compaction failed, if it did (the log then grows until one succeeds).
    pub compaction_error: Option<String>,
}

/// Replies kept for proposers that wait on their entry while another task applies it.
const REMEMBERED_REPLIES: usize = 4096;
/// Log entries fetched per request while catching up.
const CATCH_UP_BATCH: i64 = 512;
/// How long a resigning leader waits for etcd to revoke its lease (it expires anyway).
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before a candidate that lost its lease tries again.
const CAMPAIGN_RETRY: Duration = Duration::from_millis(500);

/// The state machine as applied from etcd's log by this coordinator.
struct Applied {
    machine: StateMachine,
    /// Replies of the last entries applied, by index, oldest first.
    replies: VecDeque<(u64, Reply)>,
}

impl Applied {
    fn apply(&mut self, index: u64, p: &Proposal) {
        let reply = self.machine.apply(index, p);
        if self.replies.len() == REMEMBERED_REPLIES {
            self.replies.pop_front();
        }
        self.replies.push_back((index, reply));
    }

    /// The reply to entry `index`. One that went into a snapshot before this store applied it,
    /// and that the state no longer remembers, is lost: the entry was applied, but what it
    /// returned is not known.
    fn reply(&self, index: u64, p: &Proposal) -> Result<Reply> {
        if let Ok(i) = self.replies.binary_search_by_key(&index, |(i, _)| *i) {
            return Ok(self.replies[i].1.clone());
        }
        // The entry came in through a snapshot, which remembers recent replies by request id.
        self.machine
            .remembered(&p.request_id)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("log entry {index} was applied but its reply is no longer known")))
    }
}

/// The log's last index as last seen, with `head`'s mod revision (0: no head yet).
#[derive(Clone, Copy, Default)]
struct Head {
    index: u64,
    revision: i64,
}

/// One coordinator's view of the state kept in etcd.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    options: EtcdOptions,
    /// A guess that an append checks; a wrong one costs a retry.
    head: StdMutex<Head>,
    /// Held while catching up, so entries apply once and in order.
    applied: Mutex<Applied>,
    compaction_error: StdMutex<Option<String>>,
}

/// The endpoints of `etcd://HOST[:PORT][,HOST[:PORT]...]` (port 2379 when left out).
pub fn parse_url(url: &str) -> Result<Vec<String>> {
    let bad = |reason: &str| {
        Error::Invalid(format!("bad etcd URL {url:?}: {reason} (expected etcd://HOST:PORT[,HOST:PORT...])"))
    };
    let hosts = url.trim().strip_prefix("etcd://").ok_or_else(|| bad("the scheme is not etcd://"))?;
    let mut endpoints = Vec::new();
    for host in hosts.trim_end_matches('/').split(',') {
        let host = host.trim();
        if host.is_empty() {
            return Err(bad("a host is empty"));
        }
        if host.contains(|c: char| c == '/' || c == '@' || c == '?' || c == '#' || c.is_whitespace()) {
            return Err(bad(&format!("{host:?} is not HOST[:PORT]")));
        }
        // An IPv6 address is in brackets: [::1]:2379.
        let (name, port) = match host.strip_prefix('[') {
            Some(rest) => {
                let (addr, after) = rest.split_once(']').ok_or_else(|| bad("an unclosed ["))?;
                let port = match after {
                    "" => None,
                    _ => Some(after.strip_prefix(':').ok_or_else(|| bad(&format!("{host:?} is not [ADDR]:PORT")))?),
                };
                (format!("[{addr}]"), port)
            }
            None => match host.split_once(':') {
                Some((name, port)) => (name.to_string(), Some(port)),
                None => (host.to_string(), None),
            },
        };
        if name.is_empty() || name == "[]" {
            return Err(bad(&format!("{host:?} has no host name")));
        }
        let port = match port {
            None => 2379,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(bad(&format!("{p:?} is not a port"))),
            },
        };
        endpoints.push(format!("http://{name}:{port}"));
    }
    Ok(endpoints)
}

/// A value read from etcd that does not decode.
fn corrupt(what: &str) -> impl FnOnce(serde_json::Error) -> Error + '_ {
    move |e| Error::Corrupt(format!("{what}: {e}"))
}

/// A value to write that does not encode.
fn unencodable(what: &str) -> impl FnOnce(serde_json::Error) -> Error + '_ {
    move |e| Error::Internal(format!("encoding the {what}: {e}"))
}

fn parse_index(kv: &KeyValue) -> Result<u64> {
    let text = std::str::from_utf8(kv.value()).ok();
    text.and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| Error::Corrupt(format!("{} is not an index", String::from_utf8_lossy(kv.key()))))
}

/// The key-values a transaction's get returned.
fn got(op: Option<&TxnOpResponse>) -> &[KeyValue] {
    match op {
        Some(TxnOpResponse::Get(r)) => r.kvs(),
        _ => &[],
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `url` (`etcd://HOST:PORT[,HOST:PORT...]`) and keeps the
    /// state under `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        Self::connect_with(url, prefix, EtcdOptions::default()).await
    }

    pub async fn connect_with(url: &str, prefix: &str, options: EtcdOptions) -> Result<Self> {
        let mut endpoints = parse_url(url)?;
        let mut connect_options = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = &options.tls {
            endpoints = endpoints.iter().map(|e| e.replacen("http://", "https://", 1)).collect();
            connect_options = connect_options.with_tls(tls.clone());
        }
        let unreachable =
            |reason: String| Error::Unavailable(format!("cannot reach etcd at {}: {reason}", endpoints.join(",")));
        let client = tokio::time::timeout(options.connect_timeout, Client::connect(&endpoints, Some(connect_options)))
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let store = EtcdStore {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            options,
            head: StdMutex::new(Head::default()),
            applied: Mutex::new(Applied { machine: StateMachine::default(), replies: VecDeque::new() }),
            compaction_error: StdMutex::new(None),
        };
        // The client connects lazily: this first request shows that etcd answers and has a
        // quorum. It creates `snapshot_index`, which compactions compare against.
        let key = store.key("snapshot_index");
        let create = TxnOp::put(key.clone(), "0".repeat(20), None);
        let init = Txn::new().when([Compare::version(key, CompareOp::Equal, 0)]).and_then([create]);
        let mut kv = store.client.kv_client();
        tokio::time::timeout(store.options.connect_timeout, kv.txn(init))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", store.options.connect_timeout)))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(store)
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    fn log_key(&self, index: u64) -> String {
        format!("{}/log/{index:020}", self.prefix)
    }

    /// Appends `p` to the log, waits until this store has applied it and returns its reply.
    pub async fn propose(&self, p: Proposal) -> Result<Reply> {
        let data = serde_json::to_vec(&p).map_err(unencodable("proposal"))?;
        let index = self.append(data).await?;
        let mut applied = self.applied.lock().await;
        self.catch_up(&mut applied, index).await?;
        let reply = applied.reply(index, &p);
        let every = self.options.compact_every;
        let compaction =
            (every > 0 && index % every == 0).then(|| (applied.machine.state().applied, applied.machine.snapshot()));
        drop(applied);
        if let Some((at, snapshot)) = compaction {
            // A failed compaction only leaves the log longer: the next one covers it.
            let result = match snapshot {
                Ok(data) => self.compact(at, data).await,
                Err(e) => Err(unencodable("snapshot")(e)),
            };
            if let Ok(mut slot) = self.compaction_error.lock() {
                *slot = result.err().map(|e| e.to_string());
            }
        }
        reply
    }

    /// A linearizable read: the state with every entry appended before the call applied.
    pub async fn read(&self) -> Result<ClusterState> {
        let mut kv = self.client.kv_client();
        let resp = kv.get(self.key("head"), None).await?;
        let head = match resp.kvs().first() {
            Some(kv) => Head { index: parse_index(kv)?, revision: kv.mod_revision() },
            None => Head::default(),
        };
        self.saw_head(head);
        let mut applied = self.applied.lock().await;
        self.catch_up(&mut applied, head.index).await?;
        Ok(applied.machine.state().clone())
    }

    fn saw_head(&self, head: Head) {
        if let Ok(mut h) = self.head.lock()
            && head.revision > h.revision
        {
            *h = head;
        }
    }

    /// Writes `data` at the next free index and returns it.
    async fn append(&self, data: Vec<u8>) -> Result<u64> {
        let head_key = self.key("head");
        let mut kv = self.client.kv_client();
        loop {
            let seen = self.head.lock().map(|h| *h).unwrap_or_default();
            let index = seen.index + 1;
            let txn = Txn::new()
                .when([Compare::mod_revision(head_key.clone(), CompareOp::Equal, seen.revision)])
                .and_then([
                    TxnOp::put(head_key.clone(), index.to_string(), None),
                    TxnOp::put(self.log_key(index), data.clone(), None),
                ])
                .or_else([TxnOp::get(head_key.clone(), None)]);
            let resp = kv.txn(txn).await?;
            if resp.succeeded() {
                let revision = resp.header().map_or(0, |h| h.revision());
                self.saw_head(Head { index, revision });
                return Ok(index);
            }
            let ops = resp.op_responses();
            let head = got(ops.first()).first().ok_or_else(|| Error::Corrupt(format!("{head_key} vanished")))?;
            let current = Head { index: parse_index(head)?, revision: head.mod_revision() };
            if current.revision <= seen.revision {
                return Err(Error::Corrupt(format!("{head_key} went back to revision {}", current.revision)));
            }
            self.saw_head(current);
        }
    }

    /// Applies the log up to `target`, from the snapshot when the entries needed are gone.
    async fn catch_up(&self, applied: &mut Applied, target: u64) -> Result<()> {
        let mut kv = self.client.kv_client();
        while applied.machine.state().applied < target {
            let from = applied.machine.state().applied + 1;
            let range = GetOptions::new().with_range(self.log_key(target + 1)).with_limit(CATCH_UP_BATCH);
            let resp = kv.get(self.log_key(from), Some(range)).await?;
            let mut next = from;
            for entry in resp.kvs() {
                // Keys sort by index; a gap is a compaction.
                if entry.key() != self.log_key(next).as_bytes() {
                    break;
                }
                let p: Proposal = serde_json::from_slice(entry.value()).map_err(corrupt("log entry"))?;
                applied.apply(next, &p);
                next += 1;
            }
            if next == from {
                self.restore(applied, from).await?;
            }
        }
        Ok(())
    }

    /// Entry `needed` is gone: a compaction took it, so the snapshot covers it.
    async fn restore(&self, applied: &mut Applied, needed: u64) -> Result<()> {
        let resp = self.client.kv_client().get(self.key("snapshot"), None).await?;
        let Some(snap) = resp.kvs().first() else {
            return Err(Error::Corrupt(format!("log entry {needed} is missing and there is no snapshot")));
        };
        let machine = StateMachine::restore(snap.value()).map_err(corrupt("snapshot"))?;
        if machine.state().applied < needed {
            return Err(Error::Corrupt(format!(
                "log entry {needed} is missing and the snapshot is at {}",
                machine.state().applied
            )));
        }
        applied.machine = machine;
        Ok(())
    }

    /// Stores the state at `index` as the snapshot and deletes the log up to it.
    async fn compact(&self, index: u64, data: Vec<u8>) -> Result<()> {
        let at = format!("{index:020}");
        let upto = DeleteOptions::new().with_range(self.log_key(index + 1));
        // Indices are zero-padded, so comparing the text compares the numbers.
        let txn =
            Txn::new().when([Compare::value(self.key("snapshot_index"), CompareOp::Less, at.clone())]).and_then([
                TxnOp::put(self.key("snapshot"), data, None),
                TxnOp::put(self.key("snapshot_index"), at, None),
                TxnOp::delete(self.log_key(0), Some(upto)),
            ]);
        self.client.kv_client().txn(txn).await?;
        Ok(())
    }

    /// The candidate that holds the scheduler election, if any.
    pub async fn scheduler(&self) -> Result<Option<String>> {
        let first = GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend).with_limit(1);
        let resp = self.client.kv_client().get(self.key("scheduler/"), Some(first)).await?;
        Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// etcd's members and leader, and where the log stands.
    pub async fn status(&self) -> Result<EtcdStatus> {
        let members = self.client.cluster_client().member_list().await?;
        let members = members
            .members()
            .iter()
            .map(|m| EtcdMember {
                id: m.id(),
                name: m.name().to_string(),
                client_urls: m.client_urls().to_vec(),
                is_learner: m.is_learner(),
            })
            .collect();
        let etcd = self.client.maintenance_client().status().await?;
        let indices =
            Txn::new().and_then([TxnOp::get(self.key("head"), None), TxnOp::get(self.key("snapshot_index"), None)]);
        let resp = self.client.kv_client().txn(indices).await?;
        let ops = resp.op_responses();
        let index_at = |i: usize| got(ops.get(i)).first().map_or(Ok(0), parse_index);
        let (head, snapshot) = (index_at(0)?, index_at(1)?);
        Ok(EtcdStatus {
            members,
            leader: etcd.leader(),
            raft_term: etcd.raft_term(),
            revision: resp.header().map_or(0, |h| h.revision()),
            version: etcd.version().to_string(),
            head,
            snapshot,
            applied: self.applied.lock().await.machine.state().applied,
            scheduler: self.scheduler().await?,
            compaction_error: self.compaction_error.lock().ok().and_then(|e| e.clone()),
        })
    }

    /// Stands as `candidate` for active scheduler. The returned handle keeps campaigning (and,
    /// once elected, keeps the lease alive) in a background task; dropping it resigns. A holder
    /// that stops renewing loses the election when its lease of `ttl` (at least etcd's minimum,
    /// 2 s by default) expires.
    pub async fn campaign(&self, candidate: &str, ttl: Duration) -> Result<Leadership> {
        let secs = i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).unwrap_or(i64::MAX).max(1);
        let sent = Instant::now();
        // The first lease is granted here, so that an unreachable etcd is an error now.
        let mut leases = self.client.lease_client();
        let grant = leases.grant(secs, None);
        let lease =
            tokio::time::timeout(self.options.connect_timeout, grant).await.map_err(|_| Error::Timeout("etcd"))??;
        let leading = Arc::new(StdMutex::new(None));
        let (stop, stopped) = mpsc::channel(1);
        let campaign = Campaign {
            client: self.client.clone(),
            election: self.key("scheduler"),
            candidate: candidate.to_string(),
            ttl_secs: secs,
            leading: leading.clone(),
        };
        tokio::spawn(campaign.run(Lease { id: lease.id(), ttl: lease.ttl(), sent }, stopped));
        Ok(Leadership { candidate: candidate.to_string(), leading, _stop: stop })
    }
}

/// A candidacy for active scheduler; dropping it resigns.
pub struct Leadership {
    candidate: String,
    /// Until when this candidate surely holds the election (`None`: it does not).
    leading: Arc<StdMutex<Option<Instant>>>,
    /// Dropped with the handle, which stops the campaign.
    _stop: mpsc::Sender<()>,
}

impl Leadership {
    /// Whether this candidate leads. It stops answering yes when its lease may have expired,
    /// which is before etcd lets another candidate in, even if the background task is stuck.
    pub fn is_leader(&self) -> bool {
        self.leading.lock().ok().and_then(|l| *l).is_some_and(|until| Instant::now() < until)
    }

    pub fn candidate(&self) -> &str {
        &self.candidate
    }
}

#[derive(Clone, Copy)]
struct Lease {
    id: i64,
    ttl: i64,
    /// When the request that granted or last renewed it left: it lasts at least `ttl` from then.
    sent: Instant,
}

impl Lease {
    fn until(&self) -> Instant {
        self.sent + Duration::from_secs(u64::try_from(self.ttl).unwrap_or(0))
    }
}

struct Campaign {
    client: Client,
    election: String,
    candidate: String,
    ttl_secs: i64,
    leading: Arc<StdMutex<Option<Instant>>>,
}

impl Campaign {
    fn set_leading(&self, until: Option<Instant>) {
        if let Ok(mut l) = self.leading.lock() {
            *l = until;
        }
    }

    async fn run(self, first: Lease, mut stop: mpsc::Receiver<()>) {
        let mut lease = Some(first);
        loop {
            let current = match lease.take() {
                Some(l) => l,
                None => {
                    let sent = Instant::now();
                    let mut leases = self.client.lease_client();
                    let granted = tokio::select! {
                        _ = stop.recv() => return,
                        r = leases.grant(self.ttl_secs, None) => r,
                    };
                    match granted {
                        Ok(r) => Lease { id: r.id(), ttl: r.ttl(), sent },
                        Err(_) => {
                            tokio::select! {
                                _ = stop.recv() => return,
                                _ = tokio::time::sleep(CAMPAIGN_RETRY) => continue,
                            }
                        }
                    }
                }
            };
            let resigned = tokio::select! {
                _ = stop.recv() => true,
                _ = self.hold(current) => false,
            };
            self.set_leading(None);
            // Revoking deletes the election key at once: the next candidate need not wait out
            // the TTL.
            let _ = tokio::time::timeout(REVOKE_TIMEOUT, self.client.lease_client().revoke(current.id)).await;
            if resigned {
                return;
            }
            tokio::select! {
                _ = stop.recv() => return,
                _ = tokio::time::sleep(CAMPAIGN_RETRY) => {}
            }
        }
    }

    /// Campaigns with `lease` and keeps it alive; returns when the lease cannot be renewed.
    async fn hold(&self, mut lease: Lease) -> Result<Infallible> {
        let ttl = Duration::from_secs(u64::try_from(lease.ttl).unwrap_or(1).max(1));
        let sent = Instant::now();
        let (mut keeper, mut renewals) = self.client.lease_client().keep_alive(lease.id).await?;
        lease.sent = sent;
        let mut election = self.client.election_client();
        let campaign = election.campaign(self.election.as_str(), self.candidate.as_str(), lease.id);
        tokio::pin!(campaign);
        let mut elected = false;
        let mut renew = tokio::time::interval(ttl / 3);
        loop {
            tokio::select! {
                r = &mut campaign, if !elected => {
                    r?;
                    elected = true;
                }
                _ = renew.tick() => {
                    let sent = Instant::now();
                    let renewed = tokio::time::timeout(ttl / 3, async {
                        keeper.keep_alive().await?;
                        renewals.message().await
                    });
                    match renewed.await {
                        Err(_) => return Err(Error::Timeout("etcd")),
                        Ok(Err(e)) => return Err(e.into()),
                        Ok(Ok(Some(r))) if r.ttl() > 0 => lease = Lease { ttl: r.ttl(), sent, ..lease },
                        Ok(Ok(_)) => return Err(Error::Unavailable(format!("lost the lease: lease {:x} expired", lease.id))),
                    }
                }
            }
            if elected {
                self.set_leading(Some(lease.until()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests unwrap by design

    use super::*;
    use tandem_proto::contract::Command;

    fn model(request_id: &str, name: &str) -> Proposal {
        Proposal::new(request_id, Command::RegisterModel { name: name.into(), uri: "/m".into() })
    }

    /// A store's own entry that reached it only inside a snapshot still gets its reply, from
    /// the replies the state remembers; one the state forgot is an error, not a wrong reply.
    #[test]
    fn a_reply_skipped_by_a_snapshot_comes_from_the_state() {
        let mut snapshot = StateMachine::default();
        let mine = model("mine", "m");
        snapshot.apply(1, &mine);
        snapshot.apply(2, &model("other", "n"));
        let applied = Applied { machine: snapshot, replies: VecDeque::new() };
        assert_eq!(applied.reply(1, &mine).unwrap(), Reply::Done);
        let lost = applied.reply(3, &model("forgotten", "x"));
        assert!(matches!(&lost, Err(Error::Internal(m)) if m.starts_with("log entry 3 was applied")), "{lost:?}");
    }
}
