//! `tandem-chaos`: runs the scenarios over seeds against the real `tandem` binary and prints
//! the scorecard (scenario, seeds, passed, operations, acknowledged writes lost,
//! linearizability, write outage and inference recovery p50 / p99), with the same run's etcd
//! leader-kill figures beside Tandem's; `--out` writes it into a Markdown file. Every run is
//! recorded in `DIR/records.jsonl`; `--resume` reuses the runs recorded for the same code on
//! the same CPU model. Needs root (network namespaces), iproute2, nftables and etcd.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;
use tandem_chaos::etcd;
use tandem_chaos::linearizability::Verdict;
use tandem_chaos::nemesis::{self, Scenario};
use tandem_chaos::records::{Records, source_revision};
use tandem_chaos::run::{RECOVERY_BOUND, RunReport, run};

#[derive(Parser)]
#[command(about = "Tandem under faults: real processes, nemeses, checkers, a scorecard")]
struct Args {
    /// The `tandem` binary (default: `release/tandem` in `$CARGO_TARGET_DIR`, else in
    /// `target/`, as `cargo build --release` leaves it).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// `all`, or scenario names separated by commas.
    #[arg(long, default_value = "all")]
    scenarios: String,
    /// Scenarios left out (names separated by commas).
    #[arg(long, default_value = "")]
    except: String,
    /// Seeds per scenario (1, 2, ...).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Where the runs' clusters live (each run's logs stay there until the next run).
    #[arg(long, default_value = "target/chaos")]
    dir: PathBuf,
    /// Write the scorecard into this Markdown file, between its scorecard markers.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Take the runs (and etcd kills) that `DIR/records.jsonl` holds for this source revision
    /// on this CPU model instead of running them again: a scorecard over many seeds can be
    /// made over several invocations.
    #[arg(long)]
    resume: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let all = nemesis::all();
    let names = |list: &str| -> Result<Vec<String>> {
        let names: Vec<String> = list.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect();
        if let Some(unknown) = names.iter().find(|n| !all.iter().any(|s| s.name == n.as_str())) {
            let known: Vec<&str> = all.iter().map(|s| s.name).collect();
            bail!("no scenario {unknown:?}; there are: {}", known.join(", "));
        }
        Ok(names)
    };
    let except = names(&args.except)?;
    let wanted = if args.scenarios == "all" { None } else { Some(names(&args.scenarios)?) };
    let chosen: Vec<&Scenario> = (all.iter())
        .filter(|s| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == s.name)))
        .filter(|s| !except.iter().any(|n| n == s.name))
        .collect();
    let bin = args.bin.unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into())).join("release/tandem")
    });
    let bin =
        std::fs::canonicalize(&bin).map_err(|e| anyhow::anyhow!("{}: {e} (cargo build --release)", bin.display()))?;
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let revision = source_revision(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    let records = Records::open(&dir.join("records.jsonl"), revision, args.resume)?;
    let mut rows = Vec::new();
    let mut failed = false;
    for s in chosen {
        let mut reports = Vec::new();
        for seed in 1..=args.seeds {
            let started = std::time::Instant::now();
            let (report, when) = match records.run(s.name, seed) {
                Some(report) => (report, "recorded earlier".to_string()),
                None => {
                    let report = match run(&bin, &dir.join("run"), s, seed) {
                        Ok(r) => r,
                        Err(e) => RunReport::broken(s.name, seed, format!("{e:#}")),
                    };
                    records.add_run(&report, started.elapsed().as_secs())?;
                    (report, format!("{} s", started.elapsed().as_secs()))
                }
            };
            let verdict =
                if report.passed() { "passed".to_string() } else { format!("FAILED: {}", report.failures.join("; ")) };
            eprintln!(
                "chaos: {} seed {seed} ({when}): {} operations, write outage {}, recovery {}; jobs: {}: {verdict}",
                s.name,
                report.operations,
                ms(report.write_outage),
                ms(report.recovery),
                report.jobs.join("; ")
            );
            failed |= !report.passed();
            reports.push(report);
        }
        rows.push(Row { scenario: s, reports });
    }
    let mut etcd = Vec::new();
    for i in 0..args.seeds.min(20) {
        let outage = match records.etcd_kill(i) {
            Some(outage) => outage,
            None => {
                let outage = etcd::leader_kill_outage(&dir.join(format!("etcd-{i}")))?;
                records.add_etcd_kill(i, outage)?;
                outage
            }
        };
        etcd.push(outage);
    }
    let card = scorecard(&rows, &etcd, &records);
    println!("{card}");
    if let Some(out) = &args.out {
        write_between_markers(out, &card)?;
    }
    if failed {
        bail!("some runs failed (their clusters' logs: {})", dir.join("run/logs").display());
    }
    Ok(())
}

struct Row<'a> {
    scenario: &'a Scenario,
    reports: Vec<RunReport>,
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{} ms", d.as_millis()))
}

/// The `p`-th percentile (nearest rank) of `values`.
fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    let mut v = values.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.saturating_sub(1)).copied()
}

fn scorecard(rows: &[Row], etcd: &[Duration], records: &Records) -> String {
    let mut out = format!(
        "Machine: {}, {} CPUs. Source revision {}. Inference must answer within {} s of each heal.\n\n",
        records.cpu,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        records.revision,
        RECOVERY_BOUND.as_secs()
    );
    out += "| scenario | seeds run | passed | operations | acknowledged lost | linearizability | write outage p50 / p99 | inference recovery p50 / p99 |\n";
    out += "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |\n";
    for row in rows {
        let r = &row.reports;
        let passed = r.iter().filter(|r| r.passed()).count();
        let operations: usize = r.iter().map(|r| r.operations).sum();
        let lost: usize = r.iter().map(|r| r.lost).sum();
        let violations = r.iter().filter(|r| matches!(r.verdict, Verdict::Violation { .. })).count();
        let unknown = r.iter().filter(|r| matches!(r.verdict, Verdict::Unknown { .. })).count();
        let checked: usize = r.iter().map(|r| r.checked).sum();
        let verdict = match (violations, unknown) {
            (0, 0) => format!("{} histories, {checked} ops: linearizable", r.len()),
            _ => format!("{violations} violations, {unknown} unknown of {}", r.len()),
        };
        let outages: Vec<Duration> = r.iter().filter_map(|r| r.write_outage).collect();
        let recoveries: Vec<Duration> = r.iter().filter_map(|r| r.recovery).collect();
        let pair = |v: &[Duration]| format!("{} / {}", ms(percentile(v, 50.0)), ms(percentile(v, 99.0)));
        out += &format!(
            "| {} | {} | {passed} | {operations} | {lost} | {verdict} | {} | {} |\n",
            row.scenario.name,
            r.len(),
            pair(&outages),
            pair(&recoveries)
        );
    }
    if !etcd.is_empty() {
        out += &format!(
            "\netcd (3 members on loopback, default timeouts), the same run, leader killed {} times: kill → first acknowledged write p50 {} / p99 {}.\n",
            etcd.len(),
            ms(percentile(etcd, 50.0)),
            ms(percentile(etcd, 99.0))
        );
    }
    out
}

const BEGIN: &str = "<!-- scorecard: begin (written by tandem-chaos --out) -->";
const END: &str = "<!-- scorecard: end -->";

/// Replaces what lies between the scorecard markers of `path` with `card`.
fn write_between_markers(path: &std::path::Path, card: &str) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{} has no scorecard markers ({BEGIN} ... {END})", path.display());
    };
    let text = format!("{}{BEGIN}\n{card}{}", &text[..a], &text[b..]);
    std::fs::write(path, text)?;
    Ok(())
}
