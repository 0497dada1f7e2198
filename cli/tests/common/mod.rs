//! The binary these tests run, for tandem-testkit's process harness: only this crate's tests
//! know where cargo built it.

use tandem_testkit::Tandem;

pub const TANDEM: Tandem = Tandem::new(env!("CARGO_BIN_EXE_tandem"));
