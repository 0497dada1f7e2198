//! Coordinator processes on loopback. Proxied, every directed link between two of them runs
//! through a TCP proxy of the test (each coordinator's `--peers` names the proxies it reaches
//! the others through), so a test can sever links between real processes with the same verbs
//! as on a [`MemNet`](crate::MemNet): `cut`, `isolate`, `heal`. A severed link drops its open
//! connections and refuses new ones, as a partition does.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_proto::contract::{Command, Proposal, Reply};
use tandem_proto::{ClientError, ClusterClient, Role};
use tokio::sync::watch;

use crate::certs::TestCerts;
use crate::ports::free_addr;
use crate::process::{Scratch, Tandem};

/// How to start the coordinators.
#[derive(Clone, Copy, Debug)]
pub struct CoordinatorOptions {
    /// Founding members, ids 1 to `size`.
    pub size: u64,
    /// Links through TCP proxies, so that `cut`, `isolate` and `heal` work.
    pub proxied: bool,
    /// `--tick-ms`.
    pub tick_ms: u64,
    /// `--lease-ms`, the workers' lease (the binary's default if None).
    pub lease_ms: Option<u64>,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        // Short ticks keep the tests quick; not so short that a loaded 2-core machine (three
        // coordinators per test, tests in parallel) misses elections.
        CoordinatorOptions { size: 3, proxied: false, tick_ms: 50, lease_ms: None }
    }
}

/// Running coordinator processes by id, killed on drop; their data in one scratch folder.
pub struct Coordinators {
    tandem: Tandem,
    opts: CoordinatorOptions,
    /// Where each listens (and what the test talks to).
    addrs: BTreeMap<u64, String>,
    /// Each one's `--peers`.
    peers: BTreeMap<u64, String>,
    procs: BTreeMap<u64, Child>,
    /// (from, to) → the switch that severs that link.
    links: BTreeMap<(u64, u64), watch::Sender<bool>>,
    rt: tokio::runtime::Runtime,
    /// The cluster's CA: the coordinators and the test's clients talk mutual TLS.
    certs: TestCerts,
    /// Dropped after the processes are killed (see `Drop`).
    dir: Scratch,
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn peers_arg(addrs: &BTreeMap<u64, String>) -> String {
    addrs.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",")
}

impl Coordinators {
    /// Starts coordinators 1 to `opts.size` as a new cluster, in a scratch folder named `tag`.
    pub fn start(tandem: Tandem, tag: &str, opts: CoordinatorOptions) -> Self {
        let ids: Vec<u64> = (1..=opts.size).collect();
        let addrs: BTreeMap<u64, String> = ids.iter().map(|&id| (id, free_addr())).collect();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut peers, mut links) = (BTreeMap::new(), BTreeMap::new());
        for &from in &ids {
            let mut view = addrs.clone();
            for &to in ids.iter().filter(|&&to| opts.proxied && to != from) {
                let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
                view.insert(to, listener.local_addr().unwrap().to_string());
                let (cut, cut_rx) = watch::channel(false);
                rt.spawn(proxy(listener, addrs[&to].clone(), cut_rx));
                links.insert((from, to), cut);
            }
            peers.insert(from, peers_arg(&view));
        }
        let dir = Scratch::new(tag);
        let certs = TestCerts::new(&dir.join("certs"));
        let mut c = Coordinators { tandem, opts, addrs, peers, procs: BTreeMap::new(), links, rt, certs, dir };
        for id in ids {
            c.spawn(id, &[]);
        }
        c
    }

    /// The scratch folder (each coordinator's data in `<dir>/<id>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where coordinator `id` listens for gRPC.
    pub fn addr(&self, id: u64) -> &str {
        &self.addrs[&id]
    }

    /// The ids of the coordinators running now.
    pub fn running(&self) -> Vec<u64> {
        self.procs.keys().copied().collect()
    }

    /// A runtime for the test's own async calls (a [`ClusterClient`]'s).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The arguments that make a `tandem` tool the operator.
    pub fn operator_args(&self) -> Vec<String> {
        self.certs.args(Role::Operator, "operator")
    }

    /// A client of coordinator `id`, as an operator.
    pub fn client(&self, id: u64) -> ClusterClient {
        ClusterClient::new(&self.addrs[&id], &self.certs.operator()).unwrap()
    }

    /// A client of coordinators `ids`, in that order (one address list), as an operator.
    pub fn client_of(&self, ids: &[u64]) -> ClusterClient {
        let addrs: Vec<&str> = ids.iter().map(|id| self.addrs[id].as_str()).collect();
        ClusterClient::new(&addrs.join(","), &self.certs.operator()).unwrap()
    }

    /// Starts coordinator `id` (again: from its data folder) with `extra` arguments.
    pub fn spawn(&mut self, id: u64, extra: &[&str]) {
        let (id_arg, tick) = (id.to_string(), self.opts.tick_ms.to_string());
        let data = self.dir.join(id.to_string());
        let mut args = vec!["coordinator", "--id", &id_arg, "--peers", &self.peers[&id], "--tick-ms", &tick];
        let lease = self.opts.lease_ms.map(|l| l.to_string());
        if let Some(lease) = &lease {
            args.extend(["--lease-ms", lease]);
        }
        args.extend(extra);
        args.extend(["--data-dir", data.to_str().unwrap()]);
        let certs = self.certs.args(Role::Coordinator, &id_arg);
        args.extend(certs.iter().map(String::as_str));
        let child = self.tandem.spawn(&args);
        self.procs.insert(id, child);
    }

    /// Starts coordinator `id` empty, to join the running cluster (the others learn its address
    /// from the membership change). Its links are direct: `cut` and `isolate` do not reach it.
    pub fn spawn_joiner(&mut self, id: u64) {
        self.addrs.insert(id, free_addr());
        self.peers.insert(id, peers_arg(&self.addrs));
        self.spawn(id, &["--join"]);
    }

    /// Kills coordinator `id` (SIGKILL: what it had not synced is lost).
    pub fn kill(&mut self, id: u64) {
        let mut child = self.procs.remove(&id).unwrap_or_else(|| panic!("coordinator {id} is not running"));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Severs the links between `a` and `b`, both ways.
    pub fn cut(&self, a: u64, b: u64) {
        self.switch(|from, to| (from, to) == (a, b) || (from, to) == (b, a));
    }

    /// Severs every link to and from coordinator `id`.
    pub fn isolate(&self, id: u64) {
        self.switch(|from, to| from == id || to == id);
    }

    /// Restores every link.
    pub fn heal(&self) {
        for switch in self.links.values() {
            switch.send_replace(false);
        }
    }

    fn switch(&self, severed: impl Fn(u64, u64) -> bool) {
        assert!(self.opts.proxied, "links can only be cut between coordinators started proxied");
        for ((from, to), switch) in &self.links {
            if severed(*from, *to) {
                switch.send_replace(true);
            }
        }
    }

    /// `tandem status --json` asked at coordinator `id` (None while it does not answer).
    pub fn status(&self, id: u64) -> Option<Value> {
        let operator = self.certs.args(Role::Operator, "operator");
        let args = [&["status", "--json", "--coordinator", &self.addrs[&id]][..], &as_strs(&operator)].concat();
        let (ok, out, _) = self.tandem.run(&args);
        ok.then(|| serde_json::from_str(&out).unwrap())
    }

    /// The leader as the running coordinators agree on it, waiting for one.
    pub fn leader(&self) -> u64 {
        self.leader_among(&self.running())
    }

    /// The leader as one of `ids` sees it (one of `ids` itself), waiting up to 20 s for one of
    /// them to know it.
    pub fn leader_among(&self, ids: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        // What each last said (leader, term, commit), for the failure message.
        let mut seen = BTreeMap::new();
        while Instant::now() < deadline {
            for &id in ids {
                let Some(s) = self.status(id) else {
                    seen.insert(id, "no answer".to_string());
                    continue;
                };
                let leader = s["leader"].as_u64().unwrap();
                if leader != 0 && ids.contains(&leader) {
                    return leader;
                }
                seen.insert(id, format!("leader {leader} term {} commit {}", s["term"], s["commit"]));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no leader elected among {ids:?}: {seen:?}");
    }

    /// Proposes `command` once through coordinator `via`.
    pub fn try_propose(&self, via: u64, request_id: &str, command: &Command) -> Result<Reply, ClientError> {
        let p = Proposal::new(request_id, command.clone());
        let c = ClusterClient::new(&self.addrs[&via], &self.certs.operator())?;
        self.rt.block_on(c.propose_as(p))
    }

    /// Proposes through `via`, retrying for up to 20 s while the cluster is busy electing (the
    /// same request id: it applies once).
    pub fn propose(&self, via: u64, request_id: &str, command: Command) -> Reply {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.try_propose(via, request_id, &command) {
                Ok(reply) => return reply,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("retrying: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("proposing {request_id} via {via}: {e}"),
            }
        }
    }

    /// The keys of the state's `what` map (workers, models, ...) as coordinator `id` reads it,
    /// waiting up to 20 s for it to serve a read.
    pub fn names(&self, id: u64, what: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.status(id)
                && let Some(w) = s[what].as_object()
            {
                return w.keys().cloned().collect();
            }
            assert!(Instant::now() < deadline, "coordinator {id} never served a read: {:?}", self.status(id));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to 20 s until coordinator `id` reads `want` as its `what` (it is catching up).
    pub fn wait_for_names(&self, id: u64, what: &str, want: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.names(id, what) != want {
            assert!(Instant::now() < deadline, "coordinator {id} did not catch up on {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `tandem coordinators <change...> --coordinator <via>`: its output; a failure panics with
    /// every coordinator's status.
    pub fn coordinators(&self, via: u64, change: &[&str]) -> String {
        let operator = self.operator_args();
        let mut args = vec!["coordinators", "--coordinator", &self.addrs[&via]];
        args.extend(as_strs(&operator));
        args.extend(change);
        let (ok, out, err) = self.tandem.run(&args);
        if !ok {
            let all: Vec<_> = self.procs.keys().map(|&id| self.status(id).map(|s| s.to_string())).collect();
            panic!("tandem {args:?}: {err}\n{all:?}");
        }
        out
    }
}

/// Forwards connections to `target` until `cut` is set; then drops them and refuses new ones.
async fn proxy(listener: tokio::net::TcpListener, target: String, cut: watch::Receiver<bool>) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        if *cut.borrow() {
            continue;
        }
        let (target, mut cut) = (target.clone(), cut.clone());
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.wait_for(|c| *c) => {}
            }
        });
    }
}

impl Drop for Coordinators {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
