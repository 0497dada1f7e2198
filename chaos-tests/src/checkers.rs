//! The checks over a run's history and its processes' logs. Each returns what it found wrong,
//! so a scenario's verdict lists every failure, not the first.

use std::path::Path;
use std::time::Duration;

use tandem_proto::contract::{ClusterState, dir_checksum};

use crate::history::{Answer, Event, Op, Outcome};
use crate::linearizability::{Operation, Verdict, check};
use crate::models::{AdapterAnswer, AdapterOp, AdapterRegistry, JobAnswer, JobOp, JobRegistry};
use crate::workload::NAMES;

/// States the linearizability search may explore per key (an adapter, a job) before it
/// answers "unknown".
const BUDGET: usize = 2_000_000;

/// The adapter registry's operations in `events`, as the checker takes them: an answer the
/// client never got (cut, timed out, a 5xx) may have taken effect or not; a refusal (4xx) or a
/// request never sent did not happen and is left out; a list is a read of each shared name.
pub fn adapter_operations(events: &[Event]) -> Vec<Operation<AdapterOp, AdapterAnswer>> {
    let mut ops = Vec::new();
    for e in events {
        let answered = |answer| Some((nanos(e.ret), answer));
        let unknown = e.outcome.unknown();
        match (&e.op, &e.outcome) {
            (Op::PutAdapter { tenant, name }, outcome) => {
                let input = AdapterOp::Put { tenant: tenant.clone(), name: name.clone() };
                let ret = match outcome {
                    Outcome::Ok(Answer::Version(v)) => answered(AdapterAnswer::Version(*v)),
                    _ if unknown => None,
                    _ => continue,
                };
                ops.push(Operation { input, call: nanos(e.call), ret });
            }
            (Op::DeleteAdapter { tenant, name }, outcome) => {
                let input = AdapterOp::Delete { tenant: tenant.clone(), name: name.clone() };
                let ret = match outcome {
                    Outcome::Ok(Answer::Deleted) => answered(AdapterAnswer::Deleted),
                    Outcome::Ok(Answer::NotFound) => answered(AdapterAnswer::NotFound),
                    _ if unknown => None,
                    _ => continue,
                };
                ops.push(Operation { input, call: nanos(e.call), ret });
            }
            (Op::ListAdapters { tenant }, Outcome::Ok(Answer::Adapters(latest))) => {
                for name in NAMES {
                    let input = AdapterOp::Get { tenant: tenant.clone(), name: name.into() };
                    let ret = answered(AdapterAnswer::Latest(latest.get(name).copied()));
                    ops.push(Operation { input, call: nanos(e.call), ret });
                }
            }
            _ => {}
        }
    }
    ops
}

/// The fine-tuning jobs' operations in `events`, as the checker takes them: a job is known by
/// the id its create answered (a create never answered names no job); a cancel or read never
/// answered may have taken effect or not; a refusal other than "not found" or "ended already"
/// did not happen.
pub fn job_operations(events: &[Event]) -> Vec<Operation<JobOp, JobAnswer>> {
    let mut ops = Vec::new();
    for e in events {
        let answer = match &e.outcome {
            Outcome::Ok(Answer::JobShown(state)) => Some(JobAnswer::Shown(*state)),
            Outcome::Ok(Answer::JobEnded(state)) => Some(JobAnswer::Ended(*state)),
            Outcome::Ok(Answer::NotFound) => Some(JobAnswer::NotFound),
            _ => None,
        };
        let (input, answer) = match (&e.op, &e.outcome) {
            (Op::CreateJob { .. }, Outcome::Ok(Answer::Made { id })) => {
                (JobOp::Create { id: id.clone() }, Some(JobAnswer::Created))
            }
            (Op::CancelJob { job }, outcome) if answer.is_some() || outcome.unknown() => {
                (JobOp::Cancel { id: job.clone() }, answer)
            }
            (Op::GetJob { job }, _) if answer.is_some() => (JobOp::Get { id: job.clone() }, answer),
            _ => continue,
        };
        ops.push(Operation { input, call: nanos(e.call), ret: answer.map(|a| (nanos(e.ret), a)) });
    }
    ops
}

/// A history time as the linearizability search takes it.
fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// Whether the registries' histories, the adapters' and the fine-tuning jobs', are
/// linearizable (the first key found not to be, described), and how many operations they had.
pub fn registries_linearizable(events: &[Event]) -> (Verdict<String>, usize) {
    let (adapters, jobs) = (adapter_operations(events), job_operations(events));
    let verdict = match check(&AdapterRegistry, &adapters, BUDGET) {
        Verdict::Linearizable => check(&JobRegistry, &jobs, BUDGET).map_key(|id| format!("job {id}")),
        other => other.map_key(|(tenant, name)| format!("adapter {name} of {tenant}")),
    };
    (verdict, adapters.len() + jobs.len())
}

/// Whether a failed inference told its client to come back: no connection or no whole answer
/// (the gateway or the link is down; another gateway will do), a 503 or 429 with
/// `Retry-After`. Anything else (a 500, a 503 without `Retry-After`, a 4xx) is a failure the
/// client cannot act on.
pub fn retryable(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Ok(_) | Outcome::NotSent(_) | Outcome::Unknown(_) => true,
        Outcome::Refused { status, retry_after, .. } => matches!(status, 429 | 503) && *retry_after,
    }
}

/// Inference failures that were not retryable, described.
pub fn unretryable_inference(events: &[Event]) -> Vec<String> {
    (events.iter())
        .filter(|e| matches!(e.op, Op::Complete { .. }) && !retryable(&e.outcome))
        .map(|e| format!("{:?} at {:.1} s via {}: {:?}", e.op, e.call.as_secs_f64(), e.gateway, e.outcome))
        .collect()
}

/// How long after `from` the first operation invoked at or after `from` that `wanted` picks
/// succeeded (from `from` to its return); None if none did.
pub fn first_success_after(events: &[Event], from: Duration, wanted: impl Fn(&Op) -> bool) -> Option<Duration> {
    (events.iter()).filter(|e| e.call >= from && wanted(&e.op) && e.outcome.ok()).map(|e| e.ret - from).min()
}

/// A fine-tuning job at the end of a run, as its tenant reads it.
#[derive(Clone, Debug)]
pub struct JobEnd {
    pub id: String,
    pub status: String,
    /// Its events' messages, oldest first.
    pub events: Vec<String>,
    /// The versions its tenant's adapter list shows for the job's model (it must be 1: one
    /// success registers it once).
    pub adapter_version: Option<u64>,
}

/// What is wrong with a job's end: it did not succeed; an attempt resumed elsewhere than at the
/// last checkpoint committed before it (a resumed job must start at or after its last
/// acknowledged checkpoint, and there is no later one to start from); a checkpoint a client
/// was shown is missing from its events; it succeeded more than once or its adapter is not
/// version 1 (a success committed twice, or by a fenced-off attempt).
pub fn job_failures(end: &JobEnd, seen_checkpoints: &[u64]) -> Vec<String> {
    let id = &end.id;
    let mut wrong = Vec::new();
    if end.status != "succeeded" {
        wrong.push(format!("job {id} ended {}", end.status));
    }
    let (mut last, mut saved, mut successes) = (0, Vec::new(), 0);
    for e in &end.events {
        if let Some(step) = e.strip_prefix("Checkpoint saved at step ").and_then(|s| s.parse::<u64>().ok()) {
            last = step;
            saved.push(step);
        } else if let Some((attempt, step)) = e
            .strip_prefix("Attempt ")
            .and_then(|rest| rest.split_once(" started training at step "))
            .and_then(|(a, s)| Some((a.parse::<u64>().ok()?, s.parse::<u64>().ok()?)))
            && step != last
        {
            wrong.push(format!(
                "job {id}: attempt {attempt} started at step {step}, its last checkpoint was step {last}"
            ));
        } else if e == "The job has successfully completed" {
            successes += 1;
        }
    }
    if let Some(lost) = seen_checkpoints.iter().find(|s| !saved.contains(s)) {
        wrong.push(format!("job {id}: the checkpoint at step {lost} a client was shown is gone"));
    }
    if end.status == "succeeded" && (successes != 1 || end.adapter_version != Some(1)) {
        wrong.push(format!("job {id}: {successes} successes, its adapter at version {:?}", end.adapter_version));
    }
    wrong
}

/// A job's story in a few words: its attempts and the steps they started at.
pub fn job_summary(end: &JobEnd) -> String {
    let starts: Vec<&str> = (end.events.iter())
        .filter_map(|e| {
            e.strip_prefix("Attempt ").and_then(|r| r.split_once(" started training at step ")).map(|(_, s)| s)
        })
        .collect();
    format!("{} {}, attempts starting at steps [{}]", end.id, end.status, starts.join(", "))
}

/// Lines of the logs in `logs` that tell of a panic.
pub fn panics(logs: &[&Path]) -> Vec<String> {
    let mut found = Vec::new();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        found.extend(text.lines().filter(|l| l.contains("panicked at")).map(|l| format!("{name}: {l}")));
    }
    found
}

/// Every adapter version the state holds of the workload's names (all uploads of the same
/// files, in `uploaded`) records the upload's checksum, and its folder on the shared disk still
/// reads back to it: no acknowledged version's content is lost or changed.
pub fn adapter_contents(state: &ClusterState, uploaded: &Path) -> Vec<String> {
    let want = match dir_checksum(uploaded) {
        Ok(c) => c,
        Err(e) => return vec![format!("{}: {e}", uploaded.display())],
    };
    let versions = (state.adapters.iter())
        .flat_map(|(tenant, names)| names.iter().map(move |(name, versions)| (tenant, name, versions)))
        .filter(|(_, name, _)| NAMES.contains(&name.as_str()))
        .flat_map(|(tenant, name, versions)| versions.iter().map(move |v| (tenant, name, v)));
    let mut failures = Vec::new();
    for (tenant, name, v) in versions {
        let on_disk = dir_checksum(Path::new(&v.uri)).map_err(|e| e.to_string());
        if v.checksum != want || on_disk.as_ref() != Ok(&want) {
            failures.push(format!(
                "adapter {tenant}/{name} version {}: recorded checksum {}, folder {} reads {on_disk:?}, uploaded {want}",
                v.version, v.checksum, v.uri
            ));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn event(op: Op, call: u64, ret: u64, outcome: Outcome) -> Event {
        let gateway = SocketAddr::from(([127, 0, 0, 1], 1));
        let (call, ret) = (Duration::from_millis(call), Duration::from_millis(ret));
        Event { client: 0, gateway, op, call, ret, outcome }
    }

    fn put() -> Op {
        Op::PutAdapter { tenant: "t".into(), name: "a".into() }
    }

    fn list(latest: &[(&str, u64)]) -> Outcome {
        Outcome::Ok(Answer::Adapters(latest.iter().map(|(n, v)| (n.to_string(), *v)).collect()))
    }

    #[test]
    fn an_acknowledged_upload_that_a_later_read_misses_is_a_violation() {
        let listed = Op::ListAdapters { tenant: "t".into() };
        let lost = [event(put(), 0, 10, Outcome::Ok(Answer::Version(1))), event(listed.clone(), 20, 30, list(&[]))];
        assert!(matches!(registries_linearizable(&lost).0, Verdict::Violation { .. }));
        let kept =
            [event(put(), 0, 10, Outcome::Ok(Answer::Version(1))), event(listed.clone(), 20, 30, list(&[("a", 1)]))];
        assert_eq!(registries_linearizable(&kept).0, Verdict::Linearizable);
        // An upload whose answer was lost may have happened: seen or not, both are fine.
        for seen in [list(&[]), list(&[("a", 1)])] {
            let unknown = [event(put(), 0, 10, Outcome::Unknown("cut".into())), event(listed.clone(), 20, 30, seen)];
            assert_eq!(registries_linearizable(&unknown).0, Verdict::Linearizable);
        }
        // A 4xx did not happen: a read that sees it is a violation.
        let refused = Outcome::Refused { status: 422, retry_after: false, body: String::new() };
        let phantom = [event(put(), 0, 10, refused), event(listed, 20, 30, list(&[("a", 1)]))];
        assert!(matches!(registries_linearizable(&phantom).0, Verdict::Violation { .. }));
    }

    #[test]
    fn a_job_read_back_from_the_dead_after_its_cancel_is_a_violation() {
        use crate::models::JobState::{Active, Cancelled};
        let job = || "j".to_string();
        let made = event(Op::CreateJob { tenant: "t".into() }, 0, 10, Outcome::Ok(Answer::Made { id: job() }));
        let cancel = |outcome| event(Op::CancelJob { job: job() }, 20, 30, outcome);
        let read = |state| event(Op::GetJob { job: job() }, 40, 50, Outcome::Ok(Answer::JobShown(state)));
        let cancelled = cancel(Outcome::Ok(Answer::JobShown(Cancelled)));
        assert_eq!(
            registries_linearizable(&[made.clone(), cancelled.clone(), read(Cancelled)]).0,
            Verdict::Linearizable
        );
        let revived = registries_linearizable(&[made.clone(), cancelled, read(Active)]).0;
        assert_eq!(revived, Verdict::Violation { key: "job j".into() });
        // A cancel never answered may or may not have taken; a refused one did not.
        let cut = cancel(Outcome::Unknown("cut".into()));
        for state in [Active, Cancelled] {
            assert_eq!(registries_linearizable(&[made.clone(), cut.clone(), read(state)]).0, Verdict::Linearizable);
        }
        let refused = cancel(Outcome::Refused { status: 403, retry_after: false, body: String::new() });
        assert!(matches!(registries_linearizable(&[made, refused, read(Cancelled)]).0, Verdict::Violation { .. }));
    }

    #[test]
    fn a_job_resumes_at_its_last_checkpoint_and_succeeds_once() {
        let events = |list: &[&str]| list.iter().map(|e| e.to_string()).collect::<Vec<_>>();
        let good = [
            "Attempt 1 placed on worker w1",
            "Attempt 1 started training at step 0",
            "Checkpoint saved at step 2",
            "Checkpoint saved at step 4",
            "Attempt 1 ended: worker w1 lost its lease; queued again",
            "Attempt 2 placed on worker w2",
            "Attempt 2 started training at step 4",
            "The job has successfully completed",
        ];
        let end =
            JobEnd { id: "j".into(), status: "succeeded".into(), events: events(&good), adapter_version: Some(1) };
        assert_eq!(job_failures(&end, &[2, 4]), Vec::<String>::new());
        // Resumed from an older checkpoint: the steps after it were trained twice.
        let mut older = end.clone();
        older.events[6] = "Attempt 2 started training at step 2".into();
        assert_eq!(job_failures(&older, &[]).len(), 1);
        // A checkpoint a client saw is not among the events.
        assert_eq!(job_failures(&end, &[6]).len(), 1);
        // Registered twice.
        assert_eq!(job_failures(&JobEnd { adapter_version: Some(2), ..end.clone() }, &[]).len(), 1);
        assert_eq!(job_failures(&JobEnd { status: "failed".into(), ..end }, &[]).len(), 1);
    }

    #[test]
    fn only_retryable_inference_failures_pass() {
        let complete = Op::Complete { stream: false };
        let refused = |status, retry_after| Outcome::Refused { status, retry_after, body: String::new() };
        let events = [
            event(complete.clone(), 0, 1, refused(503, true)),
            event(complete.clone(), 0, 1, Outcome::NotSent("refused".into())),
            event(complete.clone(), 0, 1, refused(503, false)),
            event(complete, 0, 1, refused(500, false)),
        ];
        assert_eq!(unretryable_inference(&events).len(), 2);
    }

    #[test]
    fn recovery_counts_from_the_fault_to_the_first_success_invoked_after_it() {
        let ok = || Outcome::Ok(Answer::Key { key: "k".into() });
        let events = [
            event(Op::CreateKey, 900, 1500, ok()), // invoked before the fault: not counted
            event(Op::CreateKey, 1000, 1100, Outcome::NotSent("down".into())),
            event(Op::CreateKey, 1200, 2300, ok()),
            event(Op::CreateKey, 1300, 2100, ok()),
        ];
        let after = first_success_after(&events, Duration::from_millis(1000), Op::writes);
        assert_eq!(after, Some(Duration::from_millis(1100)));
    }
}
