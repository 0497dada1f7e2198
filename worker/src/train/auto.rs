//! The hyperparameters a job leaves "auto", resolved from its data set's size and token count,
//! so that a job given nothing but its data learns it (measured in `docs/finetune.md`).
//!
//! The rule, for `n` examples holding `tokens` tokens:
//! - `batch_size`: the power of two nearest below `n / 128`, between 1 and 32, and at most
//!   [`MAX_STEP_TOKENS`] tokens per step (the examples' mean length): small data sets take
//!   small steps, so that they get many of them;
//! - `n_epochs`: enough to train on [`TARGET_EXAMPLES`] examples, between 1 and 100: a small
//!   data set is seen many times, a large one at least once;
//! - `learning_rate_multiplier`: `sqrt(batch_size / 16)`, between 1/4 and 1: smaller batches
//!   give noisier gradients, and take smaller steps.

use tandem_proto::contract::{AutoHyperparams, BASE_LEARNING_RATE, Hyperparams, TrainingPlan};

use super::data::Example;

/// Examples a job of default settings trains on (one pass over a large data set may be more;
/// a small one is seen at most 100 times).
pub const TARGET_EXAMPLES: u64 = 8000;
/// Most tokens in one optimizer step's batch that "auto" chooses.
pub const MAX_STEP_TOKENS: u64 = 8192;

/// `hyper` (with `multiplier`, as asked) where `auto` leaves nothing to choose, and the rest
/// chosen for `data`; with the plan it makes.
pub fn resolve(
    hyper: &Hyperparams,
    multiplier: f64,
    auto: AutoHyperparams,
    data: &[Example],
) -> (Hyperparams, TrainingPlan) {
    let examples = data.len() as u64;
    let tokens: u64 = data.iter().map(|e| e.tokens.len() as u64).sum();
    let mut hyper = hyper.clone();
    if auto.batch_size {
        let by_count = prev_power_of_two(examples / 128).clamp(1, 32);
        let by_tokens = (MAX_STEP_TOKENS * examples.max(1) / tokens.max(1)).max(1);
        hyper.batch_size = by_count.min(by_tokens) as usize;
        hyper.micro_batch_size = hyper.batch_size;
    }
    if auto.n_epochs {
        let epochs = TARGET_EXAMPLES.div_ceil(examples.max(1));
        hyper.epochs = epochs.clamp(1, 100) as usize;
    }
    let multiplier = match auto.learning_rate_multiplier {
        true => (hyper.batch_size as f64 / 16.0).sqrt().clamp(0.25, 1.0),
        false => multiplier,
    };
    if auto.learning_rate_multiplier {
        hyper.lr = (BASE_LEARNING_RATE * multiplier) as f32;
    }
    let total_steps = examples.div_ceil(hyper.batch_size as u64) * hyper.epochs as u64;
    let plan = TrainingPlan {
        n_epochs: hyper.epochs,
        batch_size: hyper.batch_size,
        learning_rate_multiplier: multiplier,
        total_steps,
        examples,
        tokens,
    };
    (hyper, plan)
}

/// The largest power of two at most `n` (0 for 0).
fn prev_power_of_two(n: u64) -> u64 {
    if n == 0 { 0 } else { 1 << (63 - n.leading_zeros()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, len: usize) -> Vec<Example> {
        (0..n).map(|_| Example { tokens: vec![1; len], targets: vec![-1; len] }).collect()
    }

    #[test]
    fn small_sets_take_small_batches_many_times_and_large_ones_once() {
        let auto = AutoHyperparams::all();
        let h = Hyperparams::default();
        let (tiny, plan) = resolve(&h, 1.0, auto, &data(16, 20));
        assert_eq!((tiny.batch_size, tiny.epochs, plan.total_steps), (1, 100, 1600));
        assert_eq!(plan.learning_rate_multiplier, 0.25);
        let (small, plan) = resolve(&h, 1.0, auto, &data(1000, 20));
        assert_eq!((small.batch_size, small.epochs, plan.total_steps), (4, 8, 2000));
        assert_eq!((plan.learning_rate_multiplier, small.lr), (0.5, 5e-4));
        let (mid, plan) = resolve(&h, 1.0, auto, &data(4000, 20));
        assert_eq!((mid.batch_size, mid.epochs, plan.total_steps), (16, 2, 500));
        assert_eq!((plan.learning_rate_multiplier, plan.tokens), (1.0, 80_000));
        let (large, _) = resolve(&h, 1.0, auto, &data(100_000, 20));
        assert_eq!((large.batch_size, large.epochs), (32, 1));
        // Long examples: at most MAX_STEP_TOKENS tokens a step.
        let (long, _) = resolve(&h, 1.0, auto, &data(4000, 2048));
        assert_eq!(long.batch_size, 4);
    }

    #[test]
    fn what_was_asked_for_stays() {
        let h = Hyperparams { epochs: 7, batch_size: 3, micro_batch_size: 3, lr: 5e-4, ..Hyperparams::default() };
        let (same, plan) = resolve(&h, 0.5, AutoHyperparams::default(), &data(16, 20));
        assert_eq!(same, h);
        assert_eq!((plan.n_epochs, plan.batch_size, plan.learning_rate_multiplier), (7, 3, 0.5));
        assert_eq!(plan.total_steps, 6 * 7);
    }
}
