//! A real etcd server for a test: a child process on free loopback ports with its own data
//! folder, killed when dropped; in plain text, or requiring TLS client certificates of a CA of
//! its own ([`Etcd::start_tls`]). A missing `etcd` binary fails the test: the etcd store is only
//! tested against the real thing.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
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
    /// Where it answers `/health` in plain text, whatever its clients' port speaks.
    metrics_port: u16,
    tls: bool,
}

/// The PEM files of an etcd that requires client certificates: its CA, a client's certificate
/// and key (0600) signed by it, and another CA's client pair, which etcd refuses.
pub struct EtcdClientFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

impl Etcd {
    /// Starts a one-member etcd in a scratch folder named after the test (`etcd-<test>`) and
    /// waits until it answers.
    pub fn start(test: &str) -> Etcd {
        let mut etcd = Self::new(test, false);
        etcd.launch();
        etcd
    }

    /// [`Etcd::start`], serving its clients over TLS only and only those with a certificate of
    /// its CA (`--client-cert-auth`); the PEM files live in its folder.
    pub fn start_tls(test: &str) -> (Etcd, EtcdClientFiles) {
        let mut etcd = Self::new(test, true);
        let files = etcd_pki(&etcd.dir);
        etcd.launch();
        (etcd, files)
    }

    fn new(test: &str, tls: bool) -> Etcd {
        let dir = Scratch::new(&format!("etcd-{test}"));
        let (client_port, peer_port, metrics_port) = (free_port(), free_port(), free_port());
        Etcd { child: None, dir, client_port, peer_port, metrics_port, tls }
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
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let metrics = format!("http://127.0.0.1:{}", self.metrics_port);
        let mut cmd = Command::new(&bin);
        if self.tls {
            let file = |name: &str| self.dir.join(name).to_string_lossy().into_owned();
            cmd.args(["--client-cert-auth", "--trusted-ca-file", &file("ca.pem")]);
            cmd.args(["--cert-file", &file("server.pem"), "--key-file", &file("server.key")]);
        }
        let spawned = cmd
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-metrics-urls", &metrics])
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
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics_port));
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

/// A CA with a server certificate for 127.0.0.1 and a client certificate, and another CA's client
/// certificate, written into `dir`.
fn etcd_pki(dir: &Path) -> EtcdClientFiles {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        (Issuer::new(params, key), pem)
    };
    let issue = |issuer: &Issuer<KeyPair>, names: &[&str], usage: ExtendedKeyUsagePurpose, file: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![usage];
        fs::write(dir.join(format!("{file}.pem")), params.signed_by(&key, issuer).unwrap().pem()).unwrap();
        crate::process::secret_file(&dir.join(format!("{file}.key")), &key.serialize_pem());
    };
    let (etcd_ca, pem) = ca("etcd CA");
    fs::write(dir.join("ca.pem"), pem).unwrap();
    issue(&etcd_ca, &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth, "server");
    issue(&etcd_ca, &["coordinator"], ExtendedKeyUsagePurpose::ClientAuth, "client");
    issue(&ca("another CA").0, &["coordinator"], ExtendedKeyUsagePurpose::ClientAuth, "stranger");
    EtcdClientFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
        stranger_cert: dir.join("stranger.pem"),
        stranger_key: dir.join("stranger.key"),
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
