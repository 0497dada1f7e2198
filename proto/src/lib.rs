//! Protobuf messages and gRPC services shared by Tandem's processes.
//!
//! The `.proto` sources live in `proto/proto/`; `build.rs` generates the Rust code with
//! tonic-prost-build and a vendored `protoc`.

/// Version 1 of the Tandem wire protocol.
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}
