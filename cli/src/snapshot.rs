//! `tandem snapshot`: back the cluster's state up (`save`, from a running group) and seed a new
//! group with it (`restore`, into each founding coordinator's empty data folder before its first
//! start). See `tandem_coordinator::backup`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tandem_coordinator::backup::Backup;

use crate::cluster_api::{ClusterArgs, state};

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    action: SnapshotAction,
}

#[derive(Subcommand)]
enum SnapshotAction {
    /// Save the cluster's state, as of one linearizable read, to FILE (mode 0600).
    Save {
        file: PathBuf,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Seed an empty coordinator data folder with FILE: run it for every founding coordinator
    /// of the new group, then start them.
    Restore {
        file: PathBuf,
        /// The coordinator's --data-dir (empty, or not there yet).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

pub fn snapshot(args: SnapshotArgs) -> Result<()> {
    match args.action {
        SnapshotAction::Save { file, cluster } => {
            let rt = tokio::runtime::Runtime::new()?;
            let state = rt.block_on(async { state(&cluster.client()?).await })?;
            let backup = Backup::new(state);
            backup.write(&file).with_context(|| format!("saving to {}", file.display()))?;
            let s = &backup.state;
            println!(
                "saved the state at log index {} to {}: jobs {}, files {}, adapters {}, API keys {}, models {}",
                s.applied,
                file.display(),
                s.jobs.len(),
                s.files.len(),
                s.adapters.values().map(|names| names.len()).sum::<usize>(),
                s.api_keys.len(),
                s.models.len()
            );
        }
        SnapshotAction::Restore { file, data_dir } => {
            let backup = Backup::read(&file)?;
            let applied = backup.state.applied;
            backup.restore_into(&data_dir)?;
            println!(
                "{} seeded with the state at log index {applied}: start the coordinator on it (every founding member seeded alike)",
                data_dir.display()
            );
        }
    }
    Ok(())
}
