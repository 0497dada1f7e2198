//! A process's metrics port (`--metrics HOST:PORT` on coordinators and workers): `GET /metrics`
//! in the OpenMetrics text format, for Prometheus. Under the cluster's mutual TLS it answers
//! holders of an operator certificate only (Prometheus scrapes with one: docs/observability.md);
//! plain HTTP where the process runs `--insecure`. With it, the helpers every process's series
//! are written with (`prometheus-client`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::tls::{Caller, Role, Security};

/// What a scrape answers: the process's metrics as text, made afresh for each scrape.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// How long a client may take over its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves scrapes on `addr` from a task of its own (abort it to stop): bound, and the TLS
/// settled, before this returns, so a port that cannot be served is the caller's error.
pub async fn spawn(addr: SocketAddr, security: &Security, render: Render) -> io::Result<JoinHandle<()>> {
    let tls = match security {
        Security::Mutual(tls) => Some(TlsAcceptor::from(tls.stream_server().map_err(io::Error::other)?)),
        Security::Insecure => None,
    };
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            // A connection that failed before it was accepted (the client went away) is skipped.
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (tls, render) = (tls.clone(), render.clone());
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await else {
                            return;
                        };
                        let certs = stream.get_ref().1.peer_certificates().unwrap_or_default();
                        let operator = Caller::with_certs(certs).is(Role::Operator, None);
                        answer(TokioIo::new(stream), render, operator).await;
                    }
                    None => answer(TokioIo::new(stream), render, true).await,
                }
            });
        }
    }))
}

/// Serves one connection's requests: the metrics to an `allowed` caller at `/metrics`.
async fn answer<IO>(io: TokioIo<IO>, render: Render, allowed: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_connection(io, move |path| {
        let render = render.clone();
        async move {
            match (allowed, path.as_str()) {
                (false, _) => (StatusCode::FORBIDDEN, TEXT, "the metrics need an operator certificate\n".to_string()),
                (true, "/metrics") => (StatusCode::OK, OPENMETRICS, render().await),
                (true, _) => (StatusCode::NOT_FOUND, TEXT, "only /metrics is served here\n".to_string()),
            }
        }
    })
    .await;
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub(crate) const TEXT: &str = "text/plain; charset=utf-8";

/// What a port answers a request for a path: its status, content type and body.
pub(crate) type Answer = (StatusCode, &'static str, String);

/// Serves one connection's HTTP/1.1 requests, each answered by `respond` from its path; a
/// request's headers must come within [`HANDSHAKE`]. The processes' small ports (metrics,
/// health) share it.
pub(crate) async fn serve_connection<IO, F, Fut>(io: TokioIo<IO>, respond: F)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send,
{
    let respond = Arc::new(respond);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let respond = respond.clone();
        async move {
            let (status, content_type, body) = respond(request.uri().path().to_string()).await;
            let response = Response::builder()
                .status(status)
                .header(hyper::header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)));
            Ok::<_, Infallible>(response.unwrap_or_default())
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE)
        .serve_connection(io, service)
        .await;
}

/// `registries` one after another, as one scrape's OpenMetrics text.
pub fn text(registries: &[&Registry]) -> String {
    let mut text = String::new();
    for registry in registries {
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, registry);
    }
    let _ = prometheus_client::encoding::text::encode_eof(&mut text);
    text
}

/// Label pairs of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// A family of gauges holding `rows`, values read at the moment of a scrape.
pub fn gauges(rows: impl IntoIterator<Item = (Labels, f64)>) -> Family<Labels, Gauge<f64, AtomicU64>> {
    let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (labels, value) in rows {
        family.get_or_create(&labels).set(value);
    }
    family
}

/// A family of counters holding `rows`, totals kept elsewhere and read at a scrape.
pub fn counters(rows: impl IntoIterator<Item = (Labels, u64)>) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (labels, value) in rows {
        family.get_or_create(&labels).inc_by(value);
    }
    family
}

/// One histogram counted elsewhere and read at a scrape: its labels, the sum of its
/// observations and its cumulative (upper bound, count) pairs, ending at +Inf.
#[derive(Debug)]
pub struct HistogramRow {
    pub labels: Labels,
    pub sum: f64,
    pub buckets: Vec<(f64, u64)>,
}

/// A family of such histograms.
#[derive(Debug)]
pub struct Histograms(pub Vec<HistogramRow>);

impl EncodeMetric for Histograms {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        for HistogramRow { labels, sum, buckets } in &self.0 {
            let count = buckets.last().map_or(0, |b| b.1);
            encoder.encode_family(labels)?.encode_histogram::<NoLabelSet>(*sum, count, buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Writes `metric` under `name` into a collector's scrape.
pub fn encode(encoder: &mut DescriptorEncoder, name: &str, help: &str, metric: &impl EncodeMetric) -> std::fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}
