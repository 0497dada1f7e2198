//! Any request to any route of the HTTP gateway, as a client on the network may send it: one
//! real coordinator (Raft log on disk, the gateway on a loopback port) serves them all, over a
//! socket. Every answer is a status below 500, or 503 where a model has no worker to run it, and
//! every refusal carries OpenAI's error body.
//!
//! Input: byte 0 picks the route (a row of the route table in `docs/security.md`), byte 1 the
//! key, byte 2 the content type, byte 3 the path's parameter, the rest is the body.
#![no_main]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tandem_coordinator::gateway::{Checks, GatewayOptions};
use tandem_coordinator::replica::Timing;
use tandem_coordinator::server::{self, Options};
use tandem_kernels::DType;
use tandem_proto::contract::{Command, Invalid, Proposal, Reply};
use tandem_proto::{ClusterClient, Security};
use tandem_testkit::{free_addr, propose};
use tandem_worker::adapters::Adapter;
use tandem_worker::model::ModelConfig;

const CONTENT_TYPES: [&str; 4] = [
    "application/json",
    "multipart/form-data; boundary=fuzz-boundary",
    "text/plain",
    "application/json; charset=utf-8",
];
const PARAMETERS: [&str; 8] =
    ["file-0", "ftjob-0", "t1", "tiny", "..", "%2e%2e%2fetc", "a%00b", "key_0123456789abcdef"];

/// The gateway this process fuzzes: its address, and the keys a request may carry.
struct Gateway {
    addr: String,
    keys: Vec<Option<String>>,
}

/// What the `tandem` binary checks uploads with: the worker's own loaders.
struct WorkerChecks;

impl Checks for WorkerChecks {
    fn training_file(&self, path: &std::path::Path) -> Result<u64, Invalid> {
        tandem_worker::train::data::check_jsonl(path).map_err(|e| Invalid(e.to_string()))
    }

    fn adapter(&self, dir: &std::path::Path, model_uri: &str) -> Result<(), Invalid> {
        let cfg = ModelConfig::load(std::path::Path::new(model_uri)).map_err(|e| Invalid(e.to_string()))?;
        Adapter::load_dir(dir, &cfg, DType::F32).map(drop).map_err(|e| Invalid(e.to_string()))
    }
}

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        let (grpc, http) = (free_addr(), free_addr());
        let http_addr = http.parse().unwrap();
        let opts = Options {
            id: 1,
            peers: [(1, grpc.clone())].into(),
            dir: tandem_fuzz::scratch("coordinator"),
            timing: Timing { tick: Duration::from_millis(10), ..Timing::default() },
            lease: Duration::from_secs(5),
            join: false,
            etcd: None,
            etcd_tls: None,
            http: Some(GatewayOptions {
                addr: http_addr,
                admin_key: "sk-op".into(),
                blobs: tandem_fuzz::scratch("blobs"),
                checks: Arc::new(WorkerChecks),
                tls: None,
                top_adapters: tandem_coordinator::gateway::TOP_ADAPTERS,
            }),
            metrics: None,
            health: None,
            listen: None,
            security: Security::Insecure,
        };
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(server::serve(opts, std::future::pending())).expect("the coordinator serves");
        });
        let client = ClusterClient::new(&grpc, &Security::Insecure).unwrap();
        let uri = tandem_fuzz::model_dir().to_string_lossy().into_owned();
        let model = Command::RegisterModel { name: "tiny".into(), uri };
        assert_eq!(propose(&client, Proposal::new("fuzz-model", model)), Reply::Done);
        let mut keys = vec![None, Some("sk-op".to_string()), Some("sk-wrong".to_string())];
        for tenant in ["t1", "t2"] {
            let (status, body) = send(
                &http,
                "POST",
                "/v1/admin/api-keys",
                Some("sk-op"),
                CONTENT_TYPES[0],
                tenant_body(tenant).as_bytes(),
            );
            assert_eq!(status, 200, "{body}");
            let made: serde_json::Value = serde_json::from_str(&body).unwrap();
            keys.push(made["key"].as_str().map(String::from));
        }
        Gateway { addr: http, keys }
    })
}

fn tenant_body(tenant: &str) -> String {
    format!(r#"{{"tenant": "{tenant}"}}"#)
}

fn routes() -> &'static [(String, String, String)] {
    static ROUTES: OnceLock<Vec<(String, String, String)>> = OnceLock::new();
    ROUTES.get_or_init(tandem_testkit::http::route_table)
}

/// One exchange on a fresh connection: the status and the body as text.
fn send(addr: &str, method: &str, path: &str, key: Option<&str>, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("the gateway listens");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n");
    if let Some(k) = key {
        head += &format!("Authorization: Bearer {k}\r\n");
    }
    head += &format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("an answer within 30 s");
    let raw = String::from_utf8_lossy(&raw);
    let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line: {raw:?}"));
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

fuzz_target!(|data: &[u8]| {
    let Some((&[route, key, content_type, parameter], body)) = data.split_first_chunk::<4>() else { return };
    let gw = gateway();
    let (method, template, _) = &routes()[route as usize % routes().len()];
    let parameter = PARAMETERS[parameter as usize % PARAMETERS.len()];
    let path =
        template.split('/').map(|s| if s.starts_with('{') { parameter } else { s }).collect::<Vec<_>>().join("/");
    let key = gw.keys[key as usize % gw.keys.len()].as_deref();
    let content_type = CONTENT_TYPES[content_type as usize % CONTENT_TYPES.len()];
    let (status, answer) = send(&gw.addr, method, &path, key, content_type, body);
    let generation = path.ends_with("completions");
    assert!(status < 500 || (status == 503 && generation), "{method} {path}: {status} {answer}");
    if status >= 400 {
        let error: serde_json::Value =
            serde_json::from_str(&answer).unwrap_or_else(|_| panic!("{method} {path}: {status} {answer:?}"));
        assert!(error["error"]["message"].is_string(), "{method} {path}: {status} {answer}");
    }
});
