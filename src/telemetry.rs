//! Logs and traces. Logs go to stdout (JSON or text, filtered by `RUST_LOG`); spans go to an
//! OTLP exporter configured only by the standard `OTEL_*` variables, and only when an
//! endpoint is set. The OpenTelemetry layer is always installed so that every log line of a
//! message carries its trace id, exporter or not.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::LogFormat;

/// The Pub/Sub attribute Google's client libraries use to propagate W3C trace context.
pub const TRACEPARENT_ATTRIBUTE: &str = "googclient_traceparent";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter (check OTEL_EXPORTER_OTLP_ENDPOINT / _PROTOCOL / _HEADERS): {0}")]
    Exporter(String),
    #[error("RUST_LOG: {0}")]
    Filter(String),
    #[error("installing the tracing subscriber: {0}")]
    Init(String),
}

/// Keeps the tracer provider alive; `shutdown` flushes spans.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "span exporter shutdown");
        }
    }
}

/// True when the environment asks for span export.
fn export_requested() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none")
        || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The tracer provider: batch OTLP export when requested, otherwise ids only.
pub fn tracer_provider() -> Result<SdkTracerProvider, TelemetryError> {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("gar-restarter");
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    if export_requested() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// Which spans reach OpenTelemetry, independent of `RUST_LOG`: ours at INFO and kube's
/// per-request `HTTP` spans (DEBUG) so they nest under `lookup` and `restart`.
pub fn otel_targets() -> Targets {
    Targets::new()
        .with_target("gar_restarter", tracing::Level::INFO)
        .with_target("kube_client::client::builder", tracing::Level::DEBUG)
}

pub fn init(format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let provider = tracer_provider()?;
    let tracer = provider.tracer("gar-restarter");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_targets());
    let filter =
        EnvFilter::try_from_default_env().or_else(|e| match std::env::var("RUST_LOG") {
            Ok(_) => Err(TelemetryError::Filter(e.to_string())),
            Err(_) => Ok(EnvFilter::new("info")),
        })?;
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .with_writer(std::io::stdout)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stdout)
            .with_filter(filter)
            .boxed(),
    };
    Registry::default()
        .with(otel)
        .with(fmt)
        .try_init()
        .map_err(|e| TelemetryError::Init(e.to_string()))?;
    Ok(Telemetry { provider })
}

/// Continues the publisher's trace when the message carries `googclient_traceparent`, then
/// records the trace id on the span so every log line inside it carries it.
pub fn continue_trace(span: &tracing::Span, attributes: &HashMap<String, String>) {
    if let Some(traceparent) = attributes.get(TRACEPARENT_ATTRIBUTE) {
        let carrier = HashMap::from([("traceparent".to_string(), traceparent.clone())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// Default log format: JSON inside a cluster, text on a terminal.
pub fn default_format() -> LogFormat {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        LogFormat::Json
    } else {
        LogFormat::Text
    }
}
