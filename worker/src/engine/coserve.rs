//! The fine-tuning half of the engine loop. Jobs hand out microbatches round-robin; an
//! iteration's microbatches run forward in the same batch as the inference tokens (their rows
//! last, so their activations can be cut out of the shared pass), then their loss, then their
//! backward, a few layers per iteration as the time budget allows. A job's microbatches of one
//! optimizer step wait for the previous step to finish, and jobs take turns, so their
//! accumulation boundaries fall in different iterations: one job's optimizer step runs while the
//! others' microbatches compute.

use std::collections::VecDeque;
use std::time::Instant;

use tandem_kernels::ops::{SeqAttention, cache_slots};

use crate::adapters::AdapterSet;
use crate::model::{AdapterGrads, ForwardInput, PendingBackward};
use crate::train::job::{Job, Microbatch};

/// Microbatches (of one or more jobs) in flight between their forward and the end of their
/// backward pass.
pub(super) struct InFlight {
    /// Names it in a worker group's plans.
    pub id: u64,
    pub backward: PendingBackward,
    /// The adapters of their forward pass: the backward must see the same weights.
    pub adapters: AdapterSet,
    pub grads: AdapterGrads,
    pub members: Vec<Member>,
    /// KV pages of their sequences (the backward reads their keys and values).
    pub blocks: Vec<u32>,
    /// When their forward pass ran, and each slice of their backward (with its layers).
    pub forward: (Instant, Instant),
    pub backward_slices: Vec<(Instant, Instant, usize)>,
}

/// One job's microbatch in an [`InFlight`] batch.
pub(super) struct Member {
    pub job: String,
    /// The job's adapter slot in the batch's adapters.
    pub slot: usize,
    pub examples: Vec<u32>,
    /// Tokens of its examples: its share of the batch's time.
    pub tokens: usize,
    /// Summed token loss of its examples.
    pub loss: f64,
}

/// Books `seconds` of engine time spent on `members` to their jobs, in proportion to their
/// tokens. (A function of the jobs alone, so that a batch in `Training::in_flight` can be
/// borrowed beside them.)
pub(super) fn spend(jobs: &mut [EngineJob], members: &[Member], seconds: f64) {
    let total: usize = members.iter().map(|m| m.tokens).sum();
    for m in members.iter().filter(|_| total > 0) {
        if let Some(job) = jobs.iter_mut().find(|j| j.job.spec.name == m.job) {
            job.engine_seconds += seconds * m.tokens as f64 / total as f64;
        }
    }
}

/// An optimizer step of a job as it ran, for its trace: the microbatches whose gradients it
/// applied, in order.
#[derive(Clone, Debug)]
pub struct StepTrace {
    pub job: String,
    pub step: u64,
    pub loss: f64,
    pub microbatches: Vec<MicrobatchTrace>,
}

/// One microbatch of a step: its tokens, the forward pass it joined, the slices of backward
/// (start, end, layers) it went through, and when its gradients were handed to the job.
#[derive(Clone, Debug)]
pub struct MicrobatchTrace {
    pub tokens: usize,
    pub forward: (Instant, Instant),
    pub backward: Vec<(Instant, Instant, usize)>,
    pub done: Instant,
}

pub(super) struct EngineJob {
    pub job: Job,
    pub added: Instant,
    pub tokens: u64,
    pub last_loss: Option<f64>,
    /// Engine time spent on its rows, in seconds.
    pub engine_seconds: f64,
    /// Its microbatches done since its last optimizer step.
    pub microbatches: Vec<MicrobatchTrace>,
}

/// Jobs and the batches in flight.
#[derive(Default)]
pub(super) struct Training {
    pub jobs: Vec<EngineJob>,
    /// The job to ask first next time (round-robin).
    cursor: usize,
    pub in_flight: VecDeque<InFlight>,
    /// The id of the next batch put in flight.
    pub next_id: u64,
}

/// Microbatches chosen for one iteration, laid out as rows to append to its batch.
pub(super) struct Planned {
    /// Their rows alone, adapter slots counted from `first_slot` (the batch's inference
    /// adapters come first).
    pub input: ForwardInput,
    pub targets: Vec<i32>,
    pub loss_weights: Vec<f32>,
    /// (job index, microbatch) in row order; job `i` of the plan has slot `first_slot + i`.
    pub microbatches: Vec<(usize, Microbatch)>,
    pub blocks: Vec<u32>,
}

/// Most batches in flight: a new batch's forward may run beside an older batch's backward, but
/// activations of more than two never pile up.
pub(super) const MAX_IN_FLIGHT: usize = 2;

impl Training {
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && self.jobs.iter().all(|j| j.job.is_finished())
    }

    pub fn job_mut(&mut self, name: &str) -> Option<&mut EngineJob> {
        self.jobs.iter_mut().find(|j| j.job.spec.name == name)
    }

    /// Takes microbatches round-robin, one per job at most, while `fits(tokens so far + the
    /// next microbatch's tokens)` and `pages(n)` can give the next one's KV pages. Nothing
    /// when the in-flight limit is reached.
    pub fn plan(
        &mut self,
        first_slot: usize,
        block_size: usize,
        mut fits: impl FnMut(usize) -> bool,
        mut pages: impl FnMut(usize) -> Option<Vec<u32>>,
    ) -> Option<Planned> {
        if self.in_flight.len() >= MAX_IN_FLIGHT || self.jobs.is_empty() {
            return None;
        }
        let mut plan = Planned {
            input: ForwardInput::default(),
            targets: Vec::new(),
            loss_weights: Vec::new(),
            microbatches: Vec::new(),
            blocks: Vec::new(),
        };
        let n = self.jobs.len();
        for turn in 0..n {
            let j = (self.cursor + turn) % n;
            let job = &mut self.jobs[j].job;
            let data = job.data();
            let (mut refused, mut blocks) = (false, Vec::new());
            let taken = job.next_microbatch_if(|examples| {
                let lens: Vec<usize> = examples.iter().map(|&i| data[i as usize].tokens.len()).collect();
                let got = if fits(plan.input.tokens.len() + lens.iter().sum::<usize>()) {
                    pages(lens.iter().map(|l| l.div_ceil(block_size)).sum())
                } else {
                    None
                };
                refused = got.is_none();
                blocks = got.unwrap_or_default();
                !refused
            });
            let Some(mb) = taken else {
                if refused {
                    break;
                }
                continue;
            };
            let slot = (first_slot + plan.microbatches.len()) as i32;
            let mut next_block = 0;
            for &i in &mb.examples {
                let e = job.example(i);
                let len = e.tokens.len();
                let own = blocks[next_block..next_block + len.div_ceil(block_size)].to_vec();
                next_block += own.len();
                let seq = SeqAttention { q_len: len, context_len: len, block_table: own };
                plan.input.slots.extend(cache_slots(&seq, block_size));
                plan.input.seqs.push(seq);
                plan.input.tokens.extend_from_slice(&e.tokens);
                plan.input.positions.extend(0..len as u32);
                plan.input.adapters.extend(std::iter::repeat_n(slot, len));
                plan.targets.extend_from_slice(&e.targets);
                plan.loss_weights.extend(e.targets.iter().map(|&t| if t >= 0 { mb.loss_weight } else { 0.0 }));
            }
            plan.blocks.extend(blocks);
            plan.microbatches.push((j, mb));
            self.cursor = (j + 1) % n;
        }
        (!plan.microbatches.is_empty()).then_some(plan)
    }
}
