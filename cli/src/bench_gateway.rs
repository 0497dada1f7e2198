//! `tandem bench gateway`: what the gateway adds to a request. A `tandem up` cluster (one
//! coordinator with the gateway, one worker, the tiny model) answers 1-token completions from
//! `--clients` clients for `--seconds`, through the gateway (`POST /v1/completions` over
//! keep-alive HTTP/1.1) and straight to the worker's gRPC `Generate`, in alternating rounds so
//! that load from neighbours hits both alike. Prints the requests/s of each, their ratio, and
//! the time the gateway adds per request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::Value;
use tandem_proto::Security;
use tandem_proto::tls::{ClusterTls, Role};
use tandem_proto::v1::GenerateRequest;
use tandem_proto::v1::worker_client::WorkerClient;

#[derive(Args)]
pub struct GatewayArgs {
    /// Clients sending requests at once.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Length of each round.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Rounds of each way (gateway, direct, gateway, direct, ...).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the cluster keeps its data (made afresh).
    #[arg(long, default_value = "target/bench-gateway")]
    dir: PathBuf,
    /// The gateway's and the coordinator's ports on 127.0.0.1.
    #[arg(long, default_value_t = 18_700)]
    http_port: u16,
    #[arg(long, default_value_t = 18_701)]
    grpc_port: u16,
}

/// The `tandem up` process; killed (SIGTERM, which stops its children) when dropped.
struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

pub fn run(args: GatewayArgs) -> Result<()> {
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let (http, grpc) = (format!("127.0.0.1:{}", args.http_port), format!("127.0.0.1:{}", args.grpc_port));
    let log = std::fs::File::create(args.dir.join("up.log"))?;
    let _up = Up(Command::new(std::env::current_exe()?)
        .args(["up", "--preset", "tiny", "--workers", "1", "--http", &http, "--grpc", &grpc])
        .arg("--data-dir")
        .arg(&args.dir)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting tandem up")?);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !healthy(&http) {
        if Instant::now() > deadline {
            bail!("the cluster did not come up; see {}", args.dir.join("up.log").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let key = std::fs::read_to_string(args.dir.join("admin-key"))?.trim().to_string();
    // The operator's certificate that `tandem up` made: the worker answers holders of the
    // cluster's certificates only, as the gateway is one.
    let certs = args.dir.join("certs");
    let security = Security::Mutual(Arc::new(ClusterTls::load(&certs, "operator")?));
    let worker = worker_addr(&grpc, &certs)?;
    let rt = tokio::runtime::Runtime::new()?;
    let seconds = Duration::from_secs_f64(args.seconds);
    // One warm-up round of each, not counted.
    gateway_round(&http, &key, args.clients, Duration::from_secs(1))?;
    rt.block_on(direct_round(&worker, &security, args.clients, Duration::from_secs(1)))?;
    let (mut via_gateway, mut direct) = (0.0, 0.0);
    for _ in 0..args.rounds.max(1) {
        via_gateway += gateway_round(&http, &key, args.clients, seconds)?;
        direct += rt.block_on(direct_round(&worker, &security, args.clients, seconds))?;
    }
    let rounds = args.rounds.max(1) as f64;
    let (via_gateway, direct) = (via_gateway / rounds, direct / rounds);
    println!("1-token completions, {} clients, {} rounds of {:.1} s", args.clients, rounds, args.seconds);
    println!("machine: {}", crate::machine::cpu());
    println!("  through the gateway:  {via_gateway:8.1} req/s");
    println!("  straight to worker:   {direct:8.1} req/s");
    println!("  ratio (gateway/direct): {:.3}", via_gateway / direct);
    let added_ms = 1000.0 * args.clients as f64 * (1.0 / via_gateway - 1.0 / direct);
    println!("  time the gateway adds per request: {added_ms:.2} ms");
    Ok(())
}

fn healthy(http: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(http) else { return false };
    let req = format!("GET /health HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    if s.write_all(req.as_bytes()).is_err() || s.read_to_string(&mut out).is_err() {
        return false;
    }
    out.starts_with("HTTP/1.1 200") && out.contains("\"workers_alive\":1")
}

/// The worker's gRPC address, as `tandem status --json` reports it.
fn worker_addr(grpc: &str, certs: &std::path::Path) -> Result<String> {
    let out = Command::new(std::env::current_exe()?)
        .args(["status", "--coordinator", grpc, "--json", "--certs"])
        .arg(certs)
        .output()?;
    let status: Value = serde_json::from_slice(&out.stdout).context("tandem status --json")?;
    let workers = status["workers"].as_object().ok_or_else(|| anyhow!("no workers in {status}"))?;
    let addr = workers.values().find_map(|w| w["addr"].as_str()).ok_or_else(|| anyhow!("no worker address"))?;
    Ok(addr.to_string())
}

/// Requests per second through the gateway: `clients` threads, each on one keep-alive
/// connection, for `length`.
fn gateway_round(http: &str, key: &str, clients: usize, length: Duration) -> Result<f64> {
    let body = r#"{"model": "tiny", "prompt": "Hello", "max_tokens": 1, "temperature": 0}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let start = Instant::now();
    let counts = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| -> Result<u64> {
                    let stream = TcpStream::connect(http)?;
                    stream.set_nodelay(true)?;
                    let mut reader = BufReader::new(stream.try_clone()?);
                    let mut writer = stream;
                    let mut done = 0;
                    while start.elapsed() < length {
                        writer.write_all(request.as_bytes())?;
                        let status = read_response(&mut reader)?;
                        if status != 200 {
                            bail!("the gateway answered {status}");
                        }
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().map_err(|_| anyhow!("a client panicked"))?).collect::<Result<Vec<_>>>()
    })?;
    Ok(counts.iter().sum::<u64>() as f64 / start.elapsed().as_secs_f64())
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns its status.
fn read_response(reader: &mut impl BufRead) -> Result<u16> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad status {line:?}"))?;
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(status)
}

/// Requests per second straight to the worker: `clients` tasks, each on its own channel.
async fn direct_round(worker: &str, security: &Security, clients: usize, length: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = WorkerClient::new(security.endpoint(worker, Role::Worker)?.connect().await?);
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while start.elapsed() < length {
                let req =
                    GenerateRequest { prompt: "Hello".into(), max_tokens: Some(1), top_p: 1.0, ..Default::default() };
                let mut events = client.generate(req).await?.into_inner();
                while events.message().await?.is_some() {}
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}
