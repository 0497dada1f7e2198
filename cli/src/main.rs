//! `tandem`: the one binary of the Tandem cluster. It parses arguments, starts what the library
//! crates run (a coordinator, a worker node, an engine) and prints; the node logic lives in
//! `tandem-coordinator` and `tandem-worker` (`node/`).
//!
//! Map:
//! - `coordinator.rs`: `tandem coordinator`, `status`, `coordinators`.
//! - `worker.rs`: `tandem worker` (a whole-model or group worker node).
//! - `models.rs`, `workers.rs`: `tandem models` (the catalogue), `tandem workers` (list, drain).
//! - `snapshot.rs`: `tandem snapshot save|restore` (backups of the state).
//! - `cluster_api.rs`: what the operator's cluster commands share (where, as whom, refusals).
//! - `up.rs`: `tandem up`, a whole cluster of processes on this machine.
//! - `jobs.rs`: `tandem submit`, `jobs`, `adapters`, `keys` over the gateway's gRPC API.
//! - `groups.rs`: `tandem groups` (worker groups, through the cluster API).
//! - `config.rs`: the processes' settings from a TOML file and TANDEM_* variables as well as
//!   flags; `tandem config check`.
//! - `certs.rs`: `tandem certs` (the cluster CA and each process's certificate).
//! - `generate.rs`, `finetune.rs`: inference and fine-tuning on this machine, no cluster.
//! - `tp_rank.rs`: one tensor-parallel rank over TCP (parity tests, traffic figures).
//! - `machine.rs`: the CPU a benchmark ran on, printed beside its figures.
//! - `telemetry.rs`: logs (`RUST_LOG`, text or JSON) and traces (OTLP) of every process.
//! - `secrets.rs`: secrets on disk (0600, never on a command line).
//! - `checks.rs`: what the gateway checks with the model runtime (uploads).
//! - `bench*.rs`: `tandem bench kernels|serve|finetune|coserve|failover|gateway`.

mod bench;
mod bench_coserve;
mod bench_failover;
mod bench_finetune;
mod bench_gateway;
mod bench_serve;
mod certs;
mod checks;
mod cluster_api;
mod config;
mod coordinator;
mod finetune;
mod generate;
mod groups;
mod jobs;
mod machine;
mod models;
mod secrets;
mod snapshot;
mod telemetry;
mod tp_rank;
mod up;
mod worker;
mod workers;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tandem", version, about = "Co-serve LLM inference and LoRA fine-tuning on shared GPUs")]
struct Cli {
    /// How log lines are written to stderr: text | json (one object per line).
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a model and adapters, many requests in one continuous batch.
    Generate(generate::GenerateArgs),
    /// Fine-tune a LoRA or ESFT adapter on a JSONL file, on this machine.
    Finetune(finetune::FinetuneArgs),
    /// Write a random-weight model in Hugging Face format (for demos, tests, benchmarks).
    InitModel {
        /// tiny | tiny-moe | small | qwen2.5-0.5b
        #[arg(long)]
        preset: String,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Run one coordinator of the Raft-replicated control plane.
    Coordinator(coordinator::CoordinatorArgs),
    /// Ask a coordinator for the group's members, leader, term, commit index and workers.
    Status(coordinator::StatusArgs),
    /// Change the coordinator group: add or remove coordinators, hand leadership over.
    Coordinators(coordinator::CoordinatorsArgs),
    /// The cluster's base models: register (optionally as a tensor-parallel group), list,
    /// remove.
    Models(models::ModelsArgs),
    /// The cluster's workers: list, drain (for an upgrade: no new work, jobs handed off),
    /// undrain.
    Workers(workers::WorkersArgs),
    /// Start a whole cluster on this machine: a coordinator with the HTTP gateway and CPU
    /// workers, each a process; prints the endpoint and the API key.
    Up(up::UpArgs),
    /// Run one worker: a base model's engine serving completions, holding a lease at the
    /// coordinator.
    Worker(worker::WorkerArgs),
    /// Submit work to a running cluster: `submit finetune` uploads the data and creates a
    /// fine-tuning job.
    Submit(jobs::SubmitArgs),
    /// Your fine-tuning jobs in a running cluster: list, watch, cancel, events.
    Jobs(jobs::JobsArgs),
    /// Your adapters in a running cluster: list, add (a PEFT or ESFT folder), rm.
    Adapters(jobs::AdaptersArgs),
    /// API keys for tenants (with the operator's key).
    Keys(jobs::KeysArgs),
    /// Worker groups (a base model as tensor-parallel ranks over group workers): create, list,
    /// rm.
    Groups(groups::GroupsArgs),
    /// The cluster's certificates: `init` makes its CA, `issue` a process's key and
    /// certificate.
    Certs(certs::CertsArgs),
    /// Back the cluster's state up (`save`), and seed a new group with it (`restore`).
    Snapshot(snapshot::SnapshotArgs),
    /// The processes' config files: `check` one and print the settings in effect.
    Config(config::ConfigArgs),
    /// Run one rank of a tensor-parallel group over TCP on a fixed batch; prints its logits and
    /// the bytes it sent, as JSON (parity tests and communication figures).
    TpRank(tp_rank::TpRankArgs),
    /// Measure Tandem's components against peers on this machine.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

impl Command {
    /// The name a process of this command has in traces, and where it exports them: `None` for
    /// commands a person runs, which only log warnings.
    fn service(&self) -> (&'static str, Option<&telemetry::OtlpArgs>) {
        match self {
            Command::Coordinator(args) => ("tandem-coordinator", Some(&args.otlp)),
            Command::Worker(args) => ("tandem-worker", Some(&args.otlp)),
            Command::Up(args) => ("tandem-up", Some(&args.otlp)),
            _ => ("tandem", None),
        }
    }
}

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    let command = config::with_env(Cli::command());
    let expanded = config::expand(&command, std::env::args_os().collect())?;
    let matches = expanded.parse(command.clone()).unwrap_or_else(|e| e.exit());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let (service, otlp) = cli.command.service();
    let _telemetry = telemetry::init(cli.log_format, service, otlp)?;
    tandem_proto::durable::failpoints_from_env().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Bench { what } => bench::run(what),
        Command::Finetune(args) => finetune::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Status(args) => coordinator::status(args),
        Command::Coordinators(args) => coordinator::coordinators(args),
        Command::Models(args) => models::models(args),
        Command::Workers(args) => workers::workers(args),
        Command::Worker(args) => worker::run(args),
        Command::Up(args) => up::run(args, cli.log_format),
        Command::Generate(args) => generate::run(args),
        Command::Submit(args) => jobs::submit(args),
        Command::Jobs(args) => jobs::jobs(args),
        Command::Adapters(args) => jobs::adapters(args),
        Command::Keys(args) => jobs::keys(args),
        Command::TpRank(args) => tp_rank::run(args),
        Command::Groups(args) => groups::groups(args),
        Command::Certs(args) => certs::certs(args),
        Command::Config(args) => config::config(args, command),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::InitModel { preset, out, seed } => {
            let preset: tandem_worker::init_model::Preset = preset.parse()?;
            tandem_worker::init_model::write_model(preset, &out, seed)?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}

/// Training and serving allocate and free tensors of the same large sizes every step. glibc
/// hands buffers over its (adaptive) mmap threshold back to the kernel on free, so every step
/// would fault fresh zeroed pages in again (several percent of a training step). Fixing the
/// threshold at its maximum (32 MiB) and never trimming keeps freed buffers for reuse. The heap
/// grows by glibc's default padding only: a larger pad is memory `calloc` must clear, so a
/// zeroed buffer carved from it (the KV pool, most of whose pages may never be written) would
/// be resident at once instead of as it is used.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Resolves when the process is asked to stop: Ctrl-C, or SIGTERM (what `tandem up` and service
/// managers send).
pub(crate) async fn stop_requested() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}
