//! The cluster contract: every value Tandem's processes exchange about the cluster, as one set
//! of serde types, versioned with the `tandem.v1` package they travel in. Coordinators
//! replicate [`Command`]s (in [`Proposal`]s) and keep [`ClusterState`]; a fine-tuning job is
//! described by [`JobSpec`] and nothing else; a worker learns what to do from its
//! [`WorkerView`] ([`Assignment`]s and [`Membership`]s). The types travel as they are, by
//! [`crate::codec`], in the `tandem.v1.Cluster` gRPC service; [`crate::ClusterClient`] is the
//! one way to call it. A field added later gets `#[serde(default)]`, so older logs and peers
//! still read.
//!
//! Map:
//! - `command.rs`: [`Command`], [`Proposal`], [`Reply`], each command's validation.
//! - `job.rs`: [`JobSpec`] (method, hyperparameters, data), [`JobReport`], [`Assignment`].
//! - `cluster.rs`: [`ClusterState`] and its records, [`WorkerView`].
//! - `rpc.rs`: the service's other requests and answers (status, registration, membership).
//! - `names.rs`: the rules for identifiers, paths and addresses.
//! - `checksum.rs`: API keys' and adapters' SHA-256, as recorded.

mod checksum;
mod cluster;
mod command;
mod job;
mod names;
mod rpc;

pub use checksum::{dir_checksum, sha256_hex, to_hex};
pub use cluster::{
    AdapterVersion, ApiKey, Attempt, ClusterState, File, Gpu, Job, JobEvent, JobStatus, Membership, Model, Placement,
    TenantLimits, Worker, WorkerView,
};
pub use command::{Command, Proposal, Reply, fresh_id, unix_now};
pub use job::{
    Assignment, AutoHyperparams, BASE_LEARNING_RATE, Checkpoint, FileRef, Hyperparams, JobReport, JobSpec,
    MethodChoice, StepFigures, TrainingPlan, number_keys,
};
pub use names::{CHAT_ROLES, check_addr, check_function_name, check_name, check_role, check_tenant, check_uri};
pub use rpc::{
    GroupStatus, Heartbeat, Leader, LeaderTransfer, LeaseGrant, Member, Members, MembershipChange, StatusRequest,
    WorkerLease, WorkerLoad, WorkerRegistration,
};

/// A value that breaks the contract's rules; the message names the field and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);
