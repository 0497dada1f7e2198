//! A blocking HTTP/1.1 client for the gateway, small enough to read: one connection per
//! exchange (`Connection: close`), chunked bodies decoded. Tests see exactly the bytes and
//! status the gateway sends, with no client library deciding anything for them.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rustls_pki_types::ServerName;
use serde_json::Value;
use tandem_proto::Security;
use tandem_proto::tls::Role;

/// One exchange with a JSON body (or none): the status and the body.
pub fn http(addr: &str, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> (u16, String) {
    let (status, _, body) = exchange(addr, method, path, key, &[], "application/json", body.unwrap_or(""));
    (status, body)
}

/// [`http`] with `headers` added; answers the response's headers too (names in lower case).
pub fn http_with_headers(
    addr: &str,
    method: &str,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    exchange(addr, method, path, Some(key), headers, "application/json", body)
}

/// [`http`] with a JSON value as the body, and the answer as JSON (a string if it is not).
pub fn call_json(addr: &str, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = http(addr, method, path, Some(key), body.as_deref());
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A new API key for `tenant`, made with the operator's key `admin` (a refusal panics).
pub fn tenant_key(addr: &str, admin: &str, tenant: &str) -> String {
    let (status, key) =
        call_json(addr, "POST", "/v1/admin/api-keys", admin, Some(serde_json::json!({"tenant": tenant})));
    assert_eq!(status, 200, "a key for {tenant}: {key}");
    key["key"].as_str().expect("the answer holds the key").to_string()
}

/// Every event message of fine-tuning job `id`, newest first, read page by page.
pub fn job_events(addr: &str, key: &str, id: &str) -> Vec<String> {
    let (mut messages, mut after) = (Vec::new(), String::new());
    loop {
        let (status, page) =
            call_json(addr, "GET", &format!("/v1/fine_tuning/jobs/{id}/events?limit=100{after}"), key, None);
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap();
        messages.extend(data.iter().map(|e| e["message"].as_str().unwrap().to_string()));
        if page["has_more"] != true {
            return messages;
        }
        after = format!("&after={}", data.last().unwrap()["id"].as_str().unwrap());
    }
}

/// A file upload as OpenAI's clients send it: a multipart form with `purpose` and `file`.
pub fn upload(addr: &str, key: &str, filename: &str, content: &str) -> (u16, String) {
    let b = "tandem-test-boundary";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{b}--\r\n"
    );
    let (status, _, body) =
        exchange(addr, "POST", "/v1/files", Some(key), &[], &format!("multipart/form-data; boundary={b}"), &body);
    (status, body)
}

fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        req += &format!("Authorization: Bearer {k}\r\n");
    }
    for (name, value) in headers {
        req += &format!("{name}: {value}\r\n");
    }
    req += &format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, mut rest) = raw.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = (head.lines().skip(1))
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    if !headers.iter().any(|(name, value)| name == "transfer-encoding" && value.contains("chunked")) {
        return (status, headers, rest.to_string());
    }
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return (status, headers, body);
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// The rows of the HTTP route table in `docs/security.md` (method, path, who may call it): the
/// tests that walk every route read the table the operators read.
pub fn route_table() -> Vec<(String, String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md")).unwrap();
    let table = doc.split("| HTTP route | who may call it |").nth(1).expect("the HTTP route table");
    (table.lines().skip(2))
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (method, path) = cells[1].trim_matches('`').split_once(' ').unwrap();
            (method.to_string(), path.to_string(), cells[2].to_string())
        })
        .collect()
}

/// `GET /metrics` from the metrics port of a process of `server`'s role at `addr`, showing
/// `security`'s certificate (plain HTTP when insecure): the status and the body.
pub fn scrape(addr: &str, security: &Security, server: Role) -> io::Result<(u16, String)> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    match security {
        Security::Mutual(tls) => {
            let name = ServerName::try_from(server.dns_name()).map_err(io::Error::other)?;
            let config = tls.stream_client().map_err(io::Error::other)?;
            let connection = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
            let mut stream = rustls::StreamOwned::new(connection, tcp);
            stream.write_all(request.as_bytes())?;
            // A server that closes without TLS's close_notify still sent a whole response.
            match stream.read_to_end(&mut raw) {
                Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => return Err(e),
                _ => {}
            }
        }
        Security::Insecure => {
            let mut tcp = tcp;
            tcp.write_all(request.as_bytes())?;
            tcp.read_to_end(&mut raw)?;
        }
    }
    let raw = String::from_utf8(raw).map_err(io::Error::other)?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| io::Error::other(format!("not HTTP: {raw:?}")))?;
    let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| io::Error::other(head.to_string()))?;
    Ok((status, body.to_string()))
}
