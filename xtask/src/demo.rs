//! `cargo xtask demo`: the real daemon against the pstest emulator and an in-process fake
//! Kubernetes API, fed a handful of sample GAR events; prints what happened and why.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use gar_testsupport::daemon::{Daemon, DaemonSpec, free_addr};
use gar_testsupport::emulator::{self, Emulator};
use gar_testsupport::fake_api::{self, FakeApi, Recording};
use gar_testsupport::metrics;
use google_cloud_pubsub::client::{BasePublisher, Subscriber};
use google_cloud_pubsub::model::Message;
use serde_json::{Value, json};

use crate::util::{self, Steps, cargo, secs};

/// The real daemon against pstest and a fake Kubernetes API, fed sample GAR events;
/// reports what was restarted and why.
///
/// Builds gar-restarter, starts the pstest emulator (or uses $PUBSUB_EMULATOR_HOST)
/// and a fake Kubernetes API seeded with sample workloads, runs the daemon against
/// both, publishes five sample GAR events and reports which workloads were
/// restarted and why the others were not. Exits non-zero if the outcome differs
/// from the expected one.
///
/// With PUBSUB_EMULATOR_HOST set, that emulator must already have the topics
/// projects/demo-project/topics/{gcr,gcr-dead-letter} and the subscriptions
/// gcr-restarter (on gcr) and gcr-dead-letter-sub (on gcr-dead-letter); start one
/// with `cargo xtask emulator --project demo-project`.
#[derive(Debug, clap::Parser)]
pub struct Args {
    /// Keep the temporary directory (daemon log, kubeconfig) afterwards.
    #[arg(long)]
    keep: bool,
}

const PROJECT: &str = "demo-project";
const TOPIC: &str = "gcr";
const SUB: &str = "gcr-restarter";
const DLQ_TOPIC: &str = "gcr-dead-letter";
const DLQ_SUB: &str = "gcr-dead-letter-sub";
const REPO: &str = "us-west1-docker.pkg.dev/demo-project/apps/shop";
const DIGEST_ANNOTATION: &str = "gar-restarter/digest";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
const DLQ_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(25);
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

fn digest(seed: &str) -> String {
    format!("sha256:{}", seed.repeat(64 / seed.len()))
}

fn shop_digest() -> String {
    digest("5e1f")
}
fn nginx_digest() -> String {
    digest("a11c")
}
fn digest_only_digest() -> String {
    digest("d16e")
}
fn pinned_digest() -> String {
    digest("0b5e")
}

/// A workload the fake cluster starts with, and what the demo expects for it.
struct Seed {
    kind: &'static str,
    ns: &'static str,
    name: &'static str,
    image: String,
    paused: bool,
    /// `Some(digest)`: must be restarted by the push of that digest. `None`: must not be.
    restart: Option<String>,
    /// Why it is (not) restarted.
    why: &'static str,
}

impl Seed {
    fn plural(&self) -> &'static str {
        match self.kind {
            "StatefulSet" => "statefulsets",
            "DaemonSet" => "daemonsets",
            _ => "deployments",
        }
    }

    fn path(&self) -> String {
        format!(
            "/apis/apps/v1/namespaces/{}/{}/{}",
            self.ns,
            self.plural(),
            self.name
        )
    }

    fn object(&self) -> Value {
        let images = [self.image.as_str()];
        let mut obj = match self.kind {
            "StatefulSet" => fake_api::statefulset(self.ns, self.name, &images),
            "DaemonSet" => fake_api::daemonset(self.ns, self.name, &images),
            _ => fake_api::deployment(self.ns, self.name, &images),
        };
        if self.paused {
            obj["spec"]["paused"] = json!(true);
        }
        obj
    }

    fn id(&self) -> String {
        format!("{} {}/{}", self.kind, self.ns, self.name)
    }
}

fn seeds() -> Vec<Seed> {
    let seed = |kind, ns, name, image: String, restart: Option<String>, why| Seed {
        kind,
        ns,
        name,
        image,
        paused: false,
        restart,
        why,
    };
    vec![
        seed(
            "Deployment",
            "shop",
            "frontend",
            format!("{REPO}:v2"),
            Some(shop_digest()),
            "runs shop:v2, which was pushed",
        ),
        seed(
            "Deployment",
            "shop",
            "checkout",
            format!("{REPO}:v2"),
            Some(shop_digest()),
            "runs shop:v2, which was pushed",
        ),
        Seed {
            paused: true,
            ..seed(
                "Deployment",
                "shop",
                "canary",
                format!("{REPO}:v2"),
                None,
                "runs shop:v2 but is paused (kubectl rollout restart refuses paused Deployments too)",
            )
        },
        seed(
            "Deployment",
            "staging",
            "frontend",
            format!("{REPO}:v1"),
            None,
            "runs shop:v1, another tag (and the DELETE of shop:v1 restarts nothing)",
        ),
        seed(
            "Deployment",
            "prod",
            "pinned",
            format!("{REPO}@{}", pinned_digest()),
            None,
            "pinned by digest: a tag push cannot change what it runs",
        ),
        seed(
            "Deployment",
            "web",
            "nginx",
            "nginx".to_owned(),
            Some(nginx_digest()),
            "runs `nginx`, the same image as docker.io/library/nginx:latest",
        ),
        seed(
            "StatefulSet",
            "data",
            "cache",
            "redis:7".to_owned(),
            None,
            "runs redis:7, which nobody pushed",
        ),
    ]
}

/// A sample event and how the demo expects it to settle.
struct Sample {
    what: &'static str,
    data: String,
    /// `true`: must be dead-lettered; `false`: must be acked.
    dead_letter: bool,
    /// The `gar_restarter_events_received_total` action it must be counted under.
    action: &'static str,
    /// The digest an INSERT carries: workloads PATCHed with it were restarted by it.
    digest: Option<String>,
    /// What should happen, for the report.
    expect: &'static str,
}

fn samples() -> Vec<Sample> {
    vec![
        Sample {
            what: "INSERT shop:v2 (with digest)",
            data: json!({
                "action": "INSERT",
                "digest": format!("{REPO}@{}", shop_digest()),
                "tag": format!("{REPO}:v2"),
            })
            .to_string(),
            dead_letter: false,
            action: "insert",
            digest: Some(shop_digest()),
            expect: "restarts the Deployments running shop:v2",
        },
        Sample {
            what: "INSERT docker.io/library/nginx:latest",
            data: json!({
                "action": "INSERT",
                "digest": format!("docker.io/library/nginx@{}", nginx_digest()),
                "tag": "docker.io/library/nginx:latest",
            })
            .to_string(),
            dead_letter: false,
            action: "insert",
            digest: Some(nginx_digest()),
            expect: "restarts web/nginx (`nginx` is docker.io/library/nginx:latest)",
        },
        Sample {
            what: "INSERT shop@sha256:… (digest only)",
            data: json!({
                "action": "INSERT",
                "digest": format!("{REPO}@{}", digest_only_digest()),
            })
            .to_string(),
            dead_letter: false,
            action: "insert_digest_only",
            digest: None,
            expect: "acked, restarts nothing: no tag moved, so nothing running can change",
        },
        Sample {
            what: "DELETE shop:v1",
            data: json!({ "action": "DELETE", "tag": format!("{REPO}:v1") }).to_string(),
            dead_letter: false,
            action: "delete",
            digest: None,
            expect: "acked, restarts nothing: a deletion never restarts (staging/frontend stays)",
        },
        Sample {
            what: "\"not json\" (malformed)",
            data: "not json".to_owned(),
            dead_letter: true,
            action: "malformed",
            digest: None,
            expect: "dead-lettered as malformed, then acked",
        },
    ]
}

pub fn run(opts: Args) -> Result<()> {
    let external = std::env::var("PUBSUB_EMULATOR_HOST")
        .ok()
        .filter(|h| !h.is_empty());
    let mut steps = Steps::new(3);
    let daemon = steps.run("cargo build -p gar-restarter", build_daemon)?;
    match &external {
        Some(host) => steps.skip(
            "build the pstest emulator",
            &format!("using PUBSUB_EMULATOR_HOST={host}"),
        ),
        None => steps.run("build the pstest emulator", || {
            let bin = emulator::build_pstest()?;
            eprintln!("pstest: {}", bin.display());
            Ok(())
        })?,
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = steps.run("demo", || {
        runtime.block_on(scenario(&daemon, external, &opts))
    });
    steps.summary();
    result
}

/// Builds the daemon and returns the path of its binary.
fn build_daemon() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "-p",
        "gar-restarter",
        "--bin",
        "gar-restarter",
        "--message-format=json-render-diagnostics",
    ])
    .stdout(Stdio::piped());
    eprintln!("$ {}", util::show(&cmd));
    let out = cmd.output().context("cannot run cargo build")?;
    if !out.status.success() {
        bail!("cargo build -p gar-restarter failed ({})", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "gar-restarter")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo build reported no gar-restarter executable"))
}

/// Everything the scenario started; dropping it stops the daemon, emulator and fake API.
struct Running {
    emulator: Option<Emulator>,
    pubsub_host: String,
    api: FakeApi,
    dir: tempfile::TempDir,
    daemon: Option<Daemon>,
    metrics_addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.daemon.take();
        self.api.stop();
        self.emulator.take();
    }
}

impl Running {
    fn endpoint(&self) -> String {
        format!("http://{}", self.pubsub_host)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        metrics::scrape(self.metrics_addr)
    }

    fn daemon_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.daemon.as_mut().and_then(Daemon::exited)
    }

    /// `gar-restarter run` against the emulator and the fake API, logging to `daemon.log`.
    fn daemon_spec(&self, bin: &Path) -> DaemonSpec {
        let dir = self.dir.path();
        DaemonSpec {
            binary: bin.to_owned(),
            pubsub_host: self.pubsub_host.clone(),
            subscription: format!("projects/{PROJECT}/subscriptions/{SUB}"),
            dead_letter_topic: format!("projects/{PROJECT}/topics/{DLQ_TOPIC}"),
            kubeconfig: dir.join("kubeconfig"),
            cache_dir: dir.join("cache"),
            metrics_addr: self.metrics_addr,
            log: self.log_path(),
            log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            // The fake API server answers watches with 405: the daemon runs on its snapshot.
            args: vec!["--watch=false".into()],
            env: Vec::new(),
        }
    }
}

async fn scenario(daemon_bin: &Path, external: Option<String>, opts: &Args) -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let started = Instant::now();

    let (emulator, pubsub_host) = match external {
        Some(host) => {
            check_reachable(&host)?;
            println!(
                "using the Pub/Sub emulator at PUBSUB_EMULATOR_HOST={host}; it must have \
                 projects/{PROJECT}/topics/{{{TOPIC},{DLQ_TOPIC}}} and the subscriptions \
                 {SUB} (on {TOPIC}) and {DLQ_SUB} (on {DLQ_TOPIC}), e.g. from \
                 `cargo xtask emulator --project {PROJECT}`"
            );
            (None, host)
        }
        None => {
            let emu = Emulator::start(
                PROJECT,
                &[TOPIC, DLQ_TOPIC],
                &[(SUB, TOPIC), (DLQ_SUB, DLQ_TOPIC)],
            )
            .await
            .context("starting the pstest emulator")?;
            let host = emu.host();
            (Some(emu), host)
        }
    };
    let api = FakeApi::start()
        .await
        .context("starting the fake Kubernetes API")?;
    let seeds = seeds();
    for seed in &seeds {
        api.insert(seed.object());
    }
    let dir = tempfile::Builder::new()
        .prefix("gar-restarter-demo.")
        .tempdir()
        .context("creating a temporary directory")?;
    api.write_kubeconfig(&dir.path().join("kubeconfig"))
        .context("writing the kubeconfig")?;
    let mut env = Running {
        emulator,
        pubsub_host,
        api,
        dir,
        daemon: None,
        metrics_addr: free_addr().context("finding a free port")?,
    };
    if opts.keep {
        env.dir.disable_cleanup(true);
    }

    println!(
        "\nPub/Sub emulator: {}   fake Kubernetes API: {}",
        env.pubsub_host,
        env.api.url()
    );
    println!("cluster:");
    for seed in &seeds {
        let paused = if seed.paused { "  (paused)" } else { "" };
        println!("  {:<30} {}{paused}", seed.id(), seed.image);
    }

    let result = drive(daemon_bin, &mut env, &seeds, started).await;
    if result.is_err() {
        let log = env.daemon_log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("\n--- daemon log (last {} lines) ---", tail.len());
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        if env.emulator.is_none() {
            eprintln!(
                "hint: with PUBSUB_EMULATOR_HOST set, projects/{PROJECT}/topics/{TOPIC} and \
                 {DLQ_TOPIC} and the subscriptions {SUB} and {DLQ_SUB} must exist; \
                 `cargo xtask emulator --project {PROJECT}` starts such an emulator"
            );
        }
        env.dir.disable_cleanup(true);
        eprintln!("kept {} for inspection", env.dir.path().display());
    } else if opts.keep {
        println!("kept {} (daemon.log, kubeconfig)", env.dir.path().display());
    }
    result
}

async fn drive(
    daemon_bin: &Path,
    env: &mut Running,
    seeds: &[Seed],
    started: Instant,
) -> Result<()> {
    let spec = env.daemon_spec(daemon_bin);
    println!("\n$ {}", util::show(&spec.command()?));
    let daemon = env
        .daemon
        .insert(Daemon::spawn(&spec).context("cannot start gar-restarter")?);
    daemon.wait_ready(READY_TIMEOUT).await?;
    println!(
        "daemon ready after {} (log: {})",
        secs(started.elapsed()),
        env.log_path().display()
    );

    // Publish.
    let publisher = BasePublisher::builder()
        .with_endpoint(env.endpoint())
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .context("creating the Pub/Sub publisher")?
        .publisher(format!("projects/{PROJECT}/topics/{TOPIC}"))
        .build();
    let samples = samples();
    let mut ids = Vec::new();
    println!("\npublished to projects/{PROJECT}/topics/{TOPIC}:");
    let published = Instant::now();
    for sample in &samples {
        let msg = Message::new().set_data(bytes::Bytes::from(sample.data.clone()));
        // The client retries an unreachable endpoint forever: bound it.
        let id = tokio::time::timeout(PUBLISH_TIMEOUT, publisher.publish(msg))
            .await
            .map_err(|_| {
                anyhow!(
                    "publishing {} to {} timed out after {PUBLISH_TIMEOUT:?}; is the emulator \
                     still running?",
                    sample.what,
                    env.pubsub_host
                )
            })?
            .with_context(|| format!("publishing {}", sample.what))?;
        println!("  {id:<6} {}", sample.what);
        ids.push(id);
    }

    // Settle.
    let settled = loop {
        let metrics = env.metrics();
        let settled = metrics::by_label(&metrics, "gar_restarter_events_settled_total", "outcome");
        let done: f64 = ["ack", "dead_letter"]
            .iter()
            .filter_map(|o| settled.get(*o))
            .sum();
        if done >= samples.len() as f64 {
            break settled;
        }
        if let Some(status) = env.daemon_exited() {
            bail!("the daemon exited while processing ({status})");
        }
        if published.elapsed() > SETTLE_TIMEOUT {
            bail!(
                "only {done} of {} messages settled within {SETTLE_TIMEOUT:?}: {settled:?}",
                samples.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let settle_time = published.elapsed();
    let metrics = env.metrics();
    let received = metrics::by_label(&metrics, "gar_restarter_events_received_total", "action");

    // Dead letters.
    let malformed_ids: Vec<&String> = samples
        .iter()
        .zip(&ids)
        .filter(|(s, _)| s.dead_letter)
        .map(|(_, id)| id)
        .collect();
    let letters = pull_dead_letters(&env.endpoint(), &malformed_ids).await?;

    // Stop the daemon before reading the final state.
    let status = env
        .daemon
        .take()
        .and_then(|mut daemon| tokio::task::block_in_place(|| daemon.terminate(STOP_TIMEOUT)));

    let mut failures = Vec::new();
    let daemon_log = env.daemon_log();
    let requests = env.api.patches();
    let patched = |seed: &Seed| -> Vec<Value> {
        requests
            .iter()
            .filter(|r| r.path == seed.path() && (200..300).contains(&r.status))
            .filter_map(|r| r.body.clone())
            .collect()
    };

    println!(
        "\nall {} messages settled {} after publishing: {}",
        samples.len(),
        secs(settle_time),
        fmt_counts(&settled)
    );
    println!("received by action: {}", fmt_counts(&received));

    println!(
        "\nrestarted (PATCH of spec.template.metadata.annotations, like kubectl rollout restart):"
    );
    for seed in seeds.iter().filter(|s| s.restart.is_some()) {
        let want = seed.restart.as_deref().unwrap_or_default();
        let obj = env
            .api
            .get(seed.plural(), seed.ns, seed.name)
            .unwrap_or(Value::Null);
        let (at, got) = annotations(&obj);
        let patches = patched(seed);
        let mark = if at.is_some() && got.as_deref() == Some(want) && !patches.is_empty() {
            "ok  "
        } else {
            failures.push(format!(
                "{} was not restarted by the push of {want} (PATCHes: {}, restartedAt {at:?}, \
                 digest {got:?})",
                seed.id(),
                patches.len()
            ));
            "FAIL"
        };
        println!(
            "  {mark} {:<28} restartedAt={} {DIGEST_ANNOTATION}={} ({} PATCH{})",
            seed.id(),
            at.as_deref().unwrap_or("-"),
            got.as_deref().map(short_digest).unwrap_or("-".into()),
            patches.len(),
            if patches.len() == 1 { "" } else { "es" }
        );
        println!("       why: {}", seed.why);
    }

    println!("\nnot restarted:");
    for seed in seeds.iter().filter(|s| s.restart.is_none()) {
        let obj = env
            .api
            .get(seed.plural(), seed.ns, seed.name)
            .unwrap_or(Value::Null);
        let (at, _) = annotations(&obj);
        let patches = patched(seed);
        let mark = if at.is_none() && patches.is_empty() {
            "ok  "
        } else {
            failures.push(format!(
                "{} must not be restarted ({}), but was: {} PATCHes, restartedAt {at:?}",
                seed.id(),
                seed.why,
                patches.len()
            ));
            "FAIL"
        };
        println!("  {mark} {:<28} {}", seed.id(), seed.why);
        if let Some(said) = log_evidence(&daemon_log, &seed.id()) {
            println!("       daemon log: {said}");
        }
    }
    let known: Vec<String> = seeds.iter().map(Seed::path).collect();
    for r in requests
        .iter()
        .filter(|r| r.path.starts_with("/apis/apps/") && !known.contains(&r.path))
    {
        failures.push(format!("unexpected PATCH {} ({})", r.path, r.status));
    }

    println!("\nevents:");
    for (sample, id) in samples.iter().zip(&ids) {
        let counted = received.get(sample.action).copied().unwrap_or(0.0);
        let want = samples.iter().filter(|s| s.action == sample.action).count() as f64;
        let mut mark = "ok  ";
        if counted != want {
            failures.push(format!(
                "{}: expected {want} received with action={:?}, metrics say {counted}",
                sample.what, sample.action
            ));
            mark = "FAIL";
        }
        let mut outcome = sample.expect.to_owned();
        if let Some(d) = &sample.digest {
            let mut hit: Vec<String> = requests
                .iter()
                .filter(|r| (200..300).contains(&r.status))
                .filter(|r| {
                    r.body.as_ref().is_some_and(|b| {
                        b["spec"]["template"]["metadata"]["annotations"][DIGEST_ANNOTATION] == **d
                    })
                })
                .map(|r| workload_of(&r.path))
                .collect();
            hit.sort();
            hit.dedup();
            outcome = if hit.is_empty() {
                "restarted nothing".to_owned()
            } else {
                format!("restarted {}", hit.join(", "))
            };
        }
        if sample.dead_letter {
            match letters.get(id.as_str()) {
                Some(dl)
                    if dl.attributes.get("dlq_kind").map(String::as_str) == Some("malformed") =>
                {
                    outcome = format!(
                        "dead-lettered: dlq_kind=malformed dlq_reason={:?}",
                        dl.attributes
                            .get("dlq_reason")
                            .map(String::as_str)
                            .unwrap_or("")
                    );
                }
                Some(dl) => {
                    mark = "FAIL";
                    failures.push(format!(
                        "{}: dead-lettered with unexpected attributes {:?}",
                        sample.what, dl.attributes
                    ));
                }
                None => {
                    mark = "FAIL";
                    failures.push(format!(
                        "{}: not found on {DLQ_SUB} within {DLQ_TIMEOUT:?}",
                        sample.what
                    ));
                }
            }
        }
        println!("  {mark} {id:<6} {:<38} {outcome}", sample.what);
    }
    let dead_lettered = settled.get("dead_letter").copied().unwrap_or(0.0);
    let want_dead = samples.iter().filter(|s| s.dead_letter).count() as f64;
    if dead_lettered != want_dead {
        failures.push(format!(
            "{dead_lettered} messages dead-lettered, expected {want_dead}: {settled:?}"
        ));
    }
    let other_letters: Vec<_> = letters
        .keys()
        .filter(|id| !malformed_ids.iter().any(|m| m == id))
        .collect();
    if !other_letters.is_empty() {
        println!(
            "(also drained {} older dead letters: {other_letters:?})",
            other_letters.len()
        );
    }

    match status {
        Some(s) if s.success() => println!("\ndaemon stopped on SIGTERM ({s})"),
        Some(s) => failures.push(format!("the daemon exited with {s} after SIGTERM")),
        None => failures.push(format!(
            "the daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed)"
        )),
    }

    if failures.is_empty() {
        println!(
            "demo OK: the outcome is the expected one ({} in total)",
            secs(started.elapsed())
        );
        Ok(())
    } else {
        println!("\ndemo FAILED:");
        for f in &failures {
            println!("  - {f}");
        }
        bail!("{} unexpected outcome(s)", failures.len())
    }
}

/// Fails early when nothing listens at `host`: the Pub/Sub client would retry forever, and
/// the daemon would even report ready (its stream "connects" lazily).
fn check_reachable(host: &str) -> Result<()> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = host
        .to_socket_addrs()
        .with_context(|| format!("PUBSUB_EMULATOR_HOST={host} is not HOST:PORT"))?
        .collect();
    if addrs
        .iter()
        .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok())
    {
        Ok(())
    } else {
        bail!(
            "nothing listens at PUBSUB_EMULATOR_HOST={host}; start an emulator with \
             `cargo xtask emulator --project {PROJECT} --addr {host}`, or unset \
             PUBSUB_EMULATOR_HOST to let the demo start its own"
        )
    }
}

/// Pulls the dead-letter subscription (acking everything) until all of `want` (original
/// message ids) arrived or [`DLQ_TIMEOUT`] passed; keyed by `dlq_original_message_id`.
async fn pull_dead_letters(endpoint: &str, want: &[&String]) -> Result<HashMap<String, Message>> {
    let subscriber = Subscriber::builder()
        .with_endpoint(endpoint.to_owned())
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .context("creating the Pub/Sub subscriber")?;
    let mut stream = subscriber
        .subscribe(format!("projects/{PROJECT}/subscriptions/{DLQ_SUB}"))
        .build();
    let token = stream.shutdown_token();
    let mut out = HashMap::new();
    let deadline = tokio::time::Instant::now() + DLQ_TIMEOUT;
    while !want.iter().all(|id| out.contains_key(id.as_str())) {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok((msg, handler)))) => {
                handler.ack();
                let key = msg
                    .attributes
                    .get("dlq_original_message_id")
                    .cloned()
                    .unwrap_or_else(|| format!("?{}", msg.message_id));
                out.insert(key, msg);
            }
            Ok(Some(Err(_))) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(None) | Err(_) => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), token.shutdown()).await;
    Ok(out)
}

/// `restartedAt` and `gar-restarter/digest` of a workload's pod template.
fn annotations(obj: &Value) -> (Option<String>, Option<String>) {
    let a = &obj["spec"]["template"]["metadata"]["annotations"];
    let get = |k: &str| a[k].as_str().map(str::to_owned);
    (
        get(fake_api::RESTARTED_AT_ANNOTATION),
        get(DIGEST_ANNOTATION),
    )
}

fn short_digest(d: &str) -> String {
    match d.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}…", &hex[..12]),
        _ => d.to_owned(),
    }
}

fn fmt_counts(counts: &BTreeMap<String, f64>) -> String {
    if counts.is_empty() {
        return "(none)".to_owned();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ns/name` of a workload API path like `/apis/apps/v1/namespaces/ns/deployments/name`.
fn workload_of(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", "apis", "apps", "v1", "namespaces", ns, _, name, ..] => format!("{ns}/{name}"),
        _ => path.to_owned(),
    }
}

/// The message of the last daemon log line about `workload` (e.g. `Deployment shop/canary`),
/// from the text format: `... gar_restarter::act::restart: MESSAGE workload=Deployment shop/canary`.
fn log_evidence(log: &str, workload: &str) -> Option<String> {
    let field = format!("workload={workload}");
    log.lines()
        .map(strip_ansi)
        .filter(|l| l.contains(&field))
        .filter_map(|l| {
            let (_, after) = l.rsplit_once(" gar_restarter::")?;
            let (_, message) = after.split_once(": ")?;
            let message = message.split(" workload=").next()?.trim();
            (!message.is_empty()).then(|| message.to_owned())
        })
        .next_back()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_counts() {
        let m = BTreeMap::from([("ack".to_owned(), 4.0), ("dead_letter".to_owned(), 1.0)]);
        assert_eq!(fmt_counts(&m), "ack=4 dead_letter=1");
        assert_eq!(fmt_counts(&BTreeMap::new()), "(none)");
    }

    #[test]
    fn sample_data_is_consistent() {
        for d in [
            shop_digest(),
            nginx_digest(),
            digest_only_digest(),
            pinned_digest(),
        ] {
            let hex = d.strip_prefix("sha256:").unwrap();
            assert_eq!(hex.len(), 64);
            assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let seeds = seeds();
        assert_eq!(seeds.iter().filter(|s| s.restart.is_some()).count(), 3);
        assert!(
            seeds
                .iter()
                .any(|s| s.paused && s.object()["spec"]["paused"] == true)
        );
        assert_eq!(samples().len(), 5);
        assert_eq!(short_digest(&shop_digest()), "sha256:5e1f5e1f5e1f…");
    }

    #[test]
    fn finds_log_evidence() {
        let log = "2026-01-01T00:00:00Z  INFO process{:restart{k8s.workload.name=canary}: \
                   gar_restarter::act::restart: not restarting: the Deployment is paused \
                   (kubectl refuses it too) workload=Deployment shop/canary\n\
                   \u{1b}[2mx\u{1b}[0m INFO gar_restarter::pipeline: restarted \
                   workload=Deployment shop/frontend image=x";
        assert_eq!(
            log_evidence(log, "Deployment shop/canary").as_deref(),
            Some("not restarting: the Deployment is paused (kubectl refuses it too)")
        );
        assert_eq!(
            log_evidence(log, "Deployment shop/frontend").as_deref(),
            Some("restarted")
        );
        assert_eq!(log_evidence(log, "Deployment prod/pinned"), None);
        assert_eq!(
            workload_of("/apis/apps/v1/namespaces/web/deployments/nginx"),
            "web/nginx"
        );
    }

    #[test]
    fn parses_options() {
        use clap::Parser;
        assert!(!Args::try_parse_from(["demo"]).unwrap().keep);
        assert!(Args::try_parse_from(["demo", "--keep"]).unwrap().keep);
        assert!(Args::try_parse_from(["demo", "x"]).is_err());
    }
}
