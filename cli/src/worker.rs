//! `tandem worker`: one worker process (`tandem_worker::node`). It loads a base model (and
//! adapters), starts its engine thread and runs the node: lease, jobs agent and the gRPC
//! `Worker` service. With `--collective-addr` it is a group worker instead: it serves only as a
//! rank of the worker groups the coordinator places on it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use tandem_kernels::Device;
use tandem_proto::ClusterClient;

use crate::certs::SecurityArgs;
use tandem_worker::collective::CollectiveOptions;
use tandem_worker::engine::{Engine, EngineConfig};
use tandem_worker::model::{Model, ModelConfig};
use tandem_worker::node::group::DataPlane;
use tandem_worker::node::{EngineThread, GroupWorker, Node};
use tandem_worker::tokenizer::TextTokenizer;

#[derive(Args)]
pub struct WorkerArgs {
    /// This worker's id in the cluster.
    #[arg(long)]
    id: String,
    /// Where it serves gRPC (HOST:PORT); the coordinator and the gateway reach it there.
    #[arg(long)]
    listen: String,
    /// The coordinators' addresses, separated by commas (a follower forwards to the leader):
    /// the worker keeps its lease through whichever answers, so give every one.
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
    /// Serve this worker's metrics for Prometheus here (HOST:PORT): `GET /metrics`, under the
    /// cluster's mutual TLS to holders of an operator certificate.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Makes this a group worker: it serves no whole model, only its ranks in the worker
    /// groups the coordinator places on it (tensor-parallel shards), and listens here
    /// (HOST:PORT, reachable by the other ranks) for their collectives.
    #[arg(long)]
    collective_addr: Option<String>,
    /// A group's collectives fail after this long without word from a rank.
    #[arg(long, default_value_t = 60_000)]
    collective_timeout_ms: u64,
    /// A group must be formed (every rank connected) within this long.
    #[arg(long, default_value_t = 120_000)]
    group_setup_timeout_ms: u64,
    /// What carries a group's model collectives: `tcp`, or `nccl` (a `cuda` build with
    /// `--device cuda:N`; the plans still go over TCP, which also hands out the NCCL id).
    #[arg(long, default_value = "tcp")]
    collective_backend: String,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    pub otlp: crate::telemetry::OtlpArgs,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let device: Device = args.device.parse()?;
    device.ensure_available()?;
    let config = ModelConfig::load(&args.model)?;
    let security = args.security.security(&args.id)?;
    let node = Node {
        id: args.id.clone(),
        listen: args.listen.clone(),
        cluster: ClusterClient::new(&args.coordinator, &security)?,
        security,
        blobs: args.blobs.clone(),
        metrics: args.metrics,
    };
    let rt = tokio::runtime::Runtime::new()?;
    if let Some(collective_addr) = args.collective_addr.clone() {
        let group_worker = group_worker(&args, device, collective_addr)?;
        return Ok(rt.block_on(node.serve_groups(group_worker, crate::stop_requested()))?);
    }
    let tokenizer =
        TextTokenizer::load(&args.model).with_context(|| format!("tokenizer of {}", args.model.display()))?;
    let adapters =
        (args.adapters.iter()).map(|spec| crate::generate::load_adapter(spec, &config)).collect::<Result<Vec<_>>>()?;
    let model =
        Arc::new(Model::load(&args.model, device).with_context(|| format!("loading {}", args.model.display()))?);
    let engine = Engine::new(model, adapters, Some(tokenizer), EngineConfig::default())?;
    let (engine, trained) = EngineThread::start(engine)?;
    Ok(rt.block_on(node.serve_model(model_name(&args), engine, trained, crate::stop_requested()))?)
}

/// The base model's name in the cluster: `--model-name`, else the folder's name.
fn model_name(args: &WorkerArgs) -> String {
    match &args.model_name {
        Some(n) => n.clone(),
        None => args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    }
}

/// A group worker's settings: no engine of its own; it serves as the ranks the coordinator
/// gives it.
fn group_worker(args: &WorkerArgs, device: Device, collective_addr: String) -> Result<GroupWorker> {
    if !args.adapters.is_empty() {
        return Err(anyhow!("--adapter is for whole-model workers: a group loads adapters as requests name them"));
    }
    let data = match (args.collective_backend.as_str(), device) {
        ("tcp", _) => DataPlane::Tcp,
        ("nccl", Device::Cuda(device)) => DataPlane::Nccl { device },
        ("nccl", Device::Cpu) => return Err(anyhow!("--collective-backend nccl needs --device cuda:N")),
        (other, _) => return Err(anyhow!("--collective-backend {other:?}: expected `tcp` or `nccl`")),
    };
    Ok(GroupWorker {
        collective_addr,
        model_dir: args.model.clone(),
        model_name: model_name(args),
        device,
        collective: CollectiveOptions {
            timeout: Duration::from_millis(args.collective_timeout_ms.max(1)),
            setup_timeout: Duration::from_millis(args.group_setup_timeout_ms.max(1)),
        },
        engine: EngineConfig::default(),
        data,
    })
}
