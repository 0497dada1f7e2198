//! Fine-tuning: training data, the backward pass through the frozen base, LoRA and ESFT jobs
//! with their optimizers, checkpoints and PEFT export.

pub mod data;
pub mod step;
