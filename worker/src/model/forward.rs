//! The forward pass over a batch that mixes sequences, prefill chunks, decode tokens and
//! adapters: the base GEMMs run once for all rows, each adapter's delta is added with SGMV, and
//! MoE rows are re-routed to ESFT experts where their adapter replaced one.

use tandem_kernels::ops::{self, Segments, SeqAttention};
use tandem_kernels::{DType, Tensor};

use super::Model;
use super::weights::{DenseMlp, Linear, Mlp, MoeMlp};
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
}

impl Model {
    /// Runs the batch, writing its keys and values into `cache`; returns the logits of
    /// `input.logit_rows`, `[rows, vocab]` (f32).
    pub fn forward(&self, input: &ForwardInput, cache: &mut KvCache, adapters: &AdapterSet) -> Result<Tensor> {
        let n = input.tokens.len();
        if [input.positions.len(), input.slots.len(), input.adapters.len()].iter().any(|&l| l != n) {
            return Err(Error::InvalidRequest(
                "forward: tokens, positions, slots and adapters differ in length".into(),
            ));
        }
        if let Some(bad) = input.adapters.iter().find(|&&a| a >= adapters.len() as i32 || a < -1) {
            return Err(Error::InvalidRequest(format!("forward: adapter slot {bad} of {}", adapters.len())));
        }
        let c = &self.config;
        let w = &self.weights;
        let mut x = ops::embedding(&w.embed, &input.tokens)?;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let rows = Rows { slots: &input.adapters, adapters };
        for (l, layer) in w.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let q = rows.linear(&h, &layer.q, l, Proj::Q)?.reshape([n, c.num_heads, c.head_dim])?;
            let k = rows.linear(&h, &layer.k, l, Proj::K)?.reshape([n, c.num_kv_heads, c.head_dim])?;
            let v = rows.linear(&h, &layer.v, l, Proj::V)?.reshape([n, c.num_kv_heads, c.head_dim])?;
            let q = ops::rope(&q, &input.positions, &self.rope)?;
            let k = ops::rope(&k, &input.positions, &self.rope)?;
            ops::write_kv(&mut cache.k[l], &k, &input.slots)?;
            ops::write_kv(&mut cache.v[l], &v, &input.slots)?;
            let attn = ops::paged_attention(&q, &cache.k[l], &cache.v[l], &input.seqs, scale)?;
            let attn = attn.reshape([n, c.num_heads * c.head_dim])?;
            x = ops::add(&x, &rows.linear(&attn, &layer.o, l, Proj::O)?)?;
            let h = ops::rms_norm(&x, &layer.post_attention_norm, c.rms_norm_eps)?;
            let mlp = match &layer.mlp {
                Mlp::Dense(m) => rows.dense_mlp(&h, m, l, [Proj::Gate, Proj::Up, Proj::Down])?,
                Mlp::Moe(m) => self.moe_mlp(&h, m, l, &rows)?,
            };
            x = ops::add(&x, &mlp)?;
        }
        let last = ops::gather_rows(&x, &input.logit_rows)?;
        let last = ops::rms_norm(&last, &w.norm, c.rms_norm_eps)?;
        let head = w.lm_head.as_ref().unwrap_or(&w.embed);
        Ok(ops::matmul(&last, head, false, true)?)
    }

    /// A mixture-of-experts MLP: route, dispatch each (token, expert) pair to its expert (or
    /// the adapter's ESFT replacement of it), run the experts as grouped matmuls, combine.
    fn moe_mlp(&self, h: &Tensor, m: &MoeMlp, layer: usize, rows: &Rows<'_>) -> Result<Tensor> {
        let moe = self.config.moe_at(layer).ok_or_else(|| Error::Format(format!("layer {layer} has no experts")))?;
        let n = h.shape()[0];
        let logits = rows.linear(h, &m.router, layer, Proj::Router)?;
        let routing = ops::moe_gate(&logits, moe.top_k, moe.renormalize)?;
        let k = routing.top_k;
        let esft = rows.adapters.esft(layer);
        // Each (token, choice) pair goes to a base expert (bank 0) or an ESFT expert (bank 1);
        // pairs are sorted by (bank, expert) so every expert's rows are one segment.
        let target = |p: usize| -> (u32, u32) {
            let (t, e) = (p / k, routing.experts[p]);
            match esft.and_then(|table| table.lookup(rows.slots[t], e)) {
                Some(i) => (1, i),
                None => (0, e),
            }
        };
        let mut order: Vec<usize> = (0..n * k).collect();
        order.sort_by_key(|&p| target(p));
        let token_of: Vec<u32> = order.iter().map(|&p| (p / k) as u32).collect();
        let expert_of: Vec<u32> = order.iter().map(|&p| routing.experts[p]).collect();
        let slot_of: Vec<i32> = token_of.iter().map(|&t| rows.slots[t as usize]).collect();
        let targets: Vec<(u32, u32)> = order.iter().map(|&p| target(p)).collect();
        let weights = routing.weights.to_vec_f32()?;
        let pair_weight: Vec<f32> = order.iter().map(|&p| weights[p]).collect();

        let x = ops::gather_rows(h, &token_of)?;
        let segs = |bank: u32| {
            let idx: Vec<i32> = targets.iter().map(|&(b, i)| if b == bank { i as i32 } else { -1 }).collect();
            Segments::from_row_indices(&idx)
        };
        let (base, replaced) = (segs(0), segs(1));
        let experts = |x: &Tensor, base_w: &Tensor, esft_w: Option<&Tensor>, proj: Proj| -> Result<Tensor> {
            let mut y = ops::grouped_matmul(x, base_w, &base)?;
            if let Some(w) = esft_w {
                y = ops::add(&y, &ops::grouped_matmul(x, w, &replaced)?)?;
            }
            if let Some(table) = rows.adapters.lora(layer, proj) {
                table.apply(&mut y, x, &slot_of, Some(&expert_of))?;
            }
            Ok(y)
        };
        let gate = experts(&x, &m.gate, esft.map(|t| &t.gate), Proj::Gate)?;
        let up = experts(&x, &m.up, esft.map(|t| &t.up), Proj::Up)?;
        let act = ops::swiglu(&gate, &up)?;
        let down = experts(&act, &m.down, esft.map(|t| &t.down), Proj::Down)?;
        let w = Tensor::from_vec(pair_weight, [order.len()])?.to_device(self.device)?;
        let mut out = ops::scatter_add_rows(&ops::scale_rows(&down, &w)?, &token_of, n)?;
        if let Some((shared, shared_gate)) = &m.shared {
            let s = rows.dense_mlp(h, shared, layer, [Proj::SharedGate, Proj::SharedUp, Proj::SharedDown])?;
            // The shared expert's output is scaled per token by sigmoid(h · w_gate).
            let g = rows.linear(h, shared_gate, layer, Proj::SharedExpertGate)?.to_vec_f32()?;
            let g: Vec<f32> = g.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            let g = Tensor::from_vec(g, [n])?.to_device(self.device)?;
            out = ops::add(&out, &ops::scale_rows(&s, &g)?)?;
        }
        Ok(out)
    }
}

/// Per-row adapter information shared by the projections of one batch.
struct Rows<'a> {
    slots: &'a [i32],
    adapters: &'a AdapterSet,
}

impl Rows<'_> {
    /// `x · Wᵀ + b`, plus each row's LoRA delta for this (layer, projection).
    fn linear(&self, x: &Tensor, lin: &Linear, layer: usize, proj: Proj) -> Result<Tensor> {
        let mut y = ops::matmul(x, &lin.weight, false, true)?;
        if let Some(b) = &lin.bias {
            y = ops::add_bias(&y, b)?;
        }
        if let Some(table) = self.adapters.lora(layer, proj) {
            table.apply(&mut y, x, self.slots, None)?;
        }
        Ok(y)
    }

    fn dense_mlp(&self, h: &Tensor, m: &DenseMlp, layer: usize, [g, u, d]: [Proj; 3]) -> Result<Tensor> {
        let gate = self.linear(h, &m.gate, layer, g)?;
        let up = self.linear(h, &m.up, layer, u)?;
        self.linear(&ops::swiglu(&gate, &up)?, &m.down, layer, d)
    }
}
