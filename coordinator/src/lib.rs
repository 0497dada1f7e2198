//! Tandem coordinator: the replicated state machine, kept by a Raft group or in etcd, the
//! placement policy, the gRPC cluster service with workers' leases, and the HTTP gateway. The
//! types it replicates are the cluster contract (`tandem_proto::contract`). See
//! docs/coordinator.md and docs/gateway.md.
//!
//! Map:
//! - `error.rs`: [`Error`], the crate's one error type, by what a caller can do about it (and
//!   the gRPC status each kind becomes).
//! - `state.rs`: [`state::StateMachine`]: validates and applies commands, remembers replies.
//! - `placement.rs`: where queued jobs go (the leader proposes the moves).
//! - `raft_log.rs`, `replica.rs`: the durable Raft log and the replica's Ready loop.
//! - `backup.rs`: backups of the state (`tandem snapshot`) and a new group seeded from one.
//! - `etcd_store.rs`: the same state machine over an existing etcd's log.
//! - `store.rs`: one interface over both stores.
//! - `server.rs`: a coordinator process: Raft transport (gRPC, or a network the caller gives:
//!   the testkit's in-memory one), the `tandem.v1.Cluster` service, leases and the scheduler
//!   loop, the gateway.
//! - `metrics.rs`: the process's Prometheus registry: the Raft replica's series, the gateway's.
//! - `gateway/`: OpenAI-compatible HTTP API, jobs, files, adapters, keys, groups, metrics, the
//!   operators' dashboard.

pub mod backup;
mod error;
pub mod etcd_store;
pub mod gateway;
pub mod metrics;
pub mod placement;
pub mod raft_log;
pub mod replica;
pub mod server;
pub mod state;
pub mod store;

pub use error::{Error, Result};

/// Role name a coordinator reports in health checks.
pub const ROLE: &str = "coordinator";

/// The wire protocol the coordinator speaks.
pub use tandem_proto as proto;
