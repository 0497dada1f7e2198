//! The sequential models the chaos histories are checked against: what the cluster's
//! replicated state promises for each object, one operation at a time. Each is tested against
//! the state machine itself (`tests/models.rs`), so a model cannot drift from the product.

use super::linearizability::Model;

/// A tenant's adapter, by name: uploads make versions 1, 2, ...; a delete forgets the name (the
/// next upload is version 1 again); a read sees the latest version.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdapterRegistry;

/// An operation on adapter `name` of `tenant`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterOp {
    Put { tenant: String, name: String },
    Delete { tenant: String, name: String },
    Get { tenant: String, name: String },
}

/// What the cluster answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterAnswer {
    /// The version an upload made.
    Version(u64),
    Deleted,
    /// A delete of a name that does not exist.
    NotFound,
    /// The latest version a read saw (none: no such adapter).
    Latest(Option<u64>),
}

impl Model for AdapterRegistry {
    /// The latest version, if the name exists.
    type State = Option<u64>;
    type Input = AdapterOp;
    type Output = AdapterAnswer;
    type Key = (String, String);

    fn init(&self) -> Option<u64> {
        None
    }

    fn step(&self, latest: &Option<u64>, op: &AdapterOp, answer: Option<&AdapterAnswer>) -> Option<Option<u64>> {
        let (next, expected) = match op {
            AdapterOp::Put { .. } => {
                let version = latest.map_or(1, |v| v + 1);
                (Some(version), AdapterAnswer::Version(version))
            }
            AdapterOp::Delete { .. } if latest.is_some() => (None, AdapterAnswer::Deleted),
            AdapterOp::Delete { .. } => (None, AdapterAnswer::NotFound),
            AdapterOp::Get { .. } => (*latest, AdapterAnswer::Latest(*latest)),
        };
        answer.is_none_or(|a| *a == expected).then_some(next)
    }

    fn key(&self, op: &AdapterOp) -> (String, String) {
        match op {
            AdapterOp::Put { tenant, name } | AdapterOp::Delete { tenant, name } | AdapterOp::Get { tenant, name } => {
                (tenant.clone(), name.clone())
            }
        }
    }
}

/// A fine-tuning job, by id: its create makes it (no one can name it before), it is active
/// (queued or running, back and forth as attempts end and start) until it ends: it succeeds or
/// fails on its own, or a cancel ends it. An ended job never changes again.
#[derive(Clone, Copy, Debug, Default)]
pub struct JobRegistry;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    Absent,
    Active,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// The state a job's status, as the API names it, stands for.
    pub fn of_status(status: &str) -> Option<JobState> {
        match status {
            "validating_files" | "queued" | "running" => Some(JobState::Active),
            "succeeded" => Some(JobState::Succeeded),
            "failed" => Some(JobState::Failed),
            "cancelled" => Some(JobState::Cancelled),
            _ => None,
        }
    }

    /// The state `self` may be seen in next: itself, or ended on its own (only a cancel
    /// cancels a job, and nothing brings one back).
    fn may_show(self, shown: JobState) -> Option<JobState> {
        let ended_on_its_own = self == JobState::Active && matches!(shown, JobState::Succeeded | JobState::Failed);
        (ended_on_its_own || (shown == self && self != JobState::Absent)).then_some(shown)
    }
}

/// An operation on job `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOp {
    Create { id: String },
    Cancel { id: String },
    Get { id: String },
}

/// What the cluster answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobAnswer {
    Created,
    /// The job as a read, or a cancel that took, showed it.
    Shown(JobState),
    /// A cancel refused: the job had ended, in this state.
    Ended(JobState),
    /// No such job.
    NotFound,
}

impl Model for JobRegistry {
    type State = JobState;
    type Input = JobOp;
    type Output = JobAnswer;
    type Key = String;

    fn init(&self) -> JobState {
        JobState::Absent
    }

    fn step(&self, state: &JobState, op: &JobOp, answer: Option<&JobAnswer>) -> Option<JobState> {
        use JobState::{Absent, Active, Cancelled};
        match (op, answer) {
            (JobOp::Create { .. }, None | Some(JobAnswer::Created)) => (*state == Absent).then_some(Active),
            (JobOp::Get { .. } | JobOp::Cancel { .. }, Some(JobAnswer::NotFound)) => {
                (*state == Absent).then_some(Absent)
            }
            (JobOp::Get { .. }, None) => Some(*state),
            (JobOp::Get { .. }, Some(JobAnswer::Shown(shown))) => state.may_show(*shown),
            // A cancel that took ends an active job; one never answered may also have found it
            // ended, which leaves it as it was.
            (JobOp::Cancel { .. }, None) => Some(if *state == Active { Cancelled } else { *state }),
            (JobOp::Cancel { .. }, Some(JobAnswer::Shown(Cancelled))) => (*state == Active).then_some(Cancelled),
            (JobOp::Cancel { .. }, Some(JobAnswer::Ended(ended))) if *ended != Active => state.may_show(*ended),
            _ => None,
        }
    }

    fn key(&self, op: &JobOp) -> String {
        match op {
            JobOp::Create { id } | JobOp::Cancel { id } | JobOp::Get { id } => id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linearizability::{Operation, Verdict, check};

    fn put(call: u64, ret: u64, version: u64) -> Operation<AdapterOp, AdapterAnswer> {
        let input = AdapterOp::Put { tenant: "t".into(), name: "a".into() };
        Operation { input, call, ret: Some((ret, AdapterAnswer::Version(version))) }
    }

    #[test]
    fn concurrent_uploads_make_distinct_versions_and_a_lost_update_is_caught() {
        // Two clients upload at once: versions 1 and 2, in either order.
        assert_eq!(check(&AdapterRegistry, &[put(0, 10, 2), put(1, 9, 1)], 1000), Verdict::Linearizable);
        // Both told version 1: one upload was lost.
        let lost = [put(0, 10, 1), put(1, 9, 1)];
        assert_eq!(check(&AdapterRegistry, &lost, 1000), Verdict::Violation { key: ("t".into(), "a".into()) });
    }

    fn job(input: JobOp, call: u64, ret: u64, answer: JobAnswer) -> Operation<JobOp, JobAnswer> {
        Operation { input, call, ret: Some((ret, answer)) }
    }

    #[test]
    fn a_cancelled_job_never_runs_again_and_a_made_one_is_never_lost() {
        let id = || "j".to_string();
        let made = job(JobOp::Create { id: id() }, 0, 10, JobAnswer::Created);
        let cancelled = job(JobOp::Cancel { id: id() }, 20, 30, JobAnswer::Shown(JobState::Cancelled));
        let read = |at, shown| job(JobOp::Get { id: id() }, at, at + 5, shown);
        let ok = [made.clone(), read(12, JobAnswer::Shown(JobState::Active)), cancelled.clone()];
        assert_eq!(check(&JobRegistry, &ok, 1000), Verdict::Linearizable);
        // A read during the cancel may see it either way; after it, only cancelled.
        let during = [made.clone(), cancelled.clone(), read(25, JobAnswer::Shown(JobState::Active))];
        assert_eq!(check(&JobRegistry, &during, 1000), Verdict::Linearizable);
        for after in [JobAnswer::Shown(JobState::Active), JobAnswer::Shown(JobState::Succeeded), JobAnswer::NotFound] {
            let history = [made.clone(), cancelled.clone(), read(40, after.clone())];
            assert_eq!(check(&JobRegistry, &history, 1000), Verdict::Violation { key: id() }, "{after:?}");
        }
        // A job that succeeded on its own refuses the cancel, and stays succeeded.
        let refused = job(JobOp::Cancel { id: id() }, 20, 30, JobAnswer::Ended(JobState::Succeeded));
        let ended = [made.clone(), refused.clone(), read(40, JobAnswer::Shown(JobState::Succeeded))];
        assert_eq!(check(&JobRegistry, &ended, 1000), Verdict::Linearizable);
        let revived = [made, refused, read(40, JobAnswer::Shown(JobState::Active))];
        assert_eq!(check(&JobRegistry, &revived, 1000), Verdict::Violation { key: id() });
    }
}
