//! A coordinator process's metrics, in one Prometheus registry: its Raft replica's progress
//! (read from the replica's status at each scrape) and proposals (timed as they are made), and
//! what the server adds: the workers' lease ages (`server.rs`) and, where the process serves
//! the gateway, its series (`gateway/metrics.rs`). Every series is named `tandem:...`, with
//! bounded labels (docs/observability.md).

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
pub use tandem_proto::metrics_port::{Labels, encode, gauges, text};

use crate::error::Result;
use crate::replica::Replica;
use crate::store::Store;
use tandem_proto::contract::Reply;

/// The registry of a coordinator process: its replica's series (a Raft store; an etcd store's
/// progress is etcd's own to export) and what `register` adds.
pub fn registry(store: &Store, register: impl FnOnce(&mut Registry)) -> Arc<Registry> {
    let mut registry = Registry::default();
    if let Store::Raft(replica) = store {
        replica.proposals().register(&mut registry);
        registry.register_collector(Box::new(RaftProgress(replica.clone())));
    }
    register(&mut registry);
    Arc::new(registry)
}

/// Proposals this replica was asked to apply, by outcome, and how long each took to be applied.
#[derive(Clone, Debug)]
pub struct Proposals {
    count: Family<Labels, Counter>,
    seconds: Histogram,
}

impl Default for Proposals {
    fn default() -> Self {
        // 1 ms to 16 s: a local commit to an election's worth of waiting.
        let buckets = prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15);
        Proposals { count: Family::default(), seconds: Histogram::new(buckets) }
    }
}

impl Proposals {
    pub fn observe(&self, started: Instant, result: &Result<Reply>) {
        let outcome = match result {
            Ok(Reply::Refused { .. }) => "refused",
            Ok(_) => "applied",
            Err(_) => "failed",
        };
        self.count.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
        self.seconds.observe(started.elapsed().as_secs_f64());
    }

    fn register(&self, registry: &mut Registry) {
        let count = self.count.clone();
        registry.register("tandem:raft_proposals", "Proposals made through this replica, by outcome", count);
        registry.register(
            "tandem:raft_proposal_seconds",
            "From a proposal to its being applied here (or its failure)",
            self.seconds.clone(),
        );
    }
}

/// The replica's term, leader and log indexes, read at each scrape.
#[derive(Debug)]
struct RaftProgress(Arc<Replica>);

impl Collector for RaftProgress {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.status();
        let id = vec![("coordinator", s.id.to_string())];
        let series = [
            ("tandem:raft_term", "The replica's Raft term.", s.term as f64),
            ("tandem:raft_leader", "The coordinator this replica takes for leader (0: none known).", s.leader as f64),
            ("tandem:raft_is_leader", "1 where this replica leads.", f64::from(u8::from(s.is_leader))),
            ("tandem:raft_commit_index", "The last log index known committed.", s.commit as f64),
            ("tandem:raft_applied_index", "The last log index applied to the state.", s.applied as f64),
            (
                "tandem:raft_apply_lag",
                "Committed entries not yet applied here.",
                s.commit.saturating_sub(s.applied) as f64,
            ),
            ("tandem:raft_voters", "Voting members of the group, as this replica knows them.", s.voters.len() as f64),
            ("tandem:raft_waiting", "Callers waiting on this replica (proposals, reads, changes).", s.waiting as f64),
            (
                "tandem:raft_snapshot_bytes",
                "Size of the replica's last snapshot of the state.",
                s.snapshot_bytes as f64,
            ),
        ];
        for (name, help, value) in series {
            encode(&mut encoder, name, help, &gauges([(id.clone(), value)]))?;
        }
        Ok(())
    }
}
