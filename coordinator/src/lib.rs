//! Tandem coordinator: the cluster's replicated state (`state.rs`), kept by a Raft group over a
//! durable log (`raft_log.rs`, `replica.rs`) or in etcd (`etcd_store.rs`), behind one interface
//! (`store.rs`); the gRPC service with workers' leases and the scheduler (`server.rs`). The
//! gateway arrives with its issue. See docs/coordinator.md.

pub mod etcd_store;
pub mod gateway;
pub mod raft_log;
pub mod replica;
pub mod server;
pub mod state;
pub mod store;

/// Role name a coordinator reports in health checks.
pub const ROLE: &str = "coordinator";

/// The wire protocol the coordinator speaks.
pub use tandem_proto as proto;
