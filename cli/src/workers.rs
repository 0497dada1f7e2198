//! `tandem workers`: the operator's view of the cluster's workers, and draining one (for an
//! upgrade or a repair): a drained worker takes no new request, job or group place, hands its
//! fine-tuning attempts off (each stops after a checkpoint and resumes from it elsewhere), and
//! finishes the requests it is serving.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use tandem_proto::contract::{ClusterState, Command};

use crate::cluster_api::{ClusterArgs, propose, state};

#[derive(Args)]
pub struct WorkersArgs {
    #[command(subcommand)]
    action: WorkersAction,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Subcommand)]
enum WorkersAction {
    /// Every worker: state, address, models, groups and the jobs it trains.
    List,
    /// Drain worker ID: no new work goes to it and its jobs are handed off.
    Drain {
        id: String,
        /// Wait up to this many seconds until its jobs are handed off (0: do not wait).
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Put a drained worker back in service.
    Undrain { id: String },
}

pub fn workers(args: WorkersArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = args.cluster.client()?;
        match args.action {
            WorkersAction::List => {
                let state = state(&client).await?;
                if state.workers.is_empty() {
                    println!("no workers");
                }
                for (id, w) in &state.workers {
                    let status = if !w.alive {
                        "dead"
                    } else if w.draining {
                        "draining"
                    } else {
                        "serving"
                    };
                    let kind = if w.collective_addr.is_empty() { "" } else { " group-worker" };
                    let models: Vec<&str> = w.gpus.iter().flat_map(|g| &g.models).map(String::as_str).collect();
                    let groups: Vec<&str> = (state.placements.iter())
                        .filter(|(_, p)| p.workers.contains(id))
                        .map(|(g, _)| g.as_str())
                        .collect();
                    let jobs = state.assignments(id).len();
                    println!(
                        "worker {id}: {status}{kind} at {}, models [{}], groups [{}], {jobs} job(s)",
                        w.addr,
                        models.join(" "),
                        groups.join(" ")
                    );
                }
            }
            WorkersAction::Drain { id, wait } => {
                propose(&client, "workers-drain", Command::DrainWorker { id: id.clone(), drain: true }).await?;
                println!("worker {id} draining: no new work goes to it");
                if wait > 0 {
                    let deadline = Instant::now() + Duration::from_secs(wait);
                    loop {
                        let left = jobs_on(&state(&client).await?, &id);
                        if left.is_empty() {
                            println!("worker {id} drained: no job left on it");
                            break;
                        }
                        if Instant::now() > deadline {
                            bail!("worker {id} still has jobs after {wait} s: {}", left.join(", "));
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
            WorkersAction::Undrain { id } => {
                propose(&client, "workers-undrain", Command::DrainWorker { id: id.clone(), drain: false }).await?;
                println!("worker {id} back in service");
            }
        }
        Ok(())
    })
}

/// The jobs whose current attempt is on worker `id`.
fn jobs_on(state: &ClusterState, id: &str) -> Vec<String> {
    state.assignments(id).into_iter().map(|a| a.job).collect()
}
