//! Worker groups as processes over real sockets: a coordinator (with the gateway) and three
//! group workers on loopback; the operator places the tiny model as a tensor-parallel group of
//! two. Greedy completions through the gateway, of the base model and of a LoRA adapter in one
//! batch, equal `tandem generate` on the whole model.
//! Then rank 1 is killed (SIGKILL) while a streamed request runs: the request ends at once
//! with an error naming the rank, the coordinator re-forms the group with the spare worker in
//! rank 1's place (a new epoch), and the same request succeeds again with the same output.
//! A fine-tuning job submitted through the gateway trains on a group beside requests, survives
//! the loss of a rank (queued again, resumed from its checkpoint on the re-formed group), and
//! its adapter then serves on the group as it does on the whole model; so does an ESFT job on
//! an expert-parallel group of four.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_kernels::Device;
use tandem_proto::contract::{Command, Proposal, Reply, dir_checksum};
use tandem_testkit::{MiniCluster, http, wait_for};
use tandem_worker::adapters::Adapter;
use tandem_worker::model::Model;
use tandem_worker::model::probe::mixed_adapters;

use common::TANDEM;

const ADMIN: &str = "sk-admin-groups";
/// The collectives' timeout the workers run with: the group must fail well within it.
const COLLECTIVE_TIMEOUT_MS: u64 = 3000;

/// A JSON call with the operator's key.
fn call(addr: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    http::call_json(addr, method, path, ADMIN, body)
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
/// Starts a long streamed completion, kills `victim` once its first token has come, and
/// returns the error the stream ended with and how long after the kill it ended.
fn kill_mid_stream(http: &str, victim: &mut std::process::Child) -> (String, Duration) {
    let (started, first_token) = mpsc::channel();
    let long = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0,
                      "stream": true});
    let streaming = {
        let http = http.to_string();
        std::thread::spawn(move || stream(http, long, started))
    };
    first_token.recv_timeout(Duration::from_secs(20)).unwrap();
    let killed = Instant::now();
    victim.kill().unwrap();
    victim.wait().unwrap();
    let events = streaming.join().unwrap();
    let ended = killed.elapsed();
    let last: Value = serde_json::from_str(events.iter().rev().find(|e| *e != "[DONE]").unwrap()).unwrap();
    let message = last["error"]["message"].as_str().unwrap_or_else(|| panic!("no error at the end: {last}"));
    (message.to_string(), ended)
}

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

/// A coordinator with the gateway and `workers` group workers `w1`, `w2`, ... (processes, in
/// that order after the coordinator), a model of `preset` registered as "tiny", every worker
/// alive.
fn cluster(tag: &str, preset: &str, workers: usize) -> MiniCluster {
    let cluster = MiniCluster::builder(TANDEM, tag)
        .preset(preset)
        .workers(workers)
        .gateway(ADMIN)
        .lease_ms(1500)
        .group_workers(COLLECTIVE_TIMEOUT_MS, 10000)
        .start();
    cluster.register_model("tiny");
    cluster.wait_alive(workers);
    cluster
}

#[test]
fn a_group_serves_as_the_whole_model_does_and_is_re_placed_when_a_rank_dies() {
    let mut c = cluster("groups", "tiny", 3);
    let (dir, model, http) = (c.dir().to_path_buf(), c.model.clone(), c.http().to_string());
    // Group workers serve no whole model: nothing serves "tiny" before the group forms.
    let req = json!({"model": "tiny", "prompt": "The cat sat on the", "max_tokens": 12, "temperature": 0});
    let (status, out) = call(&http, "POST", "/v1/completions", Some(req.clone()));
    assert_eq!(status, 503, "{out}");
    // Only the operator places groups.
    let (status, key) = call(&http, "POST", "/v1/admin/api-keys", Some(json!({"tenant": "alice"})));
    assert_eq!(status, 200, "{key}");
    let body = json!({"model": "tiny", "size": 2}).to_string();
    let alice = key["key"].as_str().unwrap();
    let (status, out) = http::http(&http, "POST", "/v1/admin/groups", Some(alice), Some(&body));
    assert_eq!(status, 403, "{out}");
    // More ranks than spare group workers: refused.
    let (status, out) = call(&http, "POST", "/v1/admin/groups", Some(json!({"model": "tiny", "size": 4})));
    assert_eq!(status, 409, "{out}");

    let (status, out) =
        call(&http, "POST", "/v1/admin/groups", Some(json!({"model": "tiny", "size": 2, "group": "tp"})));
    assert_eq!(status, 200, "{out}");
    assert_eq!(workers_of(&out), ["w1", "w2"]);
    let group = formed(&http, 1);
    assert_eq!(group["epoch"], 1, "{group}");

    // Rank 0 schedules, both ranks compute: the same greedy texts as the whole model, for the
    // base model and for an adapter (which rank 1 reads from the folder rank 0's plan names),
    // sent together so that they may share batches.
    let adapter = save_adapter(&model, &dir.join("adapter-a"));
    propose(
        &c,
        Command::PutAdapter {
            tenant: "admin".into(),
            name: "a".into(),
            base_model: "tiny".into(),
            checksum: dir_checksum(std::path::Path::new(&adapter)).unwrap(),
            uri: adapter.clone(),
        },
    );
    let want = TANDEM.generate_greedy(&model, "The cat sat on the", 12);
    let want_a = generate_with_adapter(&model, &adapter, "The cat sat on the", 12);
    assert_ne!(want["text"], want_a["text"], "the adapter changes nothing");
    let with_a = json!({"model": "a", "prompt": "The cat sat on the", "max_tokens": 12, "temperature": 0});
    let both = |http: &str| {
        let h = http.to_string();
        let (r, ra) = (req.clone(), with_a.clone());
        let base = std::thread::spawn(move || call(&h, "POST", "/v1/completions", Some(r)));
        let a = call(http, "POST", "/v1/completions", Some(ra));
        (base.join().unwrap(), a)
    };
    let ((status, out), (status_a, out_a)) = both(&http);
    assert_eq!((status, status_a), (200, 200), "{out} {out_a}");
    assert_eq!(out["choices"][0]["text"], want["text"], "{out}");
    assert_eq!(out["usage"]["completion_tokens"], 12);
    assert_eq!(out_a["choices"][0]["text"], want_a["text"], "{out_a}");

    // Rank 1 dies while a long request streams.
    let (message, ended) = kill_mid_stream(&http, &mut c.procs.0[2]);
    assert!(ended < Duration::from_millis(COLLECTIVE_TIMEOUT_MS), "the request ended {ended:?} after the kill");
    assert!(message.contains("rank 1"), "the error does not name rank 1: {message}");

    // Re-formed: the spare w3 takes rank 1, at a new epoch; the same requests, the same texts.
    let group = formed(&http, 2);
    assert_eq!(workers_of(&group), ["w1", "w3"], "{group}");
    let ((status, out), (status_a, out_a)) = both(&http);
    assert_eq!((status, status_a), (200, 200), "{out} {out_a}");
    assert_eq!(out["choices"][0]["text"], want["text"], "{out}");
    assert_eq!(out_a["choices"][0]["text"], want_a["text"], "{out_a}");
    let (status, metrics) = http::http(&http, "GET", "/metrics", Some(ADMIN), None);
    assert_eq!(status, 200, "{metrics}");
    let line = "tandem:worker_group_epoch{group=\"tp\",model=\"tiny\",formed=\"true\"} 2.0";
    assert!(metrics.lines().any(|l| l == line), "no {line:?} in\n{metrics}");

    // Removed: its members leave it and nothing serves "tiny" any more.
    let (status, out) = call(&http, "DELETE", "/v1/admin/groups/tp", None);
    assert_eq!(status, 200, "{out}");
    assert_eq!(call(&http, "DELETE", "/v1/admin/groups/tp", None).0, 404);
    let (status, out) = call(&http, "POST", "/v1/completions", Some(req));
    assert_eq!(status, 503, "{out}");
}

/// A seeded random LoRA adapter of every linear layer of the model in `model`, saved in
/// PEFT's format to `dir`; returns the folder.
fn save_adapter(model: &std::path::Path, dir: &std::path::Path) -> String {
    let whole = Model::load(model, Device::Cpu).unwrap();
    let Adapter::Lora(lora) = mixed_adapters(&whole).unwrap().remove(0) else { panic!("not a LoRA adapter") };
    lora.save(dir, &whole.config).unwrap();
    dir.to_str().unwrap().to_string()
}

/// `tandem generate --json` of `prompt` with the adapter in `adapter`, greedy.
fn generate_with_adapter(model: &std::path::Path, adapter: &str, prompt: &str, max_tokens: usize) -> Value {
    let (max, spec) = (max_tokens.to_string(), format!("a={adapter}"));
    let args = ["generate", "--model", model.to_str().unwrap(), "--adapter", &spec, "--use-adapter", "a"];
    let (ok, out, err) = TANDEM.run(&[&args[..], &["--prompt", prompt, "--max-tokens", &max, "--json"]].concat());
    assert!(ok, "{err}");
    serde_json::from_str(out.trim()).unwrap()
}

/// Proposes `command` to the cluster (as the operator's tools do), retried until applied.
fn propose(cluster: &MiniCluster, command: Command) {
    let reply =
        tandem_testkit::propose(&cluster.client(), Proposal::new(format!("test-{}", std::process::id()), command));
    assert!(!matches!(reply, Reply::Refused { .. }), "{reply:?}");
}

#[test]
fn a_group_whose_rank_0_dies_is_re_formed_around_its_follower() {
    let mut c = cluster("groups-rank0", "tiny", 3);
    let (model, http, coordinator) = (c.model.clone(), c.http().to_string(), c.coordinator.clone());
    // Placed with the CLI this time, as the operator.
    let operator = c.operator_args();
    let groups = |args: &[&str]| {
        let operator = operator.iter().map(String::as_str);
        TANDEM.run(&[&["groups", "--coordinator", &coordinator][..], &operator.collect::<Vec<_>>(), args].concat())
    };
    let (ok, out, err) = groups(&["create", "--model", "tiny", "--size", "2", "--group", "tp"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = groups(&["create", "--model", "tiny", "--size", "2", "--group", "tp"]);
    assert!(!ok && err.contains("exists already"), "{err}");
    formed(&http, 1);
    let (ok, out, err) = groups(&["list"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "group tp: model tiny epoch 1 formed, ranks 0=w1 1=w2");
    // Rank 0 dies while the group is idle: rank 1, waiting for the next plan, sees it go and
    // reports it; the spare w3 becomes rank 0 and serves.
    c.procs.kill(1);
    let group = formed(&http, 2);
    assert_eq!(workers_of(&group), ["w3", "w2"], "{group}");
    let want = TANDEM.generate_greedy(&model, "The cat sat on the", 12);
    let req = json!({"model": "tiny", "prompt": "The cat sat on the", "max_tokens": 12, "temperature": 0});
    let (status, out) = call(&http, "POST", "/v1/completions", Some(req));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], want["text"], "{out}");
    let (ok, out, err) = groups(&["rm", "tp"]);
    assert!(ok, "{out}{err}");
    assert_eq!(groups(&["list"]).1.trim(), "no worker groups");
}

#[test]
fn a_group_of_four_over_an_moe_model_replaces_the_rank_that_died() {
    let mut c = cluster("groups-moe", "tiny-moe", 5);
    let (dir, model, http) = (c.dir().to_path_buf(), c.model.clone(), c.http().to_string());
    let body = json!({"model": "tiny", "size": 4, "group": "tp", "expert_parallel": true});
    let (status, out) = call(&http, "POST", "/v1/admin/groups", Some(body));
    assert_eq!(status, 200, "{out}");
    assert_eq!(workers_of(&out), ["w1", "w2", "w3", "w4"]);
    assert_eq!(out["expert_parallel"], true, "{out}");
    formed(&http, 1);
    // Two whole experts on each of four ranks, tokens sent to them: the whole model's text.
    let want = TANDEM.generate_greedy(&model, "The cat sat on the", 12);
    let req = json!({"model": "tiny", "prompt": "The cat sat on the", "max_tokens": 12, "temperature": 0});
    let (status, out) = call(&http, "POST", "/v1/completions", Some(req.clone()));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], want["text"], "{out}");

    // Rank 2 dies mid-stream. Every other rank sees a failure; rank 0's report names rank 2,
    // and only rank 2 gives way to the spare w5.
    let (message, _) = kill_mid_stream(&http, &mut c.procs.0[3]);
    assert!(message.contains("rank 2"), "the error does not name rank 2: {message}");
    let group = formed(&http, 2);
    assert_eq!(workers_of(&group), ["w1", "w2", "w5", "w4"], "{group}");
    assert_eq!(group["expert_parallel"], true, "{group}");
    let (status, out) = call(&http, "POST", "/v1/completions", Some(req));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], want["text"], "{out}");

    // An ESFT job, its experts chosen from its data on the group (each rank routing a share of
    // the tokens), trains on the expert-parallel group; its adapter (ESFT experts on the ranks
    // of the experts they replace) then serves there as it does on the whole model.
    let (status, key) = call(&http, "POST", "/v1/admin/api-keys", Some(json!({"tenant": "alice"})));
    assert_eq!(status, 200, "{key}");
    let key = key["key"].as_str().unwrap();
    let lines: String = (0..24)
        .map(|i| format!("{}\n", json!({"prompt": format!("n{i} ="), "completion": format!(" {}", i % 5)})))
        .collect();
    let (status, file) = http::upload(&http, key, "train.jsonl", &lines);
    assert_eq!(status, 200, "{file}");
    let file: Value = serde_json::from_str(&file).unwrap();
    let esft = json!({"threshold": 0.3, "hyperparameters": {"n_epochs": 2, "batch_size": 4}});
    let create = json!({"model": "tiny", "training_file": file["id"], "method": {"type": "esft", "esft": esft}});
    let (status, job) = http::call_json(&http, "POST", "/v1/fine_tuning/jobs", key, Some(create));
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let job = wait_for(120, "the ESFT job to succeed", || {
        let (_, job) = http::call_json(&http, "GET", &format!("/v1/fine_tuning/jobs/{id}"), key, None);
        assert!(!["failed", "cancelled"].contains(&job["status"].as_str().unwrap()), "{job}");
        (job["status"] == "succeeded").then_some(job)
    });
    let adapter = dir.join("blobs").join("jobs").join(&id).join("adapter");
    assert!(adapter.join("esft_config.json").is_file(), "not an ESFT adapter: {}", adapter.display());
    let want = generate_with_adapter(&model, adapter.to_str().unwrap(), "n3 =", 6);
    let req = json!({"model": job["fine_tuned_model"], "prompt": "n3 =", "max_tokens": 6, "temperature": 0});
    let (status, out) = http::call_json(&http, "POST", "/v1/completions", key, Some(req));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], want["text"], "{out}");
}

#[test]
fn a_job_trains_on_a_group_and_resumes_from_its_checkpoint_when_a_rank_dies() {
    let mut c = cluster("groups-job", "tiny", 3);
    let (dir, model, http) = (c.dir().to_path_buf(), c.model.clone(), c.http().to_string());
    let (status, out) =
        call(&http, "POST", "/v1/admin/groups", Some(json!({"model": "tiny", "size": 2, "group": "tp"})));
    assert_eq!(status, 200, "{out}");
    formed(&http, 1);
    let (status, key) = call(&http, "POST", "/v1/admin/api-keys", Some(json!({"tenant": "alice"})));
    assert_eq!(status, 200, "{key}");
    let key = key["key"].as_str().unwrap().to_string();
    let as_alice = |method: &str, path: &str, body: Option<Value>| http::call_json(&http, method, path, &key, body);

    let jsonl = |n: usize| -> String {
        (0..n)
            .map(|i| format!("{}\n", json!({"prompt": format!("n{i} ="), "completion": format!(" {}", i % 7)})))
            .collect()
    };
    let mut files = Vec::new();
    for (name, lines) in [("train.jsonl", 48), ("valid.jsonl", 8)] {
        let (status, file) = http::upload(&http, &key, name, &jsonl(lines));
        assert_eq!(status, 200, "{file}");
        files.push(serde_json::from_str::<Value>(&file).unwrap()["id"].clone());
    }
    let create = json!({
        "model": "tiny", "training_file": files[0], "validation_file": files[1], "suffix": "g",
        "hyperparameters": {"n_epochs": 20, "batch_size": 4, "checkpoint_every": 10},
    });
    let (status, job) = as_alice("POST", "/v1/fine_tuning/jobs", Some(create));
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let messages = || http::job_events(&http, &key, &id);

    // Placed on rank 0 of the group; while it trains, the group answers requests.
    let checkpoint = wait_for(120, "a checkpoint", || {
        let (_, page) = as_alice("GET", &format!("/v1/fine_tuning/jobs/{id}/checkpoints"), None);
        page["data"].as_array().and_then(|d| d.last()).map(|c| c["step_number"].as_u64().unwrap())
    });
    assert!(messages().iter().any(|m| m == "Attempt 1 placed on worker w1"), "{:?}", messages());
    let req = json!({"model": "tiny", "prompt": "The cat sat on the", "max_tokens": 8, "temperature": 0});
    let (status, out) = as_alice("POST", "/v1/completions", Some(req));
    assert_eq!(status, 200, "{out}");
    let (_, job) = as_alice("GET", &format!("/v1/fine_tuning/jobs/{id}"), None);
    assert_eq!(job["status"], "running", "{job}");

    // Rank 1 dies: the group is re-formed with the spare, the job queued again and placed on
    // the new formation's rank 0, from a checkpoint, and it finishes.
    c.procs.kill(2);
    let group = formed(&http, 2);
    assert_eq!(workers_of(&group), ["w1", "w3"], "{group}");
    let job = wait_for(240, "the job to succeed", || {
        let (_, job) = as_alice("GET", &format!("/v1/fine_tuning/jobs/{id}"), None);
        assert!(!["failed", "cancelled"].contains(&job["status"].as_str().unwrap()), "{job}");
        (job["status"] == "succeeded").then_some(job)
    });
    assert_eq!(job["attempts"], 2, "{job}");
    let messages = messages();
    assert!(messages.iter().any(|m| m == "Attempt 1 ended: its worker group failed; queued again"), "{messages:?}");
    let resumed = messages.iter().find_map(|m| m.strip_prefix("Attempt 2 started training at step ")).unwrap();
    let resumed: u64 = resumed.parse().unwrap();
    assert!(resumed >= checkpoint && resumed.is_multiple_of(10), "resumed at {resumed}, checkpoint {checkpoint}");
    // Validated on the group at the end (a validation pass the follower joins).
    assert!(messages.iter().any(|m| m.starts_with("Step 240: validation loss=")), "{messages:?}");

    // The adapter serves on the group as it does on the whole model.
    let adapter = dir.join("blobs").join("jobs").join(&id).join("adapter");
    let want = generate_with_adapter(&model, adapter.to_str().unwrap(), "n3 =", 4);
    let name = job["fine_tuned_model"].as_str().unwrap();
    let req = json!({"model": name, "prompt": "n3 =", "max_tokens": 4, "temperature": 0});
    let (status, out) = as_alice("POST", "/v1/completions", Some(req));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], want["text"], "{out}");
}
