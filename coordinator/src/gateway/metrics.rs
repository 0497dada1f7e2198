//! The gateway's series, and `/metrics` (operator's key): this process's registry (the
//! gateway's requests, tokens and latencies, its Raft replica's progress) followed by the
//! cluster's state as gauges read at the scrape (workers, jobs, each job's step, loss and
//! speed). Series are named after vLLM's where one means the same (docs/observability.md).
//!
//! Labels are bounded: tenants are the operator's keys, models the catalogue's base models,
//! and adapters, which tenants make without limit, are named only for the top N by requests;
//! the rest are counted as `other`.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{ApiError, Caller, Gateway};
use crate::metrics::{Labels, encode, gauges};
use tandem_proto::contract::{ClusterState, JobStatus};

/// Adapters named in `tandem:adapter_requests` unless the operator says otherwise.
pub const TOP_ADAPTERS: usize = 20;

/// The model label of a request whose model was not found: the names callers send are theirs
/// to choose, so they never become labels.
const UNRESOLVED: &str = "unresolved";

type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// The gateway's counters and histograms (this process's: Prometheus sums over coordinators).
#[derive(Clone, Debug)]
pub struct Metrics {
    requests: Family<Labels, Counter>,
    prompt_tokens: Family<Labels, Counter>,
    generation_tokens: Family<Labels, Counter>,
    time_to_first_token: Histograms,
    time_per_output_token: Histograms,
    e2e_latency: Histograms,
    adapters: Arc<AdapterRequests>,
    /// The same requests as plain totals, which the dashboard's charts difference over time.
    pub totals: Arc<Totals>,
}

/// Running totals of this gateway's requests (the families above split them by label for
/// scrapes; the dashboard wants one number each).
#[derive(Debug, Default)]
pub struct Totals {
    pub requests: AtomicU64,
    /// Requests answered with a server error (5xx).
    pub errors: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Sums (microseconds) and counts of the time to first token and time per output token.
    pub ttft_us: AtomicU64,
    pub ttft_count: AtomicU64,
    pub tpot_us: AtomicU64,
    pub tpot_count: AtomicU64,
}

impl Metrics {
    /// Series naming at most `top_adapters` adapters.
    pub fn new(top_adapters: usize) -> Self {
        Metrics {
            requests: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            // vLLM's buckets, so dashboards made for it read these.
            time_to_first_token: Family::new_with_constructor(|| {
                Histogram::new([
                    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0, 640.0, 2560.0,
                ])
            }),
            time_per_output_token: Family::new_with_constructor(|| {
                Histogram::new([
                    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0,
                ])
            }),
            e2e_latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0,
                ])
            }),
            adapters: Arc::new(AdapterRequests { counts: Mutex::default(), top: top_adapters }),
            totals: Arc::default(),
        }
    }

    /// Adds the series to `registry` (help texts without a final period: it adds one).
    pub fn register(&self, registry: &mut Registry) {
        let families = [
            (
                "tandem:requests",
                "Completion requests answered by this gateway, by tenant, base model and status",
                &self.requests,
            ),
            ("tandem:prompt_tokens", "Prompt tokens of answered requests", &self.prompt_tokens),
            ("tandem:generation_tokens", "Tokens generated for answered requests", &self.generation_tokens),
        ];
        for (name, help, family) in families {
            registry.register(name, help, family.clone());
        }
        let histograms = [
            (
                "tandem:time_to_first_token_seconds",
                "From a request's arrival to its first token",
                &self.time_to_first_token,
            ),
            (
                "tandem:time_per_output_token_seconds",
                "A request's mean time between output tokens after the first",
                &self.time_per_output_token,
            ),
            ("tandem:e2e_request_latency_seconds", "From a request's arrival to its last token", &self.e2e_latency),
        ];
        for (name, help, family) in histograms {
            registry.register(name, help, family.clone());
        }
        registry.register_collector(Box::new(self.adapters.clone()));
    }

    /// A request answered with `status`; `model` is its base model, `None` when its model was
    /// not found; `adapter` names the adapter it asked for.
    pub fn request(&self, tenant: &str, model: Option<&str>, adapter: Option<&str>, status: StatusCode) {
        let labels = vec![
            ("tenant", tenant.to_string()),
            ("model", model.unwrap_or(UNRESOLVED).to_string()),
            ("code", status.as_u16().to_string()),
        ];
        self.requests.get_or_create(&labels).inc();
        self.totals.requests.fetch_add(1, Relaxed);
        if status.is_server_error() {
            self.totals.errors.fetch_add(1, Relaxed);
        }
        if let (Some(adapter), Ok(mut counts)) = (adapter, self.adapters.counts.lock()) {
            *counts.entry(adapter.to_string()).or_default() += 1;
        }
    }

    /// Tokens of an answered request for base model `model`.
    pub fn tokens(&self, tenant: &str, model: &str, prompt: u32, completion: u32) {
        let labels = vec![("tenant", tenant.to_string()), ("model", model.to_string())];
        self.prompt_tokens.get_or_create(&labels).inc_by(u64::from(prompt));
        self.generation_tokens.get_or_create(&labels).inc_by(u64::from(completion));
        self.totals.generation_tokens.fetch_add(u64::from(completion), Relaxed);
    }

    /// The latencies of a request for base model `model` that arrived at `arrived`, gave its
    /// first token `first_token` after, and ends now with `tokens` generated.
    pub fn latency(&self, model: &str, arrived: Instant, first_token: Duration, tokens: u32) {
        let labels = vec![("model", model.to_string())];
        let total = arrived.elapsed();
        self.time_to_first_token.get_or_create(&labels).observe(first_token.as_secs_f64());
        self.totals.ttft_us.fetch_add(first_token.as_micros() as u64, Relaxed);
        self.totals.ttft_count.fetch_add(1, Relaxed);
        self.e2e_latency.get_or_create(&labels).observe(total.as_secs_f64());
        if tokens > 1 {
            let per_token = total.saturating_sub(first_token) / (tokens - 1);
            self.time_per_output_token.get_or_create(&labels).observe(per_token.as_secs_f64());
            self.totals.tpot_us.fetch_add(per_token.as_micros() as u64, Relaxed);
            self.totals.tpot_count.fetch_add(1, Relaxed);
        }
    }
}

/// Requests per adapter: counted for every adapter, named in the scrape for the top N only.
#[derive(Debug)]
struct AdapterRequests {
    counts: Mutex<HashMap<String, u64>>,
    top: usize,
}

impl AdapterRequests {
    /// The top `top` adapters by requests (ties by name), and `other` for the rest.
    fn rows(&self) -> Vec<(Labels, f64)> {
        let counts = self.counts.lock().map(|c| c.clone()).unwrap_or_default();
        let mut ranked: Vec<(String, u64)> = counts.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let rest: u64 = ranked.iter().skip(self.top).map(|(_, n)| n).sum();
        ranked.truncate(self.top);
        let mut rows: Vec<(Labels, f64)> =
            ranked.into_iter().map(|(adapter, n)| (vec![("adapter", adapter)], n as f64)).collect();
        rows.push((vec![("adapter", "other".to_string())], rest as f64));
        rows
    }
}

impl Collector for AdapterRequests {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        // A gauge, not a counter: `other` steps down when an adapter climbs into the top N.
        let help = "Requests per adapter (tenant:name): the top N by requests, the rest as \"other\".";
        encode(&mut encoder, "tandem:adapter_requests", help, &gauges(self.rows()))
    }
}

/// The cluster's state as gauges, for one scrape. A collector rather than registered families,
/// so that a series with no sample yet (no job, no group) is still described.
#[derive(Debug)]
struct StateGauges(Arc<ClusterState>);

impl Collector for StateGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let state = &self.0;
        let alive = state.workers.values().filter(|w| w.alive).count();
        let workers = gauges([
            (vec![("state", "alive".to_string())], alive as f64),
            (vec![("state", "dead".to_string())], (state.workers.len() - alive) as f64),
        ]);
        encode(&mut encoder, "tandem:workers", "Workers known to the cluster, by lease state.", &workers)?;
        let statuses = [
            JobStatus::Queued,
            JobStatus::Placed,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ];
        let jobs = gauges(statuses.iter().map(|s| {
            let n = state.jobs.values().filter(|j| j.status == *s).count();
            let name = serde_json::to_value(s).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            (vec![("status", name)], n as f64)
        }));
        encode(&mut encoder, "tandem:jobs", "Fine-tuning jobs by status.", &jobs)?;
        // A group's epoch counts its formations: it grows with every failure re-formed.
        let epochs = gauges(state.placements.iter().map(|(g, p)| {
            let labels = vec![("group", g.clone()), ("model", p.model.clone()), ("formed", p.formed.to_string())];
            (labels, p.epoch as f64)
        }));
        let help = "Each worker group's formation (bumped when it is re-formed), and whether rank 0 formed it.";
        encode(&mut encoder, "tandem:worker_group_epoch", help, &epochs)?;
        let adapters: usize = state.adapters.values().map(|a| a.len()).sum();
        let help = "Adapters registered (all tenants).";
        encode(&mut encoder, "tandem:adapters", help, &gauges([(Vec::new(), adapters as f64)]))?;
        let last_steps: Vec<(Labels, &tandem_proto::contract::StepFigures)> = (state.jobs.iter())
            .filter_map(|(id, j)| {
                let s = j.events.iter().filter_map(|e| e.step.as_ref()).next_back()?;
                Some((vec![("job", id.clone()), ("tenant", j.tenant.clone())], s))
            })
            .collect();
        type Pick = fn(&tandem_proto::contract::StepFigures) -> f64;
        let per_job: [(&str, &str, Pick); 4] = [
            ("tandem:job_step", "Optimizer steps a job has taken.", |s| s.step as f64),
            ("tandem:job_total_steps", "Optimizer steps a job takes in all.", |s| s.total_steps as f64),
            ("tandem:job_loss", "A job's training loss at its last step.", |s| s.loss),
            ("tandem:job_tokens_per_second", "A job's training speed at its last step.", |s| s.tokens_per_s),
        ];
        for (name, help, pick) in per_job {
            encode(&mut encoder, name, help, &gauges(last_steps.iter().map(|(l, s)| (l.clone(), pick(s)))))?;
        }
        // How much training a failure now would lose, for the jobs still running.
        let now = tandem_proto::contract::unix_now();
        let ages = (state.jobs.iter()).filter(|(_, j)| !j.status.is_final()).filter_map(|(id, j)| {
            let at = j.checkpoint.as_ref().filter(|c| c.at > 0)?.at;
            Some((vec![("job", id.clone()), ("tenant", j.tenant.clone())], now.saturating_sub(at) as f64))
        });
        let help = "Seconds since each unfinished job's last checkpoint was recorded.";
        encode(&mut encoder, "tandem:job_checkpoint_age_seconds", help, &gauges(ages))?;
        Ok(())
    }
}

pub async fn serve(State(gw): State<Arc<Gateway>>, caller: Caller) -> Result<Response, ApiError> {
    caller.must_be_operator("reads the metrics")?;
    let mut state = Registry::default();
    state.register_collector(Box::new(StateGauges(gw.state().await?)));
    let text = crate::metrics::text(&[&gw.registry, &state]);
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_adapters_are_named_in_at_most_n_series_and_other() {
        let metrics = Metrics::new(5);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        for i in 0..1000u32 {
            // Adapter i gets i % 7 + 1 requests: a few stand out, most tie.
            for _ in 0..(i % 7 + 1) {
                metrics.request("t", Some("base"), Some(&format!("t:a{i}")), StatusCode::OK);
            }
        }
        let text = crate::metrics::text(&[&registry]);
        let series: Vec<(&str, f64)> = (text.lines())
            .filter(|l| l.starts_with("tandem:adapter_requests{"))
            .map(|l| l.rsplit_once(' ').map(|(s, v)| (s, v.parse().unwrap())).unwrap())
            .collect();
        assert_eq!(series.len(), 6, "{series:?}");
        // The five named are among those with the most requests (7 each); the rest is `other`.
        let (other, named): (Vec<_>, Vec<_>) = series.iter().partition(|(s, _)| s.contains("adapter=\"other\""));
        assert!(named.iter().all(|(_, n)| *n == 7.0), "{series:?}");
        let total: u32 = (0..1000u32).map(|i| i % 7 + 1).sum();
        assert_eq!(other.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [f64::from(total - 35)]);
    }
}
