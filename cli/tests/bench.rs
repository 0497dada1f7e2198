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
    let args = ["bench", "serve", "--preset", "tiny", "--adapters", "4", "--baseline-adapters", "4", "--dir"];
    let (ok, _, err) = TANDEM.run(&[&args[..], &[dir.to_str().unwrap()]].concat());
    assert!(!ok && err.contains("--baseline-adapters must be fewer than --adapters"), "{err}");
    assert!(!dir.exists(), "it wrote to {} before refusing", dir.display());
}

#[test]
fn a_floor_for_a_ratio_the_benchmark_lacks_is_refused() {
    let (ok, _, err) = TANDEM.run(&["bench", "kernels", "--floor", "speed=2"]);
    assert!(!ok, "an unknown ratio was accepted");
    assert!(err.contains("no ratio \"speed\"") && err.contains("base/sgmv"), "{err}");
    let (ok, _, err) = TANDEM.run(&["bench", "kernels", "--floor", "base/sgmv"]);
    assert!(!ok && err.contains("RATIO=MIN"), "{err}");
}

/// The same small measurement passes a floor it reaches and fails one it cannot, naming the ratio.
#[test]
fn a_ratio_below_its_floor_fails_the_benchmark() {
    let small = ["bench", "kernels", "--m", "4", "--d", "64", "--reps", "1", "--adapters", "2", "--lora-tokens", "8"];
    let (ok, out, err) = TANDEM.run(&[&small[..], &["--floor", "base/sgmv=0", "--floor", "matmul/gemm=0"]].concat());
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("floor base/sgmv:") && out.contains("floor matmul/gemm:"), "{out}");
    let (ok, out, err) = TANDEM.run(&[&small[..], &["--floor", "base/bgmv=1e9"]].concat());
    assert!(!ok, "an unreachable floor passed: {out}");
    assert!(err.contains("below the floor: base/bgmv"), "{err}");
}
