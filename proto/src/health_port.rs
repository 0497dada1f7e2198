//! A process's health port (`--health HOST:PORT` on coordinators and workers): plain HTTP for
//! the probes of a service manager or Kubernetes, which cannot show a cluster certificate. It
//! answers `GET /health` alone, and says nothing but whether the process can serve: `200 ok`,
//! or `503` with the reason it cannot.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::metrics_port::{TEXT, serve_connection};

/// Whether the process can serve now: `Err` says why not.
pub type Ready = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Serves probes on `addr` from a task of its own (abort it to stop); bound before this
/// returns, so a port that cannot be served is the caller's error.
pub async fn spawn(addr: SocketAddr, ready: Ready) -> io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let ready = ready.clone();
            tokio::spawn(serve_connection(TokioIo::new(stream), move |path| {
                let ready = ready.clone();
                async move {
                    match path.as_str() {
                        "/health" => match ready().await {
                            Ok(()) => (StatusCode::OK, TEXT, "ok\n".to_string()),
                            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
                        },
                        _ => (StatusCode::NOT_FOUND, TEXT, "only /health is served here\n".to_string()),
                    }
                }
            }));
        }
    }))
}
