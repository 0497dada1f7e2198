//! W3C trace context across every gRPC hop between Tandem's processes: a call carries its
//! caller's span as `traceparent` metadata ([`Traced`]), and the server's span for the call takes
//! it as its parent ([`server_span`]), so one request is one trace from the gateway through the
//! coordinators to the workers and their ranks. The spans are `tracing` spans; the binary's
//! subscriber gives them OpenTelemetry contexts (and exports them when asked).
//!
//! Work whose phases are known only once they are over (a request's queue wait on an engine, a
//! Raft proposal's commit) is recorded afterwards with its measured times ([`Hindsight`]),
//! through OpenTelemetry directly: a `tracing` span's times are those of its entering and
//! leaving.

use std::time::{Instant, SystemTime};

use opentelemetry::Context;
use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, TraceContextExt, TraceId, Tracer};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A channel whose every call carries the calling span's trace context.
pub type Traced = InterceptedService<Channel, Inject>;

/// `channel`, its calls carrying the caller's trace context.
pub fn traced(channel: Channel) -> Traced {
    InterceptedService::new(channel, Inject)
}

/// Writes the current span's context into each outgoing call's metadata. Interceptors run
/// inside the caller's poll, so the current span is the caller's.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inject;

impl Interceptor for Inject {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject(&tracing::Span::current(), request.metadata_mut());
        Ok(request)
    }
}

/// Writes `span`'s context into `metadata` (nothing when the span has none: no subscriber).
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut MetadataInjector(metadata));
}

/// The span of one call a server answers (`Server::trace_fn`): a child of the caller's span
/// when the call carries a `traceparent`, the root of a new trace when not.
pub fn server_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc", method = request.uri().path(), trace_id = tracing::field::Empty);
    adopt(&span, request.headers());
    span
}

/// Makes `span` a child of the W3C context in `headers` (if any) and records its trace id in
/// the span's `trace_id` field, which every log line inside it then carries.
pub fn adopt(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Fails only without a subscriber that keeps OpenTelemetry contexts: nothing to join.
        let _ = span.set_parent(parent);
    }
    if let Some(id) = trace_id(span) {
        span.record("trace_id", tracing::field::display(id));
    }
}

/// `span`'s context as a W3C `traceparent` value, for work that leaves by another way than
/// gRPC (a worker group's plans); none when the span is not traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span`, work done for several traced requests at once (a pass on a worker group's
/// other rank), the child of the first of `traceparents` and linked to the others.
pub fn join_batch(span: &tracing::Span, traceparents: &[String]) {
    let propagator = TraceContextPropagator::new();
    let mut contexts = (traceparents.iter())
        .map(|t| propagator.extract(&Traceparent(t)))
        .filter(|c| c.span().span_context().is_valid());
    if let Some(first) = contexts.next() {
        // Fails only without a subscriber that keeps OpenTelemetry contexts: nothing to join.
        let _ = span.set_parent(first);
    }
    for other in contexts {
        span.add_link(other.span().span_context().clone());
    }
}

/// The trace `span` belongs to, when the subscriber gives spans OpenTelemetry contexts.
pub fn trace_id(span: &tracing::Span) -> Option<TraceId> {
    let id = span.context().span().span_context().trace_id();
    (id != TraceId::INVALID).then_some(id)
}

/// Spans recorded after the fact, under one reading of the wall clock (so that phases that
/// meet stay joined).
pub struct Hindsight {
    now: Instant,
    wall: SystemTime,
}

impl Default for Hindsight {
    fn default() -> Self {
        Hindsight { now: Instant::now(), wall: SystemTime::now() }
    }
}

impl Hindsight {
    /// `name` from `start` to `end`, a child of `parent`, with `attributes`; nothing when
    /// `parent` is not traced.
    pub fn record(
        &self,
        parent: &tracing::Span,
        name: &'static str,
        times: (Instant, Instant),
        attributes: Vec<KeyValue>,
    ) {
        let parent = parent.context();
        if parent.span().span_context().is_valid() {
            self.child(&parent, name, times, attributes);
        }
    }

    /// `name` as the root of a trace of its own (work no request asked for: a fine-tuning
    /// step); returns its context, for its children.
    pub fn root(&self, name: &'static str, times: (Instant, Instant), attributes: Vec<KeyValue>) -> Context {
        self.child(&Context::new(), name, times, attributes)
    }

    /// `name` from `start` to `end`, a child of `parent`, with `attributes`; returns its
    /// context, for its own children.
    pub fn child(
        &self,
        parent: &Context,
        name: &'static str,
        (start, end): (Instant, Instant),
        attributes: Vec<KeyValue>,
    ) -> Context {
        let at = |i: Instant| self.wall - self.now.saturating_duration_since(i);
        let tracer = opentelemetry::global::tracer("tandem");
        let builder = tracer.span_builder(name).with_start_time(at(start)).with_attributes(attributes);
        let mut span = builder.start_with_context(&tracer, parent);
        let context = span.span_context().clone();
        span.end_with_timestamp(at(end));
        parent.with_remote_span_context(context)
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// One `traceparent` value, read as a carrier.
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}
