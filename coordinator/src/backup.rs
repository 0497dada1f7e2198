//! Backups of the cluster's state (`tandem snapshot save` / `restore`). A backup is the
//! replicated state as one linearizable read returned it, so it is consistent: every job, file,
//! adapter, key, model and group as of one log index. Restoring one seeds an empty coordinator
//! folder ([`crate::raft_log::write_seed`]); a new group whose founding members are all seeded
//! with it starts from that state. The files and adapters themselves are in the blobs folder,
//! backed up beside it (docs/operator-guide.md).

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tandem_proto::contract::ClusterState;

use crate::error::{Error, Result};
use crate::raft_log::write_seed;
use crate::state::StateMachine;

/// The format of the backups this build writes and reads.
pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backup {
    /// [`FORMAT`].
    pub tandem_backup: u32,
    /// Unix seconds when it was taken.
    pub saved_at: u64,
    pub state: ClusterState,
}

impl Backup {
    pub fn new(state: ClusterState) -> Self {
        let saved_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Backup { tandem_backup: FORMAT, saved_at, state }
    }

    /// Writes it to `path` whole or not at all (a temporary file renamed), readable only by its
    /// owner: it holds the API keys' hashes.
    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| Error::Io { path: path.to_path_buf(), source: e };
        let bytes = serde_json::to_vec(self).map_err(|e| Error::Internal(format!("encoding the backup: {e}")))?;
        let tmp = path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The backup in `path`; anything else (another format, a cut or edited file) is refused.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        let backup: Backup = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("{} is not a Tandem backup: {e}", path.display())))?;
        if backup.tandem_backup != FORMAT {
            return Err(Error::Invalid(format!(
                "{} is a backup of format {}; this build reads format {FORMAT}",
                path.display(),
                backup.tandem_backup
            )));
        }
        Ok(backup)
    }

    /// Seeds the empty coordinator folder `dir` with it.
    pub fn restore_into(self, dir: &Path) -> Result<()> {
        let machine = StateMachine::for_new_group(self.state);
        let bytes = machine.snapshot().map_err(|e| Error::Internal(format!("encoding the state: {e}")))?;
        write_seed(dir, &bytes)
    }
}
