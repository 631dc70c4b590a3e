//! Harness for the integration tests: a pstest emulator, a Kubernetes API (a real control
//! plane behind a fault proxy, or the fake API server) and the real `gar-restarter` binary
//! running as a separate process against both.
#![allow(dead_code)]

pub mod backend;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gar_testsupport::daemon::{Daemon, DaemonSpec, free_addr};
use gar_testsupport::emulator::Emulator;
use gar_testsupport::kube_api::KubeApi;

pub use backend::TestApi;
/// Minimal HTTP/1.1 GET; returns (status, body).
#[allow(unused_imports)] // not every test binary probes by hand
pub use gar_testsupport::http::get_status_body as http_get;
pub use gar_testsupport::metrics::value as metric_value;
pub use gar_testsupport::traffic::Recording;
use google_cloud_pubsub::client::{BasePublisher, Publisher, Subscriber};
use google_cloud_pubsub::model::Message;
use serde_json::Value;

pub const PROJECT: &str = "test-project";
pub const TOPIC: &str = "gcr";
pub const SUB: &str = "gcr-sub";
pub const DLQ_TOPIC: &str = "gcr-dead-letter";
pub const DLQ_SUB: &str = "gcr-dead-letter-sub";
/// Where Pub/Sub itself forwards a message after the subscription's max delivery attempts
/// (only with [`Harness::real_with_pubsub_dead_letter_policy`]).
pub const PUBSUB_DLQ_TOPIC: &str = "gcr-pubsub-dead-letter";
/// The outcome topic a test may pass as `--notify-topic`, and a subscription to read it.
pub const NOTIFY_TOPIC: &str = "gar-restarter-outcomes";
pub const NOTIFY_SUB: &str = "gar-restarter-outcomes-sub";

pub const HEX_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
pub const HEX_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

pub fn gar(path: &str) -> String {
    format!("us-west1-docker.pkg.dev/proj/repo/{path}")
}

/// A GAR INSERT payload for `repo_and_tag` (e.g. `app:v1`) pushed with digest `hex`.
pub fn insert(repo_and_tag: &str, hex: &str) -> String {
    let repo = repo_and_tag.split(':').next().unwrap_or(repo_and_tag);
    serde_json::json!({
        "action": "INSERT",
        "digest": gar(&format!("{repo}@sha256:{hex}")),
        "tag": gar(repo_and_tag),
    })
    .to_string()
}

pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn free_port() -> u16 {
    free_addr().expect("free port").port()
}

pub struct Harness {
    pub emulator: Emulator,
    pub api: TestApi,
    pub dir: tempfile::TempDir,
    pub daemon: Option<Daemon>,
    pub metrics_addr: SocketAddr,
    pub extra_args: Vec<String>,
    pub extra_env: Vec<(String, String)>,
    publisher: Option<Publisher>,
}

impl Harness {
    /// Starts the emulator (topic `gcr`, the dead-letter topic and their subscriptions) and a
    /// real control plane of the test's own, with the daemon running as
    /// `gar-restarter/gar-restarter` under the RBAC of `deploy/base`. The daemon is started
    /// separately, so that tests can seed objects first.
    pub async fn real() -> Harness {
        Harness::real_with("base", |g| g).await
    }

    /// [`Harness::real`] with the RBAC of `deploy/<overlay>`, edited by `edit` first.
    pub async fn real_with(
        overlay: &str,
        edit: impl FnOnce(
            gar_testsupport::cluster::rbac::Grant,
        ) -> gar_testsupport::cluster::rbac::Grant,
    ) -> Harness {
        init_crypto();
        let api = KubeApi::start_with(overlay, edit)
            .await
            .unwrap_or_else(|e| panic!("start the test control plane: {e}"));
        Harness::with_api(api, &[], None).await
    }

    /// [`Harness::real`] plus extra `(subscription, topic)` pairs on the emulator.
    pub async fn real_with_subscriptions(extra: &[(&str, &str)]) -> Harness {
        init_crypto();
        let api = KubeApi::start()
            .await
            .unwrap_or_else(|e| panic!("start the test control plane: {e}"));
        Harness::with_api(api, extra, None).await
    }

    /// [`Harness::real`] with a Pub/Sub dead-letter policy of `max` delivery attempts on the
    /// subscription, so that Pub/Sub counts deliveries and sets `delivery_attempt`.
    pub async fn real_with_pubsub_dead_letter_policy(max: u32) -> Harness {
        init_crypto();
        let api = KubeApi::start()
            .await
            .unwrap_or_else(|e| panic!("start the test control plane: {e}"));
        Harness::with_api(api, &[], Some(max)).await
    }

    pub fn subscription(&self) -> String {
        self.emulator.subscription(SUB)
    }

    pub fn dlq_topic(&self) -> String {
        self.emulator.topic(DLQ_TOPIC)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// How the harness runs `gar-restarter run`: against its emulator and API, with
    /// `extra_args` and `extra_env`, logging to `daemon.log`.
    pub fn daemon_spec(&self) -> DaemonSpec {
        DaemonSpec {
            binary: env!("CARGO_BIN_EXE_gar-restarter").into(),
            pubsub_host: self.emulator.host(),
            subscription: self.subscription(),
            dead_letter_topic: self.dlq_topic(),
            kubeconfig: self.dir.path().join("kubeconfig"),
            cache_dir: self.cache_dir(),
            metrics_addr: self.metrics_addr,
            log: self.dir.path().join("daemon.log"),
            log_filter: std::env::var("GAR_TEST_LOG").unwrap_or_else(|_| "info".into()),
            // Unpaced unless a test says otherwise (later flags win): the reliability tests'
            // bursts of hundreds of restarts would take minutes at the default 10/s, and
            // tests/fan_out.rs is where pacing is tested.
            args: ["--max-restarts-per-second".to_owned(), "0".to_owned()]
                .into_iter()
                .chain(self.extra_args.iter().cloned())
                .collect(),
            env: self.extra_env.clone(),
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Starts the daemon without waiting for it.
    pub fn spawn_daemon(&mut self) {
        let daemon = Daemon::spawn(&self.daemon_spec()).expect("spawn gar-restarter");
        self.daemon = Some(daemon);
    }

    /// Starts the daemon and waits for /readyz.
    pub async fn start_daemon(&mut self) {
        self.spawn_daemon();
        self.wait_ready(Duration::from_secs(30)).await;
        // A start-up rebuild writes the cache ConfigMap in the background; let it land so
        // tests that count requests start from a quiet API.
        let log_done = |log: &str| {
            log.contains("cache ConfigMap written")
                || log.contains("writing the cache ConfigMap failed")
                || log.contains("index loaded from the")
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !log_done(&self.daemon_log()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The watch lists in the background after readiness; let it finish too, for the same
        // reason. Not an error when it cannot (a test that takes away `list` or `watch`).
        if !self.extra_args.iter().any(|a| a == "--watch=false") {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.metric("gar_restarter_watch_synced") != 1.0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Starts the daemon and asserts that its watch has listed (the live view is complete).
    pub async fn start_synced(&mut self) {
        self.start_daemon().await;
        assert!(
            wait_until(Duration::from_secs(20), || self
                .metric("gar_restarter_watch_synced")
                == 1.0)
            .await,
            "the watch never listed: {}",
            self.daemon_log()
        );
    }

    pub async fn wait_ready(&mut self, timeout: Duration) {
        let daemon = self.daemon.as_mut().expect("the daemon was started");
        if let Err(e) = daemon.wait_ready(timeout).await {
            panic!("{e}\n{}", daemon.log());
        }
    }

    /// SIGKILL, without a drain.
    pub fn kill_daemon(&mut self) {
        self.daemon.take();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate_daemon(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.daemon.take()?.terminate(timeout)
    }

    pub async fn publisher(&mut self) -> &Publisher {
        if self.publisher.is_none() {
            let base = BasePublisher::builder()
                .with_endpoint(self.emulator.endpoint())
                .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
                .build()
                .await
                .expect("publisher client");
            self.publisher = Some(base.publisher(self.emulator.topic(TOPIC)).build());
        }
        self.publisher.as_ref().expect("publisher")
    }

    /// Publishes `data` to the GAR topic and returns the message id.
    pub async fn publish(&mut self, data: &str) -> String {
        self.publish_with(data, HashMap::new()).await
    }

    pub async fn publish_with(
        &mut self,
        data: &str,
        attributes: HashMap<String, String>,
    ) -> String {
        let msg = Message::new()
            .set_data(bytes::Bytes::from(data.to_string()))
            .set_attributes(attributes);
        self.publisher().await.publish(msg).await.expect("publish")
    }

    /// Pulls from the dead-letter subscription until `n` messages arrived or `timeout`.
    /// Waits for the one dead letter of message `id`, checks that it is permanent and that
    /// its reason names `workload` (e.g. `Deployment prod/web`) and the HTTP `code`, and
    /// returns the reason.
    pub async fn permanent_dead_letter(&self, id: &str, workload: &str, code: u16) -> String {
        let letters = self.dead_letters(1, Duration::from_secs(20)).await;
        assert_eq!(letters.len(), 1, "{}", self.daemon_log());
        let dl = &letters[0];
        assert_eq!(dl.attributes["dlq_kind"], "permanent");
        assert_eq!(dl.attributes["dlq_original_message_id"], id);
        let reason = dl.attributes["dlq_reason"].clone();
        assert!(reason.contains(workload), "{reason}");
        assert!(reason.contains(&code.to_string()), "{reason}");
        reason
    }

    pub async fn dead_letters(&self, n: usize, timeout: Duration) -> Vec<Message> {
        pull(
            &self.emulator.endpoint(),
            &self.emulator.subscription(DLQ_SUB),
            n,
            timeout,
        )
        .await
    }

    /// /metrics of the harness' daemon (empty while none runs).
    pub fn metrics(&self) -> String {
        gar_testsupport::metrics::scrape(self.metrics_addr)
    }

    /// The value of one sample line in /metrics, e.g. `gar_restarter_events_settled_total{outcome="ack"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }

    pub fn deployment(&self, ns: &str, name: &str) -> Value {
        self.api
            .get("deployments", ns, name)
            .expect("deployment exists")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill_daemon();
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.daemon_log());
        }
    }
}

/// Pulls up to `n` messages from a subscription, acking each.
pub async fn pull(endpoint: &str, subscription: &str, n: usize, timeout: Duration) -> Vec<Message> {
    let subscriber = Subscriber::builder()
        .with_endpoint(endpoint.to_string())
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .expect("subscriber");
    let mut stream = subscriber.subscribe(subscription.to_string()).build();
    let token = stream.shutdown_token();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok((m, h)))) => {
                h.ack();
                out.push(m);
            }
            Ok(Some(Err(_))) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(None) | Err(_) => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), token.shutdown()).await;
    out
}

/// Polls `cond` every 25 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    cond()
}

/// `kubectl.kubernetes.io/restartedAt` and `gar-restarter/digest` of a workload's template.
pub fn restart_annotations(obj: &Value) -> (Option<String>, Option<String>) {
    let a = &obj["spec"]["template"]["metadata"]["annotations"];
    (
        a["kubectl.kubernetes.io/restartedAt"]
            .as_str()
            .map(str::to_string),
        a["gar-restarter/digest"].as_str().map(str::to_string),
    )
}

// ---------------------------------------------------------------------------------------------
// Reliability and replay helpers
// ---------------------------------------------------------------------------------------------

/// A distinct, valid sha256 hex digest for event number `n`.
pub fn hex_digest(n: usize) -> String {
    format!("{n:064x}")
}

/// Path of a Deployment as the fake API records it.
pub fn deployment_path(ns: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}")
}

/// The `gar-restarter/digest` annotation a recorded PATCH carried, if any.
pub fn patch_digest(req: &gar_testsupport::traffic::RecordedRequest) -> Option<String> {
    req.body.as_ref()?["spec"]["template"]["metadata"]["annotations"]["gar-restarter/digest"]
        .as_str()
        .map(str::to_string)
}

/// PATCHes to workloads (not to the cache ConfigMap or anything else), all statuses.
pub fn workload_patches(api: &TestApi) -> Vec<gar_testsupport::traffic::RecordedRequest> {
    api.patches()
        .into_iter()
        .filter(|p| {
            ["/deployments/", "/statefulsets/", "/daemonsets/"]
                .iter()
                .any(|k| p.path.contains(k))
        })
        .collect()
}

/// (path, digest) of every workload PATCH the API accepted (2xx), with repetitions.
pub fn accepted_patches(api: &TestApi) -> Vec<(String, Option<String>)> {
    workload_patches(api)
        .into_iter()
        .filter(|p| (200..300).contains(&p.status))
        .map(|p| {
            let digest = patch_digest(&p);
            (p.path, digest)
        })
        .collect()
}

/// Workload PATCHes to `path` the API accepted (2xx): the restarts. A PATCH refused with 409
/// (its resourceVersion precondition met a newer object) restarts nothing and is decided again.
pub fn restarts_of(api: &TestApi, path: &str) -> usize {
    patches_to(api, path)
        .iter()
        .filter(|p| (200..300).contains(&p.status))
        .count()
}

/// Workload PATCHes to `path`, all statuses.
pub fn patches_to(api: &TestApi, path: &str) -> Vec<gar_testsupport::traffic::RecordedRequest> {
    workload_patches(api)
        .into_iter()
        .filter(|p| p.path == path)
        .collect()
}

/// Which of the `expected` (path, sha256 digest) pairs no accepted PATCH carried yet.
pub fn missing_pairs(
    api: &TestApi,
    expected: &std::collections::HashSet<(String, String)>,
) -> Vec<(String, String)> {
    let done: std::collections::HashSet<(String, String)> = accepted_patches(api)
        .into_iter()
        .filter_map(|(path, digest)| digest.map(|d| (path, d)))
        .collect();
    let mut missing: Vec<_> = expected.difference(&done).cloned().collect();
    missing.sort();
    missing
}

/// A publisher on the GAR topic of `emulator`, independent of any [`Harness`] borrow, so a
/// background task can publish while the test kills and restarts daemons.
pub async fn topic_publisher(emulator_endpoint: &str, topic: &str) -> Publisher {
    BasePublisher::builder()
        .with_endpoint(emulator_endpoint.to_string())
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .expect("publisher client")
        .publisher(topic.to_string())
        .build()
}

/// A second `gar-restarter run` sharing the harness' emulator, API and subscription, with its
/// own metrics port and log file. Killed (SIGKILL) on drop.
pub struct ExtraDaemon {
    pub daemon: Daemon,
}

impl Deref for ExtraDaemon {
    type Target = Daemon;

    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl Drop for ExtraDaemon {
    fn drop(&mut self) {
        self.daemon.kill();
        if std::thread::panicking() {
            eprintln!("--- extra daemon log ---\n{}", self.daemon.log());
        }
    }
}

/// Output of a finished `gar-restarter` subcommand.
#[derive(Debug)]
pub struct CommandOutput {
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Harness {
    async fn with_api(
        api: TestApi,
        extra: &[(&str, &str)],
        pubsub_dead_letter_after: Option<u32>,
    ) -> Harness {
        init_crypto();
        let mut subs = vec![
            (SUB, TOPIC),
            (DLQ_SUB, DLQ_TOPIC),
            (NOTIFY_SUB, NOTIFY_TOPIC),
        ];
        subs.extend_from_slice(extra);
        let policy: Vec<(&str, &str, u32)> = pubsub_dead_letter_after
            .map(|max| (SUB, PUBSUB_DLQ_TOPIC, max))
            .into_iter()
            .collect();
        let emulator = Emulator::start_with_dead_letters(
            PROJECT,
            &[TOPIC, DLQ_TOPIC, PUBSUB_DLQ_TOPIC, NOTIFY_TOPIC],
            &subs,
            &policy,
        )
        .await
        .expect("start pstest emulator");
        let dir = tempfile::tempdir().expect("tempdir");
        api.write_kubeconfig(&dir.path().join("kubeconfig"))
            .expect("kubeconfig");
        Harness {
            emulator,
            api,
            dir,
            daemon: None,
            metrics_addr: free_addr().expect("free port"),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            publisher: None,
        }
    }

    /// Starts another daemon on the same subscription (active-active replicas) and waits until
    /// it is ready. `extra_args` of the harness apply to it too.
    pub async fn spawn_extra_daemon(&self, name: &str) -> ExtraDaemon {
        let spec = DaemonSpec {
            metrics_addr: free_addr().expect("free port"),
            log: self.dir.path().join(format!("{name}.log")),
            ..self.daemon_spec()
        };
        let mut daemon = Daemon::spawn(&spec).expect("spawn extra gar-restarter");
        if let Err(e) = daemon.wait_ready(Duration::from_secs(30)).await {
            panic!("extra daemon: {e}\n{}", daemon.log());
        }
        ExtraDaemon { daemon }
    }

    /// Publishes, retrying for up to `timeout` (the publisher reconnects after an emulator
    /// restart); returns the message id.
    pub async fn publish_retrying(&mut self, data: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let msg = Message::new().set_data(bytes::Bytes::from(data.to_string()));
            match self.publisher().await.publish(msg).await {
                Ok(id) => return id,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("publish failed, retrying: {e}");
                    self.publisher = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("publish failed for {timeout:?}: {e}"),
            }
        }
    }

    /// Runs `gar-restarter ARGS…` (e.g. `dlq replay …`) against the emulator, killing it after
    /// `timeout`.
    pub async fn run_command(&self, args: &[&str], timeout: Duration) -> CommandOutput {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gar-restarter"));
        cmd.args(args)
            .env("PUBSUB_EMULATOR_HOST", self.emulator.host())
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn gar-restarter");
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_string(&mut text);
                }
                text
            })
        };
        let stdout = reader(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = reader(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Some(status);
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let elapsed = started.elapsed();
        CommandOutput {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
            elapsed,
        }
    }
}

/// The gar-restarter Events on `ns/name`, as `(type, reason, note)`, oldest first.
pub async fn events_on(h: &Harness, ns: &str, name: &str) -> Vec<(String, String, String)> {
    let api: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(h.api.admin(), ns);
    let mut list = match api.list(&kube::api::ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => panic!("listing events in {ns}: {e}"),
    };
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    list.into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("gar-restarter"))
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.name.as_deref() == Some(name) && r.uid.is_some())
        })
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}
