//! The pieces every process test needs: the binary (only the test crate that builds it knows
//! its path, so the test hands it in), children that die with the test however it ends,
//! scratch folders that go with it, free loopback ports, and polling with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_proto::ClusterClient;
use tandem_proto::contract::{Proposal, Reply};

/// The `tandem` binary under test: `Tandem::new(env!("CARGO_BIN_EXE_tandem"))` in a test of
/// the `tandem` crate (a path known at run time can be leaked to `'static`).
#[derive(Clone, Copy, Debug)]
pub struct Tandem {
    bin: &'static str,
}

impl Tandem {
    pub const fn new(bin: &'static str) -> Self {
        Tandem { bin }
    }

    /// A command for the binary, for tests that set its pipes or environment themselves.
    pub fn command(&self) -> Command {
        Command::new(self.bin)
    }

    /// Runs `tandem args...` to its end: (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.command().args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `tandem args...` in the background; its output is shown only with
    /// `TANDEM_TEST_LOGS` set (a cluster's logs would drown the test's).
    pub fn spawn(&self, args: &[&str]) -> Child {
        let quiet = std::env::var_os("TANDEM_TEST_LOGS").is_none();
        let out = || if quiet { Stdio::null() } else { Stdio::inherit() };
        self.command().args(args).stdout(out()).stderr(out()).spawn().unwrap()
    }

    /// [`Tandem::spawn`], its output written to `log` instead (shown with `TANDEM_TEST_LOGS`
    /// all the same), where a test reads it and a failed test's kept folder keeps it.
    pub fn spawn_logged(&self, args: &[&str], log: &Path) -> Child {
        if std::env::var_os("TANDEM_TEST_LOGS").is_some() {
            return self.spawn(args);
        }
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let file = std::fs::File::create(log).unwrap();
        self.command().args(args).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap()
    }

    /// `tandem init-model --preset <preset> --out <out>`: a random-weight model.
    pub fn init_model(&self, preset: &str, out: &Path) {
        let (ok, _, err) = self.run(&["init-model", "--preset", preset, "--out", out.to_str().unwrap()]);
        assert!(ok, "init-model --preset {preset}: {err}");
    }

    /// `tandem generate --json --logprobs` of `prompt`, greedy, on the model in `model`: what a
    /// served completion must equal.
    pub fn generate_greedy(&self, model: &Path, prompt: &str, max_tokens: usize) -> serde_json::Value {
        let max = max_tokens.to_string();
        let model = model.to_str().unwrap();
        let args = ["generate", "--model", model, "--prompt", prompt, "--max-tokens", &max, "--json", "--logprobs"];
        let (ok, out, err) = self.run(&args);
        assert!(ok, "{err}");
        serde_json::from_str(out.trim()).unwrap()
    }
}

/// Processes killed when the test ends, however it ends.
#[derive(Default)]
pub struct Procs(pub Vec<Child>);

impl Procs {
    /// Kills process `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.0[i].kill().unwrap();
        self.0[i].wait().unwrap();
    }

    /// Asks process `i` to stop (SIGTERM), as a service manager does, and waits up to 20 s for
    /// it to exit; whether it exited cleanly.
    pub fn terminate(&mut self, i: usize) -> bool {
        let child = &mut self.0[i];
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A folder for one test, empty at the start and removed when dropped; kept when the test is
/// failing (a panic is unwinding), so its logs and data can be read.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// `tandem-test-<tag>-<pid>` under the system's temporary folder.
    pub fn new(tag: &str) -> Self {
        Scratch::at(std::env::temp_dir().join(format!("tandem-test-{tag}-{}", std::process::id())))
    }

    /// The folder `path` (emptied first).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} (the test failed)", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Polls `check` every 100 ms until it returns something, failing after `secs` seconds.
pub fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Proposes `p` through `client`, as an operator's tool does, retried (the same request id: it
/// applies once) until a coordinator answers, for up to 30 s.
pub fn propose(client: &ClusterClient, p: Proposal) -> Reply {
    let rt = tokio::runtime::Runtime::new().unwrap();
    wait_for(30, &format!("coordinator {} to take proposal {}", client.addr(), p.request_id), || {
        rt.block_on(client.propose_as(p.clone())).ok()
    })
}

/// Writes `secret` to `path` with mode 0600, as `tandem` reads a key file (it refuses one that
/// others may read).
pub fn secret_file(path: &Path, secret: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).unwrap();
    std::io::Write::write_all(&mut f, secret.as_bytes()).unwrap();
    path.to_path_buf()
}
