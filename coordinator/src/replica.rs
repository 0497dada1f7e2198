//! One coordinator's Raft replica: raft-rs's `RawNode` over the durable log, driven by a Ready
//! loop on its own thread. The loop follows raft-rs's contract: entries and the hard state are
//! on disk before the messages that depend on them leave, committed entries are applied to the
//! [`ClusterState`] in log order, and the application reports back (`advance`). Proposals carry
//! request ids (a retry applies once); reads go through ReadIndex, so a partitioned replica
//! that still believes it leads never answers one. The transport is a trait: gRPC between
//! processes, channels in tests.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use raft::eraftpb::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType, Snapshot, SnapshotMetadata,
};
use raft::{Config, RawNode, SnapshotStatus, StateRole};

use crate::error::{Error, Result};
use crate::raft_log::DiskStorage;
use opentelemetry::KeyValue;
use tandem_proto::contract::{ClusterState, Proposal, Reply};
use tandem_proto::trace_context::Hindsight;

use crate::metrics::Proposals;
use crate::state::StateMachine;

/// Sends Raft messages to other replicas (best effort: Raft retries).
pub trait Transport: Send + 'static {
    fn send(&self, msg: Message);

    /// The addresses of coordinators that joined after the group started (replicated with the
    /// membership changes that added them), whenever they change.
    fn set_addresses(&self, _addresses: &BTreeMap<u64, String>) {}
}

impl Transport for Box<dyn Transport> {
    fn send(&self, msg: Message) {
        (**self).send(msg)
    }

    fn set_addresses(&self, addresses: &BTreeMap<u64, String>) {
        (**self).set_addresses(addresses)
    }
}

/// What a replica reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub id: u64,
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub is_leader: bool,
    pub voters: Vec<u64>,
    /// Callers waiting for a proposal, a read or a membership change.
    pub waiting: usize,
    /// Why the loop stopped, if it did (its log could not be written).
    pub stopped: Option<String>,
    /// Size of the last snapshot of the state (taken at start or at a compaction).
    pub snapshot_bytes: usize,
}

/// Timing of the loop: one tick, the ticks to an election (randomized by raft-rs in
/// `[election, 2 * election)`) and between heartbeats, and the entries applied between two
/// compactions of the log into a snapshot. The default tick of 50 ms puts an election
/// 0.5-1 s after a leader falls silent: coordinators share a data-centre network (a round trip
/// of a millisecond), so ten heartbeats missed in a row mean the leader is gone, and the
/// cluster's writes stop for half as long as under etcd's 1 s default.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub compact_every: u64,
}

impl Timing {
    pub const DEFAULT: Timing =
        Timing { tick: Duration::from_millis(50), election_ticks: 10, heartbeat_ticks: 2, compact_every: 1000 };
}

impl Default for Timing {
    fn default() -> Self {
        Timing::DEFAULT
    }
}

enum Event {
    Raft(Message),
    /// Answered with what applying it returned, and when it was committed.
    Propose(Box<Proposal>, Waiter<(Reply, Instant)>),
    Read(Waiter<ClusterState>),
    ChangeMembers(ConfChangeV2, Waiter<Vec<u64>>),
    TransferLeader(u64),
    Stop,
}

/// A caller waiting for an answer until its deadline; after it the caller has given up, and the
/// replica forgets it (a long partition must not pile up waiters).
struct Waiter<T> {
    reply: Sender<Result<T>>,
    deadline: Instant,
}

impl<T> Waiter<T> {
    fn answer(self, r: Result<T>) {
        let _ = self.reply.send(r);
    }

    fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }
}

/// The receiving end a transport hands messages to (cheap to clone).
#[derive(Clone)]
pub struct Inbox(Sender<Event>);

impl Inbox {
    /// Delivers a message from another replica; `false` when this one has stopped.
    pub fn deliver(&self, msg: Message) -> bool {
        self.0.send(Event::Raft(msg)).is_ok()
    }
}

/// A handle to a running replica; dropping it stops the loop.
#[derive(Debug)]
pub struct Replica {
    events: Sender<Event>,
    status: Arc<Mutex<Status>>,
    thread: Option<JoinHandle<()>>,
    proposals: Proposals,
}

impl Replica {
    /// Starts replica `id` with its log in `dir`. A new log starts the cluster with `voters`, or,
    /// with none, waits to be added to a running group (it learns everything from the leader);
    /// an existing log resumes from disk (its configuration wins).
    pub fn start(id: u64, voters: &[u64], dir: &Path, transport: impl Transport, timing: Timing) -> Result<Self> {
        let storage = DiskStorage::open(dir)?;
        if !storage.is_initialized() && !voters.is_empty() {
            let seeded = storage.seed()?;
            let machine = match &seeded {
                Some(bytes) => StateMachine::restore(bytes)
                    .map_err(|e| Error::Corrupt(format!("the seed in {}: {e}", dir.display())))?,
                None => StateMachine::default(),
            };
            storage.apply_snapshot(&first_snapshot(voters, &machine)?)?;
            if seeded.is_some() {
                tracing::info!(index = machine.state().applied, "the log starts from a restored backup");
                storage.drop_seed()?;
            }
        }
        let (snap_index, snap_data) = storage.snapshot_data();
        let machine = if snap_index > 0 {
            StateMachine::restore(&snap_data)
                .map_err(|e| Error::Corrupt(format!("the snapshot in {}: {e}", dir.display())))?
        } else {
            StateMachine::default()
        };
        let config = Config {
            id,
            election_tick: timing.election_ticks,
            heartbeat_tick: timing.heartbeat_ticks,
            pre_vote: true,
            check_quorum: true,
            // Everything up to the snapshot is in the state already; later entries re-apply.
            applied: snap_index,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        config.validate()?;
        let node = RawNode::new(&config, storage.clone(), &raft::default_logger())?;
        transport.set_addresses(&machine.state().coordinators);
        let (tx, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(Status { id, ..Status::default() }));
        let mut driver = Driver {
            node,
            storage,
            compacted: snap_index,
            compact_every: timing.compact_every.max(1),
            members_changed: false,
            machine,
            transport,
            status: status.clone(),
            proposals: HashMap::new(),
            reads: Vec::new(),
            next_ctx: 0,
            conf_changes: HashMap::new(),
            snapshot_bytes: snap_data.len(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || driver.run(rx, timing.tick))
            .map_err(|e| Error::Unavailable(format!("starting the Raft thread: {e}")))?;
        Ok(Replica { events: tx, status, thread: Some(thread), proposals: Proposals::default() })
    }

    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Where a transport delivers this replica's incoming Raft messages.
    pub fn inbox(&self) -> Inbox {
        Inbox(self.events.clone())
    }

    /// Proposes `p` and waits until it is applied (or `timeout`). In the caller's trace, the
    /// proposal shows as `raft_propose` (until committed) and `raft_apply` (until applied).
    pub fn propose(&self, p: Proposal, timeout: Duration) -> Result<Reply> {
        let started = Instant::now();
        let request_id = p.request_id.clone();
        let result = self.ask(timeout, |w| Event::Propose(Box::new(p), w));
        if let Ok((_, committed)) = &result {
            let (spans, caller) = (Hindsight::default(), tracing::Span::current());
            let attributes = vec![KeyValue::new("request_id", request_id)];
            spans.record(&caller, "raft_propose", (started, *committed), attributes);
            spans.record(&caller, "raft_apply", (*committed, Instant::now()), Vec::new());
        }
        let result = result.map(|(reply, _)| reply);
        self.proposals.observe(started, &result);
        result
    }

    /// The proposals made through this replica, counted and timed.
    pub fn proposals(&self) -> &Proposals {
        &self.proposals
    }

    /// A linearizable read: the state once everything committed before the call is applied.
    pub fn read(&self, timeout: Duration) -> Result<ClusterState> {
        self.ask(timeout, Event::Read)
    }

    /// Adds coordinators (id → address) and removes others, in one change (joint consensus
    /// when it needs it); waits until the change is applied and returns the voters then.
    pub fn change_members(&self, add: &BTreeMap<u64, String>, remove: &[u64], timeout: Duration) -> Result<Vec<u64>> {
        let single = |change_type, node_id| ConfChangeSingle { change_type, node_id, ..Default::default() };
        let mut changes: Vec<_> = add.keys().map(|&id| single(ConfChangeType::AddNode, id)).collect();
        changes.extend(remove.iter().map(|&id| single(ConfChangeType::RemoveNode, id)));
        let context = serde_json::to_vec(add).map_err(|e| Error::Internal(format!("encoding new members: {e}")))?;
        let cc = ConfChangeV2 { changes: changes.into(), context: context.into(), ..Default::default() };
        self.ask(timeout, |w| Event::ChangeMembers(cc, w))
    }

    /// Sends the loop an event carrying a waiter, and waits for its answer until `timeout`.
    fn ask<T>(&self, timeout: Duration, event: impl FnOnce(Waiter<T>) -> Event) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        let waiter = Waiter { reply: tx, deadline: Instant::now() + timeout };
        self.events.send(event(waiter)).map_err(|_| stopped())?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout("the cluster")),
            Err(RecvTimeoutError::Disconnected) => Err(stopped()),
        }
    }

    pub fn transfer_leader(&self, to: u64) {
        let _ = self.events.send(Event::TransferLeader(to));
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The replica's loop has ended (its handle dropped, or its log could not be written).
fn stopped() -> Error {
    Error::Unavailable("the replica stopped".into())
}

/// The snapshot every founding member starts from: the first configuration and `machine` (the
/// empty state at index 1, or a restored backup's at the index it was applied up to). Being a
/// snapshot, it reaches a coordinator that joins later as one, so that one
/// learns the founding voters too (from entries alone it would only see the members added since
/// and could elect itself alone).
fn first_snapshot(voters: &[u64], machine: &StateMachine) -> Result<Snapshot> {
    let data = machine.snapshot().map_err(|e| Error::Internal(format!("encoding a snapshot: {e}")))?;
    let index = machine.state().applied.max(1);
    let mut meta = SnapshotMetadata { index, term: 1, ..Default::default() };
    meta.mut_conf_state().voters = voters.to_vec();
    let mut snapshot = Snapshot { data: data.into(), ..Default::default() };
    snapshot.set_metadata(meta);
    Ok(snapshot)
}

/// A caller waiting for a linearizable read.
struct PendingRead {
    ctx: u64,
    /// The commit index the leader confirmed for it; the read is answered once applied.
    index: Option<u64>,
    waiter: Waiter<ClusterState>,
}

struct Driver<T: Transport> {
    node: RawNode<DiskStorage>,
    storage: DiskStorage,
    /// Index of the last compaction's snapshot.
    compacted: u64,
    compact_every: u64,
    /// A membership change was applied since the last compaction.
    members_changed: bool,
    machine: StateMachine,
    transport: T,
    status: Arc<Mutex<Status>>,
    /// Callers waiting for their proposal, by request id.
    proposals: HashMap<String, Waiter<(Reply, Instant)>>,
    reads: Vec<PendingRead>,
    /// Counter for the contexts of reads and membership changes.
    next_ctx: u64,
    conf_changes: HashMap<Vec<u8>, Waiter<Vec<u64>>>,
    /// Size of the last snapshot taken (published in the status).
    snapshot_bytes: usize,
}

impl<T: Transport> Driver<T> {
    fn run(&mut self, events: Receiver<Event>, tick: Duration) {
        let mut last_tick = Instant::now();
        loop {
            let wait = tick.saturating_sub(last_tick.elapsed());
            match events.recv_timeout(wait) {
                Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {}
            }
            if last_tick.elapsed() >= tick {
                self.node.tick();
                last_tick = Instant::now();
                self.forget_expired(last_tick);
                // raft-rs drops a read asked while no leader is known: ask again.
                for r in &self.reads {
                    if r.index.is_none() && self.node.raft.leader_id != 0 {
                        self.node.read_index(r.ctx.to_le_bytes().to_vec());
                    }
                }
            }
            if let Err(e) = self.on_ready() {
                // The log cannot be written: stop rather than run on without durability.
                tracing::error!(coordinator = self.node.raft.id, "raft: stopping: {e}");
                if let Ok(mut status) = self.status.lock() {
                    status.stopped = Some(e.to_string());
                }
                return;
            }
            self.publish_status();
        }
    }

    fn handle(&mut self, event: Event) {
        let leader = self.node.raft.leader_id;
        let not_leader = self.node.raft.state != StateRole::Leader;
        match event {
            Event::Raft(m) => {
                let _ = self.node.step(m);
            }
            Event::Propose(p, waiter) => {
                if not_leader {
                    return waiter.answer(Err(Error::NotLeader { leader }));
                }
                let data = match serde_json::to_vec(&p) {
                    Ok(d) => d,
                    Err(e) => return waiter.answer(Err(Error::Internal(format!("encoding a proposal: {e}")))),
                };
                match self.node.propose(p.request_id.clone().into_bytes(), data) {
                    Ok(()) => {
                        self.proposals.insert(p.request_id, waiter);
                    }
                    Err(e) => waiter.answer(Err(e.into())),
                }
            }
            Event::Read(waiter) => {
                self.next_ctx += 1;
                self.node.read_index(self.next_ctx.to_le_bytes().to_vec());
                self.reads.push(PendingRead { ctx: self.next_ctx, index: None, waiter });
            }
            Event::ChangeMembers(cc, waiter) => {
                if not_leader {
                    return waiter.answer(Err(Error::NotLeader { leader }));
                }
                self.next_ctx += 1;
                let ctx = self.next_ctx.to_le_bytes().to_vec();
                match self.node.propose_conf_change(ctx.clone(), cc) {
                    Ok(()) => {
                        self.conf_changes.insert(ctx, waiter);
                    }
                    Err(e) => waiter.answer(Err(e.into())),
                }
            }
            Event::TransferLeader(to) => self.node.transfer_leader(to),
            Event::Stop => {}
        }
    }

    fn on_ready(&mut self) -> Result<()> {
        if !self.node.has_ready() {
            self.answer_reads();
            return Ok(());
        }
        let mut ready = self.node.ready();
        // Messages that do not depend on this Ready's writes may leave now.
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.storage.apply_snapshot(&snap)?;
            self.machine =
                StateMachine::restore(&snap.data).map_err(|e| Error::Corrupt(format!("the leader's snapshot: {e}")))?;
            self.compacted = snap.get_metadata().index;
        }
        for rs in ready.take_read_states() {
            let id = u64::from_le_bytes(rs.request_ctx.as_slice().try_into().unwrap_or_default());
            if let Some(r) = self.reads.iter_mut().find(|r| r.ctx == id && r.index.is_none()) {
                r.index = Some(rs.index);
            }
        }
        self.apply(ready.take_committed_entries())?;
        // Entries and hard state reach the disk before the messages that depend on them.
        self.storage.append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            self.storage.set_hard_state(hs)?;
        }
        self.send(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        self.answer_reads();
        self.maybe_compact()
    }

    /// Every `compact_every` applied entries, and after a membership change, the state becomes
    /// the snapshot and the log up to it goes (only entries already on this replica's disk). A
    /// new member catches up from a snapshot, and raft-rs refuses one whose configuration does
    /// not include it: so a change is followed by a snapshot that does.
    fn maybe_compact(&mut self) -> Result<()> {
        let index = self.machine.state().applied.min(self.storage.last_index_on_disk());
        let due = index >= self.compacted + self.compact_every || (self.members_changed && index > self.compacted);
        // The snapshot must describe exactly `index`: only when the state is there.
        if due && index == self.machine.state().applied {
            let data = self.machine.snapshot().map_err(|e| Error::Internal(format!("encoding a snapshot: {e}")))?;
            self.snapshot_bytes = data.len();
            self.storage.compact(index, data)?;
            self.compacted = index;
            self.members_changed = false;
        }
        Ok(())
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let snapshot_to = (m.get_msg_type() == MessageType::MsgSnapshot).then_some(m.to);
            self.transport.send(m);
            // The transport is best effort: say the snapshot went, and if it did not, the
            // follower's next rejection makes raft-rs send another.
            if let Some(to) = snapshot_to {
                self.node.report_snapshot(to, SnapshotStatus::Finish);
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        // The Ready that hands entries over is where this replica learns they are committed.
        let committed = Instant::now();
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal if !e.data.is_empty() => {
                    let p: Proposal = serde_json::from_slice(&e.data)
                        .map_err(|err| Error::Corrupt(format!("log entry {}: {err}", e.index)))?;
                    let reply = self.machine.apply(e.index, &p);
                    if let Some(waiter) = self.proposals.remove(&p.request_id) {
                        waiter.answer(Ok((reply, committed)));
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let cc: ConfChangeV2 = match e.get_entry_type() {
                        EntryType::EntryConfChangeV2 => {
                            protobuf::Message::parse_from_bytes(&e.data).map_err(raft::Error::CodecError)?
                        }
                        _ => {
                            let v1: raft::eraftpb::ConfChange =
                                protobuf::Message::parse_from_bytes(&e.data).map_err(raft::Error::CodecError)?;
                            raft_proto::ConfChangeI::into_v2(v1)
                        }
                    };
                    let cs = self.node.apply_conf_change(&cc)?;
                    self.storage.set_conf_state(&cs)?;
                    let added: BTreeMap<u64, String> = serde_json::from_slice(&cc.context).unwrap_or_default();
                    let removed: Vec<u64> = (cc.changes.iter())
                        .filter(|c| c.change_type == ConfChangeType::RemoveNode)
                        .map(|c| c.node_id)
                        .collect();
                    self.machine.change_coordinators(e.index, added, &removed);
                    self.members_changed = true;
                    self.transport.set_addresses(&self.machine.state().coordinators);
                    // The caller may ask about the new members at once: the status says them first.
                    self.publish_status();
                    if let Some(waiter) = self.conf_changes.remove(e.context.as_ref() as &[u8]) {
                        let mut voters = cs.voters.clone();
                        voters.sort_unstable();
                        waiter.answer(Ok(voters));
                    }
                }
                _ => self.machine.skip(e.index),
            }
        }
        Ok(())
    }

    /// Drops the waiters whose callers have given up. Their proposals may still commit (a retry
    /// with the same request id then gets the first reply).
    fn forget_expired(&mut self, now: Instant) {
        self.proposals.retain(|_, w| !w.expired(now));
        self.conf_changes.retain(|_, w| !w.expired(now));
        self.reads.retain(|r| !r.waiter.expired(now));
    }

    /// Reads whose index is known and applied get the state.
    fn answer_reads(&mut self) {
        let applied = self.node.raft.raft_log.applied;
        let mut i = 0;
        while i < self.reads.len() {
            if self.reads[i].index.is_some_and(|idx| idx <= applied) {
                let read = self.reads.swap_remove(i);
                read.waiter.answer(Ok(self.machine.state().clone()));
            } else {
                i += 1;
            }
        }
    }

    fn publish_status(&self) {
        let r = &self.node.raft;
        let mut voters: Vec<u64> = r.prs().conf().voters().ids().iter().collect();
        voters.sort_unstable();
        let s = Status {
            id: r.id,
            leader: r.leader_id,
            term: r.term,
            commit: r.raft_log.committed,
            applied: r.raft_log.applied,
            is_leader: r.state == StateRole::Leader,
            voters,
            waiting: self.proposals.len() + self.reads.len() + self.conf_changes.len(),
            stopped: None,
            snapshot_bytes: self.snapshot_bytes,
        };
        if let Ok(mut status) = self.status.lock() {
            if (status.leader, status.term) != (s.leader, s.term) {
                tracing::info!(coordinator = s.id, leader = s.leader, term = s.term, "raft: leader or term changed");
            }
            *status = s;
        }
    }
}
