//! The durable Raft log: what was appended and fsynced survives a reopen, a conflicting suffix
//! is replaced, a torn last record is dropped, compaction and snapshots persist, and raft-rs
//! itself runs on it and restarts from it.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::path::PathBuf;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{Config, GetEntriesContext, RawNode, Storage, StorageError};
use tandem_coordinator::raft_log::DiskStorage;

fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("raft-log").join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn entry(index: u64, term: u64, data: &str) -> Entry {
    Entry { index, term, data: data.as_bytes().to_vec().into(), ..Default::default() }
}

fn all(s: &DiskStorage) -> Vec<(u64, u64, Vec<u8>)> {
    let (lo, hi) = (s.first_index().unwrap(), s.last_index().unwrap() + 1);
    let ents = s.entries(lo, hi, None, GetEntriesContext::empty(false)).unwrap();
    ents.into_iter().map(|e| (e.index, e.term, e.data.to_vec())).collect()
}

#[test]
fn appends_and_state_survive_a_reopen_and_conflicts_are_replaced() {
    let d = dir("reopen");
    let s = DiskStorage::open(&d).unwrap();
    assert!(!s.is_initialized());
    s.initialize(&[1, 2, 3]).unwrap();
    s.append(&[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 1, "c")]).unwrap();
    let hs = HardState { term: 2, vote: 3, commit: 2, ..Default::default() };
    s.set_hard_state(&hs).unwrap();
    // A new leader overwrites the uncommitted suffix from index 3.
    s.append(&[entry(3, 2, "x"), entry(4, 2, "y")]).unwrap();
    drop(s);

    let s = DiskStorage::open(&d).unwrap();
    assert!(s.is_initialized());
    let state = s.initial_state().unwrap();
    assert_eq!(state.hard_state, hs);
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    let want = vec![(1, 1, b"a".to_vec()), (2, 1, b"b".to_vec()), (3, 2, b"x".to_vec()), (4, 2, b"y".to_vec())];
    assert_eq!(all(&s), want);
    assert_eq!(s.term(3).unwrap(), 2);
    assert!(matches!(s.term(9), Err(raft::Error::Store(StorageError::Unavailable))));
    // A gap is refused, not written.
    assert!(s.append(&[entry(7, 2, "gap")]).is_err());
    assert_eq!(all(&s), want);
}

#[test]
fn a_torn_last_record_is_dropped_and_appends_continue() {
    let d = dir("torn");
    let s = DiskStorage::open(&d).unwrap();
    s.append(&[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 1, "ccccccccccccccccccccccc")]).unwrap();
    drop(s);
    // A crash in the middle of writing the last record.
    let log = d.join("log");
    let len = std::fs::metadata(&log).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(len - 5).unwrap();

    let s = DiskStorage::open(&d).unwrap();
    assert_eq!(s.last_index().unwrap(), 2);
    s.append(&[entry(3, 1, "again")]).unwrap();
    drop(s);
    let s = DiskStorage::open(&d).unwrap();
    assert_eq!(all(&s).last().unwrap(), &(3, 1, b"again".to_vec()));
}

#[test]
fn a_log_raft_rs_could_not_run_on_is_refused_on_open() {
    // Whole records (their checksums hold) that no run of this module writes: a gap, a term
    // that goes back, a commit index past the end. Found by the raft_log fuzz target.
    let cases: [(&str, Vec<Entry>, u64); 3] = [
        ("gap", vec![entry(1, 1, "a"), entry(3, 1, "c")], 0),
        ("term-back", vec![entry(1, 2, "a"), entry(2, 1, "b")], 0),
        ("commit-past-end", vec![entry(1, 1, "a")], 5),
    ];
    for (name, entries, commit) in cases {
        let d = dir(name);
        let s = DiskStorage::open(&d).unwrap();
        s.append(&entries).unwrap();
        s.set_hard_state(&HardState { term: 2, commit, ..Default::default() }).unwrap();
        drop(s);
        let refused = DiskStorage::open(&d).err().unwrap_or_else(|| panic!("{name}: opened"));
        assert!(refused.to_string().contains("log"), "{name}: {refused}");
    }
}

#[test]
fn compaction_and_snapshots_persist() {
    let d = dir("compact");
    let s = DiskStorage::open(&d).unwrap();
    s.initialize(&[1]).unwrap();
    s.append(&(1..=6).map(|i| entry(i, 1 + i / 4, "e")).collect::<Vec<_>>()).unwrap();
    s.compact(4, b"state at 4".to_vec()).unwrap();
    let check = |s: &DiskStorage| {
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (5, 6));
        assert_eq!(s.term(4).unwrap(), 2);
        assert!(matches!(s.term(3), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(
            s.entries(3, 6, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(s.snapshot_data(), (4, b"state at 4".to_vec()));
        let snap = s.snapshot(4, 2).unwrap();
        assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (4, 2));
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1]);
    };
    check(&s);
    drop(s);
    check(&DiskStorage::open(&d).unwrap());

    // A follower that installs a leader's snapshot drops its whole log.
    let f = dir("install");
    let s = DiskStorage::open(&f).unwrap();
    s.append(&[entry(1, 1, "old")]).unwrap();
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 10;
    snap.mut_metadata().term = 3;
    snap.mut_metadata().set_conf_state(ConfState { voters: vec![1, 2, 3], ..Default::default() });
    snap.data = b"state at 10".to_vec().into();
    s.apply_snapshot(&snap).unwrap();
    drop(s);
    let s = DiskStorage::open(&f).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (11, 10));
    assert_eq!(s.initial_state().unwrap().hard_state.commit, 10);
    assert_eq!(s.snapshot_data(), (10, b"state at 10".to_vec()));

    // A crash after the snapshot was installed and before the state was written (found by
    // the chaos tests' crash-points): the state file predates the snapshot; the snapshot wins.
    let old_state = std::fs::read(f.join("state")).unwrap();
    snap.mut_metadata().index = 20;
    snap.mut_metadata().term = 4;
    snap.mut_metadata().set_conf_state(ConfState { voters: vec![1, 2, 4], ..Default::default() });
    s.apply_snapshot(&snap).unwrap();
    drop(s);
    std::fs::write(f.join("state"), old_state).unwrap();
    let s = DiskStorage::open(&f).unwrap();
    let state = s.initial_state().unwrap();
    assert_eq!((state.hard_state.commit, state.hard_state.term), (20, 4));
    assert_eq!(state.conf_state.voters, vec![1, 2, 4]);
    let config = Config { id: 1, applied: 20, ..Default::default() };
    RawNode::new(&config, s, &raft::default_logger()).unwrap();
}

/// Runs one Ready of a single-node group the way the coordinator's loop will: persist entries
/// and hard state, then (nothing to send) hand back, collecting committed entries.
fn handle_ready(node: &mut RawNode<DiskStorage>, store: &DiskStorage, committed: &mut Vec<Vec<u8>>) {
    if !node.has_ready() {
        return;
    }
    let mut ready = node.ready();
    store.append(ready.entries()).unwrap();
    if let Some(hs) = ready.hs() {
        store.set_hard_state(hs).unwrap();
    }
    committed
        .extend(ready.take_committed_entries().into_iter().filter(|e| !e.data.is_empty()).map(|e| e.data.to_vec()));
    let mut light = node.advance(ready);
    if let Some(commit) = light.commit_index() {
        store.set_commit(commit).unwrap();
    }
    committed
        .extend(light.take_committed_entries().into_iter().filter(|e| !e.data.is_empty()).map(|e| e.data.to_vec()));
    node.advance_apply();
}

#[test]
fn raft_rs_runs_on_it_and_restarts_from_it() {
    let d = dir("rawnode");
    let logger = raft::default_logger();
    let config = Config { id: 1, election_tick: 10, heartbeat_tick: 3, ..Default::default() };
    let store = DiskStorage::open(&d).unwrap();
    store.initialize(&[1]).unwrap();
    let mut node = RawNode::new(&config, store.clone(), &logger).unwrap();
    node.campaign().unwrap();
    let mut committed = Vec::new();
    handle_ready(&mut node, &store, &mut committed);
    for i in 0..5 {
        node.propose(vec![], format!("cmd{i}").into_bytes()).unwrap();
        handle_ready(&mut node, &store, &mut committed);
    }
    assert_eq!(committed, (0..5).map(|i| format!("cmd{i}").into_bytes()).collect::<Vec<_>>());
    let (last, term) = (store.last_index().unwrap(), node.raft.term);
    drop(node);
    drop(store);

    // Restart: the log, the term and the commit index come back from disk.
    let store = DiskStorage::open(&d).unwrap();
    let config = Config { applied: 0, ..config };
    let node = RawNode::new(&config, store.clone(), &logger).unwrap();
    assert_eq!(store.last_index().unwrap(), last);
    assert_eq!(node.raft.term, term);
    assert_eq!(node.raft.raft_log.committed, last);
}
