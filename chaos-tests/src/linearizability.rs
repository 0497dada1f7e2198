//! Linearizability of a recorded history: could every operation have taken effect at one
//! instant between its call and its return, in one order that the object's sequential
//! [`Model`] accepts? The search is Wing and Gong's: repeatedly pick, among the operations not
//! yet placed, one that no other unplaced operation returned before (it may come next), apply
//! it to the model, and backtrack when the model refuses its output; Lowe's memoisation skips a
//! (placed set, state) pair seen before, which makes histories with little concurrency cheap.
//! Operations on different keys never constrain each other, so each key's history is checked
//! alone (P-compositionality), which is what keeps long histories tractable.
//!
//! An operation whose outcome the client never learned (a timeout, a connection cut) may have
//! taken effect or not: it returns "at infinity", its output is unknown, and the search may
//! leave it out.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;

/// An object's sequential behaviour.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Input;
    type Output;
    /// Operations on different keys never affect each other.
    type Key: Ord + Clone;

    fn init(&self) -> Self::State;

    /// The state after `input` when the object, in `state`, may answer `output` (`None`: the
    /// answer is unknown, any will do); `None` when it may not.
    fn step(&self, state: &Self::State, input: &Self::Input, output: Option<&Self::Output>) -> Option<Self::State>;

    fn key(&self, input: &Self::Input) -> Self::Key;
}

/// One operation as a client saw it: called at `call`, returned `output` at `ret` (any clock
/// that orders the clients' events, nanoseconds say), or never heard back (`None`).
#[derive(Clone, Debug, PartialEq)]
pub struct Operation<I, O> {
    pub input: I,
    pub call: u64,
    pub ret: Option<(u64, O)>,
}

impl<I, O> Operation<I, O> {
    fn returned(&self) -> u64 {
        self.ret.as_ref().map_or(u64::MAX, |(at, _)| *at)
    }
}

/// An operation on `M`'s object.
pub type OperationOf<M> = Operation<<M as Model>::Input, <M as Model>::Output>;

/// What the search found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Verdict<K> {
    Linearizable,
    /// No order works for the operations on `key`.
    Violation {
        key: K,
    },
    /// The search gave up after `budget` states on `key`, without an answer.
    Unknown {
        key: K,
    },
}

impl<K> Verdict<K> {
    /// The same verdict, its key made into `f`'s.
    pub fn map_key<L>(self, f: impl FnOnce(K) -> L) -> Verdict<L> {
        match self {
            Verdict::Linearizable => Verdict::Linearizable,
            Verdict::Violation { key } => Verdict::Violation { key: f(key) },
            Verdict::Unknown { key } => Verdict::Unknown { key: f(key) },
        }
    }
}

/// Checks `history` against `model`, each key on its own, exploring at most `budget` states per
/// key.
pub fn check<M: Model>(model: &M, history: &[OperationOf<M>], budget: usize) -> Verdict<M::Key> {
    let mut by_key: BTreeMap<M::Key, Vec<&OperationOf<M>>> = BTreeMap::new();
    for op in history {
        by_key.entry(model.key(&op.input)).or_default().push(op);
    }
    for (key, mut ops) in by_key {
        ops.sort_by_key(|op| op.call);
        let mut search = Search { model, ops: &ops, seen: HashSet::new(), budget };
        let placed = vec![false; ops.len()];
        match search.from(placed, model.init()) {
            Some(true) => {}
            Some(false) => return Verdict::Violation { key },
            None => return Verdict::Unknown { key },
        }
    }
    Verdict::Linearizable
}

struct Search<'a, M: Model> {
    model: &'a M,
    /// One key's operations, by call time.
    ops: &'a [&'a OperationOf<M>],
    seen: HashSet<(Vec<bool>, M::State)>,
    budget: usize,
}

impl<M: Model> Search<'_, M> {
    /// Whether the unplaced operations can follow `placed` from `state`; `None` past the budget.
    fn from(&mut self, placed: Vec<bool>, state: M::State) -> Option<bool> {
        let ops = self.ops;
        // Done when every operation that returned is placed: the others may never have happened.
        let unplaced = || ops.iter().zip(&placed).filter(|(_, p)| !**p).map(|(op, _)| *op);
        if unplaced().all(|op| op.ret.is_none()) {
            return Some(true);
        }
        if !self.seen.insert((placed.clone(), state.clone())) {
            return Some(false);
        }
        if self.seen.len() > self.budget {
            return None;
        }
        // An operation may come next unless another unplaced one returned before it was called.
        let first_return = unplaced().map(Operation::returned).min().unwrap_or(u64::MAX);
        for (i, op) in ops.iter().enumerate() {
            if placed[i] || op.call > first_return {
                continue;
            }
            let output = op.ret.as_ref().map(|(_, out)| out);
            let Some(next) = self.model.step(&state, &op.input, output) else { continue };
            let mut more = placed.clone();
            more[i] = true;
            if self.from(more, next)? {
                return Some(true);
            }
        }
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tandem_worker::rng::Xoshiro256;

    use super::*;

    /// Registers by name, each starting at 0: put a value, or get one.
    struct Registers;

    #[derive(Clone, Debug, PartialEq)]
    enum Op {
        Put(&'static str, u32),
        Get(&'static str),
    }

    impl Model for Registers {
        type State = u32;
        type Input = Op;
        type Output = u32;
        type Key = &'static str;

        fn init(&self) -> u32 {
            0
        }

        fn step(&self, state: &u32, input: &Op, output: Option<&u32>) -> Option<u32> {
            match input {
                Op::Put(_, v) => Some(*v),
                Op::Get(_) => output.is_none_or(|o| o == state).then_some(*state),
            }
        }

        fn key(&self, input: &Op) -> &'static str {
            match input {
                Op::Put(k, _) | Op::Get(k) => k,
            }
        }
    }

    fn op(input: Op, call: u64, ret: u64, output: u32) -> Operation<Op, u32> {
        Operation { input, call, ret: Some((ret, output)) }
    }

    fn lost(input: Op, call: u64) -> Operation<Op, u32> {
        Operation { input, call, ret: None }
    }

    #[test]
    fn reads_concurrent_with_a_write_may_see_either_value() {
        let history = [op(Op::Put("x", 100), 0, 100, 0), op(Op::Get("x"), 25, 75, 100), op(Op::Get("x"), 30, 60, 0)];
        assert_eq!(check(&Registers, &history, 10_000), Verdict::Linearizable);
    }

    #[test]
    fn a_read_after_a_read_of_the_new_value_cannot_see_the_old_one() {
        let history = [op(Op::Put("x", 200), 0, 100, 0), op(Op::Get("x"), 10, 30, 200), op(Op::Get("x"), 40, 90, 0)];
        assert_eq!(check(&Registers, &history, 10_000), Verdict::Violation { key: "x" });
    }

    #[test]
    fn a_value_nobody_wrote_is_a_violation_and_keys_are_apart() {
        let history = [op(Op::Put("x", 1), 0, 10, 0), op(Op::Get("y"), 20, 30, 0), op(Op::Get("x"), 20, 30, 7)];
        assert_eq!(check(&Registers, &history, 10_000), Verdict::Violation { key: "x" });
    }

    #[test]
    fn an_operation_without_an_answer_may_or_may_not_have_happened() {
        // The lost write happened (a later read sees it) ...
        let seen = [lost(Op::Put("x", 5), 0), op(Op::Get("x"), 10, 20, 5)];
        assert_eq!(check(&Registers, &seen, 10_000), Verdict::Linearizable);
        // ... or not (nothing sees it) ...
        let unseen = [lost(Op::Put("x", 5), 0), op(Op::Get("x"), 10, 20, 0)];
        assert_eq!(check(&Registers, &unseen, 10_000), Verdict::Linearizable);
        // ... but not both: once seen, it cannot be unseen.
        let both = [lost(Op::Put("x", 5), 0), op(Op::Get("x"), 10, 20, 5), op(Op::Get("x"), 30, 40, 0)];
        assert_eq!(check(&Registers, &both, 10_000), Verdict::Violation { key: "x" });
    }

    #[test]
    fn the_budget_gives_unknown_rather_than_a_wrong_answer() {
        // Twelve concurrent writes of distinct values, then a read of a value none wrote: the
        // search must try every order before it can say so.
        let mut history: Vec<_> = (1..=12).map(|v| op(Op::Put("x", v), 0, 100, 0)).collect();
        history.push(op(Op::Get("x"), 200, 300, 99));
        assert_eq!(check(&Registers, &history, 50), Verdict::Unknown { key: "x" });
        assert_eq!(check(&Registers, &history, 1 << 20), Verdict::Violation { key: "x" });
    }

    /// Every order of `history` that respects real time, each lost operation in or out: whether
    /// one is a valid sequential run.
    fn brute_force(history: &[Operation<Op, u32>]) -> bool {
        fn go(history: &[Operation<Op, u32>], used: &mut Vec<bool>, state: u32) -> bool {
            let pending: Vec<usize> = (0..history.len()).filter(|&i| !used[i]).collect();
            if pending.iter().all(|&i| history[i].ret.is_none()) {
                return true;
            }
            pending.iter().any(|&i| {
                let blocked = pending.iter().any(|&j| j != i && history[j].returned() < history[i].call);
                let output = history[i].ret.as_ref().map(|(_, o)| o);
                match (blocked, Registers.step(&state, &history[i].input, output)) {
                    (false, Some(next)) => {
                        used[i] = true;
                        let ok = go(history, used, next);
                        used[i] = false;
                        ok
                    }
                    _ => false,
                }
            })
        }
        go(history, &mut vec![false; history.len()], 0)
    }

    #[test]
    fn agrees_with_trying_every_order_on_random_histories() {
        let mut rng = Xoshiro256::seed_from_u64(7);
        let (mut linearizable, mut violations) = (0, 0);
        for _ in 0..3000 {
            let n = 2 + rng.below(5) as usize;
            let history: Vec<Operation<Op, u32>> = (0..n)
                .map(|_| {
                    let call = rng.below(20);
                    let ret = call + 1 + rng.below(10);
                    let input = if rng.below(2) == 0 { Op::Put("x", 1 + rng.below(3) as u32) } else { Op::Get("x") };
                    match rng.below(8) {
                        0 => lost(input, call),
                        _ => op(input, call, ret, rng.below(4) as u32),
                    }
                })
                .collect();
            let want = brute_force(&history);
            let got = check(&Registers, &history, 1 << 20);
            assert_eq!(got == Verdict::Linearizable, want, "{history:?}");
            if want { linearizable += 1 } else { violations += 1 }
        }
        // Both kinds came up often enough to mean something.
        assert!(linearizable > 300 && violations > 300, "{linearizable} linearizable, {violations} not");
    }
}
