//! A fixed batch run straight through the model, for parity checks (tensor-parallel degrees,
//! devices): prompts prefilled together, then greedy decode steps reading the cache, every
//! sequence on its own adapter slot; each step's logits returned.

use tandem_kernels::ops::{SeqAttention, cache_slots};
use tandem_kernels::{DType, Tensor};

use super::{ForwardInput, KvCache, Model};
use crate::adapters::AdapterSet;
use crate::error::{Error, Result};

const BLOCK: usize = 4;

/// Prefills `prompts` (sequence i on adapter slot `slots[i]`, -1 the base) and decodes `steps`
/// greedy tokens; returns the logits of each step, `[sequences, vocab]` flattened.
pub fn greedy_logits(
    model: &Model,
    adapters: &AdapterSet,
    prompts: &[Vec<u32>],
    slots: &[i32],
    steps: usize,
) -> Result<Vec<Vec<f32>>> {
    if prompts.len() != slots.len() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::InvalidRequest("probe: one non-empty prompt and one slot per sequence".into()));
    }
    let blocks = |len: usize| (len + steps).div_ceil(BLOCK);
    let total: usize = prompts.iter().map(|p| blocks(p.len())).sum();
    let mut cache = KvCache::new(model, total, BLOCK, DType::F32)?;
    let mut tables = Vec::new();
    let mut next_block = 0u32;
    for p in prompts {
        let n = blocks(p.len()) as u32;
        tables.push((next_block..next_block + n).collect::<Vec<u32>>());
        next_block += n;
    }
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = Vec::new();
    for step in 0..=steps {
        let mut input = ForwardInput::default();
        for ((seq, table), &slot) in seqs.iter().zip(&tables).zip(slots) {
            // The prompt first, then one new token per step.
            let new = if step == 0 { seq.len() } else { 1 };
            let attention = SeqAttention { q_len: new, context_len: seq.len(), block_table: table.clone() };
            let all = cache_slots(&attention, BLOCK);
            input.slots.extend(&all[seq.len() - new..]);
            input.seqs.push(attention);
            input.tokens.extend(&seq[seq.len() - new..]);
            input.positions.extend((seq.len() - new) as u32..seq.len() as u32);
            input.adapters.extend(std::iter::repeat_n(slot, new));
            input.logit_rows.push(input.tokens.len() as u32 - 1);
        }
        let logits: Tensor = model.forward(&input, &mut cache, adapters)?;
        let logits = logits.to_vec_f32()?;
        let vocab = model.config.vocab_size;
        for (i, seq) in seqs.iter_mut().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let best = (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap_or(0);
            seq.push(best as u32);
        }
        out.push(logits);
    }
    Ok(out)
}
