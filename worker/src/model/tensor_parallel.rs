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
//! - LoRA follows its base layer as S-LoRA has it: B sliced by output rows on a column-parallel
//!   layer (A replicated), A sliced by input columns on a row-parallel one (B replicated); the
//!   row-parallel delta `(x_r Aᵣᵀ) Bᵀ` is a partial sum, added up by the all-reduce the base
//!   output takes anyway, so adapters cost no communication of their own. ESFT experts are
//!   sliced as the base experts they replace.
//!
//! - Training: the backward pass adds one all-reduce per block (the input gradient after the
//!   column-parallel projections, `backward.rs`), the loss is vocabulary-parallel
//!   (`Model::vocab_parallel_cross_entropy`), and the adapters' gradients are gathered whole
//!   on every rank (`Model::gather_grads`), so jobs keep whole adapters and step alike.
//! - With [`MoeSplit::Experts`], a MoE layer's experts are not sliced but spread over the ranks
//!   whole (expert parallelism, `expert_parallel.rs`).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tandem_kernels::ops::Rope;
use tandem_kernels::{DType, Device, Tensor};

use super::backward::AdapterGrads;
use super::weights::{DenseMlp, Layer, Linear, Mlp, MoeMlp, Weights, load_weights_cut, open_checkpoint};
use super::{Model, ModelConfig};
use crate::adapters::esft::ExpertWeights;
use crate::adapters::{Adapter, AdapterSet, ModuleKey, Proj};
use crate::collective::{Collective, CollectiveError};
use crate::error::{Error, Result};

/// A model's place in a tensor-parallel group.
#[derive(Clone)]
pub struct TensorParallel {
    pub comm: Arc<dyn Collective>,
    /// What this rank holds of each split dimension.
    pub split: Split,
    /// The whole model's configuration (the shard's own has its local sizes).
    pub whole: Arc<ModelConfig>,
    /// Bytes this rank sent, by where in the model.
    pub traffic: Arc<Mutex<Traffic>>,
}

/// Where in the model a collective runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Site {
    /// The vocabulary-parallel embedding lookup (an all-reduce).
    Embedding,
    /// After o, the attention block's row-parallel output (an all-reduce per layer).
    Attention,
    /// After down, the MLP or MoE block's output (an all-reduce per layer).
    Mlp,
    /// The logits' all-gather.
    Logits,
    /// Training: the vocabulary-parallel cross-entropy (per-row maxima and sums) and the
    /// all-reduce of its gradient w.r.t. the hidden states.
    Loss,
    /// Backward: the all-reduce of the gradient of the MLP block's input (after gate and up).
    MlpBackward,
    /// Backward: the all-reduce of the gradient of the attention block's input (after q, k, v).
    AttentionBackward,
    /// Training: the all-reduce that gathers the adapters' weight gradients.
    Gradients,
    /// Expert parallelism: the all-to-alls that carry (token, expert) pairs to the experts'
    /// ranks and their outputs back.
    Experts,
    /// Expert parallelism, backward: the all-to-alls of the pairs' output and input gradients.
    ExpertsBackward,
    /// Training under expert parallelism: the all-gather of the (adapter, expert) pairs each
    /// rank's ESFT tables hold, which lays out the whole set's ESFT gradients.
    GradientLayout,
    /// Fine-tuning set-up: an ESFT job's expert choice (routing counts, under expert
    /// parallelism) and base experts, assembled from the ranks' shares.
    JobSetup,
}

/// Bytes sent at each [`Site`], and the tokens and logit rows of the passes counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes: std::collections::BTreeMap<Site, u64>,
    pub tokens: u64,
    pub logit_rows: u64,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        write!(f, "TensorParallel {{ rank: {rank}, world: {world}, split: {:?} }}", self.split)
    }
}

/// One rank's weights of a model, not yet joined to its group ([`Model::cut`],
/// [`Model::load_shard`]).
pub struct Shard {
    rank: usize,
    world: usize,
    whole: ModelConfig,
    split: Split,
    weights: Weights,
    rope: Rope,
    device: Device,
}

impl Shard {
    /// The shard as a model whose collectives go over `comm`, which must be the group (rank and
    /// size) the shard was cut for.
    pub fn join(self, comm: Arc<dyn Collective>) -> Result<Model> {
        let (rank, world) = (self.rank, self.world);
        if (comm.rank(), comm.world_size()) != (rank, world) {
            return Err(Error::InvalidRequest(format!(
                "a shard of rank {rank} of {world} cannot join as rank {} of {}",
                comm.rank(),
                comm.world_size()
            )));
        }
        let Shard { whole, split, weights, rope, device, .. } = self;
        let config = split.shard_config(&whole);
        let tp = TensorParallel { comm, split, whole: Arc::new(whole), traffic: Arc::default() };
        Ok(Model { config, weights, rope, device, tp: Some(tp) })
    }
}

/// The ranges of the whole model's dimensions that one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Rank 0 adds the row-parallel biases.
    pub first: bool,
    /// Output rows of q (its attention heads), and the matching input columns of o.
    pub q: Range<usize>,
    /// Output rows of k and v (the KV heads its query heads read).
    pub kv: Range<usize>,
    /// The dense MLP's intermediate units.
    pub inter: Range<usize>,
    /// Each expert's intermediate units (all of them under expert parallelism), and the
    /// shared expert's (MoE models).
    pub expert_inter: Range<usize>,
    /// Under expert parallelism, the experts this rank holds (whole), of every MoE layer.
    pub experts: Option<Range<usize>>,
    pub shared_inter: Range<usize>,
    /// Vocabulary rows of the embedding and the LM head.
    pub vocab: Range<usize>,
}

/// How a group splits the experts of a MoE model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeSplit {
    /// Tensor parallelism inside every expert: each rank holds a slice of each expert's
    /// intermediate units, like a dense MLP's (no token moves).
    #[default]
    Intermediate,
    /// Expert parallelism: each rank holds `num_experts / world` whole experts; every rank
    /// routes its share of the tokens and an all-to-all carries each (token, expert) pair, with
    /// its adapter slot, to the expert's rank and its output back (`expert_parallel.rs`).
    Experts,
}

impl Split {
    /// Rank `rank`'s share of a model of `c` on `world` ranks. Attention heads and
    /// intermediate sizes (or, with [`MoeSplit::Experts`], the experts) must divide evenly;
    /// the vocabulary need not.
    pub fn new(c: &ModelConfig, rank: usize, world: usize, moe: MoeSplit) -> Result<Split> {
        let bad = |what: &str, n: usize| {
            Error::Unsupported(format!("tensor parallelism of degree {world}: {what} ({n}) must divide evenly"))
        };
        if world == 0 || rank >= world || !c.num_heads.is_multiple_of(world) {
            return Err(bad("attention heads", c.num_heads));
        }
        let num_experts = c.moe.as_ref().map_or(0, |m| m.num_experts);
        let by_experts = moe == MoeSplit::Experts && c.moe.is_some();
        let expert_inter = c.moe.as_ref().map_or(0, |m| m.expert_intermediate);
        let sizes = [
            ("the intermediate size", c.intermediate_size),
            if by_experts {
                ("the number of experts", num_experts)
            } else {
                ("the expert intermediate size", expert_inter)
            },
            (
                "the shared expert's intermediate size",
                c.moe.as_ref().and_then(|m| m.shared_expert_intermediate).unwrap_or(0),
            ),
        ];
        if let Some((what, n)) = sizes.iter().find(|(_, n)| !n.is_multiple_of(world)) {
            return Err(bad(what, *n));
        }
        let heads = c.num_heads / world;
        let q_per_kv = c.num_heads / c.num_kv_heads;
        // The KV heads this rank's query heads read: several when there are at least as many KV
        // heads as ranks, else the one (replicated) KV head its query heads share.
        let kv_heads = (c.num_kv_heads / world).max(1);
        let kv_fits =
            if c.num_kv_heads >= world { c.num_kv_heads.is_multiple_of(world) } else { q_per_kv.is_multiple_of(heads) };
        if !kv_fits {
            return Err(bad("KV heads", c.num_kv_heads));
        }
        let (d, first_kv) = (c.head_dim, rank * heads / q_per_kv);
        Ok(Split {
            first: rank == 0,
            q: rank * heads * d..(rank + 1) * heads * d,
            kv: first_kv * d..(first_kv + kv_heads) * d,
            inter: split(c.intermediate_size, world, rank),
            expert_inter: if by_experts { 0..expert_inter } else { split(expert_inter, world, rank) },
            experts: by_experts.then(|| split(num_experts, world, rank)),
            shared_inter: split(sizes[2].1, world, rank),
            vocab: split(c.vocab_size, world, rank),
        })
    }

    /// How a module of projection `proj` is split: `Some((true, r))` column-parallel (its output
    /// rows `r`), `Some((false, r))` row-parallel (its input columns `r`), `None` replicated.
    /// `expert`: whether the module is one expert's.
    fn of(&self, proj: Proj, expert: bool) -> Option<(bool, Range<usize>)> {
        let mlp = if expert { &self.expert_inter } else { &self.inter };
        if expert && self.experts.is_some() {
            // Whole experts, on their own rank.
            return None;
        }
        match proj {
            Proj::Q => Some((true, self.q.clone())),
            Proj::K | Proj::V => Some((true, self.kv.clone())),
            Proj::O => Some((false, self.q.clone())),
            Proj::Gate | Proj::Up => Some((true, mlp.clone())),
            Proj::Down => Some((false, mlp.clone())),
            Proj::SharedGate | Proj::SharedUp => Some((true, self.shared_inter.clone())),
            Proj::SharedDown => Some((false, self.shared_inter.clone())),
            Proj::Router | Proj::SharedExpertGate => None,
        }
    }
}

/// The projections of an ESFT expert, in the order its gradients travel.
const ESFT_PROJS: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

/// `len` split into `parts` contiguous ranges, the first `len % parts` one longer.
pub(super) fn split(len: usize, parts: usize, i: usize) -> Range<usize> {
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

/// The inverse of [`slice`]: `t` placed at `range` of `axis` in zeros `full` long there. The
/// gradients of a shard's slices go back into the whole model's shapes this way.
fn widen(t: &Tensor, axis: usize, range: Range<usize>, full: usize) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    let data = t.to_vec_f32()?;
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = vec![0.0; shape[..axis].iter().product::<usize>() * full * inner];
    for (o, part) in data.chunks_exact((range.len() * inner).max(1)).enumerate() {
        out[(o * full + range.start) * inner..][..part.len()].copy_from_slice(part);
    }
    let mut new_shape = shape;
    new_shape[axis] = full;
    Ok(Tensor::from_vec(out, new_shape)?.to_device(t.device())?)
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

impl Split {
    /// This rank's rows of the embedding or the LM head.
    pub(super) fn vocab_rows(&self, t: &Tensor) -> Result<Tensor> {
        slice(t, 0, self.vocab.clone())
    }

    /// The configuration of a shard of a model of `c`: its local head counts and sizes.
    fn shard_config(&self, c: &ModelConfig) -> ModelConfig {
        let mut config = c.clone();
        config.num_heads = self.q.len() / c.head_dim;
        config.num_kv_heads = self.kv.len() / c.head_dim;
        config.intermediate_size = self.inter.len();
        if let Some(moe) = &mut config.moe {
            moe.expert_intermediate = self.expert_inter.len();
            if let Some(s) = &mut moe.shared_expert_intermediate {
                *s = self.shared_inter.len();
            }
        }
        config
    }

    /// This rank's share of one decoder layer.
    pub(super) fn layer(&self, layer: &Layer) -> Result<Layer> {
        let mlp = match &layer.mlp {
            Mlp::Dense(m) => Mlp::Dense(dense_mlp(m, self.inter.clone(), self.first)?),
            Mlp::Moe(m) => Mlp::Moe(MoeMlp {
                router: m.router.clone(),
                // Whole experts of this rank, or every expert's slice.
                gate: match &self.experts {
                    Some(experts) => slice(&m.gate, 0, experts.clone())?,
                    None => slice(&m.gate, 1, self.expert_inter.clone())?,
                },
                up: match &self.experts {
                    Some(experts) => slice(&m.up, 0, experts.clone())?,
                    None => slice(&m.up, 1, self.expert_inter.clone())?,
                },
                down: match &self.experts {
                    Some(experts) => slice(&m.down, 0, experts.clone())?,
                    None => slice(&m.down, 2, self.expert_inter.clone())?,
                },
                shared: match &m.shared {
                    Some((mlp, gate)) => Some((dense_mlp(mlp, self.shared_inter.clone(), self.first)?, gate.clone())),
                    None => None,
                },
            }),
        };
        Ok(Layer {
            input_norm: layer.input_norm.clone(),
            post_attention_norm: layer.post_attention_norm.clone(),
            q: column_parallel(&layer.q, self.q.clone())?,
            k: column_parallel(&layer.k, self.kv.clone())?,
            v: column_parallel(&layer.v, self.kv.clone())?,
            o: row_parallel(&layer.o, self.q.clone(), self.first)?,
            mlp,
        })
    }
}

impl Model {
    /// This (whole) model's shard for rank `comm.rank()` of a tensor-parallel group of
    /// `comm.world_size()` ranks. Attention heads and intermediate sizes must divide evenly;
    /// the vocabulary need not.
    pub fn shard(&self, comm: Arc<dyn Collective>) -> Result<Model> {
        self.shard_with(comm, MoeSplit::Intermediate)
    }

    /// [`Model::shard`] with the experts of a MoE model split as `moe` says.
    pub fn shard_with(&self, comm: Arc<dyn Collective>, moe: MoeSplit) -> Result<Model> {
        self.cut(comm.rank(), comm.world_size(), moe)?.join(comm)
    }

    /// Rank `rank`'s share of this (whole) model in a group of `world`, to [`Shard::join`] to
    /// the group's communicator.
    pub fn cut(&self, rank: usize, world: usize, moe: MoeSplit) -> Result<Shard> {
        if self.tp.is_some() {
            return Err(Error::InvalidRequest("this model is a shard already".into()));
        }
        let sp = Split::new(&self.config, rank, world, moe)?;
        let layers = (self.weights.layers.iter()).map(|layer| sp.layer(layer)).collect::<Result<Vec<_>>>()?;
        let weights = Weights {
            embed: sp.vocab_rows(&self.weights.embed)?,
            layers,
            norm: self.weights.norm.clone(),
            lm_head: self.weights.lm_head.as_ref().map(|h| sp.vocab_rows(h)).transpose()?,
        };
        let (whole, rope, device) = (self.config.clone(), self.rope.clone(), self.device);
        Ok(Shard { rank, world, whole, split: sp, weights, rope, device })
    }

    /// Rank `rank`'s share of the model in `dir` in a group of `world`, read straight from its
    /// checkpoint: each layer is cut as it is read, so the whole model is never in memory (what
    /// a rank of a model too large for one device needs). The same weights as [`Model::cut`]
    /// of the whole model. Loaded before the group forms, so a slow read keeps no peer waiting.
    pub fn load_shard(dir: &Path, device: Device, rank: usize, world: usize, moe: MoeSplit) -> Result<Shard> {
        let whole = ModelConfig::load(dir)?;
        let split = Split::new(&whole, rank, world, moe)?;
        let weights = load_weights_cut(&whole, &open_checkpoint(dir)?, DType::F32, device, Some(&split))?;
        let rope = Rope::new(whole.head_dim, whole.rope_theta, &whole.rope_scaling)?;
        Ok(Shard { rank, world, whole, split, weights, rope, device })
    }

    /// Whether this is a shard of a group that spreads whole experts over its ranks.
    pub fn is_expert_parallel(&self) -> bool {
        self.tp.as_ref().is_some_and(|tp| tp.split.experts.is_some())
    }

    /// The whole model's configuration, also on a shard (whose own has its local sizes):
    /// what adapters, jobs and checkpoints are made against.
    pub fn whole_config(&self) -> &ModelConfig {
        self.tp.as_ref().map_or(&self.config, |tp| &tp.whole)
    }

    /// `adapter` (resolved against the whole model) cut as this shard's weights are: LoRA's B
    /// by output rows for column-parallel projections, A by input columns for row-parallel ones
    /// (each rank's delta is then a partial sum, added up by the all-reduce the base output
    /// takes anyway); ESFT experts as the base experts. Under expert parallelism the experts'
    /// LoRA modules stay whole on every rank (they are small, and alike banks let the ranks sum
    /// their gradients) and each rank keeps the ESFT experts of its own experts. Unchanged
    /// without tensor parallelism.
    pub fn shard_adapter(&self, adapter: &Adapter) -> Result<Adapter> {
        let Some(tp) = &self.tp else { return Ok(adapter.clone()) };
        let sp = &tp.split;
        Ok(match adapter {
            Adapter::Lora(a) => {
                let mut out = a.clone();
                for (key, m) in &mut out.modules {
                    match sp.of(key.proj, key.expert.is_some()) {
                        Some((true, rows)) => m.bt = slice(&m.bt, 1, rows)?,
                        Some((false, cols)) => m.a = slice(&m.a, 1, cols)?,
                        None => {}
                    }
                }
                Adapter::Lora(out)
            }
            // ESFT experts live with the experts they replace.
            Adapter::Esft(e) if sp.experts.is_some() => {
                let mine = sp.experts.clone().unwrap_or_default();
                let mut out = e.clone();
                out.experts.retain(|&(_, expert), _| mine.contains(&expert));
                Adapter::Esft(out)
            }
            Adapter::Esft(e) => {
                let mut out = e.clone();
                for w in out.experts.values_mut() {
                    w.gate = slice(&w.gate, 0, sp.expert_inter.clone())?;
                    w.up = slice(&w.up, 0, sp.expert_inter.clone())?;
                    w.down = slice(&w.down, 1, sp.expert_inter.clone())?;
                }
                Adapter::Esft(out)
            }
        })
    }

    /// The whole base weights of `experts` (layer -> expert ids), what an ESFT job starts from.
    /// On a shard every rank puts its share in place in zeros of the whole shapes (its slice of
    /// each expert, or the experts it holds whole) and one all-reduce sums them: every rank of
    /// the group must call this alike.
    pub fn base_experts(
        &self,
        experts: &BTreeMap<usize, Vec<usize>>,
    ) -> Result<BTreeMap<(usize, usize), ExpertWeights>> {
        let c = self.whole_config();
        let mut parts = Vec::new();
        for (&layer, ids) in experts {
            let (Some(moe), Some(Mlp::Moe(m))) = (c.moe_at(layer), self.weights.layers.get(layer).map(|l| &l.mlp))
            else {
                return Err(Error::InvalidRequest(format!("ESFT: layer {layer} of this model has no experts")));
            };
            let (inter, h) = (moe.expert_intermediate, c.hidden_size);
            for &e in ids {
                if e >= moe.num_experts {
                    return Err(Error::InvalidRequest(format!(
                        "ESFT: layer {layer} has {} experts, no expert {e}",
                        moe.num_experts
                    )));
                }
                // This rank's stack holds expert `e` at `local` (all of it, or its slice), or
                // not at all (another rank's, under expert parallelism).
                let split = self.tp.as_ref().map(|tp| &tp.split);
                let local = match split.and_then(|sp| sp.experts.clone()) {
                    Some(mine) => mine.contains(&e).then(|| e - mine.start),
                    None => Some(e),
                };
                let sliced = split.filter(|sp| sp.experts.is_none()).map(|sp| sp.expert_inter.clone());
                let expert = |stack: &Tensor, down: bool| -> Result<Tensor> {
                    let whole_shape = if down { vec![h, inter] } else { vec![inter, h] };
                    let Some(i) = local else { return Ok(Tensor::zeros(whole_shape, DType::F32, self.device)?) };
                    let own: Vec<usize> = stack.shape()[1..].to_vec();
                    let t = slice(stack, 0, i..i + 1)?.reshape(own)?;
                    match &sliced {
                        Some(range) => widen(&t, usize::from(down), range.clone(), inter),
                        None => Ok(t),
                    }
                };
                parts.extend([expert(&m.gate, false)?, expert(&m.up, false)?, expert(&m.down, true)?]);
            }
        }
        let mut whole = self.all_reduce_all(parts, Site::JobSetup)?.into_iter();
        let mut out = BTreeMap::new();
        for (&layer, ids) in experts {
            for &e in ids {
                let mut next = || whole.next().ok_or_else(|| Error::InvalidRequest("base experts ran out".into()));
                out.insert((layer, e), ExpertWeights { gate: next()?, up: next()?, down: next()? });
            }
        }
        Ok(out)
    }

    /// `values` summed over the group, in place (unchanged without tensor parallelism).
    pub(crate) fn sum_over_group(&self, values: &mut [f32], site: Site) -> Result<()> {
        match &self.tp {
            Some(tp) => tp.counted(site, || tp.comm.all_reduce_sum(values)),
            None => Ok(()),
        }
    }

    /// The sum over the group of a row-parallel output (itself without tensor parallelism).
    pub(super) fn all_reduce(&self, t: Tensor, site: Site) -> Result<Tensor> {
        if self.tp.is_none() {
            return Ok(t);
        }
        let (shape, mut data) = (t.shape().to_vec(), t.to_vec_f32()?);
        self.sum_over_group(&mut data, site)?;
        Ok(Tensor::from_vec(data, shape)?.to_device(self.device)?)
    }

    /// `tokens`' embeddings: with the vocabulary split, each rank looks up the tokens in its
    /// range (zeros for the others) and the group sums them.
    pub(super) fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        use tandem_kernels::ops;
        // Activations are f32 whatever the weights are held in (a bf16 table's rows widen).
        let Some(tp) = &self.tp else {
            return Ok(ops::embedding(&self.weights.embed, tokens)?.into_dtype(DType::F32)?);
        };
        let (start, end) = (tp.split.vocab.start as u32, tp.split.vocab.end as u32);
        let local: Vec<u32> = tokens.iter().map(|&t| if (start..end).contains(&t) { t - start } else { 0 }).collect();
        let mask: Vec<f32> = tokens.iter().map(|t| if (start..end).contains(t) { 1.0 } else { 0.0 }).collect();
        let rows = ops::embedding(&self.weights.embed, &local)?;
        let mask = Tensor::from_vec(mask, [tokens.len()])?.to_device(self.device)?;
        if let Ok(mut t) = tp.traffic.lock() {
            t.tokens += tokens.len() as u64;
        }
        self.all_reduce(ops::scale_rows(&rows, &mask)?, Site::Embedding)
    }

    /// Logits over the whole vocabulary from this rank's columns `local`, `[rows, vocab range]`.
    pub(super) fn gather_logits(&self, local: Tensor) -> Result<Tensor> {
        let Some(tp) = &self.tp else { return Ok(local) };
        let rows = local.shape()[0];
        let data = local.to_vec_f32()?;
        let gathered = tp.counted(Site::Logits, || tp.comm.all_gather(&data))?;
        if let Ok(mut t) = tp.traffic.lock() {
            t.logit_rows += rows as u64;
        }
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

impl Model {
    /// The whole model's adapter gradients from this shard's: each gradient of a slice is put
    /// back at its place in the whole module's shape (zeros elsewhere) and the group sums them.
    /// The sum also completes the gradients that are partial sums on every rank: LoRA's A of
    /// column-parallel projections and B of row-parallel ones (their rank-r intermediate is a
    /// partial sum), the replicated router and shared-expert gate (their upstream gradient comes
    /// from row-parallel outputs), and B of KV heads replicated on several ranks. One
    /// all-reduce for all of them; every rank ends with the same, whole gradients.
    pub(super) fn gather_grads(&self, grads: AdapterGrads, adapters: &AdapterSet) -> Result<AdapterGrads> {
        let Some(tp) = &self.tp else { return Ok(grads) };
        let (sp, whole) = (&tp.split, &*tp.whole);
        // The ranks must agree on what they sum: every LoRA module of the set (its LoRA tables
        // are alike on every rank), zeros where no row of this rank reached it (under expert
        // parallelism, an expert's rows reach only its rank), sorted.
        let mut lora = grads.lora;
        for key in adapters.lora_keys() {
            if let (false, Some(table)) = (lora.contains_key(&key), adapters.lora(key.0, key.1)) {
                let b = &table.bank;
                let zeros = |width: usize| Tensor::zeros([b.total_rank(), width], b.dtype(), b.device());
                lora.insert(key, (zeros(b.in_features())?, zeros(b.out_features())?));
            }
        }
        let mut lora: Vec<_> = lora.into_iter().collect();
        lora.sort_by_key(|(key, _)| *key);
        // Every rank ran the same rows through the same ESFT experts (without expert
        // parallelism), so the ESFT gradients' keys agree too.
        let mut esft: Vec<_> = grads.esft.into_iter().collect();
        esft.sort_by_key(|(key, _)| *key);
        let mut parts = Vec::new();
        for ((layer, proj), (da, dbt)) in &lora {
            let expert = whole.moe_at(*layer).is_some() && matches!(proj, Proj::Gate | Proj::Up | Proj::Down);
            let (inputs, outputs) =
                ModuleKey { layer: *layer, proj: *proj, expert: expert.then_some(0) }.features(whole);
            parts.extend(match sp.of(*proj, expert) {
                Some((true, rows)) => [da.clone(), widen(dbt, 1, rows, outputs)?],
                Some((false, cols)) => [widen(da, 1, cols, inputs)?, dbt.clone()],
                None => [da.clone(), dbt.clone()],
            });
        }
        let by_experts = sp.experts.is_some();
        let esft_rows = if by_experts { self.whole_esft_rows(tp, adapters)? } else { BTreeMap::new() };
        if by_experts {
            // Each rank's ESFT tables hold only its own experts: each puts the rows it has in
            // place in zeros of the whole set's stacks (the whole model's table layout), and
            // the sum completes them.
            let own: HashMap<(usize, usize, usize), usize> = (adapters.esft_tables())
                .flat_map(|(l, t)| t.entries().map(move |((s, e), i)| ((l, s, e), i as usize)))
                .collect();
            let (h, inter) = (whole.hidden_size, whole.moe.as_ref().map_or(0, |m| m.expert_intermediate));
            let size = h * inter;
            for (&layer, rows) in &esft_rows {
                for proj in ESFT_PROJS {
                    let shape = if proj == Proj::Down { [rows.len(), h, inter] } else { [rows.len(), inter, h] };
                    let mut data = vec![0.0; rows.len() * size];
                    if let Some((_, g)) = esft.iter().find(|(key, _)| *key == (layer, proj)) {
                        let g = g.to_vec_f32()?;
                        for (r, &(slot, e)) in rows.iter().enumerate() {
                            if let Some(&i) = own.get(&(layer, slot, e)) {
                                data[r * size..(r + 1) * size].copy_from_slice(&g[i * size..(i + 1) * size]);
                            }
                        }
                    }
                    parts.push(Tensor::from_vec(data, shape)?.to_device(self.device)?);
                }
            }
        } else {
            let inter = whole.moe.as_ref().map_or(0, |m| m.expert_intermediate);
            for ((_, proj), dw) in &esft {
                // Stacked experts: gate and up `[n, inter, hidden]`, down `[n, hidden, inter]`.
                let axis = if *proj == Proj::Down { 2 } else { 1 };
                parts.push(widen(dw, axis, sp.expert_inter.clone(), inter)?);
            }
        }
        let mut summed = self.all_reduce_all(parts, Site::Gradients)?.into_iter();
        let mut next = || summed.next().ok_or_else(|| Error::InvalidRequest("gradients ran out".into()));
        let mut out = AdapterGrads::default();
        for (key, _) in lora {
            out.lora.insert(key, (next()?, next()?));
        }
        if by_experts {
            for &layer in esft_rows.keys() {
                for proj in ESFT_PROJS {
                    out.esft.insert((layer, proj), next()?);
                }
            }
            out.esft_rows = esft_rows.into_iter().collect();
        } else {
            for (key, _) in esft {
                out.esft.insert(key, next()?);
            }
        }
        Ok(out)
    }

    /// Under expert parallelism, the rows of the whole set's ESFT stacks, per layer: every
    /// rank's (adapter slot, expert) pairs, gathered, in the order the whole model's tables
    /// have them (by slot, then expert).
    fn whole_esft_rows(
        &self,
        tp: &TensorParallel,
        adapters: &AdapterSet,
    ) -> Result<BTreeMap<usize, Vec<(usize, usize)>>> {
        let mine: Vec<f32> = (adapters.esft_tables())
            .flat_map(|(l, t)| t.entries().map(move |((s, e), _)| [l as f32, s as f32, e as f32]))
            .flatten()
            .collect();
        let all = tp.counted(Site::GradientLayout, || tp.comm.all_gather(&mine))?;
        let mut keys: Vec<(usize, usize, usize)> =
            all.chunks_exact(3).map(|k| (k[0] as usize, k[1] as usize, k[2] as usize)).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut rows: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
        for (layer, slot, expert) in keys {
            rows.entry(layer).or_default().push((slot, expert));
        }
        Ok(rows)
    }

    /// Several tensors summed over the group in one all-reduce.
    fn all_reduce_all(&self, tensors: Vec<Tensor>, site: Site) -> Result<Vec<Tensor>> {
        if self.tp.is_none() {
            return Ok(tensors);
        }
        let mut flat = Vec::with_capacity(tensors.iter().map(Tensor::elem_count).sum());
        for t in &tensors {
            flat.extend(t.to_vec_f32()?);
        }
        self.sum_over_group(&mut flat, site)?;
        let mut at = 0;
        tensors
            .iter()
            .map(|t| {
                at += t.elem_count();
                let data = flat[at - t.elem_count()..at].to_vec();
                Ok(Tensor::from_vec(data, t.shape().to_vec())?.to_device(self.device)?)
            })
            .collect()
    }

    /// Cross-entropy of rows whose logits are split by vocabulary over the group, without
    /// gathering them (Megatron-LM's vocabulary-parallel cross-entropy): the ranks agree on
    /// each row's maximum (an all-gather of one float per row), then sum the exponentials and
    /// the target's logit (an all-reduce of two). `logits` are this rank's columns, `[rows,
    /// vocab range]`; every target must be a token (>= 0). With `weights`, also the gradient
    /// of `Σ weights[r] · loss[r]` w.r.t. this rank's logits.
    pub(super) fn vocab_parallel_cross_entropy(
        &self,
        logits: &Tensor,
        targets: &[i32],
        weights: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Option<Tensor>)> {
        let tp = self.tp.as_ref().ok_or_else(|| Error::InvalidRequest("not a tensor-parallel shard".into()))?;
        let (rows, cols) = (logits.shape()[0], logits.shape()[1]);
        let l = logits.to_vec_f32()?;
        let row = |r: usize| &l[r * cols..(r + 1) * cols];
        let local_max: Vec<f32> = (0..rows).map(|r| row(r).iter().copied().fold(f32::NEG_INFINITY, f32::max)).collect();
        let all_max = tp.counted(Site::Loss, || tp.comm.all_gather(&local_max))?;
        let max: Vec<f32> = (0..rows)
            .map(|r| all_max.iter().skip(r).step_by(rows).copied().fold(f32::NEG_INFINITY, f32::max))
            .collect();
        let vocab = &tp.split.vocab;
        let local_col = |r: usize| {
            let t = usize::try_from(targets[r]).ok()?;
            vocab.contains(&t).then(|| t - vocab.start)
        };
        // Each row's Σ exp(logit - max), then its target's logit (on the rank that holds it).
        let mut sums = vec![0.0f32; 2 * rows];
        for r in 0..rows {
            sums[r] = row(r).iter().map(|&v| (v - max[r]).exp()).sum();
            if let Some(c) = local_col(r) {
                sums[rows + r] = row(r)[c];
            }
        }
        tp.counted(Site::Loss, || tp.comm.all_reduce_sum(&mut sums))?;
        let losses: Vec<f32> = (0..rows).map(|r| sums[r].ln() + max[r] - sums[rows + r]).collect();
        let Some(w) = weights else { return Ok((losses, None)) };
        let mut grad = vec![0.0f32; rows * cols];
        for r in 0..rows {
            let g = &mut grad[r * cols..(r + 1) * cols];
            for (g, &v) in g.iter_mut().zip(row(r)) {
                *g = w[r] * (v - max[r]).exp() / sums[r];
            }
            if let Some(c) = local_col(r) {
                g[c] -= w[r];
            }
        }
        Ok((losses, Some(Tensor::from_vec(grad, [rows, cols])?.to_device(self.device)?)))
    }
}

impl TensorParallel {
    /// Runs collective `f`, counting what it sent at `site`.
    pub(super) fn counted<T>(
        &self,
        site: Site,
        f: impl FnOnce() -> std::result::Result<T, CollectiveError>,
    ) -> Result<T> {
        let before = self.comm.bytes_sent();
        let out = f()?;
        if let Ok(mut t) = self.traffic.lock() {
            *t.bytes.entry(site).or_default() += self.comm.bytes_sent() - before;
        }
        Ok(out)
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
