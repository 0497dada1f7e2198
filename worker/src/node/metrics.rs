//! A worker's series on its metrics port, from its engine's figures taken at the scrape:
//! requests running and waiting, KV-cache and page-pool use by kind, tokens per iteration by
//! kind, the adapter cache's hits, loads and evictions, the decode SLO, and each job in
//! training's speed. vLLM's names where one means the same (docs/observability.md).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tandem_proto::contract::WorkerLoad;
use tandem_proto::metrics_port::{HistogramRow, Histograms, Labels, counters, encode, gauges, text};

use crate::engine::metrics::{Buckets, EngineMetrics, JobMetrics, TokenCounts};

/// What worker's heartbeat tells of its engine, which measured `m`.
pub fn load(m: &EngineMetrics) -> WorkerLoad {
    WorkerLoad {
        requests_running: m.running as u64,
        requests_waiting: m.waiting as u64,
        pages: m.pool.capacity as u64,
        kv_pages: m.pool.kv as u64,
        adapter_pages: m.pool.adapter as u64,
        adapters_pool: m.adapters_pool.clone(),
        adapters_host: m.adapters_host as u64,
        output_tokens_timed: m.output_tokens_timed,
        tokens_within_target: m.tokens_within_target,
        jobs_training: m.jobs.len() as u64,
    }
}

/// The scrape of worker `worker` whose engine measured `m`.
pub fn render(worker: &str, m: EngineMetrics) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Figures { worker: worker.to_string(), m }));
    text(&[&registry])
}

#[derive(Debug)]
struct Figures {
    worker: String,
    m: EngineMetrics,
}

impl Figures {
    fn labels(&self, more: &[(&'static str, &str)]) -> Labels {
        let mut labels = vec![("worker", self.worker.clone())];
        labels.extend(more.iter().map(|(k, v)| (*k, v.to_string())));
        labels
    }

    fn by_kind(&self, tokens: &TokenCounts) -> Vec<(Labels, f64)> {
        let kinds = [
            ("decode", tokens.decode),
            ("prefill", tokens.prefill),
            ("finetune", tokens.finetune),
            ("finetune_backward", tokens.finetune_backward),
        ];
        kinds.iter().map(|(kind, n)| (self.labels(&[("kind", kind)]), *n as f64)).collect()
    }
}

impl Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let (m, one) = (&self.m, self.labels(&[]));
        let pool = m.pool;
        let share = |pages: usize| if pool.capacity == 0 { 0.0 } else { pages as f64 / pool.capacity as f64 };
        let now = [
            ("tandem:num_requests_running", "Requests decoding or prefilling now.", m.running as f64),
            ("tandem:num_requests_waiting", "Requests queued behind them.", m.waiting as f64),
            ("tandem:kv_cache_usage_perc", "Share of the page pool holding KV cache (0-1).", share(pool.kv)),
            (
                "tandem:tpot_slo_attainment",
                "Share of output tokens (after each request's first) within the TPOT target.",
                m.slo_attainment(),
            ),
            ("tandem:tpot_target_seconds", "The time per output token the engine aims at.", m.tpot_target_s),
            (
                "tandem:engine_iteration_limit_seconds",
                "The iteration time the planner allows now (fine-tuning fills what inference leaves).",
                m.iteration_limit_s,
            ),
        ];
        for (name, help, value) in now {
            encode(&mut encoder, name, help, &gauges([(one.clone(), value)]))?;
        }
        let tiers = [("pool", m.adapters_pool.len()), ("host", m.adapters_host)];
        let tiers = gauges(tiers.iter().map(|(tier, n)| (self.labels(&[("tier", tier)]), *n as f64)));
        let help = "Adapters here by tier: in the page pool, in host memory (every registered one).";
        encode(&mut encoder, "tandem:adapters_resident", help, &tiers)?;
        let pages = [("kv", pool.kv), ("adapter", pool.adapter), ("free", pool.free())];
        let pages = gauges(pages.iter().map(|(kind, n)| (self.labels(&[("kind", kind)]), *n as f64)));
        encode(&mut encoder, "tandem:page_pool_pages", "Pages of the pool by what holds them.", &pages)?;
        let help = "Tokens of the last engine iteration, by kind.";
        encode(&mut encoder, "tandem:engine_batch_tokens", help, &gauges(self.by_kind(&m.last_iteration)))?;
        let tokens = counters(self.by_kind(&m.tokens).into_iter().map(|(l, n)| (l, n as u64)));
        encode(&mut encoder, "tandem:engine_tokens", "Tokens the engine processed, by kind.", &tokens)?;
        let c = m.adapter_cache;
        let totals = [
            ("tandem:engine_iterations", "Engine iterations (one batch each).", m.iterations),
            ("tandem:adapter_cache_hits", "Requests and steps whose adapter was resident in the pool.", c.hits),
            ("tandem:adapter_loads", "Adapters paged into the pool (from the host tier).", c.misses),
            ("tandem:adapter_evictions", "Adapters paged out of the pool to make room.", c.evictions),
        ];
        for (name, help, value) in totals {
            encode(&mut encoder, name, help, &counters([(one.clone(), value)]))?;
        }
        // A request's pages are reserved when it is admitted, so none is ever preempted; the
        // series is there for dashboards made for vLLM.
        let help = "Requests preempted (never: pages are reserved at admission).";
        encode(&mut encoder, "tandem:num_preemptions", help, &counters([(one.clone(), 0)]))?;
        let help = "How long each engine iteration took.";
        let row = |labels: Labels, b: &Buckets| HistogramRow { labels, sum: b.sum, buckets: b.cumulative() };
        let iterations = Histograms(vec![row(one.clone(), &m.iteration_seconds)]);
        encode(&mut encoder, "tandem:engine_iteration_seconds", help, &iterations)?;
        let loads = [("disk", &m.adapter_disk_loads), ("host", &m.adapter_page_ins)]
            .map(|(tier, b)| row(self.labels(&[("tier", tier)]), b));
        let help = "Adapter loads by the tier they came from: disk into host memory, host into the page pool.";
        encode(&mut encoder, "tandem:adapter_load_seconds", help, &Histograms(loads.into()))?;
        type Pick = fn(&JobMetrics) -> f64;
        let per_job: [(&str, &str, Pick); 3] = [
            (
                "tandem:job_engine_tokens_per_second",
                "Training tokens per second of engine time, per job in training here.",
                |j| j.tokens_per_s,
            ),
            ("tandem:job_learning_rate", "The learning rate of each job's next optimizer step.", |j| j.learning_rate),
            (
                "tandem:job_engine_time_share",
                "Share of the engine's time since each job joined that went to its rows (0-1).",
                |j| j.engine_share,
            ),
        ];
        for (name, help, pick) in per_job {
            let rows = m.jobs.iter().map(|(job, j)| (self.labels(&[("job", job)]), pick(j)));
            encode(&mut encoder, name, help, &gauges(rows))?;
        }
        Ok(())
    }
}
