//! `tandem models`: the cluster's catalogue of base models. Registering one names a folder every
//! worker that serves it reads at the same path; with `--tp N` it is also placed at once as a
//! tensor-parallel group over N spare group workers, which load it from there.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Subcommand};
use tandem_proto::contract::Command;
use tandem_worker::model::ModelConfig;

use crate::cluster_api::{ClusterArgs, propose, state};

#[derive(Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    action: ModelsAction,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Register base model NAME: its Hugging Face folder, at the same path on every worker.
    Register {
        name: String,
        /// The model's folder (config.json, safetensors, tokenizer.json).
        #[arg(long)]
        path: PathBuf,
        /// Also place it as a tensor-parallel group of N ranks (`NAME-tpN`) over spare group
        /// workers.
        #[arg(long)]
        tp: Option<usize>,
    },
    /// The registered models: where each is, and which workers and groups serve it.
    List,
    /// Forget a model (refused while a job not yet ended, a group or a worker uses it).
    Remove { name: String },
}

pub fn models(args: ModelsArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = args.cluster.client()?;
        match args.action {
            ModelsAction::Register { name, path, tp } => {
                let path = std::path::absolute(&path).with_context(|| format!("--path {}", path.display()))?;
                // Read where it can be (the CLI may run on a machine without the models' mount).
                if path.exists() {
                    ModelConfig::load(&path)
                        .with_context(|| format!("--path {} is not a model folder", path.display()))?;
                } else {
                    eprintln!("note: {} is not here; every worker that serves {name} must have it", path.display());
                }
                let uri = path.to_str().ok_or_else(|| anyhow!("--path {} is not UTF-8", path.display()))?.to_string();
                propose(&client, "models-register", Command::RegisterModel { name: name.clone(), uri }).await?;
                println!("model {name} registered at {}", path.display());
                if let Some(size) = tp {
                    let group = format!("{name}-tp{size}");
                    let create =
                        Command::CreateGroup { group: group.clone(), model: name, size, expert_parallel: false };
                    propose(&client, "models-register", create).await?;
                    println!("group {group} placed; `tandem groups list` shows when it is formed");
                }
            }
            ModelsAction::List => {
                let state = state(&client).await?;
                if state.models.is_empty() {
                    println!("no models");
                }
                for (name, model) in &state.models {
                    let workers: Vec<&str> = (state.workers.iter())
                        .filter(|(_, w)| w.alive && w.gpus.iter().any(|g| g.models.contains(name)))
                        .map(|(id, _)| id.as_str())
                        .collect();
                    let groups: Vec<&str> =
                        state.placements.iter().filter(|(_, p)| &p.model == name).map(|(g, _)| g.as_str()).collect();
                    let served = [("workers", workers), ("groups", groups)]
                        .into_iter()
                        .filter(|(_, ids)| !ids.is_empty())
                        .map(|(what, ids)| format!("{what} {}", ids.join(" ")))
                        .collect::<Vec<_>>();
                    let served = if served.is_empty() { "served by none".to_string() } else { served.join(", ") };
                    println!("model {name}: {} ({served})", model.uri);
                }
            }
            ModelsAction::Remove { name } => {
                propose(&client, "models-remove", Command::RemoveModel { name: name.clone() }).await?;
                println!("model {name} removed");
            }
        }
        Ok(())
    })
}
