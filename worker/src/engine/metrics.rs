//! What the engine measures about itself, for the worker service, the gateway's `/metrics` and
//! the benchmarks: tokens per iteration by kind, time to first token, time per output token and
//! how many output tokens met the target, fine-tuning progress per job, the adapter cache and the
//! page pool.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::paged::CacheStats;
use super::pool::PoolUsage;

/// Latency samples kept for percentiles (the most recent ones).
const SAMPLES: usize = 10_000;

/// Tokens processed, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TokenCounts {
    pub decode: u64,
    pub prefill: u64,
    /// Fine-tuning tokens run forward (their backward follows, possibly over later iterations).
    pub finetune: u64,
    /// Fine-tuning tokens run backward through one layer (a token's whole backward counts once
    /// per layer).
    pub finetune_backward: u64,
}

/// A latency distribution in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct JobMetrics {
    pub step: u64,
    pub total_steps: u64,
    pub tokens: u64,
    /// Tokens per second of the engine's time since the job was added.
    pub tokens_per_s: f64,
    pub last_loss: Option<f64>,
    /// The learning rate of its next optimizer step.
    pub learning_rate: f64,
    /// Share of the engine's wall time since the job was added that went to its rows (forward
    /// and backward, each iteration's fine-tuning time split over its jobs by tokens).
    pub engine_share: f64,
}

/// Latency bounds (seconds) of the engine's histograms: iterations and adapter loads.
const BOUNDS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Observations counted in fixed buckets, as a Prometheus histogram reports them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Buckets {
    /// Observations at or below each of [`BOUNDS`] and above the previous one, then those above
    /// the last.
    counts: [u64; BOUNDS.len() + 1],
    pub sum: f64,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets { counts: [0; BOUNDS.len() + 1], sum: 0.0 }
    }
}

impl Buckets {
    pub fn observe(&mut self, seconds: f64) {
        self.counts[BOUNDS.iter().position(|&b| seconds <= b).unwrap_or(BOUNDS.len())] += 1;
        self.sum += seconds;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// (upper bound, observations at or below it), cumulative, ending at +Inf.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let bounds = BOUNDS.iter().copied().chain([f64::INFINITY]);
        bounds.zip(self.counts.iter().scan(0, |n, c| Some(*n + c).inspect(|t| *n = *t))).collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EngineMetrics {
    /// Requests decoding (or prefilling) now, and requests queued behind them.
    pub running: usize,
    pub waiting: usize,
    pub iterations: u64,
    pub tokens: TokenCounts,
    /// Tokens of each kind in the last iteration.
    pub last_iteration: TokenCounts,
    pub time_to_first_token: Latency,
    pub time_per_output_token: Latency,
    pub tpot_target_s: f64,
    /// Output tokens (after the first of each request) that came within the target, and all.
    pub tokens_within_target: u64,
    pub output_tokens_timed: u64,
    pub jobs: BTreeMap<String, JobMetrics>,
    pub adapter_cache: CacheStats,
    /// Adapters registered here (in host memory), and the names of those resident in the pool.
    pub adapters_host: usize,
    pub adapters_pool: Vec<String>,
    pub pool: PoolUsage,
    /// The iteration time the planner aims at now, in seconds.
    pub iteration_limit_s: f64,
    /// How long each iteration took.
    pub iteration_seconds: Buckets,
    /// How long adapters took to load from disk into host memory, and to page into the pool.
    pub adapter_disk_loads: Buckets,
    pub adapter_page_ins: Buckets,
}

impl EngineMetrics {
    /// Share of timed output tokens that met the target (1 when none were timed).
    pub fn slo_attainment(&self) -> f64 {
        if self.output_tokens_timed == 0 {
            1.0
        } else {
            self.tokens_within_target as f64 / self.output_tokens_timed as f64
        }
    }
}

/// Recent samples of one latency.
#[derive(Debug, Default)]
pub struct Samples {
    recent: VecDeque<f64>,
    count: u64,
    sum: f64,
}

impl Samples {
    pub fn push(&mut self, seconds: f64) {
        if self.recent.len() == SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(seconds);
        self.count += 1;
        self.sum += seconds;
    }

    pub fn summary(&self) -> Latency {
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
        Latency {
            count: self.count,
            mean: if self.count > 0 { self.sum / self.count as f64 } else { 0.0 },
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}
