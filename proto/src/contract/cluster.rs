//! The replicated state as every process reads it ([`ClusterState`]), and the records it is
//! made of. Only the coordinator's state machine changes it, by applying [`super::Command`]s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::job::{Assignment, Checkpoint, JobSpec, StepFigures, TrainingPlan};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Index of the last log entry applied.
    pub applied: u64,
    pub workers: BTreeMap<String, Worker>,
    pub models: BTreeMap<String, Model>,
    /// tenant → adapter name → versions, oldest first.
    pub adapters: BTreeMap<String, BTreeMap<String, Vec<AdapterVersion>>>,
    pub jobs: BTreeMap<String, Job>,
    pub placements: BTreeMap<String, Placement>,
    /// Tenants' API keys by the key's SHA-256 (hex): the key itself is never stored.
    #[serde(default, deserialize_with = "api_keys")]
    pub api_keys: BTreeMap<String, ApiKey>,
    /// Uploaded files by id.
    #[serde(default)]
    pub files: BTreeMap<String, File>,
    /// Addresses of the coordinators added to the group after it started (those it started
    /// with are on every coordinator's command line), by Raft id.
    #[serde(default, with = "super::number_keys")]
    pub coordinators: BTreeMap<u64, String>,
    /// What the operator allows each tenant, by tenant; a tenant not here has no limits.
    #[serde(default)]
    pub limits: BTreeMap<String, TenantLimits>,
}

/// What a tenant may use; each limit unset is no limit. Rates and concurrency are counted by
/// each gateway on its own; quotas against the replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// Completions and chat completions per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Prompt and completion tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Completions and chat completions in progress at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_requests: Option<u32>,
    /// Training files stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u32>,
    /// Adapters stored (by name; versions of one adapter count once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_adapters: Option<u32>,
    /// Fine-tuning jobs queued or running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_jobs: Option<u32>,
}

/// A tenant's API key as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub tenant: String,
    /// Unix seconds (the proposer's clock).
    #[serde(default)]
    pub created_at: u64,
    /// Unix seconds after which the key is refused; none: it lasts until revoked.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

impl ApiKey {
    /// The key's public name, for listing and revoking it: `key_` and the first 16 hex digits
    /// of its SHA-256 (64 bits of a hash of 192 random bits tell nothing about the key).
    pub fn id(key_sha256: &str) -> String {
        format!("key_{}", key_sha256.get(..16).unwrap_or(key_sha256))
    }

    /// Whether the key is refused at `now` (Unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// Reads `api_keys` whether its values are [`ApiKey`]s or bare tenant names (how states
/// written before keys had a creation time and an expiry hold them), so an upgraded
/// coordinator keeps every key.
fn api_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, ApiKey>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Key(ApiKey),
        Tenant(String),
    }
    let stored = BTreeMap::<String, Stored>::deserialize(d)?;
    Ok(stored
        .into_iter()
        .map(|(hash, k)| match k {
            Stored::Key(k) => (hash, k),
            Stored::Tenant(tenant) => (hash, ApiKey { tenant, created_at: 0, expires_at: None }),
        })
        .collect())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub memory_bytes: u64,
    /// Base models loaded on it.
    pub models: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    /// Its gRPC address.
    pub addr: String,
    pub gpus: Vec<Gpu>,
    pub alive: bool,
    /// Where it listens for its worker groups' collectives (HOST:PORT). Empty: it serves whole
    /// models only; otherwise it is a group worker: it serves only as a rank of a group, and
    /// the scheduler gives it no fine-tuning job.
    #[serde(default)]
    pub collective_addr: String,
    /// The operator drains it: no new request, job or group place goes to it, and what runs
    /// there finishes. It stays drained across restarts until the operator says otherwise.
    #[serde(default)]
    pub draining: bool,
}

impl Worker {
    /// Whether new work (requests, jobs, group places) may go to it: alive and not draining.
    pub fn takes_work(&self) -> bool {
        self.alive && !self.draining
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// Where its checkpoint is (a path or URI every worker can read).
    pub uri: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterVersion {
    pub version: u64,
    pub base_model: String,
    /// SHA-256 of the weights, hex.
    pub checksum: String,
    /// Where the weights are stored.
    pub uri: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Placed,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// One try at running a job, on one worker, fenced by its epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub epoch: u64,
    pub worker: String,
    /// Why it ended, if it did before the job finished (its worker died, ...).
    pub ended: Option<String>,
    /// It ended because its worker was drained, at a checkpoint: not a failure, so not counted
    /// against the job's attempts.
    #[serde(default)]
    pub handed_off: bool,
}

/// A training file a tenant uploaded (JSONL, checked on upload).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct File {
    pub tenant: String,
    pub filename: String,
    pub bytes: u64,
    pub purpose: String,
    /// Training examples in it.
    pub examples: u64,
    pub created_at: u64,
    /// Where its bytes are stored.
    pub uri: String,
}

/// What a job reported along the way, for `/events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Unix seconds (the proposer's clock).
    pub at: u64,
    pub message: String,
    /// An optimizer step's figures, for "metrics" events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepFigures>,
    /// The validation loss after optimizer step `.0`, for "metrics" events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<(u64, f64)>,
}

impl JobEvent {
    /// An event that only says something.
    pub fn new(at: u64, message: impl Into<String>) -> Self {
        JobEvent { at, message: message.into(), step: None, validation: None }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub tenant: String,
    /// The adapter its success registers for the tenant (none: the job only trains).
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default)]
    pub created_at: u64,
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// What it trains, as submitted (the scheduler and the worker read it).
    pub spec: JobSpec,
    pub status: JobStatus,
    /// The current attempt's fencing token: reports carrying another epoch are refused.
    pub epoch: u64,
    pub attempts: Vec<Attempt>,
    /// The last checkpoint reported; a re-queued job resumes from it.
    pub checkpoint: Option<Checkpoint>,
    pub error: Option<String>,
    /// Every checkpoint reported, oldest first.
    #[serde(default)]
    pub checkpoints: Vec<Checkpoint>,
    #[serde(default)]
    pub events: Vec<JobEvent>,
    /// What its latest attempt trains with ("auto" resolved), once it started.
    #[serde(default)]
    pub plan: Option<TrainingPlan>,
    /// Tokens trained on, each optimizer step counted once (a step done again after a resume
    /// is not counted twice), and the last step counted.
    #[serde(default)]
    pub trained_tokens: u64,
    #[serde(default)]
    pub trained_steps: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub model: String,
    /// The workers of the group, rank order (tensor-parallel shards).
    pub workers: Vec<String>,
    /// Adapters resident on the group: (tenant, name).
    pub adapters: Vec<(String, String)>,
    /// The group's formation: bumped whenever its membership changes or it is formed again
    /// after a failure, so members re-join and reports about an older formation are refused.
    #[serde(default)]
    pub epoch: u64,
    /// Rank 0 reported that every rank joined at `epoch`: the gateway may route to it.
    #[serde(default)]
    pub formed: bool,
    /// A MoE model's experts are spread whole over the ranks (expert parallelism) rather than
    /// each expert sliced over all of them.
    #[serde(default)]
    pub expert_parallel: bool,
}

impl Placement {
    /// A placement of `model` over `workers` (rank order), not formed yet.
    pub fn new(model: impl Into<String>, workers: Vec<String>) -> Self {
        Placement {
            model: model.into(),
            workers,
            adapters: Vec::new(),
            epoch: 0,
            formed: false,
            expert_parallel: false,
        }
    }
}

/// A worker's place in a worker group, as its heartbeat tells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub group: String,
    pub epoch: u64,
    /// Its rank: 0 runs the engine's scheduler, the others follow its batch plans.
    pub rank: usize,
    pub model: String,
    /// Where the base model's checkpoint is (the catalogue's uri; empty if not registered).
    pub model_uri: String,
    /// Every rank's collective address, in rank order.
    pub peers: Vec<String>,
    /// See [`Placement::expert_parallel`].
    #[serde(default)]
    pub expert_parallel: bool,
}

/// What a worker is to do now, as the answer to its heartbeat tells it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    /// How long its lease lasts without another heartbeat, milliseconds.
    pub lease_ms: u64,
    /// The fine-tuning attempts it is to run: it starts those it does not run and stops those
    /// no longer listed.
    pub assignments: Vec<Assignment>,
    /// The worker groups it is a member of: it joins those it is not in at their epoch and
    /// leaves the others.
    pub groups: Vec<Membership>,
}

impl ClusterState {
    /// The attempts worker `id` is to run now: its jobs placed or running.
    pub fn assignments(&self, id: &str) -> Vec<Assignment> {
        (self.jobs.iter())
            .filter(|(_, j)| matches!(j.status, JobStatus::Placed | JobStatus::Running))
            .filter(|(_, j)| j.attempts.last().is_some_and(|a| a.worker == id && a.epoch == j.epoch))
            .map(|(job, j)| Assignment {
                job: job.clone(),
                epoch: j.epoch,
                tenant: j.tenant.clone(),
                spec: j.spec.clone(),
                checkpoint: j.checkpoint.clone(),
                hand_off: self.workers.get(id).is_some_and(|w| w.draining),
            })
            .collect()
    }

    /// The worker groups worker `id` is a member of, with its rank in each.
    pub fn memberships(&self, id: &str) -> Vec<Membership> {
        let mut out = Vec::new();
        for (group, p) in &self.placements {
            for (rank, _) in p.workers.iter().enumerate().filter(|(_, w)| *w == id) {
                let addr = |w: &String| self.workers.get(w).map(|w| w.collective_addr.clone()).unwrap_or_default();
                out.push(Membership {
                    group: group.clone(),
                    epoch: p.epoch,
                    rank,
                    model: p.model.clone(),
                    model_uri: self.models.get(&p.model).map(|m| m.uri.clone()).unwrap_or_default(),
                    peers: p.workers.iter().map(addr).collect(),
                    expert_parallel: p.expert_parallel,
                });
            }
        }
        out
    }

    /// Everything worker `id` is to do now, under a lease of `lease_ms`.
    pub fn worker_view(&self, id: &str, lease_ms: u64) -> WorkerView {
        WorkerView { lease_ms, assignments: self.assignments(id), groups: self.memberships(id) }
    }
}
