//! Helpers shared by the tests that run the `tandem` binary.

use std::path::PathBuf;
use std::process::Command;

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
