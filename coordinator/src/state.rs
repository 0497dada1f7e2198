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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u64,
    pub uri: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub tenant: String,
    pub base_model: String,
    /// The job's hyperparameters and data, as submitted (the scheduler and worker read it).
    pub spec: serde_json::Value,
    pub status: JobStatus,
    /// The current attempt's fencing token: reports carrying another epoch are refused.
    pub epoch: u64,
    pub attempts: Vec<Attempt>,
    /// The last checkpoint reported; a re-queued job resumes from it.
    pub checkpoint: Option<Checkpoint>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub model: String,
    /// The workers of the group, rank order (tensor-parallel shards).
    pub workers: Vec<String>,
    /// Adapters resident on the group: (tenant, name).
    pub adapters: Vec<(String, String)>,
}

/// A change to the state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    RegisterWorker {
        id: String,
        addr: String,
        gpus: Vec<Gpu>,
    },
    /// Its lease expired: its jobs go back to the queue (from their last checkpoint) and its
    /// place in each worker group goes to the alive worker holding the fewest shards (the group
    /// is dropped when there is none).
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
    RemovePlacement {
        group: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobReport {
    Running,
    Checkpoint { step: u64, uri: String },
    Succeeded,
    Failed { error: String },
}

/// A command as proposed to the log: the client's request id makes a retry apply once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub request_id: String,
    pub command: Command,
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
        let reply = self.execute(&p.command);
        if self.reply_order.len() == REMEMBERED_REQUESTS
            && let Some(oldest) = self.reply_order.pop_front()
        {
            self.replies.remove(&oldest);
        }
        self.reply_order.push_back(p.request_id.clone());
        self.replies.insert(p.request_id.clone(), reply.clone());
        reply
    }

    fn execute(&mut self, command: &Command) -> Reply {
        match command.clone() {
            Command::RegisterWorker { id, addr, gpus } => {
                self.workers.insert(id, Worker { addr, gpus, alive: true });
                Reply::Done
            }
            Command::MarkWorkerDead { id } => self.worker_died(&id),
            Command::RegisterModel { name, uri } => {
                self.models.insert(name, Model { uri });
                Reply::Done
            }
            Command::PutAdapter { tenant, name, base_model, checksum, uri } => {
                if !self.models.contains_key(&base_model) {
                    return refused(format!("unknown base model {base_model:?}"));
                }
                let versions = self.adapters.entry(tenant).or_default().entry(name).or_default();
                let version = versions.last().map_or(1, |v| v.version + 1);
                versions.push(AdapterVersion { version, base_model, checksum, uri });
                Reply::Version { version }
            }
            Command::DeleteAdapter { tenant, name } => {
                match self.adapters.get_mut(&tenant).and_then(|names| names.remove(&name)) {
                    Some(_) => Reply::Done,
                    None => refused(format!("no adapter {name:?}")),
                }
            }
            Command::SubmitJob { id, tenant, base_model, spec } => {
                if self.jobs.contains_key(&id) {
                    return refused(format!("job {id:?} exists already"));
                }
                if !self.models.contains_key(&base_model) {
                    return refused(format!("unknown base model {base_model:?}"));
                }
                let job = Job {
                    tenant,
                    base_model,
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
                    JobReport::Running => job.status = JobStatus::Running,
                    JobReport::Checkpoint { step, uri } => {
                        job.status = JobStatus::Running;
                        job.checkpoint = Some(Checkpoint { step, uri });
                    }
                    JobReport::Succeeded => job.status = JobStatus::Succeeded,
                    JobReport::Failed { error } => {
                        job.status = JobStatus::Failed;
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
                Some(_) => Reply::Done,
                None => refused(format!("no placement {group:?}")),
            },
        }
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

    fn worker_died(&mut self, id: &str) -> Reply {
        let Some(worker) = self.workers.get_mut(id) else { return refused(format!("no worker {id:?}")) };
        worker.alive = false;
        for job in self.jobs.values_mut() {
            let current = job.attempts.last_mut().filter(|a| a.epoch == job.epoch && a.worker == id);
            if let (Some(attempt), false) = (current, job.status.is_final() || job.status == JobStatus::Queued) {
                attempt.ended = Some("worker lease expired".into());
                job.status = JobStatus::Queued;
            }
        }
        let groups: Vec<String> =
            self.placements.iter().filter(|(_, p)| p.workers.iter().any(|w| w == id)).map(|(g, _)| g.clone()).collect();
        for group in groups {
            let replacement =
                self.least_loaded(|w| self.shards_on(w), |w| !self.placements[&group].workers.contains(w));
            match replacement {
                Some(r) => {
                    if let Some(p) = self.placements.get_mut(&group) {
                        p.workers.iter_mut().filter(|w| *w == id).for_each(|w| *w = r.clone());
                    }
                }
                None => drop(self.placements.remove(&group)),
            }
        }
        Reply::Done
    }

    /// The alive worker `eligible` allows with the least `load` (ties: the first by id).
    fn least_loaded(&self, load: impl Fn(&str) -> usize, eligible: impl Fn(&String) -> bool) -> Option<String> {
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
    /// base model loaded. Pure: the leader proposes them as [`Command::PlaceJob`]s.
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
            let best = (self.workers.iter())
                .filter(|(_, info)| info.alive)
                .min_by_key(|(w, _)| (!has_model(w), jobs_on.get(*w).copied().unwrap_or(0)))
                .map(|(w, _)| w.clone());
            let Some(worker) = best else { break };
            *jobs_on.entry(worker.clone()).or_default() += 1;
            moves.push((id.clone(), worker));
        }
        moves
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
