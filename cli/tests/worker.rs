//! `tandem worker` as a process: it registers with a coordinator and holds its lease, and it
//! streams completions over gRPC that equal `tandem generate`'s; bad requests get clear errors;
//! it answers the cluster's coordinators and operators only, over mutual TLS.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::time::{Duration, Instant};

use tandem_proto::Security;
use tandem_proto::tls::Role;
use tandem_proto::v1::worker_client::WorkerClient;
use tandem_proto::v1::{ChatMessage, GenerateEvent, GenerateRequest};
use tandem_testkit::MiniCluster;

use common::TANDEM;

/// Every event of one request made with `security`, or its error.
async fn generate_as(
    security: &Security,
    addr: &str,
    req: GenerateRequest,
) -> Result<Vec<GenerateEvent>, tonic::Status> {
    let channel = security.endpoint(addr, Role::Worker).unwrap().connect().await;
    let channel = channel.map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let mut stream = WorkerClient::new(channel).generate(req).await?.into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await? {
        events.push(e);
    }
    Ok(events)
}

fn greedy(prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        max_tokens: Some(max_tokens),
        temperature: 0.0,
        top_p: 1.0,
        ..GenerateRequest::default()
    }
}

#[test]
fn a_worker_registers_and_streams_what_generate_prints() {
    let cluster = MiniCluster::builder(TANDEM, "worker").start();
    let (coord, worker, model) = (cluster.coordinator.as_str(), cluster.workers[0].as_str(), &cluster.model);
    let operator = cluster.certs.operator();
    let generate = |addr, req| generate_as(&operator, addr, req);

    // Registered, with its base model.
    let deadline = Instant::now() + Duration::from_secs(30);
    let operator_args = cluster.operator_args();
    let status = [&["status", "--json", "--coordinator", coord][..], &as_strs(&operator_args)].concat();
    loop {
        let (ok, out, _) = TANDEM.run(&status);
        if ok {
            let s: serde_json::Value = serde_json::from_str(&out).unwrap();
            if s["workers"]["w1"]["alive"] == true {
                assert_eq!(s["workers"]["w1"]["addr"], worker);
                assert_eq!(s["workers"]["w1"]["gpus"][0]["models"][0], "tiny");
                break;
            }
        }
        assert!(Instant::now() < deadline, "the worker never registered");
        std::thread::sleep(Duration::from_millis(100));
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    let events = loop {
        match rt.block_on(generate(worker, greedy("The cat sat on the", 12))) {
            Ok(events) => break events,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    };
    // Streamed: several events, the usage and finish on the last one only.
    assert!(events.len() > 1, "{events:?}");
    assert!(events[..events.len() - 1].iter().all(|e| e.finish_reason.is_empty()));
    let last = events.last().unwrap();
    assert_eq!((last.finish_reason.as_str(), last.completion_tokens), ("length", 12));
    let text: String = events.iter().map(|e| e.text.as_str()).collect();
    let ids: Vec<u32> = events.iter().flat_map(|e| e.token_ids.clone()).collect();
    let want = TANDEM.generate_greedy(model, "The cat sat on the", 12);
    assert_eq!(text, want["text"].as_str().unwrap());
    assert_eq!(serde_json::json!(ids), want["token_ids"]);
    assert_eq!(last.prompt_tokens as u64, want["prompt_tokens"].as_u64().unwrap());

    // Chat messages go through the model's chat template; logprobs come one per token.
    let chat = GenerateRequest {
        messages: vec![ChatMessage { role: "user".into(), content: "Hi there".into(), ..Default::default() }],
        logprobs: true,
        ..greedy("", 5)
    };
    let events = rt.block_on(generate(worker, chat)).unwrap();
    let n: usize = events.iter().map(|e| e.token_ids.len()).sum();
    assert_eq!(n, events.iter().map(|e| e.logprobs.len()).sum::<usize>());
    assert!(n >= 1 && events.last().unwrap().prompt_tokens > 3);

    // Bad requests: clear errors, and the worker keeps serving.
    let too_long = rt.block_on(generate(worker, greedy("Hello", 1_000_000))).unwrap_err();
    assert_eq!(too_long.code(), tonic::Code::InvalidArgument, "{too_long}");
    assert!(too_long.message().contains("context"), "{too_long}");
    let unknown = GenerateRequest { adapter: "nope".into(), ..greedy("Hello", 4) };
    let err = rt.block_on(generate(worker, unknown)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let bad = GenerateRequest { temperature: -1.0, ..greedy("Hello", 4) };
    assert_eq!(rt.block_on(generate(worker, bad)).unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(rt.block_on(generate(worker, greedy("Hello", 3))).unwrap().last().unwrap().completion_tokens, 3);

    // Only the cluster's coordinators and operators are served: plain text gets no answer, and
    // another worker's certificate is refused.
    let plain = rt.block_on(generate_as(&Security::Insecure, worker, greedy("Hello", 3))).unwrap_err();
    assert_ne!(plain.code(), tonic::Code::Ok, "{plain}");
    let other_worker = cluster.certs.security(Role::Worker, "w9");
    let denied = rt.block_on(generate_as(&other_worker, worker, greedy("Hello", 3))).unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
