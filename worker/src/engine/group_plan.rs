//! The batch plan of a worker group. Rank 0 runs the engine's scheduler; before each forward
//! pass it broadcasts what the pass is (the batch's tokens, positions, KV-cache slots, each
//! sequence's block table, each token's adapter slot, the rows whose logits are wanted) and who
//! each adapter slot is (its name and where its files are), so every other rank makes the same
//! model calls in the same order on its shard, which the collectives inside those calls need.
//! When it has nothing to run it sends [`BatchPlan::Idle`] now and then, so the followers'
//! wait never reaches the collectives' timeout; [`BatchPlan::Stop`] ends the followers cleanly.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_kernels::ops::SeqAttention;

use crate::adapters::registry::AdapterVersion;
use crate::error::{Error, Result};
use crate::model::ForwardInput;

/// What rank 0 tells the other ranks of its group, one per broadcast.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BatchPlan {
    /// Nothing to run now; the group is alive.
    Idle,
    /// Run this forward pass (hidden states, then the logits of its logit rows).
    Forward(ForwardPlan),
    /// The group ends: rank 0 leaves it.
    Stop,
}

/// One forward pass, as [`ForwardInput`] has it, plus each adapter slot's identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForwardPlan {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub slots: Vec<u32>,
    pub seqs: Vec<PlannedSeq>,
    pub adapters: Vec<i32>,
    pub logit_rows: Vec<u32>,
    /// The adapter in each slot, slot order.
    pub adapter_refs: Vec<AdapterRef>,
}

/// One sequence of the batch: [`SeqAttention`]'s fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedSeq {
    pub q_len: usize,
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

/// Which adapter a slot holds: its engine name (the gateway's `tenant:name@version`) and the
/// folder its files are in (the shared blob folder), from which a follower loads it once.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AdapterRef {
    pub name: String,
    pub uri: String,
}

impl ForwardPlan {
    pub fn new(input: &ForwardInput, adapter_refs: Vec<AdapterRef>) -> Self {
        ForwardPlan {
            tokens: input.tokens.clone(),
            positions: input.positions.clone(),
            slots: input.slots.clone(),
            seqs: (input.seqs.iter())
                .map(|s| PlannedSeq { q_len: s.q_len, context_len: s.context_len, block_table: s.block_table.clone() })
                .collect(),
            adapters: input.adapters.clone(),
            logit_rows: input.logit_rows.clone(),
            adapter_refs,
        }
    }

    /// The pass to run.
    pub fn input(&self) -> ForwardInput {
        ForwardInput {
            tokens: self.tokens.clone(),
            positions: self.positions.clone(),
            slots: self.slots.clone(),
            seqs: (self.seqs.iter())
                .map(|s| SeqAttention {
                    q_len: s.q_len,
                    context_len: s.context_len,
                    block_table: s.block_table.clone(),
                })
                .collect(),
            adapters: self.adapters.clone(),
            logit_rows: self.logit_rows.clone(),
        }
    }
}

impl BatchPlan {
    /// The plan as bytes for `broadcast_bytes` (JSON: plans are small next to the pass).
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::Format(format!("batch plan: {e}")))
    }

    pub fn decode(bytes: &[u8]) -> Result<BatchPlan> {
        serde_json::from_slice(bytes).map_err(|e| Error::Format(format!("batch plan from rank 0: {e}")))
    }
}

/// Where an engine that leads a worker group sends the plan of each forward pass, before it
/// runs the pass ([`super::Engine::lead_group`]).
pub trait PlanSink: Send {
    /// `input` is about to run with `adapters` in its slots (slot order).
    fn forward(&mut self, input: &ForwardInput, adapters: &[Arc<AdapterVersion>]) -> Result<()>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_plan_round_trips_through_its_bytes() {
        let input = ForwardInput {
            tokens: vec![5, 6, 7, 9],
            positions: vec![0, 1, 2, 7],
            slots: vec![16, 17, 18, 39],
            seqs: vec![
                SeqAttention { q_len: 3, context_len: 3, block_table: vec![1] },
                SeqAttention { q_len: 1, context_len: 8, block_table: vec![2] },
            ],
            adapters: vec![0, 0, 0, -1],
            logit_rows: vec![2, 3],
        };
        let refs = vec![AdapterRef { name: "alice:a@2".into(), uri: "/blobs/adapters/x".into() }];
        let plan = BatchPlan::Forward(ForwardPlan::new(&input, refs.clone()));
        let back = BatchPlan::decode(&plan.encode().unwrap()).unwrap();
        assert_eq!(back, plan);
        let BatchPlan::Forward(f) = back else { panic!("not a forward plan") };
        let again = f.input();
        assert_eq!((again.tokens, again.positions, again.slots), (input.tokens, input.positions, input.slots));
        assert_eq!((again.adapters, again.logit_rows), (input.adapters, input.logit_rows));
        assert_eq!(again.seqs.len(), 2);
        assert_eq!((again.seqs[1].q_len, again.seqs[1].context_len, &again.seqs[1].block_table), (1, 8, &vec![2]));
        assert_eq!(f.adapter_refs, refs);
        for p in [BatchPlan::Idle, BatchPlan::Stop] {
            assert_eq!(BatchPlan::decode(&p.encode().unwrap()).unwrap(), p);
        }
        assert!(BatchPlan::decode(b"{not a plan").is_err());
    }
}
