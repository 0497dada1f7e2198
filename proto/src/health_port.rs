//! A process's health port (`--health HOST:PORT` on coordinators and workers): plain HTTP for
//! the probes of a service manager or Kubernetes, which cannot show a cluster certificate. It
//! answers `GET /health` alone, and says nothing but whether the process can serve: `200 ok`,
//! or `503` with the reason it cannot.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Whether the process can serve now: `Err` says why not.
pub type Ready = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// How long a probe may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves probes on `addr` from a task of its own (abort it to stop); bound before this
/// returns, so a port that cannot be served is the caller's error.
pub async fn spawn(addr: SocketAddr, ready: Ready) -> io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let ready = ready.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let ready = ready.clone();
                    async move {
                        let (status, body) = match request.uri().path() {
                            "/health" => match ready().await {
                                Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                                Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                            },
                            _ => (StatusCode::NOT_FOUND, "only /health is served here\n".to_string()),
                        };
                        let response = Response::builder()
                            .status(status)
                            .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                            .body(Full::new(Bytes::from(body)));
                        Ok::<_, Infallible>(response.unwrap_or_default())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}
