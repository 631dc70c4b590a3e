//! Operability of the real binary: OTLP span export flushed on SIGTERM, `/metrics`,
//! `/healthz`, `/readyz`, JSON logs that carry the trace id, no secrets in logs, and silence
//! about OpenTelemetry when no exporter is configured.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use gar_testsupport::objects::deployment;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message as _;
use serde_json::Value;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// One request the fake collector received.
#[derive(Debug, Clone)]
struct Post {
    path: String,
    content_type: Option<String>,
    body: bytes::Bytes,
}

/// A tiny OTLP/HTTP collector on its own thread and runtime, so that it keeps answering
/// while the test thread blocks (e.g. waiting for the daemon to exit).
fn start_collector() -> (SocketAddr, Arc<Mutex<Vec<Post>>>) {
    let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind collector");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let recorded = posts.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("collector runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().fallback(
                move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: bytes::Bytes| {
                    let recorded = recorded.clone();
                    async move {
                        recorded.lock().unwrap().push(Post {
                            path: uri.path().to_string(),
                            content_type: headers
                                .get(axum::http::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string),
                            body,
                        });
                        // An empty ExportTraceServiceResponse: full success.
                        (
                            [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                            Vec::<u8>::new(),
                        )
                    }
                },
            );
            let _ = axum::serve(listener, app).await;
        });
    });
    (addr, posts)
}

/// GET returning (status, content type, body).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String, String)> {
    gar_testsupport::http::get(addr, path).map(|r| (r.status, r.content_type, r.body))
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            any_value::Value::IntValue(i) => Some(i.to_string()),
            any_value::Value::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The daemon's kubeconfig and the service-account token in it, so that the log can be
/// checked for the token.
fn kubeconfig_with_token(h: &Harness) -> (std::path::PathBuf, String) {
    let path = h.dir.path().join("kubeconfig");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("kubeconfig")).expect("json");
    let token = config["users"][0]["user"]["token"]
        .as_str()
        .expect("a token")
        .to_owned();
    (path, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_logs_metrics_and_probes_are_operable() {
    let (collector, posts) = start_collector();
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    let (kubeconfig, token) = kubeconfig_with_token(&h);
    h.extra_args = vec!["--log-format".into(), "json".into()];
    h.extra_env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://{collector}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()),
        // Nothing leaves before shutdown: the POST proves spans are flushed on SIGTERM.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "600000".into()),
        ("KUBECONFIG".into(), kubeconfig.display().to_string()),
        (
            "RUST_LOG".into(),
            "info,gar_restarter=debug,kube_client=debug,tower_http=debug".into(),
        ),
    ];
    h.start_daemon().await;

    let (status, _, body) = get(h.metrics_addr, "/healthz").expect("/healthz");
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = get(h.metrics_addr, "/readyz").expect("/readyz");
    assert_eq!(status, 200, "{body}");

    let attributes = HashMap::from([(
        "googclient_traceparent".to_string(),
        format!("00-{TRACE}-{PARENT}-01"),
    )]);
    let message_id = h.publish_with(&insert("app:v1", HEX_A), attributes).await;
    let patched =
        r#"gar_restarter_api_requests_total{verb="patch",resource="deployments",code="200"}"#;
    assert!(
        wait_until(Duration::from_secs(15), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}") >= 1.0
        })
        .await,
        "event acked\n{}",
        h.daemon_log()
    );
    assert!(
        wait_until(Duration::from_secs(2), || h.metric(patched) >= 1.0).await,
        "the restart PATCH is not in {patched} (does daemon::run build its client with \
         cluster::client_with_metrics?)\n{}",
        h.metrics()
    );

    // /metrics: OpenMetrics, our families, API requests with real codes.
    let (status, content_type, text) = get(h.metrics_addr, "/metrics").expect("/metrics");
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    for family in [
        "# TYPE gar_restarter_events_received counter",
        "# TYPE gar_restarter_events_settled counter",
        "# TYPE gar_restarter_restarts counter",
        "# TYPE gar_restarter_api_requests counter",
        "# TYPE gar_restarter_lookup_seconds histogram",
        "# TYPE gar_restarter_in_flight gauge",
    ] {
        assert!(text.contains(family), "{family}\n{text}");
    }
    assert_eq!(metric_value(&text, patched), 1.0, "{text}");
    // The one restart is in both latency histograms: its PATCH was handed to the client
    // (the daemon's own share) and then accepted.
    for histogram in [
        "gar_restarter_receive_to_patch_seconds_count",
        "gar_restarter_receive_to_restart_seconds_count",
    ] {
        assert_eq!(metric_value(&text, histogram), 1.0, "{histogram}\n{text}");
    }
    let api_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("gar_restarter_api_requests_total{"))
        .collect();
    assert!(!api_lines.is_empty());
    for line in &api_lines {
        let code = line
            .split("code=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("code label");
        assert!(
            code == "error" || (code.len() == 3 && code.parse::<u16>().is_ok()),
            "{line}"
        );
    }
    assert!(
        posts.lock().unwrap().is_empty(),
        "the batch delay keeps spans in memory until shutdown"
    );

    // SIGTERM: the daemon drains, flushes spans and exits cleanly.
    let status = tokio::task::block_in_place(|| h.terminate_daemon(Duration::from_secs(30)))
        .expect("daemon exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", h.daemon_log());

    // OTLP: at least one protobuf POST to /v1/traces, with the consumer span in the
    // publisher's trace and the restart below it.
    let posts = posts.lock().unwrap().clone();
    let traces: Vec<&Post> = posts.iter().filter(|p| p.path == "/v1/traces").collect();
    assert!(!traces.is_empty(), "no POST to /v1/traces: {posts:?}");
    assert!(
        posts.iter().all(|p| p.path == "/v1/traces"),
        "only traces are exported: {posts:?}"
    );
    let mut spans: Vec<Span> = Vec::new();
    for post in &traces {
        assert_eq!(post.content_type.as_deref(), Some("application/x-protobuf"));
        let request = ExportTraceServiceRequest::decode(post.body.clone()).expect("protobuf");
        for rs in request.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref()?.value.clone());
            assert_eq!(
                service,
                Some(any_value::Value::StringValue("gar-restarter".into()))
            );
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
    }
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let consumer = spans
        .iter()
        .find(|s| s.kind == SpanKind::Consumer as i32)
        .unwrap_or_else(|| panic!("no consumer span among {names:?}"));
    assert_eq!(consumer.name, "process gcr-sub");
    assert_eq!(hex(&consumer.trace_id), TRACE);
    assert_eq!(hex(&consumer.parent_span_id), PARENT);
    assert_eq!(
        attr(consumer, "messaging.message.id").as_deref(),
        Some(message_id.as_str())
    );
    assert_eq!(
        attr(consumer, "messaging.system").as_deref(),
        Some("gcp_pubsub")
    );
    let in_trace = |name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name && hex(&s.trace_id) == TRACE)
            .count()
    };
    for name in ["parse", "lookup", "restart", "patch", "settle"] {
        assert_eq!(in_trace(name), 1, "{name} in the trace: {names:?}");
    }

    // JSON logs: every line is JSON; lines logged while processing the message carry its
    // trace id at top level, whichever span they were logged in.
    let log = h.daemon_log();
    let mut lines = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n---\n{log}"));
        lines.push(v);
    }
    let with_message = |m: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|v| v["message"].as_str() == Some(m))
            .collect()
    };
    let restarted = with_message("restarted");
    assert_eq!(restarted.len(), 1, "{log}");
    assert_eq!(restarted[0]["trace_id"], TRACE, "{}", restarted[0]);
    assert_eq!(restarted[0]["span"]["name"], "restart");
    let acked = with_message("acked");
    assert_eq!(acked.len(), 1, "{log}");
    assert_eq!(acked[0]["trace_id"], TRACE, "{}", acked[0]);
    assert_eq!(acked[0]["span"]["name"], "settle");
    // kube's own debug line for the PATCH, logged in its HTTP span under `restart`.
    let patch_lines: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["span"]["name"] == "HTTP"
                && v["span"]["http.method"] == "PATCH"
                && v["span"]["http.url"]
                    .as_str()
                    .is_some_and(|u| u.contains("/namespaces/prod/deployments/api"))
        })
        .collect();
    assert!(!patch_lines.is_empty(), "{log}");
    for v in patch_lines {
        assert_eq!(v["trace_id"], TRACE, "{v}");
    }
    // Start-up lines belong to no message and carry no trace id.
    let serving = with_message("serving /metrics, /healthz and /readyz");
    assert_eq!(serving.len(), 1);
    assert!(serving[0].get("trace_id").is_none(), "{}", serving[0]);

    // No credentials, whatever the level.
    assert!(!log.contains(&token), "token leaked:\n{log}");
    assert!(
        !log.to_ascii_lowercase().contains("bearer"),
        "bearer leaked:\n{log}"
    );
    assert!(
        !lines.iter().any(|v| v["level"] == "ERROR"),
        "no errors:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_without_a_subscription_and_quiet_without_an_exporter() {
    let mut h = Harness::real().await;
    let missing = h.emulator.subscription("does-not-exist");
    // A 1 s liveness timeout: the message loop must beat through every reconnect back-off
    // of the 6 s watched below, or /healthz would fail.
    h.extra_args = ["--subscription", &missing, "--liveness-timeout", "1s"]
        .map(String::from)
        .to_vec();
    // No exporter: the harness removes OTEL_EXPORTER_OTLP_ENDPOINT; clear the traces one too.
    h.extra_env = vec![("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into(), String::new())];
    h.spawn_daemon();

    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(get(h.metrics_addr, "/healthz"), Some((200, _, _))) {
        assert!(
            Instant::now() < deadline,
            "/healthz never answered\n{}",
            h.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The index loads (empty cluster), the stream never connects: /readyz stays 503 while
    // the process is alive and healthy.
    assert!(
        wait_until(Duration::from_secs(20), || {
            h.daemon_log().contains("streaming pull failed")
        })
        .await,
        "{}",
        h.daemon_log()
    );
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        let (status, _, body) = get(h.metrics_addr, "/readyz").expect("/readyz");
        assert_eq!(status, 503, "{body}\n{}", h.daemon_log());
        assert!(body.contains("stream_connected=false"), "{body}");
        let (status, _, body) = get(h.metrics_addr, "/healthz").expect("/healthz");
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{}", h.daemon_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = h.metrics();
    assert!(
        metric_value(&metrics, "gar_restarter_stream_reconnects_total") >= 1.0,
        "{metrics}"
    );

    let status = tokio::task::block_in_place(|| h.terminate_daemon(Duration::from_secs(30)))
        .expect("daemon exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", h.daemon_log());
    let log = h.daemon_log();
    for line in log.lines() {
        let lower = line.to_ascii_lowercase();
        assert!(
            !(lower.contains("opentelemetry") || lower.contains("otlp")),
            "no exporter, so nothing about it: {line}\n{log}"
        );
        assert!(!line.contains("ERROR"), "{line}\n{log}");
    }
}
