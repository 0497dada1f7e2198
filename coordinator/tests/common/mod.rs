//! Helpers shared by test files (each includes this folder as `mod common;`).

pub mod etcd;
