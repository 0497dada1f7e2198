//! Tensor parallelism across processes: `tandem tp-rank` processes, one per rank, joined over
//! TCP on loopback under the cluster's TLS, give the logits of a group of one (prefill and greedy decode steps, a batch
//! mixing adapters) and its training losses and adapter gradients, for the tiny dense and MoE
//! models at degrees 2 and 4; a rank killed mid-run makes the others fail
//! with an error naming it, and a rank that never comes fails the set-up, both within their
//! timeouts.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_proto::tls::Role;
use tandem_testkit::{Scratch, TestCerts, free_addr};

use common::TANDEM;

/// Rank `rank` as a process, holding worker certificate `rank{rank}` of `certs`.
fn rank(certs: &TestCerts, model: &str, rank: usize, peers: &[String], extra: &[&str]) -> std::process::Child {
    let (peers, cert) = (peers.join(","), certs.args(Role::Worker, &format!("rank{rank}")));
    let rank = rank.to_string();
    let mut args = vec!["tp-rank", "--model", model, "--rank", &rank];
    if !peers.is_empty() {
        args.extend(["--peers", &peers]);
    }
    args.extend(cert.iter().map(String::as_str));
    args.extend(extra);
    let cmd = TANDEM.command().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    cmd.unwrap()
}

/// Every rank's JSON output for a group of `world` processes.
fn group(certs: &TestCerts, model: &str, world: usize, extra: &[&str]) -> Vec<Value> {
    let peers: Vec<String> = if world > 1 { (0..world).map(|_| free_addr()).collect() } else { Vec::new() };
    let children: Vec<_> = (0..world).map(|r| rank(certs, model, r, &peers, extra)).collect();
    (children.into_iter())
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect()
}

fn logits(v: &Value) -> Vec<Vec<f64>> {
    let steps = v["logits"].as_array().unwrap();
    steps.iter().map(|s| s.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

/// The training losses and gradients of `out` are those of `want` (gradients within 1e-4 of
/// each tensor's largest value).
fn same_training(what: &str, out: &Value, want: &Value) {
    let floats = |v: &Value| -> Vec<f64> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    for (l, w) in floats(&out["losses"]).iter().zip(floats(&want["losses"])) {
        assert!((l - w).abs() < 1e-4 * (1.0 + w.abs()), "{what}: loss {l} vs {w}");
    }
    let (got, want) = (out["gradients"].as_object().unwrap(), want["gradients"].as_object().unwrap());
    assert!(!want.is_empty());
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}");
    for (name, w) in want {
        let (g, w) = (floats(&got[name]), floats(w));
        assert_eq!(g.len(), w.len(), "{what}: {name}");
        let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let diff = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(diff <= 1e-4 * scale.max(1e-3), "{what}: {name} differs by {diff} (largest {scale})");
    }
}

fn parity(preset: &str, extra: &[&str]) {
    let dir = Scratch::new(&format!("tp-{preset}"));
    let model = dir.join(preset);
    let (ok, _, err) = TANDEM.run(&["init-model", "--preset", preset, "--out", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (model, certs) = (model.to_str().unwrap(), TestCerts::new(&dir.join("certs")));
    let one = group(&certs, model, 1, extra).remove(0);
    let (want, want_training) = (logits(&one), one);
    for world in [2, 4] {
        for out in group(&certs, model, world, extra) {
            let got = logits(&out);
            assert_eq!(got.len(), want.len());
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(diff < 1e-4, "{preset} {extra:?}, degree {world}, rank {}, step {step}: {diff}", out["rank"]);
            }
            let what = format!("{preset} {extra:?}, degree {world}, rank {}", out["rank"]);
            same_training(&what, &out, &want_training);
            // Every place in the model that communicates did.
            for site in
                ["embedding", "attention", "mlp", "logits", "loss", "mlpbackward", "attentionbackward", "gradients"]
            {
                assert!(out["bytes"][site].as_u64().unwrap() > 0, "{out}");
            }
            // Expert parallelism moves tokens to the experts' ranks and back, in both passes.
            let expert_sites = ["experts", "expertsbackward"].map(|site| out["bytes"][site].as_u64().unwrap_or(0));
            assert_eq!(expert_sites.map(|b| b > 0), [!extra.is_empty(); 2], "{what}: {}", out["bytes"]);
        }
    }
}

#[test]
fn dense_ranks_in_separate_processes_match_a_group_of_one() {
    parity("tiny", &[]);
}

#[test]
fn moe_ranks_in_separate_processes_match_a_group_of_one() {
    parity("tiny-moe", &[]);
}

#[test]
fn expert_parallel_ranks_in_separate_processes_match_a_group_of_one() {
    parity("tiny-moe", &["--moe-split", "experts"]);
}

#[test]
fn a_rank_killed_mid_run_fails_its_group_cleanly() {
    let dir = Scratch::new("tp-kill");
    let model = dir.join("tiny");
    let (ok, _, err) = TANDEM.run(&["init-model", "--preset", "tiny", "--out", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (model, certs) = (model.to_str().unwrap(), TestCerts::new(&dir.join("certs")));
    // A long run (many decode steps) with a short timeout; rank 1 is killed once it has begun.
    let peers: Vec<String> = (0..2).map(|_| free_addr()).collect();
    let long = ["--steps", "100000", "--timeout-s", "3"];
    let survivor = rank(&certs, model, 0, &peers, &long);
    let mut victim = rank(&certs, model, 1, &peers, &long);
    std::thread::sleep(Duration::from_secs(2));
    victim.kill().unwrap();
    victim.wait().unwrap();
    let start = Instant::now();
    let out = survivor.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rank 0 went on without rank 1");
    assert!(stderr.contains("rank 1"), "the error does not name the rank that left: {stderr}");
    assert!(start.elapsed() < Duration::from_secs(10), "rank 0 took {:?} to fail", start.elapsed());

    // A rank that never comes: the set-up fails by its deadline.
    let peers: Vec<String> = (0..2).map(|_| free_addr()).collect();
    let start = Instant::now();
    let out = rank(&certs, model, 0, &peers, &["--timeout-s", "2"]).wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(start.elapsed() < Duration::from_secs(10), "set-up took {:?} to fail", start.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rank 1"), "{stderr}");
}
