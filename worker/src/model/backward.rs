//! The backward pass of `forward.rs`, for training adapters over a frozen base: gradients flow
//! through the activations to the adapters' weights (LoRA banks, ESFT experts) and never to the
//! base weights, so every base projection costs one GEMM backward (`dx = dy·W`), not two.

use std::collections::HashMap;

use tandem_kernels::Tensor;
use tandem_kernels::ops;

use super::Model;
use super::forward::{
    DENSE_PROJS, Dispatch, ExpertProjs, ForwardInput, KvCache, LayerActs, MlpActs, MoeActs, Rows, SHARED_PROJS,
    SharedActs, SwigluActs,
};
use super::tensor_parallel::Site;
use super::weights::{DenseMlp, Linear, Mlp, MoeMlp};
use crate::adapters::Proj;
use crate::adapters::set::AdapterSet;
use crate::error::{Error, Result};

/// Gradients w.r.t. the weights of an [`AdapterSet`], shaped like its tables: per (layer,
/// projection) the bank's `a` and `bt`; per (MoE layer, gate/up/down) the ESFT expert stack.
#[derive(Debug, Default)]
pub struct AdapterGrads {
    pub lora: HashMap<(usize, Proj), (Tensor, Tensor)>,
    pub esft: HashMap<(usize, Proj), Tensor>,
    /// Per MoE layer, the (adapter slot, expert) of each row of its ESFT stacks when they are
    /// not the rows of the set's own table: gathered over an expert-parallel group, where each
    /// rank's table holds only its own experts, the stacks are the whole set's.
    pub esft_rows: HashMap<usize, Vec<(usize, usize)>>,
}

impl AdapterGrads {
    /// The row of the ESFT stacks of `layer` that holds (`slot`, `expert`) of `set`.
    pub fn esft_row(&self, set: &AdapterSet, layer: usize, slot: usize, expert: usize) -> Option<usize> {
        match self.esft_rows.get(&layer) {
            Some(rows) => rows.iter().position(|&k| k == (slot, expert)),
            None => set.esft(layer)?.lookup(slot as i32, expert as u32).map(|i| i as usize),
        }
    }

    fn add_lora(&mut self, key: (usize, Proj), da: Tensor, dbt: Tensor) -> Result<()> {
        let sum = match self.lora.remove(&key) {
            Some((a, bt)) => (ops::add(&a, &da)?, ops::add(&bt, &dbt)?),
            None => (da, dbt),
        };
        self.lora.insert(key, sum);
        Ok(())
    }

    /// Adds every gradient of `other` into this one.
    fn add(&mut self, other: AdapterGrads) -> Result<()> {
        for (key, (da, dbt)) in other.lora {
            self.add_lora(key, da, dbt)?;
        }
        for (key, dw) in other.esft {
            self.add_esft(key, dw)?;
        }
        self.esft_rows.extend(other.esft_rows);
        Ok(())
    }

    fn add_esft(&mut self, key: (usize, Proj), dw: Tensor) -> Result<()> {
        let sum = match self.esft.remove(&key) {
            Some(w) => ops::add(&w, &dw)?,
            None => dw,
        };
        self.esft.insert(key, sum);
        Ok(())
    }
}

/// Per-row losses, and the gradient w.r.t. the logits when one was asked for.
type CrossEntropy = (Vec<f32>, Option<Tensor>);

/// Rows of the LM head computed at once: the `[rows, vocab]` logits and their gradient are the
/// largest activations of training, so they exist one chunk at a time (64 Mi floats).
const LOGIT_CHUNK_ELEMS: usize = 1 << 26;

impl Model {
    /// Per-row cross-entropy of the rows that have a target (`targets[r] >= 0`; 0 elsewhere).
    pub fn loss(&self, hidden: &Tensor, targets: &[i32]) -> Result<Vec<f32>> {
        Ok(self.lm_loss(hidden, targets, None)?.0)
    }

    /// [`Model::loss`] and its gradient w.r.t. `hidden` (the last layer's output, `[n,
    /// hidden]`) for upstream weights `dloss[r]` (how much row r's loss counts).
    pub fn loss_backward(&self, hidden: &Tensor, targets: &[i32], dloss: &[f32]) -> Result<(Vec<f32>, Tensor)> {
        let (losses, dhidden) = self.lm_loss(hidden, targets, Some(dloss))?;
        let dhidden = dhidden.ok_or_else(|| Error::InvalidRequest("loss: no gradient computed".into()))?;
        Ok((losses, dhidden))
    }

    /// The final norm, LM head and cross-entropy over the rows with a target only (prompt rows
    /// cost nothing), chunk by chunk; with `dloss`, also the gradient w.r.t. `hidden`.
    fn lm_loss(&self, hidden: &Tensor, targets: &[i32], dloss: Option<&[f32]>) -> Result<(Vec<f32>, Option<Tensor>)> {
        let (n, h) = (hidden.shape()[0], self.config.hidden_size);
        if targets.len() != n || dloss.is_some_and(|d| d.len() != n) {
            return Err(Error::InvalidRequest(format!("loss: targets or loss weights do not match the {n} rows")));
        }
        let eps = self.config.rms_norm_eps;
        let rows: Vec<u32> = (0..n as u32).filter(|&r| targets[r as usize] >= 0).collect();
        let mut losses = vec![0.0; n];
        let mut dhidden = match dloss {
            Some(_) => Some(Tensor::zeros([n, h], hidden.dtype(), self.device)?),
            None => None,
        };
        // Equal chunks, so the last one is not a small, slow GEMM (every rank of a
        // tensor-parallel group chunks alike: the chunk size comes from the whole vocabulary).
        let most = (LOGIT_CHUNK_ELEMS / self.config.vocab_size.max(1)).max(1);
        let chunk = rows.len().div_ceil(rows.len().div_ceil(most).max(1)).max(1);
        for part in rows.chunks(chunk) {
            let x = ops::gather_rows(hidden, part)?;
            let t: Vec<i32> = part.iter().map(|&r| targets[r as usize]).collect();
            let w = dloss.map(|d| part.iter().map(|&r| d[r as usize]).collect::<Vec<f32>>());
            let normed = ops::rms_norm(&x, &self.weights.norm, eps)?;
            let logits = ops::matmul(&normed, self.lm_head(), false, true)?;
            let (part_losses, dlogits) = self.cross_entropy(logits, &t, w.as_deref())?;
            for (&r, l) in part.iter().zip(part_losses) {
                losses[r as usize] = l;
            }
            if let (Some(dlogits), Some(dh)) = (dlogits, dhidden.as_mut()) {
                // Under tensor parallelism a partial sum over this rank's vocabulary columns.
                let dnormed = ops::matmul(&dlogits, self.lm_head(), false, false)?;
                let (dx, _) = ops::rms_norm_backward(&x, &self.weights.norm, &dnormed, eps)?;
                *dh = ops::add(dh, &ops::scatter_add_rows(&dx, part, n)?)?;
            }
        }
        let dhidden = dhidden.map(|dh| self.all_reduce(dh, Site::Loss)).transpose()?;
        Ok((losses, dhidden))
    }

    /// Per-row cross-entropy of `logits` (this rank's vocabulary columns under tensor
    /// parallelism) and, with `weights`, the gradient of their weighted sum w.r.t. the logits.
    fn cross_entropy(&self, logits: Tensor, targets: &[i32], weights: Option<&[f32]>) -> Result<CrossEntropy> {
        if self.tp.is_some() {
            return self.vocab_parallel_cross_entropy(&logits, targets, weights);
        }
        let Some(w) = weights else { return Ok((ops::cross_entropy(&logits, targets)?.to_vec_f32()?, None)) };
        let w = Tensor::from_vec(w.to_vec(), [w.len()])?.to_device(self.device)?;
        let (losses, dlogits) = ops::cross_entropy_with_grad(logits, targets, &w)?;
        Ok((losses.to_vec_f32()?, Some(dlogits)))
    }

    /// Runs up to `layers` more layers of `pending`, last layer first; `true` once it has been
    /// through the first layer (the backward is complete): then the adapters' weight gradients
    /// (the whole model's, under tensor parallelism) are added into `grads`.
    pub fn backward_layers(
        &self,
        pending: &mut PendingBackward,
        cache: &KvCache,
        adapters: &AdapterSet,
        grads: &mut AdapterGrads,
        layers: usize,
    ) -> Result<bool> {
        let input = &pending.input;
        let rows = Rows { slots: &input.adapters, adapters };
        let mut b = Backward { model: self, input, cache, rows, grads: &mut pending.grads };
        for _ in 0..layers {
            let (Some(acts), Some(dx)) = (pending.tape.pop(), pending.dx.take()) else { break };
            pending.dx = Some(b.layer(pending.tape.len(), acts, dx)?);
        }
        if !pending.tape.is_empty() {
            return Ok(false);
        }
        // Under tensor parallelism the gradients are gathered once, at the end.
        let done = self.gather_grads(std::mem::take(&mut pending.grads), adapters)?;
        grads.add(done)?;
        Ok(true)
    }
}

/// A backward pass that can be run a few layers at a time: the co-serving engine spreads one
/// over several iterations so that none of them exceeds its time budget.
pub struct PendingBackward {
    input: ForwardInput,
    /// Activations of the layers still to go, first layer first.
    tape: Vec<LayerActs>,
    /// The gradient of the output of the last layer still to go.
    dx: Option<Tensor>,
    /// The adapters' weight gradients of the layers done (this shard's).
    grads: AdapterGrads,
}

impl PendingBackward {
    /// The backward of a forward pass over `input` (its rows only), from `dhidden`, the
    /// gradient of the last layer's output.
    pub fn new(model: &Model, input: ForwardInput, tape: Vec<LayerActs>, dhidden: Tensor) -> Result<Self> {
        if tape.len() != model.weights.layers.len() {
            return Err(Error::InvalidRequest(format!(
                "backward: {} layers of activations for {} layers",
                tape.len(),
                model.weights.layers.len()
            )));
        }
        Ok(PendingBackward { input, tape, dx: Some(dhidden), grads: AdapterGrads::default() })
    }

    pub fn layers_left(&self) -> usize {
        self.tape.len()
    }

    pub fn tokens(&self) -> usize {
        self.input.tokens.len()
    }
}

pub(super) struct Backward<'a> {
    pub(super) model: &'a Model,
    input: &'a ForwardInput,
    cache: &'a KvCache,
    rows: Rows<'a>,
    grads: &'a mut AdapterGrads,
}

impl Backward<'_> {
    /// One decoder layer: `dout` is the gradient of its output; returns that of its input.
    fn layer(&mut self, l: usize, acts: LayerActs, dout: Tensor) -> Result<Tensor> {
        let model = self.model;
        let (c, layer) = (&model.config, &model.weights.layers[l]);
        let n = self.input.tokens.len();
        let LayerActs { x, q, attn, mid, mlp } = acts;

        // MLP block: out = mid + mlp(norm(mid)).
        let h = ops::rms_norm(&mid, &layer.post_attention_norm, c.rms_norm_eps)?;
        let dh = match (&layer.mlp, &mlp) {
            (Mlp::Dense(m), MlpActs::Dense(a)) => self.dense_mlp(&h, m, l, DENSE_PROJS, a, &dout)?,
            (Mlp::Moe(m), MlpActs::Moe(a)) => self.moe_mlp(&h, m, l, a, &dout)?,
            (Mlp::Moe(m), MlpActs::ExpertParallel(a)) => self.moe_mlp_ep(&h, m, l, a, &dout)?,
            _ => return Err(Error::InvalidRequest(format!("backward: layer {l}'s activations are of another kind"))),
        };
        drop(mlp);
        // Column-parallel gate and up (and the MoE block's replicated router, whose upstream
        // gradient comes from row-parallel outputs) leave partial sums of dh on each rank.
        let dh = model.all_reduce(dh, Site::MlpBackward)?;
        let dmid = ops::add(&dout, &ops::rms_norm_backward(&mid, &layer.post_attention_norm, &dh, c.rms_norm_eps)?.0)?;

        // Attention block: mid = x + o(attention(rope(q(norm(x))), rope(k(..)), v(..))).
        let dattn = self.linear(&attn, &layer.o, l, Proj::O, &dmid)?;
        let (dq, dk_cache, dv_cache) = ops::paged_attention_backward(
            &q,
            &self.cache.k[l],
            &self.cache.v[l],
            &self.input.seqs,
            &attn.reshape([n, c.num_heads, c.head_dim])?,
            &dattn.reshape([n, c.num_heads, c.head_dim])?,
            model.attention_scale(),
        )?;
        let positions = &self.input.positions;
        let dq = ops::rope_backward(&dq, positions, &model.rope)?.reshape([n, c.num_heads * c.head_dim])?;
        let kv = [n, c.num_kv_heads * c.head_dim];
        let dk = ops::rope_backward(&ops::gather_kv(&dk_cache, &self.input.slots)?, positions, &model.rope)?;
        let dv = ops::gather_kv(&dv_cache, &self.input.slots)?;
        drop((dk_cache, dv_cache));
        let h = ops::rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
        let mut dh = self.linear(&h, &layer.q, l, Proj::Q, &dq)?;
        dh = ops::add(&dh, &self.linear(&h, &layer.k, l, Proj::K, &dk.reshape(kv)?)?)?;
        dh = ops::add(&dh, &self.linear(&h, &layer.v, l, Proj::V, &dv.reshape(kv)?)?)?;
        // Column-parallel q, k and v: partial sums again (a KV head replicated on several
        // ranks gets each rank's query heads' share, so the sum is whole).
        let dh = model.all_reduce(dh, Site::AttentionBackward)?;
        Ok(ops::add(&dmid, &ops::rms_norm_backward(&x, &layer.input_norm, &dh, c.rms_norm_eps)?.0)?)
    }

    /// `dx` of `y = x·Wᵀ + b + LoRA(x)` for upstream `dy`; the LoRA weight gradients go to
    /// `grads`. `x` is the projection's input.
    fn linear(&mut self, x: &Tensor, lin: &Linear, layer: usize, proj: Proj, dy: &Tensor) -> Result<Tensor> {
        let dx = ops::matmul(dy, &lin.weight, false, false)?;
        self.lora(x, layer, proj, dy, dx, self.rows.slots, None)
    }

    /// Adds the LoRA part of a projection's backward to `dx` (and its weight gradients to
    /// `grads`), for rows with adapter slots `slots` (and experts, for expert projections).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora(
        &mut self,
        x: &Tensor,
        layer: usize,
        proj: Proj,
        dy: &Tensor,
        dx: Tensor,
        slots: &[i32],
        experts: Option<&[u32]>,
    ) -> Result<Tensor> {
        let Some(table) = self.rows.adapters.lora(layer, proj) else { return Ok(dx) };
        let idx = table.row_indices(slots, experts);
        if idx.iter().all(|&i| i < 0) {
            return Ok(dx);
        }
        let mut dx = dx;
        let (da, dbt) = ops::bgmv_backward_into(&mut dx, x, &table.bank, &idx, dy)?;
        self.grads.add_lora((layer, proj), da, dbt)?;
        Ok(dx)
    }

    fn dense_mlp(
        &mut self,
        h: &Tensor,
        m: &DenseMlp,
        layer: usize,
        [g, u, d]: [Proj; 3],
        acts: &SwigluActs,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let act = ops::swiglu(&acts.gate, &acts.up)?;
        let dact = self.linear(&act, &m.down, layer, d, dy)?;
        drop(act);
        let (dgate, dup) = ops::swiglu_backward(&acts.gate, &acts.up, &dact)?;
        let dh = self.linear(h, &m.gate, layer, g, &dgate)?;
        Ok(ops::add(&dh, &self.linear(h, &m.up, layer, u, &dup)?)?)
    }

    fn moe_mlp(&mut self, h: &Tensor, m: &MoeMlp, layer: usize, acts: &MoeActs, dy: &Tensor) -> Result<Tensor> {
        let model = self.model;
        let moe = model.config.moe_at(layer).ok_or_else(|| Error::Format(format!("layer {layer} has no experts")))?;
        let n = h.shape()[0];
        let d = &acts.dispatch;
        // out[t] = Σ_pairs of t weight·down(pair) (+ the shared expert).
        let dpair = ops::gather_rows(dy, &d.token_of)?;
        let (ddown, dweight) = ops::scale_rows_backward(&acts.down, &d.weight, &dpair)?;
        drop(dpair);
        let x = ops::gather_rows(h, &d.token_of)?;
        let act = ops::swiglu(&acts.experts.gate, &acts.experts.up)?;
        let dact = self.experts(m, layer, d, &act, Proj::Down, &ddown)?;
        drop((act, ddown));
        let (dgate, dup) = ops::swiglu_backward(&acts.experts.gate, &acts.experts.up, &dact)?;
        let dx = self.experts(m, layer, d, &x, Proj::Gate, &dgate)?;
        let dx = ops::add(&dx, &self.experts(m, layer, d, &x, Proj::Up, &dup)?)?;
        let mut dh = ops::scatter_add_rows(&dx, &d.token_of, n)?;

        // Routing weights back to the router (no gradient through the choice of experts).
        let k = acts.routing.top_k;
        let mut dweights = vec![0.0; n * k];
        for (&p, g) in d.order.iter().zip(dweight.to_vec_f32()?) {
            dweights[p] = g;
        }
        let dweights = Tensor::from_vec(dweights, [n, k])?.to_device(model.device)?;
        let dlogits = ops::moe_gate_backward(&acts.router_logits, &acts.routing, &dweights, moe.renormalize)?;
        dh = ops::add(&dh, &self.linear(h, &m.router, layer, Proj::Router, &dlogits)?)?;
        self.add_shared_expert(dh, h, m, layer, acts.shared.as_ref(), dy)
    }

    /// `dh` plus the shared expert's part of the MoE layer's input gradient, where it has one.
    pub(super) fn add_shared_expert(
        &mut self,
        dh: Tensor,
        h: &Tensor,
        m: &MoeMlp,
        layer: usize,
        shared: Option<&SharedActs>,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let (Some((mlp, gate_lin)), Some(s)) = (&m.shared, shared) else { return Ok(dh) };
        // out += sigmoid(h·w_gate) · shared(h).
        let (dout, dgate) = ops::scale_rows_backward(&s.out, &s.gate, dy)?;
        let dh = ops::add(&dh, &self.dense_mlp(h, mlp, layer, SHARED_PROJS, &s.mlp, &dout)?)?;
        let (g, dg) = (s.gate.to_vec_f32()?, dgate.to_vec_f32()?);
        let dlogit: Vec<f32> = g.iter().zip(&dg).map(|(g, d)| d * g * (1.0 - g)).collect();
        let dlogit = Tensor::from_vec(dlogit, [h.shape()[0], 1])?.to_device(self.model.device)?;
        Ok(ops::add(&dh, &self.linear(h, gate_lin, layer, Proj::SharedExpertGate, &dlogit)?)?)
    }

    /// `dx` of one expert projection over the dispatched pairs: base experts (frozen), ESFT
    /// replacements (their weight gradients go to `grads`) and expert LoRA.
    pub(super) fn experts(
        &mut self,
        m: &MoeMlp,
        layer: usize,
        d: &Dispatch,
        x: &Tensor,
        proj: Proj,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let projs = ExpertProjs { m, layer, rows: &self.rows, dispatch: d };
        let (base_w, esft_w) = projs.weights(proj);
        let (mut dx, _) = ops::grouped_matmul_backward(x, base_w, &d.base, dy, false)?;
        // (ESFT replacements no pair was routed to have no gradient, rather than a zero one.)
        if let Some(w) = esft_w.filter(|_| d.replaced.iter().any(|(_, _, i)| i >= 0)) {
            let (dx_esft, dw) = ops::grouped_matmul_backward(x, w, &d.replaced, dy, true)?;
            dx = ops::add(&dx, &dx_esft)?;
            if let Some(dw) = dw {
                self.grads.add_esft((layer, proj), dw)?;
            }
        }
        self.lora(x, layer, proj, dy, dx, &d.slot_of, Some(&d.expert_of))
    }
}
