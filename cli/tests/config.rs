//! The processes' settings from a TOML file, TANDEM_* variables and flags: a flag wins over a
//! variable, a variable over the file; a bad key or value is refused at start naming it; `tandem
//! config check` prints the settings in effect and where each came from.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures/llama")
}

/// A config file named `name` holding `text`, in a folder of this test's own.
fn file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `tandem ARGS` with the variables `env` (and no other TANDEM_* variable of the caller's).
fn tandem(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TANDEM_")) {
        command.env_remove(key);
    }
    command.args(args).envs(env.iter().copied()).env("RUST_BACKTRACE", "0").output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A whole-model worker's file, with `extra` lines.
fn worker_file(name: &str, extra: &str) -> PathBuf {
    let model = fixture().display().to_string();
    file(
        name,
        &format!(
            "id = \"w1\"\nlisten = \"127.0.0.1:1\"\ncoordinator = \"127.0.0.1:2\"\nmodel = {model:?}\nblobs = \"/tmp\"\n\
             insecure = true\nadapter = [\"a=/x/a\", \"b=/x/b\"]\npool-pages = 4096\n{extra}"
        ),
    )
}

#[test]
fn check_prints_each_setting_with_its_source_and_a_variable_wins_over_the_file() {
    let path = worker_file("check.toml", "max-queue = 99\n");
    let out = tandem(&["config", "check", path.to_str().unwrap()], &[("TANDEM_MAX_QUEUE", "7")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("# tandem worker"), "the process is inferred from the keys: {text}");
    for line in [
        "pool-pages = 4096  # file",
        "max-queue = 7  # TANDEM_MAX_QUEUE",
        "max-batch-tokens = 512  # default",
        "adapter = [\"a=/x/a\", \"b=/x/b\"]  # file",
        "insecure = true  # file",
        "# max-model-len: unset",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
    }
    // What it prints is itself a valid config file of the same settings.
    let again = file("again.toml", &text);
    let out = tandem(&["config", "check", again.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).lines().any(|l| l == "max-queue = 7  # file"), "{}", stdout(&out));
}

#[test]
fn at_start_a_flag_wins_over_a_variable_and_a_variable_over_the_file() {
    let path = worker_file("start.toml", "");
    let config = path.to_str().unwrap();
    // The model folder is the first thing a worker reads: its error names the one in effect.
    let from_env = tandem(&["worker", "--config", config], &[("TANDEM_MODEL", "/from-env")]);
    assert!(!from_env.status.success());
    assert!(stderr(&from_env).contains("/from-env"), "{}", stderr(&from_env));
    let from_flag = tandem(&["worker", "--config", config, "--model", "/from-flag"], &[("TANDEM_MODEL", "/from-env")]);
    assert!(stderr(&from_flag).contains("/from-flag"), "{}", stderr(&from_flag));
    // Set by a variable, a key the file sets too is the variable's alone (lists are not merged).
    let out = tandem(&["config", "check", config, "--process", "worker"], &[("TANDEM_ADAPTER", "c=/x/c")]);
    assert!(stdout(&out).lines().any(|l| l == "adapter = [\"c=/x/c\"]  # TANDEM_ADAPTER"), "{}", stdout(&out));
}

#[test]
fn bad_keys_and_values_are_refused_at_start_naming_the_key() {
    type Case = (&'static str, &'static str, &'static [(&'static str, &'static str)], &'static str);
    let cases: [Case; 6] = [
        ("zero.toml", "page-tokens = 0\n", &[], "key `page-tokens`"),
        ("words.toml", "max-running = \"many\"\n", &[], "key `max-running`"),
        ("unknown.toml", "pool-size = 3\n", &[], "unknown key `pool-size`"),
        ("share.toml", "", &[("TANDEM_POOL_PAGES", "120%")], "TANDEM_POOL_PAGES"),
        ("switch.toml", "join = 1\n", &[], "key `join`"),
        // The model's context (256 tokens) bounds the longest request.
        ("long.toml", "max-model-len = 300\n", &[], "--max-model-len 300 is past the model's context of 256"),
    ];
    for (name, extra, env, expected) in cases {
        let path = worker_file(name, extra);
        let out = tandem(&["worker", "--config", path.to_str().unwrap()], env);
        assert!(!out.status.success(), "{name}");
        assert!(stderr(&out).contains(expected), "{name}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{name}: {}", stderr(&out));
    }
}

#[test]
fn a_coordinators_file_is_checked_as_a_coordinators() {
    let good =
        file("c1.toml", "id = 1\npeers = \"1=127.0.0.1:7400,2=127.0.0.1:7401\"\ndata-dir = \"/var/lib/tandem\"\n");
    let out = tandem(&["config", "check", good.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("# tandem coordinator"), "{}", stdout(&out));
    assert!(stdout(&out).lines().any(|l| l == "data-dir = \"/var/lib/tandem\"  # file"), "{}", stdout(&out));

    let stranger = file("c9.toml", "id = 9\npeers = \"1=127.0.0.1:7400\"\ndata-dir = \"/d\"\n");
    let out = tandem(&["config", "check", stranger.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--id 9 is not one of --peers"), "{}", stderr(&out));

    let missing = file("c0.toml", "peers = \"1=127.0.0.1:7400\"\ndata-dir = \"/d\"\n");
    let out = tandem(&["config", "check", missing.to_str().unwrap(), "--process", "coordinator"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--id"), "{}", stderr(&out));
}
