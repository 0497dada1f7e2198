//! The health ports probes use (`--health`): plain HTTP, `GET /health` alone. A worker is ready
//! only while it holds its lease; a coordinator only while a quorum answers, and one reached by
//! a name in `--peers` listens where `--listen` says.

#![allow(clippy::unwrap_used)]

mod common;

use tandem_testkit::http::http;
use tandem_testkit::{Procs, Scratch, free_addr, free_port, wait_for};

use common::TANDEM;

/// The status and body of `GET path` at `addr`, once it accepts connections.
fn probe(addr: &str, path: &str) -> Option<(u16, String)> {
    std::net::TcpStream::connect(addr).ok()?;
    Some(http(addr, "GET", path, None, None))
}

#[test]
fn a_worker_is_ready_while_it_holds_its_lease_and_a_coordinator_while_a_quorum_answers() {
    let dir = Scratch::new("health");
    let model = dir.join("tiny");
    TANDEM.init_model("tiny", &model);
    let port = free_port();
    let (listen, named) = (format!("127.0.0.1:{port}"), format!("localhost:{port}"));
    let (worker_health, coordinator_health) = (free_addr(), free_addr());
    let worker = [
        "worker",
        "--id",
        "w1",
        "--listen",
        &free_addr(),
        "--coordinator",
        &named,
        "--model",
        model.to_str().unwrap(),
        "--blobs",
        dir.to_str().unwrap(),
        "--health",
        &worker_health,
        "--insecure",
    ];
    let mut procs = Procs(vec![TANDEM.spawn(&worker)]);
    // No coordinator yet: the worker is up but not ready, and says why.
    let (status, body) = wait_for(60, "the worker's health port", || probe(&worker_health, "/health"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not registered yet") || body.contains("no lease"), "{body}");
    assert_eq!(probe(&worker_health, "/metrics").unwrap().0, 404, "nothing but /health is served");

    let data = dir.join("coordinator");
    let coordinator = [
        "coordinator",
        "--id",
        "1",
        "--peers",
        &format!("1={named}"),
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().unwrap(),
        "--health",
        &coordinator_health,
        "--insecure",
    ];
    procs.0.push(TANDEM.spawn(&coordinator));
    wait_for(60, "the coordinator to be ready", || {
        probe(&coordinator_health, "/health").filter(|(status, _)| *status == 200)
    });
    let (_, body) = wait_for(60, "the worker to be ready", || {
        probe(&worker_health, "/health").filter(|(status, _)| *status == 200)
    });
    assert_eq!(body, "ok\n");

    // The coordinator gone, the worker's lease lapses and it says so.
    procs.0[1].kill().unwrap();
    procs.0[1].wait().unwrap();
    let (_, body) = wait_for(60, "the worker to be unready", || {
        probe(&worker_health, "/health").filter(|(status, _)| *status == 503)
    });
    assert!(body.contains("no lease"), "{body}");
}
