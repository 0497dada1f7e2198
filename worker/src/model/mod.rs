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

use crate::adapters::Adapter;
use crate::error::Result;
use crate::safetensors_file::TensorSource;

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
    /// Loads `dir` (config.json and the safetensors checkpoint) onto `device`, the weights in
    /// [`weight_dtype`].
    pub fn load(dir: &Path, device: Device) -> Result<Model> {
        Model::load_as(dir, device, None)
    }

    /// [`Model::load`] with the weights in `dtype` when given (a check against an f32 oracle
    /// holds a bf16 checkpoint in f32 on any CPU).
    pub fn load_as(dir: &Path, device: Device, dtype: Option<DType>) -> Result<Model> {
        let config = ModelConfig::load(dir)?;
        let src = weights::open_checkpoint(dir)?;
        let dtype = dtype.unwrap_or_else(|| weight_dtype(&config, &src, device));
        let weights = weights::load_weights(&config, &src, dtype, device)?;
        let rope = Rope::new(config.head_dim, config.rope_theta, &config.rope_scaling)?;
        Ok(Model { config, weights, rope, device, tp: None })
    }

    /// `adapter` as this model serves it: its LoRA weights in bf16 where the base weights are
    /// bf16 on the CPU, f32 elsewhere. Decoding's deltas stream every adapter in the batch once
    /// per step, so with a bf16 base, f32 adapters would read as many bytes as the base itself.
    /// For served adapters only: a job in training keeps (and publishes) f32 weights.
    pub fn serving_adapter(&self, adapter: Adapter) -> Result<Adapter> {
        adapter.with_lora_dtype(self.serving_lora_dtype())
    }

    /// The dtype of served LoRA weights ([`Model::serving_adapter`]).
    pub fn serving_lora_dtype(&self) -> DType {
        let bf16 = self.device == Device::Cpu && self.weights.embed.dtype() == DType::BF16;
        if bf16 { DType::BF16 } else { DType::F32 }
    }
}

/// The dtype a model's weights are held in on `device`. A dense model whose checkpoint is bf16
/// stays bf16 on a CPU that multiplies bf16 weights as they lie (AMX tiles): half the memory,
/// half the bytes read per decoding step, and several times the f32 rate (activations and sums
/// stay f32). Everything else is widened to f32 once, at load: the kernels compute in f32, and
/// widening a weight at every step would cost more.
pub fn weight_dtype(config: &ModelConfig, src: &TensorSource, device: Device) -> DType {
    // The widths the linear layers' inputs have: hidden (q, k, v, gate, up, the LM head), the
    // attention output (o) and the MLP's (down).
    let widths = [config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim];
    let tiles = device == Device::Cpu && tandem_kernels::multiplies_bf16_weights(&widths);
    let stored = src.dtype("model.embed_tokens.weight");
    if tiles && config.moe.is_none() && stored == Some(DType::BF16) { DType::BF16 } else { DType::F32 }
}
