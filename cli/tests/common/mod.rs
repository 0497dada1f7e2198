//! Helpers shared by the tests that run the `tandem` binary.

#![allow(dead_code)] // each test file uses its own share of these

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Runs `tandem args...`: (success, stdout, stderr).
pub fn tandem(args: &[&str]) -> (bool, String, String) {
    #[allow(clippy::unwrap_used)] // a binary that cannot start is a failed test
    let out = Command::new(env!("CARGO_BIN_EXE_tandem")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh scratch folder for this test process.
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A free loopback address (released for a process to take).
pub fn free_addr() -> String {
    #[allow(clippy::unwrap_used)] // no free port is a failed test
    let addr = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap();
    addr.to_string()
}

/// Processes killed when the test ends, however it ends.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `tandem args...` (its output shown with TANDEM_TEST_LOGS set).
pub fn spawn(args: &[&str]) -> Child {
    let quiet = std::env::var_os("TANDEM_TEST_LOGS").is_none();
    let out = || if quiet { Stdio::null() } else { Stdio::inherit() };
    #[allow(clippy::unwrap_used)] // a binary that cannot start is a failed test
    Command::new(env!("CARGO_BIN_EXE_tandem")).args(args).stdout(out()).stderr(out()).spawn().unwrap()
}

/// One HTTP/1.1 exchange: the status and the body (chunked transfer decoded).
#[allow(clippy::unwrap_used)] // a broken exchange is a failed test
pub fn http(addr: &str, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        req += &format!("Authorization: Bearer {k}\r\n");
    }
    let body = body.unwrap_or("");
    req += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, mut rest) = raw.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return (status, rest.to_string());
    }
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return (status, body);
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// A tiny model, a coordinator (a group of one) and one worker serving the model, as processes;
/// with `gateway` = (address, key), the coordinator serves the HTTP gateway too.
pub struct MiniCluster {
    pub procs: Procs,
    pub model: PathBuf,
    pub coordinator: String,
    pub worker: String,
}

#[allow(clippy::unwrap_used)] // a cluster that cannot start is a failed test
pub fn mini_cluster(tag: &str, gateway: Option<(&str, &str)>) -> MiniCluster {
    let dir = scratch(tag);
    let model = dir.join("tiny");
    let (ok, _, err) = tandem(&["init-model", "--preset", "tiny", "--out", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (coordinator, worker) = (free_addr(), free_addr());
    let (peers, data, blobs) = (format!("1={coordinator}"), dir.join("coordinator"), dir.join("blobs"));
    let blobs = blobs.to_str().unwrap();
    let mut args = vec!["coordinator", "--id", "1", "--peers", &peers, "--tick-ms", "20"];
    args.extend(["--data-dir", data.to_str().unwrap(), "--blobs", blobs]);
    if let Some((addr, key)) = gateway {
        args.extend(["--http", addr, "--api-key", key]);
    }
    let mut procs = Procs(vec![spawn(&args)]);
    let model_arg = model.to_str().unwrap();
    procs.0.push(spawn(&[
        "worker",
        "--id",
        "w1",
        "--listen",
        &worker,
        "--coordinator",
        &coordinator,
        "--model",
        model_arg,
        "--blobs",
        blobs,
    ]));
    MiniCluster { procs, model, coordinator, worker }
}

/// `tandem generate --json` of `prompt`, greedy, on the model in `model`: what a served
/// completion must equal.
#[allow(clippy::unwrap_used)] // a failed run is a failed test
pub fn generate_greedy(model: &std::path::Path, prompt: &str, max_tokens: usize) -> serde_json::Value {
    let max = max_tokens.to_string();
    let args = ["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--max-tokens", &max, "--json"];
    let (ok, out, err) = tandem(&args);
    assert!(ok, "{err}");
    serde_json::from_str(out.trim()).unwrap()
}
