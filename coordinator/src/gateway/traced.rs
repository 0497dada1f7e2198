//! Each HTTP request in a span of its own: it continues the caller's trace when the request
//! carries a W3C `traceparent` and starts one when not, so every log line of the request (and
//! every process it reaches) carries the same trace id. The response names that id in
//! `x-request-id`, for a user to quote to an operator.

use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tandem_proto::trace_context;
use tracing::Instrument;
use tracing::field::Empty;

pub async fn traced(request: Request, next: Next) -> Response {
    // Health probes come every few hundred milliseconds: their lines and traces would bury the
    // others, so theirs are at debug level (off by default).
    let probe = request.uri().path() == "/health";
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let span = match probe {
        true => tracing::debug_span!("http", %method, path, trace_id = Empty),
        false => tracing::info_span!("http", %method, path, trace_id = Empty),
    };
    trace_context::adopt(&span, request.headers());
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let (status, ms) = (response.status().as_u16(), started.elapsed().as_millis() as u64);
    // Inside the span rather than naming it as parent: the log formats list only entered spans.
    span.in_scope(|| match probe {
        true => tracing::debug!(status, ms, "answered"),
        false => tracing::info!(status, ms, "answered"),
    });
    if let Some(id) = trace_context::trace_id(&span).and_then(|id| HeaderValue::from_str(&id.to_string()).ok()) {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}
