//! Serves the gateway's routes on its listener: plain HTTP, or HTTPS when the operator gave a
//! certificate (`--tls-cert`, `--tls-key`). Either way one port carries HTTP/1.1 and HTTP/2 (the
//! gRPC job API), and a client that stalls holds nothing for long: its TLS handshake and each
//! request's headers have a deadline, and an HTTP/2 connection that stops answering pings is
//! closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers, a new connection's first request
/// and the next one on a kept-alive connection alike.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 connections are pinged this often, and closed when a ping goes unanswered this long.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// hyper's own cap on a request's headers, far above the gateway's (`mod.rs`, which answers in
/// OpenAI's shape): past it hyper answers a bare 431 before any route sees the request.
const HYPER_MAX_HEADERS: usize = 1000;
/// The pause after a failed accept (out of file descriptors, ...), so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// How long the requests in flight when the gateway stops may take to finish: under the 30 s a
/// service manager or Kubernetes gives a process between its SIGTERM and its SIGKILL.
pub const DRAIN: Duration = Duration::from_secs(20);

/// Serves `router` on `listener` until `stopped` resolves: over TLS with `tls`, else in plain
/// text. Then it drains: it takes no new connection, tells every open one to close once its
/// request in flight is answered (a rolling restart drops none), and returns when all have
/// closed or [`DRAIN`] has passed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let (stopping, stop_watch) = watch::channel(false);
    let mut connections = JoinSet::new();
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
            Some(_) = connections.join_next() => continue,
            () = &mut stopped => break,
        };
        let (acceptor, router, stop) = (acceptor.clone(), router.clone(), stop_watch.clone());
        connections.spawn(async move {
            match acceptor {
                None => connection(FirstBytes::new(tcp), router, stop).await,
                Some(acceptor) => {
                    if let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        connection(FirstBytes::new(stream), router, stop).await;
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    let _ = tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} }).await;
    Ok(())
}

/// Serves one connection's requests until it ends (cleanly or not: the client's business), or,
/// once `stop` turns true, until its request in flight is answered. [`FirstBytes`] bounds the
/// wait before hyper has told HTTP/1 from HTTP/2.
async fn connection(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    router: Router,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_headers(HYPER_MAX_HEADERS);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(PING_INTERVAL).keep_alive_timeout(PING_TIMEOUT);
    let service = TowerToHyperService::new(router);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => return,
        _ = stop.wait_for(|stopping| *stopping) => served.as_mut().graceful_shutdown(),
    }
    let _ = served.await;
}

/// The length of HTTP/2's connection preface; every HTTP/1 request with a `Host` header is
/// longer too.
const PREFACE: usize = 24;

/// A connection whose client must send its first [`PREFACE`] bytes within [`HEADER_TIMEOUT`]:
/// hyper waits for them with no deadline of its own (to tell HTTP/1 from HTTP/2, and for an
/// HTTP/2 preface), and its header and ping deadlines start only after.
struct FirstBytes<IO> {
    io: IO,
    read: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<IO> FirstBytes<IO> {
    fn new(io: IO) -> Self {
        FirstBytes { io, read: 0, deadline: Box::pin(tokio::time::sleep(HEADER_TIMEOUT)) }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstBytes<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.read < PREFACE && self.deadline.as_mut().poll(cx).is_ready() {
            let late = format!("no request within {HEADER_TIMEOUT:?}");
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, late)));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.read += buf.filled().len() - before;
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstBytes<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
