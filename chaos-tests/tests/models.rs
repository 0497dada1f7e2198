//! Each model says what the state machine does: random sequences of operations, applied to the
//! coordinators' state machine one at a time, get exactly the answers the model accepts (and
//! the model refuses any other).

#![allow(clippy::unwrap_used)] // tests unwrap by design

use tandem_chaos::linearizability::Model;
use tandem_chaos::models::{AdapterAnswer, AdapterOp, AdapterRegistry, JobAnswer, JobOp, JobRegistry, JobState};
use tandem_coordinator::state::StateMachine;
use tandem_proto::contract::{Command, FileRef, Gpu, JobReport, JobSpec, JobStatus, MethodChoice, Proposal, Reply};
use tandem_worker::rng::Xoshiro256;

/// Applies `op` to `machine` at log `index`; returns the answer a client gets.
fn apply(machine: &mut StateMachine, index: u64, op: &AdapterOp) -> AdapterAnswer {
    let mut propose = |command| machine.apply(index, &Proposal::new(format!("req-{index}"), command));
    match op {
        AdapterOp::Put { tenant, name } => {
            let command = Command::PutAdapter {
                tenant: tenant.clone(),
                name: name.clone(),
                base_model: "m".into(),
                checksum: "ab".into(),
                uri: format!("/adapters/{name}"),
            };
            match propose(command) {
                Reply::Version { version } => AdapterAnswer::Version(version),
                other => panic!("an upload answered {other:?}"),
            }
        }
        AdapterOp::Delete { tenant, name } => {
            match propose(Command::DeleteAdapter { tenant: tenant.clone(), name: name.clone() }) {
                Reply::Done => AdapterAnswer::Deleted,
                Reply::Refused { .. } => AdapterAnswer::NotFound,
                other => panic!("a delete answered {other:?}"),
            }
        }
        AdapterOp::Get { tenant, name } => {
            let adapters = &machine.state().adapters;
            let latest = adapters.get(tenant).and_then(|a| a.get(name)).and_then(|v| v.last()).map(|v| v.version);
            AdapterAnswer::Latest(latest)
        }
    }
}

#[test]
fn the_adapter_registry_model_answers_as_the_state_machine_does() {
    let mut rng = Xoshiro256::seed_from_u64(11);
    let mut machine = StateMachine::default();
    let model = Command::RegisterModel { name: "m".into(), uri: "/models/m".into() };
    machine.apply(1, &Proposal::new("model", model));
    let mut states = std::collections::BTreeMap::new();
    let mut answers = std::collections::BTreeSet::new();
    for index in 2..2000 {
        let (tenant, name) = (format!("t{}", rng.below(2)), format!("a{}", rng.below(3)));
        let op = match rng.below(5) {
            0 | 1 => AdapterOp::Put { tenant, name },
            2 => AdapterOp::Delete { tenant, name },
            _ => AdapterOp::Get { tenant, name },
        };
        let answer = apply(&mut machine, index, &op);
        let state = states.entry(AdapterRegistry.key(&op)).or_insert_with(|| AdapterRegistry.init());
        let next = AdapterRegistry.step(state, &op, Some(&answer));
        let next = next.unwrap_or_else(|| panic!("at {index}, {op:?} answered {answer:?}, from {state:?}"));
        // Any other answer is refused.
        for wrong in [AdapterAnswer::Version(u64::MAX), AdapterAnswer::Latest(Some(u64::MAX))] {
            assert!(AdapterRegistry.step(state, &op, Some(&wrong)).is_none(), "{op:?} may answer {wrong:?}");
        }
        *state = next;
        answers.insert(format!("{answer:?}").split('(').next().unwrap().to_string());
    }
    // Every kind of answer came up.
    assert_eq!(answers.len(), 4, "{answers:?}");
}

/// What a tenant reads of job `id` in `machine`.
fn job_shown(machine: &StateMachine, id: &str) -> JobAnswer {
    match machine.state().jobs.get(id).map(|j| j.status) {
        None => JobAnswer::NotFound,
        Some(JobStatus::Succeeded) => JobAnswer::Shown(JobState::Succeeded),
        Some(JobStatus::Failed) => JobAnswer::Shown(JobState::Failed),
        Some(JobStatus::Cancelled) => JobAnswer::Shown(JobState::Cancelled),
        Some(JobStatus::Queued | JobStatus::Placed | JobStatus::Running) => JobAnswer::Shown(JobState::Active),
    }
}

#[test]
fn the_job_registry_model_answers_as_the_state_machine_does() {
    let mut rng = Xoshiro256::seed_from_u64(12);
    let mut machine = StateMachine::default();
    let mut index = 0;
    let mut apply = |machine: &mut StateMachine, command| {
        index += 1;
        machine.apply(index, &Proposal::new(format!("req-{index}"), command))
    };
    apply(&mut machine, Command::RegisterModel { name: "m".into(), uri: "/models/m".into() });
    for w in ["w1", "w2"] {
        let gpus = vec![Gpu { index: 0, memory_bytes: 80 << 30, models: vec!["m".into()] }];
        let register =
            Command::RegisterWorker { id: w.into(), addr: format!("{w}:1"), gpus, collective_addr: String::new() };
        apply(&mut machine, register);
    }
    let mut states = std::collections::BTreeMap::new();
    let mut answers = std::collections::BTreeSet::new();
    for i in 0..4000 {
        // A few jobs at a time, new ones as the run goes on.
        let id = format!("j{}", i / 500 * 10 + rng.below(3));
        let epoch = machine.state().jobs.get(&id).map_or(0, |j| j.epoch);
        // What happens to a job without its tenant: attempts placed, started, ended.
        let worker = if rng.below(2) == 0 { "w1" } else { "w2" };
        let report = |report| Command::ReportJob { id: id.clone(), epoch, report };
        let internal = match rng.below(12) {
            0 => Some(Command::PlaceJob { id: id.clone(), worker: worker.into() }),
            1 => Some(report(JobReport::Running { step: 0, plan: None })),
            2 => Some(report(JobReport::Succeeded { uri: format!("/out/{id}"), checksum: String::new() })),
            3 => Some(report(JobReport::Failed { error: "diverged".into() })),
            4 => Some(report(JobReport::Interrupted { error: "disk".into() })),
            _ => None,
        };
        if let Some(command) = internal {
            apply(&mut machine, command);
            continue;
        }
        // What its tenant does, answered as the gateway answers.
        let (op, answer) = match rng.below(3) {
            0 => {
                let spec = JobSpec::new("m", MethodChoice::lora(8), FileRef { id: "f".into(), uri: "/files/f".into() });
                let submit = Command::SubmitJob { id: id.clone(), tenant: "t".into(), spec, adapter: None };
                if !matches!(apply(&mut machine, submit), Reply::Done) {
                    continue; // that id is taken; its create was refused and did not happen
                }
                (JobOp::Create { id: id.clone() }, JobAnswer::Created)
            }
            1 => {
                let answer = match job_shown(&machine, &id) {
                    JobAnswer::Shown(s) if s != JobState::Active => JobAnswer::Ended(s),
                    JobAnswer::NotFound => JobAnswer::NotFound,
                    JobAnswer::Shown(_) => {
                        assert_eq!(apply(&mut machine, Command::CancelJob { id: id.clone() }), Reply::Done);
                        job_shown(&machine, &id)
                    }
                    other => panic!("a read answered {other:?}"),
                };
                (JobOp::Cancel { id: id.clone() }, answer)
            }
            _ => (JobOp::Get { id: id.clone() }, job_shown(&machine, &id)),
        };
        let state = states.entry(id.clone()).or_insert_with(|| JobRegistry.init());
        let next = JobRegistry.step(state, &op, Some(&answer));
        let next = next.unwrap_or_else(|| panic!("at {i}, {op:?} answered {answer:?}, from {state:?}"));
        // An ended job is never seen active again, nor a made one missing.
        if *state != JobState::Absent && *state != JobState::Active {
            assert!(
                JobRegistry
                    .step(state, &JobOp::Get { id: id.clone() }, Some(&JobAnswer::Shown(JobState::Active)))
                    .is_none()
            );
        }
        if *state != JobState::Absent {
            assert!(JobRegistry.step(state, &JobOp::Get { id: id.clone() }, Some(&JobAnswer::NotFound)).is_none());
        }
        *state = next;
        answers.insert(format!("{op:?} {answer:?}").replace(&id, ""));
    }
    // Every kind of answer to every kind of operation came up: made; cancelled, or refused as
    // succeeded, failed or cancelled already, or not found; read in each state, or not found.
    assert_eq!(answers.len(), 11, "{answers:?}");
}
