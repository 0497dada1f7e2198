//! `tandem groups`: the operator's worker groups, through a coordinator's cluster API (as
//! `tandem status` and `tandem coordinators` are): create one (a base model as a tensor-parallel
//! group over spare group workers), list them, remove one.

use anyhow::Result;
use clap::{Args, Subcommand};
use tandem_proto::contract::Command;

use crate::cluster_api::{ClusterArgs, propose, state};

#[derive(Args)]
pub struct GroupsArgs {
    #[command(subcommand)]
    action: GroupAction,
    #[command(flatten)]
    cluster: ClusterArgs,
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
        let client = args.cluster.client()?;
        let command = match args.action {
            GroupAction::List => {
                let state = state(&client).await?;
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
        propose(&client, "groups-cli", command.clone()).await?;
        match command {
            Command::CreateGroup { group, .. } => {
                println!("group {group} placed; `tandem groups list` shows when it is formed")
            }
            Command::RemovePlacement { group } => println!("group {group} removed"),
            _ => {}
        }
        Ok(())
    })
}
