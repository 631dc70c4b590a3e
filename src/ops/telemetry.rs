//! Logs and traces. Logs go to stdout (JSON or text, filtered by `RUST_LOG`); spans go to an
//! OTLP exporter configured only by the standard `OTEL_*` variables, and only when an
//! endpoint is set. The OpenTelemetry layer is always installed so that every log line of a
//! message carries its trace id, exporter or not.

use std::collections::HashMap;
use std::io::IsTerminal;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
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
    #[error("{var}={value:?} is not an OTLP protocol (expected grpc, http/protobuf or http/json)")]
    Protocol { var: &'static str, value: String },
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

/// The protocol variables the OTLP exporter reads.
const PROTOCOL_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
];

/// The exporter falls back to its default on a protocol it does not know, so a typo
/// (`http/proto`) would silently export with another protocol, or not at all. Refused here,
/// naming the variable, whether or not an endpoint is set.
pub fn check_protocol(var: &'static str, value: Option<&str>) -> Result<(), TelemetryError> {
    match value.map(str::trim) {
        None | Some("" | "grpc" | "http/protobuf" | "http/json") => Ok(()),
        Some(other) => Err(TelemetryError::Protocol {
            var,
            value: crate::util::excerpt::quote(other)
                .trim_matches('"')
                .to_string(),
        }),
    }
}

/// The tracer provider: batch OTLP export when requested, otherwise ids only.
pub fn tracer_provider() -> Result<SdkTracerProvider, TelemetryError> {
    for var in PROTOCOL_VARS {
        check_protocol(var, std::env::var(var).ok().as_deref())?;
    }
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
            .fmt_fields(JsonFields::new())
            .event_format(WithTraceId(
                tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .flatten_event(true),
            ))
            .with_writer(std::io::stdout)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            // Colour codes only for a person at a terminal: piped into a file or a collector
            // they are noise (`NO_COLOR`, https://no-color.org, turns them off there too).
            .with_ansi(ansi_wanted(
                std::io::stdout().is_terminal(),
                std::env::var_os("NO_COLOR").is_some(),
            ))
            .with_writer(std::io::stdout)
            .with_filter(filter)
            .boxed(),
    };
    Registry::default()
        .with(otel)
        .with(TraceIdLayer)
        .with(fmt)
        .try_init()
        .map_err(|e| TelemetryError::Init(e.to_string()))?;
    Ok(Telemetry { provider })
}

/// The field [`continue_trace`] records; JSON log lines carry it at top level.
const TRACE_ID_FIELD: &str = "trace_id";

/// A span's `trace_id` field, kept in its extensions for [`WithTraceId`].
struct TraceId(String);

/// Remembers the `trace_id` recorded on a span, so that lines logged in its children (the
/// pipeline's `lookup`, `restart`, `settle`, kube's `HTTP`) can carry it too.
struct TraceIdLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for TraceIdLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().fields().field(TRACE_ID_FIELD).is_none() {
            return;
        }
        let mut visitor = TraceIdVisitor(None);
        attrs.record(&mut visitor);
        if let (Some(trace_id), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().insert(TraceId(trace_id));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut visitor = TraceIdVisitor(None);
        values.record(&mut visitor);
        if let (Some(trace_id), Some(span)) = (visitor.0, ctx.span(id)) {
            let mut extensions = span.extensions_mut();
            extensions.remove::<TraceId>();
            extensions.insert(TraceId(trace_id));
        }
    }
}

struct TraceIdVisitor(Option<String>);

impl Visit for TraceIdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == TRACE_ID_FIELD {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == TRACE_ID_FIELD {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// Wraps the JSON event format: a line logged anywhere inside a span that has a trace id
/// (the consumer span of a message and everything under it) gets a top-level `trace_id`.
struct WithTraceId<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    F: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let trace_id = ctx.event_scope().and_then(|scope| {
            scope
                .from_root()
                .find_map(|span| span.extensions().get::<TraceId>().map(|t| t.0.clone()))
        });
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let Some(rest) = line.strip_prefix('{') else {
            return writer.write_str(&line);
        };
        // Cloud Logging reads `severity`, not `level`: without it every line is DEFAULT and
        // severity filters and alerts see nothing. `level` stays for everyone else.
        let mut head = format!(
            "\"severity\":\"{}\"",
            cloud_severity(event.metadata().level())
        );
        if let Some(trace_id) = trace_id {
            let quoted = serde_json::to_string(&trace_id).map_err(|_| std::fmt::Error)?;
            head.push_str(&format!(",\"{TRACE_ID_FIELD}\":{quoted}"));
        }
        let sep = if rest.starts_with('}') { "" } else { "," };
        write!(writer, "{{{head}{sep}{rest}")
    }
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
    span.record(TRACE_ID_FIELD, tracing::field::display(trace_id));
}

/// Cloud Logging's `LogSeverity` names for tracing's levels (it has no TRACE).
fn cloud_severity(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "ERROR",
        tracing::Level::WARN => "WARNING",
        tracing::Level::INFO => "INFO",
        tracing::Level::DEBUG | tracing::Level::TRACE => "DEBUG",
    }
}

fn ansi_wanted(stdout_is_terminal: bool, no_color: bool) -> bool {
    stdout_is_terminal && !no_color
}

/// Default log format: JSON inside a cluster, text on a terminal.
pub fn default_format() -> LogFormat {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        LogFormat::Json
    } else {
        LogFormat::Text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_protocol_is_validated_naming_the_variable() {
        for ok in [
            None,
            Some(""),
            Some("grpc"),
            Some("http/protobuf"),
            Some(" http/json "),
        ] {
            assert!(
                check_protocol("OTEL_EXPORTER_OTLP_PROTOCOL", ok).is_ok(),
                "{ok:?}"
            );
        }
        let e = check_protocol("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some("http/proto"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=\"http/proto\""),
            "{e}"
        );
    }

    #[test]
    fn json_lines_carry_cloud_logging_severity() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(WithTraceId(
                tracing_subscriber::fmt::format().json().flatten_event(true),
            ))
            .with_writer(move || writer.clone());
        let subscriber = Registry::default().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(k = 1, "careful");
            tracing::error!("bad");
            tracing::info!("fine");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| {
                (
                    l["severity"].as_str().unwrap(),
                    l["level"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [("WARNING", "WARN"), ("ERROR", "ERROR"), ("INFO", "INFO")]
        );
    }

    #[test]
    fn colours_only_on_a_terminal() {
        assert!(ansi_wanted(true, false));
        assert!(!ansi_wanted(false, false));
        assert!(!ansi_wanted(true, true));
    }
}
