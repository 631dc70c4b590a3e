//! Harness for the integration tests: a pstest emulator, a fake Kubernetes API server and the
//! real `gar-restarter` binary running as a separate process against both.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gar_testsupport::emulator::Emulator;
use gar_testsupport::fake_api::FakeApi;
use google_cloud_pubsub::client::{BasePublisher, Publisher, Subscriber};
use google_cloud_pubsub::model::Message;
use serde_json::Value;

pub const PROJECT: &str = "test-project";
pub const TOPIC: &str = "gcr";
pub const SUB: &str = "gcr-sub";
pub const DLQ_TOPIC: &str = "gcr-dead-letter";
pub const DLQ_SUB: &str = "gcr-dead-letter-sub";

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
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub struct Harness {
    pub emulator: Emulator,
    pub api: FakeApi,
    pub dir: tempfile::TempDir,
    pub daemon: Option<Child>,
    pub metrics_addr: SocketAddr,
    pub extra_args: Vec<String>,
    pub extra_env: Vec<(String, String)>,
    publisher: Option<Publisher>,
}

impl Harness {
    /// Starts the emulator (topic `gcr`, dead-letter topic and their subscriptions) and the
    /// fake API server. The daemon is started separately so tests can seed objects first.
    pub async fn new() -> Harness {
        init_crypto();
        let emulator = Emulator::start(
            PROJECT,
            &[TOPIC, DLQ_TOPIC],
            &[(SUB, TOPIC), (DLQ_SUB, DLQ_TOPIC)],
        )
        .await
        .expect("start pstest emulator");
        let api = FakeApi::start().await.expect("start fake API");
        let dir = tempfile::tempdir().expect("tempdir");
        api.write_kubeconfig(&dir.path().join("kubeconfig"))
            .expect("kubeconfig");
        Harness {
            emulator,
            api,
            dir,
            daemon: None,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            publisher: None,
        }
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

    pub fn daemon_command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gar-restarter"));
        cmd.arg("run")
            .arg("--subscription")
            .arg(self.subscription())
            .arg("--dead-letter-topic")
            .arg(self.dlq_topic())
            .arg("--metrics-addr")
            .arg(self.metrics_addr.to_string())
            .arg("--cache-dir")
            .arg(self.cache_dir())
            .arg("--cache-configmap")
            .arg("gar-restarter/gar-restarter-cache")
            .arg("--log-format")
            .arg("text")
            .args(&self.extra_args)
            .env("PUBSUB_EMULATOR_HOST", self.emulator.host())
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env(
                "RUST_LOG",
                std::env::var("GAR_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(self.log_file()))
            .stderr(Stdio::from(self.log_file()));
        cmd
    }

    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log")
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Starts the daemon and waits for /readyz.
    pub async fn start_daemon(&mut self) {
        let child = self.daemon_command().spawn().expect("spawn gar-restarter");
        self.daemon = Some(child);
        self.wait_ready(Duration::from_secs(30)).await;
    }

    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.daemon.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("daemon exited early with {status}\n{}", self.daemon_log());
            }
            if let Some((200, _)) = http_get(self.metrics_addr, "/readyz") {
                return;
            }
            if Instant::now() > deadline {
                panic!("daemon not ready after {timeout:?}\n{}", self.daemon_log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate_daemon(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.daemon.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
    pub async fn dead_letters(&self, n: usize, timeout: Duration) -> Vec<Message> {
        pull(
            &self.emulator.endpoint(),
            &self.emulator.subscription(DLQ_SUB),
            n,
            timeout,
        )
        .await
    }

    pub fn metrics(&self) -> String {
        http_get(self.metrics_addr, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
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

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
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

/// Minimal HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
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
