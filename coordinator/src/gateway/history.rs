//! The last minutes of the gateway, for the dashboard's charts and event list: every
//! [`INTERVAL`] a sample of its request totals and of the workers' SLO counters (from the
//! leader's leases), kept for [`SAMPLES`] intervals; and the last server errors it answered.
//! Charts are the differences between consecutive samples, so they show rates and means over
//! each interval rather than since the process started.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::{Value, json};
use tandem_proto::contract::{WorkerLease, unix_now};

use super::metrics::Totals;

/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: ten minutes.
const SAMPLES: usize = 120;
/// Server errors kept for the event list.
const ERRORS: usize = 50;

/// One sample: running totals at a time.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Unix seconds.
    at: u64,
    requests: u64,
    errors: u64,
    tokens: u64,
    ttft_us: u64,
    ttft_count: u64,
    tpot_us: u64,
    tpot_count: u64,
    /// Summed over the workers the leader has heard from.
    timed: u64,
    within_target: u64,
}

/// Requests this gateway answered with a server error: one, or several in a row alike (same
/// tenant, model, status and message), `at` the last one's time.
#[derive(Clone, Debug)]
pub struct ErrorEvent {
    pub at: u64,
    pub tenant: String,
    pub model: String,
    pub status: u16,
    pub message: String,
    pub count: u64,
}

#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
    errors: Mutex<VecDeque<ErrorEvent>>,
}

impl History {
    /// Takes a sample of `totals`, and of `leases` when the leader answered (else the workers'
    /// counters stay as last seen, and the interval shows no SLO figure).
    pub fn sample(&self, totals: &Totals, leases: Option<&[WorkerLease]>) {
        let Ok(mut samples) = self.samples.lock() else { return };
        let last = samples.back().copied().unwrap_or_default();
        let loads = leases.map(|l| l.iter().filter_map(|w| w.load.as_ref()));
        let (timed, within_target) = match loads {
            Some(loads) => loads.fold((0, 0), |(t, w), l| (t + l.output_tokens_timed, w + l.tokens_within_target)),
            None => (last.timed, last.within_target),
        };
        samples.push_back(Sample {
            at: unix_now(),
            requests: totals.requests.load(Relaxed),
            errors: totals.errors.load(Relaxed),
            tokens: totals.generation_tokens.load(Relaxed),
            ttft_us: totals.ttft_us.load(Relaxed),
            ttft_count: totals.ttft_count.load(Relaxed),
            tpot_us: totals.tpot_us.load(Relaxed),
            tpot_count: totals.tpot_count.load(Relaxed),
            timed,
            within_target,
        });
        if samples.len() > SAMPLES {
            samples.pop_front();
        }
    }

    /// One point per interval: requests and errors per second, tokens per second, the mean
    /// time to first token and per output token (seconds) and the share of output tokens within
    /// the workers' TPOT target; `null` where the interval had nothing to average.
    pub fn points(&self) -> Vec<Value> {
        let samples: Vec<Sample> = self.samples.lock().map(|s| s.iter().copied().collect()).unwrap_or_default();
        (samples.windows(2))
            .map(|w| {
                let (a, b) = (w[0], w[1]);
                let seconds = (b.at.saturating_sub(a.at)).max(1) as f64;
                let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / seconds;
                let mean = |sum: (u64, u64), n: (u64, u64)| {
                    let n = n.1.saturating_sub(n.0);
                    (n > 0).then(|| sum.1.saturating_sub(sum.0) as f64 / n as f64 / 1e6)
                };
                // A worker that restarted counts from zero again: no figure for that interval.
                let slo = (b.timed > a.timed && b.within_target >= a.within_target)
                    .then(|| (b.within_target - a.within_target) as f64 / (b.timed - a.timed) as f64);
                json!({
                    "time": b.at,
                    "requests_per_second": rate(a.requests, b.requests),
                    "errors_per_second": rate(a.errors, b.errors),
                    "tokens_per_second": rate(a.tokens, b.tokens),
                    "ttft_seconds": mean((a.ttft_us, b.ttft_us), (a.ttft_count, b.ttft_count)),
                    "tpot_seconds": mean((a.tpot_us, b.tpot_us), (a.tpot_count, b.tpot_count)),
                    "slo_attainment": slo,
                })
            })
            .collect()
    }

    /// Records an error; one alike to the last is counted there, so that an outage fills the
    /// list with one line rather than fifty.
    pub fn error(&self, e: ErrorEvent) {
        if let Ok(mut errors) = self.errors.lock() {
            if let Some(last) = errors.back_mut()
                && (&last.tenant, &last.model, last.status, &last.message)
                    == (&e.tenant, &e.model, e.status, &e.message)
            {
                last.at = e.at;
                last.count += e.count;
                return;
            }
            errors.push_back(e);
            if errors.len() > ERRORS {
                errors.pop_front();
            }
        }
    }

    /// The errors kept, oldest first.
    pub fn errors(&self) -> Vec<ErrorEvent> {
        self.errors.lock().map(|e| e.iter().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::contract::WorkerLoad;

    fn lease(timed: u64, within: u64) -> WorkerLease {
        let load = WorkerLoad { output_tokens_timed: timed, tokens_within_target: within, ..WorkerLoad::default() };
        WorkerLease { worker_id: "w".into(), heard_ms_ago: 0, load: Some(load) }
    }

    #[test]
    fn points_are_rates_and_means_over_each_interval() {
        let (history, totals) = (History::default(), Totals::default());
        history.sample(&totals, Some(&[lease(10, 10)]));
        totals.requests.fetch_add(4, Relaxed);
        totals.ttft_us.fetch_add(300_000, Relaxed);
        totals.ttft_count.fetch_add(3, Relaxed);
        history.sample(&totals, Some(&[lease(30, 25)]));
        // The leader did not answer: the SLO counters stay, and the interval has no figure.
        history.sample(&totals, None);
        let points = history.points();
        assert_eq!(points.len(), 2);
        let p = &points[0];
        assert!(p["requests_per_second"].as_f64().is_some_and(|r| r > 0.0 && r <= 4.0), "{p}");
        assert_eq!(p["ttft_seconds"].as_f64(), Some(0.1));
        assert_eq!(p["tpot_seconds"], Value::Null);
        assert_eq!(p["slo_attainment"].as_f64(), Some(0.75));
        assert_eq!(points[1]["slo_attainment"], Value::Null);
        assert_eq!(points[1]["requests_per_second"].as_f64(), Some(0.0));
    }

    #[test]
    fn errors_alike_in_a_row_are_counted_on_one_line() {
        let history = History::default();
        let error = |message: &str| ErrorEvent {
            at: 1,
            tenant: "t".into(),
            model: "m".into(),
            status: 503,
            message: message.into(),
            count: 1,
        };
        for message in ["down", "down", "down", "other", "down"] {
            history.error(error(message));
        }
        let kept: Vec<(String, u64)> = history.errors().into_iter().map(|e| (e.message, e.count)).collect();
        assert_eq!(kept, [("down".to_string(), 3), ("other".to_string(), 1), ("down".to_string(), 1)]);
    }
}
