//! Fine-tuning: LoRA and ESFT adapters trained through the frozen base, many jobs in one batch.
//!
//! Map:
//! - `data.rs`: JSONL training data (OpenAI chat and prompt/completion formats) to token
//!   sequences with a target per position.
//! - `step.rs`: one forward and backward pass over a padding-free batch of sequences, each with
//!   its adapter slot and loss weight (the backward itself is `model/backward.rs`).
//! - `job.rs`: a job: its weights, AdamW moments, warm-up + cosine schedule, gradient
//!   accumulation and clipping, data order.
//! - `trainer.rs`: many jobs' microbatches in one multi-LoRA pass, each job stepping on its own.
//! - `checkpoint.rs`: atomic checkpoints (bit-for-bit resumption) and the PEFT / ESFT export.
//! - `esft_select.rs`: ESFT's choice of experts from the router's token counts.
//! - `finetune.rs`: one run from files to an exported adapter (`tandem finetune`).
//! - `auto.rs`: the hyperparameters left "auto", chosen from the data set's size and tokens.

pub mod auto;
pub mod checkpoint;
pub mod data;
pub mod esft_select;
pub mod finetune;
pub mod job;
pub mod step;
pub mod trainer;
