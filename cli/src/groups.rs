//! `tandem groups`: the operator's worker groups, through a coordinator's cluster API (as
//! `tandem status` and `tandem members` are): create one (a base model as a tensor-parallel
//! group over spare group workers), list them, remove one.

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use tandem_coordinator::state::{ClusterState, Command, Proposal, Reply};
use tandem_proto::v1::cluster_client::ClusterClient;
use tandem_proto::v1::{ProposeRequest, StatusRequest};

#[derive(Args)]
pub struct GroupsArgs {
    /// Any coordinator's address (a follower forwards to the leader).
    #[arg(long, default_value = "127.0.0.1:7400")]
    coordinator: String,
    #[command(subcommand)]
    action: GroupAction,
}

#[derive(Subcommand)]
enum GroupAction {
    /// Place base model MODEL as a group of SIZE ranks over spare group workers (workers
    /// started with `--collective-addr` and in no group).
    Create {
        #[arg(long)]
        model: String,
        #[arg(long)]
        size: usize,
        /// The group's name (default: MODEL-tpSIZE).
        #[arg(long)]
        group: Option<String>,
        /// Spread a MoE model's experts whole over the ranks (expert parallelism) instead of
        /// slicing every expert.
        #[arg(long)]
        expert_parallel: bool,
    },
    /// The groups: model, epoch, whether formed, and each rank's worker.
    List,
    /// Remove a group (its members leave it at their next heartbeat).
    Rm { group: String },
}

pub fn groups(args: GroupsArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let addr = &args.coordinator;
        let mut client =
            ClusterClient::connect(format!("http://{addr}")).await.map_err(|e| anyhow!("connecting to {addr}: {e}"))?;
        let command = match args.action {
            GroupAction::List => {
                let s = client.status(StatusRequest {}).await?.into_inner();
                if s.state_json.is_empty() {
                    return Err(anyhow!("the state is unavailable (no leader reachable)"));
                }
                let state: ClusterState = serde_json::from_str(&s.state_json)?;
                if state.placements.is_empty() {
                    println!("no worker groups");
                }
                for (name, p) in &state.placements {
                    let ranks: Vec<String> = p.workers.iter().enumerate().map(|(r, w)| format!("{r}={w}")).collect();
                    let formed = if p.formed { "formed" } else { "forming" };
                    let experts = if p.expert_parallel { ", experts spread over the ranks" } else { "" };
                    let (model, epoch, ranks) = (&p.model, p.epoch, ranks.join(" "));
                    println!("group {name}: model {model} epoch {epoch} {formed}{experts}, ranks {ranks}");
                }
                return Ok(());
            }
            GroupAction::Create { model, size, group, expert_parallel } => {
                let group = group.unwrap_or_else(|| format!("{model}-tp{size}"));
                Command::CreateGroup { group, model, size, expert_parallel }
            }
            GroupAction::Rm { group } => Command::RemovePlacement { group },
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let proposal_json = serde_json::to_string(&Proposal::new(format!("groups-cli-{nanos}"), command.clone()))?;
        let r = client.propose(ProposeRequest { proposal_json }).await?.into_inner();
        match serde_json::from_str::<Reply>(&r.reply_json)? {
            Reply::Refused { reason } => Err(anyhow!("refused: {reason}")),
            _ => {
                match command {
                    Command::CreateGroup { group, .. } => {
                        println!("group {group} placed; `tandem groups list` shows when it is formed")
                    }
                    Command::RemovePlacement { group } => println!("group {group} removed"),
                    _ => {}
                }
                Ok(())
            }
        }
    })
}
