//! `tandem finetune` end to end on the shipped synthetic task (`data/reverse`: reverse a short
//! sequence of letters, a rule a random-weight base cannot know): the loss falls, greedy
//! generation with the trained adapter reverses held-out sequences it never saw, and the
//! exported adapter serves through `tandem generate`. The default ("auto") settings learn it,
//! and two tasks of other sizes (`data/labels`: 16 examples to memorise; `data/sort`: a rule
//! from 1000). Bad data is a clear error.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

mod common;

use std::path::Path;

use common::TANDEM;
use serde_json::Value;
use tandem_testkit::Scratch;

fn data(file: &str) -> String {
    task("reverse", file)
}

fn task(name: &str, file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data").join(name).join(file).to_str().unwrap().to_string()
}

fn init(preset: &str, dir: &Path) {
    let (ok, _, err) = TANDEM.run(&["init-model", "--preset", preset, "--out", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
}

#[test]
fn learns_to_reverse_held_out_sequences() {
    let dir = Scratch::new("learn");
    let (model, out) = (dir.join("small"), dir.join("run"));
    init("small", &model);
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let (ok, stdout, err) = TANDEM.run(&[
        "finetune",
        "--model",
        m,
        "--data",
        &data("train.jsonl"),
        "--validation",
        &data("valid.jsonl"),
        "--test",
        &data("test.jsonl"),
        "--out",
        o,
        "--checkpoint-every",
        "200",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("held-out exact match"), "{stdout}");
    // The default settings, chosen from the data (`train::auto`).
    assert!(stdout.contains("4000 examples, 2 epochs of batch 16, lr 1.00e-3: 500 steps"), "{stdout}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let (first, last) = (summary["first_loss"].as_f64().unwrap(), summary["last_loss"].as_f64().unwrap());
    assert!(last < first / 3.0, "loss {first} -> {last}");
    assert!(summary["validation_loss"].as_f64().unwrap() < first / 3.0);
    let right = summary["test_exact"][0].as_u64().unwrap();
    let total = summary["test_exact"][1].as_u64().unwrap();
    assert_eq!(total, 200);
    assert!(right * 100 >= total * 95, "held-out exact match {right}/{total} is below 95%");
    for step in ["step-000200", "step-000400", "step-000500"] {
        assert!(out.join("checkpoints").join(step).join("state.json").exists(), "{step}");
    }
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"grad_norm\"")).count(), 500);

    // The exported PEFT adapter serves: a held-out sequence, reversed.
    let first_test: Value =
        serde_json::from_str(std::fs::read_to_string(data("test.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let adapter = format!("rev={}", out.join("adapter").display());
    let (ok, text, err) = TANDEM.run(&[
        "generate",
        "--model",
        m,
        "--adapter",
        &adapter,
        "--use-adapter",
        "rev",
        "--prompt",
        first_test["prompt"].as_str().unwrap(),
        "--max-tokens",
        "16",
    ]);
    assert!(ok, "{err}");
    assert_eq!(text.trim_end_matches('\n'), first_test["completion"].as_str().unwrap());

    // Resuming with other settings is refused, naming the checkpoint.
    let (ok, _, err) =
        TANDEM.run(&["finetune", "--model", m, "--data", &data("train.jsonl"), "--out", o, "--lr", "5e-4", "--resume"]);
    assert!(!ok);
    assert!(err.contains("step-000500") && err.contains("other settings"), "{err}");
}

/// The share of `test` the default settings get exactly right after training on `train`.
fn default_exact_match(model: &Path, out: &Path, train: &str, test: &str) -> (u64, u64) {
    let args = ["finetune", "--model", model.to_str().unwrap(), "--data", train, "--test", test];
    let (ok, stdout, err) =
        TANDEM.run(&[&args[..], &["--out", out.to_str().unwrap(), "--checkpoint-every", "0"]].concat());
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let right = summary["test_exact"][0].as_u64().unwrap();
    let total = summary["test_exact"][1].as_u64().unwrap();
    assert!(right * 100 >= total * 90, "{train}: {right}/{total} exactly right: {stdout}");
    (right, total)
}

#[test]
fn the_default_settings_learn_tasks_of_other_sizes() {
    let dir = Scratch::new("auto");
    let model = dir.join("small");
    init("small", &model);
    let labels = task("labels", "train.jsonl");
    assert_eq!(default_exact_match(&model, &dir.join("labels"), &labels, &labels).1, 16);
    let (train, test) = (task("sort", "train.jsonl"), task("sort", "test.jsonl"));
    assert_eq!(default_exact_match(&model, &dir.join("sort"), &train, &test).1, 100);
}

#[test]
fn a_bad_line_is_an_error_naming_its_line_and_field() {
    let dir = Scratch::new("bad");
    let model = dir.join("tiny");
    init("tiny", &model);
    let file = dir.join("bad.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"a\", \"completion\": \" b\"}\n{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let (ok, _, err) = TANDEM.run(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        file.to_str().unwrap(),
        "--out",
        dir.join("out").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("bad.jsonl:2") && err.contains("messages[0].role"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
