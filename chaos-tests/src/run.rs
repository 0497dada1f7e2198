//! One run: a fresh cluster, the workload and the write probe running, the scenario's fault
//! injected after a warm-up, held, healed, the cluster given time to settle, then the final
//! reads and every checker. What it measured and every failure it found come back as a
//! [`RunReport`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_worker::rng::Xoshiro256;

use crate::checkers;
use crate::client::{Request, exchange};
use crate::cluster::Cluster;
use crate::history::{Answer, History, Op, Outcome};
use crate::linearizability::Verdict;
use crate::nemesis::Scenario;
use crate::workload::{Tenant, Workload};

/// Whole-model workers in the cluster (besides the worker group's two).
const WORKERS: usize = 3;
/// Workload clients (times the scenario's load).
const CLIENTS: usize = 4;
const WARM_UP: Duration = Duration::from_secs(3);
/// After the heal, before the workload stops: at least this long, and until inference has
/// answered again (or [`RECOVERY_BOUND`] has passed), so the history holds the recovery.
const SETTLE: Duration = Duration::from_secs(3);
/// Inference must answer again within this long after a fault heals.
pub const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// The probes' pace, and their bound on each attempt (then they try the next gateway).
const PROBE_EVERY: Duration = Duration::from_millis(50);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// History client numbers of the runner's own operations.
const PROBE: usize = 1000;
const WATCH: usize = 1001;
const SETUP: usize = 1002;
const FINAL: usize = 1003;
/// The fine-tuning data: the `reverse` task's first 64 examples.
const TRAINING_DATA: &str = include_str!("../../data/reverse/train.jsonl");
/// Epochs of each run's jobs over their 64 examples (16 steps each): long enough to be
/// training through the fault and past the heal on a 2-vCPU Zen 4 beside the workload (a
/// resumed attempt's first step shows it in the runs' job summaries), at the price of a wait
/// for them after the run on a slower machine.
const JOB_EPOCHS: u32 = 60;
/// How long a job may take to end after the run's workload stops.
const JOB_BOUND: Duration = Duration::from_secs(120);

/// What one run found.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    pub scenario: String,
    pub seed: u64,
    /// Operations in the history.
    pub operations: usize,
    /// Acknowledged writes not found at the end.
    pub lost: usize,
    /// The registries' (adapters', jobs'); its key names the adapter or job.
    pub verdict: Verdict<String>,
    /// Operations the linearizability checker saw.
    pub checked: usize,
    /// From the fault to the first acknowledged write invoked after it.
    pub write_outage: Option<Duration>,
    /// From the heal to the first whole completion invoked after it.
    pub recovery: Option<Duration>,
    /// Every check that failed, described.
    pub failures: Vec<String>,
    /// What became of the run's fine-tuning jobs.
    pub jobs: Vec<String>,
}

impl RunReport {
    /// A run that could not be carried out (the cluster did not start, a fault could not be
    /// injected): failed, with why.
    pub fn broken(scenario: &str, seed: u64, why: String) -> Self {
        let verdict = Verdict::Unknown { key: String::new() };
        let (write_outage, recovery) = (None, None);
        RunReport {
            scenario: scenario.to_string(),
            seed,
            operations: 0,
            lost: 0,
            verdict,
            checked: 0,
            write_outage,
            recovery,
            failures: vec![why],
            jobs: Vec::new(),
        }
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs `scenario` with `seed` on a fresh cluster of `bin` in `dir`.
pub fn run(bin: &Path, dir: &Path, scenario: &Scenario, seed: u64) -> Result<RunReport> {
    let mut cluster = Cluster::start(bin, dir, WORKERS).context("starting the cluster")?;
    let gateways = cluster.gateways();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workload = Workload {
        gateways: gateways.clone(),
        tenants: Vec::new(),
        adapter: Arc::new(cluster.adapter.clone()),
        history: History::new(),
        stop: stop.clone(),
        max_ops: 2_000,
        hang_up_after: scenario.hang_up_after,
        // A completion of a few tokens of the tiny model takes milliseconds.
        timeout: Duration::from_secs(10),
        files: Default::default(),
        jobs: Default::default(),
    };
    // Two tenants' keys, and a training file and a fine-tuning job for each, made before the
    // clients start.
    let operator = cluster.key.clone();
    for t in 0..2 {
        let name = format!("tenant{t}");
        let key = until_ok(&workload, |g| workload.create_key(SETUP, g, &operator, &name))?;
        workload.tenants.push(Tenant { name, key });
    }
    let tenants = workload.tenants.clone();
    let data: String = TRAINING_DATA.lines().take(64).map(|l| format!("{l}\n")).collect();
    let mut jobs = Vec::new();
    for tenant in &tenants {
        let file = until_ok(&workload, |g| workload.upload_file(SETUP, g, tenant, data.as_bytes()))?;
        let job = until_ok(&workload, |g| workload.create_job(SETUP, g, tenant, &file, JOB_EPOCHS, 4))?;
        jobs.push((tenant.clone(), job, file));
    }
    workload.files = jobs.iter().map(|(tenant, _, file)| (tenant.name.clone(), file.clone())).collect();
    let mut threads = workload.spawn(CLIENTS * scenario.load, seed);
    threads.extend(probes(&workload, cluster.key.clone(), &tenants[0]));
    threads.push(watch_checkpoints(&workload, &jobs));

    std::thread::sleep(WARM_UP);
    let before = cluster.footprint();
    cluster.seed = seed;
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let asked = Instant::now();
    let heal = scenario.inject(&mut cluster, &mut rng).with_context(|| format!("injecting {}", scenario.name))?;
    // A fault that lies in the workload (hang-ups, overload) has no moment of its own.
    let fault = workload.history.at(cluster.struck.unwrap_or(asked));
    std::thread::sleep(scenario.hold);
    let healed = workload.history.now();
    heal(&mut cluster).context("healing")?;
    std::thread::sleep(SETTLE);
    while recovered(&workload.history.events(), healed).is_none() && workload.history.now() < healed + RECOVERY_BOUND {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }

    let mut failures = Vec::new();
    if let Err(e) = cluster.wait_serving(cluster.workers().len(), Duration::from_secs(60)) {
        failures.push(format!("after the heal: {e}"));
    }
    if let Err(e) = cluster.wait_group_formed(Duration::from_secs(60)) {
        failures.push(format!("after the heal: {e}"));
    }
    if let Err(e) = cluster.wait_caught_up(Duration::from_secs(30)) {
        failures.push(format!("after the heal: {e}"));
    }
    for (i, tenant) in tenants.iter().enumerate() {
        final_read(&workload, |g| workload.list_adapters(FINAL + i, g, tenant));
        for job in workload.jobs_of(&tenant.name) {
            final_read(&workload, |g| workload.get_job(FINAL + i, g, tenant, &job));
        }
    }
    let events = workload.history.events();
    let mut lost = lost_keys(&events, &gateways);
    if lost > 0 {
        failures.push(format!("{lost} acknowledged API keys no longer work"));
    }
    let mut jobs_seen = Vec::new();
    for (tenant, job, file) in &jobs {
        if !file_intact(&gateways, tenant, file, data.as_bytes()) {
            lost += 1;
            failures.push(format!("the training file {file} of {} is gone or changed", tenant.name));
        }
        match job_end(&gateways, tenant, job) {
            Ok(end) => {
                failures.extend(checkers::job_failures(&end, &seen_checkpoints(&events, job)));
                jobs_seen.push(checkers::job_summary(&end));
            }
            Err(e) => failures.push(format!("job {job}: {e:#}")),
        }
    }
    match cluster.state() {
        Ok(state) => failures.extend(checkers::adapter_contents(&state, &cluster.dir.join("adapter"))),
        Err(e) => failures.push(format!("the final state could not be read: {e:#}")),
    }
    let (verdict, checked) = checkers::registries_linearizable(&events);
    if verdict != Verdict::Linearizable {
        failures.push(format!("registries: {verdict:?}"));
    }
    failures.extend(checkers::unretryable_inference(&events).into_iter().take(5));
    let recovery = recovered(&events, healed);
    match recovery {
        Some(r) if r <= RECOVERY_BOUND => {}
        _ => failures.push(format!("inference did not answer within {RECOVERY_BOUND:?} of the heal: {recovery:?}")),
    }
    let write_outage = checkers::first_success_after(&events, fault, Op::writes);
    let logs: Vec<&Path> = cluster.nodes.iter().map(|n| n.log.as_path()).collect();
    failures.extend(checkers::panics(&logs));
    failures.extend(footprint_growth(&before, &cluster.footprint()));
    for node in &mut cluster.nodes {
        if let Some(status) = node.exited() {
            failures.push(format!("{} exited on its own: {status}", node.name));
        }
    }
    Ok(RunReport {
        scenario: scenario.name.to_string(),
        seed,
        operations: events.len(),
        lost,
        verdict,
        checked,
        write_outage,
        recovery,
        failures,
        jobs: jobs_seen,
    })
}

/// From `healed` to the first whole completion invoked after it.
fn recovered(events: &[crate::history::Event], healed: Duration) -> Option<Duration> {
    checkers::first_success_after(events, healed, |op| matches!(op, Op::Complete { .. }))
}

/// The probes: every 50 ms a write (a key for tenant `probe`) through the next gateway, and
/// a completion through the next, each bounded to 1 s, so the history shows to a tenth of a
/// second when writes and inference stop and start again.
fn probes(w: &Workload, operator: String, tenant: &Tenant) -> [std::thread::JoinHandle<()>; 2] {
    let w = Workload { timeout: PROBE_TIMEOUT, ..w.clone() };
    let key = tenant.key.clone();
    [
        every(w.clone(), move |w, g| drop(w.create_key(PROBE, g, &operator, "probe"))),
        every(w, move |w, g| drop(w.complete(PROBE, g, &key, false))),
    ]
}

/// Runs `f` with each gateway in turn, every [`PROBE_EVERY`], until the workload stops.
fn every(w: Workload, f: impl Fn(&Workload, SocketAddr) + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for &g in w.gateways.iter().cycle() {
            if w.stop.load(Ordering::Relaxed) {
                return;
            }
            f(&w, g);
            std::thread::sleep(PROBE_EVERY);
        }
    })
}

/// Calls `f` on each gateway in turn until it makes something (up to 30 s): the key or id.
fn until_ok(w: &Workload, f: impl Fn(SocketAddr) -> Outcome) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &g in w.gateways.iter().cycle() {
        match f(g) {
            Outcome::Ok(Answer::Made { id } | Answer::Key { key: id }) => return Ok(id),
            other if Instant::now() > deadline => bail!("nothing made in 30 s: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    unreachable!("cycling over the gateways never ends")
}

/// Reads every job's checkpoints every 250 ms until the workload stops: what clients were
/// shown, which must never be lost.
fn watch_checkpoints(w: &Workload, jobs: &[(Tenant, String, String)]) -> std::thread::JoinHandle<()> {
    let (w, jobs) = (w.clone(), jobs.to_vec());
    std::thread::spawn(move || {
        for (i, &g) in w.gateways.iter().cycle().enumerate() {
            if w.stop.load(Ordering::Relaxed) {
                return;
            }
            let (tenant, job, _) = &jobs[i % jobs.len()];
            w.list_checkpoints(WATCH, g, tenant, job);
            std::thread::sleep(Duration::from_millis(250) / jobs.len() as u32);
        }
    })
}

/// Every checkpoint step of `job` a client was shown.
fn seen_checkpoints(events: &[crate::history::Event], job: &str) -> Vec<u64> {
    let mut steps: Vec<u64> = (events.iter())
        .filter(|e| matches!(&e.op, Op::ListCheckpoints { job: j } if j == job))
        .filter_map(|e| match &e.outcome {
            Outcome::Ok(Answer::Checkpoints(steps)) => Some(steps.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    steps.sort();
    steps.dedup();
    steps
}

/// `GET path` with `key` through the first gateway that answers 200 (up to 30 s).
fn get_json(gateways: &[SocketAddr], key: &str, path: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &g in gateways.iter().cycle() {
        match exchange(g, &Request::json("GET", path, key, ""), Duration::from_secs(5), None) {
            Ok(r) if r.status == 200 => return Ok(r.json()),
            other if Instant::now() > deadline => bail!("GET {path}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    unreachable!("cycling over the gateways never ends")
}

/// Job `id` once it has ended (waiting up to [`JOB_BOUND`]): its status, events and adapter.
fn job_end(gateways: &[SocketAddr], tenant: &Tenant, id: &str) -> Result<checkers::JobEnd> {
    let deadline = Instant::now() + JOB_BOUND;
    let job = loop {
        let job = get_json(gateways, &tenant.key, &format!("/v1/fine_tuning/jobs/{id}"))?;
        if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or("")) {
            break job;
        }
        if Instant::now() > deadline {
            // Its last events say where it stopped (placed, ended, queued again).
            let events = get_json(gateways, &tenant.key, &format!("/v1/fine_tuning/jobs/{id}/events?limit=5"))?;
            let last: Vec<&str> =
                (events["data"].as_array().into_iter().flatten()).filter_map(|e| e["message"].as_str()).collect();
            bail!(
                "still {} {} s after the run; its last events, newest first: {last:?}",
                job["status"],
                JOB_BOUND.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut events = Vec::new();
    let mut after = String::new();
    loop {
        let page = get_json(gateways, &tenant.key, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100{after}"))?;
        let data = page["data"].as_array().cloned().unwrap_or_default();
        events.extend(data.iter().filter_map(|e| e["message"].as_str().map(str::to_string)));
        match data.last() {
            Some(last) if page["has_more"] == true => after = format!("&after={}", last["id"].as_str().unwrap_or("")),
            _ => break,
        }
    }
    events.reverse();
    let model = job["fine_tuned_model"].as_str().unwrap_or("");
    let adapters = get_json(gateways, &tenant.key, "/v1/adapters")?;
    let adapter_version = (adapters["data"].as_array().into_iter().flatten())
        .find(|a| a["id"] == model)
        .and_then(|a| a["version"].as_u64());
    let status = job["status"].as_str().unwrap_or("").to_string();
    Ok(checkers::JobEnd { id: id.into(), status, events, adapter_version })
}

/// Whether file `id` of `tenant` still reads back as `content`.
fn file_intact(gateways: &[SocketAddr], tenant: &Tenant, id: &str, content: &[u8]) -> bool {
    let path = format!("/v1/files/{id}/content");
    (0..6).any(|attempt| {
        let g = gateways[attempt % gateways.len()];
        exchange(g, &Request::json("GET", &path, &tenant.key, ""), Duration::from_secs(5), None)
            .is_ok_and(|r| r.status == 200 && r.body.as_bytes() == content)
    })
}

/// Asks `f` of each gateway in turn until one answers (up to 30 s): the final reads, recorded,
/// the checkers' last word on what survived.
fn final_read(w: &Workload, f: impl Fn(SocketAddr) -> Outcome) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &g in w.gateways.iter().cycle() {
        if f(g).ok() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How many acknowledged probe keys no gateway accepts now.
fn lost_keys(events: &[crate::history::Event], gateways: &[SocketAddr]) -> usize {
    let keys = events.iter().filter_map(|e| match &e.outcome {
        Outcome::Ok(Answer::Key { key }) => Some(key.as_str()),
        _ => None,
    });
    // A 200 says the key works and a 401 that it is unknown; anything else asks the next gateway.
    let works = |key: &str| {
        (gateways.iter())
            .find_map(|&g| {
                match exchange(g, &Request::json("GET", "/v1/models", key, ""), Duration::from_secs(5), None) {
                    Ok(r) if r.status == 200 => Some(true),
                    Ok(r) if r.status == 401 => Some(false),
                    _ => None,
                }
            })
            .unwrap_or(false)
    };
    // Asked from a few threads at once: a run acknowledges some hundreds of keys.
    let keys: Vec<&str> = keys.collect();
    std::thread::scope(|scope| {
        let asked: Vec<_> = keys
            .chunks(keys.len().div_ceil(8).max(1))
            .map(|chunk| (chunk.len(), scope.spawn(move || chunk.iter().filter(|k| !works(k)).count())))
            .collect();
        // A checking thread that died leaves its keys unproven: counted lost.
        asked.into_iter().map(|(len, t)| t.join().unwrap_or(len)).sum()
    })
}

/// Processes (the same pid before and after) whose memory or descriptors grew past bounds:
/// more than 64 descriptors, or twice their memory and 256 MiB more.
fn footprint_growth(before: &[(String, u32, u64, usize)], after: &[(String, u32, u64, usize)]) -> Vec<String> {
    let mut grew = Vec::new();
    for (name, pid, rss, fds) in after {
        let Some((_, _, rss0, fds0)) = before.iter().find(|(n, p, ..)| n == name && p == pid) else { continue };
        if *fds > fds0 + 64 {
            grew.push(format!("{name}: file descriptors {fds0} -> {fds}"));
        }
        if *rss > 2 * rss0 + (256 << 20) {
            grew.push(format!("{name}: resident memory {} -> {} MiB", rss0 >> 20, rss >> 20));
        }
    }
    grew
}
