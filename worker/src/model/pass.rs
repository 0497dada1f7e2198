//! The model pass: embedding → decoder layers → the logits of the rows that want them → the
//! fine-tuning rows' loss → the start of their backward. This is the one place that composes
//! those steps: the training step, the co-serving engine and a worker group's followers all run
//! their batches through [`Model::pass`], so a group's ranks make the same calls, and with them
//! the same collectives, in the same order.

use serde::{Deserialize, Serialize};
use tandem_kernels::{DType, Tensor, ops};

use super::{ForwardInput, KvCache, LayerActs, Model, PendingBackward};
use crate::adapters::AdapterSet;
use crate::error::{Error, Result};

/// The rows of a pass that fine-tune: every row from `first_row` (the start of sequence
/// `first_seq`) to the end, each with its target and what its loss counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossRows {
    pub first_row: usize,
    pub first_seq: usize,
    /// Next token of each row (-1: no loss on that row).
    pub targets: Vec<i32>,
    /// What each row's loss counts in the total the backward differentiates.
    pub loss_weights: Vec<f32>,
}

/// What a pass produced.
pub struct Pass {
    /// The logits of the input's logit rows, `[rows, vocab]`; `None` when it has none.
    pub logits: Option<Tensor>,
    /// The input's embed rows after the final norm, `[rows, hidden]`; `None` when it has none.
    pub embedded: Option<Tensor>,
    /// The fine-tuning rows' outcome, when the pass had some.
    pub trained: Option<Trained>,
}

/// The fine-tuning rows of a pass after their loss.
pub struct Trained {
    /// Each row's token loss (unweighted).
    pub losses: Vec<f32>,
    /// Their backward, to be run with the pass's cache and adapters
    /// ([`Model::backward_layers`]).
    pub backward: PendingBackward,
}

impl Model {
    /// Runs `input` through the model, writing its keys and values into `cache`. With
    /// `training`, the rows it names keep their activations (cut out of the shared pass when
    /// other rows come first), and their loss and its gradient start their backward.
    pub fn pass(
        &self,
        input: &ForwardInput,
        cache: &mut KvCache,
        adapters: &AdapterSet,
        training: Option<&LossRows>,
    ) -> Result<Pass> {
        let Some(rows) = training else {
            let hidden = self.hidden_states(input, cache, adapters, &mut drop)?;
            let embedded = self.embedded_of(&hidden, input)?;
            return Ok(Pass { logits: self.logits_of(&hidden, input)?, embedded, trained: None });
        };
        let first = rows.first_row;
        let tail = input.tail(first, rows.first_seq);
        let mut tape = Vec::with_capacity(self.weights.layers.len());
        let mut keep = |acts: LayerActs| {
            let layer = tape.len();
            tape.push(if first == 0 { Ok(acts) } else { acts.tail(first, layer, &tail, adapters, self) });
        };
        let hidden = self.hidden_states(input, cache, adapters, &mut keep)?;
        let (logits, embedded) = (self.logits_of(&hidden, input)?, self.embedded_of(&hidden, input)?);
        let tape = tape.into_iter().collect::<Result<Vec<_>>>()?;
        let hidden = match first {
            0 => hidden,
            _ => ops::gather_rows(&hidden, &(first as u32..input.tokens.len() as u32).collect::<Vec<_>>())?,
        };
        let (losses, dhidden) = self.loss_backward(&hidden, &rows.targets, &rows.loss_weights)?;
        drop(hidden);
        let backward = PendingBackward::new(self, tail, tape, dhidden)?;
        Ok(Pass { logits, embedded, trained: Some(Trained { losses, backward }) })
    }

    /// The logits of `input.logit_rows`, `[rows, vocab]` (f32; no rows when it has none),
    /// after writing the batch's keys and values into `cache`: an inference pass.
    pub fn forward(&self, input: &ForwardInput, cache: &mut KvCache, adapters: &AdapterSet) -> Result<Tensor> {
        match self.pass(input, cache, adapters, None)?.logits {
            Some(logits) => Ok(logits),
            None => Ok(Tensor::zeros([0, self.whole_config().vocab_size], DType::F32, self.device)?),
        }
    }

    /// Each row's token loss of `input` (rows with target -1 count 0), with no backward: a
    /// validation pass.
    pub fn pass_losses(
        &self,
        input: &ForwardInput,
        cache: &mut KvCache,
        adapters: &AdapterSet,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        let hidden = self.hidden_states(input, cache, adapters, &mut drop)?;
        self.loss(&hidden, targets)
    }

    /// A whole pass and its whole backward, adding the adapters' weight gradients into
    /// `grads`; each row's token loss. What a training step does with one batch.
    pub fn train_pass(
        &self,
        input: &ForwardInput,
        cache: &mut KvCache,
        adapters: &AdapterSet,
        rows: &LossRows,
        grads: &mut super::AdapterGrads,
    ) -> Result<Vec<f32>> {
        let Pass { trained, .. } = self.pass(input, cache, adapters, Some(rows))?;
        let mut trained = trained.ok_or_else(|| Error::Internal("a training pass kept no rows".into()))?;
        self.backward_layers(&mut trained.backward, cache, adapters, grads, usize::MAX)?;
        Ok(trained.losses)
    }

    /// `input`'s embed rows after the final norm, when it has any.
    fn embedded_of(&self, hidden: &Tensor, input: &ForwardInput) -> Result<Option<Tensor>> {
        match input.embed_rows.is_empty() {
            true => Ok(None),
            false => self.final_hidden(hidden, &input.embed_rows).map(Some),
        }
    }

    /// The logits of `input`'s logit rows, when it has any (a group's followers compute them
    /// exactly when rank 0 does: the all-gather is theirs too).
    fn logits_of(&self, hidden: &Tensor, input: &ForwardInput) -> Result<Option<Tensor>> {
        match input.logit_rows.is_empty() {
            true => Ok(None),
            false => self.logits(hidden, &input.logit_rows).map(Some),
        }
    }
}
