//! The gateway on HTTPS (`tandem coordinator --tls-cert --tls-key`): an HTTPS client that trusts
//! the certificate's CA is answered, a plain-text one is not; `tandem jobs --gateway https://...
//! --ca-cert` reaches the gRPC job API over the same TLS port; a key readable by others, or a
//! gateway named without the CA to check it, is a clear error.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tandem_testkit::{CoordinatorOptions, Coordinators, free_addr};

use common::TANDEM;

/// A CA and a certificate for `localhost` signed by it, written as `ca.pem`, `web.pem` and
/// `web.key` (mode 0600) into `dir`.
fn web_certificate(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "test web CA");
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let web = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = web.signed_by(&key, &rcgen::Issuer::new(ca, &ca_key)).unwrap();
    std::fs::write(dir.join("web.pem"), cert.pem()).unwrap();
    let key_file = tandem_testkit::secret_file(&dir.join("web.key"), &key.serialize_pem());
    assert!(key_file.exists());
}

/// A TLS connection to `addr` that trusts `ca.pem` of `dir` for `localhost`, offering `alpn`.
fn tls_stream(
    dir: &Path,
    addr: &str,
    alpn: &[&[u8]],
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(dir.join("ca.pem"))?;
    roots.add(CertificateDer::from_pem_slice(&ca).unwrap()).unwrap();
    #[allow(deprecated)] // ring's provider, as the product's
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    Ok(rustls::StreamOwned::new(conn, TcpStream::connect(addr)?))
}

/// One HTTP/1.1 GET over TLS to `addr`, trusting `ca.pem` of `dir` for `localhost`.
fn https_get(dir: &Path, addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut tls = tls_stream(dir, addr, &[])?;
    write!(tls, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut out = Vec::new();
    // A server may close without TLS's close_notify once the answer is sent.
    if let Err(e) = tls.read_to_end(&mut out)
        && (out.is_empty() || e.kind() != std::io::ErrorKind::UnexpectedEof)
    {
        return Err(e);
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text))
}

#[test]
fn the_gateway_serves_https_with_the_operators_certificate() {
    let mut g = Coordinators::start(TANDEM, "https", CoordinatorOptions::default());
    let dir = g.dir().to_path_buf();
    web_certificate(&dir);
    let (http_addr, blobs) = (free_addr(), dir.join("blobs"));
    let key_file = tandem_testkit::secret_file(&dir.join("admin-key"), "sk-op");
    let (cert, key) = (dir.join("web.pem"), dir.join("web.key"));
    let gateway = |key: &Path| -> Vec<String> {
        [
            "--http",
            http_addr.as_str(),
            "--api-key-file",
            key_file.to_str().unwrap(),
            "--blobs",
            blobs.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ]
        .map(str::to_string)
        .to_vec()
    };

    // A key others may read is refused before anything starts.
    let open_key = dir.join("open.key");
    std::fs::copy(&key, &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut refused = vec!["coordinator", "--id", "9", "--peers", "9=127.0.0.1:1", "--data-dir"];
    let data = dir.join("refused");
    refused.push(data.to_str().unwrap());
    let args = gateway(&open_key);
    refused.extend(args.iter().map(String::as_str));
    refused.push("--insecure");
    let (ok, _, err) = TANDEM.run(&refused);
    assert!(!ok && err.contains("readable by others"), "{err}");

    g.kill(1);
    let args = gateway(&key);
    g.spawn(1, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        match https_get(&dir, &http_addr, "/health") {
            Ok((status, body)) if status != 0 => break (status, body),
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("the HTTPS gateway never answered: {other:?}"),
        }
    };
    assert!(status == 200 || status == 503, "{body}");
    assert!(body.contains("workers_alive"), "{body}");

    // Plain text gets no HTTP answer from the TLS port.
    let mut plain = TcpStream::connect(&http_addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    plain.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "{}", String::from_utf8_lossy(&answer));

    // A client that finishes its handshake asking for HTTP/2 and then sends nothing (not even
    // the HTTP/2 preface) is closed by the gateway's 10 s deadline.
    let mut silent = tls_stream(&dir, &http_addr, &[b"h2"]).unwrap();
    silent.sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let start = Instant::now();
    let _ = silent.read_to_end(&mut Vec::new());
    let waited = start.elapsed();
    assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(20), "closed after {waited:?}");

    // The CLI reaches the gRPC job API over the same TLS port, checking the certificate.
    let https_url = format!("https://localhost:{}", http_addr.rsplit_once(':').unwrap().1);
    let ca = dir.join("ca.pem");
    let jobs = ["jobs", "list", "--gateway", &https_url, "--api-key", "sk-op", "--ca-cert", ca.to_str().unwrap()];
    let (ok, out, err) = TANDEM.run(&jobs);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = TANDEM.run(&jobs[..6]);
    assert!(!ok && err.contains("--ca-cert"), "{err}");
}
