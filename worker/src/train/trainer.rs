//! Many fine-tuning jobs over one frozen base, trained together: every pass takes the next
//! microbatch of each unfinished job and runs them as one multi-LoRA batch (the base GEMMs once
//! for all rows, each job's adapter on its own rows); each job then accumulates its own
//! gradients and steps its own optimizer on its own schedule.

use super::data::Example;
use super::job::{Job, StepReport};
use super::step::{TrainSeq, evaluate, forward_backward};
use crate::adapters::set::{Adapter, AdapterSet};
use crate::error::Result;
use crate::model::{AdapterGrads, Model};

/// Examples evaluated per forward pass in validation.
const EVAL_BATCH: usize = 16;

pub struct Trainer<'m> {
    model: &'m Model,
    pub jobs: Vec<Job>,
}

/// What one pass did: the optimizer steps it completed, and the tokens it ran.
#[derive(Debug, Default)]
pub struct PassReport {
    pub steps: Vec<StepReport>,
    pub tokens: usize,
}

impl<'m> Trainer<'m> {
    pub fn new(model: &'m Model, jobs: Vec<Job>) -> Self {
        Trainer { model, jobs }
    }

    pub fn is_finished(&self) -> bool {
        self.jobs.iter().all(Job::is_finished)
    }

    /// One forward and backward pass over the next microbatch of every unfinished job.
    pub fn pass(&mut self) -> Result<PassReport> {
        let mut running = Vec::new();
        for (j, job) in self.jobs.iter_mut().enumerate() {
            if let Some(mb) = job.next_microbatch() {
                running.push((j, mb));
            }
        }
        if running.is_empty() {
            return Ok(PassReport::default());
        }
        // Every job keeps its whole adapter; a tensor-parallel shard runs its cut of it (the
        // gradients come back whole, so the optimizer step is the same on every rank).
        let shards = (running.iter())
            .map(|&(j, _)| self.model.shard_adapter(&self.jobs[j].weights.adapter()))
            .collect::<Result<Vec<_>>>()?;
        let set = AdapterSet::new(shards, self.model.device)?;
        let mut seqs = Vec::new();
        for (slot, (j, mb)) in running.iter().enumerate() {
            for &i in &mb.examples {
                seqs.push(TrainSeq { example: self.jobs[*j].example(i), slot, loss_weight: mb.loss_weight });
            }
        }
        let tokens = seqs.iter().map(|s| s.example.tokens.len()).sum();
        let mut grads = AdapterGrads::default();
        let losses = forward_backward(self.model, &set, &seqs, &mut grads)?;
        drop(seqs);
        let mut report = PassReport { steps: Vec::new(), tokens };
        let mut first = 0;
        for (slot, (j, mb)) in running.iter().enumerate() {
            let loss: f64 = losses[first..first + mb.examples.len()].iter().sum();
            first += mb.examples.len();
            if let Some(step) = self.jobs[*j].microbatch_done(&set, &grads, slot, &mb.examples, loss)? {
                report.steps.push(step);
            }
        }
        Ok(report)
    }

    /// Mean token loss of job `j`'s adapter on `examples` (validation).
    pub fn evaluate(&self, j: usize, examples: &[Example]) -> Result<f64> {
        validation_loss(self.model, self.model.shard_adapter(&self.jobs[j].weights.adapter())?, examples)
    }
}

/// Mean token loss of `adapter` (this shard's cut of it, on a tensor-parallel shard) over
/// `model` on `examples` (validation).
pub fn validation_loss(model: &Model, adapter: Adapter, examples: &[Example]) -> Result<f64> {
    let set = AdapterSet::new(vec![adapter], model.device)?;
    let (mut sum, mut count) = (0.0, 0);
    for chunk in examples.chunks(EVAL_BATCH) {
        let seqs: Vec<TrainSeq<'_>> =
            chunk.iter().map(|e| TrainSeq { example: e, slot: 0, loss_weight: 1.0 }).collect();
        sum += evaluate(model, &set, &seqs)?.iter().sum::<f64>();
        count += chunk.iter().map(Example::loss_tokens).sum::<usize>();
    }
    Ok(sum / count.max(1) as f64)
}
