//! The gateway against a battery of malformed and hostile requests (more than 300) over every
//! route of the role table in `docs/security.md`: missing, wrong and malformed keys; a tenant on
//! the operator's routes; wrong types, out-of-range numbers, unicode and control characters,
//! `..` and absolute paths in names; duplicate JSON keys, truncated, empty, non-UTF-8 and
//! oversized bodies, wrong content types; bad query strings; another tenant's objects. Each
//! gets a 4xx with OpenAI's error body, none a 5xx; malformed completions are refused even
//! before any worker serves the model; afterwards the gateway still serves and no stored object
//! changed.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};
use tandem_testkit::{MiniCluster, http};

use common::TANDEM;

const KEY: &str = "sk-battery-admin";

/// One raw exchange: the status (0 when the server closed without an answer) and the body.
fn raw(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += &format!("Content-Length: {}\r\n\r\n", body.len());
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    let _ = s.write_all(&bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The battery's tally: every answer must be a 4xx with an error body.
#[derive(Default)]
struct Tally {
    sent: usize,
    failures: Vec<String>,
}

impl Tally {
    fn expect_status(&mut self, what: &str, status: u16) {
        self.sent += 1;
        if !(400..500).contains(&status) {
            self.failures.push(format!("{what}: {status}"));
        }
    }

    fn expect_4xx(&mut self, what: &str, (status, body): (u16, String)) {
        self.sent += 1;
        let error_body = body.find('{').and_then(|at| serde_json::from_str::<Value>(&body[at..]).ok());
        let message = error_body.as_ref().and_then(|v| v["error"]["message"].as_str().map(str::to_string));
        if !(400..500).contains(&status) || message.is_none_or(|m| m.is_empty()) {
            self.failures.push(format!("{what}: {status} {}", body.chars().take(200).collect::<String>()));
        }
    }
}

fn json_call(addr: &str, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    raw(addr, method, path, &headers, body.as_bytes())
}

/// Completion bodies that are not valid requests.
fn bad_sampling() -> Vec<String> {
    let mut bodies: Vec<String> = [
        json!({"model": 5, "prompt": "hi"}),
        json!({"model": "tiny", "prompt": {}}),
        json!({"model": "tiny", "prompt": "hi", "max_tokens": "x"}),
        json!({"model": "tiny", "prompt": "hi", "max_tokens": -1}),
        json!({"model": "tiny", "prompt": "hi", "max_tokens": 0}),
        json!({"model": "tiny", "prompt": "hi", "max_tokens": 1e20}),
        json!({"model": "tiny", "prompt": "hi", "temperature": "hot"}),
        json!({"model": "tiny", "prompt": "hi", "temperature": -1}),
        json!({"model": "tiny", "prompt": "hi", "temperature": 1e9}),
        json!({"model": "tiny", "prompt": "hi", "top_p": 2}),
        json!({"model": "tiny", "prompt": "hi", "top_p": 0}),
        json!({"model": "tiny", "prompt": "hi", "n": 0}),
        json!({"model": "tiny", "prompt": "hi", "n": -1}),
        json!({"model": "tiny", "prompt": "hi", "n": 10_000_000_000u64}),
        json!({"model": "tiny", "prompt": "hi", "stop": 5}),
        json!({"model": "tiny", "prompt": "hi", "stop": [1, 2]}),
        json!({"model": "tiny", "prompt": "hi", "seed": -1}),
        json!({"model": "tiny", "prompt": "hi", "seed": "x"}),
        json!({"model": "tiny", "prompt": "hi", "logprobs": "x"}),
        json!({"model": "tiny", "prompt": "hi", "logprobs": 21}),
        json!({"model": "tiny", "prompt": "hi", "logprobs": true}),
        json!({"model": "tiny", "prompt": "hi", "suffix": "x"}),
        json!({"model": "tiny", "prompt": "hi", "best_of": 0}),
        json!({"model": "tiny", "prompt": [[1, 2], []]}),
        json!({"model": "tiny", "prompt": [1, "x"]}),
        json!({"model": "tiny", "prompt": [-1]}),
        json!({"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
        json!({"model": "tiny", "prompt": "hi", "logit_bias": {"-1": 3}}),
        json!({"model": "tiny", "prompt": "hi", "logit_bias": {"1": "x"}}),
        json!({"model": "tiny", "prompt": "hi", "frequency_penalty": -3}),
        json!({"model": "tiny", "prompt": "hi", "top_logprobs": 3}),
        json!({"model": "tiny", "prompt": "hi", "stream": "yes"}),
        json!({"model": "../etc/passwd", "prompt": "hi"}),
        json!({"model": "/etc/passwd", "prompt": "hi"}),
        json!({"model": "a\u{0}b", "prompt": "hi"}),
        json!({"model": "mod\u{202e}el", "prompt": "hi"}),
        json!({"model": "m".repeat(10_000), "prompt": "hi"}),
        json!({"prompt": "hi"}),
        json!({"model": "tiny"}),
        json!([]),
        json!(null),
        json!("a string"),
        json!(123),
    ]
    .iter()
    .map(Value::to_string)
    .collect();
    bodies.extend(
        [
            r#"{"model": "tiny""#,
            r#"{"model": "tiny", "model": "tiny", "prompt": "hi"}"#,
            "",
            "\u{feff}{}",
            "{not json",
            r#"{"model": "tiny", "prompt": "hi", "max_tokens": 1.5}"#,
            r#"{"model": "tiny", "prompt": "hi", "n": 99999999999999999999999}"#,
        ]
        .map(str::to_string),
    );
    bodies
}

/// Chat bodies that are not valid requests.
fn bad_chats() -> Vec<String> {
    [
        json!({"model": "tiny", "messages": "hi"}),
        json!({"model": "tiny", "messages": []}),
        json!({"model": "tiny", "messages": [{"role": 5, "content": "hi"}]}),
        json!({"model": "tiny", "messages": [{"content": "hi"}]}),
        json!({"model": "tiny", "messages": [{"role": "user", "content": 7}]}),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 0}),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -3}),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": []}),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": 0}),
        json!({"messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "..", "messages": [{"role": "user", "content": "hi"}]}),
    ]
    .iter()
    .map(Value::to_string)
    .collect()
}

/// Names in a path that no object has, or that no object may have.
const BAD_NAMES: [&str; 9] = [
    "..",
    "%2e%2e",
    "%2Fetc%2Fpasswd",
    "a%00b",
    "a%0Ab",
    "%E2%80%AE",
    "x%20y",
    "nope",
    "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
];

#[test]
fn hostile_requests_get_4xx_error_bodies_and_change_nothing() {
    let cluster = MiniCluster::builder(TANDEM, "bad-input").gateway(KEY).start();
    let addr = cluster.http().to_string();
    let addr = addr.as_str();
    let mut t = Tally::default();
    // Until the gateway listens, then before any model or worker is known: malformed
    // completions are refused as malformed, not as unservable.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "the gateway never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    for body in bad_sampling() {
        t.expect_4xx(
            &format!("no worker yet: completions {body:.80}"),
            json_call(addr, "POST", "/v1/completions", Some(KEY), &body),
        );
    }
    cluster.register_model("tiny");
    cluster.wait_alive(1);

    // Two tenants; t1 stores a file.
    let mut keys = Vec::new();
    for tenant in ["t1", "t2"] {
        let (status, made) = http::call_json(addr, "POST", "/v1/admin/api-keys", KEY, Some(json!({"tenant": tenant})));
        assert_eq!(status, 200, "{made}");
        keys.push(made["key"].as_str().unwrap().to_string());
    }
    let (t1, t2) = (keys[0].as_str(), keys[1].as_str());
    let (status, file) = http::upload(addr, t1, "train.jsonl", r#"{"prompt": "a", "completion": "b"}"#);
    assert_eq!(status, 200, "{file}");
    let file_id = serde_json::from_str::<Value>(&file).unwrap()["id"].as_str().unwrap().to_string();
    let before = stored(addr, &[t1, t2]);

    // Keys: none, wrong, malformed, on every route but health.
    let routes = http::route_table();
    for (method, path, who) in &routes {
        if who == "anyone" {
            continue;
        }
        let path = path.replace("{id}", "x").replace("{name}", "x").replace("{group}", "x").replace("{tenant}", "x");
        for auth in [None, Some("Bearer sk-wrong"), Some("Basic dXNlcjpwYXNz"), Some("Bearer "), Some("Bearer \u{7f}")]
        {
            let mut headers = vec![("Content-Type", "application/json")];
            if let Some(a) = auth {
                headers.push(("Authorization", a));
            }
            let what = format!("{method} {path} with authorization {auth:?}");
            let answer = raw(addr, method, &path, &headers, b"{}");
            match auth {
                // A control character in a header: hyper refuses the request (400) before any
                // route sees it, so the body is hyper's (empty), not OpenAI's.
                Some(a) if a.contains('\u{7f}') => t.expect_status(&what, answer.0),
                _ => t.expect_4xx(&what, answer),
            }
        }
        if who == "operator" {
            t.expect_4xx(&format!("{method} {path} as a tenant"), json_call(addr, method, &path, Some(t1), "{}"));
        }
    }

    // Malformed completions and chats, now that a worker serves the model.
    for body in bad_sampling() {
        t.expect_4xx(&format!("completions {body:.80}"), json_call(addr, "POST", "/v1/completions", Some(t1), &body));
    }
    for body in bad_chats().into_iter().chain(bad_sampling()) {
        t.expect_4xx(&format!("chat {body:.80}"), json_call(addr, "POST", "/v1/chat/completions", Some(t1), &body));
    }
    // Non-UTF-8, a wrong content type, a body over the limit.
    let completion = br#"{"model": "tiny", "prompt": "hi", "max_tokens": 1}"#;
    let auth = format!("Bearer {t1}");
    t.expect_4xx(
        "non-UTF-8 body",
        raw(addr, "POST", "/v1/completions", &[("Authorization", &auth)], &[0xff, 0xfe, 0x00, 0x7b]),
    );
    for content_type in ["multipart/form-data; boundary=x", "application/x-www-form-urlencoded"] {
        let headers = [("Authorization", auth.as_str()), ("Content-Type", content_type)];
        t.expect_4xx(&format!("upload as {content_type}"), raw(addr, "POST", "/v1/fine_tuning/jobs", &headers, b"a=b"));
    }
    // Too many headers, or too large: 431 in OpenAI's shape (hyper's own bare 431 lies beyond,
    // past 1000 headers or about 400 KiB).
    let extra: Vec<(String, &str)> = (0..150).map(|i| (format!("X-Extra-{i}"), "v")).collect();
    let mut many: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    many.push(("Authorization", &auth));
    let answer = raw(addr, "GET", "/v1/models", &many, b"");
    assert_eq!(answer.0, 431, "150 headers: {answer:?}");
    t.expect_4xx("150 headers", answer);
    let big = "x".repeat(100 << 10);
    let answer = raw(addr, "GET", "/v1/models", &[("Authorization", &auth), ("X-Big", &big)], b"");
    assert_eq!(answer.0, 431, "a 100 KiB header: {answer:?}");
    t.expect_4xx("a 100 KiB header", answer);
    let huge = format!(r#"{{"model": "tiny", "prompt": "{}"}}"#, "a".repeat(5 << 20));
    t.expect_4xx("a 5 MiB completion body", json_call(addr, "POST", "/v1/completions", Some(t1), &huge));
    let _ = completion;

    // Names in paths: traversal, encoded separators, control characters, unknown ones.
    for name in BAD_NAMES {
        for (method, path) in [
            ("GET", format!("/v1/files/{name}")),
            ("DELETE", format!("/v1/files/{name}")),
            ("GET", format!("/v1/files/{name}/content")),
            ("GET", format!("/v1/fine_tuning/jobs/{name}")),
            ("POST", format!("/v1/fine_tuning/jobs/{name}/cancel")),
            ("GET", format!("/v1/fine_tuning/jobs/{name}/events")),
            ("GET", format!("/v1/fine_tuning/jobs/{name}/checkpoints")),
            ("DELETE", format!("/v1/adapters/{name}")),
        ] {
            t.expect_4xx(&format!("{method} {path}"), json_call(addr, method, &path, Some(t1), ""));
        }
        for (method, path) in [
            ("DELETE", format!("/v1/admin/api-keys/{name}")),
            ("DELETE", format!("/v1/admin/groups/{name}")),
            ("GET", format!("/v1/admin/tenants/{name}/limits")),
        ] {
            if name == "nope" && path.contains("limits") {
                continue; // a tenant of that name may exist: its (empty) limits are an answer
            }
            t.expect_4xx(&format!("{method} {path}"), json_call(addr, method, &path, Some(KEY), ""));
        }
    }
    // Query strings.
    for query in ["limit=-1", "limit=abc", "limit=99999999999999999999", "after=%00&limit=x", "limit=1&limit=2&limit=z"]
    {
        for path in ["/v1/files", "/v1/fine_tuning/jobs", "/v1/admin/api-keys"] {
            let key = if path.contains("admin") { KEY } else { t1 };
            t.expect_4xx(
                &format!("GET {path}?{query}"),
                json_call(addr, "GET", &format!("{path}?{query}"), Some(key), ""),
            );
        }
    }
    // Another tenant's file is not found; operator bodies of the wrong shape.
    for (method, path) in [
        ("GET", format!("/v1/files/{file_id}")),
        ("GET", format!("/v1/files/{file_id}/content")),
        ("DELETE", format!("/v1/files/{file_id}")),
    ] {
        t.expect_4xx(&format!("t2: {method} {path}"), json_call(addr, method, &path, Some(t2), ""));
    }
    for body in [
        json!({"tenant": "../x"}),
        json!({"tenant": ""}),
        json!({"tenant": 5}),
        json!({"tenant": "t\u{0}"}),
        json!({"tenant": "ok", "expires_in": 0}),
        json!({"tenant": "ok", "expires_in": -5}),
        json!({"tenant": "ok", "expires_in": 1e30}),
        json!({"tenant": "ok", "extra": true}),
        json!({"model": "tiny", "size": 0}),
        json!({"model": "tiny", "size": -2}),
        json!({"model": "../x", "size": 2}),
    ] {
        let path = if body.get("model").is_some() { "/v1/admin/groups" } else { "/v1/admin/api-keys" };
        t.expect_4xx(&format!("POST {path} {body}"), json_call(addr, "POST", path, Some(KEY), &body.to_string()));
    }
    for body in [json!({"requests_per_minute": -1}), json!({"requests_per_minute": "x"}), json!({"rpm": 1}), json!([])]
    {
        t.expect_4xx(
            &format!("PUT limits {body}"),
            json_call(addr, "PUT", "/v1/admin/tenants/t1/limits", Some(KEY), &body.to_string()),
        );
    }
    for body in [
        json!({"model": "tiny", "training_file": file_id}),
        json!({"model": "nope", "training_file": file_id}),
        json!({"model": "tiny", "training_file": "file-nope"}),
        json!({"model": "tiny", "training_file": file_id, "hyperparameters": {"n_epochs": -1}}),
        json!({"model": "tiny", "training_file": file_id, "suffix": "../x"}),
        json!({"model": "tiny", "training_file": file_id, "method": {"type": "dpo"}}),
    ] {
        t.expect_4xx(
            &format!("t2: POST jobs {body}"),
            json_call(addr, "POST", "/v1/fine_tuning/jobs", Some(t2), &body.to_string()),
        );
    }

    assert!(t.sent >= 300, "only {} hostile requests", t.sent);
    assert!(
        t.failures.is_empty(),
        "{} of {} not a 4xx with an error body:\n{}",
        t.failures.len(),
        t.sent,
        t.failures.join("\n")
    );
    // Still serving, and nothing stored changed.
    let body = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).to_string();
    assert_eq!(http::http(addr, "POST", "/v1/completions", Some(t1), Some(&body)).0, 200);
    assert_eq!(stored(addr, &[t1, t2]), before, "a hostile request changed what is stored");
    eprintln!("{} hostile requests, each a 4xx with an error body", t.sent);
}

/// What each tenant has stored (files, jobs, adapters) and the keys and limits, as the gateway lists them.
fn stored(addr: &str, tenants: &[&str]) -> Vec<Value> {
    let mut all = Vec::new();
    for key in tenants {
        for path in ["/v1/files?limit=100", "/v1/fine_tuning/jobs?limit=100", "/v1/adapters"] {
            all.push(http::call_json(addr, "GET", path, key, None).1["data"].clone());
        }
    }
    all.push(http::call_json(addr, "GET", "/v1/admin/api-keys?limit=100", KEY, None).1["data"].clone());
    all.push(http::call_json(addr, "GET", "/v1/admin/groups", KEY, None).1);
    all.push(http::call_json(addr, "GET", "/v1/admin/tenants/t1/limits", KEY, None).1);
    all
}
