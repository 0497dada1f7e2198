//! Tandem coordinator: the cluster's replicated state. For now its state machine
//! (`state.rs`); the raft log, the worker leases, placement and the gateway arrive with their
//! issues.

pub mod state;

/// Role name a coordinator reports in health checks.
pub const ROLE: &str = "coordinator";

/// The wire protocol the coordinator speaks.
pub use tandem_proto as proto;
