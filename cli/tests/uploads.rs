//! Uploads go to disk as their bytes arrive: a 64 MiB training file is stored, and read back,
//! while the coordinator's peak memory grows by far less than the file; one past the 256 MiB
//! cap is refused (413) as it streams; one cut short or refused leaves nothing behind.

#![allow(clippy::unwrap_used)] // tests unwrap by design

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tandem_testkit::{MiniCluster, http};

use common::TANDEM;

const KEY: &str = "sk-test-admin";
const MIB: u64 = 1 << 20;
/// One training example, as the file repeats it.
const LINE: &[u8] = b"{\"prompt\": \"2+2=\", \"completion\": \" 4\"}\n";

/// The peak resident memory of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Uploads a training file of `size` bytes (whole lines of [`LINE`]) as OpenAI's clients do,
/// writing it 64 KiB at a time, its length told up front or (`chunked`) not; `cut_at`: hang up
/// once that many bytes are sent. The answer's status and body, or none when the gateway
/// closed the connection first.
fn upload(addr: &str, size: u64, chunked: bool, cut_at: Option<u64>) -> Option<(u16, String)> {
    let b = "tandem-upload-boundary";
    let head = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    );
    let tail = format!("\r\n--{b}--\r\n");
    let total = head.len() as u64 + size + tail.len() as u64;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let length = match chunked {
        true => "Transfer-Encoding: chunked".to_string(),
        false => format!("Content-Length: {total}"),
    };
    let request = format!(
        "POST /v1/files HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: multipart/form-data; boundary={b}\r\n{length}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).unwrap();
    // Each piece of the body, framed when chunked.
    let send = |s: &mut TcpStream, piece: &[u8]| match chunked {
        true => s.write_all(&[format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat()),
        false => s.write_all(piece),
    };
    send(&mut s, head.as_bytes()).unwrap();
    let chunk = LINE.repeat((64 << 10) / LINE.len());
    let mut sent = 0u64;
    while sent < size {
        if cut_at.is_some_and(|at| sent >= at) {
            return None;
        }
        let n = chunk.len().min((size - sent) as usize);
        if send(&mut s, &chunk[..n]).is_err() {
            break; // the gateway answered and closed: its answer may still be readable
        }
        sent += n as u64;
    }
    let _ = send(&mut s, tail.as_bytes()).and_then(|()| if chunked { s.write_all(b"0\r\n\r\n") } else { Ok(()) });
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    let status = raw.get(9..12)?.parse().ok()?;
    Some((status, raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string()))
}

/// Files left in `dir` (none when it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    entries.map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// Waits up to 10 s for `dir` to hold no file.
fn empties(dir: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !files_in(dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    files_in(dir)
}

#[test]
fn uploads_stream_to_disk_within_their_cap_and_leave_nothing_when_refused() {
    let cluster = MiniCluster::builder(TANDEM, "uploads").workers(0).gateway(KEY).start();
    let addr = cluster.http().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&addr).is_err() || http::http(&addr, "GET", "/health", None, None).0 != 200 {
        assert!(Instant::now() < deadline, "the gateway never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let coordinator = cluster.procs.0[0].id();
    let (incoming, files) = (cluster.dir().join("blobs/incoming"), cluster.dir().join("blobs/files"));
    let lines = |bytes: u64| bytes / LINE.len() as u64 * LINE.len() as u64;

    // 64 MiB, stored whole, while the coordinator's peak memory grows by less than half of it.
    let before = peak_rss(coordinator);
    let size = lines(64 * MIB);
    let (status, body) = upload(&addr, size, true, None).unwrap();
    assert_eq!(status, 200, "{body}");
    let stored: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stored["bytes"], size, "{body}");
    let grown = peak_rss(coordinator).saturating_sub(before);
    assert!(grown < 32 * MIB, "the coordinator's peak memory grew by {} MiB for a 64 MiB upload", grown / MIB);
    assert_eq!(files_in(&files).len(), 1);
    // Read back whole, and sent as it is read.
    let id = stored["id"].as_str().unwrap();
    let (status, content) = http::http(&addr, "GET", &format!("/v1/files/{id}/content"), Some(KEY), None);
    assert_eq!((status, content.len() as u64), (200, size));
    assert!(content.starts_with(std::str::from_utf8(LINE).unwrap()));
    let grown = peak_rss(coordinator).saturating_sub(before);
    assert!(grown < 32 * MIB, "the coordinator's peak memory grew by {} MiB to send 64 MiB back", grown / MIB);

    // Past the 256 MiB cap: refused at once when its length says so, else as it streams past
    // the cap; nothing of it is kept either way.
    for chunked in [false, true] {
        if let Some((status, body)) = upload(&addr, lines(257 * MIB), chunked, None) {
            assert_eq!(status, 413, "{body}");
        } // else closed before its answer could be read: refused all the same
        assert_eq!(empties(&incoming), Vec::<String>::new(), "an upload over the cap was left behind");
    }
    assert_eq!(files_in(&files).len(), 1);

    // Cut short by the client: removed.
    assert!(upload(&addr, lines(8 * MIB), true, Some(4 * MIB)).is_none());
    assert_eq!(empties(&incoming), Vec::<String>::new(), "an abandoned upload was left behind");

    // Refused by the check (not JSONL): removed, and only the first file is stored.
    let (status, body) = http::upload(&addr, KEY, "bad.jsonl", "not json\n");
    assert_eq!(status, 400, "{body}");
    assert_eq!(empties(&incoming), Vec::<String>::new());
    assert_eq!(files_in(&files).len(), 1);
}
