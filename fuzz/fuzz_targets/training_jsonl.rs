//! A JSONL training file from outside: the gateway's upload check (no tokenizer) and the
//! worker's loader (with one) never panic, and a file the upload check accepts is one the
//! worker can train on: every example it counted loads into a sequence with tokens to learn.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_worker::train::data::{check_jsonl, load_jsonl};

fuzz_target!(|data: &[u8]| {
    let path = tandem_fuzz::scratch("train.jsonl");
    tandem_fuzz::put(&path, data);
    let checked = check_jsonl(&path);
    let loaded = load_jsonl(&path, tandem_fuzz::tokenizer(), 1 << 20);
    if let Ok(count) = checked {
        let examples =
            loaded.unwrap_or_else(|e| panic!("accepted on upload ({count} examples), refused by the worker: {e}"));
        assert_eq!(examples.len() as u64, count);
        for e in &examples {
            assert_eq!(e.tokens.len(), e.targets.len());
        }
    }
});
