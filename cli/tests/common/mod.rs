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

/// One HTTP/1.1 exchange with a JSON body (or none): the status and the body (chunked transfer
/// decoded).
pub fn http(addr: &str, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> (u16, String) {
    http_as(addr, method, path, key, "application/json", body.unwrap_or(""))
}

/// [`http`] with a JSON value as the body, and the answer as JSON (a string if it is not).
pub fn call_json(
    addr: &str,
    method: &str,
    path: &str,
    key: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = http(addr, method, path, Some(key), body.as_deref());
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// Every event message of fine-tuning job `id`, newest first, read page by page.
#[allow(clippy::unwrap_used)] // a broken page is a failed test
pub fn job_events(addr: &str, key: &str, id: &str) -> Vec<String> {
    let (mut messages, mut after) = (Vec::new(), String::new());
    loop {
        let (status, page) =
            call_json(addr, "GET", &format!("/v1/fine_tuning/jobs/{id}/events?limit=100{after}"), key, None);
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap();
        messages.extend(data.iter().map(|e| e["message"].as_str().unwrap().to_string()));
        if page["has_more"] != true {
            return messages;
        }
        after = format!("&after={}", data.last().unwrap()["id"].as_str().unwrap());
    }
}

/// Polls `check` until it returns something, failing after `secs`.
pub fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A file upload as OpenAI's clients send it: a multipart form with `purpose` and `file`.
pub fn upload(addr: &str, key: &str, filename: &str, content: &str) -> (u16, String) {
    let b = "tandem-test-boundary";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{b}--\r\n"
    );
    http_as(addr, "POST", "/v1/files", Some(key), &format!("multipart/form-data; boundary={b}"), &body)
}

#[allow(clippy::unwrap_used)] // a broken exchange is a failed test
fn http_as(addr: &str, method: &str, path: &str, key: Option<&str>, content_type: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        req += &format!("Authorization: Bearer {k}\r\n");
    }
    req += &format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
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

/// A tiny model, a coordinator (a group of one) and workers `w1`, `w2`, ... serving the model,
/// as processes (`procs`: the coordinator, then the workers); with `gateway` = (address, key),
/// the coordinator serves the HTTP gateway too.
pub struct MiniCluster {
    pub procs: Procs,
    pub model: PathBuf,
    pub coordinator: String,
    /// The first worker's address.
    pub worker: String,
}

pub fn mini_cluster(tag: &str, gateway: Option<(&str, &str)>) -> MiniCluster {
    mini_cluster_of(tag, gateway, 1)
}

#[allow(clippy::unwrap_used)] // a cluster that cannot start is a failed test
pub fn mini_cluster_of(tag: &str, gateway: Option<(&str, &str)>, workers: usize) -> MiniCluster {
    let dir = scratch(tag);
    let model = dir.join("tiny");
    let (ok, _, err) = tandem(&["init-model", "--preset", "tiny", "--out", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    let coordinator = free_addr();
    let (peers, data, blobs) = (format!("1={coordinator}"), dir.join("coordinator"), dir.join("blobs"));
    let blobs = blobs.to_str().unwrap();
    let mut args = vec!["coordinator", "--id", "1", "--peers", &peers, "--tick-ms", "20"];
    args.extend(["--data-dir", data.to_str().unwrap(), "--blobs", blobs]);
    if let Some((addr, key)) = gateway {
        args.extend(["--http", addr, "--api-key", key]);
    }
    let mut procs = Procs(vec![spawn(&args)]);
    let model_arg = model.to_str().unwrap();
    let addrs: Vec<String> = (0..workers).map(|_| free_addr()).collect();
    for (i, addr) in addrs.iter().enumerate() {
        let id = format!("w{}", i + 1);
        let args = ["worker", "--id", &id, "--listen", addr, "--coordinator", &coordinator, "--model", model_arg];
        procs.0.push(spawn(&[&args[..], &["--blobs", blobs]].concat()));
    }
    MiniCluster { procs, model, coordinator, worker: addrs[0].clone() }
}

/// Puts base model `name` (at `uri`) in the catalogue, as `tandem up` does, once the
/// coordinator at `coordinator` answers.
#[allow(clippy::unwrap_used)] // a coordinator that never answers is a failed test
pub fn register_model(coordinator: &str, name: &str, uri: &str) {
    use tandem_proto::ClusterClient;
    use tandem_proto::contract::{Command, Proposal};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p = Proposal::new(format!("model-{name}"), Command::RegisterModel { name: name.into(), uri: uri.into() });
    let client = ClusterClient::new(coordinator).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rt.block_on(client.propose_as(p.clone())).is_err() {
        assert!(std::time::Instant::now() < deadline, "the coordinator never took the model");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `tandem generate --json` of `prompt`, greedy, on the model in `model`: what a served
/// completion must equal.
#[allow(clippy::unwrap_used)] // a failed run is a failed test
pub fn generate_greedy(model: &std::path::Path, prompt: &str, max_tokens: usize) -> serde_json::Value {
    let max = max_tokens.to_string();
    let model = model.to_str().unwrap();
    let args = ["generate", "--model", model, "--prompt", prompt, "--max-tokens", &max, "--json", "--logprobs"];
    let (ok, out, err) = tandem(&args);
    assert!(ok, "{err}");
    serde_json::from_str(out.trim()).unwrap()
}
