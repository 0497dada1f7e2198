//! Protobuf messages and gRPC services shared by Tandem's processes.
//!
//! The `.proto` sources live in `proto/proto/`; `build.rs` generates the Rust code with
//! tonic-prost-build and a vendored `protoc`.

/// Version 1 of the Tandem wire protocol.
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::HealthCheckResponse;

    #[test]
    fn generated_messages_round_trip() {
        let msg = HealthCheckResponse { role: "worker".into(), version: "0.1.0".into() };
        let decoded = HealthCheckResponse::decode(msg.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, msg);
    }
}
