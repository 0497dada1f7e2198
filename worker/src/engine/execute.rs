//! Running an iteration: backward layers of the microbatches in flight, then one forward pass
//! over the inference rows with the fine-tuning rows last (under expert parallelism, whose
//! activations cannot be cut by rows, the fine-tuning rows get a pass of their own after it),
//! each through [`Model::pass`]. An engine that leads a worker group sends each call's plan
//! before making it.

use std::time::Instant;

use super::Engine;
use super::coserve::{Planned, spend};
use super::group_plan::TrainingRows;
use super::schedule::Iteration;
use crate::adapters::AdapterSet;
use crate::error::{Error, Result};
use crate::model::{ForwardInput, LossRows, Trained};

/// What an iteration's forward pass produced, for the bookkeeping.
pub(super) struct Ran {
    /// (running index, tokens scheduled) per sequence, in batch order.
    pub scheduled: Vec<(usize, usize)>,
    /// Inference rows in the pass.
    pub n_inf: usize,
    /// The logits of the sequences that reached the end of their tokens, in batch order.
    pub logits: Vec<f32>,
    /// The embedding requests' rows after the final norm, `[rows, hidden]`, in batch order.
    pub embedded: Vec<f32>,
    /// The fine-tuning microbatches, the adapters of their pass and what it made of them.
    pub finetune: Option<(Planned, AdapterSet, Trained)>,
    /// The microbatches' adapter slots start here (the inference adapters come first).
    pub first_slot: usize,
    pub started: Instant,
}

impl Engine {
    /// The iteration's forward pass (or passes); `None` when it has no rows to run.
    pub(super) fn execute(&mut self, iteration: Iteration) -> Result<Option<Ran>> {
        let Iteration { mut input, scheduled, adapters: ids, finetune: mut plan, .. } = iteration;
        let n_inf = input.tokens.len();
        if n_inf == 0 && plan.is_none() {
            return Ok(None);
        }
        // The batch's adapters: the inference versions (from their pages), then, when
        // fine-tuning rows join, the jobs' live weights.
        let started = Instant::now();
        let load = |e: &Self| ids.iter().map(|&id| e.paged.load(id, &e.cache)).collect::<Result<Vec<_>>>();
        // The jobs' versions are their current weights (published at every optimizer step).
        let job_versions = match &plan {
            Some(p) => (p.microbatches.iter())
                .map(|(j, _)| self.registry.resolve(&self.training.jobs[*j].job.spec.name))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let training_set = match &plan {
            Some(_) => {
                let mut adapters = load(self)?;
                adapters.extend(job_versions.iter().map(|v| v.adapter.clone()));
                Some(AdapterSet::new(adapters, self.model.device)?)
            }
            None => {
                if self.batch_adapters.as_ref().is_none_or(|(cached, _)| *cached != ids) {
                    // The old set goes first: two sets of a large batch's adapters at once would
                    // be the run's peak memory.
                    self.batch_adapters = None;
                    self.batch_adapters = Some((ids.clone(), AdapterSet::new(load(self)?, self.model.device)?));
                }
                None
            }
        };
        let set = match (&training_set, &self.batch_adapters) {
            (Some(set), _) | (None, Some((_, set))) => set,
            (None, None) => return Err(Error::Internal("engine: batch built without its adapters".into())),
        };
        let versions = match &self.plans {
            Some(_) => (ids.iter().map(|&id| self.paged.version(id).cloned()))
                .chain(job_versions.iter().map(|v| Some(v.clone())))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::Internal("engine: a batch adapter is not resident".into()))?,
            None => Vec::new(),
        };
        let passes = match plan.as_mut() {
            None => vec![(input, None)],
            Some(p) => {
                let rows = LossRows {
                    first_row: 0,
                    first_seq: 0,
                    targets: std::mem::take(&mut p.targets),
                    loss_weights: std::mem::take(&mut p.loss_weights),
                };
                if n_inf > 0 && self.model.is_expert_parallel() {
                    vec![(input, None), (std::mem::take(&mut p.input), Some(rows))]
                } else {
                    let first_seq = input.seqs.len();
                    append(&mut input, &p.input);
                    vec![(input, Some(LossRows { first_row: n_inf, first_seq, ..rows }))]
                }
            }
        };
        let traces: Vec<String> = match &self.plans {
            Some(_) => scheduled.iter().filter_map(|&(i, _)| self.running.get(i)?.trace.clone()).collect(),
            None => Vec::new(),
        };
        let (mut logits, mut embedded, mut trained) = (Vec::new(), Vec::new(), None);
        for (input, rows) in passes {
            if let Some(sink) = &mut self.plans {
                let training = rows.as_ref().map(|rows| TrainingRows { id: self.training.next_id, rows: rows.clone() });
                sink.forward(&input, &versions, training, &traces)?;
            }
            let pass = self.model.pass(&input, &mut self.cache, set, rows.as_ref())?;
            if let Some(l) = pass.logits {
                logits = l.into_vec_f32()?;
            }
            if let Some(e) = pass.embedded {
                embedded = e.into_vec_f32()?;
            }
            trained = trained.or(pass.trained);
        }
        let finetune = match (plan, training_set, trained) {
            (Some(p), Some(set), Some(t)) => Some((p, set, t)),
            (None, _, None) => None,
            _ => return Err(Error::Internal("engine: fine-tuning rows without their pass".into())),
        };
        Ok(Some(Ran { scheduled, n_inf, logits, embedded, finetune, first_slot: ids.len(), started }))
    }

    /// Backward layers of the batches in flight, oldest first, until `deadline` (at least one
    /// layer when `idle`: no inference shares the iteration). A batch whose backward completes
    /// goes to [`Engine::finish_in_flight`].
    pub(super) fn run_backward(&mut self, deadline: Instant, idle: bool) -> Result<()> {
        let mut at_least_one = idle;
        while let Some(batch) = self.training.in_flight.front_mut() {
            let tokens = batch.backward.tokens();
            let left = deadline.saturating_duration_since(Instant::now()).as_secs_f64();
            let per_layer = self.budget.backward.predict_high(tokens).filter(|&c| c > 0.0);
            let mut layers = per_layer.map_or(1, |c| (left / c) as usize);
            // The last layer also pays for finishing the batch: all the layers left run only
            // when finishing fits too (the cost of those layers, not of all `layers` the time
            // would hold, else a batch one layer from done would wait for an idle iteration).
            let finish = self.budget.finish.predict_high(batch.members.len()).unwrap_or(0.0);
            let remaining = batch.backward.layers_left();
            if layers >= remaining && per_layer.is_some_and(|c| c * remaining as f64 + finish > left) {
                layers = remaining - 1;
            }
            let layers = if at_least_one { layers.max(1) } else { layers };
            if layers == 0 {
                return Ok(());
            }
            at_least_one = false;
            let t = Instant::now();
            let run = layers.min(batch.backward.layers_left());
            if let Some(sink) = &mut self.plans {
                sink.backward(batch.id, run)?;
            }
            let done =
                self.model.backward_layers(&mut batch.backward, &self.cache, &batch.adapters, &mut batch.grads, run)?;
            self.counters.last.finetune_backward += (tokens * run) as u64;
            self.counters.tokens.finetune_backward += (tokens * run) as u64;
            let end = Instant::now();
            batch.backward_slices.push((t, end, run));
            let seconds = (end - t).as_secs_f64();
            self.budget.backward.observe(tokens, seconds / run.max(1) as f64);
            spend(&mut self.training.jobs, &batch.members, seconds);
            if !done {
                return Ok(());
            }
            self.finish_in_flight()?;
        }
        Ok(())
    }
}

/// Appends `tail`'s rows to `input` (the fine-tuning rows after the inference rows).
fn append(input: &mut ForwardInput, tail: &ForwardInput) {
    input.tokens.extend_from_slice(&tail.tokens);
    input.positions.extend_from_slice(&tail.positions);
    input.slots.extend_from_slice(&tail.slots);
    input.adapters.extend_from_slice(&tail.adapters);
    input.seqs.extend(tail.seqs.iter().cloned());
}
