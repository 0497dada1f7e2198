//! Tandem worker. For now only its identity; the model runtime, adapters, the co-serving
//! engine loop and fine-tuning arrive with the issues that build on the kernels.

/// Role name a worker reports in health checks.
pub const ROLE: &str = "worker";

/// The compute kernels the worker runs on.
pub use tandem_kernels as kernels;
