//! Uploads on their way into the blobs folder: each file is written to `blobs/incoming/` as its
//! bytes arrive, so no upload is ever held in memory whole, and is renamed into place once it is
//! checked. One that is refused, cut short or abandoned is removed when it is dropped.

use std::path::{Path, PathBuf};

use tandem_proto::contract::fresh_id;
use tokio::io::AsyncWriteExt;

use super::ApiError;

/// An uploaded file on disk, not yet in its place.
pub struct Staged {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    len: u64,
}

impl Staged {
    /// A new, empty file under `blobs/incoming/`.
    pub async fn create(blobs: &Path) -> Result<Self, ApiError> {
        let dir = blobs.join("incoming");
        tokio::fs::create_dir_all(&dir).await.map_err(|e| ApiError::storage(&dir, e))?;
        let path = dir.join(fresh_id("upload"));
        let file = tokio::fs::File::create_new(&path).await.map_err(|e| ApiError::storage(&path, e))?;
        Ok(Staged { path, file: Some(file), len: 0 })
    }

    /// A file holding `bytes` (an upload that arrived whole, in one gRPC message).
    pub async fn of(blobs: &Path, bytes: &[u8]) -> Result<Self, ApiError> {
        let mut staged = Staged::create(blobs).await?;
        staged.write(bytes).await?;
        Ok(staged)
    }

    /// Appends the next chunk.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        let file = self.file.as_mut().ok_or_else(|| ApiError::unavailable("the upload was already finished"))?;
        file.write_all(chunk).await.map_err(|e| ApiError::storage(&self.path, e))?;
        self.len += chunk.len() as u64;
        Ok(())
    }

    /// Where the bytes are, for checks that read them (after [`Staged::finish`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Syncs what was written: the file is whole on disk before anything records it.
    pub async fn finish(&mut self) -> Result<(), ApiError> {
        if let Some(file) = self.file.take() {
            file.sync_all().await.map_err(|e| ApiError::storage(&self.path, e))?;
        }
        Ok(())
    }

    /// Moves the file to `to` (a new name in the same blobs folder), whole and synced.
    pub async fn persist(mut self, to: &Path) -> Result<(), ApiError> {
        self.finish().await?;
        if let Some(dir) = to.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(|e| ApiError::storage(dir, e))?;
        }
        tokio::fs::rename(&self.path, to).await.map_err(|e| ApiError::storage(to, e))?;
        // Renamed: nothing left for Drop to remove.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
