//! One forward and backward pass over a padding-free batch of training sequences, each with its
//! adapter slot and the weight its tokens' losses carry (how its job normalizes its loss).

use tandem_kernels::DType;
use tandem_kernels::ops::{SeqAttention, cache_slots};

use super::data::Example;
use crate::adapters::set::AdapterSet;
use crate::error::Result;
use crate::model::{AdapterGrads, ForwardInput, KvCache, LossRows, Model};

/// Cache block size of a training batch's own KV cache.
const BLOCK: usize = 16;

/// A sequence of a training batch.
#[derive(Clone, Copy, Debug)]
pub struct TrainSeq<'a> {
    pub example: &'a Example,
    /// Its adapter's slot in the [`AdapterSet`].
    pub slot: usize,
    /// What each of its loss tokens counts in the total loss (1 / the job's loss tokens per
    /// optimizer step, for a per-job mean).
    pub loss_weight: f32,
}

/// Runs `seqs` forward and backward in one batch, adding the adapters' weight gradients of
/// `Σ loss_weight · token loss` into `grads`. Returns each sequence's summed token loss.
pub fn forward_backward(
    model: &Model,
    adapters: &AdapterSet,
    seqs: &[TrainSeq<'_>],
    grads: &mut AdapterGrads,
) -> Result<Vec<f64>> {
    let (input, rows) = pack(seqs);
    let mut cache = fresh_cache(model, &input)?;
    let losses = model.train_pass(&input, &mut cache, adapters, &rows, grads)?;
    Ok(per_sequence(seqs, &losses))
}

/// Each sequence's summed token loss, without the backward pass (validation).
pub fn evaluate(model: &Model, adapters: &AdapterSet, seqs: &[TrainSeq<'_>]) -> Result<Vec<f64>> {
    let (input, rows) = pack(seqs);
    let mut cache = fresh_cache(model, &input)?;
    let losses = model.pass_losses(&input, &mut cache, adapters, &rows.targets)?;
    Ok(per_sequence(seqs, &losses))
}

/// The batch as one forward input, all of whose rows fine-tune, with their targets and loss
/// weights.
fn pack(seqs: &[TrainSeq<'_>]) -> (ForwardInput, LossRows) {
    let input = forward_input(seqs.iter().map(|s| (s.example, s.slot as i32)));
    let mut rows = LossRows::default();
    for s in seqs {
        rows.targets.extend_from_slice(&s.example.targets);
        rows.loss_weights.extend(s.example.targets.iter().map(|&t| if t >= 0 { s.loss_weight } else { 0.0 }));
    }
    (input, rows)
}

/// Whole sequences (with their adapter slots) as one forward input over a fresh cache: each
/// sequence in its own blocks, all of its tokens new. [`fresh_cache`] makes that cache.
pub(super) fn forward_input<'a>(seqs: impl Iterator<Item = (&'a Example, i32)>) -> ForwardInput {
    let mut input = ForwardInput::default();
    let mut next_block = 0u32;
    for (example, slot) in seqs {
        let len = example.tokens.len();
        let blocks = len.div_ceil(BLOCK) as u32;
        let seq =
            SeqAttention { q_len: len, context_len: len, block_table: (next_block..next_block + blocks).collect() };
        next_block += blocks;
        input.slots.extend(cache_slots(&seq, BLOCK));
        input.seqs.push(seq);
        input.tokens.extend_from_slice(&example.tokens);
        input.positions.extend(0..len as u32);
        input.adapters.extend(std::iter::repeat_n(slot, len));
    }
    input
}

/// The KV cache a [`forward_input`] batch writes.
pub(super) fn fresh_cache(model: &Model, input: &ForwardInput) -> Result<KvCache> {
    let blocks = input.seqs.iter().map(|s| s.block_table.len()).sum();
    KvCache::new(model, blocks, BLOCK, DType::F32)
}

fn per_sequence(seqs: &[TrainSeq<'_>], losses: &[f32]) -> Vec<f64> {
    let mut start = 0;
    seqs.iter()
        .map(|s| {
            let len = s.example.tokens.len();
            let sum = losses[start..start + len].iter().map(|&l| l as f64).sum();
            start += len;
            sum
        })
        .collect()
}
