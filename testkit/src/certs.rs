//! [`TestCerts`]: a cluster CA of a test's own, in the test's folder, and a certificate for
//! every process it starts: the harnesses' clusters run mutual TLS, as real ones do.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_proto::Security;
use tandem_proto::tls::{CertificateAuthority, ClusterTls, Role};

pub struct TestCerts {
    dir: PathBuf,
    ca: CertificateAuthority,
}

impl TestCerts {
    /// A new CA written into `dir` (which must not hold one).
    pub fn new(dir: &Path) -> Self {
        let ca = CertificateAuthority::create().unwrap();
        ca.write(dir).unwrap();
        TestCerts { dir: dir.to_path_buf(), ca }
    }

    /// The arguments that give a `tandem` process the certificate `name` of `role` (issued on
    /// first use).
    pub fn args(&self, role: Role, name: &str) -> Vec<String> {
        self.ensure(role, name);
        vec!["--certs".into(), self.dir.to_string_lossy().into_owned(), "--cert-name".into(), name.into()]
    }

    /// The [`Security`] of a process holding certificate `name` of `role` (issued on first use).
    pub fn security(&self, role: Role, name: &str) -> Security {
        self.ensure(role, name);
        Security::Mutual(Arc::new(ClusterTls::load(&self.dir, name).unwrap()))
    }

    /// An operator's: what a test's own clients show.
    pub fn operator(&self) -> Security {
        self.security(Role::Operator, "operator")
    }

    fn ensure(&self, role: Role, name: &str) {
        self.ca.issue_missing(&self.dir, role, name).unwrap();
    }
}
