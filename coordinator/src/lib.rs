//! Tandem coordinator. For now only its identity; the raft-replicated state machine, placement
//! and the gateway arrive with their issues.

/// Role name a coordinator reports in health checks.
pub const ROLE: &str = "coordinator";

/// The wire protocol the coordinator speaks.
pub use tandem_proto as proto;
