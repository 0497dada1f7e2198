//! Generates the tonic/prost code. `protoc` comes from `protoc-bin-vendored`, so no system
//! protobuf compiler is needed on a fresh machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/tandem/v1/health.proto",
            "proto/tandem/v1/coordinator.proto",
            "proto/tandem/v1/worker.proto",
            "proto/tandem/v1/api.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
