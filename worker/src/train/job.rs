//! A fine-tuning job: its trainable weights (a LoRA adapter or ESFT experts), its AdamW state,
//! its learning-rate schedule and its place in its data. Jobs know nothing of each other; the
//! trainer runs the microbatches of many jobs in one pass.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tandem_kernels::ops::{self, AdamW};
use tandem_kernels::{DType, Device, Tensor};

pub use tandem_proto::contract::Hyperparams;

use super::data::Example;
use crate::adapters::esft::EsftAdapter;
use crate::adapters::set::AdapterSet;
use crate::adapters::{Adapter, LoraAdapter, Proj};
use crate::error::{Error, Result};
use crate::model::{AdapterGrads, Model};
use crate::rng::Xoshiro256;

/// What a job trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Method {
    /// A LoRA adapter on `targets` (PEFT's `target_modules`: module names, or `all-linear`).
    Lora { rank: usize, alpha: f32, targets: Vec<String>, rslora: bool },
    /// ESFT: the listed experts (layer -> expert ids) train, everything else stays frozen.
    Esft {
        #[serde(with = "tandem_proto::contract::number_keys")]
        experts: BTreeMap<usize, Vec<usize>>,
    },
}

impl Method {
    /// The `adapter_config.json` PEFT writes for such an adapter.
    fn peft_config(&self, base: &str) -> Option<serde_json::Value> {
        let Method::Lora { rank, alpha, targets, rslora } = self else { return None };
        let target_modules = match targets.as_slice() {
            [one] if one == "all-linear" => json!("all-linear"),
            _ => json!(targets),
        };
        Some(json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": target_modules,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false, "use_dora": false,
            "init_lora_weights": true, "inference_mode": true, "modules_to_save": null,
            "layers_to_transform": null, "layers_pattern": null, "rank_pattern": {}, "alpha_pattern": {},
        }))
    }
}

/// A job as submitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub name: String,
    pub method: Method,
    pub hyper: Hyperparams,
}

/// Where a job is in its data and schedule: everything, besides weights and optimizer
/// moments, that a resumed job needs to continue exactly as if it had never stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: usize,
    /// This epoch's order of the examples, and how many of them were used.
    pub order: Vec<u32>,
    pub pos: usize,
    pub rng: Xoshiro256,
}

/// A job's trainable tensors in a fixed order, with their names in the exported files.
pub enum Weights {
    Lora(LoraAdapter),
    Esft(EsftAdapter),
}

impl Weights {
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        match self {
            Weights::Lora(a) => a.modules.values_mut().flat_map(|m| [&mut m.a, &mut m.bt]).collect(),
            Weights::Esft(e) => e.experts.values_mut().flat_map(|w| [&mut w.gate, &mut w.up, &mut w.down]).collect(),
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Weights::Lora(a) => a.modules.values().flat_map(|m| [&m.a, &m.bt]).collect(),
            Weights::Esft(e) => e.experts.values().flat_map(|w| [&w.gate, &w.up, &w.down]).collect(),
        }
    }

    /// The adapter as the forward pass takes it: a clone, sharing the weights until the
    /// optimizer writes them, so microbatches in flight keep the weights they ran with.
    pub fn adapter(&self) -> Adapter {
        match self {
            Weights::Lora(a) => Adapter::Lora(a.clone()),
            Weights::Esft(e) => Adapter::Esft(e.clone()),
        }
    }

    /// This job's gradients, in [`Weights::tensors`] order, out of a batch's `grads` where
    /// the job had adapter slot `slot` in `set`.
    pub fn gradients(&self, set: &AdapterSet, grads: &AdapterGrads, slot: usize) -> Result<Vec<Tensor>> {
        let missing = || Error::InvalidRequest(format!("no gradient for adapter slot {slot}"));
        let mut out = Vec::new();
        match self {
            Weights::Lora(a) => {
                for (key, m) in &a.modules {
                    let table = set.lora(key.layer, key.proj).ok_or_else(missing)?;
                    let i = table.index_of(slot, key.expert).ok_or_else(missing)?;
                    let (off, r) = (table.bank.offset(i), table.bank.rank(i));
                    match grads.lora.get(&(key.layer, key.proj)) {
                        Some((da, dbt)) => {
                            out.push(rows(da, off, r)?);
                            out.push(rows(dbt, off, r)?);
                        }
                        // No row of the batch reached this module (e.g. an expert no token
                        // was routed to): its gradient is zero.
                        None => out.extend([zeros_like(&m.a)?, zeros_like(&m.bt)?]),
                    }
                }
            }
            Weights::Esft(e) => {
                for (&(layer, expert), w) in &e.experts {
                    let i = grads.esft_row(set, layer, slot, expert).ok_or_else(missing)?;
                    for (proj, t) in [(Proj::Gate, &w.gate), (Proj::Up, &w.up), (Proj::Down, &w.down)] {
                        out.push(match grads.esft.get(&(layer, proj)) {
                            Some(g) => rows(g, i, 1)?.reshape(t.shape().to_vec())?,
                            None => zeros_like(t)?,
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Rows `start..start + len` of `t` along its first dim (copying only those).
fn rows(t: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let idx: Vec<u32> = (start as u32..(start + len) as u32).collect();
    Ok(ops::gather_rows(t, &idx)?)
}

fn zeros_like(t: &Tensor) -> Result<Tensor> {
    Ok(Tensor::zeros(t.shape().to_vec(), DType::F32, t.device())?)
}

/// What one optimizer step of a job did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub job: String,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: usize,
    /// Mean token loss over the step's batch.
    pub loss: f64,
    pub lr: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens processed in the step (all positions, not only loss positions).
    pub tokens: usize,
}

/// The examples of a microbatch and the weight each of their loss tokens carries.
pub struct Microbatch {
    pub examples: Vec<u32>,
    pub loss_weight: f32,
}

/// A job in training.
pub struct Job {
    pub spec: TrainSpec,
    pub weights: Weights,
    pub progress: Progress,
    /// AdamW's first and second moments, one per trainable tensor.
    moments: Vec<(Tensor, Tensor)>,
    data: Arc<Vec<Example>>,
    /// The current optimizer step's batch, its microbatches handed out so far, and the
    /// gradients, loss and tokens gathered from them.
    batch: Vec<u32>,
    handed: usize,
    done: usize,
    grads: Vec<Tensor>,
    loss_sum: f64,
    tokens: usize,
}

impl Job {
    /// A new job over `data`: fresh LoRA weights (or the base's experts, for ESFT) and a
    /// shuffled first epoch, all from `spec.hyper.seed`.
    /// A job keeps its whole adapter, also when a tensor-parallel group trains it (each shard
    /// cuts it for its forward pass): on a shard, a LoRA adapter is made for the whole model's
    /// shapes, and an ESFT job's experts are assembled from every rank's share (a collective:
    /// every rank makes the job alike, after [`Job::check`] passed).
    pub fn new(spec: TrainSpec, model: &Model, data: Arc<Vec<Example>>) -> Result<Job> {
        Job::check(&spec.name, &spec.hyper, &data)?;
        let mut rng = Xoshiro256::seed_from_u64(spec.hyper.seed);
        let weights = match &spec.method {
            Method::Lora { .. } => {
                let config = spec.method.peft_config(&spec.name).unwrap_or_default();
                Weights::Lora(LoraAdapter::init(model.whole_config(), config, &mut rng)?)
            }
            Method::Esft { experts } => Weights::Esft(esft_from_base(model, experts)?),
        };
        let mut order: Vec<u32> = (0..data.len() as u32).collect();
        rng.shuffle(&mut order);
        let steps_per_epoch = data.len().div_ceil(spec.hyper.batch_size) as u64;
        let progress =
            Progress { step: 0, total_steps: steps_per_epoch * spec.hyper.epochs as u64, epoch: 0, order, pos: 0, rng };
        Job::with_state(spec, weights, progress, None, data)
    }

    /// What [`Job::new`] checks before it touches the model: the hyperparameters, and that
    /// there is data.
    pub fn check(name: &str, hyper: &Hyperparams, data: &[Example]) -> Result<()> {
        hyper.validate()?;
        if data.is_empty() {
            return Err(Error::InvalidRequest(format!("job {name}: no training examples")));
        }
        Ok(())
    }

    /// A job from saved parts (a checkpoint); `moments` `None` starts AdamW afresh.
    pub fn with_state(
        spec: TrainSpec,
        mut weights: Weights,
        progress: Progress,
        moments: Option<Vec<(Tensor, Tensor)>>,
        data: Arc<Vec<Example>>,
    ) -> Result<Job> {
        if progress.order.len() != data.len() || progress.order.iter().any(|&i| i as usize >= data.len()) {
            return Err(Error::InvalidRequest(format!(
                "job {}: the saved data order does not fit the {} training examples",
                spec.name,
                data.len()
            )));
        }
        let shapes: Vec<Vec<usize>> = weights.tensors().iter().map(|t| t.shape().to_vec()).collect();
        let moments = match moments {
            Some(m) => m,
            None => shapes.iter().map(|s| Ok((zeros(s)?, zeros(s)?))).collect::<Result<_>>()?,
        };
        if moments.len() != shapes.len()
            || moments.iter().zip(&shapes).any(|((m, v), s)| m.shape() != s || v.shape() != s)
        {
            return Err(Error::Format(format!("job {}: optimizer state does not match the weights", spec.name)));
        }
        for t in weights.tensors_mut() {
            *t = std::mem::replace(t, zeros(&[0])?).into_dtype(DType::F32)?;
        }
        let grads = shapes.iter().map(|s| zeros(s)).collect::<Result<_>>()?;
        Ok(Job {
            spec,
            weights,
            progress,
            moments,
            data,
            batch: Vec::new(),
            handed: 0,
            done: 0,
            grads,
            loss_sum: 0.0,
            tokens: 0,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn is_finished(&self) -> bool {
        self.progress.step >= self.progress.total_steps
    }

    /// Whether the job is between optimizer steps (a checkpoint can be taken).
    pub fn at_step_boundary(&self) -> bool {
        self.batch.is_empty()
    }

    /// The job's training examples (shared).
    pub fn data(&self) -> Arc<Vec<Example>> {
        self.data.clone()
    }

    pub fn example(&self, i: u32) -> &Example {
        &self.data[i as usize]
    }

    /// The job's next microbatch, drawing the next optimizer step's batch when the last one
    /// is complete. `None` when the job is finished or its microbatches of this step are all
    /// handed out and not yet reported back.
    pub fn next_microbatch(&mut self) -> Option<Microbatch> {
        self.next_microbatch_if(|_| true)
    }

    /// [`Job::next_microbatch`], if `accept` takes its examples (the co-serving engine checks
    /// that they fit its iteration); a refused microbatch stays next.
    pub fn next_microbatch_if(&mut self, accept: impl FnOnce(&[u32]) -> bool) -> Option<Microbatch> {
        if self.batch.is_empty() {
            if self.is_finished() {
                return None;
            }
            self.draw_batch();
        }
        if self.handed >= self.batch.len() {
            return None;
        }
        let end = (self.handed + self.spec.hyper.micro_batch_size).min(self.batch.len());
        if !accept(&self.batch[self.handed..end]) {
            return None;
        }
        let examples = self.batch[self.handed..end].to_vec();
        self.handed = end;
        let loss_tokens: usize = self.batch.iter().map(|&i| self.data[i as usize].loss_tokens()).sum();
        Some(Microbatch { examples, loss_weight: 1.0 / loss_tokens.max(1) as f32 })
    }

    /// The next `batch_size` examples of the epoch (fewer at its end); a finished epoch
    /// reshuffles for the next.
    fn draw_batch(&mut self) {
        let p = &mut self.progress;
        let end = (p.pos + self.spec.hyper.batch_size).min(p.order.len());
        self.batch = p.order[p.pos..end].to_vec();
        p.pos = end;
        if p.pos == p.order.len() {
            p.epoch += 1;
            p.pos = 0;
            p.rng.shuffle(&mut p.order);
        }
        self.handed = 0;
        self.done = 0;
    }

    /// Adds a finished microbatch's gradients (taken from the batch it ran in, where this job
    /// had `slot`) and summed token loss; after the last microbatch of the step, takes the
    /// optimizer step and reports it.
    pub fn microbatch_done(
        &mut self,
        set: &AdapterSet,
        grads: &AdapterGrads,
        slot: usize,
        examples: &[u32],
        loss_sum: f64,
    ) -> Result<Option<StepReport>> {
        for (acc, g) in self.grads.iter_mut().zip(self.weights.gradients(set, grads, slot)?) {
            *acc = ops::add(acc, &g)?;
        }
        self.loss_sum += loss_sum;
        self.tokens += examples.iter().map(|&i| self.data[i as usize].tokens.len()).sum::<usize>();
        self.done += examples.len();
        if self.done < self.batch.len() {
            return Ok(None);
        }
        self.optimizer_step().map(Some)
    }

    fn optimizer_step(&mut self) -> Result<StepReport> {
        let h = &self.spec.hyper;
        let loss_tokens: usize = self.batch.iter().map(|&i| self.data[i as usize].loss_tokens()).sum();
        let grad_norm = if h.max_grad_norm > 0.0 {
            ops::clip_grad_norm(&mut self.grads.iter_mut().collect::<Vec<_>>(), h.max_grad_norm)?
        } else {
            ops::grad_norm(&self.grads.iter().collect::<Vec<_>>())?
        };
        let step = self.progress.step + 1;
        let lr = h.lr_at(step, self.progress.total_steps);
        let cfg = AdamW { lr, beta1: h.beta1, beta2: h.beta2, eps: h.eps, weight_decay: h.weight_decay };
        for ((p, g), (m, v)) in self.weights.tensors_mut().into_iter().zip(&mut self.grads).zip(&mut self.moments) {
            ops::adamw_step(p, g, m, v, &cfg, step)?;
            *g = zeros(g.shape())?;
        }
        self.progress.step = step;
        let report = StepReport {
            job: self.spec.name.clone(),
            step,
            total_steps: self.progress.total_steps,
            epoch: self.progress.epoch,
            loss: self.loss_sum / loss_tokens.max(1) as f64,
            lr,
            grad_norm,
            tokens: self.tokens,
        };
        self.batch.clear();
        (self.loss_sum, self.tokens) = (0.0, 0);
        Ok(report)
    }

    /// The tensors AdamW keeps, for checkpoints.
    pub fn moments(&self) -> &[(Tensor, Tensor)] {
        &self.moments
    }
}

fn zeros(shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::zeros(shape.to_vec(), DType::F32, Device::Cpu)?)
}

/// ESFT starts from the base model's own experts: copies of the listed ones (on a
/// tensor-parallel shard, assembled from every rank's share: every rank must call this alike).
fn esft_from_base(model: &Model, experts: &BTreeMap<usize, Vec<usize>>) -> Result<EsftAdapter> {
    let experts = model.base_experts(experts)?;
    if experts.is_empty() {
        return Err(Error::InvalidRequest("ESFT: no expert chosen to train".into()));
    }
    Ok(EsftAdapter { experts })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::train::finetune::MethodChoice;

    /// ESFT's layer -> experts maps come back from JSON inside the tagged enums that hold them
    /// (a checkpoint's state, a job's spec from the gateway).
    #[test]
    fn esft_experts_round_trip_through_json() {
        let experts = BTreeMap::from([(0, vec![1, 6]), (11, vec![3])]);
        let method = Method::Esft { experts: experts.clone() };
        let json = serde_json::to_string(&method).unwrap();
        assert_eq!(json, r#"{"method":"esft","experts":{"0":[1,6],"11":[3]}}"#);
        assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), method);
        let spec = r#"{"type": "esft", "experts": {"11": [3], "0": [1, 6]}, "threshold": 0.5}"#;
        let MethodChoice::Esft { experts: Some(got), .. } = serde_json::from_str(spec).unwrap() else { panic!() };
        assert_eq!(got, experts);
        let open = r#"{"type": "esft", "threshold": 0.5}"#;
        assert!(matches!(serde_json::from_str(open).unwrap(), MethodChoice::Esft { experts: None, .. }));
        let bad = r#"{"method": "esft", "experts": {"x": [1]}}"#;
        assert!(serde_json::from_str::<Method>(bad).unwrap_err().to_string().contains("\"x\" is not a number"));
    }
}
