//! A coordinator's Raft log folder as a crash, a bad disk or a hand edit may leave it: records
//! whose checksums hold but whose protobuf, indices or terms are anything, and a torn tail.
//! Opening it either fails with an error or gives a log raft-rs can read end to end, and an
//! entry appended to it is there, with all the others, when the folder is opened again.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use raft::eraftpb::Entry;
use raft::{GetEntriesContext, Storage};
use tandem_coordinator::raft_log::{DiskStorage, frame};

#[derive(Arbitrary, Debug)]
struct Folder {
    snapshot: Vec<Vec<u8>>,
    state: Vec<Vec<u8>>,
    log: Vec<Vec<u8>>,
    torn_tail: Vec<u8>,
}

fn records(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = Vec::new();
    for p in payloads {
        frame(&mut buf, p);
    }
    buf
}

/// Every entry, read through raft-rs's interface; checks the indices follow one another.
fn all_entries(log: &DiskStorage) -> Vec<Entry> {
    let (first, last) = (log.first_index().unwrap(), log.last_index().unwrap());
    assert!(first <= last + 1, "first index {first} after last {last} + 1");
    let entries = log.entries(first, last + 1, None, GetEntriesContext::empty(false)).expect("the whole log");
    for (e, index) in entries.iter().zip(first..) {
        assert_eq!(e.index, index, "entries out of order");
        assert!(log.term(index).is_ok());
    }
    assert!(log.term(first - 1).is_ok(), "the snapshot's term");
    entries
}

fuzz_target!(|folder: Folder| {
    let dir = tandem_fuzz::scratch("raft");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    tandem_fuzz::put(&dir.join("snapshot"), &records(&folder.snapshot));
    tandem_fuzz::put(&dir.join("state"), &records(&folder.state));
    let mut log = records(&folder.log);
    log.extend_from_slice(&folder.torn_tail);
    tandem_fuzz::put(&dir.join("log"), &log);

    let Ok(storage) = DiskStorage::open(&dir) else { return };
    let _ = storage.initial_state().unwrap();
    let mut entries = all_entries(&storage);
    let last = storage.last_index().unwrap();
    let Some(next) = last.checked_add(1) else { return };
    let term = storage.term(last).unwrap();
    let entry = Entry { index: next, term, data: b"appended".to_vec().into(), ..Default::default() };
    storage.append(std::slice::from_ref(&entry)).expect("an append at the end");
    entries.push(entry);
    drop(storage);
    let reopened = DiskStorage::open(&dir).expect("the folder just written opens");
    assert_eq!(all_entries(&reopened), entries, "the log read back differs from what was appended");
});
