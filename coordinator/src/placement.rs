//! Placement policy: where queued fine-tuning jobs go. Pure functions of the state; the leader
//! proposes their moves, and the state machine checks them when they apply.

use std::collections::BTreeMap;

use tandem_proto::contract::{ClusterState, JobStatus, Worker};

/// The scheduler's next moves: each queued job onto the worker taking work with the fewest jobs
/// placed or running (counting the moves before it), preferring workers that have the job's
/// base model loaded, then rank 0 of a formed worker group that serves it, then the other
/// whole-model workers; the worker the job's last attempt ended on comes last of all. Pure: the
/// leader proposes them as `PlaceJob` commands.
pub fn schedule(state: &ClusterState) -> Vec<(String, String)> {
    let mut jobs_on: BTreeMap<String, usize> = BTreeMap::new();
    for job in state.jobs.values().filter(|j| matches!(j.status, JobStatus::Placed | JobStatus::Running)) {
        if let Some(a) = job.attempts.last() {
            *jobs_on.entry(a.worker.clone()).or_default() += 1;
        }
    }
    let mut moves = Vec::new();
    for (id, job) in state.jobs.iter().filter(|(_, j)| j.status == JobStatus::Queued) {
        let has_model = |w: &str| state.workers[w].gpus.iter().any(|g| g.models.contains(&job.spec.base_model));
        let leads_group = |w: &str| {
            (state.placements.values())
                .any(|p| p.formed && p.model == job.spec.base_model && p.workers.first().is_some_and(|r| r == w))
        };
        // 0: the model loaded whole; 1: rank 0 of a group serving it; 2: another whole-model
        // worker. Other group workers take no jobs.
        let tier = |w: &str, info: &Worker| match (info.collective_addr.is_empty(), has_model(w), leads_group(w)) {
            (true, true, _) => Some(0),
            (false, _, true) => Some(1),
            (true, false, _) => Some(2),
            (false, _, false) => None,
        };
        // The worker its last attempt ended on (its disk failed the job, say) is the last choice.
        let ended_on = |w: &str| job.attempts.last().is_some_and(|a| a.worker == w);
        let best = (state.workers.iter())
            .filter(|(_, info)| info.takes_work())
            .filter_map(|(w, info)| tier(w, info).map(|t| (ended_on(w), t, jobs_on.get(w).copied().unwrap_or(0), w)))
            .min()
            .map(|(_, _, _, w)| w.clone());
        let Some(worker) = best else { break };
        *jobs_on.entry(worker.clone()).or_default() += 1;
        moves.push((id.clone(), worker));
    }
    moves
}
