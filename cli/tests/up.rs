//! `tandem up`: one command starts a coordinator with the gateway and two workers as separate
//! processes, prints the endpoint and a key it made (kept for the next start), serves a
//! completion, keeps its cluster ports to holders of the certificates it made, and stops every
//! process on SIGTERM.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use std::sync::Arc;
use tandem_proto::Security;
use tandem_proto::tls::{ClusterTls, Role};
use tandem_testkit::{Scratch, free_addr, http};

use common::TANDEM;

#[test]
fn tandem_up_starts_a_cluster_and_stops_it_on_sigterm() {
    let dir = Scratch::new("up");
    let (http, grpc) = (free_addr(), free_addr());
    let mut up = TANDEM
        .command()
        .args(["up", "--workers", "2", "--preset", "tiny", "--http", &http, "--grpc", &grpc, "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let (mut key, mut endpoint, mut metrics) = (String::new(), String::new(), String::new());
    while metrics.is_empty() {
        let line = lines.next().expect("tandem up ended before printing its key and metrics ports").unwrap();
        if let Some(k) = line.trim().strip_prefix("API key:") {
            key = k.trim().to_string();
        }
        if let Some(e) = line.trim().strip_prefix("endpoint:") {
            endpoint = e.trim().to_string();
        }
        if let Some(m) = line.trim().strip_prefix("metrics:") {
            metrics = m.trim().to_string();
        }
    }
    assert_eq!(endpoint, format!("http://{http}/v1"));
    assert!(key.starts_with("tk-") && key.len() > 40, "{key}");
    assert_eq!(std::fs::read_to_string(dir.join("admin-key")).unwrap().trim(), key);
    let mode = std::fs::metadata(dir.join("admin-key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key file is readable by others");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http::http(&http, "GET", "/health", None, None);
        if status == 200 && serde_json::from_str::<Value>(&body).unwrap()["workers_alive"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the workers never came up: {status} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Greedy, so the count is deterministic: a sampled token may be EOS (1 in 512 on a random model).
    let req = json!({"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}).to_string();
    for _ in 0..2 {
        let (status, body) = http::http(&http, "POST", "/v1/completions", Some(&key), Some(&req));
        assert_eq!(status, 200, "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["usage"]["completion_tokens"], 3);
    }

    // The processes talk mutual TLS: the coordinator's port and the workers' answer the
    // certificates `tandem up` made, and nothing else.
    let certs = dir.join("certs");
    let status = |extra: &[&str]| TANDEM.run(&[&["status", "--json", "--coordinator", &grpc][..], extra].concat());
    let (ok, out, err) = status(&["--certs", certs.to_str().unwrap()]);
    assert!(ok, "{err}");
    let workers = serde_json::from_str::<Value>(&out).unwrap()["workers"].clone();
    assert_eq!(workers.as_object().unwrap().len(), 2, "{workers}");
    let (ok, _, err) = status(&["--insecure"]);
    assert!(!ok, "plain text was answered by the coordinator");
    assert!(err.contains("--insecure"), "{err}");
    let stranger = dir.join("stranger");
    assert!(TANDEM.run(&["certs", "--dir", stranger.to_str().unwrap(), "init"]).0);
    assert!(
        TANDEM
            .run(&["certs", "--dir", stranger.to_str().unwrap(), "issue", "--role", "operator", "--name", "operator"])
            .0
    );
    let (ok, _, _) = status(&["--certs", stranger.to_str().unwrap()]);
    assert!(!ok, "a certificate of another CA was answered by the coordinator");

    // Every process serves its metrics, to the operator's certificate.
    let operator = Security::Mutual(Arc::new(ClusterTls::load(&certs, "operator").unwrap()));
    let ports: Vec<(&str, &str)> =
        metrics.trim_end_matches(" (operator certificate)").split(", ").filter_map(|p| p.split_once(' ')).collect();
    assert_eq!(ports.iter().map(|p| p.0).collect::<Vec<_>>(), ["coordinator", "worker-1", "worker-2"], "{metrics}");
    for (name, at) in ports {
        let role = if name == "coordinator" { Role::Coordinator } else { Role::Worker };
        let (status, text) = http::scrape(at, &operator, role).unwrap();
        assert!(status == 200 && text.contains("# TYPE tandem:"), "{name} at {at}: {status} {text}");
    }

    // No process of the cluster shows the key on its command line (`ps` would).
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(!cmdline.contains(&key), "the key is on a command line: {cmdline}");
        }
    }

    // SIGTERM: every process stops, and the ports are free again.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(up.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "tandem up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(std::net::TcpStream::connect(&http).is_err(), "the gateway still answers");
    assert!(std::net::TcpStream::connect(&grpc).is_err(), "the coordinator still answers");
}
