//! Worker groups as processes over real sockets: a coordinator (with the gateway) and three
//! group workers on loopback; the operator places the tiny model as a tensor-parallel group of
//! two. A greedy completion through the gateway equals `tandem generate` on the whole model.
//! Then rank 1 is killed (SIGKILL) while a streamed request runs: the request ends at once
//! with an error naming the rank, the coordinator re-forms the group with the spare worker in
//! rank 1's place (a new epoch), and the same request succeeds again with the same output.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ADMIN: &str = "sk-admin-groups";
/// The collectives' timeout the workers run with: the group must fail well within it.
const COLLECTIVE_TIMEOUT_MS: u64 = 3000;

fn call(addr: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = common::http(addr, method, path, Some(ADMIN), body.as_deref());
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Polls `check` until it returns something, failing after `secs`.
fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The group `tp` once it is formed at an epoch of at least `epoch`.
fn formed(http: &str, epoch: u64) -> Value {
    wait_for(40, &format!("group tp formed at epoch {epoch} or later"), || {
        let (status, list) = call(http, "GET", "/v1/admin/groups", None);
        assert_eq!(status, 200, "{list}");
        let g = list["data"].as_array()?.iter().find(|g| g["id"] == "tp")?.clone();
        (g["formed"] == true && g["epoch"].as_u64()? >= epoch).then_some(g)
    })
}

fn workers_of(group: &Value) -> Vec<String> {
    group["ranks"].as_array().unwrap().iter().map(|r| r["worker"].as_str().unwrap().to_string()).collect()
}

/// A streamed completion: tells `started` when the first token arrives, then returns every
/// `data:` payload once the stream ends.
fn stream(http: String, body: Value, started: mpsc::Sender<()>) -> Vec<String> {
    let mut s = TcpStream::connect(&http).unwrap();
    let body = body.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut events = Vec::new();
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        if let Some(data) = line.strip_prefix("data: ") {
            if events.is_empty() {
                let _ = started.send(());
            }
            events.push(data.to_string());
        }
    }
    events
}

#[test]
fn a_group_serves_as_the_whole_model_does_and_is_re_placed_when_a_rank_dies() {
    let dir = common::scratch("groups");
    let model = dir.join("tiny");
    let model_arg = model.to_str().unwrap();
    let (ok, _, err) = common::tandem(&["init-model", "--preset", "tiny", "--out", model_arg]);
    assert!(ok, "{err}");
    let (coordinator, http) = (common::free_addr(), common::free_addr());
    let (peers, data, blobs) = (format!("1={coordinator}"), dir.join("coordinator"), dir.join("blobs"));
    let blobs = blobs.to_str().unwrap();
    let mut args = vec!["coordinator", "--id", "1", "--peers", &peers, "--tick-ms", "20", "--lease-ms", "1500"];
    args.extend(["--data-dir", data.to_str().unwrap(), "--blobs", blobs, "--http", &http, "--api-key", ADMIN]);
    let mut procs = common::Procs(vec![common::spawn(&args)]);
    let timeout = COLLECTIVE_TIMEOUT_MS.to_string();
    for id in ["w1", "w2", "w3"] {
        let (listen, collective) = (common::free_addr(), common::free_addr());
        let mut args = vec!["worker", "--id", id, "--listen", &listen, "--coordinator", &coordinator];
        args.extend(["--model", model_arg, "--blobs", blobs, "--collective-addr", &collective]);
        args.extend(["--collective-timeout-ms", &timeout, "--group-setup-timeout-ms", "10000"]);
        procs.0.push(common::spawn(&args));
    }
    common::register_model(&coordinator, "tiny", model_arg);
    wait_for(60, "three alive workers", || {
        TcpStream::connect(&http).ok()?;
        let (status, body) = common::http(&http, "GET", "/health", None, None);
        (status == 200 && body.contains("\"workers_alive\":3")).then_some(())
    });
    // Group workers serve no whole model: nothing serves "tiny" before the group forms.
    let req = json!({"model": "tiny", "prompt": "The cat sat on the", "max_tokens": 12, "temperature": 0});
    let (status, out) = call(&http, "POST", "/v1/completions", Some(req.clone()));
    assert_eq!(status, 503, "{out}");
    // More ranks than spare group workers: refused.
    let (status, out) = call(&http, "POST", "/v1/admin/groups", Some(json!({"model": "tiny", "size": 4})));
    assert_eq!(status, 409, "{out}");

    let (status, out) =
        call(&http, "POST", "/v1/admin/groups", Some(json!({"model": "tiny", "size": 2, "group": "tp"})));
    assert_eq!(status, 200, "{out}");
    assert_eq!(workers_of(&out), ["w1", "w2"]);
    let group = formed(&http, 1);
    assert_eq!(group["epoch"], 1, "{group}");

    // Rank 0 schedules, both ranks compute: the same greedy text as the whole model.
    let want = common::generate_greedy(&model, "The cat sat on the", 12);
    let (status, out) = call(&http, "POST", "/v1/completions", Some(req.clone()));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], want["text"], "{out}");
    assert_eq!(out["usage"]["completion_tokens"], 12);

    // Rank 1 dies while a long request streams.
    let (started, first_token) = mpsc::channel();
    let long = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0,
                      "stream": true});
    let streaming = {
        let http = http.clone();
        std::thread::spawn(move || stream(http, long, started))
    };
    first_token.recv_timeout(Duration::from_secs(20)).unwrap();
    let killed = Instant::now();
    procs.0[2].kill().unwrap();
    procs.0[2].wait().unwrap();
    let events = streaming.join().unwrap();
    let ended = killed.elapsed();
    assert!(ended < Duration::from_millis(COLLECTIVE_TIMEOUT_MS), "the request ended {ended:?} after the kill");
    let last = events.iter().rev().find(|e| *e != "[DONE]").unwrap();
    let last: Value = serde_json::from_str(last).unwrap();
    let message = last["error"]["message"].as_str().unwrap_or_else(|| panic!("no error at the end: {last}"));
    assert!(message.contains("rank 1"), "the error does not name rank 1: {message}");

    // Re-formed: the spare w3 takes rank 1, at a new epoch; the same request, the same text.
    let group = formed(&http, 2);
    assert_eq!(workers_of(&group), ["w1", "w3"], "{group}");
    let (status, out) = call(&http, "POST", "/v1/completions", Some(req));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], want["text"], "{out}");
}
