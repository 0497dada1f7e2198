//! Serves the gateway's routes on its listener: plain HTTP, or HTTPS when the operator gave a
//! certificate (`--tls-cert`, `--tls-key`). Either way one port carries HTTP/1.1 and HTTP/2 (the
//! gRPC job API), and a client that stalls holds nothing for long: its TLS handshake and each
//! request's headers have a deadline, and an HTTP/2 connection that stops answering pings is
//! closed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers, a new connection's first request
/// and the next one on a kept-alive connection alike.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 connections are pinged this often, and closed when a ping goes unanswered this long.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// The pause after a failed accept (out of file descriptors, ...), so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `stopped` resolves: over TLS with `tls`, else in plain
/// text. Connections still open then end with the process.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::pin!(stopped);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut stopped => return Ok(()),
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            match acceptor {
                None => {
                    // Telling HTTP/1 from HTTP/2 waits for the client's first bytes, with no
                    // deadline of its own: a client that sends nothing is dropped here.
                    let mut first = [0u8; 1];
                    if let Ok(Ok(1..)) = tokio::time::timeout(HEADER_TIMEOUT, tcp.peek(&mut first)).await {
                        connection(tcp, router, false).await;
                    }
                }
                Some(acceptor) => {
                    if let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        // ALPN named the protocol: an HTTP/1 client needs no sniffing, so its
                        // header deadline holds from the start.
                        let http1 = stream.get_ref().1.alpn_protocol() != Some(b"h2");
                        connection(stream, router, http1).await;
                    }
                }
            }
        });
    }
}

/// Serves one connection's requests until it ends (cleanly or not: the client's business);
/// `http1` when the protocol is known to be HTTP/1.
async fn connection(io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static, router: Router, http1: bool) {
    let mut builder = Builder::new(TokioExecutor::new());
    if http1 {
        builder = builder.http1_only();
    }
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(PING_INTERVAL).keep_alive_timeout(PING_TIMEOUT);
    let service = TowerToHyperService::new(router);
    let _ = builder.serve_connection_with_upgrades(TokioIo::new(io), service).await;
}
