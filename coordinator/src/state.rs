//! The replicated state machine: [`StateMachine`] applies [`Proposal`]s, in log order, to the
//! cluster's [`ClusterState`] (the contract's view every process reads), so every replica (and
//! the etcd store) computes the same state; apply reads no clock and no randomness. A command
//! is validated before it applies ([`Command::validate`]): no command puts a bad id, name, path
//! or address into the state. Retried proposals (same request id) apply once and get their
//! first reply again.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use tandem_proto::contract::{
    AdapterVersion, ApiKey, Attempt, Checkpoint, ClusterState, Command, Job, JobEvent, JobReport, JobStatus, Model,
    Placement, Proposal, Reply, TenantLimits, Worker,
};

/// Replies remembered for retried proposals: the last this many request ids.
const REMEMBERED_REQUESTS: usize = 10_000;

/// Attempts a job gets: one whose attempts keep ending (its worker dies, its group fails)
/// fails after this many rather than go round for ever.
pub const MAX_ATTEMPTS: usize = 5;

/// Steps recorded in a job's events at most (the oldest give way): a job's loss curve stays
/// in the replicated state, bounded, so that any coordinator answers `/events` after a
/// failover without a second store.
const MAX_STEP_EVENTS: usize = 5_000;

/// The state and what replays need: the replies of recent requests. Snapshots hold both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateMachine {
    #[serde(flatten)]
    state: ClusterState,
    /// Replies of the last [`REMEMBERED_REQUESTS`] proposals by request id, and those ids
    /// oldest first.
    replies: BTreeMap<String, Reply>,
    reply_order: VecDeque<String>,
}

fn refused(reason: impl Into<String>) -> Reply {
    Reply::Refused { reason: reason.into() }
}

/// Ends `job`'s current attempt if it runs on `worker` (for `why`): the job is queued again, to
/// resume from its checkpoint, or fails once it has had [`MAX_ATTEMPTS`].
fn end_attempt(job: &mut Job, worker: &str, at: u64, why: &str) {
    let current = job.attempts.last_mut().filter(|a| a.epoch == job.epoch && a.worker == worker);
    let (Some(attempt), false) = (current, job.status.is_final() || job.status == JobStatus::Queued) else {
        return;
    };
    attempt.ended = Some(why.to_string());
    if job.attempts.iter().filter(|a| !a.handed_off).count() >= MAX_ATTEMPTS {
        let error = format!("attempt {} of {MAX_ATTEMPTS} ended: {why}; giving up", job.epoch);
        job.events.push(JobEvent::new(at, format!("The job failed: {error}")));
        (job.status, job.finished_at, job.error) = (JobStatus::Failed, Some(at), Some(error));
    } else {
        job.status = JobStatus::Queued;
        job.events.push(JobEvent::new(at, format!("Attempt {} ended: {why}; queued again", job.epoch)));
    }
}

/// The membership changed (or must be formed again): members re-join at the next epoch.
fn reform(p: &mut Placement) {
    p.epoch += 1;
    p.formed = false;
}

impl StateMachine {
    /// The state as of the last entry applied.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The whole machine, serialized (a snapshot of the log up to `applied`).
    pub fn snapshot(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// The machine a [`StateMachine::snapshot`] holds.
    pub fn restore(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// A new group's machine holding `state` (a backup's): the coordinators' addresses are the
    /// new group's own, and no request is remembered. Workers keep their entries: a new leader
    /// gives each a full lease, so those that come back go on and the others are marked dead
    /// (their jobs queued again from their checkpoints).
    pub fn for_new_group(mut state: ClusterState) -> Self {
        state.coordinators.clear();
        StateMachine { state, ..StateMachine::default() }
    }

    /// The reply a proposal with `request_id` got, while it is remembered.
    pub fn remembered(&self, request_id: &str) -> Option<&Reply> {
        self.replies.get(request_id)
    }

    /// Applies the proposal at log `index` (indices must increase; an old one is ignored).
    pub fn apply(&mut self, index: u64, p: &Proposal) -> Reply {
        if index <= self.state.applied {
            return refused(format!("log index {index} was applied already"));
        }
        self.state.applied = index;
        if let Some(reply) = self.replies.get(&p.request_id) {
            return reply.clone();
        }
        let reply = match p.command.validate() {
            Ok(()) => self.execute(&p.command, p.at),
            Err(invalid) => refused(invalid.0),
        };
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
                let draining = self.state.workers.get(&id).is_some_and(|w| w.draining);
                self.state.workers.insert(id, Worker { addr, gpus, alive: true, collective_addr, draining });
                Reply::Done
            }
            Command::MarkWorkerDead { id } => self.worker_died(&id, at),
            Command::DrainWorker { id, drain } => match self.state.workers.get_mut(&id) {
                Some(w) => {
                    w.draining = drain;
                    Reply::Done
                }
                None => refused(format!("no worker {id:?}")),
            },
            Command::RegisterModel { name, uri } => {
                self.state.models.insert(name, Model { uri });
                Reply::Done
            }
            Command::RemoveModel { name } => self.remove_model(&name),
            Command::PutAdapter { tenant, name, base_model, checksum, uri } => {
                self.put_adapter(tenant, name, AdapterVersion { version: 0, base_model, checksum, uri })
            }
            Command::DeleteAdapter { tenant, name } => {
                match self.state.adapters.get_mut(&tenant).and_then(|names| names.remove(&name)) {
                    Some(_) => Reply::Done,
                    None => refused(format!("no adapter {name:?}")),
                }
            }
            Command::SubmitJob { id, tenant, spec, adapter } => {
                if self.state.jobs.contains_key(&id) {
                    return refused(format!("job {id:?} exists already"));
                }
                if !self.state.models.contains_key(&spec.base_model) {
                    return refused(format!("unknown base model {:?}", spec.base_model));
                }
                let job = Job {
                    tenant,
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
                    plan: None,
                    trained_tokens: 0,
                    trained_steps: 0,
                };
                self.state.jobs.insert(id, job);
                Reply::Done
            }
            Command::PlaceJob { id, worker } => {
                match self.state.workers.get(&worker) {
                    Some(w) if w.draining => return refused(format!("worker {worker:?} is draining")),
                    Some(w) if w.alive => {}
                    _ => return refused(format!("worker {worker:?} is not alive")),
                }
                let Some(job) = self.state.jobs.get_mut(&id) else { return refused(format!("no job {id:?}")) };
                if job.status != JobStatus::Queued {
                    return refused(format!("job {id:?} is {:?}, not queued", job.status));
                }
                job.epoch += 1;
                job.status = JobStatus::Placed;
                let message = format!("Attempt {} placed on worker {worker}", job.epoch);
                job.events.push(JobEvent::new(at, message));
                job.attempts.push(Attempt { epoch: job.epoch, worker, ended: None, handed_off: false });
                Reply::Epoch { epoch: job.epoch }
            }
            Command::ReportJob { id, epoch, report } => {
                let Some(job) = self.state.jobs.get_mut(&id) else { return refused(format!("no job {id:?}")) };
                if epoch != job.epoch || job.status.is_final() || job.status == JobStatus::Queued {
                    return refused(format!(
                        "stale attempt: epoch {epoch}, job {id:?} is at epoch {} ({:?})",
                        job.epoch, job.status
                    ));
                }
                match report {
                    JobReport::Running { step, plan } => {
                        job.status = JobStatus::Running;
                        job.plan = plan.or(job.plan.take());
                        job.events.push(JobEvent::new(at, format!("Attempt {epoch} started training at step {step}")));
                    }
                    JobReport::Step(figures) => {
                        job.status = JobStatus::Running;
                        if figures.step > job.trained_steps {
                            job.trained_steps = figures.step;
                            job.trained_tokens += figures.tokens;
                        }
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
                        job.checkpoint = Some(Checkpoint { step, uri, at });
                        job.checkpoints.extend(job.checkpoint.clone());
                    }
                    JobReport::Succeeded { uri, checksum } => {
                        job.status = JobStatus::Succeeded;
                        job.finished_at = Some(at);
                        let (tenant, adapter) = (job.tenant.clone(), job.adapter.clone());
                        let base_model = job.spec.base_model.clone();
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
                    JobReport::Interrupted { error } => {
                        let worker = job.attempts.last().map(|a| a.worker.clone()).unwrap_or_default();
                        end_attempt(job, &worker, at, &format!("interrupted on worker {worker}: {error}"));
                    }
                    JobReport::HandedOff => {
                        let Some(attempt) = job.attempts.last_mut() else { return refused("no attempt") };
                        attempt.handed_off = true;
                        let worker = attempt.worker.clone();
                        let from =
                            job.checkpoint.as_ref().map_or("the start".to_string(), |c| format!("step {}", c.step));
                        end_attempt(job, &worker, at, &format!("handed off by draining worker {worker}, from {from}"));
                    }
                }
                Reply::Done
            }
            Command::CancelJob { id } => {
                let Some(job) = self.state.jobs.get_mut(&id) else { return refused(format!("no job {id:?}")) };
                if job.status.is_final() {
                    return refused(format!("job {id:?} is {:?} already", job.status));
                }
                job.status = JobStatus::Cancelled;
                job.finished_at = Some(at);
                job.events.push(JobEvent::new(at, "The job was cancelled"));
                Reply::Done
            }
            Command::SetPlacement { group, placement } => {
                if let Some(w) = placement.workers.iter().find(|w| !self.state.workers.get(*w).is_some_and(|w| w.alive))
                {
                    return refused(format!("worker {w:?} is not alive"));
                }
                self.state.placements.insert(group, placement);
                Reply::Done
            }
            Command::RemovePlacement { group } => match self.state.placements.remove(&group) {
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
            Command::GroupFormed { group, epoch } => match self.state.placements.get_mut(&group) {
                Some(p) if p.epoch == epoch => {
                    p.formed = true;
                    Reply::Done
                }
                Some(p) => refused(format!("stale formation: epoch {epoch}, group {group:?} is at epoch {}", p.epoch)),
                None => refused(format!("no group {group:?}")),
            },
            Command::CreateApiKey { tenant, key_sha256, expires_at } => {
                self.state.api_keys.insert(key_sha256, ApiKey { tenant, created_at: at, expires_at });
                Reply::Done
            }
            Command::SetLimits { tenant, limits } => {
                match limits == TenantLimits::default() {
                    true => self.state.limits.remove(&tenant),
                    false => self.state.limits.insert(tenant, limits),
                };
                Reply::Done
            }
            Command::RevokeApiKey { id } => {
                let before = self.state.api_keys.len();
                self.state.api_keys.retain(|hash, _| ApiKey::id(hash) != id);
                match self.state.api_keys.len() < before {
                    true => Reply::Done,
                    false => refused(format!("no API key {id:?}")),
                }
            }
            Command::PutFile { id, file } => {
                if self.state.files.contains_key(&id) {
                    return refused(format!("file {id:?} exists already"));
                }
                self.state.files.insert(id, file);
                Reply::Done
            }
            Command::DeleteFile { tenant, id } => match self.state.files.get(&id) {
                Some(f) if f.tenant == tenant => {
                    self.state.files.remove(&id);
                    Reply::Done
                }
                _ => refused(format!("no file {id:?}")),
            },
        }
    }

    /// Adds the next version of a tenant's adapter (version 1 for a new name).
    fn put_adapter(&mut self, tenant: String, name: String, mut v: AdapterVersion) -> Reply {
        if !self.state.models.contains_key(&v.base_model) {
            return refused(format!("unknown base model {:?}", v.base_model));
        }
        let versions = self.state.adapters.entry(tenant).or_default().entry(name).or_default();
        v.version = versions.last().map_or(1, |last| last.version + 1);
        let version = v.version;
        versions.push(v);
        Reply::Version { version }
    }

    /// Passes over the entry at log `index`, which holds no command (an empty entry a new
    /// leader appends).
    pub fn skip(&mut self, index: u64) {
        self.state.applied = self.state.applied.max(index);
    }

    /// Records a membership change applied at log `index`: coordinators added (with their
    /// addresses) and removed.
    pub fn change_coordinators(&mut self, index: u64, added: BTreeMap<u64, String>, removed: &[u64]) {
        self.state.applied = self.state.applied.max(index);
        self.state.coordinators.extend(added);
        for id in removed {
            self.state.coordinators.remove(id);
        }
    }

    fn worker_died(&mut self, id: &str, at: u64) -> Reply {
        let Some(worker) = self.state.workers.get_mut(id) else { return refused(format!("no worker {id:?}")) };
        worker.alive = false;
        for job in self.state.jobs.values_mut() {
            end_attempt(job, id, at, "its worker's lease expired");
        }
        let groups: Vec<String> = self
            .state
            .placements
            .iter()
            .filter(|(_, p)| p.workers.iter().any(|w| w == id))
            .map(|(g, _)| g.clone())
            .collect();
        for group in groups {
            // Only group workers can join a group's collectives (a placement set by hand, at
            // epoch 0, takes any worker, group workers first).
            let (members, by_hand) = (&self.state.placements[&group].workers, self.state.placements[&group].epoch == 0);
            let replacement = least_loaded(
                &self.state,
                |w| (self.state.workers[w].collective_addr.is_empty(), shards_on(&self.state, w)),
                |w| !members.contains(w) && (by_hand || !self.state.workers[w].collective_addr.is_empty()),
            );
            let old = self.state.placements[&group].clone();
            self.requeue_group_jobs(&old, at, "a worker of its group died");
            // With no worker to take the rank, the group outlives the outage: it waits, not
            // formed, for its member to come back (or for a spare at its next failure).
            if let Some(p) = self.state.placements.get_mut(&group) {
                if let Some(r) = replacement {
                    p.workers.iter_mut().filter(|w| *w == id).for_each(|w| *w = r.clone());
                }
                reform(p);
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
        if self.state.workers.get(rank0).is_none_or(|w| w.collective_addr.is_empty()) {
            return;
        }
        for job in self.state.jobs.values_mut() {
            end_attempt(job, rank0, at, why);
        }
    }

    fn remove_model(&mut self, name: &str) -> Reply {
        if !self.state.models.contains_key(name) {
            return refused(format!("no base model {name:?}"));
        }
        let s = &self.state;
        let jobs = s.jobs.iter().filter(|(_, j)| j.spec.base_model == name && !j.status.is_final()).map(|(id, _)| id);
        let groups = s.placements.iter().filter(|(_, p)| p.model == name).map(|(g, _)| g);
        let workers = (s.workers.iter())
            .filter(|(_, w)| {
                w.alive && w.collective_addr.is_empty() && w.gpus.iter().any(|g| g.models.iter().any(|m| m == name))
            })
            .map(|(id, _)| id);
        let users: Vec<String> = (jobs.map(|id| format!("job {id}")))
            .chain(groups.map(|g| format!("group {g}")))
            .chain(workers.map(|w| format!("worker {w}")))
            .collect();
        if !users.is_empty() {
            return refused(format!("base model {name:?} is in use by {}", users.join(", ")));
        }
        self.state.models.remove(name);
        Reply::Done
    }

    fn create_group(&mut self, group: String, model: String, size: usize, expert_parallel: bool) -> Reply {
        if self.state.placements.contains_key(&group) {
            return refused(format!("group {group:?} exists already"));
        }
        if !self.state.models.contains_key(&model) {
            return refused(format!("unknown base model {model:?}"));
        }
        let spares = spares(&self.state);
        if size == 0 || spares.len() < size {
            return refused(format!(
                "a group of {size} ranks needs {size} alive group workers (with a collective address) in no \
                 group; there are {}",
                spares.len()
            ));
        }
        let mut placement = Placement::new(model, spares.into_iter().take(size).collect());
        placement.expert_parallel = expert_parallel;
        reform(&mut placement);
        self.state.placements.insert(group, placement);
        Reply::Done
    }

    fn group_failed(&mut self, group: &str, epoch: u64, blame: Option<usize>, at: u64) -> Reply {
        let Some(p) = self.state.placements.get(group) else { return refused(format!("no group {group:?}")) };
        if p.epoch != epoch {
            return refused(format!("stale formation: epoch {epoch}, group {group:?} is at epoch {}", p.epoch));
        }
        let p = p.clone();
        self.requeue_group_jobs(&p, at, "its worker group failed");
        // The blamed rank and every member that cannot take part any more give way to spares.
        let unfit = |rank: usize, w: &String| {
            Some(rank) == blame || !self.state.workers.get(w).is_some_and(|w| w.alive && !w.collective_addr.is_empty())
        };
        let out: Vec<usize> = p.workers.iter().enumerate().filter(|(r, w)| unfit(*r, w)).map(|(r, _)| r).collect();
        let mut spares = spares(&self.state).into_iter();
        let mut workers = p.workers.clone();
        for rank in out {
            if let Some(s) = spares.next() {
                workers[rank] = s;
            }
        }
        if let Some(p) = self.state.placements.get_mut(group) {
            p.workers = workers;
            reform(p);
        }
        Reply::Done
    }
}

/// Group workers taking work and in no group, by id: those a group may take.
fn spares(state: &ClusterState) -> Vec<String> {
    (state.workers.iter())
        .filter(|(id, w)| w.takes_work() && !w.collective_addr.is_empty() && shards_on(state, id) == 0)
        .map(|(id, _)| id.clone())
        .collect()
}

/// The worker taking work that `eligible` allows with the least `load` (ties: the first by id).
fn least_loaded<L: Ord>(
    state: &ClusterState,
    load: impl Fn(&str) -> L,
    eligible: impl Fn(&String) -> bool,
) -> Option<String> {
    (state.workers.iter())
        .filter(|(w, info)| info.takes_work() && eligible(w))
        .min_by_key(|(w, _)| load(w))
        .map(|(w, _)| w.clone())
}

/// Shards of worker groups on worker `w`.
fn shards_on(state: &ClusterState, w: &str) -> usize {
    state.placements.values().flat_map(|p| &p.workers).filter(|x| *x == w).count()
}
