//! What one iteration runs: the requests admitted, the batch of their next tokens under the
//! token budget the time target allows, the fine-tuning microbatches that fit beside them, and
//! the time left for backward layers of the microbatches in flight.

use std::time::{Duration, Instant};

use tandem_kernels::ops::SeqAttention;

use super::coserve::Planned;
use super::pool::PageUse;
use super::{Engine, Sequence};
use crate::error::Result;
use crate::model::ForwardInput;

/// One iteration, as scheduled.
pub(super) struct Iteration {
    /// The inference rows: decode tokens first, then prefill chunks.
    pub input: ForwardInput,
    /// (running index, tokens scheduled) per sequence, in batch order.
    pub scheduled: Vec<(usize, usize)>,
    /// The inference rows' adapter versions, by id in slot order.
    pub adapters: Vec<u64>,
    /// Fine-tuning microbatches whose rows join the pass.
    pub finetune: Option<Planned>,
    /// What the planned forward pass leaves of the time budget, for backward layers.
    pub backward_time: Duration,
}

impl Engine {
    /// The next iteration; `None` when there is nothing to run.
    pub(super) fn schedule(&mut self) -> Result<Option<Iteration>> {
        self.admit()?;
        let decoding = self.running.iter().filter(|s| s.computed >= s.prompt_len).count();
        // A decoding request waits from one sample to the next: this iteration gets the target
        // minus what already passed since the last sample (the loss of the last iteration's
        // fine-tuning rows, this iteration's admission).
        let since = match self.last_sample {
            Some(t) if decoding > 0 => t.elapsed().as_secs_f64(),
            _ => 0.0,
        };
        let limit = self.budget.limit() - since;
        let inference_tokens = match self.budget.forward.units_within(limit.max(0.0)) {
            Some(n) => n.max(decoding + self.cfg.block_size).min(self.cfg.max_batch_tokens),
            None => self.cfg.max_batch_tokens,
        };
        let (input, scheduled, adapters) = self.build_batch(inference_tokens);
        let n_inf = input.tokens.len();
        let finetune = self.plan_finetune(n_inf, adapters.len(), limit);
        if scheduled.is_empty() && finetune.is_none() && self.training.in_flight.is_empty() {
            return Ok(None);
        }
        let mut planned = self.inference_cost(n_inf);
        if let Some(p) = &finetune {
            planned += self.budget.finetune.predict_high(p.input.tokens.len()).unwrap_or(0.0);
        }
        // (Capped: a target of `Duration::MAX`, throughput runs, must not overflow the clock.)
        let backward_time = Duration::from_secs_f64((limit - planned).clamp(0.0, 3600.0));
        Ok(Some(Iteration { input, scheduled, adapters, finetune, backward_time }))
    }

    /// The predicted seconds of a forward pass over `n_inf` inference tokens.
    pub(super) fn inference_cost(&self, n_inf: usize) -> f64 {
        if n_inf > 0 { self.budget.forward.predict(n_inf).unwrap_or(0.0) } else { 0.0 }
    }

    /// Fine-tuning microbatches for an iteration whose inference part has `n_inf` tokens over
    /// `slots` adapters: as many as the time left by the inference tokens holds. With no
    /// inference at all, or before the costs are measured, one runs whatever its cost.
    fn plan_finetune(&mut self, n_inf: usize, slots: usize, limit: f64) -> Option<Planned> {
        let inference = self.inference_cost(n_inf);
        let (budget, paged, pool) = (&self.budget, &mut self.paged, &mut self.pool);
        let unmeasured = budget.finetune.predict(1).is_none();
        let mut first = true;
        let fits = |tokens: usize| {
            let cost = inference + budget.finetune.predict_high(tokens).unwrap_or(0.0);
            let ok = cost <= limit || (first && (n_inf == 0 || unmeasured));
            first = false;
            ok
        };
        let pages = |n: usize| if paged.make_room(n, pool) { pool.alloc(n, PageUse::Kv) } else { None };
        self.training.plan(slots, self.cfg.block_size, fits, pages)
    }

    /// Moves waiting requests into the running set, first come first served, while their KV
    /// pages (prompt plus `max_tokens`, reserved up front so nothing is ever preempted) and their
    /// adapter's pages fit, evicting idle adapters for room. Then pages in the adapters of the
    /// requests next in line, into free pages only.
    fn admit(&mut self) -> Result<()> {
        while self.running.len() < self.cfg.max_running {
            let Some(seq) = self.waiting.front() else { break };
            let need = (seq.prompt_len + seq.max_tokens).div_ceil(self.cfg.block_size);
            let adapter = seq.adapter.clone();
            if let Some(v) = &adapter
                && !self.paged.acquire(v, &mut self.pool, &mut self.cache)?
            {
                break;
            }
            let blocks = match self.paged.make_room(need, &mut self.pool) {
                true => self.pool.alloc(need, PageUse::Kv),
                false => None,
            };
            let Some(blocks) = blocks else {
                if let Some(v) = &adapter {
                    self.paged.release(v.id, &mut self.pool);
                }
                break;
            };
            let Some(mut seq) = self.waiting.pop_front() else { break };
            seq.blocks = blocks;
            seq.scheduled_at = Some(Instant::now());
            self.running.push(seq);
        }
        for seq in self.waiting.iter().take(self.cfg.max_running) {
            if let Some(v) = &seq.adapter {
                self.paged.prefetch(v, &mut self.pool, &mut self.cache)?;
            }
        }
        Ok(())
    }

    /// Decode tokens first, then prefill chunks, within the token budget. Returns the batch and
    /// (running index, tokens scheduled) per sequence in batch order.
    /// Also returns the ids of the batch's adapter versions, in slot order.
    fn build_batch(&self, max_tokens: usize) -> (ForwardInput, Vec<(usize, usize)>, Vec<u64>) {
        let mut budget = max_tokens;
        let mut ids: Vec<u64> = Vec::new();
        let mut scheduled = Vec::new();
        let decoding = |s: &Sequence| s.computed >= s.prompt_len;
        // The decoding sequences the budget holds, chosen in running order so that none
        // starves, then grouped by adapter: the LoRA kernels find each adapter's rows side by
        // side and add its delta straight into them.
        let mut decode: Vec<usize> = (0..self.running.len())
            .filter(|&i| decoding(&self.running[i]) && self.running[i].tokens.len() > self.running[i].computed)
            .take(max_tokens)
            .collect();
        decode.sort_by_key(|&i| self.running[i].adapter.as_ref().map(|v| v.id));
        let order = decode.into_iter().chain((0..self.running.len()).filter(|&i| !decoding(&self.running[i])));
        let mut input = ForwardInput::default();
        for (i, seq) in order.map(|i| (i, &self.running[i])) {
            let chunk = (seq.tokens.len() - seq.computed).min(budget);
            if chunk == 0 {
                continue;
            }
            budget -= chunk;
            let (start, end) = (seq.computed, seq.computed + chunk);
            let bs = self.cfg.block_size;
            input.tokens.extend_from_slice(&seq.tokens[start..end]);
            input.positions.extend((start..end).map(|p| p as u32));
            input.slots.extend((start..end).map(|p| seq.blocks[p / bs] * bs as u32 + (p % bs) as u32));
            let slot = match &seq.adapter {
                None => -1,
                Some(v) => match ids.iter().position(|&id| id == v.id) {
                    Some(p) => p as i32,
                    None => {
                        ids.push(v.id);
                        ids.len() as i32 - 1
                    }
                },
            };
            input.adapters.extend(std::iter::repeat_n(slot, chunk));
            input.seqs.push(SeqAttention { q_len: chunk, context_len: end, block_table: seq.blocks.clone() });
            if seq.embedding.is_some() {
                input.embed_rows.extend((input.tokens.len() - chunk) as u32..input.tokens.len() as u32);
            } else if end == seq.tokens.len() {
                input.logit_rows.push((input.tokens.len() - 1) as u32);
            }
            scheduled.push((i, chunk));
        }
        (input, scheduled, ids)
    }
}
