//! Helpers shared by the tests that run the `tandem` binary.

#![allow(dead_code)] // each test file uses its own share of these

use std::net::TcpListener;
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
