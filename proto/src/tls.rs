//! The cluster's identity: one certificate authority per cluster, a certificate per process,
//! and the mutual-TLS settings every connection between Tandem processes uses.
//!
//! A certificate names its holder twice, as DNS names (the subject alternative names rustls
//! checks): `{role}.tandem`, which a client asks of the server it dials (a worker cannot answer
//! as a coordinator), and `{name}.{role}.tandem`, which says who the holder is.
//!
//! A certificates directory holds `ca.pem` (the cluster CA, trusted by every process),
//! `ca.key` (only where certificates are issued), and `{name}.pem` / `{name}.key` per process.
//! Keys are written 0600 and never overwritten.
//!
//! [`Caller`] reads the certificate a client showed, so that a server can require a role (and
//! a name) of each call.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::{Duration, OffsetDateTime};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// How long a cluster CA is valid: the cluster's lifetime, unless rotated (`docs/security.md`).
const CA_VALIDITY: Duration = Duration::days(10 * 365);
/// How long a process's certificate is valid.
const CERT_VALIDITY: Duration = Duration::days(825);

/// What went wrong with the cluster's certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

fn invalid(what: impl fmt::Display) -> TlsError {
    TlsError::Invalid(what.to_string())
}

/// What a certificate lets its holder be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A member of the Raft group: serves the cluster API and Raft.
    Coordinator,
    /// Serves inference and training for the coordinators.
    Worker,
    /// A person or tool running the cluster: membership, keys, worker groups.
    Operator,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Worker, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Operator => "operator",
        }
    }

    /// The DNS name every certificate of this role carries.
    pub fn dns_name(self) -> String {
        format!("{}.tandem", self.as_str())
    }

    /// The DNS name that says who holds a certificate of this role.
    pub fn holder_dns_name(self, name: &str) -> String {
        format!("{name}.{}.tandem", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, TlsError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| invalid(format!("role {s:?}: expected coordinator, worker or operator")))
    }
}

/// A holder's name, as it goes into a DNS label and a file name: 1 to 63 of `a-z`, `0-9` and
/// `-`, not starting or ending with `-`.
pub fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("name {name:?}: 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'")))
    }
}

/// The cluster CA: signs every process's certificate.
pub struct CertificateAuthority {
    key: KeyPair,
    cert_pem: String,
}

/// The CA's subject and constraints. Issuing rebuilds them from here with the stored key: a
/// signature names its issuer by subject and key, both of which this reproduces.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tandem");
    dn.push(DnType::CommonName, "Tandem cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A certificate and its private key, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    /// A new CA with a fresh key.
    pub fn create() -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(invalid)?;
        let mut params = ca_params();
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = (now - Duration::hours(1), now + CA_VALIDITY);
        let cert_pem = params.self_signed(&key).map_err(invalid)?.pem();
        Ok(CertificateAuthority { key, cert_pem })
    }

    /// The CA of the certificates directory `dir` (its `ca.pem` and `ca.key`).
    pub fn open(dir: &Path) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(&read(&dir.join("ca.key"))?).map_err(invalid)?;
        Ok(CertificateAuthority { key, cert_pem: read(&dir.join("ca.pem"))? })
    }

    /// Writes `ca.pem` and `ca.key` into `dir` (created if missing); refuses to replace either.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_new(&dir.join("ca.key"), &self.key.serialize_pem(), 0o600)?;
        write_new(&dir.join("ca.pem"), &self.cert_pem, 0o644)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `name` in `role`, with a fresh key, valid for client and server use.
    pub fn issue(&self, role: Role, name: &str) -> Result<Issued, TlsError> {
        check_name(name)?;
        let key = KeyPair::generate().map_err(invalid)?;
        let mut params = CertificateParams::new(vec![role.dns_name(), role.holder_dns_name(name)]).map_err(invalid)?;
        params.distinguished_name.push(DnType::CommonName, format!("{name} ({role})"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = (now - Duration::hours(1), now + CERT_VALIDITY);
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(invalid)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// [`CertificateAuthority::issue`], written as `{name}.pem` and `{name}.key` into `dir`.
    pub fn issue_into(&self, dir: &Path, role: Role, name: &str) -> Result<(), TlsError> {
        let issued = self.issue(role, name)?;
        write_new(&dir.join(format!("{name}.key")), &issued.key_pem, 0o600)?;
        write_new(&dir.join(format!("{name}.pem")), &issued.cert_pem, 0o644)
    }

    /// [`CertificateAuthority::issue_into`] unless `dir` holds a certificate of `name` already.
    pub fn issue_missing(&self, dir: &Path, role: Role, name: &str) -> Result<(), TlsError> {
        if dir.join(format!("{name}.pem")).exists() {
            return Ok(());
        }
        self.issue_into(dir, role, name)
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// Writes a file that must not exist yet, with `mode` from its creation on (a key is never
/// readable by others, not even for a moment).
pub fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))
}

/// One process's place in the cluster: the CA it trusts and the certificate it shows.
pub struct ClusterTls {
    ca: Certificate,
    identity: Identity,
    /// The same, for the raw streams that rustls serves without tonic ([`crate::sealed`]).
    pem: Pem,
}

struct Pem {
    ca: String,
    cert: String,
    key: String,
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterTls").finish_non_exhaustive()
    }
}

impl ClusterTls {
    /// `ca.pem`, `{name}.pem` and `{name}.key` of the certificates directory `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<Self, TlsError> {
        check_name(name)?;
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        Ok(Self::from_pem(&read(&dir.join("ca.pem"))?, &read(&cert)?, &read(&key)?))
    }

    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Self {
        ClusterTls {
            ca: Certificate::from_pem(ca_pem),
            identity: Identity::from_pem(cert_pem, key_pem),
            pem: Pem { ca: ca_pem.into(), cert: cert_pem.into(), key: key_pem.into() },
        }
    }

    /// A server that answers only clients with a certificate of this cluster's CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.ca.clone())
    }

    /// A client that shows this process's certificate and accepts only a server of the
    /// cluster's CA holding a certificate of `server`'s role.
    pub fn client_config(&self, server: Role) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(server.dns_name())
    }
}

/// rustls settings for the cluster's raw streams ([`crate::sealed`]): TLS 1.3 with
/// ChaCha20-Poly1305 only (a connection that lives for days never nears its key's limits, so
/// keys need no update), each side showing its certificate, and the keys extractable.
impl ClusterTls {
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        // Deprecated for its lack of post-quantum key exchange, which only aws-lc-rs offers, and
        // that would build a C library on every fresh machine (as for tonic: `Cargo.toml`).
        #[allow(deprecated)]
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
        Arc::new(provider)
    }

    /// Every CA certificate of `ca.pem`: while the CA is rotated it holds the old one and the
    /// new one (docs/security.md), as tonic's connections read it too.
    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.pem.ca.as_bytes()) {
            roots.add(cert.map_err(invalid)?).map_err(invalid)?;
        }
        match roots.is_empty() {
            true => Err(invalid("ca.pem holds no certificate")),
            false => Ok(roots),
        }
    }

    fn chain(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.pem.cert.as_bytes()).collect::<Result<_, _>>();
        Ok((chain.map_err(invalid)?, PrivateKeyDer::from_pem_slice(self.pem.key.as_bytes()).map_err(invalid)?))
    }

    /// The client of a stream (the server's role is named when connecting: [`crate::sealed`]).
    pub fn stream_client(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let (chain, key) = self.chain()?;
        let mut config = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(invalid)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .map_err(invalid)?;
        config.enable_secret_extraction = true;
        Ok(Arc::new(config))
    }

    /// The server of a stream, which answers only clients with a certificate of the cluster's CA
    /// (their role is the caller's to check: [`Caller::is`]).
    pub fn stream_server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let (chain, key) = self.chain()?;
        let provider = Self::provider();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()
                .map_err(invalid)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(invalid)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(invalid)?;
        config.enable_secret_extraction = true;
        // Nothing may follow the handshake but what the caller sends (`sealed`).
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// A server that shows the certificate chain `cert_pem` (with its key, `key_pem`) to any client,
/// asking none of it: the gateway's HTTPS, whose clients are tenants with API keys, not
/// processes of the cluster. It speaks HTTP/2 (the gRPC job API) and HTTP/1.1.
pub fn public_server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>();
    let chain = chain.map_err(|e| invalid(format!("the certificate: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("the certificate file holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid(format!("the key: {e}")))?;
    #[allow(deprecated)] // ring's provider: see `ClusterTls::provider`
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid(format!("the certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How a process talks to the others: mutual TLS, or plain text where an operator asked for it
/// (`--insecure`).
#[derive(Clone, Debug)]
pub enum Security {
    Mutual(Arc<ClusterTls>),
    Insecure,
}

impl Security {
    /// The endpoint of the process of role `server` at `addr` (`HOST:PORT`).
    pub fn endpoint(&self, addr: &str, server: Role) -> Result<Endpoint, TlsError> {
        let scheme = match self {
            Security::Mutual(_) => "https",
            Security::Insecure => "http",
        };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| invalid(format!("address {addr:?} of a {server}: {e}")))?;
        match self {
            Security::Mutual(tls) => endpoint.tls_config(tls.client_config(server)).map_err(invalid),
            Security::Insecure => Ok(endpoint),
        }
    }

    /// `server` answering over mutual TLS, or as it is when insecure; each call in a span that
    /// continues its caller's trace.
    pub fn server(&self, server: Server) -> Result<Server, TlsError> {
        match self {
            Security::Mutual(tls) => server.tls_config(tls.server_config()).map_err(invalid),
            Security::Insecure => Ok(server),
        }
        .map(|server| server.trace_fn(crate::trace_context::server_span))
    }
}

/// Who called a server, as the certificate it showed says. On a plain-text server
/// (`--insecure`) no caller can be told from another, and every check passes: that is what
/// `--insecure` gives up.
pub struct Caller(Option<Arc<Vec<CertificateDer<'static>>>>);

impl Caller {
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        Caller(request.peer_certs())
    }

    /// The peer of a TLS connection that showed `certs`.
    pub fn with_certs(certs: &[CertificateDer<'_>]) -> Self {
        Caller(Some(Arc::new(certs.iter().map(|c| c.clone().into_owned()).collect())))
    }

    /// Whether it holds a certificate of `role`, held by `name` when one is given.
    pub fn is(&self, role: Role, name: Option<&str>) -> bool {
        let Some(certs) = &self.0 else { return true };
        let Some(cert) = certs.first().and_then(|c| webpki::EndEntityCert::try_from(c).ok()) else {
            return false;
        };
        let dns = match name {
            Some(name) => role.holder_dns_name(name),
            None => role.dns_name(),
        };
        ServerName::try_from(dns).is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
    }

    /// `Ok` when it holds a certificate of one of `roles`; otherwise a `PermissionDenied` that
    /// names what `call` needs.
    pub fn require(&self, call: &str, roles: &[Role]) -> Result<(), tonic::Status> {
        if roles.iter().any(|&r| self.is(r, None)) {
            return Ok(());
        }
        let needed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(tonic::Status::permission_denied(format!("{call} needs a {} certificate", needed.join(" or "))))
    }
}
