//! Logs and traces of every `tandem` process. `tracing` events are filtered by `RUST_LOG`
//! (`info` for the cluster's processes, `warn` for commands a person runs) and written to
//! stderr as text or JSON lines (`--log-format`). Every span gets an OpenTelemetry context, so
//! its trace id is on each log line inside it and travels over gRPC
//! (`tandem_proto::trace_context`); the spans are exported over OTLP only where an operator
//! names a receiver (`--otlp-endpoint`, or the standard `OTEL_EXPORTER_OTLP_*` variables).

use std::io::IsTerminal;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line a person reads, with the spans it happened in.
    #[default]
    Text,
    /// One JSON object per line (its spans' fields, the trace id among them), for collectors.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Where a cluster process sends its spans.
#[derive(Args, Clone, Debug, Default)]
pub struct OtlpArgs {
    /// Send spans over OTLP to this receiver (`http://HOST:4317` for gRPC, `http://HOST:4318`
    /// for HTTP); the standard OTEL_EXPORTER_OTLP_ENDPOINT does the same. Off when neither is
    /// set.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// grpc | http/protobuf (default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc).
    #[arg(long)]
    pub otlp_protocol: Option<String>,
}

impl OtlpArgs {
    /// The same flags, for a child process.
    pub fn to_args(&self) -> Vec<String> {
        let flags = [("--otlp-endpoint", &self.otlp_endpoint), ("--otlp-protocol", &self.otlp_protocol)];
        flags.into_iter().filter_map(|(f, v)| v.as_ref().map(|v| [f.to_string(), v.clone()])).flatten().collect()
    }
}

/// What a process logs and exports; exported spans are flushed when it is dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// The exporter's own runtime, outside the process's, so export never waits on its work.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs the process's subscriber. `service` names it in traces (OTEL_SERVICE_NAME wins);
/// `otlp` is `None` for commands a person runs, which log warnings only and export nothing.
pub fn init(format: LogFormat, service: &str, otlp: Option<&OtlpArgs>) -> Result<Telemetry> {
    let default_level = if otlp.is_some() { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(default_level))?;
    let (provider, runtime) = tracer_provider(service, otlp)?;
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("tandem"));
    // Spans recorded afterwards, with measured times (a request's phases on a worker), go
    // through OpenTelemetry's global provider: the same one.
    opentelemetry::global::set_tracer_provider(provider.clone());
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // Colours only for a person at a terminal, never into a log file.
    let stderr =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => registry.with(stderr).try_init(),
        LogFormat::Json => registry.with(stderr.json().with_current_span(false).with_span_list(true)).try_init(),
    }
    .context("installing the log subscriber")?;
    Ok(Telemetry { provider, _runtime: runtime })
}

/// The provider of every span's context; with an OTLP exporter when one is configured.
fn tracer_provider(
    service: &str,
    otlp: Option<&OtlpArgs>,
) -> Result<(SdkTracerProvider, Option<tokio::runtime::Runtime>)> {
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    let Some(otlp) = otlp.filter(|o| o.otlp_endpoint.is_some() || env("ENDPOINT").is_some()) else {
        return Ok((builder.build(), None));
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()?;
    let _in_runtime = runtime.enter();
    let protocol = otlp.otlp_protocol.clone().or_else(|| env("PROTOCOL")).unwrap_or_else(|| "grpc".into());
    let exporter = match protocol.as_str() {
        "grpc" => {
            let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = &otlp.otlp_endpoint {
                exporter = exporter.with_endpoint(endpoint);
            }
            exporter.build()
        }
        "http/protobuf" => {
            let mut exporter =
                opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(Protocol::HttpBinary);
            if let Some(endpoint) = &otlp.otlp_endpoint {
                // The flag means what OTEL_EXPORTER_OTLP_ENDPOINT means: the receiver's base URL.
                exporter = exporter.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
            }
            exporter.build()
        }
        other => bail!("OTLP protocol {other:?}: use grpc or http/protobuf"),
    }
    .context("the OTLP exporter")?;
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok((builder.with_span_processor(processor).build(), Some(runtime)))
}

/// `OTEL_EXPORTER_OTLP_TRACES_{what}`, else `OTEL_EXPORTER_OTLP_{what}`.
fn env(what: &str) -> Option<String> {
    [format!("OTEL_EXPORTER_OTLP_TRACES_{what}"), format!("OTEL_EXPORTER_OTLP_{what}")]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}
