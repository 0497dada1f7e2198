//! `tandem worker`: one worker process. It loads a base model (and adapters), runs the
//! co-serving engine on a thread of its own, serves completions over gRPC (`tandem.v1.Worker`),
//! and holds a lease at the coordinator.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use tandem_kernels::Device;
use tandem_worker::engine::{Engine, EngineConfig};
use tandem_worker::model::{Model, ModelConfig};
use tandem_worker::service::{EngineThread, WorkerService, keep_lease};
use tandem_worker::tokenizer::TextTokenizer;

use crate::worker_jobs::JobsAgent;

#[derive(Args)]
pub struct WorkerArgs {
    /// This worker's id in the cluster.
    #[arg(long)]
    id: String,
    /// Where it serves gRPC (HOST:PORT); the coordinator and the gateway reach it there.
    #[arg(long)]
    listen: String,
    /// A coordinator's address (a follower forwards to the leader).
    #[arg(long)]
    coordinator: String,
    /// Base model directory (HF format, with tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The base model's name in the cluster (default: the directory's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Load an adapter at start: NAME=DIR (PEFT LoRA or ESFT). Repeatable.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// The shared folder of uploaded files and adapters (the gateway's `--blobs`); the worker
    /// writes its jobs' checkpoints and adapters under `jobs/` there.
    #[arg(long)]
    blobs: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let device: Device = args.device.parse()?;
    device.ensure_available()?;
    let config = ModelConfig::load(&args.model)?;
    let tokenizer =
        TextTokenizer::load(&args.model).with_context(|| format!("tokenizer of {}", args.model.display()))?;
    let adapters =
        (args.adapters.iter()).map(|spec| crate::generate::load_adapter(spec, &config)).collect::<Result<Vec<_>>>()?;
    let model =
        Arc::new(Model::load(&args.model, device).with_context(|| format!("loading {}", args.model.display()))?);
    let engine = Engine::new(model.clone(), adapters, Some(tokenizer), EngineConfig::default())?;
    let (engine, train_events) = EngineThread::start(engine)?;
    let agent = JobsAgent {
        engine: engine.clone(),
        model,
        tokenizer: Arc::new(TextTokenizer::load(&args.model)?),
        coordinator: args.coordinator.clone(),
        blobs: args.blobs,
    };
    let model_name = match args.model_name {
        Some(n) => n,
        None => args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let addr = args.listen.parse().map_err(|e| anyhow!("--listen {}: {e}", args.listen))?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (assignments, assigned) = tokio::sync::watch::channel(String::new());
        let lease =
            tokio::spawn(keep_lease(args.coordinator, args.id.clone(), args.listen.clone(), model_name, assignments));
        let jobs = tokio::spawn(agent.run(assigned, train_events));
        eprintln!("worker {} serving on {}", args.id, args.listen);
        let shutdown = crate::stop_requested();
        let served = tonic::transport::Server::builder()
            .add_service(WorkerService::new(engine))
            .serve_with_shutdown(addr, shutdown)
            .await;
        lease.abort();
        jobs.abort();
        served.with_context(|| format!("serving on {}", args.listen))
    })
}
