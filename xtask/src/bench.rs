//! `cargo xtask bench`: end-to-end figures for the release binary on loopback.
//!
//! pstest (Google's fake Pub/Sub) and the fake Kubernetes API run locally; the daemon runs
//! as its own process with a 10,000-workload / 50,000-ref index mounted kubelet-style. The
//! live view's freshness is then measured on a real kube-apiserver ([`crate::freshness`]).
//! Bounded: about a minute after the build. Prints one table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gar_testsupport::daemon::{Daemon, DaemonSpec};
use gar_testsupport::emulator::Emulator;
use gar_testsupport::fake_api::{FakeApi, Recording, daemonset, deployment, statefulset};
use gar_testsupport::fixtures;
use gar_testsupport::metrics::histogram_quantile;
use google_cloud_pubsub::client::BasePublisher;
use google_cloud_pubsub::model::Message;

use crate::util;

const PROJECT: &str = "bench-project";
const WORKLOADS: usize = 10_000;
const IMAGES_PER_WORKLOAD: usize = 5;
/// Matched events per latency run, published at a steady rate below pstest's 100 msg/s tick.
const EVENTS: usize = 400;
const RATE_PER_SEC: u64 = 40;
/// Matched events published at once for the throughput run: one per workload, each with a
/// new digest, so each is a real restart (two pushes of one tag published together would
/// leave the older one to the out-of-order guard, which skips it as stale).
const BURST: usize = 1_000;
const STARTS: usize = 5;

/// End-to-end figures for the release binary: push→PATCH latency, the daemon's own
/// latency, throughput, API calls per event, RSS, start-up time, binary size.
///
/// Builds the release binaries and prints end-to-end figures: push→PATCH latency on pstest,
/// the daemon's own receive→PATCH latency, throughput, API calls per event, RSS with 10,000
/// workloads indexed, start-up time and binary size. Loopback only; stops by itself in about
/// a minute after the build. See BENCHMARKS.md.
///
/// The measuring side (fake Kubernetes API, publisher) runs from the release build of xtask,
/// so that an unoptimised harness does not inflate the daemon's figures.
#[derive(Debug, clap::Parser)]
pub struct Args {
    /// Measure this gar-restarter binary instead of the one just built (e.g. a copy built
    /// with other profile settings).
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Internal: the optimised xtask re-run by the debug one, after the build.
    #[arg(long, hide = true)]
    measure_only: bool,
    /// Only the live-view figures on a real kube-apiserver (freshness, and the watch at
    /// scale), without the end-to-end run on the fake API.
    #[arg(long)]
    live_only: bool,
    /// With `--live-only`: only the watch at scale, without the freshness run.
    #[arg(long, requires = "live_only")]
    scale_only: bool,
    /// Deployments the watch-at-scale run creates and watches (5 images each); 0 skips it.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    watched: usize,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        binary,
        measure_only,
        live_only,
        scale_only,
        watched,
    } = args;
    let root = util::repo_root();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| root.join("target"));
    if !measure_only {
        println!("building the release binaries...");
        util::run(
            util::cargo()
                .args(["build", "--release", "--workspace", "--bins"])
                .current_dir(&root),
        )?;
        if cfg!(debug_assertions) {
            let mut cmd = Command::new(target.join("release/xtask"));
            cmd.args(["bench", "--measure-only", "--watched", &watched.to_string()]);
            if live_only {
                cmd.arg("--live-only");
            }
            if scale_only {
                cmd.arg("--scale-only");
            }
            if let Some(b) = &binary {
                cmd.arg("--binary").arg(b);
            }
            return util::run(&mut cmd);
        }
    }
    let binary = binary.unwrap_or_else(|| target.join("release/gar-restarter"));
    let size = std::fs::metadata(&binary)
        .with_context(|| format!("release binary {}", binary.display()))?
        .len();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    rt.block_on(async {
        if !live_only {
            bench(&binary, size).await?;
            fan_out(&binary).await?;
        }
        live(&binary, watched, scale_only).await
    })
}

/// Workloads one push reaches in the fan-out run, and the pace it is restarted at.
const FAN_OUT: usize = 1_000;
const FAN_OUT_RATE: usize = 100;

/// One push of an image that [`FAN_OUT`] workloads share, at
/// `--max-restarts-per-second=FAN_OUT_RATE`: every workload restarted once, at the configured
/// pace (measured from the PATCHes the API received), and the message acked once.
async fn fan_out(binary: &Path) -> Result<()> {
    let emu = Emulator::start("fan-out", &["gcr", "dlq"], &[("gcr-sub", "gcr")]).await?;
    let api = FakeApi::start().await?;
    let image = "europe-west4-docker.pkg.dev/p/r/sidecar:v3";
    for i in 0..FAN_OUT {
        api.insert(deployment(
            &format!("ns-{}", i % 50),
            &format!("svc-{i}"),
            &[image],
        ));
    }
    let tmp = tempfile::tempdir()?;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    // The cache mount stays empty: the index comes from the start-up scan of the fake API.
    let spec = util::daemon_spec(
        binary,
        &emu,
        tmp.path(),
        vec![
            "--watch=false".into(),
            format!("--max-restarts-per-second={FAN_OUT_RATE}"),
        ],
    )?;
    let mut daemon = Daemon::spawn(&spec)?;
    daemon.wait_ready(Duration::from_secs(60)).await?;
    api.clear_requests();
    let publisher = gcr_publisher(&emu).await?;
    let event = serde_json::json!({
        "action": "INSERT",
        "digest": format!("europe-west4-docker.pkg.dev/p/r/sidecar@sha256:{:064x}", 7),
        "tag": image,
    });
    publisher
        .publish(Message::new().set_data(bytes::Bytes::from(event.to_string())))
        .await?;
    let acks = || daemon.metric("gar_restarter_events_settled_total{outcome=\"ack\"}");
    let deadline = Instant::now() + Duration::from_secs((3 * FAN_OUT / FAN_OUT_RATE) as u64 + 30);
    while acks() < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked = acks();
    let nacks = daemon.metric("gar_restarter_events_settled_total{outcome=\"nack\"}");
    let mut at: Vec<Instant> = api.patches().iter().map(|p| p.received_at).collect();
    at.sort();
    let (Some(first), Some(last)) = (at.first(), at.last()) else {
        bail!("no PATCH was made; see {}", spec.log.display());
    };
    let span = (*last - *first).as_secs_f64();
    // The bucket's burst (one second's worth) goes at once; the rest at the configured pace.
    let paced = at.len().saturating_sub(FAN_OUT_RATE) as f64 / span;
    println!(
        "| fan-out: one push for {FAN_OUT} workloads at --max-restarts-per-second={FAN_OUT_RATE} | {} PATCHes, {acked} ack, {nacks} nacks; first → last PATCH {span:.2} s: {paced:.1}/s after the burst |",
        at.len(),
    );
    daemon
        .terminate(Duration::from_secs(10))
        .context("stopping the daemon")?;
    if at.len() != FAN_OUT || acked != 1.0 || nacks != 0.0 {
        bail!(
            "fan-out: {} PATCHes, {acked} acks, {nacks} nacks (want {FAN_OUT}, 1, 0); see {}",
            at.len(),
            spec.log.display()
        );
    }
    if paced > FAN_OUT_RATE as f64 * 1.1 {
        bail!("fan-out ran at {paced:.1}/s, above --max-restarts-per-second={FAN_OUT_RATE}");
    }
    Ok(())
}

/// A publisher to the emulator's `gcr` topic that sends each message at once (no batching
/// delay, which would add to every push → PATCH figure).
async fn gcr_publisher(emu: &Emulator) -> Result<google_cloud_pubsub::client::Publisher> {
    Ok(BasePublisher::builder()
        .with_endpoint(emu.endpoint())
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await?
        .publisher(emu.topic("gcr"))
        .set_delay_threshold(Duration::ZERO)
        .build())
}

/// The live view's figures, on a real API server (the fake cannot watch): freshness, and
/// start-up and memory with `watched` Deployments watched.
async fn live(binary: &Path, watched: usize, scale_only: bool) -> Result<()> {
    if !scale_only {
        let fresh = crate::freshness::measure(binary).await?;
        for (change, p50, p99, max) in &fresh.rows {
            println!(
                "| live view freshness: {change} (real kube-apiserver, write accepted → watch event applied) | p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms |"
            );
        }
        println!(
            "| LISTs while those changes were applied (steady state) | {} |",
            fresh.lists_in_steady_state
        );
    }
    if watched > 0 {
        let s = crate::freshness::scale(binary, watched, IMAGES_PER_WORKLOAD).await?;
        let mounted = format!(
            "a start with it mounted ({}, {:.2} MiB)",
            s.mounted_form,
            s.mounted_bytes as f64 / 1_048_576.0
        );
        for (start, f) in [
            ("first start, no cache ConfigMap: a scan", &s.cold),
            ("next start, from the cache ConfigMap", &s.warm),
            (mounted.as_str(), &s.mounted),
        ] {
            println!(
                "| watch at scale: {} Deployments / {} refs on a real kube-apiserver, {start} | start → ready {:.2} s, start → watch listed {:.2} s, VmRSS {:.1} MiB (heap and stacks {:.1}, binary and libraries {:.1}; heap in use {:.1}, freed but held {:.1}), VmHWM {:.1} MiB |",
                s.workloads,
                s.refs,
                f.ready.as_secs_f64(),
                f.synced.as_secs_f64(),
                f.rss_mib,
                f.anon_mib,
                f.file_mib,
                f.heap_mib,
                f.heap_free_mib,
                f.hwm_mib
            );
        }
    }
    Ok(())
}

/// Spawns the daemon and waits for /readyz, asking every 2 ms so that the start-up time is
/// measured closely; returns it with the time from spawn to ready.
async fn start_daemon(
    binary: &Path,
    emu: &Emulator,
    kubeconfig: &Path,
    cache: &Path,
    log: &Path,
) -> Result<(Daemon, Duration)> {
    let spec = DaemonSpec {
        kubeconfig: kubeconfig.to_owned(),
        cache_dir: cache.to_owned(),
        log: log.to_owned(),
        // The fake API server answers watches with 405: the daemon runs on its snapshot.
        // Unpaced: this measures the daemon's own speed (the fan-out row measures pacing).
        ..util::daemon_spec(
            binary,
            emu,
            cache,
            vec!["--watch=false".into(), "--max-restarts-per-second=0".into()],
        )?
    };
    let mut daemon = Daemon::spawn(&spec)?;
    let ready = daemon
        .wait_ready_polling(Duration::from_secs(30), Duration::from_millis(2))
        .await?;
    Ok((daemon, ready))
}

/// `VmRSS` (resident now) or `VmHWM` (peak resident) of a process, in MiB.
fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS:")
}

pub(crate) fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A GAR INSERT for workload `i`'s image with a digest no other event used.
fn burst_event(i: usize, n: usize) -> Vec<u8> {
    let tag = fixtures::image(i, 0);
    let repo = tag.rsplit_once(':').map(|(r, _)| r).unwrap_or(&tag);
    serde_json::json!({
        "action": "INSERT",
        "digest": format!("{repo}@sha256:{:064x}", 1 << 40 | n),
        "tag": tag,
    })
    .to_string()
    .into_bytes()
}

/// The kubelet layout: `..data` → timestamped dir, `cache.json` → `..data/cache.json`.
fn mount_index(dir: &Path) -> Result<()> {
    use std::os::unix::fs::symlink;
    let ts = dir.join("..2026_11_25_00_00_00.000000001");
    std::fs::create_dir_all(&ts)?;
    std::fs::write(
        ts.join("cache.json"),
        fixtures::cache_json(WORKLOADS, IMAGES_PER_WORKLOAD),
    )?;
    symlink("..2026_11_25_00_00_00.000000001", dir.join("..data"))?;
    symlink("..data/cache.json", dir.join("cache.json"))?;
    Ok(())
}

async fn bench(binary: &Path, binary_size: u64) -> Result<()> {
    let emu = Emulator::start(PROJECT, &["gcr", "dlq"], &[("gcr-sub", "gcr")]).await?;
    let api = FakeApi::start().await?;
    let tmp = tempfile::tempdir()?;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(&cache)?;
    mount_index(&cache)?;
    // The workloads the events target exist in the fake API, kinds as the fixture assigns them.
    let kinds = [deployment, statefulset, daemonset];
    for i in 0..EVENTS.max(BURST) {
        api.insert(kinds[i % 3](
            &format!("ns-{}", i % 200),
            &format!("service-{i}"),
            &[&fixtures::image(i, 0)],
        ));
    }
    let log = tmp.path().join("daemon.log");

    // Start-up: spawn → /readyz 200 with the mounted index, several times.
    let mut starts = Vec::new();
    for _ in 0..STARTS {
        let (d, t) = start_daemon(binary, &emu, &kubeconfig, &cache, &log).await?;
        starts.push(t.as_secs_f64() * 1e3);
        drop(d);
    }
    starts.sort_by(f64::total_cmp);
    let (daemon, _) = start_daemon(binary, &emu, &kubeconfig, &cache, &log).await?;
    let pid = daemon.id().context("the daemon is not running")?;
    let rss_idle = rss_mb(pid);
    if !api.requests().is_empty() {
        bail!(
            "start-up from the mount made API calls: {:?}",
            api.requests().len()
        );
    }

    // Latency: steady publishing of matched events, one workload each.
    let publisher = gcr_publisher(&emu).await?;
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let period = Duration::from_micros(1_000_000 / RATE_PER_SEC);
    let load_started = Instant::now();
    for i in 0..EVENTS {
        let data = fixtures::gar_insert(i, 0);
        let digest = format!("sha256:{:064x}", i * 1000);
        sent.insert(digest, Instant::now());
        publisher
            .publish(Message::new().set_data(bytes::Bytes::from(data)))
            .await?;
        let next = load_started + period * (i as u32 + 1);
        tokio::time::sleep_until(next.into()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.patches().len() < EVENTS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let patches = api.patches();
    let mut latencies: Vec<f64> = patches
        .iter()
        .filter_map(|p| {
            let d = p.body.as_ref()?["spec"]["template"]["metadata"]["annotations"]["gar-restarter/digest"].as_str()?;
            Some(p.received_at.checked_duration_since(*sent.get(d)?)?.as_secs_f64() * 1e3)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let other_calls = api
        .requests()
        .iter()
        .filter(|r| r.method != "PATCH")
        .count();
    let metrics = daemon.metrics();
    let in_daemon_p50 =
        histogram_quantile(&metrics, "gar_restarter_receive_to_restart_seconds", 0.5);
    let in_daemon_p99 =
        histogram_quantile(&metrics, "gar_restarter_receive_to_restart_seconds", 0.99);
    let sent_p50 = histogram_quantile(&metrics, "gar_restarter_receive_to_patch_seconds", 0.5);
    let sent_p99 = histogram_quantile(&metrics, "gar_restarter_receive_to_patch_seconds", 0.99);
    let sent_max = histogram_quantile(&metrics, "gar_restarter_receive_to_patch_seconds", 1.0);
    let rss_loaded = rss_mb(pid);

    // Throughput: BURST matched events published at once; the time until the last PATCH.
    let before = api.patches().len();
    let burst_started = Instant::now();
    let publishes = (0..BURST).map(|n| {
        let data = burst_event(n, n);
        publisher.publish(Message::new().set_data(bytes::Bytes::from(data)))
    });
    for id in futures::future::join_all(publishes).await {
        id?;
    }
    let published_in = burst_started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.patches().len() < before + BURST && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burst_patches = api.patches();
    let burst_done = burst_patches
        .iter()
        .skip(before)
        .map(|p| p.received_at)
        .max()
        .map(|t| t.duration_since(burst_started));
    let burst_count = burst_patches.len() - before;
    let rss_after_burst = rss_mb(pid);
    let rss_peak = status_mb(pid, "VmHWM:");
    drop(daemon);

    let ms = |v: Option<f64>| {
        v.map(|s| format!("≤ {:.2} ms", s * 1e3))
            .unwrap_or_else(|| "n/a".into())
    };
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| index | {WORKLOADS} workloads, {} refs, mounted |",
        WORKLOADS * IMAGES_PER_WORKLOAD
    );
    println!(
        "| push → PATCH on pstest, {EVENTS} events at {RATE_PER_SEC}/s | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "| receive → PATCH handed to the client, in the daemon (histogram bucket bound) | p50 {}, p99 {}, max {} |",
        ms(sent_p50),
        ms(sent_p99),
        ms(sent_max)
    );
    println!(
        "| receive → PATCH accepted, in the daemon (histogram bucket bound) | p50 {}, p99 {} |",
        ms(in_daemon_p50),
        ms(in_daemon_p99)
    );
    match burst_done {
        Some(t) if burst_count == BURST => println!(
            "| throughput on pstest, {BURST} matched events published at once (published in {:.0} ms) | {:.0} events/s ({BURST} PATCHes in {:.2} s) |",
            published_in.as_secs_f64() * 1e3,
            BURST as f64 / t.as_secs_f64(),
            t.as_secs_f64()
        ),
        _ => println!(
            "| throughput on pstest, {BURST} events | only {burst_count} restarted within 60 s |"
        ),
    }
    println!("| restarts completed | {} / {EVENTS} |", latencies.len());
    println!(
        "| API calls per event | {:.2} PATCH, {:.2} other (lookups) |",
        patches.len() as f64 / EVENTS as f64,
        other_calls as f64 / EVENTS as f64
    );
    println!(
        "| RSS after start / after the latency run / after the burst / peak | {rss_idle:.1} / {rss_loaded:.1} / {rss_after_burst:.1} / {rss_peak:.1} MiB |"
    );
    println!(
        "| start → ready (mounted index), {STARTS} runs | p50 {:.0} ms, max {:.0} ms |",
        percentile(&starts, 0.5),
        starts.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "| release binary | {:.1} MiB ({binary_size} bytes) |",
        binary_size as f64 / 1_048_576.0
    );
    if burst_count < BURST {
        bail!(
            "only {burst_count} of {BURST} burst events were restarted; see {}",
            log.display()
        );
    }
    if latencies.len() < EVENTS {
        bail!(
            "only {} of {EVENTS} events were restarted; see {}",
            latencies.len(),
            log.display()
        );
    }
    Ok(())
}
