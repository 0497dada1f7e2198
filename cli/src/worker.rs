//! `tandem worker`: one worker process (`tandem_worker::node`). It loads a base model (and
//! adapters), starts its engine thread and runs the node: lease, jobs agent and the gRPC
//! `Worker` service. With `--collective-addr` it is a group worker instead: it serves only as a
//! rank of the worker groups the coordinator places on it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use tandem_kernels::{DType, Device};
use tandem_proto::ClusterClient;
use tandem_proto::contract::check_name;

use crate::certs::SecurityArgs;
use tandem_worker::collective::CollectiveOptions;
use tandem_worker::engine::{Engine, EngineConfig};
use tandem_worker::model::{KvCache, Model, ModelConfig};
use tandem_worker::node::group::DataPlane;
use tandem_worker::node::{EngineThread, GroupWorker, Node};
use tandem_worker::tokenizer::TextTokenizer;

#[derive(Args)]
pub struct WorkerArgs {
    /// This worker's id in the cluster (default: this machine's host name).
    #[arg(long)]
    id: Option<String>,
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
    /// Answer health probes here (IP:PORT), plain HTTP: `GET /health` is 200 while the worker
    /// holds its lease.
    #[arg(long)]
    health: Option<std::net::SocketAddr>,
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
    engine: EngineArgs,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    pub otlp: crate::telemetry::OtlpArgs,
    #[command(flatten)]
    config: crate::config::ConfigFile,
}

/// What one worker's engine holds and admits.
#[derive(Args)]
struct EngineArgs {
    /// The unified pool's size: pages (each holds one block of --page-tokens tokens' keys and
    /// values in every layer; resident adapters take pages too), or `P%` of the memory free once
    /// the model is loaded (host memory on the CPU, device memory on a GPU; whole-model workers
    /// only), at most 95%.
    #[arg(long, default_value = "512", value_name = "PAGES|P%")]
    pool_pages: PoolSize,
    /// Tokens per page.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    page_tokens: u64,
    /// Requests that may wait for admission; past this, requests are refused as overloaded.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_queue: u64,
    /// Tokens one engine step may process (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    max_batch_tokens: u64,
    /// Sequences running at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_running: u64,
    /// The longest prompt plus completion admitted, tokens (default: the model's context).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_model_len: Option<u64>,
    /// The time-per-output-token target, milliseconds: how long a step may take while requests
    /// decode (fine-tuning gets what inference leaves of it).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    tpot_target_ms: u64,
    /// Uploaded adapters kept in host memory (the tier below the pool); past this the least
    /// recently requested is dropped and read from disk again when asked for (default: all).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    host_adapters: Option<u64>,
}

/// How big the page pool is.
#[derive(Clone, Copy, Debug)]
enum PoolSize {
    Pages(usize),
    /// A share of free memory, in (0, 0.95]: the rest is left to activations and the runtime.
    Share(f64),
}

impl std::str::FromStr for PoolSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = match s.strip_suffix('%') {
            Some(p) => {
                p.trim().parse::<f64>().ok().filter(|p| *p > 0.0 && *p <= 95.0).map(|p| PoolSize::Share(p / 100.0))
            }
            None => s.parse::<usize>().ok().filter(|&n| n > 0).map(PoolSize::Pages),
        };
        parsed.ok_or_else(|| format!("{s:?} is neither a number of pages (at least 1) nor a share of memory up to 95%"))
    }
}

impl EngineArgs {
    /// Refuses settings `model` cannot have.
    fn check(&self, model: &ModelConfig) -> Result<()> {
        if let Some(len) = self.max_model_len.filter(|&len| len as usize > model.max_position_embeddings) {
            bail!("--max-model-len {len} is past the model's context of {} tokens", model.max_position_embeddings);
        }
        Ok(())
    }

    /// The engine's settings for `model` on `device`.
    fn config(&self, model: &ModelConfig, device: Device) -> Result<EngineConfig> {
        let page_tokens = self.page_tokens as usize;
        let pages = match self.pool_pages {
            PoolSize::Pages(n) => n,
            PoolSize::Share(share) => {
                let free = device.free_memory().context("--pool-pages as a share of free memory")?;
                let page = KvCache::page_bytes(model, page_tokens, DType::F32);
                let pages = (free as f64 * share) as usize / page;
                if pages == 0 {
                    bail!("--pool-pages {}%: {free} bytes free hold no page of {page} bytes", share * 100.0);
                }
                tracing::info!(pages, free_bytes = free, page_bytes = page, "page pool sized from free memory");
                pages
            }
        };
        Ok(EngineConfig {
            pages,
            block_size: page_tokens,
            max_batch_tokens: self.max_batch_tokens as usize,
            max_running: self.max_running as usize,
            max_waiting: self.max_queue as usize,
            tpot_target: Duration::from_millis(self.tpot_target_ms),
            max_model_len: self.max_model_len.map(|n| n as usize),
            host_adapters: self.host_adapters.map(|n| n as usize),
        })
    }
}

impl WorkerArgs {
    /// Checks what can be checked without the model and the cluster (`tandem config check`), on
    /// the host named `host`; answers this worker's id.
    pub fn check(&self, host: &str) -> Result<String> {
        let id = self.id.clone().unwrap_or_else(|| host.to_string());
        check_name("worker id", &id).map_err(|e| anyhow!("{} (give --id)", e.0))?;
        let device: Device = self.device.parse()?;
        if self.collective_addr.is_some() && matches!(self.engine.pool_pages, PoolSize::Share(_)) {
            bail!("--pool-pages as a share of memory is for whole-model workers: give a group worker pages");
        }
        data_plane(&self.collective_backend, device)?;
        Ok(id)
    }
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let id = args.check(&crate::config::hostname()?)?;
    if let Some(file) = &args.config.config {
        tracing::info!(config = %file.display(), "settings from a config file");
    }
    let device: Device = args.device.parse()?;
    device.ensure_available()?;
    let config = ModelConfig::load(&args.model)?;
    args.engine.check(&config)?;
    let security = args.security.security(&id)?;
    let node = Node {
        id,
        listen: args.listen.clone(),
        cluster: ClusterClient::new(&args.coordinator, &security)?,
        security,
        blobs: args.blobs.clone(),
        metrics: args.metrics,
        health: args.health,
    };
    let rt = tokio::runtime::Runtime::new()?;
    if let Some(collective_addr) = args.collective_addr.clone() {
        let group_worker = group_worker(&args, &config, device, collective_addr)?;
        return Ok(rt.block_on(node.serve_groups(group_worker, crate::stop_requested()))?);
    }
    let tokenizer =
        TextTokenizer::load(&args.model).with_context(|| format!("tokenizer of {}", args.model.display()))?;
    let adapters =
        (args.adapters.iter()).map(|spec| crate::generate::load_adapter(spec, &config)).collect::<Result<Vec<_>>>()?;
    let model =
        Arc::new(Model::load(&args.model, device).with_context(|| format!("loading {}", args.model.display()))?);
    let engine_config = args.engine.config(&model.config, device)?;
    let engine = Engine::new(model, adapters, Some(tokenizer), engine_config)?;
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
fn group_worker(
    args: &WorkerArgs,
    config: &ModelConfig,
    device: Device,
    collective_addr: String,
) -> Result<GroupWorker> {
    if !args.adapters.is_empty() {
        return Err(anyhow!("--adapter is for whole-model workers: a group loads adapters as requests name them"));
    }
    let data = data_plane(&args.collective_backend, device)?;
    Ok(GroupWorker {
        collective_addr,
        model_dir: args.model.clone(),
        model_name: model_name(args),
        device,
        collective: CollectiveOptions {
            timeout: Duration::from_millis(args.collective_timeout_ms.max(1)),
            setup_timeout: Duration::from_millis(args.group_setup_timeout_ms.max(1)),
        },
        engine: args.engine.config(config, device)?,
        data,
    })
}

/// What carries a group's collectives, from `--collective-backend`.
fn data_plane(backend: &str, device: Device) -> Result<DataPlane> {
    match (backend, device) {
        ("tcp", _) => Ok(DataPlane::Tcp),
        ("nccl", Device::Cuda(device)) => Ok(DataPlane::Nccl { device }),
        ("nccl", Device::Cpu) => Err(anyhow!("--collective-backend nccl needs --device cuda:N")),
        (other, _) => Err(anyhow!("--collective-backend {other:?}: expected `tcp` or `nccl`")),
    }
}
