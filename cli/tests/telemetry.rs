//! What an operator sees of a running cluster. Traces and logs across processes: a completion
//! sent to the gateway with a W3C `traceparent` is one trace in the coordinator's process and
//! the worker's, both exporting their spans over OTLP/gRPC to a receiver this test runs (the
//! collector's own service, built from the OTLP protobuf definitions); the gateway's JSON log
//! lines carry the trace id, and the response names it. Metrics: every series that
//! docs/observability.md lists is on the gateway's `/metrics` or the worker's metrics port, its
//! histograms observed; the metrics ports answer an operator's certificate only.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};
use tandem_proto::tls::Role;
use tandem_testkit::http::{http_with_headers, scrape};
use tandem_testkit::{MiniCluster, free_addr};

use common::{TANDEM, random_adapter};

const KEY: &str = "sk-test-admin";

/// Every span received, with the `service.name` of the process that sent it.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<(String, Span)>>>);

impl Receiver {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource in request.resource_spans {
            let service = (resource.resource.iter().flat_map(|r| &r.attributes))
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.clone());
            let service = match service {
                Some(AnyValue::StringValue(s)) => s,
                _ => String::new(),
            };
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push((service.clone(), span));
            }
        }
    }

    /// The spans of `trace` received so far.
    fn trace(&self, trace: &str) -> Vec<(String, Span)> {
        let spans = self.0.lock().unwrap().clone();
        spans.into_iter().filter(|(_, s)| hex(&s.trace_id) == trace).collect()
    }

    /// Every span named `name`, of any trace.
    fn named(&self, name: &str) -> Vec<Span> {
        let spans = self.0.lock().unwrap().clone();
        spans.into_iter().filter(|(_, s)| s.name == name).map(|(_, s)| s).collect()
    }

    /// Waits up to 10 s for `trace` to hold a span of each of `services`.
    fn wait_for(&self, trace: &str, services: &[&str]) -> Vec<(String, Span)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.trace(trace);
            if services.iter().all(|svc| spans.iter().any(|(s, _)| s == svc)) || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// OTLP over gRPC: the collector's own service.
#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// OTLP over HTTP/protobuf: `POST /v1/traces` with an `ExportTraceServiceRequest` body, on each
/// connection until the exporter closes it.
fn serve_otlp_http(listener: std::net::TcpListener, receiver: Receiver) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let receiver = receiver.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let (mut line, mut path, mut length) = (String::new(), String::new(), 0);
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    path.push_str(line.split(' ').nth(1).unwrap_or_default());
                    while line != "\r\n" {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = n.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    assert_eq!(path, "/v1/traces");
                    receiver.take(ExportTraceServiceRequest::decode(body.as_slice()).unwrap());
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    stream.write_all(ok).unwrap();
                }
            });
        }
    });
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A receiver of OTLP over gRPC on a free port, served by the returned runtime (keep it): its
/// spans, and the endpoint to export to.
fn otlp_grpc() -> (tokio::runtime::Runtime, Receiver, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let receiver = Receiver::default();
    let otlp = free_addr();
    let serve = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve(otlp.parse().unwrap());
    rt.spawn(serve);
    (rt, receiver, format!("http://{otlp}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_request_is_one_trace_across_the_gateway_and_the_worker() {
    let (_rt, receiver, endpoint) = otlp_grpc();
    let mut cluster = MiniCluster::builder(TANDEM, "telemetry")
        .gateway(KEY)
        .args(&["--log-format", "json", "--otlp-endpoint", &endpoint])
        .metrics_ports()
        .start();
    cluster.register_model("tiny");
    cluster.wait_alive(1);

    let (trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace}-{caller_span}-01");
    let req = json!({"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}).to_string();
    let (status, headers, body) =
        http_with_headers(cluster.http(), "POST", "/v1/completions", KEY, &[("traceparent", &traceparent)], &req);
    assert_eq!(status, 200, "{body}");
    let request_id = |headers: &[(String, String)]| {
        headers.iter().find(|(n, _)| n == "x-request-id").map(|(_, v)| v.clone()).unwrap_or_default()
    };
    assert_eq!(request_id(&headers), trace, "the response names the caller's trace");

    // Without a traceparent (or with one that does not parse) the gateway starts a new trace.
    for extra in [&[][..], &[("traceparent", "00-not-a-trace-01")][..]] {
        let (status, headers, body) = http_with_headers(cluster.http(), "POST", "/v1/completions", KEY, extra, &req);
        assert_eq!(status, 200, "{body}");
        let id = request_id(&headers);
        assert!(id.len() == 32 && id != trace && id.chars().any(|c| c != '0'), "a new trace id: {id:?}");
    }

    // A streamed completion too, then every documented series is on the gateway's /metrics.
    let streamed = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 4, "stream": true, "seed": 3}).to_string();
    let (status, _, body) = http_with_headers(cluster.http(), "POST", "/v1/completions", KEY, &[], &streamed);
    assert_eq!(status, 200, "{body}");
    // And one with an adapter, loaded from disk and paged into the pool for it.
    let adapter = cluster.dir().join("probe");
    random_adapter(&cluster.model, &adapter);
    let mut add = TANDEM.command();
    add.args(["adapters", "add", "probe", adapter.to_str().unwrap(), "--base-model", "tiny"]);
    let added = add.args(["--gateway", cluster.http(), "--api-key", KEY]).output().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let req = json!({"model": "probe", "prompt": "Hi", "max_tokens": 2, "temperature": 0}).to_string();
    let (status, _, body) = http_with_headers(cluster.http(), "POST", "/v1/completions", KEY, &[], &req);
    assert_eq!(status, 200, "{body}");
    let adapter_tokens = serde_json::from_str::<Value>(&body).unwrap()["usage"]["completion_tokens"].as_u64().unwrap();
    // Five requests: 3 + 3 + 3 + 4 tokens, and the adapter's.
    every_documented_series_is_exported(&cluster, 5, 13 + adapter_tokens);

    // A request that writes the replicated state: its proposal's commit and apply are in its trace.
    let key_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let traceparent = format!("00-{key_trace}-{caller_span}-01");
    let body = json!({"tenant": "alice"}).to_string();
    let (status, _, out) =
        http_with_headers(cluster.http(), "POST", "/v1/admin/api-keys", KEY, &[("traceparent", &traceparent)], &body);
    assert_eq!(status, 200, "{out}");

    // Each process flushes its spans as it stops.
    assert!(cluster.procs.terminate(1), "the worker did not stop cleanly");
    assert!(cluster.procs.terminate(0), "the coordinator did not stop cleanly");
    let ours = receiver.wait_for(trace, &["tandem-coordinator", "tandem-worker"]);
    let names: Vec<String> = ours.iter().map(|(svc, s)| format!("{svc}/{}", s.name)).collect();

    // The span tree: the caller's span > the gateway's `http` > its `auth`, `route` and
    // `worker` (the attempt on a worker) > the worker's `grpc` > the request's `queue`, `prefill`
    // and `decode` there, one after another.
    let span = |service: &str, name: &str| -> &Span {
        let found = ours.iter().find(|(svc, s)| svc == service && s.name == name);
        found.map(|(_, s)| s).unwrap_or_else(|| panic!("no {service}/{name} span in the trace: {names:?}"))
    };
    let gateway = span("tandem-coordinator", "http");
    assert_eq!(hex(&gateway.parent_span_id), caller_span);
    assert_eq!(attribute(gateway, "path").as_deref(), Some("/v1/completions"));
    for child in ["auth", "route", "worker"] {
        assert_eq!(span("tandem-coordinator", child).parent_span_id, gateway.span_id, "{child}: {names:?}");
    }
    let attempt = span("tandem-coordinator", "worker");
    assert_eq!(attribute(attempt, "worker").as_deref(), Some(cluster.workers[0].as_str()));
    let worker = span("tandem-worker", "grpc");
    assert_eq!(attribute(worker, "method").as_deref(), Some("/tandem.v1.Worker/Generate"));
    assert_eq!(worker.parent_span_id, attempt.span_id, "the worker's span is not the attempt's child: {names:?}");
    let phases = ["queue", "prefill", "decode"].map(|name| span("tandem-worker", name));
    // Each phase starts where the one before ended; the first after the call began (within a
    // millisecond: two clocks are read).
    let mut at = worker.start_time_unix_nano.saturating_sub(1_000_000);
    for phase in phases {
        assert_eq!(phase.parent_span_id, worker.span_id, "{}: {names:?}", phase.name);
        let (start, end) = (phase.start_time_unix_nano, phase.end_time_unix_nano);
        assert!(at <= start && start <= end, "{} from {start} to {end}, after {at}", phase.name);
        at = end;
    }
    // Three greedy tokens: the first from the prefill, two decode iterations.
    assert_eq!(attribute(phases[2], "batches").as_deref(), Some("2"));

    // The key's trace: the gateway's `http` > the coordinator's `grpc` Propose (its cluster
    // service, reached over gRPC) > `raft_propose` (until committed) then `raft_apply`.
    let keys = receiver.trace(key_trace);
    let names: Vec<String> = keys.iter().map(|(svc, s)| format!("{svc}/{}", s.name)).collect();
    let find = |name: &str, method: Option<&str>| -> &Span {
        let found = keys
            .iter()
            .find(|(_, s)| s.name == name && method.is_none_or(|m| attribute(s, "method").as_deref() == Some(m)));
        found.map(|(_, s)| s).unwrap_or_else(|| panic!("no {name} span in the key's trace: {names:?}"))
    };
    let propose = find("grpc", Some("/tandem.v1.Cluster/Propose"));
    let (committing, applying) = (find("raft_propose", None), find("raft_apply", None));
    assert_eq!(
        (committing.parent_span_id.clone(), applying.parent_span_id.clone()),
        (propose.span_id.clone(), propose.span_id.clone())
    );
    assert!(committing.end_time_unix_nano <= applying.start_time_unix_nano, "{names:?}");

    // The gateway's log line for the request, as JSON, carries the trace id.
    let log = std::fs::read_to_string(cluster.dir().join("logs/coordinator.log")).unwrap();
    let answered: Vec<Value> = (log.lines())
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["fields"]["message"] == "answered" && v["spans"][0]["trace_id"] == trace)
        .collect();
    assert_eq!(answered.len(), 1, "one JSON log line answers the traced request:\n{log}");
    assert_eq!(answered[0]["fields"]["status"], 200);
}

#[test]
fn a_request_to_a_worker_group_is_one_trace_across_three_processes() {
    let (_rt, receiver, endpoint) = otlp_grpc();
    let mut cluster = MiniCluster::builder(TANDEM, "telemetry-group")
        .workers(2)
        .gateway(KEY)
        .group_workers(5000, 10000)
        .args(&["--otlp-endpoint", &endpoint])
        .start();
    cluster.register_model("tiny");
    cluster.wait_alive(2);
    let group = json!({"model": "tiny", "size": 2, "group": "tp"});
    let (status, out) = tandem_testkit::http::call_json(cluster.http(), "POST", "/v1/admin/groups", KEY, Some(group));
    assert_eq!(status, 200, "{out}");
    tandem_testkit::wait_for(40, "group tp formed", || {
        let (_, list) = tandem_testkit::http::call_json(cluster.http(), "GET", "/v1/admin/groups", KEY, None);
        (list["data"][0]["formed"] == true).then_some(())
    });

    let (trace, caller_span) = ("6bf92f3577b34da6a3ce929d0e0e4738", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace}-{caller_span}-01");
    let req = json!({"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}).to_string();
    let (status, _, body) =
        http_with_headers(cluster.http(), "POST", "/v1/completions", KEY, &[("traceparent", &traceparent)], &req);
    assert_eq!(status, 200, "{body}");
    for i in [2, 1, 0] {
        assert!(cluster.procs.terminate(i), "process {i} did not stop cleanly");
    }
    let spans = receiver.wait_for(trace, &["tandem-coordinator", "tandem-worker"]);
    let names: Vec<String> = spans.iter().map(|(svc, s)| format!("{svc}/{}", s.name)).collect();

    // The gateway's attempt > rank 0's `grpc` call > each pass rank 1 ran for it, in another
    // process: the prefill and the decode iterations of three greedy tokens.
    let attempt = spans.iter().find(|(svc, s)| svc == "tandem-coordinator" && s.name == "worker");
    let attempt = attempt.unwrap_or_else(|| panic!("no gateway attempt span: {names:?}")).1.clone();
    let rank0 = spans.iter().find(|(_, s)| s.name == "grpc" && s.parent_span_id == attempt.span_id);
    let rank0 = rank0.unwrap_or_else(|| panic!("no grpc span of rank 0 under the attempt: {names:?}")).1.clone();
    let follower: Vec<&Span> =
        (spans.iter()).filter(|(svc, s)| svc == "tandem-worker" && s.name == "rank_forward").map(|(_, s)| s).collect();
    assert!(follower.len() >= 3, "rank 1 ran the prefill and two decode passes for it: {names:?}");
    for pass in follower {
        assert_eq!(pass.parent_span_id, rank0.span_id, "{names:?}");
        assert_eq!(attribute(pass, "rank").as_deref(), Some("1"));
        assert!(rank0.start_time_unix_nano <= pass.start_time_unix_nano, "a pass before the call began");
    }
}

#[test]
fn a_fine_tuning_step_is_a_trace_of_its_microbatches_and_backward_passes() {
    let (_rt, receiver, endpoint) = otlp_grpc();
    let mut cluster =
        MiniCluster::builder(TANDEM, "telemetry-steps").gateway(KEY).args(&["--otlp-endpoint", &endpoint]).start();
    cluster.register_model("tiny");
    cluster.wait_alive(1);
    let lines: String = (0..16)
        .map(|i| format!("{}\n", json!({"prompt": format!("n{i} ="), "completion": format!(" {}", i % 7)})))
        .collect();
    let (status, file) = tandem_testkit::http::upload(cluster.http(), KEY, "train.jsonl", &lines);
    assert_eq!(status, 200, "{file}");
    let file: Value = serde_json::from_str(&file).unwrap();
    // Four optimizer steps (the API trains one microbatch per step).
    let hyper = json!({"n_epochs": 1, "batch_size": 4});
    let create = json!({"model": "tiny", "training_file": file["id"], "hyperparameters": hyper});
    let (status, job) =
        tandem_testkit::http::call_json(cluster.http(), "POST", "/v1/fine_tuning/jobs", KEY, Some(create));
    assert_eq!(status, 200, "{job}");
    let path = format!("/v1/fine_tuning/jobs/{}", job["id"].as_str().unwrap());
    tandem_testkit::wait_for(120, "the job to succeed", || {
        let (_, job) = tandem_testkit::http::call_json(cluster.http(), "GET", &path, KEY, None);
        assert!(!["failed", "cancelled"].contains(&job["status"].as_str().unwrap_or("")), "{job}");
        (job["status"] == "succeeded").then_some(())
    });
    assert!(cluster.procs.terminate(1), "the worker did not stop cleanly");

    // Four steps, each the root of its trace, with its microbatch, which has its forward pass
    // and the backward slices that went through every layer.
    let steps = receiver.named("finetune_step");
    assert_eq!(steps.len(), 4, "{steps:?}");
    let (microbatches, forwards, backwards) =
        (receiver.named("microbatch"), receiver.named("forward"), receiver.named("backward"));
    let layers = serde_json::from_str::<Value>(&std::fs::read_to_string(cluster.model.join("config.json")).unwrap())
        .unwrap()["num_hidden_layers"]
        .as_u64()
        .unwrap();
    for step in &steps {
        assert!(step.parent_span_id.is_empty(), "a step is a trace of its own");
        assert!(step.attributes.iter().any(|kv| kv.key == "loss"), "{step:?}");
        let mine: Vec<&Span> = microbatches.iter().filter(|m| m.parent_span_id == step.span_id).collect();
        assert_eq!(mine.len(), 1, "{}", attribute(step, "step").unwrap_or_default());
        for m in mine {
            assert_eq!(attribute(m, "tokens").map(|t| t.parse::<u64>().unwrap() > 0), Some(true));
            assert_eq!(forwards.iter().filter(|f| f.parent_span_id == m.span_id).count(), 1);
            let slices: Vec<&Span> = backwards.iter().filter(|b| b.parent_span_id == m.span_id).collect();
            let through: u64 = slices.iter().map(|b| attribute(b, "layers").unwrap().parse::<u64>().unwrap()).sum();
            assert_eq!(through, layers, "the backward went through every layer once");
            assert!(
                m.start_time_unix_nano <= m.end_time_unix_nano && step.start_time_unix_nano <= m.start_time_unix_nano
            );
        }
    }
}

#[test]
fn spans_go_over_otlp_http_too() {
    let receiver = Receiver::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    serve_otlp_http(listener, receiver.clone());
    let mut cluster = MiniCluster::builder(TANDEM, "telemetry-http")
        .gateway(KEY)
        .args(&["--otlp-endpoint", &endpoint, "--otlp-protocol", "http/protobuf"])
        .start();
    cluster.register_model("tiny");
    cluster.wait_alive(1);
    let req = json!({"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0}).to_string();
    let (status, headers, body) = http_with_headers(cluster.http(), "POST", "/v1/completions", KEY, &[], &req);
    assert_eq!(status, 200, "{body}");
    let trace = headers.iter().find(|(n, _)| n == "x-request-id").map(|(_, v)| v.clone()).unwrap();
    assert!(cluster.procs.terminate(1) && cluster.procs.terminate(0), "a process did not stop cleanly");
    let spans = receiver.wait_for(&trace, &["tandem-coordinator", "tandem-worker"]);
    let names: Vec<String> = spans.iter().map(|(svc, s)| format!("{svc}/{}", s.name)).collect();
    for want in ["tandem-coordinator/http", "tandem-worker/grpc", "tandem-worker/decode"] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
}

/// The series named in docs/observability.md's tables (`| `tandem:...` | type | ...`).
fn documented_series() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/observability.md")).unwrap();
    (doc.lines())
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`tandem:")?.strip_suffix('`')?;
            Some((format!("tandem:{name}"), cells.get(2)?.to_string()))
        })
        .collect()
}

/// The series deploy/observability's Grafana dashboard queries, by their family names.
fn dashboard_series() -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/observability/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("tandem:") {
                let name: String =
                    expr[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
                let family = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .fold(name.as_str(), |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
                names.insert(family.to_string());
            }
        }
    }
    assert!(names.len() >= 20, "the dashboard's queries were not read: {names:?}");
    names
}

/// Checks the series after `requests` answered requests that generated `tokens` tokens.
fn every_documented_series_is_exported(cluster: &MiniCluster, requests: u64, tokens: u64) {
    let (status, gateway) = tandem_testkit::http::http(cluster.http(), "GET", "/metrics", Some(KEY), None);
    assert_eq!(status, 200, "{gateway}");
    let operator = cluster.certs.operator();
    let (status, worker) = scrape(&cluster.metrics[1], &operator, Role::Worker).unwrap();
    assert_eq!(status, 200, "{worker}");
    let (status, coordinator) = scrape(&cluster.metrics[0], &operator, Role::Coordinator).unwrap();
    assert_eq!(status, 200, "{coordinator}");
    assert!(coordinator.contains("\ntandem:raft_term{coordinator=\"1\"} "), "{coordinator}");
    // The ports answer operators only: a worker's certificate is refused, and so is plain text.
    let (status, body) =
        scrape(&cluster.metrics[1], &cluster.certs.security(Role::Worker, "w1"), Role::Worker).unwrap();
    assert_eq!(status, 403, "{body}");
    let plain = scrape(&cluster.metrics[1], &tandem_proto::Security::Insecure, Role::Worker);
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    for text in [&gateway, &worker] {
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics text:\n{text}");
    }
    let text = format!("{gateway}{worker}");
    let series = documented_series();
    assert!(series.len() >= 25, "the tables of docs/observability.md were not read: {series:?}");
    for (name, kind) in &series {
        assert!(text.lines().any(|l| l == format!("# TYPE {name} {kind}")), "no {kind} {name} in\n{text}");
        if kind == "histogram" {
            // After traffic, at least one observation (labelled by base model or not at all).
            let observed = (text.lines())
                .filter(|l| l.starts_with(&format!("{name}_count")))
                .any(|l| l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()).is_some_and(|n| n > 0.0));
            assert!(observed, "{name} has no observation:\n{text}");
        }
    }
    // Every series the Grafana dashboard queries is one the processes export.
    for name in dashboard_series() {
        assert!(text.lines().any(|l| l.starts_with(&format!("# TYPE {name} "))), "the dashboard queries {name}");
    }
    for line in [
        format!("tandem:requests_total{{tenant=\"admin\",model=\"tiny\",code=\"200\"}} {requests}"),
        format!("tandem:generation_tokens_total{{tenant=\"admin\",model=\"tiny\"}} {tokens}"),
        "tandem:workers{state=\"alive\"} 1.0".to_string(),
        "tandem:raft_is_leader{coordinator=\"1\"} 1.0".to_string(),
        "tandem:num_requests_running{worker=\"w1\"} 0.0".to_string(),
        "tandem:adapter_requests{adapter=\"admin:probe\"} 1.0".to_string(),
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    let decoded = (worker.lines())
        .find_map(|l| l.strip_prefix("tandem:engine_tokens_total{worker=\"w1\",kind=\"decode\"} "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(decoded.is_some_and(|n| n > 0), "no decoded tokens counted:\n{worker}");
}
