//! Tensor parallelism, Megatron-LM's split: each rank of a group holds a slice of every large
//! weight and the forward pass exchanges only what the split makes partial.
//!
//! - q, k, v, gate, up (and each expert's gate and up) are column-parallel: a rank holds the
//!   output rows of its attention heads or its share of the intermediate size, so their outputs
//!   need no communication.
//! - o and down are row-parallel: a rank holds the matching input columns, so its output is a
//!   partial sum; one all-reduce after each (the MoE block's partial experts and shared expert
//!   are summed by the same one).
//! - The embedding and the LM head are vocabulary-parallel: a rank holds a range of vocabulary
//!   rows; the embedding lookup is an all-reduce (a token's row is on one rank, zeros
//!   elsewhere) and the logits are all-gathered.
//! - Grouped-query attention with fewer KV heads than ranks keeps, on each rank, the one KV head
//!   its query heads read (KV heads replicated).
//! - Norms, biases of column-parallel layers (sliced with them) and the MoE router are
//!   replicated; a row-parallel bias is added once, by rank 0.
//!
//! Not yet: LoRA and ESFT adapters under tensor parallelism, the backward pass, and expert
//! parallelism (experts spread over ranks with all-to-all dispatch).

use std::ops::Range;
use std::sync::Arc;

use tandem_kernels::Tensor;

use super::Model;
use super::weights::{DenseMlp, Layer, Linear, Mlp, MoeMlp, Weights};
use crate::collective::Collective;
use crate::error::{Error, Result};

/// A model's place in a tensor-parallel group.
#[derive(Clone)]
pub struct TensorParallel {
    pub comm: Arc<dyn Collective>,
    /// The vocabulary rows this rank's embedding and LM head hold.
    pub vocab: Range<usize>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        write!(f, "TensorParallel {{ rank: {rank}, world: {world}, vocab: {:?} }}", self.vocab)
    }
}

/// `len` split into `parts` contiguous ranges, the first `len % parts` one longer.
fn split(len: usize, parts: usize, i: usize) -> Range<usize> {
    let (base, extra) = (len / parts, len % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// Rows (`axis` 0) or columns (`axis` 1, of a 2-D tensor), or the middle or last axis of a 3-D
/// stack, `range` of `t`. Done once when a model is split, on the host.
fn slice(t: &Tensor, axis: usize, range: Range<usize>) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    let data = t.to_vec_f32()?;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * range.len() * inner);
    for o in 0..outer {
        let base = o * shape[axis] * inner;
        out.extend_from_slice(&data[base + range.start * inner..base + range.end * inner]);
    }
    let mut new_shape = shape;
    new_shape[axis] = range.len();
    Ok(Tensor::from_vec(out, new_shape)?.into_dtype(t.dtype())?.to_device(t.device())?)
}

fn column_parallel(lin: &Linear, rows: Range<usize>) -> Result<Linear> {
    Ok(Linear {
        weight: slice(&lin.weight, 0, rows.clone())?,
        bias: lin.bias.as_ref().map(|b| slice(b, 0, rows)).transpose()?,
    })
}

fn row_parallel(lin: &Linear, cols: Range<usize>, first: bool) -> Result<Linear> {
    Ok(Linear { weight: slice(&lin.weight, 1, cols)?, bias: if first { lin.bias.clone() } else { None } })
}

fn dense_mlp(m: &DenseMlp, inter: Range<usize>, first: bool) -> Result<DenseMlp> {
    Ok(DenseMlp {
        gate: column_parallel(&m.gate, inter.clone())?,
        up: column_parallel(&m.up, inter.clone())?,
        down: row_parallel(&m.down, inter, first)?,
    })
}

impl Model {
    /// This (whole) model's shard for rank `comm.rank()` of a tensor-parallel group of
    /// `comm.world_size()` ranks. Attention heads and intermediate sizes must divide evenly;
    /// the vocabulary need not.
    pub fn shard(&self, comm: Arc<dyn Collective>) -> Result<Model> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let c = &self.config;
        if self.tp.is_some() {
            return Err(Error::InvalidRequest("this model is a shard already".into()));
        }
        let bad = |what: &str, n: usize| {
            Error::Unsupported(format!("tensor parallelism of degree {world}: {what} ({n}) must divide evenly"))
        };
        if world == 0 || !c.num_heads.is_multiple_of(world) {
            return Err(bad("attention heads", c.num_heads));
        }
        if !c.intermediate_size.is_multiple_of(world) {
            return Err(bad("the intermediate size", c.intermediate_size));
        }
        let heads = c.num_heads / world;
        let group = c.num_heads / c.num_kv_heads;
        // The KV heads this rank's query heads read: several when there are at least as many KV
        // heads as ranks, else the one (replicated) KV head of its query heads' group.
        let first_kv = rank * heads / group;
        let kv_heads = (c.num_kv_heads / world).max(1);
        let kv_fits =
            if c.num_kv_heads >= world { c.num_kv_heads.is_multiple_of(world) } else { group.is_multiple_of(heads) };
        if !kv_fits {
            return Err(bad("KV heads", c.num_kv_heads));
        }
        let d = c.head_dim;
        let q_rows = rank * heads * d..(rank + 1) * heads * d;
        let kv_rows = first_kv * d..(first_kv + kv_heads) * d;
        let inter = split(c.intermediate_size, world, rank);
        let mut config = c.clone();
        config.num_heads = heads;
        config.num_kv_heads = kv_heads;
        config.intermediate_size = inter.len();
        if let Some(moe) = &mut config.moe {
            if !moe.expert_intermediate.is_multiple_of(world) {
                return Err(bad("the expert intermediate size", moe.expert_intermediate));
            }
            moe.expert_intermediate /= world;
            if let Some(s) = &mut moe.shared_expert_intermediate {
                if !s.is_multiple_of(world) {
                    return Err(bad("the shared expert's intermediate size", *s));
                }
                *s /= world;
            }
        }
        let first = rank == 0;
        let layers = (self.weights.layers.iter().enumerate())
            .map(|(l, layer)| {
                let mlp = match &layer.mlp {
                    Mlp::Dense(m) => Mlp::Dense(dense_mlp(m, inter.clone(), first)?),
                    Mlp::Moe(m) => {
                        let moe = c
                            .moe_at(l)
                            .ok_or_else(|| Error::Format(format!("layer {l}: experts without MoE config")))?;
                        let e_inter = split(moe.expert_intermediate, world, rank);
                        let shared = match &m.shared {
                            Some((mlp, gate)) => {
                                let s = split(moe.shared_expert_intermediate.unwrap_or(0), world, rank);
                                Some((dense_mlp(mlp, s, first)?, gate.clone()))
                            }
                            None => None,
                        };
                        Mlp::Moe(MoeMlp {
                            router: m.router.clone(),
                            gate: slice(&m.gate, 1, e_inter.clone())?,
                            up: slice(&m.up, 1, e_inter.clone())?,
                            down: slice(&m.down, 2, e_inter)?,
                            shared,
                        })
                    }
                };
                Ok(Layer {
                    input_norm: layer.input_norm.clone(),
                    post_attention_norm: layer.post_attention_norm.clone(),
                    q: column_parallel(&layer.q, q_rows.clone())?,
                    k: column_parallel(&layer.k, kv_rows.clone())?,
                    v: column_parallel(&layer.v, kv_rows.clone())?,
                    o: row_parallel(&layer.o, q_rows.clone(), first)?,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab = split(c.vocab_size, world, rank);
        let weights = Weights {
            embed: slice(&self.weights.embed, 0, vocab.clone())?,
            layers,
            norm: self.weights.norm.clone(),
            lm_head: self.weights.lm_head.as_ref().map(|h| slice(h, 0, vocab.clone())).transpose()?,
        };
        Ok(Model {
            config,
            weights,
            rope: self.rope.clone(),
            device: self.device,
            tp: Some(TensorParallel { comm, vocab }),
        })
    }

    /// The sum over the group of a row-parallel output (itself without tensor parallelism).
    pub(super) fn all_reduce(&self, t: Tensor) -> Result<Tensor> {
        let Some(tp) = &self.tp else { return Ok(t) };
        let shape = t.shape().to_vec();
        let mut data = t.to_vec_f32()?;
        tp.comm.all_reduce_sum(&mut data).map_err(|e| Error::Collective(e.to_string()))?;
        Ok(Tensor::from_vec(data, shape)?.to_device(self.device)?)
    }

    /// `tokens`' embeddings: with the vocabulary split, each rank looks up the tokens in its
    /// range (zeros for the others) and the group sums them.
    pub(super) fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        use tandem_kernels::ops;
        let Some(tp) = &self.tp else { return Ok(ops::embedding(&self.weights.embed, tokens)?) };
        let (start, end) = (tp.vocab.start as u32, tp.vocab.end as u32);
        let local: Vec<u32> = tokens.iter().map(|&t| if (start..end).contains(&t) { t - start } else { 0 }).collect();
        let mask: Vec<f32> = tokens.iter().map(|t| if (start..end).contains(t) { 1.0 } else { 0.0 }).collect();
        let rows = ops::embedding(&self.weights.embed, &local)?;
        let mask = Tensor::from_vec(mask, [tokens.len()])?.to_device(self.device)?;
        self.all_reduce(ops::scale_rows(&rows, &mask)?)
    }

    /// Logits over the whole vocabulary from this rank's columns `local`, `[rows, vocab range]`.
    pub(super) fn gather_logits(&self, local: Tensor) -> Result<Tensor> {
        let Some(tp) = &self.tp else { return Ok(local) };
        let rows = local.shape()[0];
        let gathered = tp.comm.all_gather(&local.to_vec_f32()?).map_err(|e| Error::Collective(e.to_string()))?;
        // Rank-major [rank][row][its columns] into row-major [row][vocab].
        let world = tp.comm.world_size();
        let vocab = self.config.vocab_size;
        let mut out = vec![0.0f32; rows * vocab];
        let mut at = 0;
        for r in 0..world {
            let cols = split(vocab, world, r);
            for row in 0..rows {
                out[row * vocab + cols.start..row * vocab + cols.end].copy_from_slice(&gathered[at..at + cols.len()]);
                at += cols.len();
            }
        }
        Ok(Tensor::from_vec(out, [rows, vocab])?.to_device(self.device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn splits_cover_the_range_in_order() {
        for (len, parts) in [(10, 3), (512, 4), (7, 7), (3, 4)] {
            let ranges: Vec<_> = (0..parts).map(|i| split(len, parts, i)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[parts - 1].end, len);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            assert!(ranges.iter().all(|r| r.len() == len / parts || r.len() == len / parts + 1));
        }
    }
}
