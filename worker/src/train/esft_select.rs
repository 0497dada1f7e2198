//! ESFT's choice of experts from the data (ESFT-Token): route the training data through the
//! base model, and in every MoE layer train the experts that together receive at least a share
//! `threshold` of its token assignments, most used first.

use std::collections::BTreeMap;

use super::data::Example;
use super::step::{forward_input, fresh_cache};
use crate::adapters::set::AdapterSet;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::tensor_parallel::Site;

/// Tokens routed per forward pass while counting.
const CHUNK_TOKENS: usize = 4096;

/// Layer -> experts to train, chosen from how often the router picks each expert on `data`.
pub fn select_experts(model: &Model, data: &[Example], threshold: f32) -> Result<BTreeMap<usize, Vec<usize>>> {
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(Error::InvalidRequest(format!("ESFT threshold must be in (0, 1], got {threshold}")));
    }
    let c = &model.config;
    let mut counts: BTreeMap<usize, Vec<u64>> =
        (0..c.num_layers).filter_map(|l| c.moe_at(l).map(|m| (l, vec![0; m.num_experts]))).collect();
    if counts.is_empty() {
        return Err(Error::InvalidRequest("ESFT needs a mixture-of-experts base model".into()));
    }
    let empty = AdapterSet::default();
    let mut start = 0;
    while start < data.len() {
        // As many whole examples as fit in CHUNK_TOKENS (at least one).
        let mut end = start + 1;
        let mut tokens = data[start].tokens.len();
        while end < data.len() && tokens + data[end].tokens.len() <= CHUNK_TOKENS {
            tokens += data[end].tokens.len();
            end += 1;
        }
        let input = forward_input(data[start..end].iter().map(|e| (e, -1)));
        start = end;
        let mut cache = fresh_cache(model, &input)?;
        let mut layer = 0;
        model.hidden_states(&input, &mut cache, &empty, &mut |acts| {
            if let (Some((experts, _)), Some(count)) = (acts.routed_experts(), counts.get_mut(&layer)) {
                experts.iter().for_each(|&e| count[e as usize] += 1);
            }
            layer += 1;
        })?;
    }
    if model.is_expert_parallel() {
        // Each rank routed only its share of the tokens.
        let mut flat: Vec<f32> = counts.values().flatten().map(|&c| c as f32).collect();
        model.sum_over_group(&mut flat, Site::JobSetup)?;
        let mut flat = flat.into_iter();
        counts.values_mut().flatten().for_each(|c| *c = flat.next().unwrap_or(0.0) as u64);
    }
    Ok(counts
        .into_iter()
        .map(|(layer, count)| {
            let total: u64 = count.iter().sum();
            let mut order: Vec<usize> = (0..count.len()).collect();
            order.sort_by_key(|&e| std::cmp::Reverse(count[e]));
            let (mut share, mut chosen) = (0.0, Vec::new());
            for e in order {
                if share >= threshold as f64 {
                    break;
                }
                share += count[e] as f64 / total.max(1) as f64;
                chosen.push(e);
            }
            chosen.sort_unstable();
            (layer, chosen)
        })
        .collect())
}
