//! A real etcd server for a test: a child process on free loopback ports with its own data
//! folder, killed when dropped. A missing `etcd` binary fails the test: the etcd store is only
//! tested against the real thing.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::free_port;
use crate::process::Scratch;

/// How long etcd may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Etcd {
    child: Option<Child>,
    /// Dropped after etcd is killed (see `Drop`).
    dir: Scratch,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts a one-member etcd in a scratch folder named after the test (`etcd-<test>`) and
    /// waits until it answers.
    pub fn start(test: &str) -> Etcd {
        let dir = Scratch::new(&format!("etcd-{test}"));
        let (client_port, peer_port) = (free_port(), free_port());
        let mut etcd = Etcd { child: None, dir, client_port, peer_port };
        etcd.launch();
        etcd
    }

    /// The URL `EtcdStore::connect` takes.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// The endpoint etcd-client takes.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// SIGKILL: what etcd had not fsynced is lost, as in a power cut.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same data and ports.
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    fn launch(&mut self) {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let log = File::options().create(true).append(true).open(self.dir.join("etcd.log")).unwrap();
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let spawned = Command::new(&bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn();
        match spawned {
            Ok(child) => self.child = Some(child),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{bin}` not found: the etcd store tests need a real etcd server. Install Debian's \
                 etcd-server (`apt-get install etcd-server`) or set ETCD_BIN to an etcd binary."
            ),
            Err(e) => panic!("cannot start `{bin}`: {e}"),
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.healthy() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("etcd exited ({status}) at start:\n{}", self.log_tail());
            }
            assert!(Instant::now() < deadline, "etcd did not answer within {START_TIMEOUT:?}:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether etcd answers `/health` with a leader.
    fn healthy(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port));
        let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        let mut response = String::new();
        conn.write_all(request.as_bytes()).is_ok()
            && conn.read_to_string(&mut response).is_ok()
            && response.contains("\"health\":\"true\"")
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill9();
        // Its write-ahead log preallocates tens of MiB: gone even when the test failed (the
        // scratch folder keeps etcd.log then).
        let _ = fs::remove_dir_all(self.dir.join("data"));
    }
}
