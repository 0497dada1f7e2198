//! `tandem certs`: a cluster CA, then certificates that load as a process's identity; keys
//! private, nothing replaced, bad roles and names refused with a message.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use tandem_proto::tls::ClusterTls;

fn certs(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem")).arg("certs").arg("--dir").arg(dir).args(args).output().unwrap()
}

#[test]
fn init_then_issue_makes_a_loadable_identity_and_refuses_to_overwrite() {
    let dir = std::env::temp_dir().join(format!("tandem-certs-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(certs(&dir, &["init"]).status.success());
    let issued = certs(&dir, &["issue", "--role", "worker", "--name", "w0"]);
    assert!(issued.status.success(), "{}", String::from_utf8_lossy(&issued.stderr));
    assert!(ClusterTls::load(&dir, "w0").is_ok());
    for key in ["ca.key", "w0.key"] {
        assert_eq!(std::fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777, 0o600, "{key}");
    }

    let again = certs(&dir, &["init"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("ca.key"), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(!certs(&dir, &["issue", "--role", "worker", "--name", "w0"]).status.success());

    let bad_role = certs(&dir, &["issue", "--role", "admin", "--name", "x"]);
    assert!(String::from_utf8_lossy(&bad_role.stderr).contains("coordinator, worker or operator"));
    let bad_name = certs(&dir, &["issue", "--role", "worker", "--name", "../w1"]);
    assert!(!bad_name.status.success());
    assert!(
        String::from_utf8_lossy(&bad_name.stderr).contains("a-z, 0-9"),
        "{}",
        String::from_utf8_lossy(&bad_name.stderr)
    );
    assert!(!dir.join("../w1.pem").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_coordinators_certificate_is_named_by_its_raft_id() {
    // The others take a Raft message only from the holder of the certificate its sender names.
    let args =
        ["coordinator", "--id", "1", "--peers", "1=127.0.0.1:1", "--cert-name", "2", "--data-dir", "/nonexistent"];
    let out = Command::new(env!("CARGO_BIN_EXE_tandem")).args(args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cert-name must be 1"), "{err}");
}
