//! A real cluster for the nemeses: `tandem` processes, each in its own network namespace
//! ([`Net`]): coordinators 1-3 at 10.98.0.1-3 (Raft and the cluster API on :7000, the
//! OpenAI-compatible gateway on :8000, one shared blobs folder as a shared filesystem),
//! workers `w1`, `w2`, ... at 10.98.0.11 on (:7100) serving a random-weight `tiny` model whole,
//! and group workers `g1`, `g2` at 10.98.0.21-22 (collectives on :7200) serving it as the two
//! ranks of worker group [`GROUP`] (tensor parallelism, its collectives over TCP). Every
//! process holds a certificate of the run's own CA: they talk mutual TLS. The runner, in the
//! root namespace, reaches the gateways over the bridge as any client would.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::ClusterClient;
use tandem_proto::contract::{Command as StateCommand, JobStatus, Member, Proposal, Reply};
use tandem_proto::tls::Role;
use tandem_testkit::TestCerts;

use crate::client::{Request, exchange};
use crate::net::{Host, Net};

/// The model every worker serves, by its name in the cluster.
pub const MODEL: &str = "tiny";
/// How many coordinators found the group (ids 1-3); coordinator 4 is a spare, not started,
/// that a membership change adds.
pub const COORDINATORS: u64 = 3;
pub const SPARE: u64 = 4;
/// The workers' lease: a worker not heard from for this long is dead (the binary's default).
pub const LEASE: Duration = Duration::from_millis(3000);
/// The worker group of two ranks, on group workers `g1` and `g2`.
pub const GROUP: &str = "tp";
const GROUP_RANKS: usize = 2;
/// A group's collectives fail after this long without word from a rank (a paused one; a killed
/// rank's connections break at once), and it must form within the set-up time.
const COLLECTIVE_TIMEOUT_MS: &str = "3000";
const GROUP_SETUP_TIMEOUT_MS: &str = "10000";

/// What a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Coordinator(u64),
    Worker,
    /// A rank of [`GROUP`].
    GroupWorker,
}

/// One process of the cluster, on its own host.
pub struct Node {
    pub name: String,
    pub kind: Kind,
    pub host: Host,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Its output, appended across restarts (the panic check reads all of it).
    pub log: PathBuf,
}

impl Node {
    /// Starts the process in its namespace (`ip netns exec` execs it: the child's pid is the
    /// process's own, so signals reach it).
    fn start(&mut self, bin: &Path) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let log = OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = Command::new("ip");
        // SAFETY: prctl(2) in the child before exec touches no memory of ours. The process dies
        // with the runner, however the runner ends (the signal survives the exec).
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        let child = command
            .args(["netns", "exec", &self.host.ns])
            .arg(bin)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reaped: what it had not written to disk is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as a service manager stops it; waits up to 20 s for it to exit (then kills it).
    pub fn terminate(&mut self) {
        if let Some(pid) = self.pid() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("chaos: {} (pid {pid}) ignored SIGTERM for 20 s; killing it", self.name);
        }
        self.kill();
    }

    /// SIGSTOP: the process stops in its tracks, its sockets open (a zombie when it resumes).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Whether it died on its own (reaping it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

/// The running cluster; its processes and network go when it is dropped.
pub struct Cluster {
    bin: PathBuf,
    pub dir: PathBuf,
    pub net: Net,
    pub nodes: Vec<Node>,
    certs: TestCerts,
    /// The operator's API key.
    pub key: String,
    /// A random LoRA adapter of the model: its files' names and bytes, for uploads.
    pub adapter: Vec<(String, Vec<u8>)>,
    /// When the nemesis struck: the moment its fault began, after it chose its target.
    pub struck: Option<Instant>,
    /// The run's seed, for a nemesis that walks a list by it.
    pub seed: u64,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Starts 3 coordinators, `workers` whole-model workers and the two group workers in a
    /// fresh `dir`, registers the model, places the group and waits until every worker serves
    /// and the group is formed.
    pub fn start(bin: &Path, dir: &Path, workers: usize) -> Result<Cluster> {
        unmount_disks(dir);
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::create_dir_all(dir.join("failpoints"))?;
        let model = dir.join(MODEL);
        let status = Command::new(bin).args(["init-model", "--preset", MODEL, "--out"]).arg(&model).output()?;
        if !status.status.success() {
            bail!("init-model: {}", String::from_utf8_lossy(&status.stderr));
        }
        let adapter = random_adapter(&model, &dir.join("adapter"))?;
        let certs = TestCerts::new(&dir.join("certs"));
        let key = format!("chaos-operator-{}", std::process::id());
        let mut net = Net::new()?;
        let ids: Vec<u64> = (1..=SPARE).collect();
        let peers: Vec<String> = ids.iter().map(|id| format!("{id}=10.98.0.{id}:7000")).collect();
        let coordinators: Vec<String> = ids.iter().map(|id| format!("10.98.0.{id}:7000")).collect();
        let founders = peers[..COORDINATORS as usize].join(",");
        let blobs = dir.join("blobs").to_string_lossy().into_owned();
        let mut nodes = Vec::new();
        for &id in &ids {
            // Each coordinator's disk is a small tmpfs of its own, which a nemesis can fill.
            mount_disk(&dir.join(format!("c{id}")))?;
            let host = net.add_host(&format!("c{id}"), id as u8)?;
            // The spare joins a running group: it knows every address, itself included.
            let (peers, join) =
                if id == SPARE { (peers.join(","), Some("--join".to_string())) } else { (founders.clone(), None) };
            let mut args = vec!["coordinator".to_string(), "--id".into(), id.to_string(), "--peers".into(), peers];
            args.extend(join);
            args.extend(["--data-dir".into(), dir.join(format!("c{id}")).to_string_lossy().into_owned()]);
            args.extend(["--http".into(), format!("{}:8000", host.ip), "--blobs".into(), blobs.clone()]);
            args.extend(certs.args(Role::Coordinator, &id.to_string()));
            // Snapshots every few seconds under the workload, so the snapshot's writes and the
            // log's rewrite happen within a run (and their failpoints are reached).
            args.extend(["--snapshot-every".into(), "50".into()]);
            let env = vec![("TANDEM_API_KEY".to_string(), key.clone()), failpoints(dir, &format!("c{id}"))];
            let log = dir.join(format!("logs/c{id}.log"));
            nodes.push(Node { name: format!("c{id}"), kind: Kind::Coordinator(id), host, args, env, child: None, log });
        }
        // Whole-model workers w1.. at .11 on, then the group's ranks g1, g2 at .21-22.
        let whole = (1..=workers).map(|w| (format!("w{w}"), 10 + w as u8, Kind::Worker));
        let ranks = (1..=GROUP_RANKS).map(|g| (format!("g{g}"), 20 + g as u8, Kind::GroupWorker));
        for (name, octet, kind) in whole.chain(ranks) {
            let host = net.add_host(&name, octet)?;
            let mut args =
                vec!["worker".to_string(), "--id".into(), name.clone(), "--listen".into(), format!("{}:7100", host.ip)];
            args.extend(["--coordinator".into(), coordinators.join(",")]);
            args.extend(["--model".into(), model.to_string_lossy().into_owned(), "--blobs".into(), blobs.clone()]);
            if kind == Kind::GroupWorker {
                args.extend(["--collective-addr".into(), format!("{}:7200", host.ip)]);
                args.extend(["--collective-timeout-ms".into(), COLLECTIVE_TIMEOUT_MS.into()]);
                args.extend(["--group-setup-timeout-ms".into(), GROUP_SETUP_TIMEOUT_MS.into()]);
            }
            args.extend(certs.args(Role::Worker, &name));
            let log = dir.join(format!("logs/{name}.log"));
            let env = vec![failpoints(dir, &name)];
            nodes.push(Node { name, kind, host, args, env, child: None, log });
        }
        let rt = tokio::runtime::Runtime::new()?;
        let mut cluster = Cluster {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            net,
            nodes,
            certs,
            key,
            adapter,
            struck: None,
            seed: 0,
            rt,
        };
        for node in cluster.nodes.iter_mut().filter(|n| n.kind != Kind::Coordinator(SPARE)) {
            node.start(bin)?;
        }
        cluster.register_model(&model)?;
        cluster.wait_serving(cluster.workers().len(), Duration::from_secs(90))?;
        let group = StateCommand::CreateGroup {
            group: GROUP.into(),
            model: MODEL.into(),
            size: GROUP_RANKS,
            expert_parallel: false,
        };
        cluster.propose("group", group)?;
        cluster.wait_group_formed(Duration::from_secs(60))?;
        Ok(cluster)
    }

    /// Puts the model in the catalogue, as `tandem up` does.
    fn register_model(&self, model: &Path) -> Result<()> {
        self.propose(
            "model",
            StateCommand::RegisterModel { name: MODEL.into(), uri: model.to_string_lossy().into_owned() },
        )
    }

    /// Proposes `command` as the operator until it is applied (up to 60 s): through
    /// coordinator 1 (which forwards to the leader), again after a refusal under a new request
    /// id (the state machine remembers its answer to each).
    fn propose(&self, request: &str, command: StateCommand) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut p = Proposal::new(format!("chaos-{request}-0"), command);
        for attempt in 1.. {
            let outcome = self.client(1).and_then(|c| Ok(self.rt.block_on(c.propose_as(p.clone()))?));
            let why = match outcome {
                Ok(Reply::Refused { reason }) => {
                    p = Proposal::new(format!("chaos-{request}-{attempt}"), p.command);
                    reason
                }
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("{:?} was not applied within 60 s: {why}", p.command);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        unreachable!("the attempts go on until the deadline")
    }

    /// A client of coordinator `id`, as the operator, that gives up quickly.
    fn client(&self, id: u64) -> Result<ClusterClient> {
        let timeout = Duration::from_millis(1000);
        Ok(ClusterClient::with_timeouts(&format!("10.98.0.{id}:7000"), &self.certs.operator(), timeout, timeout)?)
    }

    /// Marks this moment as the fault's start (the first mark counts): outages are timed
    /// from here, not from before the nemesis looked for its target.
    pub fn strike(&mut self) {
        self.struck.get_or_insert_with(Instant::now);
    }

    /// Sets node `name`'s failpoints to `text` (`point=actions` lines, `tandem_proto::durable`;
    /// empty: none), which the process picks up within a few milliseconds, and at its start.
    pub fn set_failpoints(&self, name: &str, text: &str) -> Result<()> {
        let path = self.dir.join("failpoints").join(name);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        Ok(std::fs::rename(&tmp, &path)?)
    }

    /// Sets `point` to crash each of `names` there, waits up to `within` for one of them to
    /// crash, clears their points and starts again each that crashed (two may have, at once);
    /// their names.
    pub fn crash_at(&mut self, names: &[String], point: &str, within: Duration) -> Result<Vec<String>> {
        for name in names {
            self.set_failpoints(name, &format!("{point}=return(crash)"))?;
        }
        let deadline = Instant::now() + within;
        while !names.iter().any(|n| self.node(n).exited().is_some()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for name in names {
            self.set_failpoints(name, "")?;
        }
        // A process that read the point before it was cleared may be crashing still.
        std::thread::sleep(Duration::from_millis(100));
        let mut crashed = Vec::new();
        for name in names {
            let Some(status) = self.node(name).exited() else { continue };
            if status.code() != Some(tandem_proto::durable::CRASH_EXIT) {
                bail!("{name} exited ({status}), not at failpoint {point}");
            }
            self.node(name).kill();
            self.start_node(name)?;
            crashed.push(name.clone());
        }
        if crashed.is_empty() {
            bail!("none of {} reached failpoint {point} within {within:?}", names.join(", "));
        }
        Ok(crashed)
    }

    /// Every gateway's address.
    pub fn gateways(&self) -> Vec<SocketAddr> {
        (1..=COORDINATORS).map(|id| SocketAddr::from(([10, 98, 0, id as u8], 8000))).collect()
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The workers' names, group workers too.
    pub fn workers(&self) -> Vec<String> {
        (self.nodes.iter())
            .filter(|n| matches!(n.kind, Kind::Worker | Kind::GroupWorker))
            .map(|n| n.name.clone())
            .collect()
    }

    /// The state as the leader has it (up to 20 s for a leader).
    pub fn state(&self) -> Result<tandem_proto::contract::ClusterState> {
        Ok(self.rt.block_on(self.client(self.wait_leader(Duration::from_secs(20))?)?.state())?)
    }

    /// The state as the first running coordinator that answers has it (None if none does).
    fn any_state(&self) -> Option<tandem_proto::contract::ClusterState> {
        self.coordinators().into_iter().find_map(|id| self.rt.block_on(self.client(id).ok()?.state()).ok())
    }

    /// The group's ranks' worker names, rank order, as the state says.
    pub fn group_ranks(&self) -> Result<Vec<String>> {
        Ok(self.state()?.placements.get(GROUP).map(|p| p.workers.clone()).unwrap_or_default())
    }

    /// Waits up to `timeout` until the group is formed (every rank joined its formation).
    pub fn wait_group_formed(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no state read");
        while Instant::now() < deadline {
            let state = self.any_state();
            match state.as_ref().map(|s| s.placements.get(GROUP)) {
                Some(Some(p)) if p.formed => return Ok(()),
                Some(p) => last = format!("{p:?}"),
                None => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("group {GROUP} not formed within {timeout:?}; last: {last}")
    }

    /// Starts node `name` again if it exited, as a service manager would; whether it had.
    pub fn restart_if_exited(&mut self, name: &str) -> Result<bool> {
        let exited = self.node(name).exited().is_some();
        if exited {
            self.node(name).kill();
            self.start_node(name)?;
        }
        Ok(exited)
    }

    /// (Re)starts node `name`.
    pub fn start_node(&mut self, name: &str) -> Result<()> {
        let bin = self.bin.clone();
        self.node(name).start(&bin)
    }

    /// The ids of the coordinators running now.
    pub fn coordinators(&self) -> Vec<u64> {
        (self.nodes.iter().filter(|n| n.running()))
            .filter_map(|n| match n.kind {
                Kind::Coordinator(id) => Some(id),
                Kind::Worker | Kind::GroupWorker => None,
            })
            .collect()
    }

    /// Adds the coordinators `add` and removes `remove` (a Raft membership change), through the
    /// leader.
    pub fn change_members(&self, add: &[u64], remove: &[u64]) -> Result<()> {
        let leader = self.wait_leader(Duration::from_secs(20))?;
        let add = add.iter().map(|&id| Member { id, addr: format!("10.98.0.{id}:7000") }).collect();
        let client = ClusterClient::new(&format!("10.98.0.{leader}:7000"), &self.certs.operator())?;
        self.rt.block_on(client.change_members(add, remove.to_vec()))?;
        Ok(())
    }

    /// Hands leadership to coordinator `to`.
    pub fn transfer_leader(&self, to: u64) -> Result<()> {
        let leader = self.wait_leader(Duration::from_secs(20))?;
        let client = ClusterClient::new(&format!("10.98.0.{leader}:7000"), &self.certs.operator())?;
        let now = self.rt.block_on(client.transfer_leader(to))?;
        if now != to {
            bail!("leadership went to {now}, not {to}");
        }
        Ok(())
    }

    /// The workers running a fine-tuning job's current attempt now, as the state says.
    pub fn training_workers(&self) -> Vec<String> {
        let state = self.any_state();
        let mut workers: Vec<String> = (state.iter())
            .flat_map(|s| s.jobs.values())
            .filter(|j| j.status == JobStatus::Running)
            .filter_map(|j| j.attempts.last().map(|a| a.worker.clone()))
            .collect();
        workers.sort();
        workers.dedup();
        workers
    }

    /// The leader, as a majority of the running coordinators that answer agree on it (None
    /// while there is none).
    pub fn leader(&self) -> Option<u64> {
        let mut votes = std::collections::BTreeMap::<u64, u64>::new();
        for n in self.nodes.iter().filter(|n| n.running()) {
            let Kind::Coordinator(id) = n.kind else { continue };
            let Ok(client) = self.client(id) else { continue };
            if let Ok(s) = self.rt.block_on(client.status(false))
                && s.leader != 0
            {
                *votes.entry(s.leader).or_default() += 1;
            }
        }
        let running = self.coordinators().len() as u64;
        votes.into_iter().find(|&(_, v)| v * 2 > running).map(|(leader, _)| leader)
    }

    /// Waits up to `timeout` until every coordinator has applied what the leader had committed
    /// when the wait began (a replica that stopped, or cannot catch up, fails it).
    pub fn wait_caught_up(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let status = |id| self.client(id).ok().and_then(|c| self.rt.block_on(c.status(false)).ok());
        let leader = self.wait_leader(timeout)?;
        let commit = status(leader).map_or(0, |s| s.commit);
        let mut behind: Vec<String> = Vec::new();
        while Instant::now() < deadline {
            behind = (self.coordinators().into_iter())
                .filter_map(|id| match status(id) {
                    Some(s) if s.applied >= commit => None,
                    Some(s) => Some(format!("c{id} applied {} of {commit}", s.applied)),
                    None => Some(format!("c{id} does not answer")),
                })
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("coordinators behind the leader's commit after {timeout:?}: {}", behind.join(", "))
    }

    /// Waits up to `timeout` for a leader.
    pub fn wait_leader(&self, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until some gateway's health reports `workers` alive workers.
    pub fn wait_serving(&self, workers: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let want = workers as u64;
        let mut last = String::new();
        while Instant::now() < deadline {
            for g in self.gateways() {
                match exchange(
                    g,
                    &Request { method: "GET", path: "/health", key: None, content_type: "text/plain", body: b"" },
                    Duration::from_secs(2),
                    None,
                ) {
                    Ok(r) if r.status == 200 && r.json()["workers_alive"].as_u64() == Some(want) => return Ok(()),
                    Ok(r) => last = format!("{g}: {} {}", r.status, r.body),
                    Err(e) => last = format!("{g}: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("the cluster did not serve with {workers} workers within {timeout:?}; last: {last}")
    }

    /// Every running node's name, pid, resident memory (bytes) and open file descriptors now.
    pub fn footprint(&self) -> Vec<(String, u32, u64, usize)> {
        (self.nodes.iter())
            .filter_map(|n| {
                let pid = n.pid()?;
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let rss_kib: u64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()?;
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
                Some((n.name.clone(), pid, rss_kib * 1024, fds))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        unmount_disks(&self.dir);
    }
}

/// The variable that names node `name`'s failpoints file, set by [`Cluster::set_failpoints`].
fn failpoints(dir: &Path, name: &str) -> (String, String) {
    ("TANDEM_FAILPOINTS".into(), dir.join("failpoints").join(name).to_string_lossy().into_owned())
}

/// A coordinator's disk: 64 MiB of tmpfs.
const DISK: &str = "size=64m";

fn mount_disk(at: &Path) -> Result<()> {
    std::fs::create_dir_all(at)?;
    let out = Command::new("mount").args(["-t", "tmpfs", "-o", DISK, "tmpfs"]).arg(at).output()?;
    if !out.status.success() {
        bail!("mounting a tmpfs at {}: {}", at.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Unmounts every coordinator's disk under `dir` (those an earlier run left too).
fn unmount_disks(dir: &Path) {
    for id in 1..=SPARE {
        let _ = Command::new("umount").arg(dir.join(format!("c{id}"))).output();
    }
}

/// Fills the disk holding `dir` (a file of zeros until no space is left); removed by
/// [`free_disk`].
pub fn fill_disk(dir: &Path) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("chaos-fill"))?;
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    // What fits of a last partial chunk, so not a byte is left.
    while f.write_all(&chunk[..4096]).is_ok() {}
    Ok(())
}

pub fn free_disk(dir: &Path) -> Result<()> {
    Ok(std::fs::remove_file(dir.join("chaos-fill"))?)
}

/// Writes a random LoRA adapter (rank 4 on q and v) of the model in `model` into `dir`; its
/// files' names and bytes.
fn random_adapter(model: &Path, dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    use tandem_worker::adapters::LoraAdapter;
    use tandem_worker::model::ModelConfig;
    use tandem_worker::rng::Xoshiro256;

    let cfg = ModelConfig::load(model)?;
    let config = serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]});
    let adapter = LoraAdapter::init_random(&cfg, config, &mut Xoshiro256::seed_from_u64(7), 0.05)?;
    adapter.save(dir, &cfg)?;
    ["adapter_config.json", "adapter_model.safetensors"]
        .into_iter()
        .map(|f| Ok((f.to_string(), std::fs::read(dir.join(f))?)))
        .collect()
}
