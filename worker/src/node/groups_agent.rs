//! A group worker's side of worker groups: it takes part in the group its heartbeats name
//! (one at a time), joining each new formation (epoch) afresh: it connects to the other ranks,
//! cuts its shard of the base model, and runs rank 0's engine (which then serves this worker's
//! `Generate`) or a follower. It reports to the cluster that rank 0 formed the group, and that
//! its part of a formed group failed (naming the rank the error blames), so the coordinator
//! forms it again; a set-up that fails is tried again as it is. Rank 0's engine trains the
//! jobs the coordinator places on the group (the jobs agent finds it in `serving`; their
//! progress goes to `train_events`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_kernels::Device;
use tandem_proto::contract::{Command, Membership};
use tandem_proto::{ClusterClient, Security};
use tokio::sync::{mpsc, watch};

use super::engine_thread::{Serving, TrainEvents};
use super::group::{self, DataPlane, Ended, GroupSpec, Member};
use crate::collective::CollectiveOptions;
use crate::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::model::{Model, MoeSplit};
use crate::tokenizer::TextTokenizer;

/// The pause before a failed set-up is tried again.
const JOIN_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How long a follower waits before it reports its group's failure (see where it is used).
const FOLLOWER_REPORT_DELAY: Duration = Duration::from_millis(500);

/// Everything a group worker needs.
pub struct GroupsAgent {
    pub id: String,
    pub cluster: ClusterClient,
    /// Where this worker's `Generate` (and jobs) go: rank 0's engine while it leads a formed
    /// group.
    pub serving: Serving,
    /// Where the jobs of rank 0's engine report.
    pub train_events: TrainEvents,
    /// The worker's own copy of a base model (`--model`), named `model_name`: used when the
    /// catalogue's uri for the group's model is not a folder here.
    pub model_dir: PathBuf,
    pub model_name: String,
    pub device: Device,
    pub options: CollectiveOptions,
    pub security: Security,
    pub engine: EngineConfig,
    pub data: DataPlane,
}

impl GroupsAgent {
    /// Runs until the memberships channel closes.
    pub async fn run(self, mut groups: watch::Receiver<Vec<Membership>>) {
        let (ended_tx, mut ended) = mpsc::unbounded_channel::<Ended>();
        let mut current: Option<(Membership, Member)> = None;
        loop {
            tokio::select! {
                changed = groups.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let list = groups.borrow_and_update().clone();
                    if list.len() > 1 {
                        tracing::warn!(worker = %self.id, "in {} groups; a worker serves one at a time", list.len());
                    }
                    let wanted = list.into_iter().next();
                    if current.as_ref().map(|(m, _)| m) == wanted.as_ref() {
                        continue;
                    }
                    // Leaving the old formation: rank 0's engine stops once its handles are
                    // gone, a follower after the plan it waits for.
                    self.serving.withdraw(format!("worker {} is re-joining its worker group", self.id));
                    current = None;
                    let Some(m) = wanted else {
                        self.serving.withdraw(format!("worker {} is in no worker group", self.id));
                        continue;
                    };
                    match self.join(&m, ended_tx.clone()).await {
                        Ok(member) => {
                            tracing::info!(worker = %self.id, group = %m.group, epoch = m.epoch, rank = m.rank, "joined its worker group");
                            match &member {
                                Member::Leader(engine) => {
                                    self.serving.serve(engine.clone());
                                    let command = Command::GroupFormed { group: m.group.clone(), epoch: m.epoch };
                                    self.report(format!("group-formed-{}-{}", m.group, m.epoch), command).await;
                                }
                                Member::Follower(_) => self.serving.withdraw(format!(
                                    "worker {} is rank {} of worker group {}: its requests go to rank 0",
                                    self.id, m.rank, m.group
                                )),
                            }
                            current = Some((m, member));
                        }
                        Err(e) => {
                            // Not reported: a rank that did not come may not have heard of this
                            // formation yet, or may still be leaving an older one (its dialing
                            // then disturbs this set-up); a dead one loses its lease and its
                            // place. Reporting would only start yet another formation, which
                            // the same stragglers disturb. So the same formation is tried again
                            // while it is the one the heartbeats name.
                            tracing::warn!(worker = %self.id, group = %m.group, epoch = m.epoch, "forming the group: {e}; trying again");
                            tokio::time::sleep(JOIN_RETRY_PAUSE).await;
                            groups.mark_changed();
                        }
                    }
                }
                Some(end) = ended.recv() => {
                    let ours = current.as_ref().is_some_and(|(m, _)| m.group == end.group && m.epoch == end.epoch);
                    if ours {
                        current = None;
                        self.serving.withdraw(format!("worker {}: its worker group is being formed again", self.id));
                    }
                    if let (Some(error), true) = (&end.error, ours) {
                        tracing::error!(worker = %self.id, group = %end.group, epoch = end.epoch, rank = end.rank, "rank failed: {error}");
                        let command = Command::GroupFailed { group: end.group.clone(), epoch: end.epoch, blame: end.blame };
                        let request_id = format!("group-failed-{}-{}-{}", end.group, end.epoch, self.id);
                        // A follower often learns of a failure from rank 0 giving up (so its
                        // error names rank 0): it reports a moment later, so that a live rank 0's
                        // report, which names the rank really at fault, is the one applied (the
                        // later one is then stale and refused).
                        let delay = if end.rank == 0 { Duration::ZERO } else { FOLLOWER_REPORT_DELAY };
                        let (cluster, id) = (self.cluster.clone(), self.id.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            report(&cluster, &id, request_id, command).await;
                        });
                    }
                }
            }
        }
    }

    /// Joins formation `m` (on a blocking thread: the set-up waits for every rank). The rank's
    /// shard is read from the checkpoint first (only its own share of each layer is kept), so
    /// the whole model is never in memory and a slow read keeps no peer waiting in a collective.
    async fn join(&self, m: &Membership, ended: mpsc::UnboundedSender<Ended>) -> Result<Member> {
        let dir = self.model_dir_for(m)?;
        let spec = GroupSpec {
            group: m.group.clone(),
            epoch: m.epoch,
            rank: m.rank,
            peers: m.peers.clone(),
            options: self.options.clone(),
            security: self.security.clone(),
            engine: self.engine,
            moe: if m.expert_parallel { MoeSplit::Experts } else { MoeSplit::Intermediate },
            data: self.data,
        };
        let (device, world, train_events) = (self.device, m.peers.len(), self.train_events.clone());
        tokio::task::spawn_blocking(move || -> Result<Member> {
            let shard = Model::load_shard(&dir, device, spec.rank, world, spec.moe)
                .map_err(|e| e.context(format!("loading rank {}'s shard of {}", spec.rank, dir.display())))?;
            // Rank 0 serves text: it needs the tokenizer (a fresh one per engine).
            let tokenizer = match spec.rank {
                0 => Some(TextTokenizer::load(&dir).map_err(|e| e.context(format!("tokenizer of {}", dir.display())))?),
                _ => None,
            };
            group::join(&spec, shard, tokenizer, train_events, ended)
        })
        .await
        .map_err(|e| Error::Internal(format!("joining group {}: {e}", m.group)))?
    }

    /// The folder of the group's base model: the catalogue's uri when it is a folder here,
    /// else this worker's own `--model` when the names match.
    fn model_dir_for(&self, m: &Membership) -> Result<PathBuf> {
        if !m.model_uri.is_empty() && Path::new(&m.model_uri).join("config.json").is_file() {
            return Ok(PathBuf::from(&m.model_uri));
        }
        if m.model == self.model_name {
            return Ok(self.model_dir.clone());
        }
        Err(Error::InvalidRequest(format!(
            "group {}: base model {:?} is at {:?}, not a model folder here, and this worker's --model is {:?}",
            m.group, m.model, m.model_uri, self.model_name
        )))
    }

    async fn report(&self, request_id: String, command: Command) {
        report(&self.cluster, &self.id, request_id, command).await;
    }
}

/// Proposes a group report for worker `id` (briefly retried: a later formation makes it stale).
async fn report(cluster: &ClusterClient, id: &str, request_id: String, command: Command) {
    let what = format!("worker {id}: group");
    super::propose_until_recorded(cluster, &what, request_id, command, 20, Duration::from_millis(250)).await;
}
