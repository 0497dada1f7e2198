//! The coordinator's error type, by what a caller can do about it. The kinds a client sees are
//! those of [`tandem_proto::ClientError`] under the same names (`Invalid`, `NotFound`,
//! `Conflict`, `Unavailable`, `Internal`); the rest are what only a coordinator meets: not
//! leading, a wait that ran out, and its stores' files and data.

use std::path::PathBuf;

use tandem_proto::ClientError;
use tandem_proto::contract::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request or a setting that breaks a rule (a bad peer list, a bad etcd URL); retrying
    /// will not help.
    #[error("invalid request: {0}")]
    Invalid(String),

    /// What it names does not exist.
    #[error("not found: {0}")]
    NotFound(String),

    /// Refused as things stand.
    #[error("refused: {0}")]
    Conflict(String),

    /// The caller's certificate does not allow it.
    #[error("denied: {0}")]
    Denied(String),

    /// This replica does not lead; `leader` is the one it knows of (0: none), where the request
    /// can go instead.
    #[error("not the leader (leader: {leader})")]
    NotLeader { leader: u64 },

    /// The group (or etcd) did not answer in time. A proposal may still be applied: retry it
    /// under the same request id, which applies it once.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),

    /// It cannot be served now (the replica stopped, etcd cannot be reached, a port cannot be
    /// bound); retrying later may help.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// A file of the Raft log could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Stored data that does not decode or is not what a coordinator writes (a Raft log
    /// record, a snapshot, a key under the etcd prefix); the message names it.
    #[error("corrupt store: {0}")]
    Corrupt(String),

    /// raft-rs refused or failed (a dropped proposal, a bad configuration).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),

    /// etcd answered with an error, or the request to it failed.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),

    /// An invariant broke (a value that should encode did not, a task that panicked): a bug,
    /// reported rather than hidden.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Error::Invalid(e.0)
    }
}

/// A call to another coordinator failed so.
impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Invalid(m) => Error::Invalid(m),
            ClientError::NotFound(m) => Error::NotFound(m),
            ClientError::Conflict(m) => Error::Conflict(m),
            ClientError::Denied(m) => Error::Denied(m),
            ClientError::Unavailable(m) => Error::Unavailable(m),
            ClientError::Internal(m) => Error::Internal(m),
        }
    }
}

/// The status the cluster service answers with; a client reads it back as the `ClientError`
/// of the same name.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(m) => tonic::Status::invalid_argument(m),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::Conflict(m) => tonic::Status::failed_precondition(m),
            Error::Denied(m) => tonic::Status::permission_denied(m),
            Error::NotLeader { leader } => {
                tonic::Status::unavailable(format!("no leader reachable (last known: {leader})"))
            }
            Error::Timeout(_) => tonic::Status::deadline_exceeded("the coordinator group did not answer in time"),
            Error::Unavailable(m) => tonic::Status::unavailable(m),
            other => tonic::Status::internal(other.to_string()),
        }
    }
}

/// What a blocking call's task returned: its own result, or, when the task did not finish, an
/// error of the kind why (a runtime that stops cancels it; a panic is a bug).
pub(crate) fn joined<T>(r: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
    match r {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Err(Error::Unavailable("the coordinator is stopping".into())),
        Err(e) => Err(Error::Internal(format!("a blocking task panicked: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_keep_their_names_across_the_wire() {
        let code = |e: Error| tonic::Status::from(e).code();
        assert_eq!(code(Error::Invalid("x".into())), tonic::Code::InvalidArgument);
        assert_eq!(code(Error::NotFound("x".into())), tonic::Code::NotFound);
        assert_eq!(code(Error::Conflict("x".into())), tonic::Code::FailedPrecondition);
        assert_eq!(code(Error::NotLeader { leader: 2 }), tonic::Code::Unavailable);
        assert_eq!(code(Error::Timeout("the group")), tonic::Code::DeadlineExceeded);
        assert_eq!(code(Error::Unavailable("x".into())), tonic::Code::Unavailable);
        assert_eq!(code(Error::Corrupt("x".into())), tonic::Code::Internal);
        assert_eq!(code(Error::Internal("x".into())), tonic::Code::Internal);
        // Back through a client, each kind is the client's kind of the same name.
        for kind in ["Invalid", "NotFound", "Conflict", "Unavailable", "Internal"] {
            let e = match kind {
                "Invalid" => Error::Invalid("m".into()),
                "NotFound" => Error::NotFound("m".into()),
                "Conflict" => Error::Conflict("m".into()),
                "Unavailable" => Error::Unavailable("m".into()),
                _ => Error::Internal("m".into()),
            };
            let back = Error::from(ClientError::from(tonic::Status::from(e)));
            assert!(format!("{back:?}").starts_with(kind), "{kind}: {back:?}");
        }
    }
}
