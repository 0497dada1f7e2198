//! `tandem up`: a whole cluster on this machine. One coordinator (serving the HTTP gateway) and
//! N CPU workers, each a process of its own, with their data in one folder; on first start it
//! writes the built-in model there and makes an operator key and the cluster's certificates
//! (its processes talk mutual TLS; the gateway answers plain HTTP on its address). It prints
//! the endpoint and the key, and stops everything on Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tandem_coordinator::gateway::new_key;
use tandem_proto::contract::{Command as StateCommand, Proposal};
use tandem_proto::tls::{CertificateAuthority, ClusterTls, Role};
use tandem_proto::{ClusterClient, Security};
use tandem_worker::init_model::{Preset, write_model};

use crate::secrets;
use crate::telemetry::LogFormat;

#[derive(Args)]
pub struct UpArgs {
    /// CPU workers to start.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Where the OpenAI-compatible gateway listens.
    #[arg(long, default_value = "127.0.0.1:8000")]
    http: String,
    /// Where the coordinator's gRPC API listens (workers and `tandem status` use it).
    #[arg(long, default_value = "127.0.0.1:7400")]
    grpc: String,
    /// Where the cluster keeps its data (the model, the coordinator's log, the key).
    #[arg(long, default_value = "tandem-data")]
    data_dir: PathBuf,
    /// A file holding the operator's API key, mode 0600 (default: DATA_DIR/admin-key, made on
    /// first start).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// The built-in model written on first start: tiny | tiny-moe | small.
    #[arg(long, default_value = "small")]
    preset: String,
    /// Serve the gateway on HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM, mode 0600).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub otlp: crate::telemetry::OtlpArgs,
}

/// The processes of the cluster; dropping it stops them (SIGTERM, then SIGKILL after a grace).
struct Cluster(Vec<(String, Child)>);

impl Cluster {
    fn stop(&mut self) {
        for (_, child) in &self.0 {
            terminate(child);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (name, child) in &mut self.0 {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if child.try_wait().ok().flatten().is_none() {
                tracing::warn!("{name} did not stop in time: killing it");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.0.clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(unix)]
fn terminate(child: &Child) {
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

#[cfg(not(unix))]
fn terminate(_child: &Child) {}

/// The key in `file`, or the one kept in the data folder (made on first start, mode 0600).
fn admin_key(dir: &Path, file: Option<&Path>) -> Result<String> {
    let path = dir.join("admin-key");
    if let Some(file) = file {
        return secrets::read(file);
    }
    if path.exists() {
        return secrets::read(&path);
    }
    let key = new_key().context("making a key")?;
    secrets::write(&path, &key)?;
    Ok(key)
}

/// Starts `tandem args...` as `name`, its output in `logs`, with `env` added to its environment
/// (where a secret goes: only the process's own user can read it there) and `telemetry` (the
/// log format and OTLP flags `tandem up` was given) after its arguments.
fn start(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    telemetry: &[String],
    logs: &Path,
) -> Result<(String, Child)> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = Command::new(std::env::current_exe()?)
        .args(args)
        .args(telemetry)
        .envs(env.iter().copied())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok((name.to_string(), child))
}

/// The cluster's CA in `dir` (made on first start) and a certificate for the coordinator (`1`),
/// each of `workers` and the operator, each made once; the operator's [`Security`], which
/// `tandem up` itself uses.
fn cluster_certs(dir: &Path, workers: &[String]) -> Result<Security> {
    if !dir.join("ca.pem").exists() {
        CertificateAuthority::create()?.write(dir)?;
    }
    let ca = CertificateAuthority::open(dir)?;
    let holders = [(Role::Coordinator, "1"), (Role::Operator, "operator")]
        .into_iter()
        .chain(workers.iter().map(|w| (Role::Worker, w.as_str())));
    for (role, name) in holders {
        ca.issue_missing(dir, role, name)?;
    }
    Ok(Security::Mutual(Arc::new(ClusterTls::load(dir, "operator")?)))
}

/// Proposes the model into the catalogue, waiting for the coordinator to be up.
async fn register_model(grpc: &str, security: &Security, name: &str, uri: &str) -> Result<()> {
    let command = StateCommand::RegisterModel { name: name.into(), uri: uri.into() };
    let p = Proposal::new(format!("up-model-{name}"), command);
    let deadline = Instant::now() + Duration::from_secs(30);
    let cluster = ClusterClient::new(grpc, security)?;
    loop {
        match cluster.propose_as(p.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("the coordinator at {grpc} did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub fn run(args: UpArgs, log_format: LogFormat) -> Result<()> {
    let preset: Preset = args.preset.parse()?;
    let dir = &args.data_dir;
    std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.display()))?;
    // Absolute: the paths of files and adapters are recorded in the cluster's state.
    let dir = &dir.canonicalize().with_context(|| format!("{}", dir.display()))?;
    let logs = dir.join("logs");
    let model = dir.join(preset.name());
    if !model.join("model.safetensors").exists() {
        tracing::info!("writing the built-in {} model to {}", preset.name(), model.display());
        write_model(preset, &model, 0)?;
    }
    let key = admin_key(dir, args.api_key_file.as_deref())?;
    let certs = dir.join("certs");
    let workers: Vec<String> = (1..=args.workers).map(|i| format!("worker-{i}")).collect();
    let security = cluster_certs(&certs, &workers)?;
    let certs_s = certs.to_string_lossy().into_owned();
    let blobs = dir.join("blobs").to_string_lossy().into_owned();
    let (model_s, coord_dir) = (model.to_string_lossy().into_owned(), dir.join("coordinator"));
    let peers = format!("1={}", args.grpc);
    let coordinator = [
        "coordinator",
        "--id",
        "1",
        "--peers",
        &peers,
        "--data-dir",
        &coord_dir.to_string_lossy(),
        "--http",
        &args.http,
        "--blobs",
        &blobs,
        "--certs",
        &certs_s,
    ]
    .map(str::to_string);
    let telemetry = [vec!["--log-format".to_string(), log_format.as_str().to_string()], args.otlp.to_args()].concat();
    let mut cluster = Cluster(Vec::new());
    let mut coordinator: Vec<&str> = coordinator.iter().map(String::as_str).collect();
    let https = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some([cert.to_string_lossy(), key.to_string_lossy()]),
        _ => None,
    };
    if let Some([cert, key]) = &https {
        coordinator.extend(["--tls-cert", cert, "--tls-key", key]);
    }
    // Every process serves its metrics on a loopback port of its own (operator certificate).
    let mut metrics = vec![("coordinator".to_string(), free_addr()?)];
    coordinator.extend(["--metrics", &metrics[0].1]);
    cluster.0.push(start("coordinator", &coordinator, &[(secrets::KEY_VAR, &key)], &telemetry, &logs)?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(register_model(&args.grpc, &security, preset.name(), &model_s))?;
    for id in &workers {
        let (listen, metrics_at) = (free_addr()?, free_addr()?);
        let worker = [
            "worker",
            "--metrics",
            &metrics_at,
            "--id",
            id,
            "--listen",
            &listen,
            "--coordinator",
            &args.grpc,
            "--model",
            &model_s,
            "--blobs",
            &blobs,
            "--certs",
            &certs_s,
        ];
        cluster.0.push(start(id, &worker, &[], &telemetry, &logs)?);
        metrics.push((id.clone(), metrics_at));
    }
    println!("Tandem is up: {} worker(s), model {:?}", args.workers, preset.name());
    let scheme = if https.is_some() { "https" } else { "http" };
    println!("  endpoint:  {scheme}://{}/v1", args.http);
    println!("  dashboard: {scheme}://{}/dashboard (sign in with the API key)", args.http);
    println!("  API key:   {key}");
    println!("  data:      {} (logs in {})", dir.display(), logs.display());
    println!("  operator:  tandem status --coordinator {} --certs {}", args.grpc, certs.display());
    let ports: Vec<String> = metrics.iter().map(|(name, at)| format!("{name} {at}")).collect();
    println!("  metrics:   {} (operator certificate)", ports.join(", "));
    println!("Ctrl-C stops it.");
    rt.block_on(async {
        let exited = async {
            // A process that exits on its own ends the cluster too.
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some((name, status)) =
                    cluster.0.iter_mut().find_map(|(n, c)| c.try_wait().ok().flatten().map(|s| (n.clone(), s)))
                {
                    return (name, status);
                }
            }
        };
        tokio::select! {
            _ = crate::stop_requested() => {}
            (name, status) = exited => tracing::error!("{name} exited ({status}); stopping the cluster"),
        }
    });
    tracing::info!("stopping the cluster");
    cluster.stop();
    Ok(())
}

/// A free loopback address (released for a process to take).
pub(crate) fn free_addr() -> Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
}
