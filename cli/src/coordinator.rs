//! `tandem coordinator` (one member of the Raft group) and `tandem status` (what a coordinator
//! knows of the group).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tandem_coordinator::gateway::GatewayOptions;
use tandem_coordinator::replica::Timing;
use tandem_coordinator::server;

use tandem_proto::contract::Member;
use tandem_proto::tls;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::certs::SecurityArgs;
use crate::checks::RuntimeChecks;
use crate::cluster_api::ClusterArgs;
use crate::secrets;

#[derive(Args)]
pub struct CoordinatorArgs {
    /// This coordinator's id, one of the peers' (default: the peer whose host is this machine's
    /// host name, or whose name starts with it and a dot, as a StatefulSet's pods are named).
    #[arg(long)]
    id: Option<u64>,
    /// Every coordinator, this one included: `1=HOST:PORT,2=HOST:PORT,3=HOST:PORT`. Each
    /// address carries both the Raft traffic and the cluster API.
    #[arg(long)]
    peers: String,
    /// Listen here for gRPC (IP:PORT; default: this coordinator's own address in --peers, which
    /// must then be an IP).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Answer health probes here (IP:PORT), plain HTTP: `GET /health` is 200 while a quorum
    /// answers.
    #[arg(long)]
    health: Option<std::net::SocketAddr>,
    /// Where the Raft log, hard state and snapshots live.
    #[arg(long, required_unless_present = "store")]
    data_dir: Option<PathBuf>,
    /// Where the gateway stores uploaded files and adapters: a folder that every worker reads
    /// at the same path (a shared filesystem across hosts). Default: DATA_DIR/blobs.
    #[arg(long)]
    blobs: Option<PathBuf>,
    /// `etcd://HOST:PORT[,HOST:PORT...]`: keep the cluster's state in an existing etcd cluster
    /// instead of this group's own Raft log (every coordinator then writes to etcd, and one,
    /// elected through an etcd lease, keeps the workers' leases).
    #[arg(long)]
    store: Option<String>,
    /// Serve the OpenAI-compatible HTTP gateway here (HOST:PORT).
    #[arg(long)]
    http: Option<String>,
    /// Serve the gateway on HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM, mode 0600).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A file holding the operator's API key for the gateway (mode 0600); without it, the
    /// TANDEM_API_KEY environment variable. Never on the command line, where `ps` shows it.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Serve this process's metrics for Prometheus here (HOST:PORT): `GET /metrics`, under the
    /// cluster's mutual TLS to holders of an operator certificate.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Adapters named in the gateway's per-adapter request series, the busiest first (the rest
    /// are counted together as `other`, so tenants cannot grow the series without bound).
    #[arg(long, default_value_t = tandem_coordinator::gateway::TOP_ADAPTERS)]
    metrics_top_adapters: usize,
    /// Raft tick, milliseconds (elections after 10-20 ticks, heartbeats every 2).
    #[arg(long, default_value_t = Timing::DEFAULT.tick.as_millis() as u64)]
    tick_ms: u64,
    /// Raft entries applied between two snapshots of the state (the log up to a snapshot is
    /// dropped; a lagging or new coordinator catches up from it).
    #[arg(long, default_value_t = Timing::DEFAULT.compact_every)]
    snapshot_every: u64,
    /// A worker not heard from for this long is marked dead, milliseconds.
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
    /// Join a running group (started empty, waiting for `tandem coordinators add`) instead of
    /// founding one with the peers.
    #[arg(long)]
    join: bool,
    #[command(flatten)]
    etcd: EtcdTlsArgs,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    pub otlp: crate::telemetry::OtlpArgs,
    #[command(flatten)]
    config: crate::config::ConfigFile,
}

impl CoordinatorArgs {
    /// Checks what can be checked without the peers and the files (`tandem config check`), on
    /// the host named `host`; answers this coordinator's id.
    pub fn check(&self, host: &str) -> Result<u64> {
        let id = self.id(host)?;
        if let Some(addr) = &self.http {
            addr.parse::<std::net::SocketAddr>().map_err(|e| anyhow!("--http {addr}: {e}"))?;
        }
        Ok(id)
    }

    /// `--id`, or the peer on host `host`.
    fn id(&self, host: &str) -> Result<u64> {
        let peers = server::parse_peers(&self.peers).map_err(|e| anyhow!("--peers: {e}"))?;
        if let Some(id) = self.id {
            return match peers.contains_key(&id) {
                true => Ok(id),
                false => Err(anyhow!("--id {id} is not one of --peers ({})", self.peers)),
            };
        }
        peer_on_host(&peers, host)
    }
}

/// The one peer on `host`: its address's host is `host`, or starts with `host` and a dot.
fn peer_on_host(peers: &BTreeMap<u64, String>, host: &str) -> Result<u64> {
    let on_host = |addr: &String| {
        let name = addr.rsplit_once(':').map_or(addr.as_str(), |(name, _)| name);
        name == host || name.strip_prefix(host).is_some_and(|rest| rest.starts_with('.'))
    };
    match peers.iter().filter(|(_, addr)| on_host(addr)).map(|(id, _)| *id).collect::<Vec<_>>().as_slice() {
        [id] => Ok(*id),
        [] => Err(anyhow!("no --id, and no peer in --peers is on this host ({host}): give --id")),
        _ => Err(anyhow!("no --id, and several peers in --peers are on this host ({host}): give --id")),
    }
}

/// TLS to etcd, which authenticates its clients by certificate (`--client-cert-auth`): its PKI
/// is its own, apart from the cluster's.
#[derive(Args)]
struct EtcdTlsArgs {
    /// The CA certificate (PEM) that signed etcd's server certificate; with it, `--store`
    /// connects over TLS.
    #[arg(long, requires_all = ["etcd_cert", "etcd_key"])]
    etcd_ca: Option<PathBuf>,
    /// This coordinator's client certificate for etcd (PEM).
    #[arg(long, requires = "etcd_ca")]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM, mode 0600).
    #[arg(long, requires = "etcd_ca")]
    etcd_key: Option<PathBuf>,
}

/// The TLS settings `args` give for etcd; none without them.
fn etcd_tls(args: &EtcdTlsArgs) -> Result<Option<ClientTlsConfig>> {
    let (Some(ca), Some(cert), Some(key)) = (&args.etcd_ca, &args.etcd_cert, &args.etcd_key) else { return Ok(None) };
    let read =
        |flag: &str, path: &Path| std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()));
    let identity = Identity::from_pem(read("--etcd-cert", cert)?, secrets::read(key).context("--etcd-key")?);
    Ok(Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--etcd-ca", ca)?)).identity(identity)))
}

#[derive(Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Args)]
pub struct CoordinatorsArgs {
    #[command(subcommand)]
    change: MemberChange,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Subcommand)]
enum MemberChange {
    /// Add a coordinator (`ID=HOST:PORT`), started with `tandem coordinator --join`.
    Add { member: String },
    /// Remove a coordinator by id (stop its process afterwards).
    Remove { id: u64 },
    /// Hand leadership to another member.
    TransferLeader { id: u64 },
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let id = args.check(&crate::config::hostname()?)?;
    if let Some(file) = &args.config.config {
        tracing::info!(config = %file.display(), "settings from a config file");
    }
    let peers = server::parse_peers(&args.peers).map_err(|e| anyhow!("--peers: {e}"))?;
    let data_dir = args.data_dir;
    let opts = server::Options {
        id,
        peers,
        dir: data_dir.clone().unwrap_or_default(),
        timing: Timing {
            tick: Duration::from_millis(args.tick_ms.max(1)),
            compact_every: args.snapshot_every.max(1),
            ..Timing::DEFAULT
        },
        lease: Duration::from_millis(args.lease_ms.max(1)),
        join: args.join,
        security: args.security.coordinator_security(id)?,
        metrics: args.metrics,
        health: args.health,
        listen: args.listen,
        etcd_tls: etcd_tls(&args.etcd)?,
        etcd: args.store,
        http: match args.http {
            Some(addr) => Some(GatewayOptions {
                addr: addr.parse().map_err(|e| anyhow!("--http {addr}: {e}"))?,
                admin_key: secrets::key(args.api_key_file.as_deref())?.ok_or_else(|| {
                    anyhow!("--http needs the operator's key: --api-key-file PATH or {}", secrets::KEY_VAR)
                })?,
                blobs: (args.blobs.or_else(|| data_dir.as_ref().map(|d| d.join("blobs"))))
                    .ok_or_else(|| anyhow!("--http needs --blobs DIR (or --data-dir)"))?,
                checks: Arc::new(RuntimeChecks),
                tls: https(args.tls_cert.as_deref(), args.tls_key.as_deref())?,
                top_adapters: args.metrics_top_adapters,
            }),
            None => None,
        },
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let shutdown = crate::stop_requested();
        tracing::info!(coordinator = opts.id, listen = opts.peers.get(&opts.id).map_or("?", String::as_str), "serving");
        server::serve(opts, shutdown).await.map_err(|e| anyhow!("{e}"))
    })
}

/// The gateway's HTTPS settings from `--tls-cert` and `--tls-key` (the key refused unless only
/// its owner may read it); none without them.
fn https(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (cert, key) else { return Ok(None) };
    let cert_pem = std::fs::read_to_string(cert).with_context(|| format!("--tls-cert {}", cert.display()))?;
    let key_pem = secrets::read(key).with_context(|| format!("--tls-key {}", key.display()))?;
    let config = tls::public_server_config(&cert_pem, &key_pem)
        .with_context(|| format!("--tls-cert {} with --tls-key {}", cert.display(), key.display()))?;
    Ok(Some(config))
}

pub fn coordinators(args: CoordinatorsArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = args.cluster.client()?;
        match args.change {
            MemberChange::Add { member } => {
                let (id, addr) = server::parse_peers(&member).map_err(|e| anyhow!("{e}"))?.pop_first().unzip();
                let add = vec![Member { id: id.unwrap_or_default(), addr: addr.unwrap_or_default() }];
                println!("members: {}", describe(&client.change_members(add, vec![]).await?));
            }
            MemberChange::Remove { id } => {
                println!("members: {}", describe(&client.change_members(vec![], vec![id]).await?));
            }
            MemberChange::TransferLeader { id } => {
                println!("leader: {}", client.transfer_leader(id).await?);
            }
        }
        Ok(())
    })
}

/// `1=host:port, 2=host:port`.
fn describe(members: &[Member]) -> String {
    members.iter().map(|m| format!("{}={}", m.id, m.addr)).collect::<Vec<_>>().join(", ")
}

pub fn status(args: StatusArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let client = args.cluster.client()?;
    let s = rt.block_on(async { anyhow::Ok(client.status(true).await?) })?;
    let state: Value = serde_json::to_value(&s.state)?;
    let workers = state.get("workers").cloned().unwrap_or(Value::Null);
    if args.json {
        let out = json!({
            "id": s.id, "leader": s.leader, "term": s.term, "commit": s.commit, "applied": s.applied,
            "members": s.voters, "addresses": s.members.iter().map(|m| (m.id.to_string(), Value::from(m.addr.clone()))).collect::<serde_json::Map<_, _>>(),
            "store": s.store, "workers": workers, "models": state.get("models"), "adapters": state.get("adapters"),
            "jobs": state.get("jobs"), "placements": state.get("placements"),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("coordinator {} (asked at {})", s.id, args.cluster.coordinator);
    println!("store:        {}", s.store);
    println!("members:      {}", describe(&s.members));
    println!("leader:       {}", if s.leader == 0 { "none".to_string() } else { s.leader.to_string() });
    println!("term:         {}", s.term);
    println!("commit index: {} (applied {})", s.commit, s.applied);
    match workers.as_object() {
        None => println!("workers:      (state unavailable: no leader reachable)"),
        Some(w) if w.is_empty() => println!("workers:      none"),
        Some(w) => {
            for (id, info) in w {
                println!("worker {id}: {} alive={}", info["addr"].as_str().unwrap_or("?"), info["alive"]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordinator_finds_its_id_by_its_host_name() {
        let peers = server::parse_peers(
            "1=tandem-coordinator-0.tandem-coordinator.tandem.svc:7400,2=tandem-coordinator-1.tandem-coordinator:7400,\
             3=10.0.0.3:7400",
        )
        .unwrap();
        assert_eq!(peer_on_host(&peers, "tandem-coordinator-1").unwrap(), 2);
        assert_eq!(peer_on_host(&peers, "10.0.0.3").unwrap(), 3);
        // A prefix of a name is not the name.
        assert!(peer_on_host(&peers, "tandem-coordinator").is_err());
        assert!(peer_on_host(&peers, "tandem-coordinator-0.tandem").is_err());
        let twice = server::parse_peers("1=host-a:7400,2=host-a:7401").unwrap();
        assert!(peer_on_host(&twice, "host-a").unwrap_err().to_string().contains("several peers"));
    }
}
