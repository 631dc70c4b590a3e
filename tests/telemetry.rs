//! Span tree of one delivery: a real message through the real pipeline and settle stage,
//! against a real kube-apiserver, recorded by the SDK's in-memory exporter through a subscriber
//! built like `telemetry::init` (the OpenTelemetry layer filtered by `otel_targets()`).
//!
//! `tracing::subscriber::set_default` is per thread, so every test runs on a current-thread
//! runtime (`#[tokio::test]`'s default).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use gar_restarter::act::restart::{Restarter, RestarterConfig, RetryPolicy};
use gar_restarter::cluster::api_metrics::ApiMetricsLayer;
use gar_restarter::index::live::{Change, LiveView, StreamId};
use gar_restarter::index::lookup::SharedIndex;
use gar_restarter::index::object::{Deployments, Object};
use gar_restarter::index::table::{Index, Scope};
use gar_restarter::index::workload::{WorkloadKind, WorkloadRef};
use gar_restarter::ingest::image::ImageRef;
use gar_restarter::ingest::inbound::Inbound;
use gar_restarter::ops::metrics::Metrics;
use gar_restarter::ops::telemetry::{TRACEPARENT_ATTRIBUTE, otel_targets};
use gar_restarter::pipeline::{Context, Pipeline, PipelineConfig};
use gar_restarter::settle::deadletter::{DeadLetter, DeadLetterSink, PublishError};
use gar_restarter::settle::{AckHandle, Settled, Settler};
use gar_testsupport::kube_api::KubeApi;
use gar_testsupport::objects::deployment;
use gar_testsupport::traffic::Recording;
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;

const SUBSCRIPTION: &str = "projects/test-project/subscriptions/gcr-sub";
const HEX: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn gar(path: &str) -> String {
    format!("us-west1-docker.pkg.dev/proj/repo/{path}")
}

#[derive(Clone, Default)]
struct Handle(Arc<Mutex<Vec<&'static str>>>);

impl AckHandle for Handle {
    fn ack(self) {
        self.0.lock().unwrap().push("ack");
    }
    fn nack(self) {
        self.0.lock().unwrap().push("nack");
    }
}

#[derive(Default)]
struct MemorySink(Mutex<Vec<DeadLetter>>);

impl DeadLetterSink for MemorySink {
    async fn publish(&self, letter: DeadLetter) -> Result<String, PublishError> {
        let mut letters = self.0.lock().unwrap();
        letters.push(letter);
        Ok(format!("dlq-{}", letters.len()))
    }
}

struct Fixture {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    _subscriber: tracing::subscriber::DefaultGuard,
    api: std::sync::Arc<KubeApi>,
    pipeline: Pipeline<SharedIndex, MemorySink>,
    metrics: Arc<Metrics>,
    sink: Arc<MemorySink>,
    /// Fed by [`relist`] rather than a watch, when the fixture has one.
    view: Option<Arc<LiveView>>,
}

fn deployments() -> StreamId {
    StreamId {
        kind: WorkloadKind::Deployment,
        namespace: None,
    }
}

/// Lists the fixture's Deployments into `view`, as a watch's relist would.
fn relist(api: &KubeApi, view: &LiveView) {
    let stream = deployments();
    view.apply(&stream, Change::ListStarted);
    for (ns, name) in [("prod", "api"), ("staging", "api"), ("prod", "old")] {
        let obj = api.get("deployments", ns, name).expect("seeded");
        let d: Object<Deployments> = serde_json::from_value(obj).expect("a Deployment");
        view.apply(&stream, Change::Listed(d.into_state().expect("state")));
    }
    view.apply(&stream, Change::ListDone);
}

impl Fixture {
    /// A real API server with two Deployments running `app:v1` (indexed) and one running `app:v0`.
    async fn new() -> Fixture {
        Self::with_view(false).await
    }

    /// [`Fixture::new`], with decisions taken on a live view listed from the API server when
    /// `live` (the containers and their pull policies are then known).
    async fn with_view(live: bool) -> Fixture {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        keep_a_second_dispatch_alive();
        // Set up before the recording subscriber: its own kube calls must not be recorded.
        let api = KubeApi::start().await.expect("test control plane");
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("gar-restarter"))
            .with_filter(otel_targets());
        let subscriber =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(otel));

        let v1 = gar("app:v1");
        api.insert(deployment("prod", "api", &[&v1]));
        api.insert(deployment("staging", "api", &[&v1]));
        api.insert(deployment("prod", "old", &[&gar("app:v0")]));
        let image = ImageRef::parse(&v1).expect("image");
        let index = Index::build(
            [
                (
                    WorkloadRef::new(WorkloadKind::Deployment, "prod", "api"),
                    vec![image.clone()],
                ),
                (
                    WorkloadRef::new(WorkloadKind::Deployment, "staging", "api"),
                    vec![image],
                ),
                (
                    WorkloadRef::new(WorkloadKind::Deployment, "prod", "old"),
                    vec![ImageRef::parse(&gar("app:v0")).expect("image")],
                ),
            ],
            Scope::default(),
            "2026-01-01T00:00:00Z".into(),
        );

        let metrics = Arc::new(Metrics::new());
        let view = live.then(|| {
            let view = Arc::new(LiveView::new(
                vec![deployments()],
                false,
                Duration::from_secs(1),
            ));
            relist(&api, &view);
            view
        });
        let client = kube::client::ClientBuilder::try_from(api.daemon_config())
            .expect("client")
            .with_layer(&ApiMetricsLayer::new(metrics.clone()))
            .build();
        let restarter = Restarter::new(
            client,
            RestarterConfig {
                retry: RetryPolicy {
                    min_delay: Duration::from_millis(1),
                    max_delay: Duration::from_millis(5),
                    max_times: 1,
                    budget: Duration::from_millis(50),
                },
                live: view.clone(),
                metrics: metrics.clone(),
                ..RestarterConfig::default()
            },
        );
        let sink = Arc::new(MemorySink::default());
        let pipeline = Pipeline::new(
            Arc::new(SharedIndex::new(index)),
            restarter,
            Context {
                settler: Settler {
                    sink: sink.clone(),
                    subscription: Arc::from(SUBSCRIPTION),
                    metrics: metrics.clone(),
                },
                abort: CancellationToken::new(),
                rollouts: None,
                notify: None,
            },
            PipelineConfig { max_attempts: 5 },
        );
        Fixture {
            exporter,
            provider,
            _subscriber: subscriber,
            api,
            pipeline,
            metrics,
            sink,
            view,
        }
    }

    /// Runs one delivery exactly as the source does: one `Pipeline::handle` call.
    async fn deliver(&self, msg: Inbound) -> (Option<Settled>, Vec<&'static str>) {
        let handle = Handle::default();
        let settled = self.pipeline.handle(msg, handle.clone()).await;
        let calls = handle.0.lock().unwrap().clone();
        (settled, calls)
    }

    fn spans(&self) -> Vec<SpanData> {
        self.provider.force_flush().expect("flush");
        self.exporter.get_finished_spans().expect("spans")
    }
}

/// While exactly one tracing `Dispatch` exists, tracing-core computes a callsite's interest
/// from the default of whichever thread registers the callsite first (tokio-rs/tracing#3611).
/// Here that thread can be the control plane's kubelet or proxy, which run kube's client
/// with no subscriber: kube's per-request span callsite would then be cached as "never" and
/// the test's subscriber would not see it. A second live `Dispatch` makes tracing-core ask
/// every registered subscriber instead. The daemon installs one global subscriber and is not
/// affected.
fn keep_a_second_dispatch_alive() {
    static SECOND: OnceLock<tracing::Dispatch> = OnceLock::new();
    SECOND.get_or_init(|| tracing::Dispatch::new(tracing_subscriber::registry()));
}

fn message(id: &str, data: &str, attributes: HashMap<String, String>) -> Inbound {
    Inbound {
        id: id.into(),
        data: Bytes::from(data.to_string()),
        attributes,
        publish_time: Some(SystemTime::now()),
        delivery_attempt: Some(1),
    }
}

fn insert_v1() -> String {
    serde_json::json!({
        "action": "INSERT",
        "digest": gar(&format!("app@sha256:{HEX}")),
        "tag": gar("app:v1"),
    })
    .to_string()
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

fn expect_attr(span: &SpanData, key: &str) -> String {
    attr(span, key).unwrap_or_else(|| panic!("span {} has no {key}: {span:#?}", span.name))
}

fn one<'a>(spans: &'a [SpanData], pred: impl Fn(&SpanData) -> bool, what: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans.iter().filter(|s| pred(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what} span: {spans:#?}");
    found[0]
}

fn children<'a>(spans: &'a [SpanData], parent: &SpanData, name: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_context.span_id() && s.name == name)
        .collect()
}

/// The full tree of one restarting delivery, checked against the consumer span `process`.
fn check_restart_tree(spans: &[SpanData]) -> &SpanData {
    let consumer = one(spans, |s| s.span_kind == SpanKind::Consumer, "consumer");
    assert_eq!(consumer.name, "process gcr-sub");
    assert_eq!(expect_attr(consumer, "messaging.system"), "gcp_pubsub");
    assert_eq!(expect_attr(consumer, "messaging.operation.type"), "process");
    assert_eq!(
        expect_attr(consumer, "messaging.destination.subscription.name"),
        SUBSCRIPTION
    );
    assert_eq!(expect_attr(consumer, "messaging.message.id"), "m-1");
    assert_eq!(
        expect_attr(consumer, "messaging.gcp_pubsub.message.delivery_attempt"),
        "1"
    );
    assert_eq!(expect_attr(consumer, "gar.image"), gar("app:v1"));
    assert_eq!(expect_attr(consumer, "gar.digest"), format!("sha256:{HEX}"));
    assert_eq!(
        expect_attr(consumer, "trace_id"),
        consumer.span_context.trace_id().to_string(),
        "the log field and the exported trace agree"
    );
    assert_eq!(consumer.status, opentelemetry::trace::Status::Unset);

    let trace = consumer.span_context.trace_id();
    for s in spans {
        assert_eq!(s.span_context.trace_id(), trace, "one trace: {s:#?}");
    }

    assert_eq!(children(spans, consumer, "parse").len(), 1, "{spans:#?}");
    let lookup = children(spans, consumer, "lookup");
    assert_eq!(lookup.len(), 1, "{spans:#?}");
    assert_eq!(expect_attr(lookup[0], "source"), "memory");
    assert_eq!(expect_attr(lookup[0], "hits"), "2");

    let mut restarts = children(spans, consumer, "restart");
    restarts.sort_by_key(|s| expect_attr(s, "k8s.namespace.name"));
    assert_eq!(restarts.len(), 2, "{spans:#?}");
    for (span, ns) in restarts.iter().zip(["prod", "staging"]) {
        assert_eq!(expect_attr(span, "k8s.namespace.name"), ns);
        assert_eq!(expect_attr(span, "k8s.workload.kind"), "Deployment");
        assert_eq!(expect_attr(span, "k8s.workload.name"), "api");
        assert_eq!(expect_attr(span, "result"), "restarted");
        assert_eq!(expect_attr(span, "gar.strategy"), "restart");
        // kube's per-request span, nested under the restart that sent it.
        let http: Vec<&SpanData> = spans
            .iter()
            .filter(|s| s.parent_span_id == span.span_context.span_id())
            .collect();
        assert_eq!(http.len(), 1, "one HTTP span under {ns}: {spans:#?}");
        assert_eq!(http[0].span_kind, SpanKind::Client);
        assert_eq!(http[0].name, "patch");
        assert_eq!(expect_attr(http[0], "http.method"), "PATCH");
        assert_eq!(expect_attr(http[0], "http.status_code"), "200");
        let url = expect_attr(http[0], "http.url");
        assert!(
            url.contains(&format!("/namespaces/{ns}/deployments/api")),
            "{url}"
        );
    }

    let settle = children(spans, consumer, "settle");
    assert_eq!(settle.len(), 1, "{spans:#?}");
    assert_eq!(expect_attr(settle[0], "action"), "ack");
    assert_eq!(expect_attr(settle[0], "reason"), "restarted");
    assert_eq!(expect_attr(settle[0], "messaging.operation.name"), "ack");
    consumer
}

#[tokio::test]
async fn delivery_continues_the_publishers_trace_with_one_span_per_stage() {
    let f = Fixture::new().await;
    let attributes = HashMap::from([(
        TRACEPARENT_ATTRIBUTE.to_string(),
        format!("00-{TRACE}-{PARENT}-01"),
    )]);
    let (settled, calls) = f.deliver(message("m-1", &insert_v1(), attributes)).await;
    assert_eq!(settled, Some(Settled::Acked));
    assert_eq!(calls, ["ack"]);
    assert_eq!(f.api.patches().len(), 2);

    let spans = f.spans();
    let consumer = check_restart_tree(&spans);
    assert_eq!(
        consumer.span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    assert_eq!(consumer.parent_span_id, SpanId::from_hex(PARENT).unwrap());
    assert!(consumer.parent_span_is_remote);
    assert_eq!(expect_attr(consumer, "trace_id"), TRACE);

    // The API calls behind those spans are counted too.
    let text = f.metrics.encode();
    assert!(
        text.contains(
            r#"gar_restarter_api_requests_total{verb="patch",resource="deployments",code="200"} 2"#
        ),
        "{text}"
    );
}

/// Decided on the live view, a restart of a container whose pull policy is IfNotPresent (the
/// API server's default for `app:v1`) carries the risk on its span and counts it.
#[tokio::test]
async fn a_stale_image_risk_is_a_span_attribute_and_counted() {
    let f = Fixture::with_view(true).await;
    // No watch feeds this view: a Deployment whose status moved since the list meets 409, as
    // it would before the watch caught up; list again and redeliver, like Pub/Sub would.
    let mut settled = None;
    for _ in 0..20 {
        if let Some(view) = &f.view {
            relist(&f.api, view);
        }
        settled = f
            .deliver(message("m-1", &insert_v1(), HashMap::new()))
            .await
            .0;
        if settled == Some(Settled::Acked) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(settled, Some(Settled::Acked));
    let spans = f.spans();
    let restarts: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "restart" && attr(s, "result").as_deref() == Some("restarted"))
        .collect();
    assert_eq!(restarts.len(), 2, "{spans:#?}");
    for span in restarts {
        assert_eq!(expect_attr(span, "gar.strategy"), "restart");
        assert_eq!(
            expect_attr(span, "gar.stale_image_risk"),
            "c0 (IfNotPresent)"
        );
    }
    let text = f.metrics.encode();
    assert!(
        text.contains(r#"gar_restarter_stale_image_risk_total{kind="Deployment"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn delivery_without_traceparent_starts_its_own_trace() {
    let f = Fixture::new().await;
    let (settled, _) = f
        .deliver(message("m-1", &insert_v1(), HashMap::new()))
        .await;
    assert_eq!(settled, Some(Settled::Acked));
    let spans = f.spans();
    let consumer = check_restart_tree(&spans);
    assert_eq!(consumer.parent_span_id, SpanId::INVALID, "a root span");
    assert_ne!(consumer.span_context.trace_id(), TraceId::INVALID);
}

#[tokio::test]
async fn invalid_traceparent_is_ignored() {
    let f = Fixture::new().await;
    let attributes = HashMap::from([(
        TRACEPARENT_ATTRIBUTE.to_string(),
        "00-not-a-trace-01".to_string(),
    )]);
    let (settled, _) = f.deliver(message("m-1", &insert_v1(), attributes)).await;
    assert_eq!(settled, Some(Settled::Acked));
    let spans = f.spans();
    let consumer = check_restart_tree(&spans);
    assert_eq!(consumer.parent_span_id, SpanId::INVALID);
}

#[tokio::test]
async fn malformed_message_settles_as_dead_letter_with_its_reason() {
    let f = Fixture::new().await;
    let attributes = HashMap::from([(
        TRACEPARENT_ATTRIBUTE.to_string(),
        format!("00-{TRACE}-{PARENT}-01"),
    )]);
    let (settled, calls) = f.deliver(message("m-bad", "{not json", attributes)).await;
    assert_eq!(settled, Some(Settled::DeadLettered));
    assert_eq!(calls, ["ack"], "acked once it is on the dead-letter topic");
    assert_eq!(f.sink.0.lock().unwrap().len(), 1);
    assert!(f.api.requests().is_empty());

    let spans = f.spans();
    let consumer = one(&spans, |s| s.span_kind == SpanKind::Consumer, "consumer");
    assert_eq!(
        consumer.span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    assert_eq!(expect_attr(consumer, "messaging.message.id"), "m-bad");
    assert_eq!(attr(consumer, "gar.image"), None, "nothing parsed");
    assert_eq!(expect_attr(consumer, "error.type"), "dead_letter");
    assert!(matches!(
        consumer.status,
        opentelemetry::trace::Status::Error { .. }
    ));
    assert_eq!(children(&spans, consumer, "parse").len(), 1);
    assert!(children(&spans, consumer, "lookup").is_empty());
    assert!(children(&spans, consumer, "restart").is_empty());

    let settle = children(&spans, consumer, "settle");
    assert_eq!(settle.len(), 1, "{spans:#?}");
    assert_eq!(expect_attr(settle[0], "action"), "dead_letter");
    let reason = expect_attr(settle[0], "reason");
    assert!(
        reason.contains("m-bad") && reason.contains("not a JSON object"),
        "{reason}"
    );
    assert_eq!(expect_attr(settle[0], "messaging.operation.name"), "ack");
    assert!(matches!(
        settle[0].status,
        opentelemetry::trace::Status::Error { .. }
    ));
}

#[tokio::test]
async fn forbidden_restart_is_dead_lettered_and_counted_with_its_code() {
    let f = Fixture::new().await;
    f.api.add_fault(
        gar_testsupport::traffic::Fault::error("/namespaces/staging/", 403).on_method("PATCH"),
    );
    let (settled, _) = f
        .deliver(message("m-1", &insert_v1(), HashMap::new()))
        .await;
    assert_eq!(settled, Some(Settled::DeadLettered));
    let spans = f.spans();
    let consumer = one(&spans, |s| s.span_kind == SpanKind::Consumer, "consumer");
    let restarts = children(&spans, consumer, "restart");
    let mut results: Vec<(String, String)> = restarts
        .iter()
        .map(|s| {
            (
                expect_attr(s, "k8s.namespace.name"),
                expect_attr(s, "result"),
            )
        })
        .collect();
    results.sort();
    assert_eq!(
        results,
        [
            ("prod".to_string(), "restarted".to_string()),
            ("staging".to_string(), "permanent_error".to_string())
        ]
    );
    let settle = children(&spans, consumer, "settle");
    assert_eq!(expect_attr(settle[0], "action"), "dead_letter");
    assert!(expect_attr(settle[0], "reason").contains("403"));

    let text = f.metrics.encode();
    for line in [
        r#"gar_restarter_api_requests_total{verb="patch",resource="deployments",code="200"} 1"#,
        r#"gar_restarter_api_requests_total{verb="patch",resource="deployments",code="403"} 1"#,
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
}
