//! Peak RSS of the daemon under the worst input its limits allow (issue #14): the numbers
//! behind the manifests' memory request and limit. Not part of the suite (`test = false` in
//! Cargo.toml: it takes a few minutes and wants the release binary); run it by hand:
//!
//! ```sh
//! cargo build --release -p gar-restarter
//! GAR_RESTARTER_BIN=$CARGO_TARGET_DIR/release/gar-restarter cargo test --test memory_peak
//! ```
//!
//! Each scenario is a fresh daemon process against pstest and the fake Kubernetes API, with
//! the index mounted kubelet-style; the figure is the process's `VmHWM` (peak resident set)
//! from `/proc/PID/status`, read just before it is stopped. The scenarios:
//!
//! * `idle`: a 10-workload index, no messages: the fixed cost.
//! * `bench index`: the benchmark index (10,000 workloads, 50,000 refs), mounted gzip.
//! * `largest index` / `dense index`: the largest index a reader accepts (36 MiB of JSON, the
//!   cap of `cache/codec.rs`), sharded into at most 8 shards, in two shapes: realistic
//!   (5 images per workload, GAR paths) and dense (short names, 8 workloads per image: the
//!   most workloads 36 MiB can name). Hand-written (no `version`), so the keys are
//!   normalised on load, which builds the index twice; then swapped for another index of
//!   the same size while the first is in use, as kubelet does on a ConfigMap update.
//! * `messages`: flow control's worth of messages held at once (2 × `--max-in-flight`
//!   messages of 64 KiB, the largest valid event, their PATCH stalled by the fake API, so
//!   they all stay outstanding) plus messages of ~10 MB (Pub/Sub's largest; flow control
//!   may overshoot by one message), which are dead-lettered.
//! * `worst`: the largest index, its swap and the messages together.
//!
//! pstest ignores flow control, so the harness publishes exactly the flow-controlled amount
//! rather than relying on the server to stop.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gar_testsupport::emulator::Emulator;
use gar_testsupport::fake_api::{FakeApi, Fault, deployment};
use gar_testsupport::fixtures::image;
use google_cloud_pubsub::client::BasePublisher;
use google_cloud_pubsub::model::Message;
use sha2::{Digest, Sha256};

const PROJECT: &str = "memory-project";
/// `cache/codec.rs`: 4 × the 9 MiB the ConfigMaps hold.
const MAX_JSON: usize = 4 * 9 * 1024 * 1024;
/// `cache/codec.rs`: raw bytes per shard, and shards at most.
const SHARD_RAW: usize = 1_000_000 / 4 * 3;
const MAX_SHARDS: usize = 8;
/// `--max-in-flight`'s default, and the flow-control defaults derived from it.
const MAX_IN_FLIGHT: usize = 64;
const OUTSTANDING: usize = 2 * MAX_IN_FLIGHT;
const EVENT_BYTES: usize = 64 * 1024;
/// Pub/Sub's largest message is 10 MB, attributes included.
const HUGE_BYTES: usize = 10_000_000 - 1_000;

fn main() {
    let binary = std::env::var_os("GAR_RESTARTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gar-restarter")));
    let huge: usize = std::env::var("MEMORY_PEAK_HUGE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let only = std::env::var("MEMORY_PEAK_ONLY").ok();
    println!("binary: {}", binary.display());
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Kept after the run: each scenario's daemon.log is there.
        let tmp = std::env::temp_dir().join("gar-memory-peak");
        let _ = std::fs::remove_dir_all(&tmp);
        println!("scenario directories (daemon.log): {}", tmp.display());
        let mut rows = Vec::new();
        let scenarios: [(&str, Index, bool, usize); 8] = [
            ("idle", Index::Workloads(10), false, 0),
            ("bench index (10,000 workloads, 50,000 refs)", Index::Workloads(10_000), false, 0),
            ("rebuild: 10,000 Deployments (~10 KB each) scanned and stored", Index::Scan(10_000), false, 0),
            ("largest index, realistic shape, + swap", Index::Largest, true, 0),
            ("largest index, dense shape, + swap", Index::Dense, true, 0),
            ("messages (128 × 64 KiB held + ~10 MB ones)", Index::Workloads(10_000), false, huge),
            ("worst: largest realistic index + swap + messages", Index::Largest, true, huge),
            ("worst: largest dense index + swap + messages", Index::Dense, true, huge),
        ];
        for (i, (name, index, swap, huge)) in scenarios.into_iter().enumerate() {
            if only.as_deref().is_some_and(|o| !name.contains(o)) {
                continue;
            }
            let dir = tmp.join(format!("s{i}"));
            let row = scenario(&binary, &dir, index, swap, huge).await;
            println!("{name}: {row}");
            rows.push((name, row));
        }
        println!("\n| scenario | index JSON | stored (gzip) | workloads / refs | VmRSS settled | VmHWM (peak) |");
        println!("|---|---|---|---|---|---|");
        for (name, r) in rows {
            println!(
                "| {name} | {:.1} MiB | {:.2} MB ({} shards) | {} / {} | {:.1} MiB | **{:.1} MiB** |",
                r.json_bytes as f64 / 1048576.0,
                r.stored_bytes as f64 / 1e6,
                r.shards,
                r.workloads,
                r.refs,
                r.rss_mib,
                r.hwm_mib
            );
        }
    });
}

#[derive(Clone, Copy)]
enum Index {
    /// The benchmark shape: `n` workloads, 5 images each.
    Workloads(usize),
    /// The benchmark shape grown to the decompression cap.
    Largest,
    /// Short names, 8 workloads per image, grown to the cap.
    Dense,
    /// Nothing mounted and no cache ConfigMap: `n` Deployments of 5 images each, padded to
    /// ~10 KB (a `last-applied-configuration` annotation), scanned through the API at start-up
    /// and stored.
    Scan(usize),
}

struct Row {
    json_bytes: usize,
    stored_bytes: usize,
    shards: usize,
    workloads: usize,
    refs: usize,
    rss_mib: f64,
    hwm_mib: f64,
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "json {} B, stored {} B in {} shards, {} workloads / {} refs, VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            self.json_bytes,
            self.stored_bytes,
            self.shards,
            self.workloads,
            self.refs,
            self.rss_mib,
            self.hwm_mib
        )
    }
}

/// A version-less (hand-written, so normalised on load) `cache.json`; `salt` makes a second
/// index with the same shape but other names, for the swap. Returns (json, workloads, refs).
fn index_json(shape: Index, salt: usize, limit: usize) -> (Vec<u8>, usize, usize) {
    let mut out = Vec::with_capacity(MAX_JSON);
    // A later index for the swap: the daemon never replaces its index with an older one.
    write!(
        out,
        r#"{{"generatedAt":"{}","images":{{"#,
        generated_at(salt)
    )
    .unwrap();
    let (mut workloads, mut refs) = (0, 0);
    let mut first = true;
    let mut entry = Vec::new();
    let mut push = |out: &mut Vec<u8>, entry: &[u8]| -> bool {
        if out.len() + entry.len() + 1 > limit {
            return false;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(entry);
        true
    };
    match shape {
        Index::Workloads(_) | Index::Largest | Index::Scan(_) => {
            let n = match shape {
                Index::Workloads(n) | Index::Scan(n) => n,
                _ => usize::MAX,
            };
            'all: for i in 0..n {
                for j in 0..5 {
                    entry.clear();
                    let kind = ["", r#""kind":"StatefulSet","#, r#""kind":"DaemonSet","#][i % 3];
                    write!(
                        entry,
                        r#""{}":[{{{kind}"name":"service-{salt}-{i}","namespace":"ns-{}"}}]"#,
                        image(i, j),
                        i % 200
                    )
                    .unwrap();
                    if !push(&mut out, &entry) {
                        break 'all;
                    }
                    refs += 1;
                    if j == 0 {
                        workloads += 1;
                    }
                }
            }
        }
        Index::Dense => {
            // 8 workloads per image, each named once: the most workloads per byte.
            'dense: for k in 0.. {
                entry.clear();
                write!(entry, r#""r/{k:x}":["#).unwrap();
                for w in 0..8 {
                    if w > 0 {
                        entry.push(b',');
                    }
                    write!(
                        entry,
                        r#"{{"name":"{:x}","namespace":"{salt}"}}"#,
                        k * 8 + w
                    )
                    .unwrap();
                }
                entry.push(b']');
                if !push(&mut out, &entry) {
                    break 'dense;
                }
                refs += 1;
                workloads += 8;
            }
        }
    }
    out.extend_from_slice(b"}}");
    (out, workloads, refs)
}

fn generated_at(salt: usize) -> String {
    format!("2026-11-25T00:00:{salt:02}Z")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes `json` in the form the daemon would store it (gzip, or sharded gzip) into a new
/// kubelet-style timestamped directory of `dir` and points `..data` at it. Returns
/// (stored bytes, shards).
fn mount(dir: &Path, generation: usize, json: &[u8]) -> (usize, usize) {
    use std::os::unix::fs::symlink;
    let gz = gzip(json);
    let ts = format!("..2026_11_25_00_00_00.{generation:09}");
    let data = dir.join(&ts);
    std::fs::create_dir_all(&data).unwrap();
    let mut keys = Vec::new();
    let shards = if gz.len().div_ceil(3) * 4 <= 1_000_000 {
        std::fs::write(data.join("cache.json.gz"), &gz).unwrap();
        keys.push("cache.json.gz".to_string());
        0
    } else {
        let chunks: Vec<&[u8]> = gz.chunks(SHARD_RAW).collect();
        assert!(
            chunks.len() <= MAX_SHARDS,
            "{} bytes of gzip need {} shards, more than {MAX_SHARDS}",
            gz.len(),
            chunks.len()
        );
        let hex: String = Sha256::digest(&gz)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let manifest = format!(
            r#"{{"version":1,"shards":{},"sha256":"{hex}","generatedAt":"{}"}}"#,
            chunks.len(),
            generated_at(generation - 1)
        );
        std::fs::write(data.join("cache-manifest.json"), manifest).unwrap();
        keys.push("cache-manifest.json".to_string());
        for (i, c) in chunks.iter().enumerate() {
            let key = format!("cache.json.gz.{i}");
            std::fs::write(data.join(&key), c).unwrap();
            keys.push(key);
        }
        chunks.len()
    };
    // Kubelet's atomic writer: `..data_tmp` → new dir, renamed over `..data`; the keys are
    // links through `..data`, created once.
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    symlink(&ts, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, dir.join("..data")).unwrap();
    for key in keys {
        let link = dir.join(&key);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{key}"), &link).unwrap();
        }
    }
    (gz.len(), shards)
}

struct Daemon {
    child: Child,
    metrics: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = gar_testsupport::http::get_status_body(self.metrics, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    fn status_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }
}

async fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scenario(binary: &Path, dir: &Path, shape: Index, swap: bool, huge: usize) -> Row {
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let (json, mut workloads, refs) = index_json(shape, 0, MAX_JSON - 64);
    let (mut stored_bytes, mut shards) = (0, 0);
    if !matches!(shape, Index::Scan(_)) {
        (stored_bytes, shards) = mount(&cache, 1, &json);
    }
    let json_bytes = json.len();
    drop(json);

    let emu = Emulator::start(PROJECT, &["gcr", "dlq"], &[("gcr-sub", "gcr")])
        .await
        .unwrap();
    let api = FakeApi::start().await.unwrap();
    if let Index::Scan(n) = shape {
        let pad = "x".repeat(10_000);
        for i in 0..n {
            let images: Vec<String> = (0..5).map(|j| image(i, j)).collect();
            let images: Vec<&str> = images.iter().map(String::as_str).collect();
            let mut obj = deployment(
                &format!("ns-{}", i % 200),
                &format!("service-0-{i}"),
                &images,
            );
            obj["metadata"]["annotations"] = serde_json::json!({
                "kubectl.kubernetes.io/last-applied-configuration": pad,
            });
            api.insert(obj);
        }
        workloads = n;
    }
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let child = Command::new(binary)
        .args(["run", "--subscription", &emu.subscription("gcr-sub")])
        // The fake API server answers watches with 405: these figures are of the snapshot
        // path; the live view adds its own map (see BENCHMARKS.md).
        .arg("--watch=false")
        .args(["--dead-letter-topic", &emu.topic("dlq")])
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--cache-configmap", "gar-restarter/gar-restarter-cache"])
        .arg("--cache-dir")
        .arg(&cache)
        .args(["--log-format", "text"])
        .env("PUBSUB_EMULATOR_HOST", emu.host())
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let daemon = Daemon { child, metrics };
    wait_for("/readyz", Duration::from_secs(120), || {
        matches!(
            gar_testsupport::http::get_status_body(metrics, "/readyz"),
            Some((200, _))
        )
    })
    .await;
    assert_eq!(
        daemon.metric("gar_restarter_index_workloads"),
        Some(workloads as f64),
        "the mounted index did not load (see {})",
        dir.join("daemon.log").display()
    );

    if huge > 0 {
        hold_messages(&daemon, &emu, &api, shape, huge).await;
    }
    if swap {
        // Another index of (nearly) the same size replaces the first while it is in use;
        // a little smaller, so that its load shows in the workload count.
        let (json, workloads2, _) = index_json(shape, 1, MAX_JSON - 64 * 1024);
        assert_ne!(workloads2, workloads);
        mount(&cache, 2, &json);
        drop(json);
        wait_for("the swapped index", Duration::from_secs(120), || {
            daemon.metric("gar_restarter_index_workloads") == Some(workloads2 as f64)
        })
        .await;
        assert_eq!(
            sum_metric(&daemon, "gar_restarter_index_load_failures_total"),
            0.0
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let row = Row {
        json_bytes,
        stored_bytes,
        shards,
        workloads,
        refs,
        rss_mib: daemon.status_mib("VmRSS:"),
        hwm_mib: daemon.status_mib("VmHWM:"),
    };
    drop(daemon);
    row
}

fn sum_metric(daemon: &Daemon, name: &str) -> f64 {
    gar_testsupport::http::get_status_body(daemon.metrics, "/metrics")
        .map(|(_, body)| {
            body.lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0)
}

/// Flow control's worth of messages, held: `--max-in-flight` of them stalled in their PATCH,
/// as many again waiting in the client, and `huge` messages of ~10 MB, all but the last
/// processed (dead-lettered) while the first slots are stalled, the last one waiting on top
/// of the full outstanding set (the overshoot flow control allows).
async fn hold_messages(daemon: &Daemon, emu: &Emulator, api: &FakeApi, shape: Index, huge: usize) {
    api.add_fault(Fault::delay("/deployments", Duration::from_secs(600)).on_method("PATCH"));
    let publisher = BasePublisher::builder()
        .with_endpoint(emu.endpoint())
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .unwrap()
        .publisher(emu.topic("gcr"))
        .set_delay_threshold(Duration::ZERO)
        .build();
    let held = |range: std::ops::Range<usize>| {
        let mut pending = Vec::new();
        for n in range {
            // Deployments of the index, so the event matches and its PATCH stalls.
            let (tag, ns, name) = match shape {
                Index::Dense => (
                    format!("docker.io/r/{n:x}:latest"),
                    "0".to_string(),
                    format!("{:x}", n * 8),
                ),
                _ => {
                    let i = n * 3;
                    (
                        image(i, 0),
                        format!("ns-{}", i % 200),
                        format!("service-0-{i}"),
                    )
                }
            };
            api.insert(deployment(&ns, &name, &[&tag]));
            let mut event = format!(
                r#"{{"action":"INSERT","digest":"{}@sha256:{:064x}","tag":"{tag}","pad":""#,
                tag.rsplit_once(':').map(|(r, _)| r).unwrap_or(&tag),
                n + 1
            )
            .into_bytes();
            event.resize(EVENT_BYTES - 2, b'x');
            event.extend_from_slice(br#""}"#);
            assert_eq!(event.len(), EVENT_BYTES);
            pending.push(publisher.publish(Message::new().set_data(bytes::Bytes::from(event))));
        }
        pending
    };
    let huge_message = |n: usize| {
        publisher.publish(Message::new().set_data(bytes::Bytes::from(vec![b'{'; HUGE_BYTES - n])))
    };
    for p in held(0..MAX_IN_FLIGHT - 1) {
        p.await.unwrap();
    }
    wait_for(
        "slots busy with a stalled PATCH",
        Duration::from_secs(60),
        || daemon.metric("gar_restarter_in_flight") == Some((MAX_IN_FLIGHT - 1) as f64),
    )
    .await;
    for n in 0..huge - 1 {
        huge_message(n).await.unwrap();
        wait_for(
            "a ~10 MB message dead-lettered",
            Duration::from_secs(60),
            || sum_metric(daemon, "gar_restarter_dead_letters_total") >= (n + 1) as f64,
        )
        .await;
    }
    for p in held(MAX_IN_FLIGHT - 1..OUTSTANDING) {
        p.await.unwrap();
    }
    wait_for("every slot busy", Duration::from_secs(60), || {
        daemon.metric("gar_restarter_in_flight") == Some(MAX_IN_FLIGHT as f64)
    })
    .await;
    // pstest hands over one message per 10 ms tick: let the client take the rest.
    tokio::time::sleep(Duration::from_secs(3)).await;
    huge_message(huge).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
}
