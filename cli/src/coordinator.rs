//! `tandem coordinator` (one member of the Raft group) and `tandem status` (what a coordinator
//! knows of the group).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde_json::{Value, json};
use tandem_coordinator::replica::Timing;
use tandem_coordinator::server;
use tandem_proto::v1::StatusRequest;
use tandem_proto::v1::cluster_client::ClusterClient;

#[derive(Args)]
pub struct CoordinatorArgs {
    /// This coordinator's id (one of the peers').
    #[arg(long)]
    id: u64,
    /// Every coordinator, this one included: `1=HOST:PORT,2=HOST:PORT,3=HOST:PORT`. Each
    /// address carries both the Raft traffic and the cluster API.
    #[arg(long)]
    peers: String,
    /// Where the Raft log, hard state and snapshots live.
    #[arg(long)]
    data_dir: PathBuf,
    /// Raft tick, milliseconds (elections after 10-20 ticks, heartbeats every 2).
    #[arg(long, default_value_t = 100)]
    tick_ms: u64,
    /// A worker not heard from for this long is marked dead, milliseconds.
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Any coordinator's address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    coordinator: String,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let peers = server::parse_peers(&args.peers).map_err(|e| anyhow!("--peers: {e}"))?;
    let timing = Timing { tick: Duration::from_millis(args.tick_ms.max(1)), ..Timing::default() };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        eprintln!("coordinator {} serving on {}", args.id, peers.get(&args.id).map_or("?", String::as_str));
        let lease = Duration::from_millis(args.lease_ms.max(1));
        server::serve(args.id, peers, &args.data_dir, timing, lease, shutdown).await.map_err(|e| anyhow!("{e}"))
    })
}

pub fn status(args: StatusArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let s = rt.block_on(async {
        let mut client = ClusterClient::connect(format!("http://{}", args.coordinator))
            .await
            .with_context(|| format!("connecting to {}", args.coordinator))?;
        anyhow::Ok(client.status(StatusRequest {}).await?.into_inner())
    })?;
    let state: Value = if s.state_json.is_empty() { Value::Null } else { serde_json::from_str(&s.state_json)? };
    let workers = state.get("workers").cloned().unwrap_or(Value::Null);
    if args.json {
        let out = json!({
            "id": s.id, "leader": s.leader, "term": s.term, "commit": s.commit, "applied": s.applied,
            "members": s.voters, "workers": workers,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("coordinator {} (asked at {})", s.id, args.coordinator);
    println!("members:      {:?}", s.voters);
    println!("leader:       {}", if s.leader == 0 { "none".to_string() } else { s.leader.to_string() });
    println!("term:         {}", s.term);
    println!("commit index: {} (applied {})", s.commit, s.applied);
    match workers.as_object() {
        None => println!("workers:      (state unavailable: no leader reachable)"),
        Some(w) if w.is_empty() => println!("workers:      none"),
        Some(w) => {
            for (id, info) in w {
                println!("worker {id}: {} alive={}", info["addr"].as_str().unwrap_or("?"), info["alive"]);
            }
        }
    }
    Ok(())
}
