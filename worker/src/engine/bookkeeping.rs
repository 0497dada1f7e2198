//! What an iteration leaves behind: each request's sampled token, its latency figures and, when
//! it finishes, its pages given back; the fine-tuning rows' losses booked to their jobs and
//! their backward put in flight; a finished backward's gradients handed to its jobs, whose
//! completed optimizer steps publish new weights; and the measured costs the budget plans from.

use std::time::Instant;

use rayon::prelude::*;

use super::coserve::{InFlight, Member, MicrobatchTrace, Planned, StepTrace, spend};
use super::execute::Ran;
use super::pool::PageUse;
use super::{Engine, GenerationOutput, Progress, Sequence, Timings};
use crate::adapters::AdapterSet;
use crate::error::Result;
use crate::model::{AdapterGrads, Trained};
use crate::sampling::{FinishReason, Sampled};

impl Engine {
    /// Books what an iteration's forward pass produced; returns the requests that finished.
    pub(super) fn book(&mut self, ran: Ran) -> Result<Vec<GenerationOutput>> {
        let outputs = self.sample(&ran.scheduled, &ran.logits, &ran.embedded)?;
        match ran.finetune {
            None => self.budget.forward.observe(ran.n_inf, ran.started.elapsed().as_secs_f64()),
            Some((planned, adapters, trained)) => {
                let rows = trained.backward.tokens();
                self.queue_backward(planned, adapters, trained, ran.first_slot, ran.started);
                // What the fine-tuning rows added to the iteration: packing their adapters,
                // their share of the forward pass, their loss.
                let inference = self.inference_cost(ran.n_inf);
                let finetune = (ran.started.elapsed().as_secs_f64() - inference).max(0.0);
                self.budget.finetune.observe(rows, finetune);
                if let Some(batch) = self.training.in_flight.back() {
                    spend(&mut self.training.jobs, &batch.members, finetune);
                }
            }
        }
        Ok(outputs)
    }

    /// Books the planned microbatches' losses to their jobs and puts their backward in
    /// flight. The jobs' adapters have slots from `first_slot`.
    fn queue_backward(&mut self, p: Planned, adapters: AdapterSet, trained: Trained, first_slot: usize, at: Instant) {
        let mut members = Vec::new();
        let mut row = 0;
        for (i, (j, mb)) in p.microbatches.into_iter().enumerate() {
            let job = &mut self.training.jobs[j];
            let len: usize = mb.examples.iter().map(|&e| job.job.example(e).tokens.len()).sum();
            let loss = trained.losses[row..row + len].iter().map(|&l| l as f64).sum();
            row += len;
            job.tokens += len as u64;
            let (name, slot) = (job.job.spec.name.clone(), first_slot + i);
            members.push(Member { job: name, slot, examples: mb.examples, tokens: len, loss });
        }
        let tokens = trained.backward.tokens() as u64;
        self.counters.last.finetune = tokens;
        self.counters.tokens.finetune += tokens;
        let id = self.training.next_id;
        self.training.next_id += 1;
        self.training.in_flight.push_back(InFlight {
            id,
            backward: trained.backward,
            adapters,
            grads: AdapterGrads::default(),
            members,
            blocks: p.blocks,
            forward: (at, Instant::now()),
            backward_slices: Vec::new(),
        });
    }

    /// The oldest batch in flight, whose backward completed: its pages go back, and each of
    /// its jobs gets its gradients; a job whose optimizer step that completes publishes its new
    /// weights.
    pub(super) fn finish_in_flight(&mut self) -> Result<()> {
        let t = Instant::now();
        let Some(batch) = self.training.in_flight.pop_front() else { return Ok(()) };
        self.pool.release(&batch.blocks, PageUse::Kv);
        for m in &batch.members {
            let Some(job) = self.training.job_mut(&m.job) else { continue };
            let report = job.job.microbatch_done(&batch.adapters, &batch.grads, m.slot, &m.examples, m.loss)?;
            let (forward, backward) = (batch.forward, batch.backward_slices.clone());
            job.microbatches.push(MicrobatchTrace { tokens: m.tokens, forward, backward, done: Instant::now() });
            if let Some(report) = report {
                let microbatches = std::mem::take(&mut job.microbatches);
                let (name, step, loss) = (m.job.clone(), report.step, report.loss);
                if self.step_traces.len() == super::STEP_TRACES {
                    self.step_traces.remove(0);
                }
                self.step_traces.push(StepTrace { job: name, step, loss, microbatches });
                job.last_loss = Some(report.loss);
                let (step, whole) = (report.step, job.job.weights.adapter());
                self.reports.push(report);
                self.publish_job_weights(&m.job, step, whole)?;
            }
        }
        let seconds = t.elapsed().as_secs_f64();
        self.budget.finish.observe(batch.members.len(), seconds);
        spend(&mut self.training.jobs, &batch.members, seconds);
        Ok(())
    }

    /// Samples the next token of each sequence whose scheduled tokens reached its end, adds
    /// embedding requests' rows (`embedded`, in batch order) to their sums, and retires the
    /// finished ones.
    fn sample(
        &mut self,
        scheduled: &[(usize, usize)],
        logits: &[f32],
        embedded: &[f32],
    ) -> Result<Vec<GenerationOutput>> {
        let vocab = self.model.config.vocab_size;
        let target = self.cfg.tpot_target.as_secs_f64();
        let now = Instant::now();
        if let Some(last) = self
            .last_sample
            .filter(|_| scheduled.iter().any(|&(i, _)| self.running[i].computed >= self.running[i].prompt_len))
        {
            self.budget.observe_wait((now - last).as_secs_f64());
        }
        self.last_sample = Some(now);
        // A row of logits for each sequence whose scheduled tokens reach its end. Each sampler
        // reads a whole vocabulary, so they run in parallel rather than one after another.
        let mut rows = vec![None; self.running.len()];
        for (row, &(i, _)) in scheduled
            .iter()
            .filter(|&&(i, chunk)| self.running[i].computed + chunk >= self.running[i].tokens.len())
            .filter(|&&(i, _)| self.running[i].embedding.is_none())
            .enumerate()
        {
            rows[i] = Some(row);
        }
        let mut sampled: Vec<Option<Sampled>> = self
            .running
            .par_iter_mut()
            .zip(&rows)
            .map(|(seq, row)| row.map(|r| seq.sampler.sample(&logits[r * vocab..(r + 1) * vocab])))
            .collect();
        let mut finished = Vec::new();
        // The embedding requests' rows, in batch order.
        let mut embedded = embedded.chunks_exact(self.model.config.hidden_size);
        for &(i, chunk) in scheduled {
            let seq = &mut self.running[i];
            if seq.computed >= seq.prompt_len {
                self.counters.last.decode += chunk as u64;
            } else {
                self.counters.last.prefill += chunk as u64;
            }
            seq.computed += chunk;
            if let Some(sum) = seq.embedding.as_mut() {
                sum.resize(self.model.config.hidden_size, 0.0);
                for row in embedded.by_ref().take(chunk) {
                    sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                }
                if seq.computed >= seq.prompt_len {
                    finished.push((i, FinishReason::Stop, String::new()));
                }
                continue;
            }
            let Some(sampled) = sampled[i].take() else {
                continue; // a prefill chunk that did not reach the end of the prompt
            };
            seq.tokens.push(sampled.token);
            seq.logprobs.push(sampled.logprob);
            if !sampled.top.is_empty() {
                seq.top_logprobs.push(sampled.top.clone());
            }
            match seq.last_token_at {
                None => {
                    self.counters.ttft.push((now - seq.submitted_at).as_secs_f64());
                    seq.first_token_at = Some(now);
                }
                Some(t) => {
                    seq.decode_batches += 1;
                    let gap = (now - t).as_secs_f64();
                    self.counters.tpot.push(gap);
                    self.counters.timed += 1;
                    self.counters.within_target += u64::from(gap <= target);
                }
            }
            seq.last_token_at = Some(now);
            let generated = &seq.tokens[seq.prompt_len..];
            let text = match &self.tokenizer {
                Some(t) => t.decode(generated, true)?,
                None => String::new(),
            };
            if let Some(f) = seq.stop.check(generated, &text) {
                finished.push((i, f.reason, f.text.to_string()));
            } else {
                // A trailing U+FFFD is a character whose bytes are still coming.
                let settled = seq.stop.streamable_len(text.trim_end_matches('\u{FFFD}')).max(seq.streamed);
                let new_text = text.get(seq.streamed..settled).unwrap_or_default().to_string();
                seq.streamed = settled;
                self.progress.push(Progress {
                    index: seq.index,
                    token: sampled.token,
                    logprob: sampled.logprob,
                    top_logprobs: sampled.top,
                    text: new_text,
                });
            }
        }
        self.counters.tokens.decode += self.counters.last.decode;
        self.counters.tokens.prefill += self.counters.last.prefill;
        // Remove finished sequences from the back so the indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut outputs = Vec::with_capacity(finished.len());
        for (i, reason, text) in finished {
            let seq = self.retire(i);
            self.timings.push(Timings {
                index: seq.index,
                submitted: seq.submitted_at,
                scheduled: seq.scheduled_at.unwrap_or(seq.submitted_at),
                first_token: seq.first_token_at.unwrap_or(now),
                finished: now,
                decode_batches: seq.decode_batches,
            });
            outputs.push(GenerationOutput {
                index: seq.index,
                prompt_tokens: seq.prompt_len,
                token_ids: seq.tokens[seq.prompt_len..].to_vec(),
                logprobs: seq.logprobs,
                top_logprobs: seq.top_logprobs,
                embedding: seq.embedding.map(unit_length).unwrap_or_default(),
                text,
                finish_reason: reason,
            });
        }
        Ok(outputs)
    }

    /// Takes running sequence `i` out, giving back its KV pages and its hold on its adapter.
    pub(super) fn retire(&mut self, i: usize) -> Sequence {
        let mut seq = self.running.swap_remove(i);
        self.pool.release(&seq.blocks, PageUse::Kv);
        if let Some(id) = seq.adapter.take().map(|v| v.id) {
            self.paged.release(id, &mut self.pool); // after dropping our hold on the version
        }
        seq
    }
}

/// An embedding request's sum of hidden states as its embedding: their mean, scaled to length 1
/// (which the mean's scale does not change).
fn unit_length(mut sum: Vec<f32>) -> Vec<f32> {
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
    sum.iter_mut().for_each(|x| *x /= norm.max(f32::MIN_POSITIVE));
    sum
}
