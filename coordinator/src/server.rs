//! A coordinator process: its store (a Raft replica, or etcd), and one gRPC address that carries
//! both the Raft traffic between coordinators and the cluster API (a request sent to a follower
//! is forwarded to the leader), the workers' leases and the scheduler, run by the leader. Raft
//! messages leave through per-peer queues drained by async tasks, so the Ready loop never waits
//! on the network.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::Message;
use tandem_proto::cluster_server::{Cluster, ClusterServer};
use tandem_proto::contract::{
    ClusterState, Command, GroupStatus, Heartbeat, Leader, LeaderTransfer, LeaseGrant, Member, Members,
    MembershipChange, Proposal, Reply, StatusRequest, WorkerLease, WorkerLoad, WorkerRegistration, WorkerView,
    check_addr, fresh_id,
};
use tandem_proto::tls::Caller;
use tandem_proto::v1::raft_client::RaftClient;
use tandem_proto::v1::raft_server::{Raft, RaftServer};
use tandem_proto::v1::{RaftAck, RaftMessage};
use tandem_proto::{ClusterClient, Role, Security};
use tandem_proto::{health_port, metrics_port};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result, joined};
use crate::etcd_store::{EtcdOptions, EtcdStore, Leadership};
use crate::gateway::{self, Gateway, GatewayOptions};
use crate::metrics;
use crate::placement::schedule;
use crate::replica::{Inbox, Replica, Timing, Transport};
use crate::store::Store;

/// How long a proposal or a read may wait for the group.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `1=host:port,2=host:port,...`: every coordinator's id and gRPC address.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (id, addr) =
            part.split_once('=').ok_or_else(|| Error::Invalid(format!("peer {part:?} is not ID=HOST:PORT")))?;
        let id: u64 = id.trim().parse().map_err(|_| Error::Invalid(format!("peer id {id:?} is not a number")))?;
        if id == 0 {
            return Err(Error::Invalid("peer ids start at 1".into()));
        }
        check_addr("peer address", addr.trim(), false)?;
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(Error::Invalid(format!("peer {id} given twice")));
        }
    }
    if peers.is_empty() {
        return Err(Error::Invalid("no peers given".into()));
    }
    Ok(peers)
}

/// Coordinators' addresses: those on this coordinator's command line first (that is how it
/// reaches them), then those replicated with the membership changes that added the others, then
/// those the others' messages said.
#[derive(Clone)]
struct AddressBook {
    given: BTreeMap<u64, String>,
    learned: Arc<Mutex<BTreeMap<u64, String>>>,
    /// Addresses the members' own Raft messages gave, for members neither given nor learned
    /// yet: a follower behind the change that added a new leader must still answer it, or it
    /// never receives that change.
    heard: Arc<Mutex<BTreeMap<u64, String>>>,
}

impl AddressBook {
    fn new(given: BTreeMap<u64, String>) -> Self {
        AddressBook { given, learned: Arc::default(), heard: Arc::default() }
    }

    fn get(&self, id: u64) -> Option<String> {
        (self.given.get(&id).cloned())
            .or_else(|| self.learned.lock().ok()?.get(&id).cloned())
            .or_else(|| self.heard.lock().ok()?.get(&id).cloned())
    }

    /// Keeps `addr` for coordinator `id` when no other address of it is known.
    fn hear(&self, id: u64, addr: &str) {
        if !addr.is_empty()
            && self.get(id).is_none()
            && let Ok(mut heard) = self.heard.lock()
        {
            heard.insert(id, addr.to_string());
        }
    }

    fn members(&self, voters: &[u64]) -> Vec<Member> {
        voters.iter().map(|&id| Member { id, addr: self.get(id).unwrap_or_default() }).collect()
    }
}

/// Sends Raft messages to peers over gRPC, one queue and task per peer, started when the first
/// message for that peer leaves.
struct GrpcTransport {
    book: AddressBook,
    /// This coordinator's own address, sent with every message.
    own: String,
    queues: Mutex<HashMap<u64, mpsc::UnboundedSender<Message>>>,
    rt: tokio::runtime::Handle,
    security: Security,
}

impl Transport for GrpcTransport {
    fn send(&self, msg: Message) {
        let Ok(mut queues) = self.queues.lock() else { return };
        let queue = match queues.entry(msg.to) {
            Entry::Occupied(q) => q.into_mut(),
            Entry::Vacant(slot) => {
                let Some(addr) = self.book.get(msg.to) else { return };
                let Ok(endpoint) = self.security.endpoint(&addr, Role::Coordinator) else { return };
                let endpoint = endpoint.connect_timeout(Duration::from_millis(500)).timeout(Duration::from_secs(2));
                let (tx, rx) = mpsc::unbounded_channel();
                self.rt.spawn(drain(endpoint, self.own.clone(), rx));
                slot.insert(tx)
            }
        };
        let _ = queue.send(msg);
    }

    fn set_addresses(&self, addresses: &BTreeMap<u64, String>) {
        if let Ok(mut learned) = self.book.learned.lock() {
            *learned = addresses.clone();
        }
    }
}

/// Calls to one peer in flight at once: more means the link is down or saturated, and later
/// messages wait for a free one.
const RAFT_CALLS_IN_FLIGHT: usize = 64;

/// Delivers one peer's queue, each message in a call of its own, without waiting for the
/// answers to earlier ones: on a link with a round trip of 100 ms, one call at a time would
/// deliver ten messages a second, fewer than a leader sends, and heartbeats would arrive later
/// and later until followers call elections. The calls share one HTTP/2 connection in the
/// order they are made; Raft copes with the rare one overtaken, and with those lost when the
/// peer is down (it resends).
async fn drain(endpoint: tonic::transport::Endpoint, own: String, mut rx: mpsc::UnboundedReceiver<Message>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(RAFT_CALLS_IN_FLIGHT));
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut client: Option<RaftClient<tonic::transport::Channel>> = None;
    while let Some(msg) = rx.recv().await {
        let Ok(bytes) = msg.write_to_bytes() else { continue };
        if broken.swap(false, std::sync::atomic::Ordering::Relaxed) {
            client = None;
        }
        if client.is_none() {
            client = endpoint.connect().await.ok().map(RaftClient::new);
        }
        let (Some(mut c), Ok(permit)) = (client.clone(), in_flight.clone().acquire_owned().await) else { continue };
        let (own, broken) = (own.clone(), broken.clone());
        tokio::spawn(async move {
            if c.step(RaftMessage { message: bytes, from_addr: own }).await.is_err() {
                broken.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
        });
    }
}

struct RaftService {
    /// This coordinator's Raft id: messages must be addressed to it.
    id: u64,
    inbox: Inbox,
    /// Learns where a sender not yet in it listens.
    book: AddressBook,
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn step(&self, req: Request<RaftMessage>) -> Result<Response<RaftAck>, Status> {
        let caller = Caller::of(&req);
        caller.require("Raft.Step", &[Role::Coordinator])?;
        let RaftMessage { message, from_addr } = req.into_inner();
        let msg =
            Message::parse_from_bytes(&message).map_err(|e| Status::invalid_argument(format!("raft message: {e}")))?;
        // A coordinator speaks for itself only: its certificate is named by its Raft id.
        if !caller.is(Role::Coordinator, Some(&msg.from.to_string())) {
            return Err(Status::permission_denied(format!("a Raft message from {} needs its certificate", msg.from)));
        }
        if msg.to != self.id {
            return Err(Status::invalid_argument(format!("a Raft message to {} sent to {}", msg.to, self.id)));
        }
        self.book.hear(msg.from, &from_addr);
        if !self.inbox.deliver(msg) {
            return Err(Status::unavailable("this coordinator is stopping"));
        }
        Ok(Response::new(RaftAck {}))
    }
}

/// Workers' leases, kept by the leader in memory, by worker id.
#[derive(Debug)]
struct Leases {
    lease: Duration,
    seen: Mutex<BTreeMap<String, Seen>>,
}

/// When a worker was last heard from, and what its last heartbeat said it was doing.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    load: Option<WorkerLoad>,
}

/// How long ago each worker was last heard from, as the leader's lease keeping sees it (a
/// follower's table is empty: it keeps no leases).
#[derive(Debug)]
struct LeaseAges(Arc<Leases>);

impl prometheus_client::collector::Collector for LeaseAges {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let seen = self.0.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let ages = seen.into_iter().map(|(w, s)| (vec![("worker", w)], s.at.elapsed().as_secs_f64()));
        let help = "Seconds since each worker's last heartbeat (leases kept by this coordinator).";
        metrics::encode(&mut encoder, "tandem:worker_lease_age_seconds", help, &metrics::gauges(ages))?;
        let lease = metrics::gauges([(Vec::new(), self.0.lease.as_secs_f64())]);
        metrics::encode(&mut encoder, "tandem:worker_lease_seconds", "How long a worker's lease lasts.", &lease)
    }
}

impl Leases {
    fn new(lease: Duration) -> Self {
        Leases { lease, seen: Mutex::default() }
    }

    /// Worker `worker` was heard from now; `load`: what it said it was doing (none: what it
    /// said last still holds).
    fn renew(&self, worker: &str, load: Option<WorkerLoad>) {
        if let Ok(mut seen) = self.seen.lock() {
            let entry = seen.entry(worker.to_string()).or_insert(Seen { at: Instant::now(), load: None });
            entry.at = Instant::now();
            entry.load = load.or(entry.load.take());
        }
    }

    /// Every worker's lease, by id.
    fn table(&self) -> Vec<WorkerLease> {
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        (seen.into_iter())
            .map(|(worker_id, s)| WorkerLease {
                worker_id,
                heard_ms_ago: s.at.elapsed().as_millis() as u64,
                load: s.load,
            })
            .collect()
    }
}

/// Who leads: the Raft leader, or with the etcd store, the holder of the scheduler election. The
/// leader keeps the workers' leases; requests about leases (and, with Raft, proposals) sent to
/// another coordinator are forwarded to it.
enum Lead {
    Raft { replica: Arc<Replica>, book: AddressBook, transfer_timeout: Duration },
    Etcd { store: Arc<EtcdStore>, leadership: Leadership, url: String },
}

impl Lead {
    /// While this coordinator leads: a number that changes when it starts leading again (the
    /// Raft term; with etcd, leadership is lost on the way, which the lease monitor notices).
    fn leading(&self) -> Option<u64> {
        match self {
            Lead::Raft { replica, .. } => {
                let s = replica.status();
                s.is_leader.then_some(s.term)
            }
            Lead::Etcd { leadership, .. } => leadership.is_leader().then_some(0),
        }
    }

    async fn leader_addr(&self) -> Option<String> {
        match self {
            Lead::Raft { replica, book, .. } => book.get(replica.status().leader),
            Lead::Etcd { store, .. } => store.scheduler().await.ok().flatten(),
        }
    }
}

/// Who may change the group and mint what an operator mints: an operator, or a coordinator
/// forwarding an operator's call to the leader (every coordinator checks its caller before it
/// forwards).
const OPERATOR: &[Role] = &[Role::Operator, Role::Coordinator];

/// A worker registers and heartbeats as its own name only; an operator or a forwarding
/// coordinator may for any.
fn as_worker(caller: &Caller, worker_id: &str) -> Result<(), Status> {
    if caller.is(Role::Worker, Some(worker_id)) || OPERATOR.iter().any(|&r| caller.is(r, None)) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "only worker {worker_id:?}'s own certificate registers and heartbeats as it"
    )))
}

/// What a worker may propose: reports of a job whose current attempt is its own, and news of a
/// worker group it is a rank of.
fn worker_may_propose(state: &ClusterState, caller: &Caller, command: &Command) -> bool {
    match command {
        Command::ReportJob { id, .. } => (state.jobs.get(id).and_then(|j| j.attempts.last()))
            .is_some_and(|a| caller.is(Role::Worker, Some(&a.worker))),
        Command::GroupFormed { group, .. } | Command::GroupFailed { group, .. } => {
            (state.placements.get(group)).is_some_and(|p| p.workers.iter().any(|w| caller.is(Role::Worker, Some(w))))
        }
        _ => false,
    }
}

struct ClusterService {
    store: Store,
    lead: Arc<Lead>,
    leases: Arc<Leases>,
    /// One client per leader address seen, reused by every forwarded request.
    leaders: Mutex<HashMap<String, ClusterClient>>,
    security: Security,
}

impl ClusterService {
    /// A client of the leader, to forward a request to (once: the leader does not forward).
    async fn forward(&self) -> Result<ClusterClient, Status> {
        let addr = self.lead.leader_addr().await.ok_or_else(|| Status::unavailable("no leader known yet; retry"))?;
        let mut leaders = self.leaders.lock().map_err(|_| Status::internal("leader clients poisoned"))?;
        if let Some(c) = leaders.get(&addr) {
            return Ok(c.clone());
        }
        let client = ClusterClient::new(&addr, &self.security)
            .map_err(|e| Status::unavailable(format!("leader at {addr}: {e}")))?;
        leaders.insert(addr, client.clone());
        Ok(client)
    }

    fn leads(&self) -> bool {
        self.lead.leading().is_some()
    }

    /// The Raft replica, for what only a Raft group has (membership, leader transfer).
    fn raft(&self) -> Result<(&Arc<Replica>, &AddressBook, Duration), Status> {
        match &*self.lead {
            Lead::Raft { replica, book, transfer_timeout } => Ok((replica, book, *transfer_timeout)),
            Lead::Etcd { .. } => {
                Err(Status::failed_precondition("this group keeps its state in etcd: change etcd's members there"))
            }
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn propose(&self, req: Request<Proposal>) -> Result<Response<Reply>, Status> {
        let caller = Caller::of(&req);
        let p = req.into_inner();
        p.command.validate().map_err(|e| Status::invalid_argument(e.0))?;
        if !caller.is(Role::Coordinator, None) && !caller.is(Role::Operator, None) {
            let state = self.store.read(REQUEST_TIMEOUT).await.map_err(Status::from)?;
            if !worker_may_propose(&state, &caller, &p.command) {
                return Err(Status::permission_denied(
                    "a worker proposes reports of its own jobs and groups only; anything else needs an operator certificate",
                ));
            }
        }
        match self.store.propose(p.clone(), REQUEST_TIMEOUT).await {
            Ok(reply) => Ok(Response::new(reply)),
            Err(Error::NotLeader { .. }) => Ok(Response::new(self.forward().await?.propose_as(p).await?)),
            Err(e) => Err(e.into()),
        }
    }

    async fn register_worker(&self, req: Request<WorkerRegistration>) -> Result<Response<LeaseGrant>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        as_worker(&caller, &r.worker_id)?;
        if !self.leads() {
            let lease = self.forward().await?.register_worker(r).await?;
            return Ok(Response::new(LeaseGrant { lease_ms: lease.as_millis() as u64 }));
        }
        let id = r.worker_id.clone();
        let command =
            Command::RegisterWorker { id: id.clone(), addr: r.addr, gpus: r.gpus, collective_addr: r.collective_addr };
        command.validate().map_err(|e| Status::invalid_argument(e.0))?;
        let p = Proposal::new(fresh_id(&format!("register-{id}")), command);
        match self.store.propose(p, REQUEST_TIMEOUT).await.map_err(Status::from)? {
            Reply::Refused { reason } => Err(Status::failed_precondition(reason)),
            _ => {
                tracing::info!(worker = %id, "worker registered");
                self.leases.renew(&id, None);
                Ok(Response::new(LeaseGrant { lease_ms: self.leases.lease.as_millis() as u64 }))
            }
        }
    }

    async fn heartbeat(&self, req: Request<Heartbeat>) -> Result<Response<WorkerView>, Status> {
        let caller = Caller::of(&req);
        let Heartbeat { worker_id, load } = req.into_inner();
        as_worker(&caller, &worker_id)?;
        if !self.leads() {
            return Ok(Response::new(self.forward().await?.heartbeat(&worker_id, load).await?));
        }
        let state = self.store.read(REQUEST_TIMEOUT).await.map_err(Status::from)?;
        if !state.workers.get(&worker_id).is_some_and(|w| w.alive) {
            return Err(Status::not_found(format!("worker {worker_id:?} has no lease: register again")));
        }
        self.leases.renew(&worker_id, load);
        Ok(Response::new(state.worker_view(&worker_id, self.leases.lease.as_millis() as u64)))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<GroupStatus>, Status> {
        Caller::of(&req).require("Status", &Role::ALL)?;
        let state = match req.into_inner().with_state {
            true => self.store.read(Duration::from_secs(2)).await.ok(),
            false => None,
        };
        let leases = if self.leads() { self.leases.table() } else { Vec::new() };
        let status = match &*self.lead {
            Lead::Raft { replica, book, .. } => {
                let s = replica.status();
                GroupStatus {
                    id: s.id,
                    leader: s.leader,
                    term: s.term,
                    commit: s.commit,
                    applied: s.applied,
                    members: book.members(&s.voters),
                    voters: s.voters,
                    state,
                    store: "raft".into(),
                    leases,
                }
            }
            // etcd's members, leader and term; the log's head as the commit index.
            Lead::Etcd { store, url, .. } => {
                let s = store.status().await.map_err(Status::from)?;
                let members: Vec<Member> = (s.members.iter())
                    .map(|m| Member { id: m.id, addr: m.client_urls.first().cloned().unwrap_or_default() })
                    .collect();
                GroupStatus {
                    id: 0,
                    leader: s.leader,
                    term: s.raft_term,
                    commit: s.head,
                    applied: s.applied,
                    voters: members.iter().map(|m| m.id).collect(),
                    members,
                    state,
                    store: url.clone(),
                    leases,
                }
            }
        };
        Ok(Response::new(status))
    }

    async fn change_members(&self, req: Request<MembershipChange>) -> Result<Response<Members>, Status> {
        Caller::of(&req).require("ChangeMembers", OPERATOR)?;
        let req = req.into_inner();
        let (replica, book, _) = self.raft()?;
        if !self.leads() {
            let members = self.forward().await?.change_members(req.add, req.remove).await?;
            return Ok(Response::new(Members { members }));
        }
        let mut add = BTreeMap::new();
        for m in &req.add {
            if m.id == 0 || check_addr("member address", &m.addr, false).is_err() {
                return Err(Status::invalid_argument(format!(
                    "member {} at {:?}: need an id > 0 and HOST:PORT",
                    m.id, m.addr
                )));
            }
            add.insert(m.id, m.addr.clone());
        }
        let voters = replica.status().voters;
        if let Some(id) = req.remove.iter().find(|id| !voters.contains(id)) {
            return Err(Status::not_found(format!("coordinator {id} is not a member")));
        }
        if voters.iter().filter(|v| !req.remove.contains(v)).count() + add.len() == 0 {
            return Err(Status::invalid_argument("the change would leave no member"));
        }
        let (replica, remove) = (replica.clone(), req.remove);
        let voters =
            joined(tokio::task::spawn_blocking(move || replica.change_members(&add, &remove, REQUEST_TIMEOUT)).await)
                .map_err(Status::from)?;
        Ok(Response::new(Members { members: book.members(&voters) }))
    }

    async fn transfer_leader(&self, req: Request<LeaderTransfer>) -> Result<Response<Leader>, Status> {
        Caller::of(&req).require("TransferLeader", OPERATOR)?;
        let LeaderTransfer { to } = req.into_inner();
        let (replica, _, transfer_timeout) = self.raft()?;
        if !self.leads() {
            return Ok(Response::new(Leader { leader: self.forward().await?.transfer_leader(to).await? }));
        }
        if !replica.status().voters.contains(&to) {
            return Err(Status::not_found(format!("coordinator {to} is not a member")));
        }
        replica.transfer_leader(to);
        let deadline = Instant::now() + transfer_timeout;
        loop {
            let leader = replica.status().leader;
            if leader == to {
                return Ok(Response::new(Leader { leader }));
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!("coordinator {to} did not take over")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// While this coordinator leads: marks dead the alive workers not heard from for a whole lease
/// (a new leader first gives every worker a full lease: it has not seen their heartbeats), and
/// places queued jobs (those of dead workers among them) on alive workers.
async fn supervise(store: Store, lead: Arc<Lead>, leases: Arc<Leases>) {
    let mut led = None;
    loop {
        tokio::time::sleep(leases.lease / 4).await;
        let Some(leading) = lead.leading() else {
            led = None;
            continue;
        };
        let Ok(state) = store.read(leases.lease).await else { continue };
        let now = Instant::now();
        let mut expired = Vec::new();
        if let Ok(mut seen) = leases.seen.lock() {
            if led != Some(leading) {
                led = Some(leading);
                for id in state.workers.keys() {
                    seen.entry(id.clone()).or_insert(Seen { at: now, load: None }).at = now;
                }
            }
            for (id, w) in &state.workers {
                let last = seen.entry(id.clone()).or_insert(Seen { at: now, load: None }).at;
                if w.alive && now.duration_since(last) > leases.lease {
                    expired.push(id.clone());
                }
            }
        }
        for id in &expired {
            tracing::warn!(worker = %id, "lease expired: marking the worker dead");
            let command = Command::MarkWorkerDead { id: id.clone() };
            let _ = store.propose(Proposal::new(fresh_id(&format!("dead-{id}")), command), REQUEST_TIMEOUT).await;
        }
        let Ok(state) = (if expired.is_empty() { Ok(state) } else { store.read(leases.lease).await }) else { continue };
        for (job, worker) in schedule(&state) {
            // A fresh request id each time: the state machine remembers its answer to an id, so
            // a placement refused once (its worker marked dead meanwhile) would be refused under
            // that id for ever. Placing twice cannot happen: only a queued job is placed.
            let request_id = fresh_id(&format!("place-{job}"));
            let command = Command::PlaceJob { id: job, worker };
            let _ = store.propose(Proposal::new(request_id, command), REQUEST_TIMEOUT).await;
        }
    }
}

/// How to run one coordinator.
pub struct Options {
    /// Its Raft id, one of `peers`.
    pub id: u64,
    /// Every founding coordinator's gRPC address (this one's is where it listens); others that
    /// join later are learned from the log.
    pub peers: BTreeMap<u64, String>,
    /// Where its Raft log lives.
    pub dir: PathBuf,
    pub timing: Timing,
    /// How long a worker stays alive without a heartbeat.
    pub lease: Duration,
    /// Start empty and wait to be added to a running group instead of founding one.
    pub join: bool,
    /// `etcd://HOST:PORT[,...]`: keep the state in this etcd cluster instead of a Raft log.
    pub etcd: Option<String>,
    /// TLS to that etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`); none: plain text.
    pub etcd_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Serve the HTTP gateway.
    pub http: Option<GatewayOptions>,
    /// Serve this process's metrics here (`--metrics`).
    pub metrics: Option<SocketAddr>,
    /// Answer health probes here (`--health`): ready while a quorum answers.
    pub health: Option<SocketAddr>,
    /// Where it listens for gRPC (`--listen`); none: its own address among `peers` (which
    /// may then be a name, as a Kubernetes Service gives, when this is set).
    pub listen: Option<SocketAddr>,
    /// How it answers and reaches the cluster's other processes.
    pub security: Security,
}

/// How a Raft coordinator's replica reaches the others.
pub enum RaftLinks {
    /// gRPC to the peers' addresses (`tandem.v1.Raft`): every real cluster.
    Grpc,
    /// A network the caller runs, such as a test's in-memory one that drops and cuts links:
    /// the replica sends with `transport`, and `connect` is handed its inbox to deliver to.
    /// Coordinators that join later are not learned by it: a group of founders only.
    Given { transport: Box<dyn Transport>, connect: Box<dyn FnOnce(Inbox) + Send> },
}

/// Where an etcd-backed group keeps its keys.
const ETCD_PREFIX: &str = "/tandem";

/// Runs a coordinator until `shutdown` resolves.
pub async fn serve(opts: Options, shutdown: impl std::future::Future<Output = ()> + Send) -> Result<()> {
    serve_with(opts, RaftLinks::Grpc, shutdown).await
}

/// [`serve`], its Raft messages carried by `links`.
pub async fn serve_with(
    opts: Options,
    links: RaftLinks,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let id = opts.id;
    let own = opts.peers.get(&id).ok_or_else(|| Error::Invalid(format!("coordinator {id} is not among the peers")))?;
    let own = own.clone();
    let addr: SocketAddr = match opts.listen {
        Some(listen) => listen,
        None => own.parse().map_err(|e| {
            Error::Invalid(format!("address of coordinator {id} ({own:?}): {e} (a name needs --listen IP:PORT)"))
        })?,
    };
    let security = opts.security.clone();
    let mut server = security.server(tonic::transport::Server::builder()).map_err(|e| Error::Invalid(e.to_string()))?;
    let (store, lead, raft) = match opts.etcd {
        Some(url) => {
            let options = EtcdOptions { tls: opts.etcd_tls, ..EtcdOptions::default() };
            let store = Arc::new(EtcdStore::connect_with(&url, ETCD_PREFIX, options).await?);
            // The candidate's name is its address: the others forward lease requests there.
            let leadership = store.campaign(&own, opts.lease.max(Duration::from_secs(2))).await?;
            (Store::Etcd(store.clone()), Lead::Etcd { store, leadership, url }, None)
        }
        None => {
            let founders: Vec<u64> = if opts.join { Vec::new() } else { opts.peers.keys().copied().collect() };
            let book = AddressBook::new(opts.peers);
            let replica = match links {
                RaftLinks::Grpc => {
                    let rt = tokio::runtime::Handle::current();
                    let transport = GrpcTransport {
                        book: book.clone(),
                        own: own.clone(),
                        queues: Mutex::default(),
                        rt,
                        security: security.clone(),
                    };
                    Replica::start(id, &founders, &opts.dir, transport, opts.timing)?
                }
                RaftLinks::Given { transport, connect } => {
                    let replica = Replica::start(id, &founders, &opts.dir, transport, opts.timing)?;
                    connect(replica.inbox());
                    replica
                }
            };
            let replica = Arc::new(replica);
            let raft = RaftService { id, inbox: replica.inbox(), book: book.clone() };
            let transfer_timeout = opts.timing.tick * (4 * opts.timing.election_ticks) as u32;
            (Store::Raft(replica.clone()), Lead::Raft { replica, book, transfer_timeout }, Some(raft))
        }
    };
    let lead = Arc::new(lead);
    let leases = Arc::new(Leases::new(opts.lease));
    let gateway_metrics = opts.http.as_ref().map(|http| gateway::Metrics::new(http.top_adapters));
    let registry = metrics::registry(&store, |r| {
        r.register_collector(Box::new(LeaseAges(leases.clone())));
        gateway_metrics.iter().for_each(|m| m.register(r));
    });
    let metrics_port = match opts.metrics {
        Some(addr) => {
            let registry = registry.clone();
            let render: metrics_port::Render = Arc::new(move || {
                let registry = registry.clone();
                Box::pin(async move { metrics::text(&[&registry]) })
            });
            let port = metrics_port::spawn(addr, &security, render).await;
            Some(port.map_err(|e| Error::Unavailable(format!("--metrics {addr}: {e}")))?)
        }
        None => None,
    };
    let health_port = match opts.health {
        Some(addr) => {
            let store = store.clone();
            let ready: health_port::Ready = Arc::new(move || {
                let store = store.clone();
                Box::pin(async move {
                    store.read(Duration::from_secs(2)).await.map(drop).map_err(|e| format!("no quorum: {e}"))
                })
            });
            let port = health_port::spawn(addr, ready).await;
            Some(port.map_err(|e| Error::Unavailable(format!("--health {addr}: {e}")))?)
        }
        None => None,
    };
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = match (opts.http, gateway_metrics) {
        (Some(http), Some(gateway_metrics)) => {
            let addr = http.addr;
            let listener = (tokio::net::TcpListener::bind(addr).await)
                .map_err(|e| Error::Unavailable(format!("--http {addr}: {e}")))?;
            let cluster = ClusterClient::new(&own, &security)?;
            let gateway = Gateway::new(store.clone(), cluster, security.clone(), &http, gateway_metrics, registry);
            let stopped = async move {
                let _ = http_stopped.await;
            };
            let task = tokio::spawn(gateway::listen::serve(listener, gateway::router(gateway), http.tls, stopped));
            Some(task)
        }
        _ => None,
    };
    let monitor = tokio::spawn(supervise(store.clone(), lead.clone(), leases.clone()));
    // A replica whose log cannot be written (a full or failing disk) has stopped: the process
    // stops too, with the reason, so that its supervisor restarts it and the restart recovers
    // from what the disk holds, instead of a process that answers but never applies again.
    let failed = Arc::new(Mutex::new(None));
    // The gateway drains first (its requests in flight need this replica and its gRPC), then
    // the rest stops.
    let drained = Arc::new(Mutex::new(None));
    let stop = {
        let (store, failed, drained) = (store.clone(), failed.clone(), drained.clone());
        async move {
            tokio::select! {
                () = shutdown => {}
                why = replica_stopped(store) => *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why),
            }
            let _ = stop_http.send(());
            if let Some(http) = http {
                *drained.lock().unwrap_or_else(|e| e.into_inner()) = Some(http.await);
            }
        }
    };
    let cluster = ClusterService { store, lead, leases, leaders: Mutex::default(), security };
    server
        .add_optional_service(raft.map(RaftServer::new))
        .add_service(ClusterServer::new(cluster))
        .serve_with_shutdown(addr, stop)
        .await
        .map_err(|e| Error::Unavailable(format!("serving gRPC on {addr}: {e}")))?;
    monitor.abort();
    metrics_port.inspect(|port| port.abort());
    health_port.inspect(|port| port.abort());
    if let Some(served) = drained.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let served = served.map_err(|e| Error::Internal(format!("the HTTP gateway's task: {e}")))?;
        served.map_err(|e| Error::Unavailable(format!("the HTTP gateway: {e}")))?;
    }
    match failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(why) => Err(Error::Unavailable(format!("the Raft replica stopped: {why}"))),
        None => Ok(()),
    }
}

/// Resolves with the reason once this coordinator's Raft replica has stopped (never for an
/// etcd-backed group, whose store is etcd's to keep).
async fn replica_stopped(store: Store) -> String {
    let Store::Raft(replica) = store else { return std::future::pending().await };
    loop {
        if let Some(why) = replica.status().stopped {
            return why;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
