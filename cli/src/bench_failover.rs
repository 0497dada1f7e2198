//! `tandem bench failover`: the outage a client sees when the coordinators' leader dies. Three
//! `tandem coordinator` processes on loopback; a client writes through them; the leader's
//! process is killed (SIGKILL) and the outage is the time from the kill to the first write
//! acknowledged afterwards (the client retrying through the survivors, as a real one would).
//! The killed coordinator restarts from its disk before the next kill. Everything runs over
//! mutual TLS, with a CA of the benchmark's own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tandem_proto::contract::{Command as StateCommand, Proposal};
use tandem_proto::tls::{CertificateAuthority, ClusterTls, Role};
use tandem_proto::{ClusterClient, Security};

#[derive(Args)]
pub struct FailoverArgs {
    /// Leader kills to measure.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Raft tick of the coordinators, milliseconds (elections after 10-20 ticks).
    #[arg(long, default_value_t = tandem_coordinator::replica::Timing::DEFAULT.tick.as_millis() as u64)]
    tick_ms: u64,
    /// Where the coordinators keep their logs (emptied first).
    #[arg(long, default_value = "target/bench-failover")]
    dir: PathBuf,
    /// Also write the measurements as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// How long one write attempt may take before the client tries another coordinator.
const ATTEMPT: Duration = Duration::from_millis(500);

struct Group {
    exe: PathBuf,
    dir: PathBuf,
    peers: String,
    tick_ms: u64,
    addrs: BTreeMap<u64, String>,
    procs: BTreeMap<u64, Child>,
    /// The writing client's: an operator's certificate.
    security: Security,
}

impl Group {
    fn spawn(&mut self, id: u64) -> Result<()> {
        let child = Command::new(&self.exe)
            .args(["coordinator", "--id", &id.to_string(), "--peers", &self.peers])
            .args(["--tick-ms", &self.tick_ms.to_string(), "--data-dir"])
            .arg(self.dir.join(id.to_string()))
            .arg("--certs")
            .arg(self.dir.join("certs"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a coordinator")?;
        self.procs.insert(id, child);
        Ok(())
    }

    fn kill(&mut self, id: u64) -> Result<()> {
        if let Some(mut child) = self.procs.remove(&id) {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn client(g: &Group, addr: &str) -> Option<ClusterClient> {
    ClusterClient::with_timeouts(addr, &g.security, ATTEMPT, ATTEMPT).ok()
}

/// The leader every live coordinator agrees on, if they do.
async fn leader(g: &Group) -> Option<u64> {
    let mut seen = Vec::new();
    for id in g.procs.keys() {
        let s = client(g, &g.addrs[id])?.status(false).await.ok()?;
        seen.push(s.leader);
    }
    let first = *seen.first()?;
    (first != 0 && g.procs.contains_key(&first) && seen.iter().all(|&l| l == first)).then_some(first)
}

/// Writes once through any live coordinator, trying them in turn until one acknowledges.
async fn write(g: &Group, n: u64, give_up: Instant) -> Result<()> {
    let p =
        Proposal::new(format!("failover-{n}"), StateCommand::RegisterModel { name: format!("m{n}"), uri: "/m".into() });
    let ids: Vec<u64> = g.procs.keys().copied().collect();
    for attempt in 0.. {
        let addr = &g.addrs[&ids[attempt % ids.len()]];
        if let Some(c) = client(g, addr)
            && c.propose_as(p.clone()).await.is_ok()
        {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("write {n} not acknowledged in time");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

pub fn run(args: FailoverArgs) -> Result<()> {
    let _ = std::fs::remove_dir_all(&args.dir);
    let addrs: BTreeMap<u64, String> = (1..=3).map(|id| Ok((id, crate::up::free_addr()?))).collect::<Result<_>>()?;
    let peers = addrs.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
    let exe = std::env::current_exe()?;
    let certs = args.dir.join("certs");
    let ca = CertificateAuthority::create()?;
    ca.write(&certs)?;
    for id in addrs.keys() {
        ca.issue_into(&certs, Role::Coordinator, &id.to_string())?;
    }
    ca.issue_into(&certs, Role::Operator, "operator")?;
    let security = Security::Mutual(std::sync::Arc::new(ClusterTls::load(&certs, "operator")?));
    let dir = args.dir.clone();
    let mut g = Group { exe, dir, peers, tick_ms: args.tick_ms, addrs, procs: BTreeMap::new(), security };
    for id in 1..=3 {
        g.spawn(id)?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    let mut outages = Vec::new();
    let mut n = 0;
    for kill in 1..=args.kills {
        // A settled group: all three agree on a leader and it takes writes.
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            if let Some(l) = rt.block_on(leader(&g)) {
                break l;
            }
            if Instant::now() > deadline {
                bail!("the coordinators did not settle on a leader");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        n += 1;
        rt.block_on(write(&g, n, Instant::now() + Duration::from_secs(30)))?;

        g.kill(leader)?;
        let killed = Instant::now();
        n += 1;
        rt.block_on(write(&g, n, killed + Duration::from_secs(60)))?;
        let outage = killed.elapsed().as_secs_f64();
        eprintln!("kill {kill}/{}: leader {leader}, outage {:.0} ms", args.kills, outage * 1e3);
        outages.push(outage);
        g.spawn(leader)?;
    }
    let mut sorted = outages.clone();
    sorted.sort_by(f64::total_cmp);
    let (p50, p99, max) = (percentile(&sorted, 50.0), percentile(&sorted, 99.0), sorted[sorted.len() - 1]);
    println!(
        "leader kills: {}, tick {} ms: outage p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 <= 3000 ms)",
        outages.len(),
        args.tick_ms,
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "kills": outages.len(), "tick_ms": args.tick_ms, "outage_s": outages,
            "p50_s": p50, "p99_s": p99, "max_s": max,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
