//! The cluster's replicated state: workers and their GPUs, models, tenants' adapters, fine-tuning
//! jobs with their attempts, and placements. It changes only by [`ClusterState::apply`] of a
//! [`Proposal`], in log order, so every replica (and the etcd store) computes the same state;
//! apply reads no clock and no randomness. Retried proposals (same request id) apply once and
//! get their first reply again.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Replies remembered for retried proposals: the last this many request ids.
const REMEMBERED_REQUESTS: usize = 10_000;

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

/// Attempts a job gets: one whose attempts keep ending (its worker dies, its group fails)
/// fails after this many rather than go round for ever.
pub const MAX_ATTEMPTS: usize = 5;

/// One try at running a job, on one worker, fenced by its epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub epoch: u64,
    pub worker: String,
    /// Why it ended, if it did before the job finished (its worker died, ...).
    pub ended: Option<String>,
}

impl Job {
    /// Ends the job's current attempt if it runs on `worker` (for `why`): the job is queued
    /// again, to resume from its checkpoint, or fails once it has had [`MAX_ATTEMPTS`].
    fn end_attempt_on(&mut self, worker: &str, at: u64, why: &str) {
        let current = self.attempts.last_mut().filter(|a| a.epoch == self.epoch && a.worker == worker);
        let (Some(attempt), false) = (current, self.status.is_final() || self.status == JobStatus::Queued) else {
            return;
        };
        attempt.ended = Some(why.to_string());
        if self.attempts.len() >= MAX_ATTEMPTS {
            let error = format!("attempt {} of {MAX_ATTEMPTS} ended: {why}; giving up", self.epoch);
            self.events.push(JobEvent::new(at, format!("The job failed: {error}")));
            (self.status, self.finished_at, self.error) = (JobStatus::Failed, Some(at), Some(error));
        } else {
            self.status = JobStatus::Queued;
            self.events.push(JobEvent::new(at, format!("Attempt {} ended: {why}; queued again", self.epoch)));
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u64,
    pub uri: String,
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

/// One optimizer step of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepFigures {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    /// Tokens per second of the job since it started on its worker.
    pub tokens_per_s: f64,
}

/// Steps recorded in a job's events at most (the oldest give way).
const MAX_STEP_EVENTS: usize = 5_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub tenant: String,
    pub base_model: String,
    /// The adapter its success registers for the tenant (none: the job only trains).
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default)]
    pub created_at: u64,
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// The job's hyperparameters and data, as submitted (the scheduler and worker read it).
    pub spec: serde_json::Value,
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

    /// The membership changed (or must be formed again): members re-join at the next epoch.
    fn reform(&mut self) {
        self.epoch += 1;
        self.formed = false;
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

/// A change to the state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    RegisterWorker {
        id: String,
        addr: String,
        gpus: Vec<Gpu>,
        /// Its collective address: a group worker (see [`Worker::collective_addr`]).
        #[serde(default)]
        collective_addr: String,
    },
    /// Its lease expired: its jobs go back to the queue (from their last checkpoint) and its
    /// place in each worker group goes to the alive group worker holding the fewest shards, at
    /// the group's next epoch (the group is dropped when there is none).
    MarkWorkerDead {
        id: String,
    },
    RegisterModel {
        name: String,
        uri: String,
    },
    /// A new version of a tenant's adapter (version 1 for a new name).
    PutAdapter {
        tenant: String,
        name: String,
        base_model: String,
        checksum: String,
        uri: String,
    },
    DeleteAdapter {
        tenant: String,
        name: String,
    },
    SubmitJob {
        id: String,
        tenant: String,
        base_model: String,
        spec: serde_json::Value,
        /// The adapter its success registers (a new version when the name exists).
        #[serde(default)]
        adapter: Option<String>,
    },
    /// Starts a new attempt of a queued job on `worker`, with the next epoch.
    PlaceJob {
        id: String,
        worker: String,
    },
    /// What an attempt reports; refused unless `epoch` is the job's current one.
    ReportJob {
        id: String,
        epoch: u64,
        report: JobReport,
    },
    CancelJob {
        id: String,
    },
    SetPlacement {
        group: String,
        placement: Placement,
    },
    /// A tenant's API key, known by its SHA-256 (hex): the key itself is never stored.
    CreateApiKey {
        tenant: String,
        key_sha256: String,
    },
    PutFile {
        id: String,
        file: File,
    },
    DeleteFile {
        tenant: String,
        id: String,
    },
    RemovePlacement {
        group: String,
    },
    /// Places base `model` as a tensor-parallel group of `size` ranks over the alive group
    /// workers that are in no group yet (by id), at epoch 1.
    CreateGroup {
        group: String,
        model: String,
        size: usize,
        /// Spread a MoE model's experts whole over the ranks (see [`Placement::expert_parallel`]).
        #[serde(default)]
        expert_parallel: bool,
    },
    /// A member of `group` saw the group's collectives fail at `epoch`; `blame` is the rank
    /// the error named, if it named one. The group is formed again at the next epoch, with the
    /// blamed rank (and any dead member) replaced by a spare group worker where there is one.
    /// Refused for another epoch: the failure of an older formation is old news.
    GroupFailed {
        group: String,
        epoch: u64,
        #[serde(default)]
        blame: Option<usize>,
    },
    /// Rank 0 of `group` is connected to every rank at `epoch`: the group serves.
    GroupFormed {
        group: String,
        epoch: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobReport {
    /// The attempt started training, at optimizer step `step` (past 0 when it resumed from a
    /// checkpoint).
    Running {
        step: u64,
    },
    /// An optimizer step's figures.
    Step(StepFigures),
    Checkpoint {
        step: u64,
        uri: String,
    },
    /// The mean token loss on the validation file after optimizer step `step`.
    Validation {
        step: u64,
        loss: f64,
    },
    /// Done; its adapter, exported to `uri`, becomes the job's adapter for its tenant.
    Succeeded {
        uri: String,
        checksum: String,
    },
    Failed {
        error: String,
    },
}

/// A fine-tuning attempt a worker is to run: what the heartbeat tells it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub job: String,
    pub epoch: u64,
    pub tenant: String,
    pub base_model: String,
    pub spec: serde_json::Value,
    /// Where to resume from.
    pub checkpoint: Option<Checkpoint>,
}

/// A command as proposed to the log: the client's request id makes a retry apply once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub request_id: String,
    pub command: Command,
    /// When it was proposed (Unix seconds, the proposer's clock): apply reads no clock, so the
    /// times it records come from here.
    #[serde(default)]
    pub at: u64,
}

impl Proposal {
    /// A proposal stamped with this machine's time.
    pub fn new(request_id: impl Into<String>, command: Command) -> Self {
        Proposal { request_id: request_id.into(), command, at: unix_now() }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Tenants are the operator's identifiers: 1 to 64 letters, digits, `-`, `_` or `.` (so that
/// `tenant:adapter` names one adapter of one tenant).
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&tenant.len())
        && tenant != "."
        && !tenant.contains("..")
        && tenant.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok { Ok(()) } else { Err(format!("tenant {tenant:?}: use 1 to 64 letters, digits, `-`, `_` or `.`")) }
}

/// Checks a name that users give (tenant, adapter, suffix): it may end up in a path or a
/// metric label, so no path separators, no `..`, no control characters, not empty, not long.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let bad = if name.is_empty() || name.len() > 128 {
        Some("must be 1 to 128 bytes")
    } else if name.contains(['/', '\\']) || name.contains("..") {
        Some("must not contain `/`, `\\` or `..`")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    match bad {
        Some(why) => Err(format!("{what} {name:?}: {why}")),
        None => Ok(()),
    }
}

/// What applying a proposal returned (the same for every replica).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Done,
    /// The adapter version created.
    Version {
        version: u64,
    },
    /// The attempt's epoch.
    Epoch {
        epoch: u64,
    },
    /// Refused; the state did not change.
    Refused {
        reason: String,
    },
}

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
    /// Tenants' API keys: SHA-256 (hex) → tenant.
    #[serde(default)]
    pub api_keys: BTreeMap<String, String>,
    /// Uploaded files by id.
    #[serde(default)]
    pub files: BTreeMap<String, File>,
    /// Addresses of the coordinators added to the group after it started (those it started
    /// with are on every coordinator's command line), by Raft id.
    #[serde(default)]
    pub coordinators: BTreeMap<u64, String>,
    /// Replies of the last [`REMEMBERED_REQUESTS`] proposals by request id, and those ids
    /// oldest first.
    replies: BTreeMap<String, Reply>,
    reply_order: VecDeque<String>,
}

fn refused(reason: impl Into<String>) -> Reply {
    Reply::Refused { reason: reason.into() }
}

impl ClusterState {
    /// Applies the proposal at log `index` (indices must increase; an old one is ignored).
    pub fn apply(&mut self, index: u64, p: &Proposal) -> Reply {
        if index <= self.applied {
            return refused(format!("log index {index} was applied already"));
        }
        self.applied = index;
        if let Some(reply) = self.replies.get(&p.request_id) {
            return reply.clone();
        }
        let reply = self.execute(&p.command, p.at);
        if self.reply_order.len() == REMEMBERED_REQUESTS
            && let Some(oldest) = self.reply_order.pop_front()
        {
            self.replies.remove(&oldest);
        }
        self.reply_order.push_back(p.request_id.clone());
        self.replies.insert(p.request_id.clone(), reply.clone());
        reply
    }

    fn execute(&mut self, command: &Command, at: u64) -> Reply {
        match command.clone() {
            Command::RegisterWorker { id, addr, gpus, collective_addr } => {
                self.workers.insert(id, Worker { addr, gpus, alive: true, collective_addr });
                Reply::Done
            }
            Command::MarkWorkerDead { id } => self.worker_died(&id, at),
            Command::RegisterModel { name, uri } => {
                self.models.insert(name, Model { uri });
                Reply::Done
            }
            Command::PutAdapter { tenant, name, base_model, checksum, uri } => {
                self.put_adapter(tenant, name, AdapterVersion { version: 0, base_model, checksum, uri })
            }
            Command::DeleteAdapter { tenant, name } => {
                match self.adapters.get_mut(&tenant).and_then(|names| names.remove(&name)) {
                    Some(_) => Reply::Done,
                    None => refused(format!("no adapter {name:?}")),
                }
            }
            Command::SubmitJob { id, tenant, base_model, spec, adapter } => {
                if self.jobs.contains_key(&id) {
                    return refused(format!("job {id:?} exists already"));
                }
                if !self.models.contains_key(&base_model) {
                    return refused(format!("unknown base model {base_model:?}"));
                }
                if let Some(Err(e)) = adapter.as_deref().map(|a| check_name("adapter", a)) {
                    return refused(e);
                }
                let job = Job {
                    tenant,
                    base_model,
                    adapter,
                    created_at: at,
                    finished_at: None,
                    checkpoints: Vec::new(),
                    events: vec![JobEvent::new(at, "Job created")],
                    spec,
                    status: JobStatus::Queued,
                    epoch: 0,
                    attempts: Vec::new(),
                    checkpoint: None,
                    error: None,
                };
                self.jobs.insert(id, job);
                Reply::Done
            }
            Command::PlaceJob { id, worker } => {
                if !self.workers.get(&worker).is_some_and(|w| w.alive) {
                    return refused(format!("worker {worker:?} is not alive"));
                }
                let Some(job) = self.jobs.get_mut(&id) else { return refused(format!("no job {id:?}")) };
                if job.status != JobStatus::Queued {
                    return refused(format!("job {id:?} is {:?}, not queued", job.status));
                }
                job.epoch += 1;
                job.status = JobStatus::Placed;
                let message = format!("Attempt {} placed on worker {worker}", job.epoch);
                job.events.push(JobEvent::new(at, message));
                job.attempts.push(Attempt { epoch: job.epoch, worker, ended: None });
                Reply::Epoch { epoch: job.epoch }
            }
            Command::ReportJob { id, epoch, report } => {
                let Some(job) = self.jobs.get_mut(&id) else { return refused(format!("no job {id:?}")) };
                if epoch != job.epoch || job.status.is_final() || job.status == JobStatus::Queued {
                    return refused(format!(
                        "stale attempt: epoch {epoch}, job {id:?} is at epoch {} ({:?})",
                        job.epoch, job.status
                    ));
                }
                match report {
                    JobReport::Running { step } => {
                        job.status = JobStatus::Running;
                        job.events.push(JobEvent::new(at, format!("Attempt {epoch} started training at step {step}")));
                    }
                    JobReport::Step(figures) => {
                        job.status = JobStatus::Running;
                        let message =
                            format!("Step {}/{}: training loss={:.4}", figures.step, figures.total_steps, figures.loss);
                        job.events.push(JobEvent { step: Some(figures), ..JobEvent::new(at, message) });
                        let steps = job.events.iter().filter(|e| e.step.is_some()).count();
                        if steps > MAX_STEP_EVENTS
                            && let Some(oldest) = job.events.iter().position(|e| e.step.is_some())
                        {
                            job.events.remove(oldest);
                        }
                    }
                    JobReport::Validation { step, loss } => {
                        let message = format!("Step {step}: validation loss={loss:.4}");
                        job.events.push(JobEvent { validation: Some((step, loss)), ..JobEvent::new(at, message) });
                    }
                    JobReport::Checkpoint { step, uri } => {
                        job.status = JobStatus::Running;
                        job.events.push(JobEvent::new(at, format!("Checkpoint saved at step {step}")));
                        job.checkpoint = Some(Checkpoint { step, uri });
                        job.checkpoints.extend(job.checkpoint.clone());
                    }
                    JobReport::Succeeded { uri, checksum } => {
                        job.status = JobStatus::Succeeded;
                        job.finished_at = Some(at);
                        let (tenant, adapter) = (job.tenant.clone(), job.adapter.clone());
                        let base_model = job.base_model.clone();
                        job.events.push(JobEvent::new(at, "The job has successfully completed"));
                        if let Some(name) = adapter {
                            return self.put_adapter(
                                tenant,
                                name,
                                AdapterVersion { version: 0, base_model, checksum, uri },
                            );
                        }
                    }
                    JobReport::Failed { error } => {
                        job.status = JobStatus::Failed;
                        job.finished_at = Some(at);
                        job.events.push(JobEvent::new(at, format!("The job failed: {error}")));
                        job.error = Some(error);
                    }
                }
                Reply::Done
            }
            Command::CancelJob { id } => {
                let Some(job) = self.jobs.get_mut(&id) else { return refused(format!("no job {id:?}")) };
                if job.status.is_final() {
                    return refused(format!("job {id:?} is {:?} already", job.status));
                }
                job.status = JobStatus::Cancelled;
                job.finished_at = Some(at);
                job.events.push(JobEvent::new(at, "The job was cancelled"));
                Reply::Done
            }
            Command::SetPlacement { group, placement } => {
                if let Some(w) = placement.workers.iter().find(|w| !self.workers.get(*w).is_some_and(|w| w.alive)) {
                    return refused(format!("worker {w:?} is not alive"));
                }
                self.placements.insert(group, placement);
                Reply::Done
            }
            Command::RemovePlacement { group } => match self.placements.remove(&group) {
                Some(p) => {
                    self.requeue_group_jobs(&p, at, "its worker group was removed");
                    Reply::Done
                }
                None => refused(format!("no placement {group:?}")),
            },
            Command::CreateGroup { group, model, size, expert_parallel } => {
                self.create_group(group, model, size, expert_parallel)
            }
            Command::GroupFailed { group, epoch, blame } => self.group_failed(&group, epoch, blame, at),
            Command::GroupFormed { group, epoch } => match self.placements.get_mut(&group) {
                Some(p) if p.epoch == epoch => {
                    p.formed = true;
                    Reply::Done
                }
                Some(p) => refused(format!("stale formation: epoch {epoch}, group {group:?} is at epoch {}", p.epoch)),
                None => refused(format!("no group {group:?}")),
            },
            Command::CreateApiKey { tenant, key_sha256 } => {
                if let Err(e) = check_tenant(&tenant) {
                    return refused(e);
                }
                self.api_keys.insert(key_sha256, tenant);
                Reply::Done
            }
            Command::PutFile { id, file } => {
                if self.files.contains_key(&id) {
                    return refused(format!("file {id:?} exists already"));
                }
                self.files.insert(id, file);
                Reply::Done
            }
            Command::DeleteFile { tenant, id } => match self.files.get(&id) {
                Some(f) if f.tenant == tenant => {
                    self.files.remove(&id);
                    Reply::Done
                }
                _ => refused(format!("no file {id:?}")),
            },
        }
    }

    /// Adds the next version of a tenant's adapter (version 1 for a new name).
    fn put_adapter(&mut self, tenant: String, name: String, mut v: AdapterVersion) -> Reply {
        if !self.models.contains_key(&v.base_model) {
            return refused(format!("unknown base model {:?}", v.base_model));
        }
        if let Err(e) = check_name("adapter", &name) {
            return refused(e);
        }
        let versions = self.adapters.entry(tenant).or_default().entry(name).or_default();
        v.version = versions.last().map_or(1, |last| last.version + 1);
        let version = v.version;
        versions.push(v);
        Reply::Version { version }
    }

    /// Records a membership change applied at log `index`: coordinators added (with their
    /// addresses) and removed.
    pub fn change_coordinators(&mut self, index: u64, added: BTreeMap<u64, String>, removed: &[u64]) {
        self.applied = self.applied.max(index);
        self.coordinators.extend(added);
        for id in removed {
            self.coordinators.remove(id);
        }
    }

    fn worker_died(&mut self, id: &str, at: u64) -> Reply {
        let Some(worker) = self.workers.get_mut(id) else { return refused(format!("no worker {id:?}")) };
        worker.alive = false;
        for job in self.jobs.values_mut() {
            job.end_attempt_on(id, at, "its worker's lease expired");
        }
        let groups: Vec<String> =
            self.placements.iter().filter(|(_, p)| p.workers.iter().any(|w| w == id)).map(|(g, _)| g.clone()).collect();
        for group in groups {
            // Only group workers can join a group's collectives (a placement set by hand, at
            // epoch 0, takes any worker, group workers first).
            let (members, by_hand) = (&self.placements[&group].workers, self.placements[&group].epoch == 0);
            let replacement = self.least_loaded(
                |w| (self.workers[w].collective_addr.is_empty(), self.shards_on(w)),
                |w| !members.contains(w) && (by_hand || !self.workers[w].collective_addr.is_empty()),
            );
            let old = self.placements[&group].clone();
            self.requeue_group_jobs(&old, at, "a worker of its group died");
            match replacement {
                Some(r) => {
                    if let Some(p) = self.placements.get_mut(&group) {
                        p.workers.iter_mut().filter(|w| *w == id).for_each(|w| *w = r.clone());
                        p.reform();
                    }
                }
                None => drop(self.placements.remove(&group)),
            }
        }
        Reply::Done
    }

    /// Ends the attempts running on formation `p` of a worker group (on its rank 0) and queues
    /// their jobs again: the formation's engine is gone, and they resume from their last
    /// checkpoint wherever the scheduler puts them next (the re-formed group, often).
    fn requeue_group_jobs(&mut self, p: &Placement, at: u64, why: &str) {
        let Some(rank0) = p.workers.first() else { return };
        // A placement set by hand may name whole-model workers, whose jobs run on their own.
        if self.workers.get(rank0).is_none_or(|w| w.collective_addr.is_empty()) {
            return;
        }
        for job in self.jobs.values_mut() {
            job.end_attempt_on(rank0, at, why);
        }
    }

    /// Group workers alive and in no group, by id: those a group may take.
    fn spares(&self) -> Vec<String> {
        (self.workers.iter())
            .filter(|(id, w)| w.alive && !w.collective_addr.is_empty() && self.shards_on(id) == 0)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn create_group(&mut self, group: String, model: String, size: usize, expert_parallel: bool) -> Reply {
        if let Err(e) = check_name("group", &group) {
            return refused(e);
        }
        if self.placements.contains_key(&group) {
            return refused(format!("group {group:?} exists already"));
        }
        if !self.models.contains_key(&model) {
            return refused(format!("unknown base model {model:?}"));
        }
        let spares = self.spares();
        if size == 0 || spares.len() < size {
            return refused(format!(
                "a group of {size} ranks needs {size} alive group workers (with a collective address) in no \
                 group; there are {}",
                spares.len()
            ));
        }
        let mut placement = Placement::new(model, spares.into_iter().take(size).collect());
        placement.expert_parallel = expert_parallel;
        placement.reform();
        self.placements.insert(group, placement);
        Reply::Done
    }

    fn group_failed(&mut self, group: &str, epoch: u64, blame: Option<usize>, at: u64) -> Reply {
        let Some(p) = self.placements.get(group) else { return refused(format!("no group {group:?}")) };
        if p.epoch != epoch {
            return refused(format!("stale formation: epoch {epoch}, group {group:?} is at epoch {}", p.epoch));
        }
        let p = p.clone();
        self.requeue_group_jobs(&p, at, "its worker group failed");
        // The blamed rank and every member that cannot take part any more give way to spares.
        let unfit = |rank: usize, w: &String| {
            Some(rank) == blame || !self.workers.get(w).is_some_and(|w| w.alive && !w.collective_addr.is_empty())
        };
        let out: Vec<usize> = p.workers.iter().enumerate().filter(|(r, w)| unfit(*r, w)).map(|(r, _)| r).collect();
        let mut spares = self.spares().into_iter();
        let mut workers = p.workers.clone();
        for rank in out {
            if let Some(s) = spares.next() {
                workers[rank] = s;
            }
        }
        if let Some(p) = self.placements.get_mut(group) {
            p.workers = workers;
            p.reform();
        }
        Reply::Done
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

    /// The alive worker `eligible` allows with the least `load` (ties: the first by id).
    fn least_loaded<L: Ord>(&self, load: impl Fn(&str) -> L, eligible: impl Fn(&String) -> bool) -> Option<String> {
        (self.workers.iter())
            .filter(|(w, info)| info.alive && eligible(w))
            .min_by_key(|(w, _)| load(w))
            .map(|(w, _)| w.clone())
    }

    /// Shards of worker groups on worker `w`.
    fn shards_on(&self, w: &str) -> usize {
        self.placements.values().flat_map(|p| &p.workers).filter(|x| *x == w).count()
    }

    /// The scheduler's next moves: each queued job onto the alive worker with the fewest jobs
    /// placed or running (counting the moves before it), preferring workers that have the job's
    /// base model loaded, then rank 0 of a formed worker group that serves it, then the other
    /// whole-model workers. Pure: the leader proposes them as [`Command::PlaceJob`]s.
    pub fn schedule(&self) -> Vec<(String, String)> {
        let mut jobs_on: BTreeMap<String, usize> = BTreeMap::new();
        for job in self.jobs.values().filter(|j| matches!(j.status, JobStatus::Placed | JobStatus::Running)) {
            if let Some(a) = job.attempts.last() {
                *jobs_on.entry(a.worker.clone()).or_default() += 1;
            }
        }
        let mut moves = Vec::new();
        for (id, job) in self.jobs.iter().filter(|(_, j)| j.status == JobStatus::Queued) {
            let has_model = |w: &str| self.workers[w].gpus.iter().any(|g| g.models.contains(&job.base_model));
            let leads_group = |w: &str| {
                (self.placements.values())
                    .any(|p| p.formed && p.model == job.base_model && p.workers.first().is_some_and(|r| r == w))
            };
            // 0: the model loaded whole; 1: rank 0 of a group serving it; 2: another whole-model
            // worker. Other group workers take no jobs.
            let tier = |w: &str, info: &Worker| match (info.collective_addr.is_empty(), has_model(w), leads_group(w)) {
                (true, true, _) => Some(0),
                (false, _, true) => Some(1),
                (true, false, _) => Some(2),
                (false, _, false) => None,
            };
            let best = (self.workers.iter())
                .filter(|(_, info)| info.alive)
                .filter_map(|(w, info)| tier(w, info).map(|t| (t, jobs_on.get(w).copied().unwrap_or(0), w)))
                .min()
                .map(|(_, _, w)| w.clone());
            let Some(worker) = best else { break };
            *jobs_on.entry(worker.clone()).or_default() += 1;
            moves.push((id.clone(), worker));
        }
        moves
    }

    /// The attempts worker `id` is to run now: its jobs placed or running.
    pub fn assignments(&self, id: &str) -> Vec<Assignment> {
        (self.jobs.iter())
            .filter(|(_, j)| matches!(j.status, JobStatus::Placed | JobStatus::Running))
            .filter(|(_, j)| j.attempts.last().is_some_and(|a| a.worker == id && a.epoch == j.epoch))
            .map(|(job, j)| Assignment {
                job: job.clone(),
                epoch: j.epoch,
                tenant: j.tenant.clone(),
                base_model: j.base_model.clone(),
                spec: j.spec.clone(),
                checkpoint: j.checkpoint.clone(),
            })
            .collect()
    }

    /// The whole state, serialized (a snapshot of the log up to `applied`).
    pub fn snapshot(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// The state a [`ClusterState::snapshot`] holds.
    pub fn restore(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
