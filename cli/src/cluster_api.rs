//! What every operator command that talks to a running cluster shares: which coordinator to ask
//! (any one: a follower forwards to the leader), as whom (the operator's certificate), and a
//! refusal turned into an error the operator reads. A group that is electing a leader (or a
//! coordinator just started) answers "unavailable" for a moment: the calls here retry through
//! it, for up to [`PATIENCE`].

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use clap::Args;
use tandem_proto::contract::{ClusterState, Command, Proposal, Reply, fresh_id};
use tandem_proto::{ClientError, ClusterClient};

/// How long an operator's call waits for the group to answer.
const PATIENCE: Duration = Duration::from_secs(15);

use crate::certs::SecurityArgs;

#[derive(Args)]
pub struct ClusterArgs {
    /// Any coordinator's address, or several separated by commas (a follower forwards to the
    /// leader).
    #[arg(long, global = true, default_value = "127.0.0.1:7400")]
    pub coordinator: String,
    #[command(flatten)]
    pub security: SecurityArgs,
}

impl ClusterArgs {
    /// A client of the cluster API, as the operator.
    pub fn client(&self) -> Result<ClusterClient> {
        Ok(ClusterClient::new(&self.coordinator, &self.security.security("operator")?)?)
    }
}

/// Proposes `command` (retried under one request id, so applied once); a refusal is an error
/// that gives the state machine's reason.
pub async fn propose(client: &ClusterClient, what: &str, command: Command) -> Result<Reply> {
    let proposal = Proposal::new(fresh_id(what), command);
    match patiently(|| client.propose_as(proposal.clone())).await? {
        Reply::Refused { reason } => Err(anyhow!("refused: {reason}")),
        reply => Ok(reply),
    }
}

/// The cluster's state as the leader has it.
pub async fn state(client: &ClusterClient) -> Result<ClusterState> {
    Ok(patiently(|| client.state()).await?)
}

/// `call`'s answer, retried while the group is unavailable, for up to [`PATIENCE`].
async fn patiently<T, F: Future<Output = Result<T, ClientError>>>(call: impl Fn() -> F) -> Result<T, ClientError> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match call().await {
            Err(ClientError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            answer => return answer,
        }
    }
}
