//! Tandem coordinator: the cluster's replicated state. So far its state machine (`state.rs`)
//! and its durable Raft log (`raft_log.rs`); the Raft node and transport, worker leases,
//! placement and the gateway arrive with their issues.

pub mod etcd_store;
pub mod raft_log;
pub mod replica;
pub mod server;
pub mod state;
pub mod store;

/// Role name a coordinator reports in health checks.
pub const ROLE: &str = "coordinator";

/// The wire protocol the coordinator speaks.
pub use tandem_proto as proto;
