//! The smallest whole cluster, as processes: a random-weight model of a preset, one
//! coordinator (serving the HTTP gateway or not) and workers `w1`, `w2`, ... that serve the
//! model whole or, as group workers, join the worker groups the coordinator places on them.
//! Every process shares one blobs folder, as machines share one in a deployment, and holds a
//! certificate of the test's own CA: the processes talk mutual TLS, as a deployment's do.

use std::path::{Path, PathBuf};

use tandem_proto::ClusterClient;
use tandem_proto::contract::{Command, Proposal};
use tandem_proto::tls::Role;

use crate::certs::TestCerts;
use crate::http::http;
use crate::ports::free_addr;
use crate::process::{Procs, Scratch, Tandem, propose, secret_file, wait_for};

/// What to start; [`MiniClusterBuilder::start`] starts it.
pub struct MiniClusterBuilder {
    tandem: Tandem,
    tag: String,
    preset: String,
    workers: usize,
    api_key: Option<String>,
    lease_ms: Option<u64>,
    /// Group workers' collective and group set-up timeouts (ms).
    group: Option<(u64, u64)>,
    /// Added to every process's arguments.
    extra: Vec<String>,
    /// Every process serves its metrics on a port of its own.
    metrics: bool,
}

impl MiniClusterBuilder {
    /// The model's preset (`tiny` unless set).
    pub fn preset(mut self, preset: &str) -> Self {
        self.preset = preset.into();
        self
    }

    /// How many workers (1 unless set).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// The coordinator serves the gateway on a free port, with operator key `api_key`.
    pub fn gateway(mut self, api_key: &str) -> Self {
        self.api_key = Some(api_key.into());
        self
    }

    /// The workers' lease, `--lease-ms` (the binary's default unless set).
    pub fn lease_ms(mut self, ms: u64) -> Self {
        self.lease_ms = Some(ms);
        self
    }

    /// The workers are group workers (each with a collective address), whose collectives give
    /// up after `collective_timeout_ms` and forming a group after `setup_timeout_ms`.
    pub fn group_workers(mut self, collective_timeout_ms: u64, setup_timeout_ms: u64) -> Self {
        self.group = Some((collective_timeout_ms, setup_timeout_ms));
        self
    }

    /// Adds `args` to every process's command line (its log format, where it sends traces).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Every process serves its metrics (`--metrics` on a free port: [`MiniCluster::metrics`]).
    pub fn metrics_ports(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Makes the model and starts the processes; returns without waiting for them (the
    /// coordinator does not know the model yet: [`MiniCluster::register_model`]).
    pub fn start(self) -> MiniCluster {
        let tandem = self.tandem;
        let dir = Scratch::new(&self.tag);
        let model = dir.join("tiny");
        tandem.init_model(&self.preset, &model);
        let certs = TestCerts::new(&dir.join("certs"));
        let (coordinator, http) = (free_addr(), self.api_key.as_ref().map(|_| free_addr()));
        let (peers, data, blobs) = (format!("1={coordinator}"), dir.join("coordinator"), dir.join("blobs"));
        let blobs = blobs.to_str().unwrap();
        let mut args = vec!["coordinator", "--id", "1", "--peers", &peers, "--tick-ms", "20"];
        let lease = self.lease_ms.map(|l| l.to_string());
        if let Some(lease) = &lease {
            args.extend(["--lease-ms", lease]);
        }
        args.extend(["--data-dir", data.to_str().unwrap(), "--blobs", blobs]);
        let coordinator_certs = certs.args(Role::Coordinator, "1");
        args.extend(coordinator_certs.iter().map(String::as_str));
        let key_file = self.api_key.as_ref().map(|key| secret_file(&dir.join("admin-key"), key));
        if let (Some(http), Some(key_file)) = (&http, &key_file) {
            args.extend(["--http", http, "--api-key-file", key_file.to_str().unwrap()]);
        }
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        args.extend(&extra);
        let metrics: Vec<String> = (0..=self.workers).filter(|_| self.metrics).map(|_| free_addr()).collect();
        if let Some(port) = metrics.first() {
            args.extend(["--metrics", port]);
        }
        let mut procs = Procs(vec![tandem.spawn_logged(&args, &dir.join("logs/coordinator.log"))]);
        let model_arg = model.to_str().unwrap();
        let workers: Vec<String> = (0..self.workers).map(|_| free_addr()).collect();
        let timeouts = self.group.map(|(c, s)| (c.to_string(), s.to_string()));
        for (i, listen) in workers.iter().enumerate() {
            let id = format!("w{}", i + 1);
            let mut args = vec!["worker", "--id", &id, "--listen", listen, "--coordinator", &coordinator];
            args.extend(["--model", model_arg, "--blobs", blobs]);
            let worker_certs = certs.args(Role::Worker, &id);
            args.extend(worker_certs.iter().map(String::as_str));
            let collective = free_addr();
            if let Some((collective_timeout, setup_timeout)) = &timeouts {
                args.extend(["--collective-addr", &collective, "--collective-timeout-ms", collective_timeout]);
                args.extend(["--group-setup-timeout-ms", setup_timeout]);
            }
            args.extend(&extra);
            if let Some(port) = metrics.get(i + 1) {
                args.extend(["--metrics", port]);
            }
            procs.0.push(tandem.spawn_logged(&args, &dir.join(format!("logs/{id}.log"))));
        }
        MiniCluster { procs, model, coordinator, http, workers, metrics, certs, dir }
    }
}

/// A running mini cluster; its processes are killed and its folder removed when dropped.
pub struct MiniCluster {
    /// The coordinator, then workers `w1`, `w2`, ... in order.
    pub procs: Procs,
    /// The model's folder.
    pub model: PathBuf,
    /// The coordinator's gRPC address.
    pub coordinator: String,
    http: Option<String>,
    /// Each worker's gRPC address, `w1` first.
    pub workers: Vec<String>,
    /// The metrics ports, the coordinator's then each worker's (none unless asked for).
    pub metrics: Vec<String>,
    /// The cluster's CA, in `certs/` of the folder.
    pub certs: TestCerts,
    dir: Scratch,
}

impl MiniCluster {
    /// A cluster in a scratch folder named `tag`: by default one whole-model worker, model
    /// preset `tiny`, no gateway.
    pub fn builder(tandem: Tandem, tag: &str) -> MiniClusterBuilder {
        MiniClusterBuilder {
            tandem,
            tag: tag.into(),
            preset: "tiny".into(),
            workers: 1,
            api_key: None,
            lease_ms: None,
            group: None,
            extra: Vec::new(),
            metrics: false,
        }
    }

    /// The scratch folder: the model in `tiny/`, the shared blobs in `blobs/`, each process's
    /// output in `logs/` (`coordinator.log`, `w1.log`, ...).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The gateway's address.
    pub fn http(&self) -> &str {
        self.http.as_deref().expect("this cluster was started without the gateway")
    }

    /// Puts the model in the catalogue as `name`, as `tandem up` does, once the coordinator
    /// answers.
    pub fn register_model(&self, name: &str) {
        let command = Command::RegisterModel { name: name.into(), uri: self.model.to_str().unwrap().into() };
        propose(&self.client(), Proposal::new(format!("model-{name}"), command));
    }

    /// A client of the coordinator, as the operator.
    pub fn client(&self) -> ClusterClient {
        ClusterClient::new(&self.coordinator, &self.certs.operator()).unwrap()
    }

    /// The arguments that make a `tandem` tool (`status`, `groups`) the operator.
    pub fn operator_args(&self) -> Vec<String> {
        self.certs.args(Role::Operator, "operator")
    }

    /// Waits up to 60 s until the gateway's health reports `n` workers alive.
    pub fn wait_alive(&self, n: usize) {
        let (addr, alive) = (self.http(), format!("\"workers_alive\":{n}"));
        wait_for(60, &format!("{n} alive workers"), || {
            std::net::TcpStream::connect(addr).ok()?;
            let (status, body) = http(addr, "GET", "/health", None, None);
            (status == 200 && body.contains(&alive)).then_some(())
        });
    }
}

impl Drop for MiniCluster {
    fn drop(&mut self) {
        // Before the folder they write in goes (and a cluster is never taken apart by a move,
        // which would drop the folder first).
        drop(std::mem::take(&mut self.procs));
    }
}
