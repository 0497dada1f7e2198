//! A fine-tuning job through the gateway on a cluster of two workers: the worker training it
//! is killed after a checkpoint; the coordinator places the job again (a new epoch) on the
//! other worker, which resumes from that checkpoint and finishes; the tenant's adapter then
//! serves.

#![allow(clippy::unwrap_used)]

mod common;

use serde_json::{Value, json};
use tandem_testkit::http::{self, call_json as call};
use tandem_testkit::{MiniCluster, wait_for};

use common::TANDEM;

const ADMIN: &str = "sk-admin-failover";

#[test]
fn a_job_whose_worker_dies_resumes_from_its_checkpoint_on_another() {
    let mut cluster = MiniCluster::builder(TANDEM, "job-failover").gateway(ADMIN).workers(2).start();
    let http = cluster.http().to_string();
    cluster.register_model("tiny");
    cluster.wait_alive(2);
    let key = http::tenant_key(&http, ADMIN, "alice");

    let lines: String = (0..64)
        .map(|i| format!("{}\n", json!({"prompt": format!("n{i} ="), "completion": format!(" {}", i % 7)})))
        .collect();
    let (status, file) = http::upload(&http, &key, "train.jsonl", &lines);
    assert_eq!(status, 200, "{file}");
    let file: Value = serde_json::from_str(&file).unwrap();
    let create = json!({
        "model": "tiny", "training_file": file["id"], "suffix": "f",
        "hyperparameters": {"n_epochs": 40, "batch_size": 4, "checkpoint_every": 10},
    });
    let (status, job) = call(&http, "POST", "/v1/fine_tuning/jobs", &key, Some(create));
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let events = |key: &str| http::job_events(&http, key, &id);

    // Its first checkpoint; then the worker training it dies.
    let checkpoint = wait_for(120, "a checkpoint", || {
        let (_, page) = call(&http, "GET", &format!("/v1/fine_tuning/jobs/{id}/checkpoints"), &key, None);
        page["data"].as_array().and_then(|d| d.last()).map(|c| c["step_number"].as_u64().unwrap())
    });
    let placed = events(&key).into_iter().find(|m| m.starts_with("Attempt 1 placed on worker ")).unwrap();
    let first = placed.trim_start_matches("Attempt 1 placed on worker ").to_string();
    let index: usize = first.trim_start_matches('w').parse().unwrap();
    let (_, job) = call(&http, "GET", &format!("/v1/fine_tuning/jobs/{id}"), &key, None);
    assert_eq!(job["status"], "running", "{job}");
    cluster.procs.0[index].kill().unwrap();
    cluster.procs.0[index].wait().unwrap();
    // Until its lease runs out the dead worker is still listed: requests sent its way are
    // retried on the other (nothing was streamed yet), so every one is answered.
    for _ in 0..4 {
        let req = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2});
        let (status, out) = call(&http, "POST", "/v1/completions", &key, Some(req));
        assert_eq!(status, 200, "{out}");
    }

    // Placed again on the other worker, from a checkpoint at or after the one seen, and done.
    let job = wait_for(180, "the job to succeed", || {
        let (_, job) = call(&http, "GET", &format!("/v1/fine_tuning/jobs/{id}"), &key, None);
        assert!(!["failed", "cancelled"].contains(&job["status"].as_str().unwrap()), "{job}");
        (job["status"] == "succeeded").then_some(job)
    });
    assert_eq!(job["attempts"], 2, "{job}");
    // Every step's tokens once, the steps done again after the resume included: the same
    // tokens each epoch, at least three an example.
    let trained = job["trained_tokens"].as_u64().unwrap();
    assert!(trained.is_multiple_of(40) && trained >= 40 * 64 * 3, "{job}");
    // As asked; the learning rate, left "auto", follows the batch: sqrt(4 / 16).
    assert_eq!(job["hyperparameters"], json!({"n_epochs": 40, "batch_size": 4, "learning_rate_multiplier": 0.5}));
    let messages = events(&key);
    let other = if first == "w1" { "w2" } else { "w1" };
    assert!(messages.iter().any(|m| m == &format!("Attempt 2 placed on worker {other}")), "{messages:?}");
    let resumed = messages.iter().find_map(|m| m.strip_prefix("Attempt 2 started training at step ")).unwrap();
    let resumed: u64 = resumed.parse().unwrap();
    assert!(resumed >= checkpoint && resumed.is_multiple_of(10), "resumed at {resumed}, first checkpoint {checkpoint}");

    // The tenant's adapter serves, and so does each checkpoint under the name the job lists
    // it by; another tenant can call neither.
    let model = job["fine_tuned_model"].as_str().unwrap();
    let (_, page) = call(&http, "GET", &format!("/v1/fine_tuning/jobs/{id}/checkpoints"), &key, None);
    let checkpoint = page["data"][0]["fine_tuned_model_checkpoint"].as_str().unwrap().to_string();
    assert_eq!(checkpoint, format!("{model}:ckpt-step-{}", page["data"][0]["step_number"]));
    let bob = http::tenant_key(&http, ADMIN, "bob");
    for model in [model, &checkpoint] {
        let req = json!({"model": model, "prompt": "n3 =", "max_tokens": 2, "temperature": 0});
        let (status, out) = call(&http, "POST", "/v1/completions", &key, Some(req.clone()));
        assert_eq!(status, 200, "{out}");
        let (status, found) = call(&http, "GET", &format!("/v1/models/{model}"), &key, None);
        assert_eq!((status, found["id"].as_str()), (200, Some(model)), "{found}");
        let (status, out) = call(&http, "POST", "/v1/completions", &bob, Some(req));
        assert_eq!((status, out["error"]["code"].as_str()), (404, Some("model_not_found")), "{out}");
    }
    let step = |name: &str| name.rsplit_once(":ckpt-step-").map(|(a, _)| format!("{a}:ckpt-step-999999"));
    let req = json!({"model": step(&checkpoint), "prompt": "n3 =", "max_tokens": 2});
    let (status, _) = call(&http, "POST", "/v1/completions", &key, Some(req));
    assert_eq!(status, 404, "a step with no checkpoint");

    // Metrics: the operator's only; series per tenant and model, and per job.
    assert_eq!(http::http(&http, "GET", "/metrics", Some(&bob), None).0, 403);
    let (status, text) = http::http(&http, "GET", "/metrics", Some(ADMIN), None);
    assert_eq!(status, 200, "{text}");
    // Labels are bounded: the base model, not the name asked for (alice's four requests to the
    // base, one to her adapter and one to its checkpoint); an unknown name is "unresolved".
    let served = "tandem:requests_total{tenant=\"alice\",model=\"tiny\",code=\"200\"} 6".to_string();
    let missing = "tandem:requests_total{tenant=\"bob\",model=\"unresolved\",code=\"404\"} 2".to_string();
    let adapter = format!("tandem:adapter_requests{{adapter=\"alice:{model}\"}} 1.0");
    let steps = format!("tandem:job_step{{job=\"{id}\",tenant=\"alice\"}} 640.0");
    for line in [&served, &missing, &adapter, &steps, &"tandem:workers{state=\"dead\"} 1.0".to_string()] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
}
