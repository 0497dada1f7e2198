//! The operators' dashboard: `GET /dashboard` is one self-contained page (its script and styles
//! inline, charts drawn as SVG by that script, nothing fetched from elsewhere: it works offline
//! and its Content-Security-Policy forbids any other origin) that asks for the operator's key and
//! then polls `GET /v1/admin/overview` (operator key): the coordinators and their Raft progress,
//! the workers with their leases and what their engines hold, models, worker groups, jobs with
//! their loss curves, the API keys, the last minutes of traffic and recent events. Its actions
//! are API calls: cancel a job, drain a worker (`POST /v1/admin/workers/{id}/drain`), revoke a
//! key.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tandem_proto::contract::{ClusterState, Command, GroupStatus, Job, WorkerLease, unix_now};

use super::history::ErrorEvent;
use super::openai::{Body, parse};
use super::resources::{key_object, status_name};
use super::{ApiError, Caller, Gateway};

/// The page, with everything it needs inline.
const PAGE: &str = include_str!("dashboard.html");
/// Jobs shown: those still to finish, then the latest finished.
const JOBS: usize = 50;
/// Points of a job's loss curve shown (its last ones).
const LOSS_POINTS: usize = 500;
/// Entries of the event list.
const EVENTS: usize = 60;

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/v1/admin/overview", get(overview))
        .route("/v1/admin/workers/{id}/drain", post(drain))
}

/// The page holds no data (every figure comes from the operator-only overview), so it is served
/// to anyone; nothing it loads may come from another origin.
async fn page() -> Response {
    let policy = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
                  img-src data:; form-action 'none'; frame-ancestors 'none'";
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, policy),
        (header::CACHE_CONTROL, "no-store"),
    ];
    (headers, PAGE).into_response()
}

async fn overview(State(gw): State<Arc<Gateway>>, caller: Caller) -> Result<Response, ApiError> {
    caller.must_be_operator("reads the cluster's overview")?;
    let state = gw.state().await?;
    let statuses = gw.coordinator_statuses(&state).await;
    // Only the leader keeps leases: the others answer none.
    let leases: Vec<WorkerLease> =
        (statuses.iter().filter_map(|(_, s)| s.as_ref().ok())).flat_map(|s| s.leases.iter().cloned()).collect();
    let coordinators: Vec<Value> = (statuses.iter())
        .map(|(addr, s)| match s {
            Ok(s) => json!({
                "id": s.id, "addr": addr, "reachable": true, "leader": s.leader == s.id && s.id != 0, "leader_id": s.leader,
                "term": s.term, "commit": s.commit, "applied": s.applied, "voters": s.voters, "store": s.store,
            }),
            Err(e) => json!({"addr": addr, "reachable": false, "error": e}),
        })
        .collect();
    let mut keys: Vec<(&String, &tandem_proto::contract::ApiKey)> = state.api_keys.iter().collect();
    keys.sort_by_key(|(_, k)| k.created_at);
    Ok(axum::Json(json!({
        "object": "cluster_overview",
        "time": unix_now(),
        "coordinators": coordinators,
        "workers": workers(&state, &leases),
        "models": state.models.iter().map(|(name, m)| json!({"id": name, "uri": m.uri})).collect::<Vec<_>>(),
        "groups": state.placements.iter().map(|(name, p)| super::groups::group_json(&state, name, p)).collect::<Vec<_>>(),
        "jobs": jobs(&state),
        "api_keys": keys.into_iter().map(|(hash, k)| key_object(hash, k)).collect::<Vec<_>>(),
        "series": {"interval_seconds": super::history::INTERVAL.as_secs(), "points": gw.history.points()},
        "events": events(&state, gw.history.errors()),
    }))
    .into_response())
}

/// Every worker with its lease and load as the leader last heard them.
fn workers(state: &ClusterState, leases: &[WorkerLease]) -> Vec<Value> {
    (state.workers.iter())
        .map(|(id, w)| {
            let lease = leases.iter().find(|l| l.worker_id == *id);
            let groups: Vec<&String> =
                state.placements.iter().filter(|(_, p)| p.workers.contains(id)).map(|(g, _)| g).collect();
            json!({
                "id": id, "addr": w.addr, "alive": w.alive, "draining": w.draining,
                "group_worker": !w.collective_addr.is_empty(),
                "models": w.gpus.iter().flat_map(|g| &g.models).collect::<Vec<_>>(), "groups": groups,
                "heard_seconds_ago": lease.map(|l| l.heard_ms_ago as f64 / 1e3),
                "load": lease.and_then(|l| l.load.as_ref()),
            })
        })
        .collect()
}

/// Jobs still to finish (oldest first), then the latest finished, each with its loss curve.
fn jobs(state: &ClusterState) -> Vec<Value> {
    let mut jobs: Vec<(&String, &Job)> = state.jobs.iter().collect();
    jobs.sort_by_key(|(_, j)| {
        (j.status.is_final(), if j.status.is_final() { u64::MAX - j.created_at } else { j.created_at })
    });
    (jobs.into_iter().take(JOBS))
        .map(|(id, j)| {
            let steps: Vec<_> = j.events.iter().filter_map(|e| e.step.as_ref()).collect();
            let last = steps.last();
            let losses: Vec<[f64; 2]> =
                steps[steps.len().saturating_sub(LOSS_POINTS)..].iter().map(|s| [s.step as f64, s.loss]).collect();
            json!({
                "id": id, "tenant": j.tenant, "model": j.spec.base_model, "status": status_name(j.status),
                "worker": j.attempts.last().filter(|a| a.ended.is_none() && !j.status.is_final()).map(|a| &a.worker),
                "created_at": j.created_at, "finished_at": j.finished_at, "error": j.error,
                "step": last.map(|s| s.step), "total_steps": last.map(|s| s.total_steps),
                "loss": last.map(|s| s.loss), "tokens_per_second": last.map(|s| s.tokens_per_s),
                "losses": losses,
            })
        })
        .collect()
}

/// The latest job events (not the per-step figures) and gateway errors, newest first.
fn events(state: &ClusterState, errors: Vec<ErrorEvent>) -> Vec<Value> {
    let mut events: Vec<(u64, Value)> = (state.jobs.iter())
        .flat_map(|(id, j)| {
            (j.events.iter().filter(|e| e.step.is_none() && e.validation.is_none())).map(move |e| {
                (e.at, json!({"time": e.at, "kind": "job", "job": id, "tenant": j.tenant, "message": e.message}))
            })
        })
        .collect();
    events.extend(errors.into_iter().map(|e| {
        let times = if e.count > 1 { format!(" ({} times)", e.count) } else { String::new() };
        let message = format!("{} answered to {} for {}{times}: {}", e.status, e.tenant, e.model, e.message);
        (e.at, json!({"time": e.at, "kind": "error", "tenant": e.tenant, "message": message}))
    }));
    // Newest first; within a second, the later recorded first.
    events.reverse();
    events.sort_by_key(|e| std::cmp::Reverse(e.0));
    events.into_iter().take(EVENTS).map(|(_, v)| v).collect()
}

async fn drain(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Drain {
        drain: bool,
    }
    caller.must_be_operator("drains workers")?;
    let Drain { drain } = parse(&body)?;
    if !gw.state().await?.workers.contains_key(&id) {
        return Err(ApiError::not_found("worker_not_found", format!("no worker {id:?}")));
    }
    gw.propose("drain-worker", Command::DrainWorker { id: id.clone(), drain }).await?;
    Ok(axum::Json(json!({"object": "worker", "id": id, "draining": drain})).into_response())
}

impl Gateway {
    /// Each coordinator's status, by address: this one's, then the other members of its Raft
    /// group (an etcd-backed cluster shows this coordinator only: etcd knows no others).
    async fn coordinator_statuses(&self, state: &ClusterState) -> Vec<(String, Result<GroupStatus, String>)> {
        let own = self.cluster.status(false).await.map_err(|e| e.to_string());
        let mut others = BTreeSet::new();
        if own.as_ref().is_ok_and(|s| s.store == "raft") {
            others.extend(state.coordinators.values().filter(|a| *a != self.cluster.addr()).cloned());
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, addr) in others.iter().enumerate() {
            let client = self.view.coordinator(addr);
            tasks.spawn(async move {
                let status = match client {
                    Ok(c) => c.status(false).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                (i, status)
            });
        }
        let mut answers: Vec<Option<Result<GroupStatus, String>>> = vec![None; others.len()];
        while let Some(Ok((i, status))) = tasks.join_next().await {
            answers[i] = Some(status);
        }
        let mut statuses = vec![(self.cluster.addr().to_string(), own)];
        for (addr, status) in others.into_iter().zip(answers) {
            statuses.push((addr, status.unwrap_or_else(|| Err("no answer".into()))));
        }
        statuses
    }

    /// The leases the leader keeps, for the history's SLO figures (none: no leader answered).
    pub(super) async fn leader_leases(&self) -> Option<Vec<WorkerLease>> {
        let own = self.cluster.status(false).await.ok()?;
        // With etcd only the scheduler's holder keeps leases, and it is not told apart here.
        if own.leader == own.id || own.store != "raft" {
            return Some(own.leases);
        }
        let addr = own.members.iter().find(|m| m.id == own.leader)?.addr.clone();
        Some(self.view.coordinator(&addr).ok()?.status(false).await.ok()?.leases)
    }
}
