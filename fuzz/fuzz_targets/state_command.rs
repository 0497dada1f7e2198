//! Commands as the replicated log carries them (JSON proposals, one per line): decoding and
//! applying any sequence never panics, two replicas that apply the same entries hold the same
//! machine, and a snapshot restores to exactly the machine it was taken of.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_coordinator::state::StateMachine;
use tandem_proto::contract::Proposal;

fuzz_target!(|data: &[u8]| {
    let (mut a, mut b) = (StateMachine::default(), StateMachine::default());
    let proposals = data.split(|&c| c == b'\n').filter_map(|line| serde_json::from_slice::<Proposal>(line).ok());
    for (index, p) in (1u64..).zip(proposals) {
        let reply = a.apply(index, &p);
        assert_eq!(reply, b.apply(index, &p), "replicas answered entry {index} differently");
    }
    assert_eq!(a, b, "replicas diverged");
    let restored = StateMachine::restore(&a.snapshot().expect("a snapshot")).expect("the snapshot restores");
    assert_eq!(restored, a, "the snapshot restores to another machine");
});
