//! The `tandem` binary end to end: `init-model` then `generate`, and a `--requests` workload
//! mixing adapters whose greedy outputs must equal transformers + PEFT's.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

mod common;

use std::path::Path;

use common::TANDEM;
use serde_json::Value;
use tandem_testkit::Scratch;

#[test]
fn init_model_then_generate_from_text() {
    let dir = Scratch::new("tiny");
    let (ok, _, err) = TANDEM.run(&["init-model", "--preset", "tiny", "--out", dir.to_str().unwrap(), "--seed", "7"]);
    assert!(ok, "{err}");
    let (ok, out, err) = TANDEM.run(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello world",
        "--max-tokens",
        "5",
        "--logprobs",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 5);
    assert!(v["logprobs"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap() <= 0.0));
    assert!(v["text"].is_string());
}

#[test]
fn a_requests_file_mixing_adapters_reproduces_the_oracle() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures/mixtral");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap()).unwrap();
    let requests = reference["requests"].as_array().unwrap();
    let dir = Scratch::new("requests");
    std::fs::create_dir_all(&dir).unwrap();
    let lines: Vec<String> = requests
        .iter()
        .map(|r| {
            let adapter = r["adapter"].as_str().map(|a| a.replace("esft:", "esft-"));
            serde_json::json!({ "prompt_ids": r["prompt_ids"], "adapter": adapter, "max_tokens": 16 }).to_string()
        })
        .collect();
    let file = dir.join("requests.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let mut args = vec!["generate".to_string(), "--model".into(), fixture.display().to_string()];
    for sub in ["adapters", "esft"] {
        for entry in std::fs::read_dir(fixture.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let name = if sub == "esft" { format!("esft-{name}") } else { name };
            args.extend(["--adapter".into(), format!("{name}={}", path.display())]);
        }
    }
    args.extend(["--requests".into(), file.display().to_string(), "--json".into()]);
    let (ok, out, err) = TANDEM.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let outputs: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(outputs.len(), requests.len());
    for (r, o) in requests.iter().zip(&outputs) {
        // The model's EOS may appear in the reference (generated with EOS disabled); compare up
        // to where ours stopped on it.
        let want: Vec<u64> = r["greedy"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let got: Vec<u64> = o["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(got[..], want[..got.len()], "adapter {}", r["adapter"]);
        assert!(got.len() == want.len() || o["finish_reason"] == "stop", "{o}");
    }
}

#[test]
fn bad_arguments_get_clear_errors() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures/llama");
    let model = fixture.to_str().unwrap();
    let (ok, _, err) = TANDEM.run(&["generate", "--model", model, "--prompt-ids", "1,2", "--use-adapter", "nope"]);
    assert!(!ok && err.contains("unknown adapter"), "{err}");
    let (ok, _, err) = TANDEM.run(&["generate", "--model", model, "--prompt", "hi"]);
    assert!(!ok && err.contains("tokenizer.json"), "{err}");
    let (ok, _, err) = TANDEM.run(&["generate", "--model", "/nonexistent", "--prompt-ids", "1"]);
    assert!(!ok && err.contains("/nonexistent"), "{err}");
    let (ok, _, err) = TANDEM.run(&["init-model", "--preset", "huge", "--out", "/tmp/x"]);
    assert!(!ok && err.contains("tiny"), "{err}");
}
