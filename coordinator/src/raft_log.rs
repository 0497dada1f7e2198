//! A coordinator's Raft log on disk, as raft-rs's [`Storage`]. Three files in its folder:
//! - `log`: the entries after the snapshot, each record `len, crc32, protobuf`; appends are
//!   fsynced before [`DiskStorage::append`] returns (raft-rs sends the messages that depend on
//!   them only after), and a conflicting suffix is cut off the file first. A torn last record
//!   (a crash mid-write) fails its checksum and is dropped on open: it was never acknowledged.
//! - `state`: the hard state and the configuration, replaced atomically (temporary file,
//!   fsync, rename, fsync of the folder).
//! - `snapshot`: the last snapshot (metadata and the state machine's bytes), replaced the same
//!   way; compaction writes it, then rewrites `log` without the entries it covers.
//!
//! Before the first start a fourth file may be there: `seed`, the state machine a restored
//! backup starts the new log from ([`write_seed`], `crate::backup`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tandem_proto::durable;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::error::{Error, Result};

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

struct Core {
    dir: PathBuf,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    /// Entries after the snapshot, in index order, and where each one's record starts in `log`.
    entries: Vec<Entry>,
    offsets: Vec<u64>,
    log: File,
}

/// The durable log; clones share it (raft-rs's node holds one, the Ready loop another).
#[derive(Clone)]
pub struct DiskStorage {
    core: Arc<RwLock<Core>>,
}

impl DiskStorage {
    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut snapshot = Snapshot::default();
        if let Some(bytes) = read_records(&dir.join("snapshot"))?.0.pop() {
            snapshot = parse(&dir.join("snapshot"), &bytes)?;
        }
        let (mut hard_state, mut conf_state) = (HardState::default(), ConfState::default());
        let state = read_records(&dir.join("state"))?.0;
        if let [hs, cs] = state.as_slice() {
            hard_state = parse(&dir.join("state"), hs)?;
            conf_state = parse(&dir.join("state"), cs)?;
        }
        let log_path = dir.join("log");
        let (records, valid_len) = read_records(&log_path)?;
        let log = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        // Cut a torn tail so the next append starts on a record boundary.
        log.set_len(valid_len).map_err(io_err(&log_path))?;
        let (mut entries, mut offsets, mut at) = (Vec::new(), Vec::new(), 0u64);
        for bytes in records {
            let e: Entry = parse(&log_path, &bytes)?;
            offsets.push(at);
            at += 8 + bytes.len() as u64;
            entries.push(e);
        }
        // Entries a snapshot covers may remain after a crash between writing the snapshot and
        // rewriting the log: they are dropped here.
        let meta = snapshot.get_metadata();
        let snap_index = meta.index;
        // A crash between installing a leader's snapshot and writing the state leaves a state
        // older than the snapshot (raft-rs refuses to start on a commit behind it): a snapshot
        // is committed, so the state is brought up to it as the install would have.
        if hard_state.commit < snap_index {
            hard_state.commit = snap_index;
            hard_state.term = hard_state.term.max(meta.term);
            conf_state = meta.get_conf_state().clone();
        }
        let keep = entries.iter().position(|e| e.index > snap_index).unwrap_or(entries.len());
        entries.drain(..keep);
        offsets.drain(..keep);
        check_sequence(&log_path, &snapshot, &entries, hard_state.commit)?;
        let mut core = Core { dir: dir.to_path_buf(), hard_state, conf_state, snapshot, entries, offsets, log };
        if keep > 0 {
            core.rewrite_log()?;
        }
        Ok(DiskStorage { core: Arc::new(RwLock::new(core)) })
    }

    /// The seed the folder holds ([`write_seed`]), if any.
    pub fn seed(&self) -> Result<Option<Vec<u8>>> {
        let path = self.rl().dir.join(SEED);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Removes the seed once the log holds what it seeded.
    pub fn drop_seed(&self) -> Result<()> {
        let path = self.rl().dir.join(SEED);
        fs::remove_file(&path).map_err(io_err(&path))
    }

    fn rl(&self) -> RwLockReadGuard<'_, Core> {
        self.core.read().unwrap_or_else(|e| e.into_inner())
    }

    fn wl(&self) -> RwLockWriteGuard<'_, Core> {
        self.core.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the log holds a configuration (a node that has been started before).
    pub fn is_initialized(&self) -> bool {
        self.rl().conf_state != ConfState::default()
    }

    /// Sets the first configuration of a new cluster: `voters` vote.
    pub fn initialize(&self, voters: &[u64]) -> Result<()> {
        let mut core = self.wl();
        core.conf_state.voters = voters.to_vec();
        core.write_state()
    }

    /// Appends `ents` (durably), replacing any entries from `ents[0].index` on.
    pub fn append(&self, ents: &[Entry]) -> Result<()> {
        let Some(first) = ents.first() else { return Ok(()) };
        let mut core = self.wl();
        let path = core.dir.join("log");
        if first.index <= core.snapshot.get_metadata().index || first.index > core.last_index() + 1 {
            return Err(Error::Internal(format!(
                "{}: append at {} outside {}..={}",
                path.display(),
                first.index,
                core.first_index(),
                core.last_index() + 1
            )));
        }
        let keep = core.entries.iter().position(|e| e.index >= first.index).unwrap_or(core.entries.len());
        let mut at = match core.offsets.get(keep) {
            Some(&o) => o,
            None => core.log.seek(SeekFrom::End(0)).map_err(io_err(&path))?,
        };
        core.entries.truncate(keep);
        core.offsets.truncate(keep);
        core.log.set_len(at).map_err(io_err(&path))?;
        core.log.seek(SeekFrom::Start(at)).map_err(io_err(&path))?;
        let mut buf = Vec::new();
        for e in ents {
            let bytes = e.write_to_bytes().map_err(raft::Error::CodecError)?;
            core.offsets.push(at);
            at += 8 + bytes.len() as u64;
            frame(&mut buf, &bytes);
            core.entries.push(e.clone());
        }
        core.log.write_all(&buf).map_err(io_err(&path))?;
        durable::step("raft-log", "fsync", || core.log.sync_data()).map_err(io_err(&path))
    }

    pub fn set_hard_state(&self, hs: &HardState) -> Result<()> {
        let mut core = self.wl();
        core.hard_state = hs.clone();
        core.write_state()
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> Result<()> {
        let mut core = self.wl();
        core.conf_state = cs.clone();
        core.write_state()
    }

    /// The commit index moved (a Ready with only a commit change).
    pub fn set_commit(&self, commit: u64) -> Result<()> {
        let mut core = self.wl();
        core.hard_state.commit = commit;
        core.write_state()
    }

    /// Installs a snapshot received from the leader: the state machine restarts from it and the
    /// whole log goes.
    pub fn apply_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let mut core = self.wl();
        let meta = snapshot.get_metadata();
        if meta.index < core.snapshot.get_metadata().index {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate).into());
        }
        core.snapshot = snapshot.clone();
        core.hard_state.term = core.hard_state.term.max(meta.term);
        core.hard_state.commit = meta.index;
        core.conf_state = meta.get_conf_state().clone();
        core.write_snapshot()?;
        core.write_state()?;
        core.entries.clear();
        core.offsets.clear();
        core.rewrite_log()
    }

    /// Compaction: `data` is the state machine at applied index `index` (which must be in the
    /// log); it becomes the snapshot and the entries up to `index` go.
    pub fn compact(&self, index: u64, data: Vec<u8>) -> Result<()> {
        let mut core = self.wl();
        let term = core.term_of(index)?;
        let mut meta = SnapshotMetadata { index, term, ..Default::default() };
        meta.set_conf_state(core.conf_state.clone());
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(meta);
        snapshot.data = data.into();
        core.snapshot = snapshot;
        core.write_snapshot()?;
        let keep = core.entries.iter().position(|e| e.index > index).unwrap_or(core.entries.len());
        core.entries.drain(..keep);
        core.rewrite_log()
    }

    /// The last index in the log files.
    pub fn last_index_on_disk(&self) -> u64 {
        self.rl().last_index()
    }

    /// The state machine's bytes of the last snapshot, and its index (0: none).
    pub fn snapshot_data(&self) -> (u64, Vec<u8>) {
        let core = self.rl();
        (core.snapshot.get_metadata().index, core.snapshot.data.to_vec())
    }
}

impl Core {
    fn first_index(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last_index(&self) -> u64 {
        self.entries.last().map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    fn term_of(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entries.get((idx - self.first_index()) as usize) {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn write_state(&self) -> Result<()> {
        let mut buf = Vec::new();
        for bytes in [self.hard_state.write_to_bytes(), self.conf_state.write_to_bytes()] {
            frame(&mut buf, &bytes.map_err(raft::Error::CodecError)?);
        }
        replace_file(&self.dir, "state", &buf)
    }

    fn write_snapshot(&self) -> Result<()> {
        let mut buf = Vec::new();
        frame(&mut buf, &self.snapshot.write_to_bytes().map_err(raft::Error::CodecError)?);
        replace_file(&self.dir, "snapshot", &buf)
    }

    /// Rewrites `log` from `entries` (after compaction) and reopens it.
    fn rewrite_log(&mut self) -> Result<()> {
        let mut buf = Vec::new();
        self.offsets.clear();
        for e in &self.entries {
            let bytes = e.write_to_bytes().map_err(raft::Error::CodecError)?;
            self.offsets.push(buf.len() as u64);
            frame(&mut buf, &bytes);
        }
        replace_file(&self.dir, "log", &buf)?;
        let path = self.dir.join("log");
        self.log = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
        self.log.seek(SeekFrom::End(0)).map_err(io_err(&path))?;
        Ok(())
    }
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.rl();
        Ok(RaftState::new(core.hard_state.clone(), core.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.rl();
        if low < core.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > core.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let first = core.first_index();
        let mut ents = core.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.rl().term_of(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl().last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let core = self.rl();
        if core.snapshot.get_metadata().index < request_index {
            // The state machine has not been snapshotted that far yet; raft-rs retries later.
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(core.snapshot.clone())
    }
}

/// Refuses a log that raft-rs could not run on (records whose checksums hold, written by
/// something other than this module): entries must follow the snapshot one index at a time,
/// terms must not go back, and the commit index must be in the log.
fn check_sequence(path: &Path, snapshot: &Snapshot, entries: &[Entry], commit: u64) -> Result<()> {
    let meta = snapshot.get_metadata();
    let corrupt = |why: String| Err(Error::Corrupt(format!("{}: {why}", path.display())));
    if meta.index == u64::MAX {
        return corrupt("the snapshot's index has no successor".into());
    }
    let (mut index, mut term) = (meta.index, meta.term);
    for e in entries {
        if e.index != index + 1 || e.term < term {
            return corrupt(format!("entry {} (term {}) follows entry {index} (term {term})", e.index, e.term));
        }
        (index, term) = (e.index, e.term);
    }
    if commit > index {
        return corrupt(format!("the commit index {commit} is past the last entry, {index}"));
    }
    Ok(())
}

/// Appends one record, as every file here holds them: length, CRC-32 of the payload, payload.
pub fn frame(buf: &mut Vec<u8>, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

/// The whole records of a file (none when it does not exist), and the length they span: a
/// short or corrupt last record ends the list.
fn read_records(path: &Path) -> Result<(Vec<Vec<u8>>, u64)> {
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut data).map_err(io_err(path))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let (mut records, mut at) = (Vec::new(), 0usize);
    while let Some(header) = data.get(at..at + 8) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(payload) = data.get(at + 8..at + 8 + len) else { break };
        if crc32(payload) != crc {
            break;
        }
        records.push(payload.to_vec());
        at += 8 + len;
    }
    Ok((records, at as u64))
}

fn parse<M: protobuf::Message>(path: &Path, bytes: &[u8]) -> Result<M> {
    M::parse_from_bytes(bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

/// Replaces `dir/name` with `contents` atomically: a temporary file, fsynced, renamed over it,
/// and the folder fsynced so the rename itself survives a crash.
/// Its failpoints are named `raft-{name}-...`.
/// The file a restored backup seeds a new log from.
const SEED: &str = "seed";

/// Seeds the log in `dir` (which must hold none yet) with `machine`, the state machine's bytes:
/// the first start of a new group begins from it instead of an empty state.
pub fn write_seed(dir: &Path, machine: &[u8]) -> Result<()> {
    if ["log", "state", "snapshot"].iter().any(|f| dir.join(f).exists()) {
        return Err(Error::Conflict(format!(
            "{} holds a coordinator's log already: restore into an empty folder",
            dir.display()
        )));
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    replace_file(dir, SEED, machine)
}

fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> Result<()> {
    let what = format!("raft-{name}");
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    durable::step(&what, "fsync", || f.sync_all()).map_err(io_err(&tmp))?;
    let path = dir.join(name);
    durable::step(&what, "rename", || fs::rename(&tmp, &path)).map_err(io_err(&path))?;
    durable::step(&what, "dirsync", || File::open(dir)?.sync_all()).map_err(io_err(dir))
}

/// CRC-32 (IEEE), bit by bit: the coordinator's records are small.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::crc32;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
