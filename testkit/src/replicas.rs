//! Coordinator replicas in one process: each a real [`Replica`] (its Ready loop on its own
//! thread, its log on disk), joined by a [`MemNet`] the test can break. Stopping one and
//! starting it again on the same folder is a crash and a restart from disk.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_coordinator::replica::{Replica, Timing};

use crate::mem_net::MemNet;
use crate::process::Scratch;

/// Ticks short enough for quick elections, long enough for a loaded 2-core machine.
pub const FAST: Timing =
    Timing { tick: Duration::from_millis(10), election_ticks: 10, heartbeat_ticks: 2, ..Timing::DEFAULT };

/// How long the harness waits for the replicas (a leader, a write) at [`FAST`] timing.
pub const WAIT: Duration = Duration::from_secs(5);

/// Running replicas by id; each keeps its log in `<dir>/<id>`.
pub struct Replicas {
    running: BTreeMap<u64, Arc<Replica>>,
    founders: Vec<u64>,
    timing: Timing,
    net: MemNet,
    /// Dropped after the replicas (see `Drop`): their loops write there until they stop.
    dir: Scratch,
}

impl Replicas {
    /// Replicas `founders`, founding a new group with fresh logs in `dir`, at [`FAST`] timing.
    pub fn start(dir: impl Into<PathBuf>, founders: &[u64]) -> Self {
        Replicas::start_with(dir, founders, FAST, MemNet::default())
    }

    /// [`Replicas::start`] with its own timing and network.
    pub fn start_with(dir: impl Into<PathBuf>, founders: &[u64], timing: Timing, net: MemNet) -> Self {
        let mut r =
            Replicas { running: BTreeMap::new(), founders: founders.to_vec(), timing, net, dir: Scratch::at(dir) };
        for &id in founders {
            r.launch(id, founders);
        }
        r
    }

    /// The network between them, to break and heal.
    pub fn net(&self) -> &MemNet {
        &self.net
    }

    /// The running replicas' ids, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.running.keys().copied().collect()
    }

    /// Replica `id`, shared (a `Store` holds one this way). Share it only for as long as the
    /// test does not stop or restart it.
    pub fn shared(&self, id: u64) -> Arc<Replica> {
        self.running[&id].clone()
    }

    /// Crashes replica `id`: its loop stops and messages to it are lost; its log stays.
    pub fn stop(&mut self, id: u64) {
        self.net.disconnect(id);
        let replica = self.running.remove(&id).unwrap_or_else(|| panic!("replica {id} is not running"));
        assert!(Arc::strong_count(&replica) == 1, "replica {id} is still shared: it would not stop");
    }

    /// Starts replica `id` again from its log (a founder whose log was never written founds
    /// afresh, as at the start).
    pub fn restart(&mut self, id: u64) {
        let founders = self.founders.clone();
        self.launch(id, &founders);
    }

    /// Starts replica `id` empty, waiting to be added to the running group (the test adds it
    /// through the leader's `change_members`).
    pub fn join(&mut self, id: u64) {
        self.launch(id, &[]);
    }

    /// The leader as the running replicas see it, waiting up to [`WAIT`] for one.
    pub fn leader(&self) -> u64 {
        self.leader_among(&self.ids())
    }

    /// The leader among `ids`, waiting up to [`WAIT`] for one; of two that both believe they
    /// lead (an old leader not yet told), the one of the later term.
    pub fn leader_among(&self, ids: &[u64]) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = (ids.iter())
                .filter_map(|id| self.running.get(id).map(|r| (*id, r.status())))
                .filter(|(_, s)| s.is_leader)
                .max_by_key(|(_, s)| s.term);
            if let Some((id, _)) = leader {
                return id;
            }
            assert!(Instant::now() < deadline, "no leader elected among {ids:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn launch(&mut self, id: u64, voters: &[u64]) {
        assert!(!self.running.contains_key(&id), "replica {id} is running already");
        let dir = self.dir.join(id.to_string());
        let replica = Replica::start(id, voters, &dir, self.net.transport(id), self.timing)
            .unwrap_or_else(|e| panic!("replica {id} did not start: {e}"));
        self.net.connect(id, replica.inbox());
        self.running.insert(id, Arc::new(replica));
    }
}

impl std::ops::Index<u64> for Replicas {
    type Output = Replica;

    fn index(&self, id: u64) -> &Replica {
        self.running.get(&id).unwrap_or_else(|| panic!("replica {id} is not running"))
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        // Their loops stop (and stop writing) before the folder goes.
        self.running.clear();
    }
}
