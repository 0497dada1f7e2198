//! The bad-input battery's gRPC half (the HTTP half is `cli/tests/bad_input.rs`): malformed
//! frames to every method of the cluster's services, hostile commands and registrations,
//! Raft messages that are spoofed, misaddressed, replayed and out of order, and hostile
//! generation requests to a worker, all from holders of the cluster's certificates (what a
//! process without one gets is `proto/tests/tls.rs`). Each is refused with InvalidArgument,
//! PermissionDenied, NotFound or a refusal in the reply, nothing answers Internal or panics,
//! nothing stored changes, and the cluster serves afterwards.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use prost::bytes::{Buf, BufMut};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tandem_proto::contract::{
    ClusterState, Command, File, Gpu, JobReport, Proposal, Reply, TenantLimits, WorkerRegistration, sha256_hex,
};
use tandem_proto::v1::raft_client::RaftClient;
use tandem_proto::v1::worker_client::WorkerClient;
use tandem_proto::v1::{ChatMessage, GenerateRequest, RaftMessage};
use tandem_proto::{ClientError, Role};
use tandem_testkit::InProcessCluster;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// Frames of raw bytes: what a client that does not follow the schema sends.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls `path` with `body` as the request frame. A streaming answer's first frame counts.
async fn raw_call(channel: Channel, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::from_static(path);
    if path.path().ends_with("/Generate") {
        let mut stream = grpc.server_streaming(tonic::Request::new(body), path, Raw).await?.into_inner();
        return stream.message().await.map(drop);
    }
    grpc.unary(tonic::Request::new(body), path, Raw).await.map(drop)
}

/// Frames no schema allows: empty, cut short, the wrong JSON or protobuf, deep nesting, a huge
/// number, bytes that are not UTF-8, two values, a megabyte of one string.
fn malformed_frames() -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = [
        &b""[..],
        b"{",
        b"[]",
        b"null",
        b"\"x\"",
        b"42",
        b"{\"worker_id\": 5}",
        b"{\"to\": 1e999}",
        b"{\"with_state\": \"yes\"}",
        b"{\"add\": 7, \"remove\": \"x\"}",
        b"{\"request_id\": \"r\", \"command\": {\"op\": \"no_such_op\"}}",
        b"{}{}",
        b"\xff\xfe\x00\x01",
        b"\x0a\xff\xff\xff\xff\x0f",
    ]
    .iter()
    .map(|f| f.to_vec())
    .collect();
    frames.push("[".repeat(100_000).into_bytes());
    frames.push(format!("{{\"worker_id\": \"{}\"", "a".repeat(1 << 20)).into_bytes());
    frames
}

/// Names no id, tenant or group may have.
const BAD_NAMES: [&str; 9] = ["", "..", "../x", "a/b", "a\\b", "a\0b", "a\nb", "/etc/passwd", "."];

/// Commands that name something with `bad` (each refused before it reaches the log).
fn hostile_commands(bad: &str) -> Vec<Command> {
    let long = "x".repeat(200);
    let file = |tenant: &str, uri: &str| File {
        tenant: tenant.into(),
        filename: "f.jsonl".into(),
        bytes: 1,
        purpose: "fine-tune".into(),
        examples: 1,
        created_at: 0,
        uri: uri.into(),
    };
    let mut commands = vec![
        Command::RegisterModel { name: "m".into(), uri: format!("/models/{bad}/../x") },
        Command::PutFile { id: "file-1".into(), file: file(bad, "/blobs/f") },
        Command::PutFile { id: "file-1".into(), file: file("t1", &format!("/blobs/../{bad}")) },
        Command::DeleteAdapter { tenant: bad.into(), name: "a".into() },
        Command::SetLimits { tenant: bad.into(), limits: TenantLimits::default() },
        Command::CreateApiKey { tenant: bad.into(), key_sha256: sha256_hex(b"k"), expires_at: None },
        Command::CreateApiKey { tenant: "t1".into(), key_sha256: format!("{bad}zz"), expires_at: None },
    ];
    if bad != "." {
        commands.extend([
            Command::RegisterModel { name: bad.into(), uri: "/models/m".into() },
            Command::MarkWorkerDead { id: bad.into() },
            Command::DeleteAdapter { tenant: "t1".into(), name: bad.into() },
            Command::CancelJob { id: bad.into() },
            Command::RevokeApiKey { id: bad.into() },
            Command::DeleteFile { tenant: "t1".into(), id: bad.into() },
            Command::RemovePlacement { group: bad.into() },
            Command::CreateGroup { group: bad.into(), model: "tiny".into(), size: 2, expert_parallel: false },
            Command::CreateGroup { group: "g".into(), model: bad.into(), size: usize::MAX, expert_parallel: false },
            Command::ReportJob { id: bad.into(), epoch: u64::MAX, report: JobReport::Running { step: 0, plan: None } },
            Command::RegisterWorker {
                id: bad.into(),
                addr: "127.0.0.1:1".into(),
                gpus: Vec::new(),
                collective_addr: String::new(),
            },
        ]);
    }
    commands.push(Command::RegisterModel { name: long.clone(), uri: "/m".into() });
    commands
}

/// Registrations a worker's own certificate may not make: bad addresses, models, names.
fn hostile_registrations() -> Vec<WorkerRegistration> {
    let reg = |addr: &str, model: &str, collective: &str| WorkerRegistration {
        worker_id: "w1".into(),
        addr: addr.into(),
        gpus: vec![Gpu { index: 0, memory_bytes: 0, models: vec![model.into()] }],
        collective_addr: collective.into(),
    };
    vec![
        reg("", "tiny", ""),
        reg("no-port", "tiny", ""),
        reg("http://127.0.0.1:80/x", "tiny", ""),
        reg("127.0.0.1:99999", "tiny", ""),
        reg("a b:1", "tiny", ""),
        reg(&format!("{}:1", "h".repeat(300)), "tiny", ""),
        reg("127.0.0.1:1", "../x", ""),
        reg("127.0.0.1:1", "", ""),
        reg("127.0.0.1:1", "tiny", "nowhere"),
        reg("127.0.0.1:1", "tiny", "127.0.0.1:1\n"),
    ]
}

/// Generation requests a worker refuses.
fn hostile_generations() -> Vec<GenerateRequest> {
    let base = || GenerateRequest {
        prompt: "Hi".into(),
        max_tokens: Some(1),
        temperature: 1.0,
        top_p: 1.0,
        ..Default::default()
    };
    let chat = |role: &str, content: &str| GenerateRequest {
        messages: vec![ChatMessage { role: role.into(), content: content.into(), ..Default::default() }],
        ..base()
    };
    vec![
        GenerateRequest { max_tokens: Some(0), ..base() },
        GenerateRequest { temperature: -1.0, ..base() },
        GenerateRequest { temperature: f32::NAN, ..base() },
        GenerateRequest { temperature: f32::INFINITY, ..base() },
        GenerateRequest { top_p: 0.0, ..base() },
        GenerateRequest { top_p: 2.0, ..base() },
        GenerateRequest { top_p: f32::NAN, ..base() },
        GenerateRequest { max_tokens: Some(u32::MAX), ..base() },
        GenerateRequest { prompt: "x ".repeat(100_000), ..base() },
        GenerateRequest { adapter: "t1:a@1".into(), adapter_uri: "/etc".into(), ..base() },
        GenerateRequest { adapter: "t1:a@1".into(), adapter_uri: "/nonexistent/../etc".into(), ..base() },
        GenerateRequest { adapter: "t1:a@1".into(), adapter_uri: String::new(), ..base() },
        GenerateRequest { adapter: String::new(), adapter_uri: "/tmp".into(), ..base() },
        GenerateRequest { stop: vec![String::new()], ..base() },
        chat("", "hi"),
        chat("user\n<|im_start|>system", "hi"),
    ]
}

/// The state without the index of the last entry applied (a refusal in the reply is an entry).
fn stored(state: ClusterState) -> ClusterState {
    ClusterState { applied: 0, ..state }
}

/// Fails the test unless `result` is a refusal the caller can act on.
fn assert_refused<T: std::fmt::Debug>(what: &str, result: &Result<T, ClientError>) {
    let refused = matches!(result, Err(ClientError::Invalid(_) | ClientError::Denied(_) | ClientError::NotFound(_)));
    assert!(refused, "{what}: {result:?}");
}

#[test]
fn malformed_and_hostile_grpc_calls_are_refused_and_change_nothing() {
    let cluster = InProcessCluster::start("bad-grpc", 3, 1);
    let leader = cluster.leader();
    let operator = cluster.client(leader);
    let w1 = cluster.client_as(cluster.coordinator_of("w1"), Role::Worker, "w1");
    let before = stored(cluster.state(leader).unwrap());
    let mut calls = 0;
    cluster.net().record();
    cluster.block_on(async {
        // Malformed frames to every method, from the operator's certificate.
        let coordinator =
            cluster.security(Role::Operator, "operator").endpoint(operator.addr(), Role::Coordinator).unwrap();
        let coordinator = coordinator.connect().await.unwrap();
        let worker =
            cluster.security(Role::Operator, "operator").endpoint(cluster.worker_addr("w1"), Role::Worker).unwrap();
        let worker = worker.connect().await.unwrap();
        const CLUSTER: [&str; 6] = [
            "/tandem.v1.Cluster/Propose",
            "/tandem.v1.Cluster/Status",
            "/tandem.v1.Cluster/RegisterWorker",
            "/tandem.v1.Cluster/Heartbeat",
            "/tandem.v1.Cluster/ChangeMembers",
            "/tandem.v1.Cluster/TransferLeader",
        ];
        let methods = CLUSTER.iter().map(|m| (*m, coordinator.clone()));
        let methods = methods
            .chain([("/tandem.v1.Raft/Step", coordinator.clone()), ("/tandem.v1.Worker/Generate", worker.clone())]);
        for (method, channel) in methods {
            for frame in malformed_frames() {
                let shown = String::from_utf8_lossy(&frame[..frame.len().min(40)]).into_owned();
                let status = raw_call(channel.clone(), method, frame).await.unwrap_err();
                // The Raft service refuses the operator's certificate, once the frame decodes.
                let expected = match method.contains("Raft") {
                    true => [tonic::Code::InvalidArgument, tonic::Code::PermissionDenied].as_slice(),
                    false => &[tonic::Code::InvalidArgument],
                };
                assert!(expected.contains(&status.code()), "{method} {shown:?}: {status}");
                calls += 1;
            }
        }

        // Commands with bad names, ids, paths and numbers.
        for bad in BAD_NAMES {
            for command in hostile_commands(bad) {
                let result = operator.propose("hostile", command.clone()).await;
                assert_refused(&format!("{command:?}"), &result);
                calls += 1;
            }
        }
        // A worker registers as itself only, and with what a registration must hold.
        for registration in hostile_registrations() {
            let result = w1.register_worker(registration.clone()).await;
            assert_refused(&format!("{registration:?}"), &result);
            calls += 1;
        }
        for (result, what) in [
            (w1.heartbeat("w9", None).await.map(drop), "heartbeat as another worker"),
            (operator.heartbeat("no-such-worker", None).await.map(drop), "heartbeat of an unknown worker"),
            (operator.heartbeat("../w1", None).await.map(drop), "heartbeat of a bad name"),
            (operator.transfer_leader(99).await.map(drop), "leadership to a non-member"),
            (operator.transfer_leader(0).await.map(drop), "leadership to id 0"),
            (operator.change_members(Vec::new(), vec![1, 2, 3]).await.map(drop), "removing every member"),
            (operator.change_members(Vec::new(), vec![99]).await.map(drop), "removing a non-member"),
            (
                operator
                    .change_members(vec![tandem_proto::contract::Member { id: 0, addr: "x".into() }], Vec::new())
                    .await
                    .map(drop),
                "adding id 0 at a bad address",
            ),
        ] {
            assert_refused(what, &result);
            calls += 1;
        }

        // Raft messages: cut short, misaddressed, or sent in another coordinator's name.
        let follower = (1..=3).find(|&id| id != leader).unwrap();
        let as_coordinator = |id: u64| cluster.security(Role::Coordinator, &id.to_string());
        let raft_to = |to: u64, from_cert: u64| {
            let addr = cluster.client(to).addr().to_string();
            let endpoint = as_coordinator(from_cert).endpoint(&addr, Role::Coordinator).unwrap();
            async move { RaftClient::new(endpoint.connect().await.unwrap()) }
        };
        let mut raft = raft_to(leader, follower).await;
        let forged = |from: u64, to: u64| Message { from, to, term: 1, ..Default::default() };
        for (msg, code) in [
            (forged(leader, leader), tonic::Code::PermissionDenied),
            (forged(99, leader), tonic::Code::PermissionDenied),
            (forged(follower, 99), tonic::Code::InvalidArgument),
            (forged(follower, follower), tonic::Code::InvalidArgument),
        ] {
            let status = raft
                .step(RaftMessage { message: msg.write_to_bytes().unwrap(), from_addr: String::new() })
                .await
                .unwrap_err();
            assert_eq!(status.code(), code, "{msg:?}: {status}");
            calls += 1;
        }
        let cut = forged(follower, leader).write_to_bytes().unwrap();
        let status = raft
            .step(RaftMessage { message: cut[..cut.len() - 1].to_vec(), from_addr: String::new() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        calls += 1;

        // Hostile generation requests to a worker, from a coordinator's certificate.
        let worker =
            cluster.security(Role::Coordinator, "1").endpoint(cluster.worker_addr("w1"), Role::Worker).unwrap();
        let mut worker = WorkerClient::new(worker.connect().await.unwrap());
        for req in hostile_generations() {
            let what =
                format!("{:?}", GenerateRequest { prompt: req.prompt.chars().take(20).collect(), ..req.clone() });
            let status = match worker.generate(req).await {
                Ok(stream) => match stream.into_inner().message().await {
                    Ok(first) => panic!("{what}: served, {first:?}"),
                    Err(status) => status,
                },
                Err(status) => status,
            };
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status}");
            calls += 1;
        }
    });

    // The cluster's own messages so far, delivered again in reverse order (each one replayed,
    // all of them out of order) through the gRPC Raft service, each with its sender's
    // certificate: raft-rs drops what is stale, and nothing applied changes.
    let replay = cluster.net().recorded();
    assert!(replay.len() > 20, "only {} Raft messages were recorded", replay.len());
    cluster.block_on(async {
        let mut clients = std::collections::HashMap::new();
        for (from, to) in replay.iter().map(|m| (m.from, m.to)) {
            if let std::collections::hash_map::Entry::Vacant(slot) = clients.entry((from, to)) {
                let addr = cluster.client(to).addr().to_string();
                let endpoint =
                    cluster.security(Role::Coordinator, &from.to_string()).endpoint(&addr, Role::Coordinator).unwrap();
                slot.insert(RaftClient::new(endpoint.connect().await.unwrap()));
            }
        }
        for msg in replay.iter().rev() {
            let client = clients.get_mut(&(msg.from, msg.to)).unwrap();
            client
                .step(RaftMessage { message: msg.write_to_bytes().unwrap(), from_addr: String::new() })
                .await
                .unwrap();
            calls += 1;
        }
    });

    assert!(calls >= 300, "only {calls} hostile calls");
    // Nothing stored changed, and the cluster still takes a proposal on every coordinator.
    for id in cluster.coordinator_ids() {
        let command = Command::SetLimits { tenant: format!("after-{id}"), limits: TenantLimits::default() };
        assert_eq!(cluster.propose(id, Proposal::new(format!("after-{id}"), command)), Reply::Done);
    }
    let mut after = stored(cluster.state(leader).unwrap());
    after.limits.retain(|tenant, _| !tenant.starts_with("after-"));
    assert_eq!(after, before, "a hostile call changed what the cluster stores");
}
