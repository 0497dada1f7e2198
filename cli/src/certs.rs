//! `tandem certs`: the cluster's certificate authority and each process's certificate
//! (`tandem_proto::tls`). `tandem up` makes its own on first start; these are for clusters
//! started process by process.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use tandem_proto::tls::{CertificateAuthority, Role};

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
