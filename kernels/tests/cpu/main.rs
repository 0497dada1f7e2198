//! CPU tests of the kernels: every backward against central finite differences, the multi-LoRA
//! and paged-attention kernels against plain reference loops, property tests over random shapes,
//! and the errors bad input gets. One test binary, to keep link time down.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions unwrap too

mod common;
mod errors;
mod grad;
mod props;
mod reference;
