//! Fine-tuning: training data, the backward pass through the frozen base, LoRA and ESFT jobs
//! with their optimizers, checkpoints and PEFT export.

pub mod checkpoint;
pub mod data;
pub mod esft_select;
pub mod finetune;
pub mod job;
pub mod step;
pub mod trainer;
