//! Raft messages between replicas of one process, with the faults a consensus test needs. Like
//! raft-rs's harness network, faults are rules on directed links (from → to) checked as each
//! message is sent; unlike it, the replicas run their own loops on their own threads, so a
//! message passes (or not) the moment it is sent, and nothing is stepped by hand.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use raft::eraftpb::Message;
use tandem_coordinator::replica::{Inbox, Transport};

/// The network: who is reachable and which messages are lost. Cheap to clone (shared).
#[derive(Clone)]
pub struct MemNet {
    inner: Arc<Mutex<Links>>,
}

struct Links {
    /// Running replicas; a message to one not here is lost (it is down).
    inboxes: HashMap<u64, Inbox>,
    /// (from, to) → the fraction of messages lost on that link (1.0: cut).
    drop: HashMap<(u64, u64), f64>,
    /// (from, to) → how many of the next messages on that link are lost.
    drop_next: HashMap<(u64, u64), usize>,
    /// Replicas cut off from every other, including ones that join later.
    isolated: HashSet<u64>,
    /// Picks which messages a fractional drop loses (xorshift: deterministic for a seed).
    rng: u64,
    dropped: u64,
    /// Every message carried since [`MemNet::record`], in order (none while not recording).
    recorded: Option<Vec<Message>>,
}

impl Default for MemNet {
    fn default() -> Self {
        MemNet::with_seed(0x5eed)
    }
}

impl MemNet {
    /// A network whose fractional drops follow `seed`.
    pub fn with_seed(seed: u64) -> Self {
        let links = Links {
            inboxes: HashMap::new(),
            drop: HashMap::new(),
            drop_next: HashMap::new(),
            isolated: HashSet::new(),
            rng: seed.max(1),
            dropped: 0,
            recorded: None,
        };
        MemNet { inner: Arc::new(Mutex::new(links)) }
    }

    /// The transport replica `from` sends with.
    pub fn transport(&self, from: u64) -> impl Transport + use<> {
        MemTransport { from, net: self.clone() }
    }

    /// Replica `id` is up and receives at `inbox`.
    pub fn connect(&self, id: u64, inbox: Inbox) {
        self.links().inboxes.insert(id, inbox);
    }

    /// Replica `id` is down: messages to it are lost.
    pub fn disconnect(&self, id: u64) {
        self.links().inboxes.remove(&id);
    }

    /// Loses `fraction` (0.0 to 1.0) of the messages from `from` to `to`, chosen at random.
    pub fn drop(&self, from: u64, to: u64, fraction: f64) {
        self.links().drop.insert((from, to), fraction.clamp(0.0, 1.0));
    }

    /// Loses the next `count` messages from `from` to `to`.
    pub fn drop_next(&self, from: u64, to: u64, count: usize) {
        self.links().drop_next.insert((from, to), count);
    }

    /// Severs the link between `a` and `b`, both ways.
    pub fn cut(&self, a: u64, b: u64) {
        self.drop(a, b, 1.0);
        self.drop(b, a, 1.0);
    }

    /// Cuts `id` off from every other replica, present or future.
    pub fn isolate(&self, id: u64) {
        self.links().isolated.insert(id);
    }

    /// Removes every fault: all links carry every message again.
    pub fn heal(&self) {
        let mut links = self.links();
        links.drop.clear();
        links.drop_next.clear();
        links.isolated.clear();
    }

    /// How many messages the faults have lost so far (not counting those to replicas down).
    pub fn dropped(&self) -> u64 {
        self.links().dropped
    }

    /// Keeps a copy of every message carried from now on (for a test that replays them).
    pub fn record(&self) {
        self.links().recorded = Some(Vec::new());
    }

    /// The messages carried since [`MemNet::record`], in the order they were sent.
    pub fn recorded(&self) -> Vec<Message> {
        self.links().recorded.clone().unwrap_or_default()
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        // A test thread that panicked while holding it leaves the rules as they were.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn send(&self, from: u64, msg: Message) {
        let mut links = self.links();
        if links.lost(from, msg.to) {
            links.dropped += 1;
            return;
        }
        if let Some(recorded) = &mut links.recorded {
            recorded.push(msg.clone());
        }
        if let Some(inbox) = links.inboxes.get(&msg.to) {
            inbox.deliver(msg);
        }
    }
}

impl Links {
    fn lost(&mut self, from: u64, to: u64) -> bool {
        if self.isolated.contains(&from) || self.isolated.contains(&to) {
            return true;
        }
        if let Some(n) = self.drop_next.get_mut(&(from, to))
            && *n > 0
        {
            *n -= 1;
            return true;
        }
        match self.drop.get(&(from, to)).copied() {
            Some(f) if f >= 1.0 => true,
            Some(f) if f > 0.0 => self.uniform() < f,
            _ => false,
        }
    }

    /// A number in [0, 1).
    fn uniform(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct MemTransport {
    from: u64,
    net: MemNet,
}

impl Transport for MemTransport {
    fn send(&self, msg: Message) {
        self.net.send(self.from, msg);
    }
}
