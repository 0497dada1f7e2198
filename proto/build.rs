//! Generates the tonic code: prost messages and services from `proto/`, and the
//! `tandem.v1.Cluster` service over the contract's serde types (`src/contract/`, carried by
//! `src/codec.rs`). `protoc` comes from `protoc-bin-vendored`, so no system protobuf compiler
//! is needed on a fresh machine.

use tonic_build::manual::{Builder, Method, Service};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    // Requests that do not decode are InvalidArgument, not tonic's Internal (`src/codec.rs`).
    tonic_prost_build::configure().codec_path("crate::codec::ProtoCodec").compile_protos(
        &[
            "proto/tandem/v1/health.proto",
            "proto/tandem/v1/coordinator.proto",
            "proto/tandem/v1/worker.proto",
            "proto/tandem/v1/api.proto",
        ],
        &["proto"],
    )?;
    // (name, route, request, answer): what every coordinator serves to workers, the gateway and
    // the CLI; a follower forwards what only the leader can do.
    let methods = [
        ("propose", "Propose", "Proposal", "Reply"),
        ("status", "Status", "StatusRequest", "GroupStatus"),
        ("register_worker", "RegisterWorker", "WorkerRegistration", "LeaseGrant"),
        ("heartbeat", "Heartbeat", "Heartbeat", "WorkerView"),
        ("change_members", "ChangeMembers", "MembershipChange", "Members"),
        ("transfer_leader", "TransferLeader", "LeaderTransfer", "Leader"),
    ];
    let mut cluster = Service::builder().name("Cluster").package("tandem.v1");
    for (name, route, input, output) in methods {
        cluster = cluster.method(
            Method::builder()
                .name(name)
                .route_name(route)
                .input_type(format!("crate::contract::{input}"))
                .output_type(format!("crate::contract::{output}"))
                .codec_path("crate::codec::SerdeCodec")
                .build(),
        );
    }
    Builder::new().compile(&[cluster.build()]);
    Ok(())
}
