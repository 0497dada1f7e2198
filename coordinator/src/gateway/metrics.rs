//! `/metrics` in Prometheus's text format (operator's key): this gateway's request and token
//! counters per tenant and model (base or adapter), and the cluster's state as gauges: workers,
//! jobs by status, and each job's step, loss and speed.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, Caller, Gateway};
use tandem_proto::contract::{ClusterState, JobStatus};

/// Counters of one (tenant, model).
#[derive(Default, Clone, Copy)]
struct Counts {
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// (tenant, model, HTTP status).
type RequestKey = (String, String, u16);

/// This gateway's counters (per process: Prometheus sums over the coordinators).
#[derive(Clone, Default)]
pub struct Metrics {
    requests: Arc<Mutex<BTreeMap<RequestKey, u64>>>,
    tokens: Arc<Mutex<BTreeMap<(String, String), Counts>>>,
}

impl Metrics {
    pub fn request(&self, tenant: &str, model: &str, status: StatusCode) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((tenant.into(), model.into(), status.as_u16())).or_default() += 1;
        }
    }

    pub fn tokens(&self, tenant: &str, model: &str, prompt: u32, completion: u32) {
        if let Ok(mut t) = self.tokens.lock() {
            let c = t.entry((tenant.into(), model.into())).or_default();
            c.prompt_tokens += u64::from(prompt);
            c.completion_tokens += u64::from(completion);
        }
    }

    fn render(&self, state: &ClusterState) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let requests = self.requests.lock().map(|r| r.clone()).unwrap_or_default();
        family(
            "tandem_requests_total",
            "counter",
            "Completion requests answered by this gateway.",
            (requests.iter())
                .map(|((t, m, s), n)| {
                    (format!("tenant=\"{}\",model=\"{}\",code=\"{s}\"", esc(t), esc(m)), n.to_string())
                })
                .collect(),
        );
        let tokens = self.tokens.lock().map(|t| t.clone()).unwrap_or_default();
        for (name, help, pick) in [
            (
                "tandem_prompt_tokens_total",
                "Prompt tokens of answered requests.",
                (|c: &Counts| c.prompt_tokens) as fn(&Counts) -> u64,
            ),
            ("tandem_completion_tokens_total", "Tokens generated for answered requests.", |c: &Counts| {
                c.completion_tokens
            }),
        ] {
            let rows = tokens
                .iter()
                .map(|((t, m), c)| (format!("tenant=\"{}\",model=\"{}\"", esc(t), esc(m)), pick(c).to_string()));
            family(name, "counter", help, rows.collect());
        }
        let alive = state.workers.values().filter(|w| w.alive).count();
        family(
            "tandem_workers",
            "gauge",
            "Workers known to the cluster, by lease state.",
            vec![
                ("state=\"alive\"".into(), alive.to_string()),
                ("state=\"dead\"".into(), (state.workers.len() - alive).to_string()),
            ],
        );
        let statuses = [
            JobStatus::Queued,
            JobStatus::Placed,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ];
        family(
            "tandem_jobs",
            "gauge",
            "Fine-tuning jobs by status.",
            (statuses.iter())
                .map(|s| {
                    let n = state.jobs.values().filter(|j| j.status == *s).count();
                    (
                        format!("status=\"{}\"", serde_json::to_value(s).unwrap_or_default().as_str().unwrap_or("?")),
                        n.to_string(),
                    )
                })
                .collect(),
        );
        // A group's epoch counts its formations: it grows with every failure re-formed.
        family(
            "tandem_worker_group_epoch",
            "gauge",
            "Each worker group's formation (bumped when it is re-formed), and whether rank 0 formed it.",
            (state.placements.iter())
                .map(|(g, p)| {
                    (
                        format!("group=\"{}\",model=\"{}\",formed=\"{}\"", esc(g), esc(&p.model), p.formed),
                        p.epoch.to_string(),
                    )
                })
                .collect(),
        );
        let adapters: usize = state.adapters.values().map(|a| a.len()).sum();
        family(
            "tandem_adapters",
            "gauge",
            "Adapters registered (all tenants).",
            vec![(String::new(), adapters.to_string())],
        );
        let last_steps: Vec<(String, &tandem_proto::contract::StepFigures)> = (state.jobs.iter())
            .filter_map(|(id, j)| {
                let s = j.events.iter().filter_map(|e| e.step.as_ref()).next_back()?;
                Some((format!("job=\"{}\",tenant=\"{}\"", esc(id), esc(&j.tenant)), s))
            })
            .collect();
        for (name, help, pick) in [
            (
                "tandem_job_step",
                "Optimizer steps a job has taken.",
                (|s: &tandem_proto::contract::StepFigures| s.step as f64)
                    as fn(&tandem_proto::contract::StepFigures) -> f64,
            ),
            ("tandem_job_total_steps", "Optimizer steps a job takes in all.", |s| s.total_steps as f64),
            ("tandem_job_loss", "A job's training loss at its last step.", |s| s.loss),
            ("tandem_job_tokens_per_second", "A job's training speed at its last step.", |s| s.tokens_per_s),
        ] {
            family(name, "gauge", help, last_steps.iter().map(|(l, s)| (l.clone(), pick(s).to_string())).collect());
        }
        out
    }
}

/// A label value with Prometheus's escapes.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub async fn serve(State(gw): State<Arc<Gateway>>, caller: Caller) -> Result<Response, ApiError> {
    caller.must_be_operator("reads the metrics")?;
    let state = gw.state().await?;
    let text = gw.metrics.render(&state);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
