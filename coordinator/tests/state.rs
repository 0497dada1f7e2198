//! The replicated state machine: deterministic apply, retried proposals applied once, stale job
//! attempts fenced off, a dead worker's jobs re-queued from their checkpoints, and snapshots
//! that restore exactly.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use serde_json::json;
use tandem_coordinator::placement::schedule;
use tandem_coordinator::state::{MAX_ATTEMPTS, StateMachine};
use tandem_proto::contract::{
    ApiKey, ClusterState, Command, File, FileRef, Gpu, JobReport, JobSpec, JobStatus, MethodChoice, Placement,
    Proposal, Reply, StepFigures, TrainingPlan, check_name,
};

/// Applies commands at consecutive indices, each with its own request id.
struct Log {
    machine: StateMachine,
    next: u64,
}

/// A job's spec on base model `m` (only the state machine reads it here).
fn spec(base_model: &str) -> JobSpec {
    JobSpec::new(base_model, MethodChoice::lora(8), FileRef { id: "f".into(), uri: "/files/f".into() })
}

impl Log {
    fn new() -> Self {
        Log { machine: StateMachine::default(), next: 1 }
    }

    fn state(&self) -> &ClusterState {
        self.machine.state()
    }

    fn apply(&mut self, command: Command) -> Reply {
        let id = format!("req-{}", self.next);
        self.apply_as(&id, command)
    }

    fn apply_as(&mut self, request_id: &str, command: Command) -> Reply {
        let p = Proposal::new(request_id, command);
        let reply = self.machine.apply(self.next, &p);
        self.next += 1;
        reply
    }
}

fn worker(id: &str) -> Command {
    let gpus = vec![Gpu { index: 0, memory_bytes: 80 << 30, models: vec!["m".into()] }];
    Command::RegisterWorker { id: id.into(), addr: format!("{id}:7000"), gpus, collective_addr: String::new() }
}

fn cluster() -> Log {
    let mut log = Log::new();
    assert_eq!(log.apply(worker("w1")), Reply::Done);
    assert_eq!(log.apply(worker("w2")), Reply::Done);
    assert_eq!(log.apply(Command::RegisterModel { name: "m".into(), uri: "/models/m".into() }), Reply::Done);
    log
}

fn submit(id: &str) -> Command {
    Command::SubmitJob { id: id.into(), tenant: "t".into(), spec: spec("m"), adapter: None }
}

fn put_adapter(name: &str) -> Command {
    Command::PutAdapter {
        tenant: "t".into(),
        name: name.into(),
        base_model: "m".into(),
        checksum: "ab".into(),
        uri: format!("/adapters/{name}"),
    }
}

#[test]
fn a_retried_proposal_applies_once() {
    let mut log = cluster();
    assert_eq!(log.apply_as("upload-1", put_adapter("a")), Reply::Version { version: 1 });
    // The client did not hear back and sent it again: a new log entry, the same request id.
    assert_eq!(log.apply_as("upload-1", put_adapter("a")), Reply::Version { version: 1 });
    assert_eq!(log.state().adapters["t"]["a"].len(), 1);
    // A new request makes a new version.
    assert_eq!(log.apply_as("upload-2", put_adapter("a")), Reply::Version { version: 2 });
    // An index at or below the last applied one changes nothing.
    let before = log.state().clone();
    let p = Proposal::new("late", put_adapter("a"));
    assert!(matches!(log.machine.apply(2, &p), Reply::Refused { .. }));
    assert_eq!(log.state(), &before);
}

#[test]
fn a_draining_worker_gets_no_new_job_and_keeps_what_runs_there() {
    let mut log = cluster();
    log.apply(submit("running"));
    assert_eq!(log.apply(Command::PlaceJob { id: "running".into(), worker: "w1".into() }), Reply::Epoch { epoch: 1 });
    let drain = |drain| Command::DrainWorker { id: "w1".into(), drain };
    assert_eq!(log.apply(drain(true)), Reply::Done);
    assert!(log.state().workers["w1"].draining && !log.state().workers["w1"].takes_work());
    // Its job goes on there; a new one goes to w2 only, and w1 refuses a placement.
    assert_eq!(log.state().jobs["running"].status, JobStatus::Placed);
    log.apply(submit("new"));
    assert_eq!(schedule(log.state()), vec![("new".to_string(), "w2".to_string())]);
    let refused = log.apply(Command::PlaceJob { id: "new".into(), worker: "w1".into() });
    assert!(matches!(&refused, Reply::Refused { reason } if reason.contains("draining")), "{refused:?}");
    // Restarting does not undo the operator's drain; putting it back in service does.
    assert_eq!(log.apply(worker("w1")), Reply::Done);
    assert!(log.state().workers["w1"].draining);
    assert_eq!(log.apply(drain(false)), Reply::Done);
    assert!(log.state().workers["w1"].takes_work());
    let unknown = log.apply(Command::DrainWorker { id: "w9".into(), drain: true });
    assert!(matches!(unknown, Reply::Refused { .. }), "{unknown:?}");
}

#[test]
fn an_interrupted_attempt_queues_the_job_again_from_its_checkpoint_while_attempts_are_left() {
    let mut log = cluster();
    log.apply(submit("j"));
    let report = |epoch, report| Command::ReportJob { id: "j".into(), epoch, report };
    let interrupted = || JobReport::Interrupted { error: "checkpoint: input/output error".into() };
    assert_eq!(log.apply(Command::PlaceJob { id: "j".into(), worker: "w1".into() }), Reply::Epoch { epoch: 1 });
    log.apply(report(1, JobReport::Checkpoint { step: 8, uri: "/ckpt/j/step-000008".into() }));
    assert_eq!(log.apply(report(1, interrupted())), Reply::Done);
    let job = &log.state().jobs["j"];
    assert_eq!(job.status, JobStatus::Queued, "the disk's fault is not the job's");
    assert_eq!(job.checkpoint.as_ref().unwrap().step, 8);
    assert!(job.attempts[0].ended.as_deref().unwrap().contains("interrupted on worker w1: checkpoint"));
    assert_eq!(schedule(log.state()), vec![("j".to_string(), "w2".to_string())], "not back onto w1's disk");
    // The ended attempt is fenced like any other.
    assert!(matches!(log.apply(report(1, interrupted())), Reply::Refused { .. }));
    for epoch in 2..=MAX_ATTEMPTS as u64 {
        assert_eq!(log.apply(Command::PlaceJob { id: "j".into(), worker: "w2".into() }), Reply::Epoch { epoch });
        assert_eq!(log.apply(report(epoch, interrupted())), Reply::Done);
    }
    let job = &log.state().jobs["j"];
    assert_eq!(job.status, JobStatus::Failed, "a disk that keeps failing ends the job at its last attempt");
    assert!(job.error.as_deref().unwrap().contains("giving up"), "{:?}", job.error);
}

#[test]
fn stale_attempts_are_fenced_and_a_dead_workers_jobs_resume_from_their_checkpoint() {
    let mut log = cluster();
    log.apply(submit("j"));
    assert_eq!(log.apply(Command::PlaceJob { id: "j".into(), worker: "w1".into() }), Reply::Epoch { epoch: 1 });
    let report = |epoch, report| Command::ReportJob { id: "j".into(), epoch, report };
    assert_eq!(log.apply(report(1, JobReport::Running { step: 0, plan: None })), Reply::Done);
    let ckpt = JobReport::Checkpoint { step: 40, uri: "/ckpt/j/step-000040".into() };
    assert_eq!(log.apply(report(1, ckpt)), Reply::Done);
    log.apply(Command::SetPlacement { group: "g1".into(), placement: Placement::new("m", vec!["w1".into()]) });

    // w1's lease expires: the job goes back to the queue, keeping its checkpoint; w1's shard
    // moves to w2, the only other worker alive.
    assert_eq!(log.apply(Command::MarkWorkerDead { id: "w1".into() }), Reply::Done);
    let job = &log.state().jobs["j"];
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.checkpoint.as_ref().unwrap().step, 40);
    assert_eq!(job.attempts[0].ended.as_deref(), Some("its worker's lease expired"));
    assert_eq!(log.state().placements["g1"].workers, vec!["w2".to_string()]);
    // A dead worker gets nothing; the scheduler picks w2.
    assert!(matches!(log.apply(Command::PlaceJob { id: "j".into(), worker: "w1".into() }), Reply::Refused { .. }));
    assert_eq!(schedule(log.state()), vec![("j".to_string(), "w2".to_string())]);

    assert_eq!(log.apply(Command::PlaceJob { id: "j".into(), worker: "w2".into() }), Reply::Epoch { epoch: 2 });
    assert!(schedule(log.state()).is_empty());
    // With no worker left to take its shard, the group waits for its worker, not formed.
    assert_eq!(log.apply(Command::MarkWorkerDead { id: "w2".into() }), Reply::Done);
    let waiting = &log.state().placements["g1"];
    assert_eq!((waiting.workers.clone(), waiting.formed), (vec!["w2".to_string()], false));
    assert!(schedule(log.state()).is_empty(), "nothing alive to place on");
    assert_eq!(log.apply(worker("w2")), Reply::Done);
    assert_eq!(log.apply(Command::PlaceJob { id: "j".into(), worker: "w2".into() }), Reply::Epoch { epoch: 3 });
    // The old attempt was only slow, not dead: its reports are refused and change nothing.
    let before = log.state().clone();
    let stale = log.apply(report(1, JobReport::Succeeded { uri: "/out/j".into(), checksum: String::new() }));
    assert!(matches!(&stale, Reply::Refused { reason } if reason.contains("stale attempt")), "{stale:?}");
    assert_eq!(log.state().jobs, before.jobs);
    assert_eq!(
        log.apply(report(3, JobReport::Succeeded { uri: "/out/j".into(), checksum: String::new() })),
        Reply::Done
    );
    assert_eq!(log.state().jobs["j"].status, JobStatus::Succeeded);
    // Finished is final.
    assert!(matches!(log.apply(report(3, JobReport::Running { step: 0, plan: None })), Reply::Refused { .. }));
    assert!(matches!(log.apply(Command::CancelJob { id: "j".into() }), Reply::Refused { .. }));
}

#[test]
fn bad_commands_are_refused_without_changing_the_state() {
    let mut log = cluster();
    log.apply(submit("j"));
    let before = log.state().clone();
    let bad = [
        submit("j"),
        Command::SubmitJob { id: "k".into(), tenant: "t".into(), spec: spec("nope"), adapter: None },
        Command::PlaceJob { id: "nope".into(), worker: "w1".into() },
        Command::ReportJob { id: "j".into(), epoch: 0, report: JobReport::Running { step: 0, plan: None } },
        Command::DeleteAdapter { tenant: "t".into(), name: "nope".into() },
        Command::MarkWorkerDead { id: "nope".into() },
        Command::RemovePlacement { group: "nope".into() },
        Command::SetPlacement { group: "g".into(), placement: Placement::new("m", vec!["nope".into()]) },
    ];
    for command in bad {
        let reply = log.apply(command.clone());
        assert!(matches!(reply, Reply::Refused { .. }), "{command:?} gave {reply:?}");
    }
    assert_eq!(log.state().jobs, before.jobs);
    assert_eq!(log.state().adapters, before.adapters);
    assert_eq!(log.state().placements, before.placements);
    assert_eq!(log.state().workers, before.workers);
}

/// A long, varied, deterministic log.
fn busy_log() -> Vec<Command> {
    let mut cmds = vec![worker("w1"), worker("w2"), Command::RegisterModel { name: "m".into(), uri: "/m".into() }];
    for i in 0..300 {
        let job = format!("j{}", i / 5);
        cmds.push(match i % 7 {
            0 => submit(&job),
            1 => Command::PlaceJob { id: job, worker: if i % 2 == 0 { "w1" } else { "w2" }.into() },
            2 => put_adapter(&format!("a{}", i % 11)),
            3 => Command::ReportJob {
                id: job,
                epoch: 1,
                report: JobReport::Checkpoint { step: i, uri: format!("/c/{i}") },
            },
            4 => Command::MarkWorkerDead { id: if i % 3 == 0 { "w1" } else { "w2" }.into() },
            5 => worker(if i % 2 == 0 { "w1" } else { "w2" }),
            _ => Command::DeleteAdapter { tenant: "t".into(), name: format!("a{}", i % 13) },
        });
    }
    cmds
}

#[test]
fn replicas_agree_and_a_snapshot_restores_exactly() {
    let (mut a, mut b) = (Log::new(), Log::new());
    let cmds = busy_log();
    let (first, rest) = cmds.split_at(150);
    for c in first {
        assert_eq!(a.apply(c.clone()), b.apply(c.clone()));
    }
    let snap = a.machine.snapshot().unwrap();
    let mut restored = Log { machine: StateMachine::restore(&snap).unwrap(), next: a.next };
    assert_eq!(restored.machine, a.machine);
    for c in rest {
        let reply = a.apply(c.clone());
        assert_eq!(b.apply(c.clone()), reply);
        assert_eq!(restored.apply(c.clone()), reply);
    }
    assert_eq!(a.machine.snapshot().unwrap(), b.machine.snapshot().unwrap());
    assert_eq!(restored.machine.snapshot().unwrap(), a.machine.snapshot().unwrap());
    // The log did something: jobs, versions, requeues.
    assert!(a.state().jobs.len() > 20);
    assert!(a.state().jobs.values().any(|j| j.attempts.iter().any(|t| t.ended.is_some())));
    // A retry of a request applied before the snapshot is still recognised after restoring.
    let retry = Proposal::new("req-5", put_adapter("zzz"));
    let next = restored.next;
    assert!(!matches!(restored.machine.apply(next, &retry), Reply::Version { .. }));
    assert!(!restored.state().adapters["t"].contains_key("zzz"));
}

#[test]
fn the_scheduler_spreads_queued_jobs_and_prefers_workers_with_the_model() {
    let mut log = cluster();
    // w3 is alive but has no copy of the base model loaded.
    log.apply(Command::RegisterWorker {
        id: "w3".into(),
        addr: "w3:7000".into(),
        gpus: vec![],
        collective_addr: String::new(),
    });
    for j in ["a", "b", "c", "d"] {
        log.apply(submit(j));
    }
    log.apply(Command::PlaceJob { id: "a".into(), worker: "w1".into() });
    let moves = schedule(log.state());
    let want = [("b", "w2"), ("c", "w1"), ("d", "w2")];
    assert_eq!(moves, want.map(|(j, w)| (j.to_string(), w.to_string())).to_vec());
    // Only w3 alive: it takes them all.
    log.apply(Command::MarkWorkerDead { id: "w1".into() });
    log.apply(Command::MarkWorkerDead { id: "w2".into() });
    assert!(schedule(log.state()).iter().all(|(_, w)| w == "w3"));
    assert_eq!(schedule(log.state()).len(), 4);
}

#[test]
fn a_job_reports_its_steps_and_its_success_registers_its_adapter_for_its_tenant() {
    let mut log = cluster();
    let submit_as = |id: &str, adapter: &str| Command::SubmitJob {
        id: id.into(),
        tenant: "alice".into(),
        spec: spec("m"),
        adapter: Some(adapter.into()),
    };
    assert_eq!(log.apply(submit_as("j1", "ft:m:alice:rev:j1")), Reply::Done);
    log.apply(Command::PlaceJob { id: "j1".into(), worker: "w1".into() });
    // The worker is told its attempt (and only its own).
    let assigned = log.state().assignments("w1");
    assert_eq!((assigned.len(), assigned[0].epoch, assigned[0].job.as_str()), (1, 1, "j1"));
    assert!(log.state().assignments("w2").is_empty());
    let report = |epoch, report| Command::ReportJob { id: "j1".into(), epoch, report };
    let plan = TrainingPlan {
        n_epochs: 1,
        batch_size: 1,
        learning_rate_multiplier: 0.25,
        total_steps: 3,
        examples: 3,
        tokens: 60,
    };
    assert_eq!(log.apply(report(1, JobReport::Running { step: 0, plan: Some(plan.clone()) })), Reply::Done);
    assert_eq!(log.state().jobs["j1"].plan, Some(plan));
    // Step 2 again (as after a resume from step 1): its tokens are counted once.
    for step in [1, 2, 2, 3] {
        let figures =
            StepFigures { step, total_steps: 3, loss: 4.0 / step as f64, tokens_per_s: 100.0, tokens: 10 * step };
        assert_eq!(log.apply(report(1, JobReport::Step(figures))), Reply::Done);
    }
    let steps: Vec<u64> =
        log.state().jobs["j1"].events.iter().filter_map(|e| e.step.as_ref()).map(|s| s.step).collect();
    assert_eq!(steps, [1, 2, 2, 3]);
    assert_eq!(log.state().jobs["j1"].trained_tokens, 60);
    assert_eq!(log.state().jobs["j1"].status, JobStatus::Running);
    let done = JobReport::Succeeded { uri: "/blobs/jobs/j1/adapter".into(), checksum: "abc".into() };
    assert_eq!(log.apply(report(1, done)), Reply::Version { version: 1 });
    let versions = &log.state().adapters["alice"]["ft:m:alice:rev:j1"];
    assert_eq!((versions[0].uri.as_str(), versions[0].checksum.as_str()), ("/blobs/jobs/j1/adapter", "abc"));
    assert!(log.state().jobs["j1"].finished_at.is_some());
    assert!(log.state().assignments("w1").is_empty(), "a finished job is no one's to run");
    // A second job under the same adapter name makes its next version; no other tenant sees it.
    log.apply(submit_as("j2", "ft:m:alice:rev:j1"));
    log.apply(Command::PlaceJob { id: "j2".into(), worker: "w2".into() });
    let done = JobReport::Succeeded { uri: "/blobs/jobs/j2/adapter".into(), checksum: "def".into() };
    let reply = log.apply(Command::ReportJob { id: "j2".into(), epoch: 1, report: done });
    assert_eq!(reply, Reply::Version { version: 2 });
    assert_eq!(log.state().adapters.len(), 1);
}

#[test]
fn keys_files_and_names_are_checked() {
    let mut log = cluster();
    let key = |tenant: &str| Command::CreateApiKey {
        tenant: tenant.into(),
        key_sha256: format!("{:0>64}", tenant.len()),
        expires_at: None,
    };
    assert_eq!(log.apply(key("alice")), Reply::Done);
    assert_eq!(log.state().api_keys[&format!("{:0>64}", 5)].tenant, "alice");
    for bad in ["", "../etc", "a/b", "a b", "x\u{7}", &"t".repeat(65)] {
        assert!(matches!(log.apply(key(bad)), Reply::Refused { .. }), "tenant {bad:?}");
    }
    assert_eq!(log.state().api_keys.len(), 1);
    for bad in ["", "..", "a/../b", "a\\b", "a\nb", &"n".repeat(129)] {
        assert!(check_name("adapter", bad).is_err(), "{bad:?}");
        let mut adapter = put_adapter(bad);
        if let Command::PutAdapter { name, .. } = &mut adapter {
            *name = bad.to_string();
        }
        assert!(matches!(log.apply(adapter), Reply::Refused { .. }), "adapter {bad:?}");
    }
    assert!(check_name("adapter", "ft:m:alice:rev:ftjob-1").is_ok());
    let file = File {
        tenant: "alice".into(),
        filename: "train.jsonl".into(),
        bytes: 10,
        purpose: "fine-tune".into(),
        examples: 1,
        created_at: 1,
        uri: "/blobs/files/file-1.jsonl".into(),
    };
    assert_eq!(log.apply(Command::PutFile { id: "file-1".into(), file: file.clone() }), Reply::Done);
    assert!(matches!(log.apply(Command::PutFile { id: "file-1".into(), file }), Reply::Refused { .. }));
    // Only its tenant deletes it.
    let delete = |tenant: &str| Command::DeleteFile { tenant: tenant.into(), id: "file-1".into() };
    assert!(matches!(log.apply(delete("bob")), Reply::Refused { .. }));
    assert_eq!(log.apply(delete("alice")), Reply::Done);
    assert!(log.state().files.is_empty());
}

/// A group worker: no whole model, a collective address.
fn group_worker(id: &str) -> Command {
    Command::RegisterWorker {
        id: id.into(),
        addr: format!("{id}:7000"),
        gpus: vec![],
        collective_addr: format!("{id}:7100"),
    }
}

#[test]
fn a_group_is_placed_on_spare_group_workers_and_re_formed_when_a_rank_fails() {
    let mut log = cluster();
    for w in ["g1", "g2", "g3"] {
        assert_eq!(log.apply(group_worker(w)), Reply::Done);
    }
    let create = |group: &str, size| Command::CreateGroup {
        group: group.into(),
        model: "m".into(),
        size,
        expert_parallel: false,
    };
    // Too many ranks, an unknown model, a bad name: refused, nothing placed.
    for bad in [
        create("tp", 4),
        create("tp", 0),
        create("bad/name", 2),
        Command::CreateGroup { group: "tp".into(), model: "nope".into(), size: 2, expert_parallel: false },
    ] {
        assert!(matches!(log.apply(bad.clone()), Reply::Refused { .. }), "{bad:?}");
    }
    assert!(log.state().placements.is_empty());
    // Only group workers take ranks, by id; the whole-model workers w1, w2 are not among them.
    assert_eq!(log.apply(create("tp", 2)), Reply::Done);
    let p = &log.state().placements["tp"];
    assert_eq!((p.workers.clone(), p.epoch, p.formed), (vec!["g1".to_string(), "g2".to_string()], 1, false));
    assert!(matches!(log.apply(create("tp", 1)), Reply::Refused { .. }), "the name is taken");
    // What each member's heartbeat says: its rank and every rank's collective address.
    let m = log.state().memberships("g2");
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].rank, m[0].epoch, m[0].model_uri.as_str()), (1, 1, "/models/m"));
    assert_eq!(m[0].peers, vec!["g1:7100".to_string(), "g2:7100".to_string()]);
    assert!(log.state().memberships("g3").is_empty());

    // Rank 0 formed it; a report for another epoch is refused.
    let formed = |epoch| Command::GroupFormed { group: "tp".into(), epoch };
    assert!(matches!(log.apply(formed(2)), Reply::Refused { .. }));
    assert_eq!(log.apply(formed(1)), Reply::Done);
    assert!(log.state().placements["tp"].formed);

    // Rank 0 saw rank 1 fail: g3, the spare, takes rank 1 at epoch 2. The same failure
    // reported again (by another rank, or a retry) is stale and changes nothing.
    let failed = |epoch, blame| Command::GroupFailed { group: "tp".into(), epoch, blame };
    assert_eq!(log.apply(failed(1, Some(1))), Reply::Done);
    let p = log.state().placements["tp"].clone();
    assert_eq!((p.workers.clone(), p.epoch, p.formed), (vec!["g1".to_string(), "g3".to_string()], 2, false));
    assert!(matches!(log.apply(failed(1, Some(0))), Reply::Refused { .. }));
    assert_eq!(log.state().placements["tp"], p);
    // g2's lease runs out later: it is in no group any more, nothing moves.
    assert_eq!(log.apply(Command::MarkWorkerDead { id: "g2".into() }), Reply::Done);
    assert_eq!(log.state().placements["tp"], p);
    // A failure with no spare left (and no blame): the same members try again, next epoch.
    assert_eq!(log.apply(failed(2, None)), Reply::Done);
    assert_eq!(log.state().placements["tp"].workers, p.workers);
    assert_eq!(log.state().placements["tp"].epoch, 3);
    // A member's lease runs out: g2 is back as a spare and takes its rank, next epoch.
    assert_eq!(log.apply(group_worker("g2")), Reply::Done);
    assert_eq!(log.apply(Command::MarkWorkerDead { id: "g1".into() }), Reply::Done);
    let p = &log.state().placements["tp"];
    assert_eq!((p.workers.clone(), p.epoch), (vec!["g2".to_string(), "g3".to_string()], 4));

    // While the group is not formed, its workers get no fine-tuning jobs: only w1 and w2 are
    // scheduled.
    for j in ["a", "b", "c"] {
        log.apply(submit(j));
    }
    assert!(schedule(log.state()).iter().all(|(_, w)| w == "w1" || w == "w2"), "{:?}", schedule(log.state()));
    // The state with groups survives a snapshot.
    let restored = StateMachine::restore(&log.machine.snapshot().unwrap()).unwrap();
    assert_eq!(restored, log.machine);
    // A member dies with no group worker to spare (the whole-model workers w1, w2 cannot take
    // its rank): the group waits for it, not formed, at the next epoch; back, it forms again.
    assert_eq!(log.apply(Command::MarkWorkerDead { id: "g3".into() }), Reply::Done);
    let p = &log.state().placements["tp"];
    assert_eq!((p.workers.clone(), p.epoch, p.formed), (vec!["g2".to_string(), "g3".to_string()], 5, false));
    let epochs: Vec<u64> = log.state().memberships("g2").iter().map(|m| m.epoch).collect();
    assert_eq!(epochs, vec![5], "g2 is still asked to join the group, at its new epoch");
    assert_eq!(log.apply(group_worker("g3")), Reply::Done);
    assert_eq!(log.apply(Command::GroupFormed { group: "tp".into(), epoch: 5 }), Reply::Done);
    assert!(log.state().placements["tp"].formed);
}

/// Jobs go to rank 0 of a formed group that serves their model (after workers holding the
/// whole model); when the group fails, is re-formed or removed, the attempt ends and the job
/// is queued again, to resume from its checkpoint.
#[test]
fn jobs_train_on_rank_0_of_a_formed_group_and_are_queued_again_when_it_is_re_formed() {
    let mut log = Log::new();
    log.apply(Command::RegisterModel { name: "m".into(), uri: "/models/m".into() });
    for w in ["g1", "g2", "g3", "g4"] {
        log.apply(group_worker(w));
    }
    let create = |group: &str, expert_parallel| Command::CreateGroup {
        group: group.into(),
        model: "m".into(),
        size: 2,
        expert_parallel,
    };
    assert_eq!(log.apply(create("tp", false)), Reply::Done);
    assert_eq!(log.apply(create("ep", true)), Reply::Done);
    log.apply(submit("j"));
    assert!(schedule(log.state()).is_empty(), "no group formed yet");
    // The expert-parallel group (g3, g4) formed: its rank 0 would take the job.
    assert_eq!(log.apply(Command::GroupFormed { group: "ep".into(), epoch: 1 }), Reply::Done);
    assert_eq!(schedule(log.state()), vec![("j".to_string(), "g3".to_string())], "rank 0, not rank 1");
    // Both formed: the first rank 0 by id.
    assert_eq!(log.apply(Command::GroupFormed { group: "tp".into(), epoch: 1 }), Reply::Done);
    assert_eq!(schedule(log.state()), vec![("j".to_string(), "g1".to_string())]);
    assert_eq!(log.apply(Command::PlaceJob { id: "j".into(), worker: "g1".into() }), Reply::Epoch { epoch: 1 });
    assert_eq!(log.state().assignments("g1").len(), 1);
    let running = Command::ReportJob { id: "j".into(), epoch: 1, report: JobReport::Running { step: 0, plan: None } };
    assert_eq!(log.apply(running), Reply::Done);
    // Rank 1 fails: the attempt ends, the job is queued; once tp is formed again, the other
    // group's rank 0 comes first (the worker an attempt ended on is the last choice), and g1
    // may still take it.
    assert_eq!(log.apply(Command::GroupFailed { group: "tp".into(), epoch: 1, blame: Some(1) }), Reply::Done);
    let job = &log.state().jobs["j"];
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempts[0].ended.as_deref(), Some("its worker group failed"));
    assert!(log.state().assignments("g1").is_empty());
    assert_eq!(schedule(log.state()), vec![("j".to_string(), "g3".to_string())], "tp is not formed yet");
    assert_eq!(log.apply(Command::GroupFormed { group: "tp".into(), epoch: 2 }), Reply::Done);
    assert_eq!(schedule(log.state()), vec![("j".to_string(), "g3".to_string())]);
    assert_eq!(log.apply(Command::PlaceJob { id: "j".into(), worker: "g1".into() }), Reply::Epoch { epoch: 2 });
    // A job whose attempts keep ending (here its group fails at every formation) fails after
    // MAX_ATTEMPTS instead of going round for ever.
    for epoch in 2..=MAX_ATTEMPTS as u64 {
        assert_eq!(log.apply(Command::GroupFailed { group: "tp".into(), epoch, blame: None }), Reply::Done);
        if epoch == MAX_ATTEMPTS as u64 {
            break;
        }
        assert_eq!(log.state().jobs["j"].status, JobStatus::Queued);
        assert_eq!(log.apply(Command::GroupFormed { group: "tp".into(), epoch: epoch + 1 }), Reply::Done);
        let place = Command::PlaceJob { id: "j".into(), worker: "g1".into() };
        assert_eq!(log.apply(place), Reply::Epoch { epoch: epoch + 1 });
    }
    let job = &log.state().jobs["j"];
    assert_eq!((job.status, job.attempts.len()), (JobStatus::Failed, MAX_ATTEMPTS));
    assert!(job.error.as_deref().unwrap().contains("its worker group failed; giving up"), "{:?}", job.error);
    assert!(schedule(log.state()).is_empty());
    log.apply(submit("k"));
    assert_eq!(log.apply(Command::GroupFormed { group: "tp".into(), epoch: MAX_ATTEMPTS as u64 + 1 }), Reply::Done);
    assert_eq!(log.apply(Command::PlaceJob { id: "k".into(), worker: "g1".into() }), Reply::Epoch { epoch: 1 });
    // The group is removed: queued again, for the other group.
    assert_eq!(log.apply(Command::RemovePlacement { group: "tp".into() }), Reply::Done);
    assert_eq!(log.state().jobs["k"].status, JobStatus::Queued);
    assert_eq!(schedule(log.state()), vec![("k".to_string(), "g3".to_string())]);
}

#[test]
fn a_state_from_before_groups_reads_with_no_epoch_and_no_collective_address() {
    let old = json!({
        "applied": 3,
        "workers": {"w1": {"addr": "w1:7000", "gpus": [], "alive": true}},
        "models": {}, "adapters": {}, "jobs": {},
        "placements": {"g": {"model": "m", "workers": ["w1"], "adapters": []}},
        "replies": {}, "reply_order": [],
    });
    let machine = StateMachine::restore(old.to_string().as_bytes()).unwrap();
    let state = machine.state();
    assert_eq!(state.workers["w1"].collective_addr, "");
    assert_eq!((state.placements["g"].epoch, state.placements["g"].formed), (0, false));
}

#[test]
fn a_snapshot_keeps_the_coordinators_added_by_their_ids() {
    let mut log = cluster();
    log.machine.change_coordinators(log.next, [(4, "127.0.0.1:7404".to_string())].into(), &[]);
    let restored = StateMachine::restore(&log.machine.snapshot().unwrap()).unwrap();
    assert_eq!(restored.state().coordinators[&4], "127.0.0.1:7404");
    assert_eq!(restored, log.machine);
}

#[test]
fn keys_keep_their_expiry_and_are_revoked_by_id() {
    let mut log = cluster();
    let hash = tandem_proto::contract::sha256_hex(b"tk-alice");
    let create = Command::CreateApiKey { tenant: "alice".into(), key_sha256: hash.clone(), expires_at: Some(2_000) };
    assert_eq!(log.apply(create), Reply::Done);
    let key = log.state().api_keys[&hash].clone();
    assert_eq!((key.tenant.as_str(), key.expires_at), ("alice", Some(2_000)));
    assert!(key.created_at > 0, "the proposal's time is the key's creation time");
    assert!(!key.expired(1_999) && key.expired(2_000));
    let id = ApiKey::id(&hash);
    assert_eq!(id, format!("key_{}", &hash[..16]));
    // An unknown id changes nothing; the key's id removes it.
    assert!(matches!(log.apply(Command::RevokeApiKey { id: "key_0000".into() }), Reply::Refused { .. }));
    assert_eq!(log.state().api_keys.len(), 1);
    assert_eq!(log.apply(Command::RevokeApiKey { id: id.clone() }), Reply::Done);
    assert!(log.state().api_keys.is_empty());
    assert!(matches!(log.apply(Command::RevokeApiKey { id }), Reply::Refused { .. }));
    assert!(matches!(log.apply(Command::RevokeApiKey { id: "../x".into() }), Reply::Refused { .. }));
}

#[test]
fn a_state_that_kept_keys_as_bare_tenants_still_reads() {
    let hash = "ab".repeat(32);
    let stored = json!({"applied": 7, "workers": {}, "models": {}, "adapters": {}, "jobs": {}, "placements": {},
        "api_keys": {hash.clone(): "alice"}});
    let state: ClusterState = serde_json::from_value(stored).unwrap();
    assert_eq!(state.api_keys[&hash], ApiKey { tenant: "alice".into(), created_at: 0, expires_at: None });
    // And what it writes reads back the same.
    let again: ClusterState = serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap();
    assert_eq!(again, state);
}

#[test]
fn a_draining_workers_attempts_are_handed_off_from_their_checkpoint_without_counting_as_retries() {
    let mut log = cluster();
    log.apply(submit("j"));
    let report = |epoch, report| Command::ReportJob { id: "j".into(), epoch, report };
    let drain = |drain| Command::DrainWorker { id: "w1".into(), drain };
    for epoch in 1..=2 * MAX_ATTEMPTS as u64 {
        assert_eq!(log.apply(Command::PlaceJob { id: "j".into(), worker: "w1".into() }), Reply::Epoch { epoch });
        assert!(!log.state().assignments("w1")[0].hand_off);
        log.apply(report(epoch, JobReport::Checkpoint { step: epoch * 10, uri: format!("/ckpt/{epoch}") }));
        assert_eq!(log.apply(drain(true)), Reply::Done);
        let assigned = log.state().assignments("w1");
        assert!(assigned[0].hand_off, "the draining worker is told to hand its attempt off");
        assert_eq!(log.apply(report(epoch, JobReport::HandedOff)), Reply::Done);
        let job = &log.state().jobs["j"];
        assert_eq!(job.status, JobStatus::Queued, "epoch {epoch}");
        assert_eq!(job.checkpoint.as_ref().unwrap().step, epoch * 10, "it resumes from the checkpoint");
        assert!(job.attempts.last().unwrap().ended.as_deref().unwrap().contains("handed off by draining worker w1"));
        assert!(log.state().assignments("w1").is_empty());
        assert_eq!(log.apply(drain(false)), Reply::Done);
    }
    // Twice as many hand-offs as attempts allowed, and a failure still has every attempt left.
    let epoch = 2 * MAX_ATTEMPTS as u64 + 1;
    log.apply(Command::PlaceJob { id: "j".into(), worker: "w2".into() });
    log.apply(report(epoch, JobReport::Interrupted { error: "disk".into() }));
    assert_eq!(log.state().jobs["j"].status, JobStatus::Queued);
    assert!(matches!(log.apply(report(epoch, JobReport::HandedOff)), Reply::Refused { .. }), "fenced");
}

#[test]
fn a_base_model_is_removed_only_when_nothing_uses_it() {
    let mut log = cluster();
    let remove = || Command::RemoveModel { name: "m".into() };
    // w1 and w2 serve "m" (their heartbeat's models): stopping them is the operator's first step.
    let Reply::Refused { reason } = log.apply(remove()) else { panic!("removed while served") };
    assert!(reason.contains("worker w1") && reason.contains("worker w2"), "{reason}");
    log.apply(Command::MarkWorkerDead { id: "w1".into() });
    log.apply(Command::MarkWorkerDead { id: "w2".into() });
    log.apply(submit("j"));
    let Reply::Refused { reason } = log.apply(remove()) else { panic!("removed under a job") };
    assert_eq!(reason, "base model \"m\" is in use by job j");
    log.apply(Command::CancelJob { id: "j".into() });
    assert_eq!(log.apply(remove()), Reply::Done);
    assert!(log.state().models.is_empty());
    assert!(matches!(log.apply(remove()), Reply::Refused { .. }), "no such model any more");
    assert!(matches!(log.apply(submit("k")), Reply::Refused { .. }), "no job on a removed model");
}
