//! The yardstick beside Tandem's leader-kill outage: a real etcd of 3 members on loopback (its
//! default 100 ms heartbeat and 1 s election timeout, where Tandem's coordinators default to
//! 50 ms ticks with elections after 10-20), its leader killed, and the time from the kill to
//! the first acknowledged write invoked after it, probed every 50 ms (as Tandem's) through the surviving
//! members' JSON gateway (`/v3/kv/put`) with a 1 s bound per attempt.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{Request, exchange};

struct Member {
    child: Child,
    client: SocketAddr,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn post(addr: SocketAddr, path: &str, body: &str) -> Option<serde_json::Value> {
    let req = Request { method: "POST", path, key: None, content_type: "application/json", body: body.as_bytes() };
    let r = exchange(addr, &req, Duration::from_secs(1), None).ok()?;
    (r.status == 200).then(|| r.json())
}

/// One leader kill of a fresh 3-member etcd in `dir`: kill → first acknowledged put.
pub fn leader_kill_outage(dir: &Path) -> Result<Duration> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let ports: Vec<(u16, u16)> = (0..3).map(|_| Ok((free_port()?, free_port()?))).collect::<Result<_>>()?;
    let cluster: Vec<String> =
        ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
    let mut members = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let log = std::fs::File::create(dir.join(format!("e{i}.log")))?;
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}"), "--data-dir"])
            .arg(dir.join(format!("e{i}")))
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tandem-chaos"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian: etcd-server)")?;
        members.push(Member { child, client: SocketAddr::from(([127, 0, 0, 1], *client)) });
    }
    // The leader: the member whose id every member names as leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let status: Vec<Option<(String, String)>> = (members.iter())
            .map(|m| {
                let s = post(m.client, "/v3/maintenance/status", "{}")?;
                Some((s["header"]["member_id"].as_str()?.to_string(), s["leader"].as_str()?.to_string()))
            })
            .collect();
        let leader = status.iter().flatten().map(|(_, l)| l.clone()).next();
        if let Some(l) = leader
            && status.iter().all(|s| s.as_ref().is_some_and(|(_, seen)| *seen == l))
            && let Some(i) = status.iter().position(|s| s.as_ref().is_some_and(|(me, _)| *me == l))
            && post(members[0].client, "/v3/kv/put", r#"{"key":"d2FybQ==","value":"MQ=="}"#).is_some()
        {
            break i;
        }
        if Instant::now() > deadline {
            bail!("etcd elected no leader in 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let killed = members.remove(leader);
    drop(killed);
    let kill = Instant::now();
    for m in members.iter().cycle() {
        if post(m.client, "/v3/kv/put", r#"{"key":"a2V5","value":"dmFsdWU="}"#).is_some() {
            return Ok(kill.elapsed());
        }
        if kill.elapsed() > Duration::from_secs(30) {
            bail!("etcd took no write for 30 s after its leader was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    unreachable!("cycling over two members never ends")
}
