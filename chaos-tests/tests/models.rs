//! Each model says what the state machine does: random sequences of operations, applied to the
//! coordinators' state machine one at a time, get exactly the answers the model accepts (and
//! the model refuses any other).

#![allow(clippy::unwrap_used)] // tests unwrap by design

use tandem_chaos::linearizability::Model;
use tandem_chaos::models::{AdapterAnswer, AdapterOp, AdapterRegistry};
use tandem_coordinator::state::StateMachine;
use tandem_proto::contract::{Command, Proposal, Reply};
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
