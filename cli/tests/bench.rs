//! `tandem bench` refuses settings it cannot measure with a clear error, before writing
//! anything, never with a panic.

#![allow(clippy::unwrap_used)] // tests unwrap fixtures and results by design

mod common;

use common::TANDEM;
use tandem_testkit::Scratch;

#[test]
fn a_serving_benchmark_of_nothing_is_refused_by_name() {
    let scratch = Scratch::new("bench-serve-zero");
    let dir = scratch.join("bench");
    for (flag, value) in [("--adapters", "0"), ("--requests", "0"), ("--output-len", "0")] {
        let args = ["bench", "serve", "--preset", "tiny", flag, value, "--dir", dir.to_str().unwrap()];
        let (ok, _, err) = TANDEM.run(&args);
        assert!(!ok, "{flag} {value} was accepted");
        assert!(err.contains(&format!("{flag} must be at least 1")), "{flag}: {err}");
        assert!(!err.contains("panicked"), "{flag}: {err}");
        assert!(!dir.exists(), "{flag}: it wrote to {} before refusing", dir.display());
    }
}
