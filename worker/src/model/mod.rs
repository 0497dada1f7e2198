//! The base model: config, weights, the forward and backward layers, and the model pass that
//! composes them (`pass.rs`).

pub mod backward;
pub mod config;
mod expert_parallel;
pub mod forward;
pub mod pass;
pub mod probe;
pub mod tensor_parallel;
pub mod weights;

use std::path::Path;

use tandem_kernels::ops::Rope;
use tandem_kernels::{DType, Device};

pub use backward::{AdapterGrads, PendingBackward};
pub use config::{Arch, ModelConfig};
pub use forward::{ForwardInput, KvCache, LayerActs};
pub use pass::{LossRows, Pass, Trained};
pub use tensor_parallel::{MoeSplit, Shard, TensorParallel};
pub use weights::Weights;

use crate::error::Result;

/// A loaded base model, ready to run batches that mix adapters.
pub struct Model {
    pub config: ModelConfig,
    pub weights: Weights,
    pub rope: Rope,
    pub device: Device,
    /// Its place in a tensor-parallel group, when it is one rank's shard.
    pub tp: Option<TensorParallel>,
}

impl Model {
    /// Loads `dir` (config.json and the safetensors checkpoint) onto `device`. Weights are kept
    /// in f32: the kernels compute in f32, and converting bf16 weights once at load is cheaper
    /// than at every step.
    pub fn load(dir: &Path, device: Device) -> Result<Model> {
        let config = ModelConfig::load(dir)?;
        let src = weights::open_checkpoint(dir)?;
        let weights = weights::load_weights(&config, &src, DType::F32, device)?;
        let rope = Rope::new(config.head_dim, config.rope_theta, &config.rope_scaling)?;
        Ok(Model { config, weights, rope, device, tp: None })
    }
}
