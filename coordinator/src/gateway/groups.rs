//! Worker groups, for the operator: `POST /v1/admin/groups` places a base model as a
//! tensor-parallel group over spare group workers (`{"model", "size", "group"?}`), `GET` lists
//! the groups with their members, epoch and whether rank 0 formed it, `DELETE
//! /v1/admin/groups/{group}` removes one (its members leave it at their next heartbeat).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::openai::{Body, parse};
use super::{ApiError, Caller, Gateway};
use tandem_proto::contract::{ClusterState, Command, Placement};

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/admin/groups", post(create_group).get(list_groups))
        .route("/v1/admin/groups/{group}", delete(delete_group))
}

/// A group as the API shows it.
pub(super) fn group_json(state: &ClusterState, name: &str, p: &Placement) -> Value {
    let ranks: Vec<Value> = (p.workers.iter().enumerate())
        .map(|(rank, w)| {
            let info = state.workers.get(w);
            json!({
                "rank": rank, "worker": w, "alive": info.is_some_and(|i| i.alive),
                "collective_addr": info.map(|i| i.collective_addr.clone()).unwrap_or_default(),
            })
        })
        .collect();
    json!({"object": "worker_group", "id": name, "model": p.model, "size": p.workers.len(), "epoch": p.epoch,
           "formed": p.formed, "expert_parallel": p.expert_parallel, "ranks": ranks})
}

async fn create_group(State(gw): State<Arc<Gateway>>, caller: Caller, Body(body): Body) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    struct NewGroup {
        model: String,
        size: usize,
        group: Option<String>,
        #[serde(default)]
        expert_parallel: bool,
    }
    caller.must_be_operator("manages worker groups")?;
    let NewGroup { model, size, group, expert_parallel } = parse(&body)?;
    let group = group.unwrap_or_else(|| format!("{model}-tp{size}"));
    let create = Command::CreateGroup { group: group.clone(), model, size, expert_parallel };
    gw.propose("create-group", create).await?;
    let state = gw.state().await?;
    let p = state.placements.get(&group).ok_or_else(|| ApiError::unavailable("the group was removed at once"))?;
    Ok(axum::Json(group_json(&state, &group, p)).into_response())
}

async fn list_groups(State(gw): State<Arc<Gateway>>, caller: Caller) -> Result<Response, ApiError> {
    caller.must_be_operator("manages worker groups")?;
    let state = gw.state().await?;
    let data: Vec<Value> = state.placements.iter().map(|(name, p)| group_json(&state, name, p)).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn delete_group(
    State(gw): State<Arc<Gateway>>,
    caller: Caller,
    UrlPath(group): UrlPath<String>,
) -> Result<Response, ApiError> {
    caller.must_be_operator("manages worker groups")?;
    if !gw.state().await?.placements.contains_key(&group) {
        return Err(ApiError::not_found("group_not_found", format!("no worker group {group:?}")));
    }
    gw.propose("delete-group", Command::RemovePlacement { group: group.clone() }).await?;
    Ok(axum::Json(json!({"id": group, "object": "worker_group", "deleted": true})).into_response())
}
