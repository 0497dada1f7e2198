//! The workload's HTTP/1.1 client: one connection per exchange, every step bounded by a
//! timeout, every failure a value. Under faults a client must record what happened (refused,
//! timed out, cut mid-answer) and go on, so nothing here panics or waits without end.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// An answer: status, headers (names in lower case) and the body, de-chunked.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Why no whole answer came.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// No connection (refused, unreachable, or not within the timeout): the request was never
    /// sent, so it did not happen.
    #[error("could not connect: {0}")]
    Connect(String),
    /// Sent, but the answer did not come whole within the timeout or the connection broke: it
    /// may or may not have happened.
    #[error("no whole answer: {0}")]
    Cut(String),
}

/// A request to send.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub key: Option<&'a str>,
    pub content_type: &'a str,
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// A JSON request (or one without a body).
    pub fn json(method: &'a str, path: &'a str, key: &'a str, body: &'a str) -> Self {
        Request { method, path, key: Some(key), content_type: "application/json", body: body.as_bytes() }
    }
}

/// Sends `req` to `addr` and reads the whole answer, within `timeout` in all; `read_at_most`
/// bytes of the answer and then hangs up when set (a client that goes away mid-stream).
pub fn exchange(
    addr: SocketAddr,
    req: &Request,
    timeout: Duration,
    read_at_most: Option<usize>,
) -> Result<Response, Failure> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(2)))
        .map_err(|e| Failure::Connect(e.to_string()))?;
    let cut = |e: std::io::Error| Failure::Cut(e.to_string());
    let mut head = format!("{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n", req.method, req.path);
    if let Some(k) = req.key {
        head += &format!("Authorization: Bearer {k}\r\n");
    }
    head += &format!("Content-Type: {}\r\nContent-Length: {}\r\n\r\n", req.content_type, req.body.len());
    s.set_write_timeout(Some(timeout)).map_err(cut)?;
    s.write_all(head.as_bytes()).and_then(|()| s.write_all(req.body)).map_err(cut)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Cut(format!("timed out after {timeout:?}")));
        }
        s.set_read_timeout(Some(left)).map_err(cut)?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => return Err(cut(e)),
        }
        if read_at_most.is_some_and(|most| raw.len() >= most) {
            return Err(Failure::Cut("the client hung up".into()));
        }
    }
    parse(&raw).ok_or_else(|| Failure::Cut(format!("a broken answer of {} bytes", raw.len())))
}

/// Status, headers and body of a whole HTTP/1.1 answer; None if it is cut short.
fn parse(raw: &[u8]) -> Option<Response> {
    let raw = String::from_utf8_lossy(raw);
    let (head, mut rest) = raw.split_once("\r\n\r\n")?;
    let status = head.get(9..12)?.parse().ok()?;
    let headers: Vec<(String, String)> = (head.lines().skip(1))
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if !chunked {
        let length = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse::<usize>().ok());
        return (length.is_none_or(|l| rest.len() >= l)).then(|| Response { status, headers, body: rest.to_string() });
    }
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(Response { status, headers, body });
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

/// A multipart form body of text fields and files, and its content type.
pub fn multipart(fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let b = "tandem-chaos-boundary";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend(format!("--{b}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes());
    }
    for (field, filename, bytes) in files {
        let head = format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        );
        body.extend(head.as_bytes());
        body.extend(*bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{b}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={b}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_and_cut_answers() {
        let whole = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse(whole).unwrap().body, "abcde");
        // The stream stops before its last chunk: not an answer.
        assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n").is_none());
        let short = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\nRetry-After: 1\r\n\r\nabc";
        assert!(parse(short).is_none());
        let r = parse(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\nRetry-After: 1\r\n\r\nabc").unwrap();
        assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
    }
}
