//! Tandem worker: the model runtime (HF checkpoints, tokenizers, chat templates), adapters
//! (PEFT LoRA, ESFT), sampling, the co-serving engine (inference and fine-tuning in one loop),
//! fine-tuning, collectives for tensor parallelism, and the worker process itself (`node/`).
//!
//! Map:
//! - `error.rs`: the worker's error type.
//! - `tokenizer.rs`: `tokenizer.json` + the chat template of `tokenizer_config.json`.
//! - `sampling.rs`: sampling parameters and the per-request sampler (greedy, temperature,
//!   top-k, top-p, seed, stop conditions, logprobs).
//! - `structured.rs`: structured outputs: per-request token masks from a grammar (llguidance).
//! - `tools.rs`: tool calling: the grammar of a request's calls, and the calls parsed from its text.
//! - `init_model.rs`: random-weight models in HF format for demos, tests and benchmarks.
//! - `rng.rs`: the seeded PRNG (sampling, LoRA init, data order), its state checkpointable.
//! - `safetensors_file.rs`: safetensors files read and written as tensors.
//! - `model/`: `config.json`, the checkpoint's weights, the batched forward layers and their
//!   backward (to adapter weights only; the base stays frozen), and the model pass
//!   (`model/pass.rs`) that composes embedding → layers → loss → backward for the training
//!   step, the engine and a worker group's followers alike.
//! - `adapters/`: PEFT LoRA and ESFT adapters, and their packed form for a mixed batch.
//! - `engine/`: continuous batching over a paged KV cache, many adapters per batch, with
//!   fine-tuning microbatches in the same passes; each step is schedule, execute, book.
//! - `train/`: fine-tuning (data, backward pass, LoRA and ESFT jobs, checkpoints, export).
//! - `node/`: the worker process: registration and lease, the jobs and groups agents, the
//!   engine thread, the gRPC `Worker` service, and worker groups (a model served by
//!   tensor-parallel ranks in several processes, rank 0 broadcasting each pass's plan).
//! - `collective/`: all-reduce, all-gather, ... over threads (tests) or TCP (CPU workers).

pub mod adapters;
pub mod collective;
pub mod engine;
pub mod error;
pub mod init_model;
pub mod model;
pub mod node;
pub mod rng;
pub mod safetensors_file;
pub mod sampling;
pub mod structured;
pub mod tokenizer;
pub mod tools;
pub mod train;

pub use error::{Error, Result};

/// Role name a worker reports in health checks.
pub const ROLE: &str = "worker";

/// The compute kernels the worker runs on.
pub use tandem_kernels as kernels;
