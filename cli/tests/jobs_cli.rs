//! The job CLI against a cluster started by `tandem up`, through the gateway's gRPC job API:
//! the operator makes, lists and revokes tenants' keys (one made to expire is refused after);
//! a tenant uploads, lists and removes an adapter that another tenant cannot see; submits a
//! fine-tuning job and watches it to its end; a finished job cannot be cancelled; a wrong key
//! is refused with a clear message.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_testkit::{Scratch, free_addr, http};

use common::{TANDEM, random_adapter};

const ADMIN: &str = "sk-test-operator";
/// Fine-tuning on a CPU worker of a machine busy with other tests: generous.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// `tandem up`, stopped with SIGTERM (which stops its coordinator and workers too) when the
/// test ends, however it ends.
struct Up {
    child: Child,
    dir: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    /// The cluster's logs, for a failure's message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.join("logs")).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out += &format!("--- {}\n", entry.path().display());
            out += &tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            out += "\n";
        }
        out
    }
}

fn up(dir: &Path, http: &str, grpc: &str) -> Up {
    std::fs::create_dir_all(dir).unwrap();
    let key_file = tandem_testkit::secret_file(&dir.join("operator-key"), ADMIN);
    let child = TANDEM
        .command()
        .args(["up", "--workers", "1", "--preset", "tiny", "--http", http, "--grpc", grpc, "--api-key-file"])
        .arg(&key_file)
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = Up { child, dir: dir.to_path_buf() };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let health = std::net::TcpStream::connect(http).ok().map(|_| http::http(http, "GET", "/health", None, None));
        if let Some((200, body)) = &health
            && serde_json::from_str::<Value>(body).unwrap()["workers_alive"] == 1
        {
            return up;
        }
        assert!(Instant::now() < deadline, "the cluster never came up: {health:?}\n{}", up.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `tandem args... --gateway HTTP [--api-key KEY]`, killed after `timeout`: (success,
/// stdout, stderr).
fn cli(gateway: &str, key: Option<&str>, args: &[&str], timeout: Duration) -> (bool, String, String) {
    let mut cmd = TANDEM.command();
    cmd.args(args).args(["--gateway", gateway]).env_remove("TANDEM_API_KEY");
    if let Some(k) = key {
        cmd.args(["--api-key", k]);
    }
    run(cmd, timeout)
}

fn run(mut cmd: Command, timeout: Duration) -> (bool, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Drained while it runs, so a chatty command never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.is_some(), "{cmd:?} ran past {timeout:?}\nstdout: {out}\nstderr: {err}");
    (status.is_some_and(|s| s.success()), out, err)
}

/// Serves the files under `dir` over HTTP on a loopback port, as a file server would (GET;
/// 404 for what is not a file there). Returns its address.
fn serve_files(dir: PathBuf) -> String {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
            let _ = match (path.contains(".."), std::fs::read(dir.join(&path))) {
                (false, Ok(bytes)) => {
                    write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", bytes.len())
                        .and_then(|()| stream.write_all(&bytes))
                }
                _ => write!(stream, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            };
        }
    });
    addr
}

#[test]
fn tenants_manage_adapters_and_fine_tune_through_the_cli() {
    let dir = Scratch::new("jobs-cli");
    let (http, grpc) = (free_addr(), free_addr());
    let cluster = up(&dir, &http, &grpc);
    let quick = Duration::from_secs(60);
    let call = |key: Option<&str>, args: &[&str]| cli(&http, key, args, quick);

    // The operator makes the tenants' keys; a tenant cannot.
    let (ok, alice, err) = call(Some(ADMIN), &["keys", "create", "--tenant", "alice"]);
    assert!(ok, "{err}");
    let alice = alice.trim().to_string();
    assert!(alice.starts_with("tk-") && !alice.contains('\n'), "{alice}");
    let (ok, bob, err) = call(Some(ADMIN), &["keys", "create", "--tenant", "bob"]);
    assert!(ok, "{err}");
    let bob = bob.trim().to_string();
    let (ok, _, err) = call(Some(&alice), &["keys", "create", "--tenant", "mallory"]);
    assert!(!ok && err.contains("only the operator"), "{err}");

    // Keys are listed by id, never shown again; a revoked key and an expired one are refused.
    let (ok, temp, err) = call(Some(ADMIN), &["keys", "create", "--tenant", "carol", "--expires-in", "1h"]);
    assert!(ok, "{err}");
    let temp_id = err.split_whitespace().find(|w| w.starts_with("key_"));
    let temp_id = temp_id.unwrap_or_else(|| panic!("no key id in {err:?}")).to_string();
    let (ok, list, err) = call(Some(ADMIN), &["keys", "list"]);
    assert!(ok, "{err}");
    assert!(!list.contains(&alice) && !list.contains(temp.trim()), "a key is shown again:\n{list}");
    let row = list.lines().find(|l| l.starts_with(&temp_id)).unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains("carol") && !row.trim_end().ends_with('-'), "{row}");
    assert_eq!(list.lines().filter(|l| l.starts_with("key_")).count(), 3, "{list}");
    let (ok, _, err) = call(Some(&alice), &["keys", "list"]);
    assert!(!ok && err.contains("only the operator"), "{err}");
    let (ok, _, err) = call(Some(&alice), &["keys", "revoke", &temp_id]);
    assert!(!ok && err.contains("only the operator"), "{err}");
    let (ok, out, err) = call(Some(temp.trim()), &["adapters", "list"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = call(Some(ADMIN), &["keys", "revoke", &temp_id]);
    assert!(ok && out.contains("revoked"), "{err}");
    let (ok, _, err) = call(Some(temp.trim()), &["adapters", "list"]);
    assert!(!ok && err.contains("not valid"), "{err}");
    let (ok, _, err) = call(Some(ADMIN), &["keys", "revoke", &temp_id]);
    assert!(!ok && err.contains("no API key"), "{err}");
    let (ok, _, err) = call(Some(ADMIN), &["keys", "create", "--tenant", "carol", "--expires-in", "0"]);
    assert!(!ok && err.contains("out of range"), "{err}");
    let (ok, short, err) = call(Some(ADMIN), &["keys", "create", "--tenant", "carol", "--expires-in", "1s"]);
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(2100));
    let (ok, _, err) = call(Some(short.trim()), &["adapters", "list"]);
    assert!(!ok && err.contains("expired"), "{err}");

    // Adapters: alice's is hers alone.
    let adapter = dir.join("my-adapter");
    random_adapter(&dir.join("tiny"), &adapter);
    let adapter_arg = adapter.to_str().unwrap();
    let (ok, out, err) = call(Some(&alice), &["adapters", "add", "support", adapter_arg, "--base-model", "tiny"]);
    assert!(ok, "{err}");
    assert!(out.contains("added support version 1"), "{out}");
    let (ok, out, err) = call(Some(&alice), &["adapters", "list"]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.starts_with("support ")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("tiny"), "{row}");
    let (ok, out, err) = call(Some(&bob), &["adapters", "list"]);
    assert!(ok, "{err}");
    assert!(!out.contains("support"), "{out}");
    let (ok, _, err) = call(Some(&bob), &["adapters", "rm", "support"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    let (ok, out, err) = call(Some(&alice), &["adapters", "rm", "support"]);
    assert!(ok && out.contains("removed support"), "{out}{err}");
    let (ok, out, err) = call(Some(&alice), &["adapters", "list"]);
    assert!(ok && !out.contains("support"), "{out}{err}");
    // A folder that is no adapter is refused before anything is sent.
    let (ok, _, err) = call(Some(&alice), &["adapters", "add", "x", dir.to_str().unwrap(), "--base-model", "tiny"]);
    assert!(!ok && err.contains("neither a PEFT adapter"), "{err}");

    // Adapters from a URL or the gateway's disk: the operator's from anywhere, a tenant's only
    // from outside the cluster's networks; vLLM's routes load and unload them.
    let web = format!("http://{}/my-adapter/", serve_files(dir.to_path_buf()));
    let on_disk = format!("file://{adapter_arg}");
    let (ok, out, err) = call(Some(ADMIN), &["adapters", "add", "shared", &on_disk, "--base-model", "tiny"]);
    assert!(ok && out.contains("added shared version 1"), "{out}{err}");
    let (ok, out, err) = call(Some(ADMIN), &["adapters", "add", "shared", &web, "--base-model", "tiny"]);
    assert!(ok && out.contains("added shared version 2"), "{out}{err}");
    for (source, why) in [(&on_disk, "gateway's disk"), (&web, "own networks"), (&"s3://b/a".to_string(), "S3")] {
        let (ok, _, err) = call(Some(&alice), &["adapters", "add", "x", source, "--base-model", "tiny"]);
        assert!(!ok && err.contains(why), "{source}: {err}");
    }
    for (source, why) in [
        (format!("file://{}/../my-adapter", dir.display()), ".."),
        (format!("file://{}", dir.display()), "no adapter there"),
        ("ftp://host/a".into(), "ftp://"),
    ] {
        let (ok, _, err) = call(Some(ADMIN), &["adapters", "add", "x", &source, "--base-model", "tiny"]);
        assert!(!ok && err.contains(why), "{source}: {err}");
    }
    let load =
        |key: &str, body: Value| http::http(&http, "POST", "/v1/load_lora_adapter", Some(key), Some(&body.to_string()));
    let (status, out) = load(ADMIN, json!({"lora_name": "shared", "lora_path": adapter_arg}));
    assert!(status == 200 && out.contains("\"version\":3"), "{status} {out}");
    let chat = json!({"model": "shared", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3});
    let (status, out) = http::http(&http, "POST", "/v1/chat/completions", Some(ADMIN), Some(&chat.to_string()));
    assert_eq!(status, 200, "{out}");
    let (status, out) = load(&alice, json!({"lora_name": "mine", "lora_path": adapter_arg}));
    assert_eq!(status, 403, "{out}");
    let (status, out) = load(ADMIN, json!({"lora_name": "x", "lora_path": "relative/dir"}));
    assert!(status == 400 && out.contains("lora_path"), "{out}");
    let unload = json!({"lora_name": "shared"}).to_string();
    let (status, out) = http::http(&http, "POST", "/v1/unload_lora_adapter", Some(ADMIN), Some(&unload));
    assert!(status == 200 && out.contains("deleted"), "{out}");
    let (status, _) = http::http(&http, "POST", "/v1/chat/completions", Some(ADMIN), Some(&chat.to_string()));
    assert_eq!(status, 404);

    // A fine-tuning job, submitted and watched to its end.
    let data = dir.join("train.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| json!({"prompt": format!("count {i}:"), "completion": format!(" {} {}", i + 1, i + 2)}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let submit = ["submit", "finetune", "--model", "tiny", "--data", data.to_str().unwrap()];
    let (ok, out, err) =
        call(Some(&alice), &[&submit[..], &["--epochs", "1", "--batch-size", "4", "--suffix", "cnt"]].concat());
    assert!(ok, "{err}");
    assert!(err.contains("uploaded train.jsonl as file-"), "{err}");
    let id = out.trim().to_string();
    assert!(id.starts_with("ftjob-") && !id.contains('\n'), "{out}");

    let (ok, out, err) = cli(&http, Some(&alice), &["jobs", "watch", &id], JOB_TIMEOUT);
    assert!(ok, "the job did not succeed\nstdout: {out}\nstderr: {err}\n{}", cluster.logs());
    let model = format!("ft:tiny:alice:cnt:{id}");
    assert!(out.contains(&format!("job {id} succeeded")), "{out}");
    assert!(out.contains(&format!("fine-tuned model: {model}")), "{out}");
    // No terminal: each step is a line.
    assert!(err.contains("Step 2/2"), "{err}");

    let (ok, out, err) = call(Some(&alice), &["jobs", "list"]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("succeeded") && row.contains(&model), "{row}");
    // The key from the environment works as well as --api-key.
    let mut events = TANDEM.command();
    events.args(["jobs", "events", &id, "--gateway", &http]).env("TANDEM_API_KEY", &alice);
    let (ok, out, err) = run(events, quick);
    assert!(ok, "{err}");
    let created = out.lines().position(|l| l.contains("Job created")).unwrap_or_else(|| panic!("{out}"));
    let done = out.lines().position(|l| l.contains("successfully completed")).unwrap_or_else(|| panic!("{out}"));
    assert!(created < done, "events are oldest first: {out}");
    // The fine-tuned adapter is alice's now.
    let (ok, out, err) = call(Some(&alice), &["adapters", "list"]);
    assert!(ok && out.contains(&model), "{out}{err}");

    // A finished job cannot be cancelled; bob does not see it at all.
    let (ok, _, err) = call(Some(&alice), &["jobs", "cancel", &id]);
    assert!(!ok && err.contains("succeeded already"), "{err}");
    let (ok, _, err) = call(Some(&bob), &["jobs", "watch", &id]);
    assert!(!ok && err.contains("no fine-tuning job"), "{err}");

    // Keys: a wrong one, or none.
    let (ok, _, err) = call(Some("tk-wrong"), &["jobs", "list"]);
    assert!(!ok && err.contains("not valid"), "{err}");
    let (ok, _, err) = call(None, &["jobs", "list"]);
    assert!(!ok && err.contains("no API key"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
