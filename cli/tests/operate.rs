//! Operating a running cluster from the CLI: base models registered, listed and removed (refused
//! while in use); a worker drained while it trains a job, which it hands off at a checkpoint to
//! the other worker (resumed from there, not counted as a retry) while completions go on being
//! answered; then put back in service.

#![allow(clippy::unwrap_used)]

mod common;

use serde_json::{Value, json};
use tandem_testkit::http::{self, call_json as call};
use tandem_testkit::{MiniCluster, wait_for};

use common::TANDEM;

const ADMIN: &str = "sk-admin-operate";

/// `tandem ARGS` as the cluster's operator: (success, stdout, stderr).
fn tandem(cluster: &MiniCluster, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(["--coordinator".into(), cluster.coordinator.clone()]);
    all.extend(cluster.operator_args());
    TANDEM.run(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn models_are_managed_and_a_drained_worker_hands_its_job_off_at_a_checkpoint() {
    let cluster = MiniCluster::builder(TANDEM, "operate").gateway(ADMIN).workers(2).start();
    let http = cluster.http().to_string();
    let model = cluster.model.to_str().unwrap().to_string();

    // Models from the CLI: a folder that is not a model is refused before anything is written.
    let (ok, _, err) = tandem(&cluster, &["models", "register", "bad", "--path", cluster.dir().to_str().unwrap()]);
    assert!(!ok && err.contains("is not a model folder"), "{err}");
    let (ok, out, err) = tandem(&cluster, &["models", "register", "tiny", "--path", &model]);
    assert!(ok, "{err}");
    assert!(out.contains("model tiny registered"), "{out}");
    cluster.wait_alive(2);
    let (ok, out, _) = tandem(&cluster, &["models", "register", "second", "--path", &model]);
    assert!(ok, "{out}");
    let (_, out, _) = tandem(&cluster, &["models", "list"]);
    assert!(out.contains(&format!("model tiny: {model} (workers w1 w2)")), "{out}");
    assert!(out.contains(&format!("model second: {model} (served by none)")), "{out}");
    let (ok, _, err) = tandem(&cluster, &["models", "remove", "tiny"]);
    assert!(!ok && err.contains("in use by worker w1, worker w2"), "{err}");
    let (ok, _, err) = tandem(&cluster, &["models", "remove", "second"]);
    assert!(ok, "{err}");
    assert!(!tandem(&cluster, &["models", "list"]).1.contains("second"));

    // A job that checkpoints every 10 steps, running on one of the two workers.
    let key = http::tenant_key(&http, ADMIN, "alice");
    let lines: String = (0..32)
        .map(|i| format!("{}\n", json!({"prompt": format!("n{i} ="), "completion": format!(" {}", i % 5)})))
        .collect();
    let (status, file) = http::upload(&http, &key, "train.jsonl", &lines);
    assert_eq!(status, 200, "{file}");
    let file: Value = serde_json::from_str(&file).unwrap();
    let create = json!({
        "model": "tiny", "training_file": file["id"], "suffix": "d",
        "hyperparameters": {"n_epochs": 100, "batch_size": 4, "checkpoint_every": 10},
    });
    let (status, job) = call(&http, "POST", "/v1/fine_tuning/jobs", &key, Some(create));
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let get_job = || call(&http, "GET", &format!("/v1/fine_tuning/jobs/{id}"), &key, None).1;
    let steps = || {
        let events = http::job_events(&http, &key, &id);
        events.iter().filter_map(|m| m.strip_prefix("Step ")?.split('/').next()?.parse::<u64>().ok()).max()
    };
    wait_for(120, "the job to train a few steps", || steps().filter(|&s| s >= 3));
    let placed = http::job_events(&http, &key, &id);
    let first = placed.iter().find_map(|m| m.strip_prefix("Attempt 1 placed on worker ")).unwrap().to_string();
    let other = if first == "w1" { "w2" } else { "w1" };

    // Drained: it hands the job off (a checkpoint at its current step) and takes no new work.
    let (ok, out, err) = tandem(&cluster, &["workers", "drain", &first, "--wait", "60"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("worker {first} drained")), "{out}");
    let (_, out, _) = tandem(&cluster, &["workers", "list"]);
    assert!(out.contains(&format!("worker {first}: draining")), "{out}");
    for _ in 0..4 {
        let req = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2});
        let (status, out) = call(&http, "POST", "/v1/completions", &key, Some(req));
        assert_eq!(status, 200, "the other worker answers: {out}");
    }

    let job = wait_for(240, "the job to succeed", || {
        let job = get_job();
        assert!(!["failed", "cancelled"].contains(&job["status"].as_str().unwrap()), "{job}");
        (job["status"] == "succeeded").then_some(job)
    });
    let messages = http::job_events(&http, &key, &id);
    let handed = messages.iter().find(|m| m.starts_with("Attempt 1 ended: handed off by draining worker")).unwrap();
    let from: u64 = handed.split("from step ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    assert!(from >= 3, "handed off at the step it had reached, {from}: {messages:?}");
    assert!(messages.iter().any(|m| m == &format!("Attempt 2 placed on worker {other}")), "{messages:?}");
    let resumed = messages.iter().find_map(|m| m.strip_prefix("Attempt 2 started training at step ")).unwrap();
    assert_eq!(resumed.parse::<u64>().unwrap(), from, "resumed where it was handed off: {messages:?}");
    assert_eq!(job["attempts"], 2, "{job}");

    let (ok, out, err) = tandem(&cluster, &["workers", "undrain", &first]);
    assert!(ok, "{err}");
    assert!(out.contains("back in service"), "{out}");
    let (_, out, _) = tandem(&cluster, &["workers", "list"]);
    assert!(out.contains(&format!("worker {first}: serving")), "{out}");
    let (ok, _, err) = tandem(&cluster, &["workers", "drain", "w9"]);
    assert!(!ok && err.contains("no worker \"w9\""), "{err}");
}

/// The gateway routes from a view of the state up to 200 ms old. A worker put back in service
/// and another drained and stopped within that time leave the view naming only the stopped one:
/// the request goes to the one back in service, found by a fresh read, and is answered.
#[test]
fn a_request_routed_by_a_stale_view_to_a_stopped_worker_goes_to_the_one_back_in_service() {
    use tandem_proto::contract::{Command, Proposal};
    let mut cluster = MiniCluster::builder(TANDEM, "stale-view").gateway(ADMIN).workers(3).start();
    let http = cluster.http().to_string();
    cluster.register_model("tiny");
    cluster.wait_alive(3);
    let key = http::tenant_key(&http, ADMIN, "alice");
    // A client of its own each time: the testkit's proposing runtime lasts one call.
    let drain = |cluster: &MiniCluster, id: &str, drain: bool| {
        let request_id = tandem_proto::contract::fresh_id(&format!("drain-{id}"));
        let p = Proposal::new(request_id, Command::DrainWorker { id: id.into(), drain });
        tandem_testkit::propose(&cluster.client(), p);
    };
    // w1 is stopped while w2 comes back, then w2 while w3 comes back.
    for (stopped, back) in [(1, 2), (2, 3)] {
        let (stopped_id, back_id) = (format!("w{stopped}"), format!("w{back}"));
        // Out of service long enough for every view to know it.
        drain(&cluster, &back_id, true);
        std::thread::sleep(std::time::Duration::from_millis(600));
        // Then at once: one back, the other drained and stopped, a request.
        drain(&cluster, &back_id, false);
        drain(&cluster, &stopped_id, true);
        let process = &mut cluster.procs.0[stopped];
        process.kill().unwrap();
        process.wait().unwrap();
        let req = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2});
        let (status, out) = call(&http, "POST", "/v1/completions", &key, Some(req));
        assert_eq!(status, 200, "{stopped_id} stopped, {back_id} back: {out}");
    }
}
