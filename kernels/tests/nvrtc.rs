//! The `.cu` kernels compile: every module through NVRTC, loaded the way the product loads it
//! (cudarc, at run time), for the architectures Tandem serves on, with no warning.
//!
//! Needs libnvrtc and no GPU; `.ci/run` installs it from PyPI (`nvidia-cuda-nvrtc`) and puts it on
//! `LD_LIBRARY_PATH`. Nothing here skips: without libnvrtc the test fails.
#![cfg(feature = "cuda")]

/// A100 (sm_80) and H100/H200 (sm_90).
const ARCHES: [&str; 2] = ["sm_80", "sm_90"];

#[test]
fn every_kernel_compiles_without_warnings() {
    for arch in ARCHES {
        if let Err(e) = tandem_kernels::cuda::compile_all_kernels(arch) {
            panic!("{arch}: {e}");
        }
    }
}

#[test]
fn an_unknown_architecture_is_an_error() {
    let err = tandem_kernels::cuda::compile_all_kernels("sm_1").expect_err("no such architecture");
    assert!(err.to_string().contains("sm_1"), "{err}");
}
