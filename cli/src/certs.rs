//! `tandem certs`: the cluster's certificate authority and each process's certificate
//! (`tandem_proto::tls`). `tandem up` makes its own on first start; these are for clusters
//! started process by process.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tandem_proto::Security;
use tandem_proto::tls::{CertificateAuthority, ClusterTls, Role};

#[derive(Args)]
pub struct CertsArgs {
    /// The certificates directory: `ca.pem`, `ca.key`, and `NAME.pem` / `NAME.key` per
    /// process. Keep `ca.key` where certificates are issued, not on every machine.
    #[arg(long, default_value = "certs")]
    dir: PathBuf,
    #[command(subcommand)]
    action: CertsAction,
}

#[derive(Subcommand)]
enum CertsAction {
    /// Make the cluster's CA (`ca.pem`, and `ca.key`, mode 0600); refuses to replace one.
    Init,
    /// Make a process's key and certificate, signed by the CA: `NAME.pem` and `NAME.key`.
    Issue {
        /// coordinator | worker | operator
        #[arg(long)]
        role: Role,
        /// The process's name (a worker's id, a coordinator's number, a person): a-z, 0-9, '-'.
        #[arg(long)]
        name: String,
    },
}

pub fn certs(args: CertsArgs) -> Result<()> {
    match args.action {
        CertsAction::Init => {
            CertificateAuthority::create()?.write(&args.dir)?;
            println!("cluster CA written to {}", args.dir.join("ca.pem").display());
        }
        CertsAction::Issue { role, name } => {
            CertificateAuthority::open(&args.dir)?.issue_into(&args.dir, role, &name)?;
            println!("{role} certificate for {name} written to {}", args.dir.join(format!("{name}.pem")).display());
        }
    }
    Ok(())
}

/// How a process shows who it is to the cluster's other processes and checks who they are:
/// its certificate from `tandem certs`, or, only when asked for by name, plain text.
#[derive(Args, Clone)]
pub struct SecurityArgs {
    /// The certificates directory: the cluster's `ca.pem`, and this process's certificate.
    #[arg(long, global = true, default_value = "certs")]
    certs: PathBuf,
    /// This process's certificate in `--certs` (`NAME.pem`, `NAME.key`); default: a
    /// coordinator's id, a worker's id, `operator` for the other commands.
    #[arg(long, global = true)]
    cert_name: Option<String>,
    /// Plain text, no certificates: anyone who reaches a port can call it. Test benches only.
    #[arg(long, global = true)]
    insecure: bool,
}

impl SecurityArgs {
    /// A coordinator's [`Security`]: its certificate is named by its Raft id, since the others
    /// accept a Raft message only from the holder of the certificate its sender names.
    pub fn coordinator_security(&self, id: u64) -> Result<Security> {
        let id = id.to_string();
        if self.cert_name.as_ref().is_some_and(|name| *name != id) {
            bail!("a coordinator's certificate is named by its Raft id: --cert-name must be {id} or left out");
        }
        self.security(&id)
    }

    /// The process's [`Security`]: its certificate `default_name` unless `--cert-name` says
    /// another.
    pub fn security(&self, default_name: &str) -> Result<Security> {
        if self.insecure {
            eprintln!(
                "warning: --insecure: plain text between the cluster's processes, and anyone who reaches a port may call it"
            );
            return Ok(Security::Insecure);
        }
        let name = self.cert_name.as_deref().unwrap_or(default_name);
        let tls = ClusterTls::load(&self.certs, name).with_context(|| {
            format!(
                "loading certificate {name:?} from {} (make one with `tandem certs issue`, or run with --insecure)",
                self.certs.display()
            )
        })?;
        Ok(Security::Mutual(Arc::new(tls)))
    }
}
