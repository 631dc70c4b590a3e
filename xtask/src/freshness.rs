//! The live view's freshness on a real kube-apiserver: how long after a change is written
//! (a new Deployment, an image change, a pause, an opt-out) the daemon's watch has applied it,
//! and how many LISTs it sent meanwhile (none, in steady state).
//!
//! "Applied" is observed from outside: the daemon counts every watch event it applies in
//! `gar_restarter_watch_events_total`, polled every millisecond after the API server accepted
//! the write. Each change is the only one in flight (Deployments have 0 replicas, so no
//! controller churn follows), so the first event counted after the write is that change.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gar_testsupport::daemon::{Daemon, DaemonSpec, free_addr};
use gar_testsupport::emulator::Emulator;
use gar_testsupport::fixtures;
use gar_testsupport::kube_api::KubeApi;
use gar_testsupport::metrics;
use gar_testsupport::objects::deployment;
use gar_testsupport::traffic::Recording;

/// Changes measured per kind of change.
const ROUNDS: usize = 40;
const NAMESPACE: &str = "apps";

pub struct Figures {
    /// (change, p50 ms, p99 ms, max ms)
    pub rows: Vec<(&'static str, f64, f64, f64)>,
    pub lists_in_steady_state: usize,
}

fn events_applied(daemon: &Daemon) -> f64 {
    metrics::value(
        &daemon.metrics(),
        "gar_restarter_watch_events_total{kind=\"deployments\"}",
    )
}

fn zero_replicas(mut obj: serde_json::Value) -> serde_json::Value {
    obj["spec"]["replicas"] = 0.into();
    obj
}

/// Runs `change`, then waits until the daemon has applied one more watch event.
async fn time_one(daemon: &Daemon, change: impl FnOnce()) -> Result<f64> {
    let before = events_applied(daemon);
    let started = Instant::now();
    change();
    let deadline = started + Duration::from_secs(10);
    while events_applied(daemon) <= before {
        if Instant::now() > deadline {
            bail!("a change was not applied within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

fn summary(name: &'static str, mut ms: Vec<f64>) -> (&'static str, f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    (name, at(0.5), at(0.99), ms[ms.len() - 1])
}

pub async fn measure(binary: &Path) -> Result<Figures> {
    let emu = Emulator::start("freshness", &["gcr", "dlq"], &[("gcr-sub", "gcr")]).await?;
    let api = KubeApi::start()
        .await
        .map_err(|e| anyhow::anyhow!("starting the control plane: {e}"))?;
    for i in 0..ROUNDS {
        api.insert(zero_replicas(deployment(
            NAMESPACE,
            &format!("web-{i}"),
            &["europe-west4-docker.pkg.dev/p/r/web:v1"],
        )));
    }
    let tmp = tempfile::tempdir()?;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let spec = crate::util::daemon_spec(binary, &emu, tmp.path(), Vec::new())?;
    let mut daemon = Daemon::spawn(&spec)?;
    daemon.wait_ready(Duration::from_secs(30)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics::value(&daemon.metrics(), "gar_restarter_watch_synced") != 1.0 {
        if Instant::now() > deadline {
            bail!("the watch never listed:\n{}", daemon.log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the controllers' status writes for the seeded objects pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = api.requests().len();

    let mut created = Vec::new();
    for i in 0..ROUNDS {
        let obj = zero_replicas(deployment(
            NAMESPACE,
            &format!("new-{i}"),
            &["europe-west4-docker.pkg.dev/p/r/web:v1"],
        ));
        created.push(time_one(&daemon, || api.insert(obj)).await?);
        settle().await;
    }
    let mut image = Vec::new();
    for i in 0..ROUNDS {
        let name = format!("web-{i}");
        image.push(
            time_one(&daemon, || {
                api.modify("deployments", NAMESPACE, &name, |o| {
                    o["spec"]["template"]["spec"]["containers"][0]["image"] =
                        "europe-west4-docker.pkg.dev/p/r/web:v2".into();
                });
            })
            .await?,
        );
        settle().await;
    }
    let mut pause = Vec::new();
    for i in 0..ROUNDS {
        let name = format!("web-{i}");
        pause.push(
            time_one(&daemon, || {
                api.modify("deployments", NAMESPACE, &name, |o| {
                    o["spec"]["paused"] = true.into();
                });
            })
            .await?,
        );
        settle().await;
    }
    let mut opt_out = Vec::new();
    for i in 0..ROUNDS {
        let name = format!("new-{i}");
        opt_out.push(
            time_one(&daemon, || {
                api.modify("deployments", NAMESPACE, &name, |o| {
                    o["metadata"]["annotations"]["gar-restarter/enabled"] = "false".into();
                });
            })
            .await?,
        );
        settle().await;
    }
    let lists_in_steady_state = api
        .requests()
        .into_iter()
        .skip(seen)
        .filter(|r| r.method == "GET" && r.query_param("watch").is_none())
        .count();
    daemon
        .terminate(Duration::from_secs(10))
        .context("stopping the daemon")?;
    Ok(Figures {
        rows: vec![
            summary("create", created),
            summary("image change", image),
            summary("pause", pause),
            summary("opt-out", opt_out),
        ],
        lists_in_steady_state,
    })
}

/// The controller's own status write for a change (observedGeneration) follows it within
/// milliseconds; waiting it out keeps the next round's first event the next round's change.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

/// The live view at scale on a real kube-apiserver.
pub struct Scale {
    pub workloads: usize,
    pub refs: usize,
    /// The first start: no cache ConfigMap yet, so a scan builds the index.
    pub cold: Start,
    /// The next start: the index comes from the cache ConfigMap the first one wrote.
    pub warm: Start,
    /// A start with that ConfigMap (and its shards) mounted, as the Deployment runs: the
    /// index comes from the files.
    pub mounted: Start,
    /// The form the mounted snapshot was stored in, and its files' bytes.
    pub mounted_form: String,
    pub mounted_bytes: usize,
}

pub struct Start {
    /// Spawn → /readyz.
    pub ready: Duration,
    /// Spawn → every watch stream has listed (`gar_restarter_watch_synced` = 1).
    pub synced: Duration,
    pub rss_mib: f64,
    /// VmRSS split: anonymous memory (heap, stacks) and file-backed (the binary's pages).
    pub anon_mib: f64,
    pub file_mib: f64,
    pub hwm_mib: f64,
    /// The daemon's own `heap_in_use_bytes` and `heap_free_bytes`, in MiB.
    pub heap_mib: f64,
    pub heap_free_mib: f64,
}

/// `workloads` Deployments (0 replicas, `images` containers each, a fixture's GAR paths)
/// created on a real control plane, then a daemon started with its watch on: how long until
/// it is ready and until the watch has listed them all, and its resident memory once it has.
pub async fn scale(binary: &Path, workloads: usize, images: usize) -> Result<Scale> {
    let emu = Emulator::start("scale", &["gcr", "dlq"], &[("gcr-sub", "gcr")]).await?;
    let api = KubeApi::start()
        .await
        .map_err(|e| anyhow::anyhow!("starting the control plane: {e}"))?;
    let objects: Vec<serde_json::Value> = (0..workloads)
        .map(|i| {
            let refs: Vec<String> = (0..images).map(|j| fixtures::image(i, j)).collect();
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            zero_replicas(deployment(
                &format!("team-{}", i % 20),
                &format!("svc-{i}"),
                &refs,
            ))
        })
        .collect();
    let created = Instant::now();
    let api = std::sync::Arc::new(api);
    let filler = api.clone();
    tokio::task::spawn_blocking(move || filler.insert_many(objects, 32)).await?;
    eprintln!(
        "scale: {workloads} Deployments created in {:.1?}",
        created.elapsed()
    );
    let tmp = tempfile::tempdir()?;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let spec = crate::util::daemon_spec(binary, &emu, tmp.path(), Vec::new())?;
    let cold = start_watched(&spec, workloads).await?;
    // A second start, as a deployed daemon restarts: the first wrote the index to the cache
    // ConfigMap, so this one is ready on it and its watch lists in the background.
    let warm = start_watched(
        &DaemonSpec {
            log: tmp.path().join("daemon-warm.log"),
            metrics_addr: free_addr()?,
            ..spec.clone()
        },
        workloads,
    )
    .await?;
    // A third start with the cache ConfigMap mounted, as the shipped Deployment has it (a
    // projected volume of the main ConfigMap and its shards): ready on the files.
    let (mounted_form, mounted_bytes) = mount_cache(&api, &spec.cache_dir)?;
    let log = tmp.path().join("daemon-mounted.log");
    let mounted = start_watched(
        &DaemonSpec {
            log: log.clone(),
            log_filter: "info".into(),
            metrics_addr: free_addr()?,
            ..spec
        },
        workloads,
    )
    .await?;
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    if !logged.contains("index loaded from the mount") {
        bail!("the mounted start did not load its index from the mount:\n{logged}");
    }
    Ok(Scale {
        workloads,
        refs: workloads * images,
        cold,
        warm,
        mounted,
        mounted_form,
        mounted_bytes,
    })
}

/// Writes the cache ConfigMap's keys, and its shards' if it is sharded, into `dir` as a
/// projected volume would: one file per key. Returns the form and the bytes written.
fn mount_cache(api: &KubeApi, dir: &Path) -> Result<(String, usize)> {
    let (ns, name) = gar_testsupport::daemon::CACHE_CONFIGMAP
        .split_once('/')
        .context("CACHE_CONFIGMAP is NAMESPACE/NAME")?;
    let mut files = api.configmap_files(ns, name);
    let form = if let Some(manifest) = files.get("cache-manifest.json") {
        let manifest: serde_json::Value = serde_json::from_slice(manifest)?;
        let shards = manifest["shards"]
            .as_u64()
            .context("the manifest names no shard count")?;
        for i in 0..shards {
            files.extend(api.configmap_files(ns, &format!("{name}-{i}")));
        }
        format!("sharded, {shards} shards")
    } else if files.contains_key("cache.json.gz") {
        "gzip".to_string()
    } else if files.contains_key("cache.json") {
        "plain".to_string()
    } else {
        bail!("the first starts wrote no cache ConfigMap {ns}/{name}");
    };
    std::fs::create_dir_all(dir)?;
    let mut bytes = 0;
    for (key, content) in &files {
        bytes += content.len();
        std::fs::write(dir.join(key), content)?;
    }
    Ok((form, bytes))
}

/// Spawns the daemon with its watch on and waits until it is ready and its watch has listed
/// `workloads` Deployments; then reads its memory and stops it.
async fn start_watched(spec: &DaemonSpec, workloads: usize) -> Result<Start> {
    let spawned = Instant::now();
    let mut daemon = Daemon::spawn(spec)?;
    let ready = daemon
        .wait_ready_polling(Duration::from_secs(300), Duration::from_millis(5))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while metrics::value(&daemon.metrics(), "gar_restarter_watch_synced") != 1.0 {
        if Instant::now() > deadline {
            bail!("the watch never listed:\n{}", daemon.log());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let synced = spawned.elapsed();
    // Let the start-up's transient buffers go and the cache ConfigMap be written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = daemon.id().context("the daemon has no pid")?;
    let status = |field| crate::bench::status_mb(pid, field);
    let (rss_mib, anon_mib, file_mib, hwm_mib) = (
        status("VmRSS:"),
        status("RssAnon:"),
        status("RssFile:"),
        status("VmHWM:"),
    );
    let scraped = daemon.metrics();
    let mib = |name| metrics::value(&scraped, name) / 1_048_576.0;
    let (heap_mib, heap_free_mib) = (
        mib("gar_restarter_heap_in_use_bytes"),
        mib("gar_restarter_heap_free_bytes"),
    );
    let listed = events_applied(&daemon);
    daemon
        .terminate(Duration::from_secs(10))
        .context("stopping the daemon")?;
    if listed.is_nan() || listed < workloads as f64 {
        bail!("the watch applied {listed} events for {workloads} Deployments");
    }
    Ok(Start {
        ready,
        synced,
        rss_mib,
        anon_mib,
        file_mib,
        hwm_mib,
        heap_mib,
        heap_free_mib,
    })
}
