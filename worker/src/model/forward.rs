//! The forward pass over a batch that mixes sequences, prefill chunks, decode tokens and
//! adapters: the base GEMMs run once for all rows, each adapter's delta is added with BGMV, and
//! MoE rows are re-routed to ESFT experts where their adapter replaced one.
//!
//! Each decoder layer returns, next to its output, the activations its backward pass needs
//! ([`LayerActs`]); inference drops them at once, training keeps them (see `backward.rs`).

use tandem_kernels::ops::{self, MoeRouting, Segments, SeqAttention};
use tandem_kernels::{DType, Tensor};

use super::expert_parallel::EpActs;
use super::tensor_parallel::Site;
use super::weights::{DenseMlp, Linear, Mlp, MoeMlp};
use super::{Model, ModelConfig};
use crate::adapters::Proj;
use crate::adapters::set::AdapterSet;
use crate::error::{Error, Result};

/// The paged KV cache of every layer: `[num_blocks, block_size, kv_heads, head_dim]` each.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvCache {
    pub fn new(model: &Model, num_blocks: usize, block_size: usize, dtype: DType) -> Result<Self> {
        let c = &model.config;
        let shape = [num_blocks, block_size, c.num_kv_heads, c.head_dim];
        let make = || {
            (0..c.num_layers)
                .map(|_| Tensor::zeros(shape, dtype, model.device))
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        Ok(KvCache { k: make()?, v: make()?, block_size, num_blocks })
    }

    /// Bytes one page takes: a block of `block_size` tokens' keys and values in every layer.
    pub fn page_bytes(c: &ModelConfig, block_size: usize, dtype: DType) -> usize {
        c.num_layers * 2 * block_size * c.num_kv_heads * c.head_dim * dtype.size_in_bytes()
    }
}

/// One step's batch. New tokens of all sequences back to back; each sequence's entry in `seqs`
/// says how many of them are its own and where its keys live.
#[derive(Clone, Debug, Default)]
pub struct ForwardInput {
    pub tokens: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<u32>,
    /// Cache slot each token's key and value are written to.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqAttention>,
    /// Adapter slot of each token in the [`AdapterSet`] (-1: the base model).
    pub adapters: Vec<i32>,
    /// Rows whose logits are wanted (the last token of each sequence, when generating).
    pub logit_rows: Vec<u32>,
    /// Rows whose last hidden state (after the final norm) is wanted: the tokens of embedding
    /// requests. Only the rank that leads a group reads them (no collective is involved).
    pub embed_rows: Vec<u32>,
}

impl ForwardInput {
    /// Rows `first_row..` alone (sequences `first_seq..`), with no logit rows: the fine-tuning
    /// rows a batch carries after its inference rows, as a pass of their own would take them.
    pub fn tail(&self, first_row: usize, first_seq: usize) -> ForwardInput {
        ForwardInput {
            tokens: self.tokens[first_row..].to_vec(),
            positions: self.positions[first_row..].to_vec(),
            slots: self.slots[first_row..].to_vec(),
            seqs: self.seqs[first_seq..].to_vec(),
            adapters: self.adapters[first_row..].to_vec(),
            logit_rows: Vec::new(),
            embed_rows: Vec::new(),
        }
    }

    fn validate(&self, adapters: &AdapterSet) -> Result<()> {
        let n = self.tokens.len();
        if [self.positions.len(), self.slots.len(), self.adapters.len()].iter().any(|&l| l != n) {
            return Err(Error::InvalidRequest(
                "forward: tokens, positions, slots and adapters differ in length".into(),
            ));
        }
        match self.adapters.iter().find(|&&a| a >= adapters.len() as i32 || a < -1) {
            Some(bad) => Err(Error::InvalidRequest(format!("forward: adapter slot {bad} of {}", adapters.len()))),
            None => Ok(()),
        }
    }
}

/// What a decoder layer computed that its backward pass needs. Norm outputs, SwiGLU products
/// and gathered expert inputs are cheap to recompute from these and are not kept.
pub struct LayerActs {
    /// The layer's input.
    pub(super) x: Tensor,
    /// Queries after RoPE, `[n, heads, head_dim]` (keys and values stay in the cache).
    pub(super) q: Tensor,
    /// Attention output, `[n, heads·head_dim]`: `o_proj`'s input.
    pub(super) attn: Tensor,
    /// The residual stream after attention, the MLP block's input.
    pub(super) mid: Tensor,
    pub(super) mlp: MlpActs,
}

impl LayerActs {
    /// For a MoE layer, the experts its router chose: `top_k` per token, token by token.
    pub fn routed_experts(&self) -> Option<(&[u32], usize)> {
        match &self.mlp {
            MlpActs::Moe(m) => Some((&m.routing.experts, m.routing.top_k)),
            // Each rank routes only its share of the tokens: the group's counts add up.
            MlpActs::ExpertParallel(a) => a.routed_experts(),
            MlpActs::Dense(_) => None,
        }
    }
}

impl LayerActs {
    /// Only rows `start..` of these activations, as a forward pass over those rows alone
    /// (`input`, with the same `adapters`) would have kept them: how the co-serving engine keeps
    /// the fine-tuning rows of a batch they shared with inference rows.
    pub fn tail(
        self,
        start: usize,
        layer: usize,
        input: &ForwardInput,
        adapters: &AdapterSet,
        model: &Model,
    ) -> Result<Self> {
        let rows: Vec<u32> = (start as u32..self.x.shape()[0] as u32).collect();
        let pick = |t: &Tensor| -> Result<Tensor> { Ok(ops::gather_rows(t, &rows)?) };
        let pick_swiglu =
            |a: &SwigluActs| -> Result<SwigluActs> { Ok(SwigluActs { gate: pick(&a.gate)?, up: pick(&a.up)? }) };
        let mlp = match &self.mlp {
            MlpActs::Dense(a) => MlpActs::Dense(pick_swiglu(a)?),
            MlpActs::ExpertParallel(_) => {
                // Its pairs went to other ranks by the whole pass's shares of the tokens: the
                // engine gives fine-tuning rows a pass of their own under expert parallelism.
                return Err(Error::Unsupported("cutting rows out of an expert-parallel pass".into()));
            }
            MlpActs::Moe(m) => {
                let k = m.routing.top_k;
                let routing = MoeRouting {
                    weights: pick(&m.routing.weights)?,
                    experts: m.routing.experts[start * k..].to_vec(),
                    top_k: k,
                };
                let dispatch = Dispatch::new(&routing, &Rows { slots: &input.adapters, adapters }, layer, model)?;
                // The kept pairs, in the full dispatch's order, which is the order `Dispatch::new`
                // gives them alone (a stable sort, filtered).
                let pairs: Vec<u32> = (0..m.dispatch.token_of.len() as u32)
                    .filter(|&p| m.dispatch.token_of[p as usize] as usize >= start)
                    .collect();
                let pick_pairs = |t: &Tensor| ops::gather_rows(t, &pairs);
                let shared = match &m.shared {
                    Some(sh) => {
                        Some(SharedActs { mlp: pick_swiglu(&sh.mlp)?, out: pick(&sh.out)?, gate: pick(&sh.gate)? })
                    }
                    None => None,
                };
                MlpActs::Moe(Box::new(MoeActs {
                    router_logits: pick(&m.router_logits)?,
                    routing,
                    dispatch,
                    experts: SwigluActs { gate: pick_pairs(&m.experts.gate)?, up: pick_pairs(&m.experts.up)? },
                    down: pick_pairs(&m.down)?,
                    shared,
                }))
            }
        };
        Ok(LayerActs { x: pick(&self.x)?, q: pick(&self.q)?, attn: pick(&self.attn)?, mid: pick(&self.mid)?, mlp })
    }
}

pub(super) enum MlpActs {
    Dense(SwigluActs),
    Moe(Box<MoeActs>),
    /// A MoE layer whose experts are split over the ranks of a group.
    ExpertParallel(Box<EpActs>),
}

/// The two halves of a SwiGLU MLP, before `silu(gate)·up`.
pub(super) struct SwigluActs {
    pub(super) gate: Tensor,
    pub(super) up: Tensor,
}

pub(super) struct MoeActs {
    pub(super) router_logits: Tensor,
    pub(super) routing: MoeRouting,
    pub(super) dispatch: Dispatch,
    /// Per (token, expert) pair, in dispatch order.
    pub(super) experts: SwigluActs,
    /// Each pair's expert output before its routing weight.
    pub(super) down: Tensor,
    pub(super) shared: Option<SharedActs>,
}

/// Qwen2-MoE's shared expert: its MLP halves, its output and its per-token sigmoid gate.
pub(super) struct SharedActs {
    pub(super) mlp: SwigluActs,
    pub(super) out: Tensor,
    pub(super) gate: Tensor,
}

/// Where each (token, choice) pair of a MoE layer goes. Pairs are sorted by (bank, expert),
/// bank 0 being the base experts and bank 1 the ESFT replacements, so every expert's rows form
/// one segment.
pub(super) struct Dispatch {
    /// For each pair in dispatch order: its index `token·top_k + choice` in the routing.
    pub(super) order: Vec<usize>,
    pub(super) token_of: Vec<u32>,
    pub(super) expert_of: Vec<u32>,
    pub(super) slot_of: Vec<i32>,
    pub(super) base: Segments,
    pub(super) replaced: Segments,
    /// Each pair's routing weight, `[pairs]`.
    pub(super) weight: Tensor,
}

impl Model {
    /// The logits of `rows` of the last layer's output `hidden`, `[rows, vocab]`.
    pub(crate) fn logits(&self, hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
        self.gather_logits(ops::matmul(&self.final_hidden(hidden, rows)?, self.lm_head(), false, true)?)
    }

    /// `rows` of the last layer's output `hidden` after the final norm, `[rows, hidden]`: what
    /// the output projection reads, and what an embedding pools.
    pub(crate) fn final_hidden(&self, hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let last = ops::gather_rows(hidden, rows)?;
        Ok(ops::rms_norm(&last, &self.weights.norm, self.config.rms_norm_eps)?)
    }

    /// The decoder stack: the last layer's output for every row, `[n, hidden]` (before the
    /// final norm). Each layer's activations go to `keep`.
    pub(crate) fn hidden_states(
        &self,
        input: &ForwardInput,
        cache: &mut KvCache,
        adapters: &AdapterSet,
        keep: &mut dyn FnMut(LayerActs),
    ) -> Result<Tensor> {
        input.validate(adapters)?;
        let rows = Rows { slots: &input.adapters, adapters };
        let mut x = self.embed(&input.tokens)?;
        for l in 0..self.weights.layers.len() {
            let (out, acts) = self.layer(l, x, input, cache, &rows)?;
            keep(acts);
            x = out;
        }
        Ok(x)
    }

    /// The output projection (the embeddings when they are tied).
    pub(crate) fn lm_head(&self) -> &Tensor {
        self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed)
    }

    fn layer(
        &self,
        l: usize,
        x: Tensor,
        input: &ForwardInput,
        cache: &mut KvCache,
        rows: &Rows<'_>,
    ) -> Result<(Tensor, LayerActs)> {
        let (c, layer) = (&self.config, &self.weights.layers[l]);
        let n = input.tokens.len();
        let h = ops::rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
        let q = rows.linear(&h, &layer.q, l, Proj::Q)?.reshape([n, c.num_heads, c.head_dim])?;
        let k = rows.linear(&h, &layer.k, l, Proj::K)?.reshape([n, c.num_kv_heads, c.head_dim])?;
        let v = rows.linear(&h, &layer.v, l, Proj::V)?.reshape([n, c.num_kv_heads, c.head_dim])?;
        let q = ops::rope(&q, &input.positions, &self.rope)?;
        let k = ops::rope(&k, &input.positions, &self.rope)?;
        ops::write_kv(&mut cache.k[l], &k, &input.slots)?;
        ops::write_kv(&mut cache.v[l], &v, &input.slots)?;
        let attn = ops::paged_attention(&q, &cache.k[l], &cache.v[l], &input.seqs, self.attention_scale())?;
        let attn = attn.reshape([n, c.num_heads * c.head_dim])?;
        // o is row-parallel under tensor parallelism: each rank's output is a partial sum.
        let mid = ops::add(&x, &self.all_reduce(rows.linear(&attn, &layer.o, l, Proj::O)?, Site::Attention)?)?;
        let h = ops::rms_norm(&mid, &layer.post_attention_norm, c.rms_norm_eps)?;
        let (mlp_out, mlp) = match &layer.mlp {
            Mlp::Dense(m) => {
                let (out, acts) = rows.dense_mlp(&h, m, l, DENSE_PROJS)?;
                (out, MlpActs::Dense(acts))
            }
            Mlp::Moe(m) => match self.tp.as_ref().and_then(|tp| tp.split.experts.clone()) {
                Some(mine) => {
                    let (out, acts) = self.moe_mlp_ep(&h, m, l, rows, mine)?;
                    (out, MlpActs::ExpertParallel(Box::new(acts)))
                }
                None => {
                    let (out, acts) = self.moe_mlp(&h, m, l, rows)?;
                    (out, MlpActs::Moe(Box::new(acts)))
                }
            },
        };
        let out = ops::add(&mid, &self.all_reduce(mlp_out, Site::Mlp)?)?;
        Ok((out, LayerActs { x, q, attn, mid, mlp }))
    }

    pub(super) fn attention_scale(&self) -> f32 {
        1.0 / (self.config.head_dim as f32).sqrt()
    }

    /// A mixture-of-experts MLP: route, dispatch each (token, expert) pair to its expert (or
    /// the adapter's ESFT replacement of it), run the experts as grouped matmuls, combine.
    fn moe_mlp(&self, h: &Tensor, m: &MoeMlp, layer: usize, rows: &Rows<'_>) -> Result<(Tensor, MoeActs)> {
        let moe = self.config.moe_at(layer).ok_or_else(|| Error::Format(format!("layer {layer} has no experts")))?;
        let n = h.shape()[0];
        let router_logits = rows.linear(h, &m.router, layer, Proj::Router)?;
        let routing = ops::moe_gate(&router_logits, moe.top_k, moe.renormalize)?;
        let dispatch = Dispatch::new(&routing, rows, layer, self)?;
        let x = ops::gather_rows(h, &dispatch.token_of)?;
        let experts = ExpertProjs { m, layer, rows, dispatch: &dispatch };
        let gate = experts.forward(&x, Proj::Gate)?;
        let up = experts.forward(&x, Proj::Up)?;
        let down = experts.forward(&ops::swiglu(&gate, &up)?, Proj::Down)?;
        let out = ops::scatter_add_rows(&ops::scale_rows(&down, &dispatch.weight)?, &dispatch.token_of, n)?;
        let (out, shared) = self.add_shared_expert(out, h, m, layer, rows)?;
        let acts = MoeActs { router_logits, routing, dispatch, experts: SwigluActs { gate, up }, down, shared };
        Ok((out, acts))
    }

    /// `out` plus the shared expert's output, scaled per token by sigmoid(h · w_gate), where
    /// the MoE layer has one.
    pub(super) fn add_shared_expert(
        &self,
        out: Tensor,
        h: &Tensor,
        m: &MoeMlp,
        layer: usize,
        rows: &Rows<'_>,
    ) -> Result<(Tensor, Option<SharedActs>)> {
        let Some((mlp, gate_lin)) = &m.shared else { return Ok((out, None)) };
        let (s, acts) = rows.dense_mlp(h, mlp, layer, SHARED_PROJS)?;
        let g = rows.linear(h, gate_lin, layer, Proj::SharedExpertGate)?.to_vec_f32()?;
        let g: Vec<f32> = g.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
        let g = Tensor::from_vec(g, [h.shape()[0]])?.to_device(self.device)?;
        let out = ops::add(&out, &ops::scale_rows(&s, &g)?)?;
        Ok((out, Some(SharedActs { mlp: acts, out: s, gate: g })))
    }
}

pub(super) const DENSE_PROJS: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];
pub(super) const SHARED_PROJS: [Proj; 3] = [Proj::SharedGate, Proj::SharedUp, Proj::SharedDown];

impl Dispatch {
    fn new(routing: &MoeRouting, rows: &Rows<'_>, layer: usize, model: &Model) -> Result<Self> {
        let k = routing.top_k;
        let pairs: Vec<(u32, u32)> = routing.experts.iter().enumerate().map(|(p, &e)| ((p / k) as u32, e)).collect();
        let slots: Vec<i32> = pairs.iter().map(|&(t, _)| rows.slots[t as usize]).collect();
        Dispatch::sorted(&pairs, &slots, routing.weights.to_vec_f32()?, rows.adapters, layer, 0, model)
    }

    /// The dispatch of `pairs` (token, expert), pair `p` on adapter slot `slots[p]` with routing
    /// weight `weights[p]`. This rank's base experts start at expert `first_expert` (0 unless
    /// the experts are split over ranks).
    pub(super) fn sorted(
        pairs: &[(u32, u32)],
        slots: &[i32],
        weights: Vec<f32>,
        adapters: &AdapterSet,
        layer: usize,
        first_expert: u32,
        model: &Model,
    ) -> Result<Self> {
        let esft = adapters.esft(layer);
        let target = |p: usize| -> (u32, u32) {
            let e = pairs[p].1;
            match esft.and_then(|table| table.lookup(slots[p], e)) {
                Some(i) => (1, i),
                None => (0, e - first_expert),
            }
        };
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&p| target(p));
        let token_of: Vec<u32> = order.iter().map(|&p| pairs[p].0).collect();
        let expert_of: Vec<u32> = order.iter().map(|&p| pairs[p].1).collect();
        let slot_of: Vec<i32> = order.iter().map(|&p| slots[p]).collect();
        let targets: Vec<(u32, u32)> = order.iter().map(|&p| target(p)).collect();
        let segs = |bank: u32| {
            let idx: Vec<i32> = targets.iter().map(|&(b, i)| if b == bank { i as i32 } else { -1 }).collect();
            Segments::from_row_indices(&idx)
        };
        let weight: Vec<f32> = order.iter().map(|&p| weights[p]).collect();
        let weight = Tensor::from_vec(weight, [order.len()])?.to_device(model.device)?;
        Ok(Dispatch { token_of, expert_of, slot_of, base: segs(0), replaced: segs(1), weight, order })
    }
}

/// One MoE layer's expert projections over its dispatched pairs: base experts, ESFT
/// replacements and expert LoRA, added together.
pub(super) struct ExpertProjs<'a> {
    pub(super) m: &'a MoeMlp,
    pub(super) layer: usize,
    pub(super) rows: &'a Rows<'a>,
    pub(super) dispatch: &'a Dispatch,
}

impl ExpertProjs<'_> {
    /// The base expert weights and the ESFT replacements of `proj` (gate, up or down).
    pub(super) fn weights(&self, proj: Proj) -> (&Tensor, Option<&Tensor>) {
        let esft = self.rows.adapters.esft(self.layer);
        match proj {
            Proj::Gate => (&self.m.gate, esft.map(|t| &t.gate)),
            Proj::Up => (&self.m.up, esft.map(|t| &t.up)),
            _ => (&self.m.down, esft.map(|t| &t.down)),
        }
    }

    pub(super) fn forward(&self, x: &Tensor, proj: Proj) -> Result<Tensor> {
        let (base_w, esft_w) = self.weights(proj);
        let d = self.dispatch;
        let mut y = ops::grouped_matmul(x, base_w, &d.base)?;
        if let Some(w) = esft_w {
            y = ops::add(&y, &ops::grouped_matmul(x, w, &d.replaced)?)?;
        }
        if let Some(table) = self.rows.adapters.lora(self.layer, proj) {
            table.apply(&mut y, x, &d.slot_of, Some(&d.expert_of))?;
        }
        Ok(y)
    }
}

/// Per-row adapter information shared by the projections of one batch.
pub(super) struct Rows<'a> {
    pub(super) slots: &'a [i32],
    pub(super) adapters: &'a AdapterSet,
}

impl Rows<'_> {
    /// `x · Wᵀ + b`, plus each row's LoRA delta for this (layer, projection).
    pub(super) fn linear(&self, x: &Tensor, lin: &Linear, layer: usize, proj: Proj) -> Result<Tensor> {
        let mut y = ops::matmul(x, &lin.weight, false, true)?;
        if let Some(b) = &lin.bias {
            y = ops::add_bias(&y, b)?;
        }
        if let Some(table) = self.adapters.lora(layer, proj) {
            table.apply(&mut y, x, self.slots, None)?;
        }
        Ok(y)
    }

    fn dense_mlp(&self, h: &Tensor, m: &DenseMlp, layer: usize, [g, u, d]: [Proj; 3]) -> Result<(Tensor, SwigluActs)> {
        let gate = self.linear(h, &m.gate, layer, g)?;
        let up = self.linear(h, &m.up, layer, u)?;
        let out = self.linear(&ops::swiglu(&gate, &up)?, &m.down, layer, d)?;
        Ok((out, SwigluActs { gate, up }))
    }
}
