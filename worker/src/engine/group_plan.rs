//! The plans of a worker group. Rank 0 runs the engine's scheduler; before each model call
//! that holds collectives it broadcasts what the call is, so every other rank makes the same
//! calls in the same order on its shard: a forward pass (the batch's tokens, positions,
//! KV-cache slots, each sequence's block table, each token's adapter slot, the rows whose logits
//! are wanted, and which rows are fine-tuning rows, whose loss and backward follow), some layers
//! of a fine-tuning backward pass, or a validation pass. Adapters are named by version id: an
//! uploaded one by the folder the followers read it from, a fine-tuning job's by its weights,
//! sent once, when a plan first uses them. When rank 0 has nothing to run it sends
//! [`BatchPlan::Idle`] now and then, so the followers' wait never reaches the collectives'
//! timeout; [`BatchPlan::Stop`] ends the followers cleanly.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_kernels::ops::SeqAttention;

use crate::adapters::Adapter;
use crate::adapters::registry::AdapterVersion;
use crate::error::{Error, Result};
use crate::model::{ForwardInput, LossRows};
use crate::train::data::Example;

/// What rank 0 tells the other ranks of its group, one per broadcast.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BatchPlan {
    /// Nothing to run now; the group is alive.
    Idle,
    /// Adapter version `id`'s weights come as the next broadcast: its tensors' f32 values in
    /// [`Adapter::weights`] order, laid out as `layout` says, for the whole model.
    Weights { id: u64, layout: Layout },
    /// Run this forward pass (hidden states, then the logits of its logit rows, then the loss
    /// of its fine-tuning rows).
    Forward(Box<ForwardPlan>),
    /// Run `layers` more layers of the backward pass of fine-tuning rows `id`.
    Backward { id: u64, layers: usize },
    /// The mean loss of an adapter on examples (a job's validation).
    Validate { adapter: AdapterRef, examples: Vec<Example> },
    /// A new ESFT job chooses its experts: route `examples` through the base model.
    SelectExperts { threshold: f32, examples: Vec<Example> },
    /// A new ESFT job copies these experts (layer -> ids) from the base.
    BaseExperts { experts: BTreeMap<usize, Vec<usize>> },
    /// The group ends: rank 0 leaves it.
    Stop,
}

/// How a job's adapter is laid out, for the weights that follow a [`BatchPlan::Weights`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Layout {
    /// A LoRA adapter as its `adapter_config.json` makes it.
    Lora(serde_json::Value),
    /// ESFT replacements of these (layer, expert) pairs.
    Esft(Vec<(usize, usize)>),
}

impl Layout {
    pub fn of(adapter: &Adapter) -> Layout {
        match adapter {
            Adapter::Lora(a) => Layout::Lora(a.config.clone()),
            Adapter::Esft(e) => Layout::Esft(e.experts.keys().copied().collect()),
        }
    }
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
    /// The fine-tuning rows at the end of the batch, if any.
    pub training: Option<TrainingRows>,
    /// Adapter versions no plan will use again (rank 0 dropped them).
    pub forget: Vec<u64>,
    /// The W3C `traceparent` of each traced request in the pass: the other ranks record their
    /// part of the pass in those traces.
    pub traces: Vec<String>,
}

/// The fine-tuning rows of a forward pass. Their loss and the start of their backward follow
/// the pass; [`BatchPlan::Backward`] runs the rest under `id`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingRows {
    pub id: u64,
    #[serde(flatten)]
    pub rows: LossRows,
}

/// One sequence of the batch: [`SeqAttention`]'s fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedSeq {
    pub q_len: usize,
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

/// An adapter version: its id (unique over rank 0's registry), its engine name, and the
/// folder its files are in when it was uploaded (empty for a job's weights, sent in a
/// [`BatchPlan::Weights`] before the first plan that uses them).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AdapterRef {
    pub id: u64,
    pub name: String,
    pub uri: String,
}

impl ForwardPlan {
    pub fn new(input: &ForwardInput, adapter_refs: Vec<AdapterRef>, training: Option<TrainingRows>) -> Self {
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
            training,
            forget: Vec::new(),
            traces: Vec::new(),
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
            // Rank 0 alone pools embeddings.
            embed_rows: Vec::new(),
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

/// An adapter's weights as the bytes that follow a [`BatchPlan::Weights`].
pub fn weight_bytes(adapter: &Adapter) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for (_, t) in adapter.weights() {
        bytes.extend(t.to_vec_f32()?.iter().flat_map(|v| v.to_le_bytes()));
    }
    Ok(bytes)
}

/// Where an engine that leads a worker group sends its plans, each before the call it
/// describes ([`super::Engine::lead_group`]).
pub trait PlanSink: Send {
    /// `input` is about to run with `adapters` in its slots (slot order); `training` says which
    /// rows are fine-tuning rows; `traces` are its requests' trace contexts (`traceparent`).
    fn forward(
        &mut self,
        input: &ForwardInput,
        adapters: &[Arc<AdapterVersion>],
        training: Option<TrainingRows>,
        traces: &[String],
    ) -> Result<()>;
    /// `layers` more layers of fine-tuning rows `id`'s backward pass are about to run.
    fn backward(&mut self, id: u64, layers: usize) -> Result<()>;
    /// `adapter`'s mean loss on `examples` is about to be computed.
    fn validate(&mut self, adapter: &Arc<AdapterVersion>, examples: &[Example]) -> Result<()>;
    /// A fine-tuning job published version `v`, whose weights for the whole model are `whole`
    /// (the version holds this shard's cut): what the followers get when a plan first uses it.
    fn published(&mut self, v: &Arc<AdapterVersion>, whole: Adapter);
    /// A new ESFT job is about to choose its experts from `examples` (`threshold` of the
    /// routed tokens).
    fn select_experts(&mut self, threshold: f32, examples: &[Example]) -> Result<()>;
    /// A new ESFT job is about to copy `experts` from the base.
    fn base_experts(&mut self, experts: &BTreeMap<usize, Vec<usize>>) -> Result<()>;
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
            embed_rows: Vec::new(),
        };
        let refs = vec![AdapterRef { id: 7, name: "alice:a@2".into(), uri: "/blobs/adapters/x".into() }];
        let rows = LossRows { first_row: 3, first_seq: 1, targets: vec![9], loss_weights: vec![0.5] };
        let training = TrainingRows { id: 3, rows };
        let plan = BatchPlan::Forward(Box::new(ForwardPlan::new(&input, refs.clone(), Some(training.clone()))));
        let back = BatchPlan::decode(&plan.encode().unwrap()).unwrap();
        assert_eq!(back, plan);
        let BatchPlan::Forward(f) = back else { panic!("not a forward plan") };
        let again = f.input();
        assert_eq!((again.tokens, again.positions, again.slots), (input.tokens, input.positions, input.slots));
        assert_eq!((again.adapters, again.logit_rows), (input.adapters, input.logit_rows));
        assert_eq!(again.seqs.len(), 2);
        assert_eq!((again.seqs[1].q_len, again.seqs[1].context_len, &again.seqs[1].block_table), (1, 8, &vec![2]));
        let tail = f.input().tail(3, 1);
        assert_eq!((f.adapter_refs, f.training), (refs, Some(training)));
        assert_eq!((tail.tokens, tail.positions, tail.slots, tail.adapters), (vec![9], vec![7], vec![39], vec![-1]));
        assert_eq!((tail.seqs.len(), tail.logit_rows.len()), (1, 0));
        for p in [BatchPlan::Idle, BatchPlan::Stop, BatchPlan::Backward { id: 3, layers: 2 }] {
            assert_eq!(BatchPlan::decode(&p.encode().unwrap()).unwrap(), p);
        }
        assert!(BatchPlan::decode(b"{not a plan").is_err());
    }
}
