//! Fixed batches run straight through the model, for parity checks (tensor-parallel degrees,
//! devices): prompts prefilled together, then greedy decode steps reading the cache, every
//! sequence on its own adapter slot, each step's logits returned; and one training step's
//! adapter gradients. [`mixed_adapters`] gives them adapters of every kind.

use serde_json::json;
use tandem_kernels::ops::{self, SeqAttention, cache_slots};
use tandem_kernels::{DType, Tensor};

use super::weights::Mlp;
use super::{AdapterGrads, ForwardInput, KvCache, Model};
use crate::adapters::esft::{EsftAdapter, ExpertWeights};
use crate::adapters::{Adapter, AdapterSet, LoraAdapter};
use crate::error::{Error, Result};
use crate::rng::Xoshiro256;
use crate::train::data::Example;
use crate::train::step::{TrainSeq, forward_backward};

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

/// Two random adapters (seeded) of `model` (the whole model): a rank-8 LoRA on every linear
/// module, and a rank-4 LoRA on q, v, o and down, or on an MoE model an ESFT adapter that
/// replaces experts 1 and 3 of layer 0 by copies with doubled weights. B is not zero, so every
/// weight has a gradient.
pub fn mixed_adapters(model: &Model) -> Result<Vec<Adapter>> {
    let mut rng = Xoshiro256::seed_from_u64(7);
    let mut lora = |config: serde_json::Value| -> Result<Adapter> {
        Ok(Adapter::Lora(LoraAdapter::init_random(&model.config, config, &mut rng, 0.5)?))
    };
    let mut out = vec![
        lora(json!({"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}))?,
        lora(json!({"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}))?,
    ];
    if let Some(Mlp::Moe(m)) = model.weights.layers.first().map(|l| &l.mlp) {
        let doubled = |t: &Tensor, e: u32| -> Result<Tensor> {
            let w = ops::gather_rows(t, &[e])?.reshape(t.shape()[1..].to_vec())?;
            Ok(ops::add(&w, &w)?)
        };
        let mut experts = std::collections::BTreeMap::new();
        for e in [1, 3] {
            let w = ExpertWeights { gate: doubled(&m.gate, e)?, up: doubled(&m.up, e)?, down: doubled(&m.down, e)? };
            experts.insert((0, e as usize), w);
        }
        out[1] = Adapter::Esft(EsftAdapter { experts });
    }
    Ok(out)
}

/// Gradients by name, flattened, in name order.
pub type NamedGradients = Vec<(String, Vec<f32>)>;

/// One training step's forward and backward over `examples` (example i on adapter slot
/// `slots[i]` of `adapters`, resolved against the whole model: a shard cuts them itself), the
/// loss a mean over all target tokens. Returns each example's summed loss and the adapters'
/// weight gradients (the whole model's), by name in a fixed order, flattened.
pub fn adapter_gradients(
    model: &Model,
    adapters: &[Adapter],
    examples: &[Example],
    slots: &[usize],
) -> Result<(Vec<f64>, NamedGradients)> {
    if examples.len() != slots.len() {
        return Err(Error::InvalidRequest("probe: one slot per example".into()));
    }
    let shards = adapters.iter().map(|a| model.shard_adapter(a)).collect::<Result<Vec<_>>>()?;
    let set = AdapterSet::new(shards, model.device)?;
    let loss_weight = 1.0 / examples.iter().map(Example::loss_tokens).sum::<usize>().max(1) as f32;
    let seqs: Vec<TrainSeq<'_>> =
        examples.iter().zip(slots).map(|(example, &slot)| TrainSeq { example, slot, loss_weight }).collect();
    let mut grads = AdapterGrads::default();
    let losses = forward_backward(model, &set, &seqs, &mut grads)?;
    let mut named = Vec::new();
    for ((layer, proj), (da, dbt)) in grads.lora {
        named.push((format!("layers.{layer}.{proj:?}.lora_a"), da.to_vec_f32()?));
        named.push((format!("layers.{layer}.{proj:?}.lora_bt"), dbt.to_vec_f32()?));
    }
    for ((layer, proj), dw) in grads.esft {
        named.push((format!("layers.{layer}.{proj:?}.esft"), dw.to_vec_f32()?));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((losses, named))
}
