//! Mutual TLS between Tandem processes, over real sockets: a server of the cluster answers a
//! client with a certificate of the cluster's CA, and refuses every other one at the handshake.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::tls::{CertificateAuthority, ClusterTls, Role, Security, TlsError};
use tandem_proto::v1::health_client::HealthClient;
use tandem_proto::v1::health_server::{Health, HealthServer};
use tandem_proto::v1::{HealthCheckRequest, HealthCheckResponse};
use tonic::transport::Server;

struct Answering;

#[tonic::async_trait]
impl Health for Answering {
    async fn check(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(HealthCheckResponse { role: "coordinator".into(), version: "test".into() }))
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn security(ca: &CertificateAuthority, role: Role, name: &str) -> Security {
    let issued = ca.issue(role, name).unwrap();
    Security::Mutual(Arc::new(ClusterTls::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)))
}

/// Serves `Health` with `security` on a free port; its address.
async fn serve(security: &Security) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut server = security.server(Server::builder()).unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(server.add_service(HealthServer::new(Answering)).serve_with_incoming(incoming));
    addr
}

async fn check(security: &Security, addr: &str, server: Role) -> Result<HealthCheckResponse, String> {
    let endpoint = security.endpoint(addr, server).map_err(|e| e.to_string())?.timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let reply = HealthClient::new(channel).check(HealthCheckRequest {}).await.map_err(|e| format!("call: {e}"))?;
    Ok(reply.into_inner())
}

#[tokio::test]
async fn only_holders_of_the_clusters_certificates_get_an_answer() {
    let ca = CertificateAuthority::create().unwrap();
    let addr = serve(&security(&ca, Role::Coordinator, "1")).await;

    // A worker of the cluster, expecting a coordinator: answered.
    let worker = security(&ca, Role::Worker, "w0");
    assert_eq!(check(&worker, &addr, Role::Coordinator).await.unwrap().version, "test");

    // The same client expecting a worker there: the server's certificate names a coordinator.
    assert!(check(&worker, &addr, Role::Worker).await.is_err());

    // A certificate of another cluster's CA: refused.
    let stranger = security(&CertificateAuthority::create().unwrap(), Role::Worker, "w0");
    let refused = check(&stranger, &addr, Role::Coordinator).await.unwrap_err();
    assert!(refused.contains("connect") || refused.contains("call"), "{refused}");

    // Plain text to a TLS port: refused.
    assert!(check(&Security::Insecure, &addr, Role::Coordinator).await.is_err());
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = CertificateAuthority::create().unwrap();
    let addr = serve(&security(&ca, Role::Coordinator, "1")).await;
    // TLS that trusts the cluster's CA but shows no certificate of its own.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.cert_pem()))
        .domain_name(Role::Coordinator.dns_name());
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap();
    let result = match endpoint.connect().await {
        Ok(channel) => HealthClient::new(channel).check(HealthCheckRequest {}).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(result.is_err(), "a client without a certificate was answered");
}

#[test]
fn a_certificates_directory_keeps_its_keys_private_and_is_never_overwritten() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("dir");
    let ca = CertificateAuthority::create().unwrap();
    ca.write(&dir).unwrap();
    let ca = CertificateAuthority::open(&dir).unwrap();
    ca.issue_into(&dir, Role::Operator, "alice").unwrap();
    for (file, mode) in [("ca.key", 0o600), ("ca.pem", 0o644), ("alice.key", 0o600), ("alice.pem", 0o644)] {
        let meta = std::fs::metadata(dir.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    assert!(ClusterTls::load(&dir, "alice").is_ok());
    // A second CA, or a second certificate of one name, would strand what was issued.
    assert!(matches!(CertificateAuthority::create().unwrap().write(&dir), Err(TlsError::Io { .. })));
    assert!(matches!(ca.issue_into(&dir, Role::Worker, "alice"), Err(TlsError::Io { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn names_that_are_not_dns_labels_are_refused() {
    let ca = CertificateAuthority::create().unwrap();
    for bad in ["", "../x", "a/b", "UPPER", "-lead", "trail-", "a.b", "sp ace", &"x".repeat(64)] {
        assert!(matches!(ca.issue(Role::Worker, bad), Err(TlsError::Invalid(_))), "{bad:?}");
    }
    assert!("admin".parse::<Role>().is_err());
    assert_eq!("worker".parse::<Role>().unwrap(), Role::Worker);
}

/// A process of the CA `issuer` that trusts every CA of `trusted` (a `ca.pem` bundle).
fn holder_trusting(
    issuer: &CertificateAuthority,
    trusted: &[&CertificateAuthority],
    role: Role,
    name: &str,
) -> Security {
    let issued = issuer.issue(role, name).unwrap();
    let bundle: String = trusted.iter().map(|ca| ca.cert_pem()).collect();
    Security::Mutual(Arc::new(ClusterTls::from_pem(&bundle, &issued.cert_pem, &issued.key_pem)))
}

#[tokio::test]
async fn the_ca_rotates_through_a_bundle_of_the_old_and_the_new() {
    let (old, new) = (CertificateAuthority::create().unwrap(), CertificateAuthority::create().unwrap());
    // Step 1 done: every process trusts both CAs. A server still on its old certificate answers
    // a client already on a new one, and the other way round.
    let server = serve(&holder_trusting(&old, &[&old, &new], Role::Coordinator, "1")).await;
    let client = holder_trusting(&new, &[&old, &new], Role::Worker, "w0");
    assert!(check(&client, &server, Role::Coordinator).await.is_ok());
    let server = serve(&holder_trusting(&new, &[&old, &new], Role::Coordinator, "1")).await;
    let client = holder_trusting(&old, &[&old, &new], Role::Worker, "w0");
    assert!(check(&client, &server, Role::Coordinator).await.is_ok());
    // Step 3 done: the old CA is out of the bundle; a certificate it signed gets no answer.
    let server = serve(&holder_trusting(&new, &[&new], Role::Coordinator, "1")).await;
    assert!(
        check(&holder_trusting(&old, &[&old, &new], Role::Worker, "w0"), &server, Role::Coordinator).await.is_err()
    );
    assert!(check(&holder_trusting(&new, &[&new], Role::Worker, "w0"), &server, Role::Coordinator).await.is_ok());
}
