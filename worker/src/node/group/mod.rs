//! Worker groups: a base model served by a tensor-parallel group of worker processes (possibly
//! on different hosts), one rank per process, placed by the coordinator. Rank 0 runs the
//! engine (its scheduler, KV-cache pages, adapters, sampling, fine-tuning jobs) over its shard
//! of the model and broadcasts the plan of each model call (`engine/group_plan.rs`); every other
//! rank follows the plans on its own shard, joining the collectives inside the model's calls. A collective that
//! fails (a rank killed, a timeout) ends the member's part cleanly: rank 0's requests in flight
//! get an error, the member reports how it ended ([`Ended`]), and the coordinator forms the
//! group again at a new epoch, which the members join afresh.
//!
//! Map:
//! - `mod.rs`: joining a group ([`join`]), how a member's part ended, who the error blames.
//! - `leader.rs`: rank 0's engine loop, which sends the plans (and keeps idle followers
//!   waiting within the collectives' timeout).
//! - `follower.rs`: the other ranks' loop.

mod follower;
mod leader;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tandem_proto::Security;
use tokio::sync::mpsc::UnboundedSender;

use crate::collective::{Collective, CollectiveOptions, TcpGroup};
use crate::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::model::{MoeSplit, Shard};
use crate::node::engine_thread::{EngineThread, TrainEvents};
use crate::tokenizer::TextTokenizer;

/// One formation of a group, as this member takes part in it.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub group: String,
    /// The formation (the coordinator's epoch for the group): reports carry it.
    pub epoch: u64,
    pub rank: usize,
    /// Every rank's collective address, rank order; this rank listens on its own.
    pub peers: Vec<String>,
    pub options: CollectiveOptions,
    /// Whether the TCP group's connections run under the cluster's TLS.
    pub security: Security,
    /// The engine's sizes: rank 0's engine and the followers' KV caches must have the same.
    pub engine: EngineConfig,
    /// How a MoE model's experts are split over the ranks.
    pub moe: MoeSplit,
    /// What carries the model's collectives.
    pub data: DataPlane,
}

/// What carries a group's model collectives (the all-reduces and all-gathers of its passes). The
/// plans and the formation check always go over the TCP group, which also hands out the NCCL id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataPlane {
    /// The TCP group itself (CPU workers).
    #[default]
    Tcp,
    /// NCCL, this rank on CUDA device `device` (a build with the `cuda` feature).
    Nccl { device: usize },
}

/// How a member's part in a formation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub group: String,
    pub epoch: u64,
    pub rank: usize,
    /// Why it failed; `None`: it left as asked (the group was re-formed or removed).
    pub error: Option<String>,
    /// The rank the error names as at fault, if it names one.
    pub blame: Option<usize>,
}

impl Ended {
    fn of(spec: &GroupSpec, result: &Result<()>) -> Ended {
        let error = result.as_ref().err().map(|e| e.to_string());
        // A failure this rank is blamed for itself (the others found it silent) blames no one:
        // the same ranks try again.
        let blame = result.as_ref().err().and_then(Error::culprit).filter(|&r| r != spec.rank);
        Ended { group: spec.group.clone(), epoch: spec.epoch, rank: spec.rank, error, blame }
    }
}

/// This member's part while it runs.
pub enum Member {
    /// Rank 0: its engine, which takes the group's requests.
    Leader(EngineThread),
    /// Another rank; dropping it asks the follower to leave after the plan it waits for.
    Follower(FollowerHandle),
}

pub struct FollowerHandle {
    stop: Arc<AtomicBool>,
}

impl Drop for FollowerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Joins `spec`'s group (blocking until every rank is connected, or failing by the set-up
/// timeout) with this rank's `shard` (cut for this rank and group size, and `spec.moe`), and
/// starts this rank's part on a thread of its own: rank 0 an engine over its shard (with
/// `tokenizer`; its jobs report on `train_events`), the others a follower. When the part ends,
/// how is sent on `ended`.
pub fn join(
    spec: &GroupSpec,
    shard: Shard,
    tokenizer: Option<TextTokenizer>,
    train_events: TrainEvents,
    ended: UnboundedSender<Ended>,
) -> Result<Member> {
    let comm = TcpGroup::join(spec.rank, &spec.peers, &spec.options, &spec.security)?;
    let comm: Arc<dyn Collective> = Arc::new(comm);
    check_formation(comm.as_ref(), spec)?;
    let data = match spec.data {
        DataPlane::Tcp => comm.clone(),
        DataPlane::Nccl { device } => nccl(comm.as_ref(), spec, device)?,
    };
    let model = shard.join(data)?;
    if spec.rank == 0 {
        leader::start(spec.clone(), model, comm, tokenizer, train_events, ended).map(Member::Leader)
    } else {
        let stop = Arc::new(AtomicBool::new(false));
        follower::start(spec.clone(), model, comm, stop.clone(), ended)?;
        Ok(Member::Follower(FollowerHandle { stop }))
    }
}

/// The group's NCCL communicator: rank 0 makes the NCCL id and hands it to the others over the
/// TCP group (or why it could not, so that they fail with its reason instead of waiting).
#[cfg(feature = "cuda")]
fn nccl(control: &dyn Collective, spec: &GroupSpec, device: usize) -> Result<Arc<dyn Collective>> {
    use crate::collective::{NcclCollective, NcclId};
    const ID: u8 = 0;
    let mut message = match spec.rank {
        0 => match NcclId::new() {
            Ok(id) => [&[ID][..], id.as_bytes()].concat(),
            Err(e) => [&[1][..], e.to_string().as_bytes()].concat(),
        },
        _ => Vec::new(),
    };
    control.broadcast_bytes(&mut message, 0)?;
    let id = match message.split_first() {
        Some((&ID, id)) => NcclId::try_from(id).map_err(|e| Error::collective(format!("NCCL id from rank 0: {e}")))?,
        _ => {
            let why = String::from_utf8_lossy(message.get(1..).unwrap_or_default());
            return Err(Error::collective(format!("rank {}: rank 0 could not make the NCCL id: {why}", spec.rank)));
        }
    };
    let comm = NcclCollective::new(spec.rank, spec.peers.len(), id, device, &spec.options)?;
    Ok(Arc::new(comm))
}

#[cfg(not(feature = "cuda"))]
fn nccl(_: &dyn Collective, spec: &GroupSpec, _: usize) -> Result<Arc<dyn Collective>> {
    Err(Error::Unsupported(format!("rank {}: NCCL needs a build with the `cuda` feature", spec.rank)))
}

/// Checks that every rank joined this formation. The TCP handshake knows ranks and the world
/// size, not the group or its epoch: a rank still joining an older formation (or since placed in
/// another group) could be taken for a member. Rank 0 sends its `group@epoch` (with its KV
/// cache's geometry); every rank says whether it is its own; all fail together, naming a rank
/// that differs.
fn check_formation(comm: &dyn Collective, spec: &GroupSpec) -> Result<()> {
    // The KV cache's geometry too: the plans' slots and block tables must fit every rank's.
    let (pages, block) = (spec.engine.pages, spec.engine.block_size);
    let own = format!("{}@{} pages={pages} block={block} experts={:?}", spec.group, spec.epoch, spec.moe);
    let mut leader = own.clone().into_bytes();
    comm.broadcast_bytes(&mut leader, 0)?;
    let agree = comm.all_gather(&[f32::from(u8::from(leader == own.as_bytes()))])?;
    match agree.iter().position(|&a| a != 1.0) {
        None => Ok(()),
        Some(rank) => Err(Error::Collective {
            message: format!(
                "rank {}: rank {rank} joined another formation (this rank is at {own}, rank 0 at {})",
                spec.rank,
                String::from_utf8_lossy(&leader)
            ),
            culprit: Some(rank),
        }),
    }
}

/// How long a follower may wait for the next plan: rank 0 sends one (idle if need be) at
/// least this often, well inside the collectives' timeout.
fn plan_interval(options: &CollectiveOptions) -> std::time::Duration {
    (options.timeout / 4).max(std::time::Duration::from_millis(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{CollectiveError, LocalGroup};

    fn spec(rank: usize, epoch: u64) -> GroupSpec {
        GroupSpec {
            group: "tp".into(),
            epoch,
            rank,
            peers: Vec::new(),
            options: CollectiveOptions::default(),
            security: Security::Insecure,
            engine: EngineConfig::default(),
            moe: MoeSplit::Intermediate,
            data: DataPlane::Tcp,
        }
    }

    /// Runs `check_formation` on two ranks at the given epochs.
    fn check(epochs: [u64; 2]) -> Vec<Result<()>> {
        let handles: Vec<_> = (LocalGroup::new(2).into_iter().enumerate())
            .map(|(rank, comm)| std::thread::spawn(move || check_formation(&comm, &spec(rank, epochs[rank]))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::collective("panicked")))).collect()
    }

    #[test]
    fn ranks_of_different_formations_refuse_each_other() {
        assert!(check([3, 3]).iter().all(Result::is_ok));
        for result in check([3, 2]) {
            let message = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains("rank 1 joined another formation"), "{message}");
        }
    }

    #[test]
    fn the_blamed_rank_is_the_culprit_unless_it_is_this_rank() {
        let gone = |peer, culprit| CollectiveError::PeerGone {
            rank: 0,
            op: "all_reduce_sum",
            peer,
            detail: String::new(),
            culprit,
        };
        let ended = |rank, e: CollectiveError| Ended::of(&spec(rank, 1), &Err(Error::from(e))).blame;
        assert_eq!(ended(0, gone(1, None)), Some(1));
        // Ranks that gave up after another's failure are not at fault: the one they blamed is.
        assert_eq!(ended(0, gone(3, Some(2))), Some(2));
        assert_eq!(ended(2, gone(3, Some(2))), None, "the others found this rank silent: no one else to blame");
        let broken = CollectiveError::Broken { rank: 0, op: "all_gather", cause: String::new(), culprit: Some(3) };
        assert_eq!(ended(0, broken), Some(3));
        assert_eq!(ended(1, CollectiveError::Setup { rank: 1, detail: "cannot listen".into() }), None);
        let wrapped = Err(Error::from(gone(1, None)).context("joining"));
        assert_eq!(Ended::of(&spec(0, 1), &wrapped).blame, Some(1));
        assert_eq!(Ended::of(&spec(0, 1), &Err(Error::InvalidRequest("the prompt is empty".into()))).blame, None);
    }
}
