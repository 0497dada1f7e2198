//! The runs' records: every finished run, and every etcd leader kill, is appended to a file as
//! a line of JSON naming the source revision and the CPU it ran on. A scorecard of every
//! scenario over 20 seeds takes hours, more than one sitting: `--resume` takes the runs already
//! recorded for the same revision on the same CPU model instead of running them again, so the
//! scorecard can be finished over several invocations and still describe one version of the
//! code on one kind of machine.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::run::RunReport;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Run {
        revision: String,
        cpu: String,
        seconds: u64,
        report: RunReport,
    },
    /// The `index`-th leader kill of the etcd yardstick.
    EtcdKill {
        revision: String,
        cpu: String,
        index: u64,
        outage: Duration,
    },
}

/// The record file, and the records of earlier invocations that this one may reuse.
pub struct Records {
    path: PathBuf,
    pub revision: String,
    pub cpu: String,
    earlier: Vec<Record>,
}

impl Records {
    /// Opens the records at `path`; with `resume`, keeps those of `revision` on this CPU model
    /// for reuse (a tree with changes outside `docs/` since that revision cannot resume: its
    /// records would not say what code ran).
    pub fn open(path: &Path, revision: String, resume: bool) -> Result<Self> {
        let cpu = cpu_model();
        let mut earlier = Vec::new();
        if resume {
            if revision.ends_with("-dirty") {
                bail!(
                    "--resume needs committed code (the records name the revision that ran): commit, or leave --resume out"
                );
            }
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let not_a_record = || format!("{} line {}: not a record", path.display(), n + 1);
                // Only this revision's records are read whole: another's may have another shape.
                let value: serde_json::Value = serde_json::from_str(line).with_context(not_a_record)?;
                if (value["revision"].as_str(), value["cpu"].as_str()) == (Some(revision.as_str()), Some(cpu.as_str()))
                {
                    earlier.push(serde_json::from_value(value).with_context(not_a_record)?);
                }
            }
        }
        Ok(Records { path: path.to_path_buf(), revision, cpu, earlier })
    }

    /// The run of `scenario` with `seed` an earlier invocation recorded, if any.
    pub fn run(&self, scenario: &str, seed: u64) -> Option<RunReport> {
        self.earlier.iter().find_map(|r| match r {
            Record::Run { report, .. } if report.scenario == scenario && report.seed == seed => Some(report.clone()),
            _ => None,
        })
    }

    /// The `index`-th etcd leader kill an earlier invocation recorded, if any.
    pub fn etcd_kill(&self, index: u64) -> Option<Duration> {
        self.earlier.iter().find_map(|r| match r {
            Record::EtcdKill { index: i, outage, .. } if *i == index => Some(*outage),
            _ => None,
        })
    }

    /// Appends a run of this invocation.
    pub fn add_run(&self, report: &RunReport, seconds: u64) -> Result<()> {
        let (revision, cpu) = (self.revision.clone(), self.cpu.clone());
        self.append(&Record::Run { revision, cpu, seconds, report: report.clone() })
    }

    /// Appends an etcd leader kill of this invocation.
    pub fn add_etcd_kill(&self, index: u64, outage: Duration) -> Result<()> {
        self.append(&Record::EtcdKill { revision: self.revision.clone(), cpu: self.cpu.clone(), index, outage })
    }

    fn append(&self, record: &Record) -> Result<()> {
        let mut file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        writeln!(file, "{}", serde_json::to_string(record)?)?;
        Ok(())
    }
}

/// The last commit of the checkout at `root` that changed anything outside `docs/` (writing
/// the scorecard into `docs/chaos.md` changes no code), with `-dirty` when files outside
/// `docs/` have changed since; `unknown` outside a git checkout.
pub fn source_revision(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let code = [".", ":(exclude)docs"];
    let Some(commit) = git(&[&["log", "-1", "--format=%H", "--"][..], &code].concat()) else {
        return "unknown-dirty".into();
    };
    match git(&[&["status", "--porcelain", "--"][..], &code].concat()) {
        Some(changes) if changes.is_empty() => commit,
        _ => format!("{commit}-dirty"),
    }
}

/// This machine's CPU model, as `/proc/cpuinfo` names it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linearizability::Verdict;

    fn report(scenario: &str, seed: u64) -> RunReport {
        let mut r = RunReport::broken(scenario, seed, "why".into());
        r.verdict = Verdict::Linearizable;
        r.write_outage = Some(Duration::from_millis(1234));
        r
    }

    #[test]
    fn a_resumed_invocation_reuses_the_records_of_its_revision_and_cpu_only() {
        let dir = std::env::temp_dir().join(format!("tandem-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("records.jsonl");
        let _ = std::fs::remove_file(&path);
        let first = Records::open(&path, "abc".into(), false).unwrap();
        first.add_run(&report("leader-kill", 1), 25).unwrap();
        first.add_etcd_kill(0, Duration::from_millis(1052)).unwrap();
        Records::open(&path, "other".into(), false).unwrap().add_run(&report("leader-kill", 2), 25).unwrap();

        let resumed = Records::open(&path, "abc".into(), true).unwrap();
        let again = resumed.run("leader-kill", 1).expect("recorded run");
        assert_eq!((again.verdict, again.write_outage), (Verdict::Linearizable, Some(Duration::from_millis(1234))));
        assert_eq!(again.failures, vec!["why".to_string()]);
        assert!(resumed.run("leader-kill", 2).is_none(), "a run of another revision is not reused");
        assert_eq!(resumed.etcd_kill(0), Some(Duration::from_millis(1052)));
        assert!(Records::open(&path, "abc".into(), false).unwrap().run("leader-kill", 1).is_none());
        assert!(Records::open(&path, "abc-dirty".into(), true).is_err(), "uncommitted code cannot resume");

        // Another revision's records may have another shape: they are passed over unread.
        let older =
            r#"{"kind":"run","revision":"old","cpu":"x","seconds":1,"report":{"verdict":{"Unknown":{"key":["",""]}}}}"#;
        std::fs::write(&path, format!("{}{older}\n", std::fs::read_to_string(&path).unwrap())).unwrap();
        assert!(Records::open(&path, "abc".into(), true).unwrap().run("leader-kill", 1).is_some());

        std::fs::write(&path, "not json\n").unwrap();
        assert!(Records::open(&path, "abc".into(), true).is_err(), "a broken record file is an error");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
