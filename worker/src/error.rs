//! The worker's error type. Every variant carries enough context (a file, a field, a tensor
//! name) for the message to stand on its own in a log or a CLI error.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file that does not parse or lacks a field.
    #[error("{path}: {msg}")]
    Json { path: PathBuf, msg: String },

    /// A checkpoint, adapter or tokenizer whose content is wrong: a missing or mis-shaped
    /// tensor, an unsupported dtype, a broken safetensors header. The message names the file
    /// and the tensor or field.
    #[error("{0}")]
    Format(String),

    /// Something valid in the format that Tandem does not support (an unknown architecture,
    /// DoRA, `modules_to_save`, ...), refused rather than silently ignored.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A request that cannot be served as given (unknown adapter, a prompt longer than the
    /// context, a bad sampling parameter, a training example or an adapter config that breaks
    /// its format).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// The engine cannot take more work now (its bounded queue is full); the caller may retry
    /// later.
    #[error("overloaded: {0}")]
    Overloaded(String),

    /// A bad line of a training data file (JSONL): `line` is 1-based, 0 when the fault is the
    /// file as a whole (no examples), and the message names the field.
    #[error("{path}:{line}: {msg}")]
    Data { path: PathBuf, line: usize, msg: String },

    /// A collective of a tensor-parallel group failed (a rank is gone, a timeout, ranks that
    /// disagree); `culprit` is the rank at fault where the failure names one.
    #[error("collective: {message}")]
    Collective { message: String, culprit: Option<usize> },

    /// Tokenizer or chat-template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Something this worker needs could not be reached or bound (a port, the coordinators);
    /// retrying later may help.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// An invariant broke (a task panicked, a channel closed that should not have): a bug,
    /// reported rather than hidden.
    #[error("internal error: {0}")]
    Internal(String),

    /// `source`, while doing `what` (reading a rank's shard, resuming a checkpoint): the kind
    /// of `source` stays what it was.
    #[error("{what}: {source}")]
    While {
        what: String,
        #[source]
        source: Box<Error>,
    },

    #[error(transparent)]
    Kernel(#[from] tandem_kernels::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<crate::collective::CollectiveError> for Error {
    fn from(e: crate::collective::CollectiveError) -> Self {
        Error::Collective { message: e.to_string(), culprit: e.culprit() }
    }
}

impl From<tandem_proto::contract::Invalid> for Error {
    fn from(e: tandem_proto::contract::Invalid) -> Self {
        Error::InvalidRequest(e.0)
    }
}

impl Error {
    /// A failure of a group's collectives that blames no rank.
    pub fn collective(message: impl Into<String>) -> Error {
        Error::Collective { message: message.into(), culprit: None }
    }

    /// The rank at fault, for a collective's failure that names one (under any context).
    pub fn culprit(&self) -> Option<usize> {
        match self {
            Error::Collective { culprit, .. } => *culprit,
            Error::While { source, .. } => source.culprit(),
            _ => None,
        }
    }

    /// This error, while doing `what`.
    pub fn context(self, what: impl Into<String>) -> Error {
        Error::While { what: what.into(), source: Box::new(self) }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })
}
