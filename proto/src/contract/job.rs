//! A fine-tuning job as the cluster knows it: [`JobSpec`] is its only description (the gateway
//! makes it, the state machine keeps it, the worker trains from it, `tandem finetune` builds
//! its method and hyperparameters the same way), what an attempt reports ([`JobReport`]), and
//! what a worker is told to run ([`Assignment`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Invalid;
use super::names::{check_name, check_uri};

/// Everything a worker needs to train a job, and what the job object reports back as asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub base_model: String,
    pub method: MethodChoice,
    pub hyper: Hyperparams,
    pub training_file: FileRef,
    #[serde(default)]
    pub validation_file: Option<FileRef>,
    /// Optimizer steps between checkpoints (0: none but the last).
    pub checkpoint_every: u64,
    /// The tenant's suffix for the adapter's name, as asked.
    #[serde(default)]
    pub suffix: Option<String>,
    /// OpenAI's learning-rate multiplier, as asked (`hyper.lr` is the rate it gave).
    pub learning_rate_multiplier: f64,
    /// The hyperparameters asked for as "auto": the worker resolves them from the data.
    #[serde(default)]
    pub auto: AutoHyperparams,
}

/// The learning rate a `learning_rate_multiplier` of 1 means.
pub const BASE_LEARNING_RATE: f64 = 1e-3;

/// Which of OpenAI's hyperparameters a job leaves to Tandem ("auto", or not given): the worker
/// that trains it resolves them from the data set's size and token count
/// (`tandem_worker::train::auto`) and reports what it chose ([`TrainingPlan`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoHyperparams {
    pub n_epochs: bool,
    pub batch_size: bool,
    pub learning_rate_multiplier: bool,
}

impl AutoHyperparams {
    /// Every one of them left to Tandem.
    pub fn all() -> Self {
        AutoHyperparams { n_epochs: true, batch_size: true, learning_rate_multiplier: true }
    }
}

/// What an attempt trains with, "auto" resolved, and the data it trains on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingPlan {
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
    pub total_steps: u64,
    /// Training examples, and the tokens they hold.
    pub examples: u64,
    pub tokens: u64,
}

/// An uploaded file a job reads: its id (as the tenant knows it) and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub id: String,
    pub uri: String,
}

impl JobSpec {
    /// A job of `base_model` training `method` on `training_file`, with the default
    /// hyperparameters, a checkpoint every 100 steps, no validation file and no suffix.
    pub fn new(base_model: impl Into<String>, method: MethodChoice, training_file: FileRef) -> Self {
        JobSpec {
            base_model: base_model.into(),
            method,
            hyper: Hyperparams::default(),
            training_file,
            validation_file: None,
            checkpoint_every: 100,
            suffix: None,
            learning_rate_multiplier: 1.0,
            auto: AutoHyperparams::default(),
        }
    }

    /// Checks every field a worker will act on.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_name("base model", &self.base_model)?;
        self.method.validate()?;
        self.hyper.validate()?;
        for (what, f) in
            [("training_file", Some(&self.training_file)), ("validation_file", self.validation_file.as_ref())]
        {
            if let Some(f) = f {
                check_name(what, &f.id)?;
                check_uri(what, &f.uri)?;
            }
        }
        if let Some(suffix) = &self.suffix {
            check_name("suffix", suffix)?;
        }
        let m = self.learning_rate_multiplier;
        if !(m.is_finite() && m > 0.0) {
            return Err(Invalid(format!("learning_rate_multiplier must be a positive number, got {m}")));
        }
        Ok(())
    }
}

/// What to train; ESFT's experts may be left to be chosen from the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum MethodChoice {
    /// A LoRA adapter on `targets` (PEFT's `target_modules`: module names, or `all-linear`).
    Lora { rank: usize, alpha: f32, targets: Vec<String>, rslora: bool },
    /// Explicit experts (layer -> ids), or those receiving `threshold` of the routed tokens.
    Esft {
        #[serde(default, with = "number_keys::option")]
        experts: Option<BTreeMap<usize, Vec<usize>>>,
        threshold: f32,
    },
}

impl MethodChoice {
    /// LoRA of `rank` on every linear layer, alpha twice the rank.
    pub fn lora(rank: usize) -> Self {
        MethodChoice::Lora { rank, alpha: 2.0 * rank as f32, targets: vec!["all-linear".into()], rslora: false }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            MethodChoice::Lora { rank, alpha, targets, .. } => {
                if !(1..=1024).contains(rank) {
                    return Err(Invalid(format!("lora rank must be 1 to 1024, got {rank}")));
                }
                if !(alpha.is_finite() && *alpha > 0.0) {
                    return Err(Invalid(format!("lora alpha must be a positive number, got {alpha}")));
                }
                if targets.is_empty() || targets.iter().any(|t| t.is_empty() || t.chars().any(char::is_control)) {
                    return Err(Invalid("lora targets must be module names (or all-linear)".into()));
                }
            }
            MethodChoice::Esft { threshold, .. } => {
                if !(*threshold > 0.0 && *threshold <= 1.0) {
                    return Err(Invalid(format!("esft threshold must be in (0, 1], got {threshold}")));
                }
            }
        }
        Ok(())
    }

    /// The method's name in OpenAI's job object.
    pub fn openai_name(&self) -> &'static str {
        match self {
            MethodChoice::Lora { .. } => "supervised",
            MethodChoice::Esft { .. } => "esft",
        }
    }
}

/// How a job trains: the optimizer, its schedule and the batch shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hyperparams {
    pub epochs: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward and backward pass; gradients accumulate over `batch_size /
    /// micro_batch_size` of them.
    pub micro_batch_size: usize,
    /// Peak learning rate, reached after the warm-up.
    pub lr: f32,
    /// Share of the steps spent warming up linearly from 0.
    pub warmup_ratio: f32,
    /// The cosine decay ends at `lr · min_lr_ratio`.
    pub min_lr_ratio: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip (0: none).
    pub max_grad_norm: f32,
    /// Seeds the adapter's initial weights and the data order.
    pub seed: u64,
}

impl Default for Hyperparams {
    fn default() -> Self {
        Hyperparams {
            epochs: 3,
            batch_size: 8,
            micro_batch_size: 8,
            lr: 2e-4,
            warmup_ratio: 0.05,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 0,
        }
    }
}

impl Hyperparams {
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |msg: String| Err(Invalid(msg));
        if self.epochs == 0 || self.batch_size == 0 || self.micro_batch_size == 0 {
            return bad("epochs, batch_size and micro_batch_size must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be a positive number, got {}", self.lr));
        }
        for (name, v) in [("warmup_ratio", self.warmup_ratio), ("min_lr_ratio", self.min_lr_ratio)] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} must be in [0, 1], got {v}"));
            }
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} must be in [0, 1), got {v}"));
            }
        }
        if !(self.weight_decay >= 0.0 && self.max_grad_norm >= 0.0 && self.eps > 0.0) {
            return bad("weight_decay and max_grad_norm must be >= 0 and eps > 0".into());
        }
        Ok(())
    }

    /// Learning rate of optimizer step `step` (1-based) of `total`: linear warm-up to `lr`
    /// (the first step already moves), then cosine decay to `lr · min_lr_ratio`.
    pub fn lr_at(&self, step: u64, total: u64) -> f32 {
        // In f32, as the ratio was given: 0.1 · 100 is 10 steps, not 11.
        let warmup = (self.warmup_ratio * total as f32).ceil() as u64;
        if step <= warmup {
            return self.lr * step as f32 / warmup as f32;
        }
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine as f32)
    }
}

/// A map with number keys as JSON writes it, the keys as object keys ("0"): read back
/// explicitly, since serde reads such a key as the string it is, not a number, wherever it
/// buffers fields first (an internally tagged enum, a flattened struct).
pub mod number_keys {
    use std::collections::BTreeMap;
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, K: Display, V: Serialize>(map: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        map.iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>().serialize(s)
    }

    pub fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: FromStr + Ord,
        V: Deserialize<'de>,
    {
        parse(BTreeMap::deserialize(d)?)
    }

    fn parse<E: Error, K: FromStr + Ord, V>(map: BTreeMap<String, V>) -> Result<BTreeMap<K, V>, E> {
        (map.into_iter())
            .map(|(k, v)| k.parse().map(|k| (k, v)).map_err(|_| E::custom(format!("key {k:?} is not a number"))))
            .collect()
    }

    /// The same, for a map that may be absent (`null`).
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer, K: Display, V: Serialize>(
            map: &Option<BTreeMap<K, V>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match map {
                Some(m) => super::serialize(m, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D, K, V>(d: D) -> Result<Option<BTreeMap<K, V>>, D::Error>
        where
            D: Deserializer<'de>,
            K: FromStr + Ord,
            V: Deserialize<'de>,
        {
            Option::<BTreeMap<String, V>>::deserialize(d)?.map(parse).transpose()
        }
    }
}

/// One optimizer step of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepFigures {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    /// Tokens per second of the job since it started on its worker.
    pub tokens_per_s: f64,
    /// Tokens the step trained on.
    #[serde(default)]
    pub tokens: u64,
}

/// What an attempt reports, fenced by its epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobReport {
    /// The attempt started training, at optimizer step `step` (past 0 when it resumed from a
    /// checkpoint).
    Running {
        step: u64,
        /// What it trains with ("auto" resolved).
        #[serde(default)]
        plan: Option<TrainingPlan>,
    },
    /// An optimizer step's figures.
    Step(StepFigures),
    Checkpoint {
        step: u64,
        uri: String,
    },
    /// The mean token loss on the validation file after optimizer step `step`.
    Validation {
        step: u64,
        loss: f64,
    },
    /// Done; its adapter, exported to `uri`, becomes the job's adapter for its tenant.
    Succeeded {
        uri: String,
        checksum: String,
    },
    /// The job cannot go on.
    Failed {
        error: String,
    },
    /// The attempt cannot go on on this worker (a checkpoint or the export could not be
    /// written, a file could not be read: its disk's fault, not the job's): the job resumes
    /// from its last checkpoint in a new attempt, while it has attempts left.
    Interrupted {
        error: String,
    },
    /// Its worker is draining: the attempt stopped after its checkpoint (reported just before),
    /// and the job resumes from it elsewhere, in an attempt that does not count as a retry.
    HandedOff,
}

impl JobReport {
    /// Whether the report ends its attempt (the worker runs it no more).
    pub fn ends_attempt(&self) -> bool {
        matches!(
            self,
            JobReport::Succeeded { .. }
                | JobReport::Failed { .. }
                | JobReport::Interrupted { .. }
                | JobReport::HandedOff
        )
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            JobReport::Checkpoint { uri, .. } | JobReport::Succeeded { uri, .. } => check_uri("report uri", uri),
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u64,
    pub uri: String,
    /// Unix seconds when it was recorded (the proposer's clock; 0: not known).
    #[serde(default)]
    pub at: u64,
}

/// A fine-tuning attempt a worker is to run: part of what its heartbeat tells it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub job: String,
    pub epoch: u64,
    pub tenant: String,
    pub spec: JobSpec,
    /// Where to resume from.
    pub checkpoint: Option<Checkpoint>,
    /// The worker is draining: it hands the attempt off (a checkpoint, then
    /// [`JobReport::HandedOff`]) rather than run it.
    #[serde(default)]
    pub hand_off: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            base_model: "tiny".into(),
            method: MethodChoice::Esft { experts: Some(BTreeMap::from([(1, vec![0, 3])])), threshold: 0.2 },
            hyper: Hyperparams::default(),
            training_file: FileRef { id: "file-1".into(), uri: "/blobs/files/file-1".into() },
            validation_file: None,
            checkpoint_every: 10,
            suffix: None,
            learning_rate_multiplier: 1.0,
            auto: AutoHyperparams::default(),
        }
    }

    #[test]
    fn a_spec_round_trips_with_esft_layers() {
        let s = spec();
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec();
        s.training_file.uri = "/blobs/../../etc/shadow".into();
        assert!(s.validate().unwrap_err().0.contains(".."));
        let mut s = spec();
        s.hyper.lr = f32::NAN;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.method = MethodChoice::Lora { rank: 0, alpha: 1.0, targets: vec!["q_proj".into()], rslora: false };
        assert!(s.validate().unwrap_err().0.contains("rank"));
    }
}
