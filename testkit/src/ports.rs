//! Free loopback ports for the processes a test starts. A port is picked below the kernel's
//! ephemeral range (32768-60999 by default), checked free, and never handed out twice by one
//! process: a port taken from the ephemeral range and released can be given at once to any
//! outgoing connection on the machine (tests run in parallel and dial many), which then makes
//! the process that meant to listen on it fail with "address already in use".
//!
//! Self-contained so that the worker's own tests, below the testkit in the crate graph, include
//! this same file (`#[path]`).

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const LOW: u32 = 10_000;
const HIGH: u32 = 32_768;

static GIVEN: Mutex<Option<(u64, HashSet<u16>)>> = Mutex::new(None);

/// A loopback port nothing listens on now, not given before by this process.
pub fn free_port() -> u16 {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (state, seen) = given.get_or_insert_with(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        (nanos ^ (u64::from(std::process::id()) << 32), HashSet::new())
    });
    for _ in 0..10_000 {
        // xorshift64*: a different sequence in every process, so parallel test binaries spread.
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let port = (LOW + (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as u32 % (HIGH - LOW)) as u16;
        if !seen.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            seen.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{HIGH}");
}

/// A free loopback address, HOST:PORT (released for a process to take).
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}
