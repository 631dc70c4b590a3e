//! The binary's edges (issue #14 items 5 and 9): exit codes 0/1/2, a closed stdout, bounded
//! config reads, errors named by their environment variable, and no colour codes in piped
//! logs. Each case runs the real binary with its own environment; no emulator is needed.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SUB: &str = "projects/p/subscriptions/gcr-sub";
const TOPIC: &str = "projects/p/topics/gcr-dlq";

/// The binary with a clean environment: nothing inherited can change what it does.
fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gar-restarter"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let started = Instant::now();
    let out = cmd.output().expect("run gar-restarter");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A directory laid out like the mounted cache ConfigMap, indexing `nginx` → Deployment
/// prod/web.
fn mounted_nginx_index() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cache.json"),
        r#"{"images":{"docker.io/library/nginx:latest":[{"name":"web","namespace":"prod"}]}}"#,
    )
    .unwrap();
    dir
}

#[test]
fn dlq_replay_against_an_unreachable_endpoint_fails_with_exit_1() {
    let out = run(bin()
        .env(
            "PUBSUB_EMULATOR_HOST",
            format!("127.0.0.1:{}", closed_port()),
        )
        .args(["dlq", "replay", "--subscription", SUB, "--topic"])
        .arg("projects/p/topics/gcr")
        .args(["--idle-timeout", "1s"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("could not reach Pub/Sub"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("replayed=0"),
        "a failure is not reported as a summary"
    );
}

#[test]
fn config_dev_zero_is_refused_at_once_with_exit_2() {
    let out = run(bin().args(["--config", "/dev/zero", "run"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("/dev/zero") && err.contains("not a regular file"),
        "{err}"
    );
}

#[test]
fn bad_environment_values_are_named_by_their_variable() {
    let out = run(bin().env("GAR_RESTARTER_MAX_ATTEMPTS", "many").args([
        "run",
        "--subscription",
        SUB,
        "--dead-letter-topic",
        TOPIC,
    ]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("GAR_RESTARTER_MAX_ATTEMPTS") && err.contains("many"),
        "{err}"
    );
    // A bad flag is still reported as the flag.
    let out = run(bin().args([
        "run",
        "--subscription",
        SUB,
        "--dead-letter-topic",
        TOPIC,
        "--max-attempts",
        "lots",
    ]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--max-attempts") && !err.contains("GAR_RESTARTER_MAX_ATTEMPTS"),
        "{err}"
    );
}

#[test]
fn an_invalid_otlp_protocol_is_refused_naming_the_variable() {
    let out = run(bin()
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/proto")
        .env(
            "PUBSUB_EMULATOR_HOST",
            format!("127.0.0.1:{}", closed_port()),
        )
        .args(["dlq", "replay", "--subscription", SUB, "--topic", TOPIC]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{err}");
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    // `check` answers from a mounted index; the kubeconfig's server is never contacted.
    let dir = mounted_nginx_index();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n",
            closed_port()
        ),
    )
    .unwrap();
    let mut child = bin()
        .env("KUBECONFIG", &kubeconfig)
        .args(["check", "--image", "nginx", "--cache-dir"])
        .arg(dir.path())
        .args(["--cache-configmap", "ops/gar-restarter-cache"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -0`: the reader is gone before anything is written.
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(0), "{err}");
}

#[test]
fn text_logs_carry_no_colour_codes_when_piped() {
    // Starts, logs, then fails on the missing kubeconfig: a runtime failure, exit 1.
    let out = run(bin()
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env(
            "PUBSUB_EMULATOR_HOST",
            format!("127.0.0.1:{}", closed_port()),
        )
        .args(["--log-format", "text", "run", "--subscription", SUB])
        .args([
            "--dead-letter-topic",
            TOPIC,
            "--metrics-addr",
            "127.0.0.1:0",
        ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{err}");
    assert!(stdout.contains("serving /metrics"), "{stdout}");
    assert!(!stdout.contains('\u{1b}'), "{stdout:?}");
    // The chain is printed once.
    let first = err.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{err}");
    let words: Vec<&str> = first.split(": ").collect();
    let mut seen = std::collections::HashSet::new();
    assert!(
        words.iter().all(|w| seen.insert(*w)),
        "a cause repeats in {first:?}"
    );
}

/// Issue #14 item 7: off-cluster, a command that writes the cache ConfigMap needs it named;
/// it stops before any API call rather than writing into `default`.
#[test]
fn writing_the_cache_off_cluster_without_a_configmap_is_a_usage_error() {
    for args in [
        &["cache", "rebuild"][..],
        &["check", "--image", "nginx", "--rebuild"][..],
    ] {
        let out = run(bin()
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .args(args));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("--cache-configmap"), "{args:?}: {err}");
    }
}

/// Issue #14 item 9: with no kubeconfig and no cluster, `check` answers from the mounted
/// index (exit 0); without a mount it fails with exit 1, naming the missing configuration.
#[test]
fn check_without_a_kubeconfig_answers_from_the_mount() {
    let dir = mounted_nginx_index();
    let check = |cache_dir: &std::path::Path| {
        run(bin()
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .args(["check", "--image", "nginx", "--cache-dir"])
            .arg(cache_dir))
    };
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["source"], "mount");
    assert_eq!(
        report["workloads"],
        serde_json::json!([{"kind": "Deployment", "namespace": "prod", "name": "web"}])
    );

    let empty = tempfile::tempdir().unwrap();
    let out = check(empty.path());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot configure the Kubernetes client"),
        "{err}"
    );
}
