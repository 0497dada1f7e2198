//! Expert parallelism ([`MoeSplit::Experts`](super::tensor_parallel::MoeSplit)): each rank of
//! the group holds `num_experts / world` whole experts of every MoE layer, and the ESFT experts
//! that replace them. The rest of the model is tensor-parallel as usual, so a MoE block's input
//! is the same on every rank; each rank takes its own share of the tokens (contiguous rows),
//! routes them, and one all-to-all carries every (token, expert) pair to the expert's rank: the
//! token's hidden state, the expert, and the token's adapter slot (so the expert's rank applies
//! that adapter's expert LoRA or its ESFT replacement). A second all-to-all brings each pair's
//! output back; the owner weights and sums its tokens' pairs, and the block's all-reduce (which
//! the shared expert's row-parallel output needs anyway) makes every token whole on every rank.
//!
//! The backward pass runs the same trips in reverse: the pairs' output gradients out, their
//! input gradients back. Adapter slots mean the same on every rank (every rank builds its
//! [`AdapterSet`](crate::adapters::AdapterSet) from the same adapters in the same order).

use std::ops::Range;

use tandem_kernels::Tensor;
use tandem_kernels::ops::{self, MoeRouting};

use super::Model;
use super::backward::Backward;
use super::forward::{Dispatch, ExpertProjs, Rows, SharedActs, SwigluActs};
use super::tensor_parallel::{Site, TensorParallel, split};
use super::weights::MoeMlp;
use crate::adapters::Proj;
use crate::error::{Error, Result};

/// What a MoE layer under expert parallelism keeps for its backward pass.
pub(super) struct EpActs {
    /// The rows of the batch this rank routes (its share of the tokens), and their slots.
    chunk: Vec<u32>,
    chunk_slots: Vec<i32>,
    /// The router's logits and choices for those rows (`None` when the share is empty).
    routed: Option<(Tensor, MoeRouting)>,
    /// This rank's pairs (`token·top_k + choice` over its share) in the order they were sent:
    /// grouped by the rank of their expert, with how many went to each rank.
    sent: Vec<usize>,
    sent_counts: Vec<usize>,
    /// Each of this rank's pairs' expert output, in pair order, `[pairs, hidden]`.
    down: Tensor,
    /// The pairs this rank's experts ran: how many came from each rank, their dispatch (over
    /// the received rows), their inputs and SwiGLU halves in dispatch order.
    received_counts: Vec<usize>,
    dispatch: Dispatch,
    x: Tensor,
    experts: SwigluActs,
    pub(super) shared: Option<SharedActs>,
}

impl EpActs {
    /// The experts this rank's share of the tokens chose (top-k per token), and k.
    pub(super) fn routed_experts(&self) -> Option<(&[u32], usize)> {
        self.routed.as_ref().map(|(_, r)| (&r.experts[..], r.top_k))
    }
}

/// The experts of a rank: rank `r` holds `r·E/w .. (r+1)·E/w`.
fn owner(expert: u32, per_rank: usize) -> usize {
    expert as usize / per_rank
}

/// Rows of `flat` (`width` floats each) regrouped from `order` (row `i` of `flat` is item
/// `order[i]`) into item order.
fn unsort_rows(flat: &[f32], order: &[usize], width: usize) -> Vec<f32> {
    let mut out = vec![0.0; flat.len()];
    for (i, &p) in order.iter().enumerate() {
        out[p * width..(p + 1) * width].copy_from_slice(&flat[i * width..(i + 1) * width]);
    }
    out
}

/// `flat` (rows of `width` floats) cut into consecutive parts of `counts[i]` rows.
fn cut_rows(flat: &[f32], counts: &[usize], width: usize) -> Vec<Vec<f32>> {
    let mut at = 0;
    counts
        .iter()
        .map(|&c| {
            at += c * width;
            flat[at - c * width..at].to_vec()
        })
        .collect()
}

impl TensorParallel {
    /// An all-to-all of rows of `width` floats, checking that what came back is whole rows.
    fn exchange_rows(&self, site: Site, parts: Vec<Vec<f32>>, width: usize) -> Result<Vec<Vec<f32>>> {
        let got = self.counted(site, || self.comm.all_to_all(parts))?;
        match got.iter().position(|p| !p.len().is_multiple_of(width)) {
            Some(from) => Err(Error::Collective {
                message: format!("expert dispatch: rank {from} sent a partial row"),
                culprit: Some(from),
            }),
            None => Ok(got),
        }
    }
}

impl Model {
    /// A MoE layer whose experts `mine` are this rank's (see the module docs). Returns the
    /// layer's output as a partial sum (this rank's tokens' routed part, plus the shared
    /// expert's slice) for the block's all-reduce.
    pub(super) fn moe_mlp_ep(
        &self,
        h: &Tensor,
        m: &MoeMlp,
        layer: usize,
        rows: &Rows<'_>,
        mine: Range<usize>,
    ) -> Result<(Tensor, EpActs)> {
        let tp = self.tp.as_ref().ok_or_else(|| Error::InvalidRequest("expert parallelism without a group".into()))?;
        let moe = self.config.moe_at(layer).ok_or_else(|| Error::Format(format!("layer {layer} has no experts")))?;
        let (world, rank) = (tp.comm.world_size(), tp.comm.rank());
        let (n, hidden, k) = (h.shape()[0], self.config.hidden_size, moe.top_k);
        let per_rank = moe.num_experts / world;

        // Route this rank's share of the tokens.
        let share = split(n, world, rank);
        let chunk: Vec<u32> = (share.start as u32..share.end as u32).collect();
        let chunk_slots: Vec<i32> = chunk.iter().map(|&t| rows.slots[t as usize]).collect();
        // This rank's rows only (not the whole batch's hidden states) go to the host to be sent.
        let (routed, h_data) = if chunk.is_empty() {
            (None, Vec::new())
        } else {
            let hc = ops::gather_rows(h, &chunk)?;
            let logits =
                Rows { slots: &chunk_slots, adapters: rows.adapters }.linear(&hc, &m.router, layer, Proj::Router)?;
            let routing = ops::moe_gate(&logits, k, moe.renormalize)?;
            (Some((logits, routing)), hc.to_vec_f32()?)
        };
        let chosen: &[u32] = routed.as_ref().map_or(&[], |(_, r)| &r.experts);

        // Out: each pair's hidden state, expert and adapter slot, to the expert's rank.
        let mut sent: Vec<usize> = (0..chosen.len()).collect();
        sent.sort_by_key(|&p| owner(chosen[p], per_rank));
        let mut sent_counts = vec![0; world];
        let mut parts = vec![Vec::new(); world];
        for &p in &sent {
            let (t, e) = (p / k, chosen[p]);
            let to = owner(e, per_rank);
            sent_counts[to] += 1;
            parts[to].extend_from_slice(&h_data[t * hidden..(t + 1) * hidden]);
            // Small integers, exact in f32.
            parts[to].extend([e as f32, chunk_slots[t] as f32]);
        }
        let width = hidden + 2;
        let received = tp.exchange_rows(Site::Experts, parts, width)?;

        // This rank's experts over the pairs it received (row i of `x` is pair i).
        let received_counts: Vec<usize> = received.iter().map(|p| p.len() / width).collect();
        let (mut x, mut pairs, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        for row in received.iter().flat_map(|p| p.chunks_exact(width)) {
            let e = row[hidden] as u32;
            if !mine.contains(&(e as usize)) {
                return Err(Error::collective(format!("expert dispatch: expert {e} is not on rank {rank}")));
            }
            pairs.push((pairs.len() as u32, e));
            slots.push(row[hidden + 1] as i32);
            x.extend_from_slice(&row[..hidden]);
        }
        let count = pairs.len();
        let dispatch =
            Dispatch::sorted(&pairs, &slots, vec![1.0; count], rows.adapters, layer, mine.start as u32, self)?;
        let x = Tensor::from_vec(x, [count, hidden])?.to_device(self.device)?;
        let (x, gate, up, down) = if count == 0 {
            // No pair for this rank's experts: nothing to run (kernels want rows).
            (x.clone(), x.clone(), x, Vec::new())
        } else {
            let x = ops::gather_rows(&x, &dispatch.token_of)?;
            let projs = ExpertProjs { m, layer, rows, dispatch: &dispatch };
            let (gate, up) = (projs.forward(&x, Proj::Gate)?, projs.forward(&x, Proj::Up)?);
            let down = projs.forward(&ops::swiglu(&gate, &up)?, Proj::Down)?;
            (x, gate, up, ops::scatter_add_rows(&down, &dispatch.token_of, count)?.to_vec_f32()?)
        };

        // Back: each pair's output to the rank that sent it, in the order it came.
        let returned = tp.exchange_rows(Site::Experts, cut_rows(&down, &received_counts, hidden), hidden)?;
        let returned: Vec<f32> = returned.concat();
        if returned.len() != sent.len() * hidden {
            return Err(Error::collective("expert dispatch: outputs do not match the pairs sent"));
        }
        let down =
            Tensor::from_vec(unsort_rows(&returned, &sent, hidden), [sent.len(), hidden])?.to_device(self.device)?;
        let mut out = Tensor::zeros([n, hidden], h.dtype(), self.device)?;
        if let Some((_, routing)) = &routed {
            let weight = routing.weights.clone().reshape([chosen.len()])?;
            let token_of: Vec<u32> = (0..chosen.len()).map(|p| chunk[p / k]).collect();
            out = ops::scatter_add_rows(&ops::scale_rows(&down, &weight)?, &token_of, n)?;
        }
        let (out, shared) = self.add_shared_expert(out, h, m, layer, rows)?;
        let experts = SwigluActs { gate, up };
        let acts = EpActs {
            chunk,
            chunk_slots,
            routed,
            sent,
            sent_counts,
            down,
            received_counts,
            dispatch,
            x,
            experts,
            shared,
        };
        Ok((out, acts))
    }
}

impl Backward<'_> {
    /// The backward of [`Model::moe_mlp_ep`]: `dy` is the gradient of the block's output (the
    /// same on every rank); returns this rank's partial gradient of its input.
    pub(super) fn moe_mlp_ep(
        &mut self,
        h: &Tensor,
        m: &MoeMlp,
        layer: usize,
        a: &EpActs,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let model = self.model;
        let tp = model.tp.as_ref().ok_or_else(|| Error::InvalidRequest("expert parallelism without a group".into()))?;
        let moe = model.config.moe_at(layer).ok_or_else(|| Error::Format(format!("layer {layer} has no experts")))?;
        let (n, hidden, k) = (h.shape()[0], model.config.hidden_size, moe.top_k);
        let pairs = a.sent.len();
        let token_of: Vec<u32> = (0..pairs).map(|p| a.chunk[p / k]).collect();

        // This rank's pairs: out[t] = Σ weight · down(pair).
        let (ddown, dweight) = match &a.routed {
            Some((_, routing)) => {
                let weight = routing.weights.clone().reshape([pairs])?;
                let (ddown, dweight) = ops::scale_rows_backward(&a.down, &weight, &ops::gather_rows(dy, &token_of)?)?;
                (ddown.to_vec_f32()?, dweight.to_vec_f32()?)
            }
            None => (Vec::new(), Vec::new()),
        };
        let mut parts = vec![Vec::new(); a.sent_counts.len()];
        let mut at = 0;
        for (to, &c) in a.sent_counts.iter().enumerate() {
            for &p in &a.sent[at..at + c] {
                parts[to].extend_from_slice(&ddown[p * hidden..(p + 1) * hidden]);
            }
            at += c;
        }
        let received = tp.exchange_rows(Site::ExpertsBackward, parts, hidden)?.concat();

        // This rank's experts, over the pairs they ran.
        let d = &a.dispatch;
        let count = d.token_of.len();
        let dx = if count == 0 {
            Vec::new()
        } else {
            let dout = Tensor::from_vec(received, [count, hidden])?.to_device(model.device)?;
            let dout = ops::gather_rows(&dout, &d.token_of)?;
            let act = ops::swiglu(&a.experts.gate, &a.experts.up)?;
            let dact = self.experts(m, layer, d, &act, Proj::Down, &dout)?;
            let (dgate, dup) = ops::swiglu_backward(&a.experts.gate, &a.experts.up, &dact)?;
            let dx = self.experts(m, layer, d, &a.x, Proj::Gate, &dgate)?;
            let dx = ops::add(&dx, &self.experts(m, layer, d, &a.x, Proj::Up, &dup)?)?;
            ops::scatter_add_rows(&dx, &d.token_of, count)?.to_vec_f32()?
        };
        let returned = tp.exchange_rows(Site::ExpertsBackward, cut_rows(&dx, &a.received_counts, hidden), hidden)?;
        let returned: Vec<f32> = returned.concat();
        if returned.len() != pairs * hidden {
            return Err(Error::collective("expert dispatch: gradients do not match the pairs sent"));
        }
        let mut dh = Tensor::zeros([n, hidden], h.dtype(), model.device)?;
        if let Some((logits, routing)) = &a.routed {
            let dx_pairs = Tensor::from_vec(unsort_rows(&returned, &a.sent, hidden), [pairs, hidden])?;
            dh = ops::scatter_add_rows(&dx_pairs.to_device(model.device)?, &token_of, n)?;
            // Routing weights back to the router, for this rank's tokens.
            let dweights = Tensor::from_vec(dweight, [a.chunk.len(), k])?.to_device(model.device)?;
            let dlogits = ops::moe_gate_backward(logits, routing, &dweights, moe.renormalize)?;
            let hc = ops::gather_rows(h, &a.chunk)?;
            let dx = ops::matmul(&dlogits, &m.router.weight, false, false)?;
            let dx = self.lora(&hc, layer, Proj::Router, &dlogits, dx, &a.chunk_slots, None)?;
            dh = ops::add(&dh, &ops::scatter_add_rows(&dx, &a.chunk, n)?)?;
        }
        self.add_shared_expert(dh, h, m, layer, a.shared.as_ref(), dy)
    }
}
