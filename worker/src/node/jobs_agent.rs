//! The worker's side of fine-tuning jobs: it starts the attempts the coordinator assigns it
//! (heartbeat answers), from their last checkpoint when they have one, stops those no longer
//! assigned (cancelled, or placed elsewhere), and reports each attempt's steps, checkpoints and
//! end to the cluster, fenced by the attempt's epoch. While the worker is draining, it hands its
//! attempts off instead: each stops after a checkpoint and resumes from it elsewhere. The engine
//! it trains on is the worker's own, or on a group worker, its group's while it is rank 0 (jobs
//! are placed on rank 0 of a formed group; when the group is re-formed, the coordinator queues
//! them again).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::ClusterClient;
use tandem_proto::contract::{Assignment, Command, JobReport, StepFigures, TrainingPlan, dir_checksum};
use tokio::sync::{mpsc, watch};

use super::engine_thread::{EngineThread, JobStart, Serving, TrainEvent, Training};
use super::propose_until_recorded;
use crate::error::{Error, Result};
use crate::train::data::load_jsonl;
use crate::train::{auto, checkpoint};

/// Everything the jobs agent needs.
pub struct JobsAgent {
    /// The engine jobs train on (with its model and tokenizer), when there is one.
    pub serving: Serving,
    pub cluster: ClusterClient,
    /// Where job files go (`jobs/ID/...`): the shared folder the gateway stores blobs in.
    pub blobs: PathBuf,
}

impl JobsAgent {
    /// Runs until the assignments channel closes.
    pub async fn run(
        self,
        mut assignments: watch::Receiver<Vec<Assignment>>,
        mut events: mpsc::UnboundedReceiver<TrainEvent>,
    ) {
        let reports = spawn_reporter(self.cluster.clone());
        // Job id → the epoch of the attempt running here.
        let mut running: HashMap<String, u64> = HashMap::new();
        // Attempts that ended here: their end may not be recorded yet, and the heartbeat may
        // still list them.
        let mut ended: HashSet<(String, u64)> = HashSet::new();
        // Jobs told to hand off (their worker is draining), by epoch.
        let mut handing: HashSet<(String, u64)> = HashSet::new();
        loop {
            tokio::select! {
                changed = assignments.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let list = assignments.borrow_and_update().clone();
                    let list: Vec<Assignment> =
                        list.into_iter().filter(|a| !ended.contains(&(a.job.clone(), a.epoch))).collect();
                    self.hand_off(&list, &running, &mut handing, &mut ended, &reports);
                    self.reconcile(&mut running, list, &reports).await;
                }
                Some(event) = events.recv() => {
                    let (job, report) = match event {
                        TrainEvent::Step { job, report, tokens_per_s } => {
                            let figures = StepFigures {
                                step: report.step,
                                total_steps: report.total_steps,
                                loss: report.loss,
                                tokens_per_s,
                                tokens: report.tokens as u64,
                            };
                            (job, JobReport::Step(figures))
                        }
                        TrainEvent::Checkpoint { job, step, path } => {
                            (job, JobReport::Checkpoint { step, uri: path.to_string_lossy().into_owned() })
                        }
                        TrainEvent::Finished { job, step, adapter, validation_loss } => {
                            if let (Some(loss), Some(&epoch)) = (validation_loss, running.get(&job)) {
                                drop(reports.send((job.clone(), epoch, JobReport::Validation { step, loss })));
                            }
                            let checksum = dir_checksum(&adapter).unwrap_or_default();
                            (job, JobReport::Succeeded { uri: adapter.to_string_lossy().into_owned(), checksum })
                        }
                        TrainEvent::Failed { job, error } => (job, JobReport::Failed { error }),
                        TrainEvent::Interrupted { job, error } => (job, JobReport::Interrupted { error }),
                        TrainEvent::HandedOff { job } => (job, JobReport::HandedOff),
                    };
                    let final_report = report.ends_attempt();
                    let epoch = if final_report { running.remove(&job) } else { running.get(&job).copied() };
                    if let Some(epoch) = epoch {
                        if final_report {
                            handing.remove(&(job.clone(), epoch));
                            ended.insert((job.clone(), epoch));
                        }
                        let _ = reports.send((job, epoch, report));
                    }
                }
            }
        }
    }

    /// Hands off the attempts `list` says to (the worker is draining): one running here stops
    /// after a checkpoint at its next step boundary (once asked, in `handing`); one placed here
    /// but not started ends at once and resumes elsewhere as it is.
    fn hand_off(
        &self,
        list: &[Assignment],
        running: &HashMap<String, u64>,
        handing: &mut HashSet<(String, u64)>,
        ended: &mut HashSet<(String, u64)>,
        reports: &mpsc::UnboundedSender<(String, u64, JobReport)>,
    ) {
        for a in list.iter().filter(|a| a.hand_off) {
            let attempt = (a.job.clone(), a.epoch);
            if running.get(&a.job) == Some(&a.epoch) {
                if handing.insert(attempt)
                    && let Ok(engine) = self.serving.current()
                {
                    let _ = engine.hand_off(&a.job);
                }
            } else if ended.insert(attempt) {
                let _ = reports.send((a.job.clone(), a.epoch, JobReport::HandedOff));
            }
        }
    }

    /// Starts the attempts assigned and not running here; stops those running and no longer
    /// assigned (or assigned under a newer epoch, which starts afresh).
    async fn reconcile(
        &self,
        running: &mut HashMap<String, u64>,
        list: Vec<Assignment>,
        reports: &mpsc::UnboundedSender<(String, u64, JobReport)>,
    ) {
        let wanted: HashMap<&str, u64> = list.iter().map(|a| (a.job.as_str(), a.epoch)).collect();
        let stale: Vec<String> = running
            .iter()
            .filter(|(job, epoch)| wanted.get(job.as_str()) != Some(epoch))
            .map(|(j, _)| j.clone())
            .collect();
        let engine = self.serving.current();
        for job in stale {
            running.remove(&job);
            if let Ok(engine) = &engine {
                let _ = engine.stop(&job);
            }
        }
        let engine = match engine {
            Ok(engine) => engine,
            Err(why) => {
                // A group worker between formations: its jobs are queued again by the
                // coordinator when it re-forms the group (and placed on the new rank 0).
                tracing::warn!("jobs: no engine to train on: {}", why.message());
                return;
            }
        };
        let new: Vec<Assignment> = list.into_iter().filter(|a| !a.hand_off && !running.contains_key(&a.job)).collect();
        for a in new {
            running.insert(a.job.clone(), a.epoch);
            let (assignment, on, dir) = (a.clone(), engine.clone(), self.blobs.join("jobs").join(&a.job));
            let built = tokio::task::spawn_blocking(move || build(&assignment, &on, &dir)).await;
            match built.map_err(|e| Error::Internal(format!("building job {}: {e}", a.job))).and_then(|r| r) {
                Ok((training, plan)) => {
                    let step = match &training.job {
                        JobStart::Ready(job) => job.progress.step,
                        JobStart::New { .. } => 0,
                    };
                    if let Err(e) = engine.train(training) {
                        let _ = reports.send((a.job.clone(), a.epoch, JobReport::Failed { error: e.message().into() }));
                        continue;
                    }
                    let _ = reports.send((a.job.clone(), a.epoch, JobReport::Running { step, plan: Some(plan) }));
                }
                Err(e) => {
                    running.remove(&a.job);
                    // A file that could not be read is this worker's fault (its disk, its mount
                    // of the blobs), not the job's: another attempt may read it.
                    let error = e.to_string();
                    let report = match e {
                        Error::Io { .. } => JobReport::Interrupted { error },
                        _ => JobReport::Failed { error },
                    };
                    let _ = reports.send((a.job.clone(), a.epoch, report));
                }
            }
        }
    }
}

/// The job an assignment describes, for `engine`'s model: its data (and validation data) read
/// and checked with the model's tokenizer, resumed from its checkpoint when it has one, else
/// made by the engine (which chooses and copies ESFT experts with forward passes that, on a
/// group, its followers join).
fn build(a: &Assignment, engine: &EngineThread, dir: &Path) -> Result<(Training, TrainingPlan)> {
    let spec = &a.spec;
    let tokenizer =
        engine.tokenizer().ok_or_else(|| Error::InvalidRequest("the base model has no tokenizer".into()))?;
    let model = engine.model();
    let read = |file: &Path, field: &str| {
        load_jsonl(file, tokenizer, model.config.max_position_embeddings)
            .map_err(|e| Error::InvalidRequest(e.to_string().replace(&file.to_string_lossy().into_owned(), field)))
    };
    let data = Arc::new(read(Path::new(&spec.training_file.uri), "training_file")?);
    let validation =
        spec.validation_file.as_ref().map(|f| read(Path::new(&f.uri), "validation_file")).transpose()?.map(Arc::new);
    // A resumed job goes on with what it was resolved to: the same, for the same data.
    let (hyper, plan) = auto::resolve(&spec.hyper, spec.learning_rate_multiplier, spec.auto, &data);
    let job = match &a.checkpoint {
        Some(c) => JobStart::Ready(Box::new(
            checkpoint::load(Path::new(&c.uri), model.whole_config(), data)
                .map_err(|e| e.context("resuming from the checkpoint"))?,
        )),
        None => JobStart::New { name: a.job.clone(), method: spec.method.clone(), hyper, data },
    };
    Ok((Training { job, dir: dir.to_path_buf(), checkpoint_every: spec.checkpoint_every, validation }, plan))
}

/// Sends reports to the cluster in order, each retried until it is recorded or refused. A
/// refusal means the attempt is stale (another took over): the rest of its reports are dropped
/// unsent, so that they hold up no report of a current attempt behind them. Request ids name the
/// report, so a retry applies once.
fn spawn_reporter(cluster: ClusterClient) -> mpsc::UnboundedSender<(String, u64, JobReport)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, u64, JobReport)>();
    tokio::spawn(async move {
        let mut sent = 0u64;
        let mut stale: HashSet<(String, u64)> = HashSet::new();
        while let Some((id, epoch, report)) = rx.recv().await {
            if stale.contains(&(id.clone(), epoch)) {
                continue;
            }
            sent += 1;
            let request_id = format!("report-{id}-{epoch}-{sent}-{}", std::process::id());
            let command = Command::ReportJob { id: id.clone(), epoch, report };
            let what = format!("job {id}");
            let refused =
                propose_until_recorded(&cluster, &what, request_id, command, 60, Duration::from_millis(500)).await;
            if refused {
                stale.insert((id, epoch));
            }
        }
    });
    tx
}
