//! The lookup chain against a real kube-apiserver (through the recording proxy): every test
//! asserts the exact API traffic.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use gar_restarter::config::ObjectName;
use gar_restarter::index::cache::codec::Limits;
use gar_restarter::index::cache::store::{Store, Written};
use gar_restarter::index::cache::{CacheChain, ChainConfig, Origin};
use gar_restarter::index::live::{Change, LiveView};
use gar_restarter::index::lookup::{Lookup, LookupSource};
use gar_restarter::index::object::{DaemonSets, Deployments, Kind, Object, StatefulSets};
use gar_restarter::index::table::{Index, Scope};
use gar_restarter::index::workload::{WorkloadKind, WorkloadRef};
use gar_restarter::ingest::image::ImageRef;
use gar_restarter::ops::metrics::Metrics;
use gar_testsupport::objects::{configmap, daemonset, deployment, statefulset};

const CM_NS: &str = "gar-restarter";
const CM_NAME: &str = "gar-restarter-cache";

fn cm_target() -> ObjectName {
    ObjectName {
        namespace: CM_NS.into(),
        name: CM_NAME.into(),
    }
}

/// A control plane of the test's own, with the daemon's RBAC from deploy/base.
async fn real_api() -> TestApi {
    init_crypto();
    gar_testsupport::kube_api::KubeApi::start()
        .await
        .unwrap_or_else(|e| panic!("start the test control plane: {e}"))
}

/// A client with the daemon's identity and kube's retries off, as the daemon builds it.
fn client(api: &TestApi) -> kube::Client {
    init_crypto();
    api.daemon_client()
}

fn chain(api: &TestApi, cache_dir: &std::path::Path, min_rebuild: Duration) -> CacheChain {
    CacheChain::new(
        client(api),
        ChainConfig {
            cache_dir: cache_dir.to_path_buf(),
            configmap: cm_target(),
            scope: Scope::default(),
            min_rebuild_interval: min_rebuild,
            refresh_interval: Duration::from_secs(3600),
            store_rebuilds: true,
        },
        Arc::new(Metrics::new()),
    )
}

fn index_json(entries: &[(&str, &str, &str)]) -> String {
    let mut images = serde_json::Map::new();
    for (image, ns, name) in entries {
        let list = images
            .entry(image.to_string())
            .or_insert_with(|| serde_json::json!([]));
        list.as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": name, "namespace": ns}));
    }
    serde_json::json!({ "images": images }).to_string()
}

/// A kubelet-style ConfigMap volume swap: new timestamped dir, `..data` renamed over.
fn kubelet_swap(dir: &std::path::Path, generation: u32, cache_json: &str) {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(dir).unwrap();
    let ts = format!("..2026_11_25_12_00_00.{generation:06}");
    std::fs::create_dir_all(dir.join(&ts)).unwrap();
    std::fs::write(dir.join(&ts).join("cache.json"), cache_json).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    let _ = std::fs::remove_file(dir.join("..data_tmp"));
    symlink(&ts, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if std::fs::symlink_metadata(dir.join("cache.json")).is_err() {
        symlink("..data/cache.json", dir.join("cache.json")).unwrap();
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
}

/// Requests other than the restart PATCHes and the Kubernetes Events about them (written in
/// the background, off the hot path).
fn non_patch_requests(requests: Vec<gar_testsupport::traffic::RecordedRequest>) -> Vec<String> {
    requests
        .into_iter()
        .filter(|r| r.method != "PATCH")
        .filter(|r| !(r.method == "POST" && r.path.starts_with("/apis/events.k8s.io/")))
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query.unwrap_or_default()))
        .collect()
}

#[tokio::test]
async fn missing_mount_costs_exactly_one_get() {
    let api = real_api().await;
    let json = index_json(&[(&gar("app:v1"), "prod", "api")]);
    api.insert(configmap(CM_NS, CM_NAME, &[("cache.json", &json)]));
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&api, &dir.path().join("absent"), Duration::from_secs(30));
    assert_eq!(chain.init().await.unwrap(), Origin::Api);
    let hits = chain
        .lookup(&ImageRef::parse(&gar("app:v1")).unwrap())
        .await
        .unwrap();
    assert_eq!(hits.workloads.len(), 1);
    assert_eq!(hits.source, LookupSource::Memory);
    assert_eq!(
        non_patch_requests(api.requests()),
        vec![format!(
            "GET /api/v1/namespaces/{CM_NS}/configmaps/{CM_NAME}?"
        )]
    );
}

/// Issue #14 item 2: a mounted `cache.json.gz` that is a gzip bomb (under 1 MB, expanding
/// past the decompression limit) is refused with a clear error; the index in use stays.
#[tokio::test]
async fn a_mounted_gzip_bomb_is_refused_and_the_old_index_kept() {
    use std::io::Write;
    let api = real_api().await;
    let dir = tempfile::tempdir().unwrap();
    let json = index_json(&[(&gar("app:v1"), "prod", "api")]);
    std::fs::write(dir.path().join("cache.json"), &json).unwrap();
    let chain = chain(&api, dir.path(), Duration::from_secs(30));
    assert_eq!(chain.init().await.unwrap(), Origin::Mount);

    let limit = gar_restarter::index::cache::codec::MAX_DECOMPRESSED_BYTES;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(br#"{"images":{},"pad":""#).unwrap();
    let zeros = vec![b'0'; 1 << 20];
    for _ in 0..=(limit >> 20) {
        enc.write_all(&zeros).unwrap();
    }
    let bomb = enc.finish().unwrap();
    assert!(bomb.len() < 1_000_000, "{} bytes", bomb.len());
    std::fs::remove_file(dir.path().join("cache.json")).unwrap();
    std::fs::write(dir.path().join("cache.json.gz"), &bomb).unwrap();

    match gar_restarter::index::cache::mount::load(dir.path()) {
        gar_restarter::index::cache::mount::MountState::Invalid(reason) => {
            assert!(reason.contains("gzip bomb"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!chain.reload_mount(), "a bomb does not provide an index");
    let hits = chain
        .lookup(&ImageRef::parse(&gar("app:v1")).unwrap())
        .await
        .unwrap();
    assert_eq!(hits.workloads.len(), 1, "the old index is still served");
    assert!(api.requests().is_empty(), "{:?}", api.requests());
}

#[tokio::test]
async fn missing_configmap_costs_list_pages_and_one_create() {
    let api = real_api().await;
    for i in 0..1_200 {
        let mut d = deployment(
            &format!("ns{}", i % 7),
            &format!("d{i}"),
            &[&gar(&format!("img{i}:v1"))],
        );
        // No pods: 1,200 rollouts would only load the 2-core CI machine.
        d["spec"]["replicas"] = serde_json::json!(0);
        api.insert(d);
    }
    api.insert(statefulset("data", "db", &["postgres:16"]));
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&api, dir.path(), Duration::from_secs(30));
    assert_eq!(chain.init().await.unwrap(), Origin::Rebuild);
    // The write happens in the background right after the swap.
    assert!(
        wait_until(Duration::from_secs(5), || api
            .get("configmaps", CM_NS, CM_NAME)
            .is_some())
        .await
    );
    let reqs = non_patch_requests(api.requests());
    let lists: Vec<&String> = reqs
        .iter()
        .filter(|r| r.starts_with("GET /apis/apps/v1/"))
        .collect();
    assert_eq!(
        lists.len(),
        3 + 1 + 1,
        "3 deployment pages, 1 statefulset, 1 daemonset: {reqs:#?}"
    );
    assert!(lists.iter().all(|r| r.contains("limit=500")), "{lists:?}");
    assert_eq!(
        reqs[0],
        format!("GET /api/v1/namespaces/{CM_NS}/configmaps/{CM_NAME}?")
    );
    let creates: Vec<&String> = reqs.iter().filter(|r| r.starts_with("POST")).collect();
    assert_eq!(creates.len(), 1, "{reqs:#?}");
    assert!(creates[0].contains("fieldManager=gar-restarter"));
    assert_eq!(
        reqs.len(),
        1 + 5 + 1,
        "GET, LIST pages, create — nothing else: {reqs:#?}"
    );
    // The stored index is complete and usable by the next replica.
    let stored = Store::new(client(&api), cm_target())
        .read()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.workload_count(), 1_201);
}

#[tokio::test]
async fn a_thousand_concurrent_misses_cost_one_list_sweep() {
    let api = real_api().await;
    api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    let json = index_json(&[(&gar("app:v1"), "prod", "api")]);
    api.insert(configmap(CM_NS, CM_NAME, &[("cache.json", &json)]));
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&api, dir.path(), Duration::from_secs(30));
    chain.init().await.unwrap();
    api.clear_requests();
    let started = Instant::now();
    let images: Vec<ImageRef> = (0..1_000)
        .map(|i| ImageRef::parse(&gar(&format!("unknown{i}:v1"))).unwrap())
        .collect();
    let results = futures::future::join_all(images.iter().map(|i| chain.lookup(i))).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|h| h.workloads.is_empty()))
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // A second burst inside --min-rebuild-interval costs nothing at all.
    let again = futures::future::join_all(images.iter().map(|i| chain.lookup(i))).await;
    assert!(
        again
            .iter()
            .all(|r| r.as_ref().is_ok_and(|h| h.source == LookupSource::Memory))
    );
    let lists = api.count("GET", "/apis/apps/v1/");
    assert_eq!(
        lists,
        3,
        "one sweep = one LIST per kind: {:#?}",
        non_patch_requests(api.requests())
    );
}

#[tokio::test]
async fn new_workload_for_a_known_image_is_found_by_the_refresh() {
    let api = real_api().await;
    api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&api, dir.path(), Duration::from_secs(30));
    chain.init().await.unwrap();
    let image = ImageRef::parse(&gar("app:v1")).unwrap();
    api.insert(deployment("prod", "worker", &[&gar("app:v1")]));
    // A hit never rescans, so the new workload is invisible until the next rebuild...
    assert_eq!(chain.lookup(&image).await.unwrap().workloads.len(), 1);
    chain.rebuild("periodic refresh").await.unwrap();
    assert_eq!(chain.lookup(&image).await.unwrap().workloads.len(), 2);
}

#[tokio::test]
async fn twenty_thousand_workloads_round_trip_through_configmaps() {
    let api = real_api().await;
    let entries = (0..20_000).map(|i| {
        let w = WorkloadRef::new(
            WorkloadKind::ALL[i % 3],
            &format!("team-{}", i % 50),
            &format!("svc-{i}"),
        );
        let img =
            ImageRef::parse(&format!("europe-docker.pkg.dev/p/r/svc-{i}:v{}", i % 5)).unwrap();
        (w, vec![img])
    });
    let index = Index::build(entries, Scope::default(), "2026-11-25T12:00:00Z".into());
    // Default limits: compressed into one ConfigMap.
    let store = Store::new(client(&api), cm_target());
    let (written, encoded) = store.write(&index).await.unwrap();
    assert_eq!(
        written,
        Written::Created(gar_restarter::index::cache::codec::Form::Gzip)
    );
    assert!(
        index.to_json().len() > 1_048_576,
        "plain JSON would not fit"
    );
    let back = Store::new(client(&api), cm_target())
        .read()
        .await
        .unwrap()
        .unwrap();
    assert!(back.same_content(&index));
    assert_eq!(back.workload_count(), 20_000);
    assert!(encoded.bytes < 1_000_000);
    let gzip_bytes = encoded.bytes;
    // The real API server refuses a ConfigMap over 1 MiB, which is why the index is
    // compressed and, past that, sharded.
    let too_big = "x".repeat(1_100_000);
    let admin = api.admin();
    let configmaps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(admin, CM_NS);
    let oversized: k8s_openapi::api::core::v1::ConfigMap =
        serde_json::from_value(configmap(CM_NS, "too-big", &[("cache.json", &too_big)])).unwrap();
    match configmaps
        .create(&kube::api::PostParams::default(), &oversized)
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains("1048576"), "{}", s.message);
        }
        other => panic!("a 1.1 MB ConfigMap must be refused, got {other:?}"),
    }
    // Forced small shards: the sharded form, written shards first, read back identically.
    // RBAC (deploy/base) allows the daemon exactly gar-restarter-cache and -0 … -7, so the
    // set replaces the gzip form under the same name, within 8 shards.
    api.remove("configmaps", CM_NS, CM_NAME)
        .expect("the gzip form");
    let limits = Limits {
        payload: 50_000,
        // About four shards of the compressed index.
        shard_raw: gzip_bytes / 4 + 1,
        max_shards: 8,
        ..Limits::default()
    };
    let store = Store::new(client(&api), cm_target()).with_limits(limits);
    let (_, encoded) = store.write(&index).await.unwrap();
    assert!(
        (2..=8).contains(&encoded.shards.len()),
        "{} shards",
        encoded.shards.len()
    );
    for i in 0..encoded.shards.len() {
        assert!(
            api.get("configmaps", CM_NS, &format!("{CM_NAME}-{i}"))
                .is_some()
        );
    }
    let back = Store::new(client(&api), cm_target())
        .read()
        .await
        .unwrap()
        .unwrap();
    assert!(back.same_content(&index));
}

#[tokio::test]
async fn racing_rebuilds_converge_through_409() {
    let api = real_api().await;
    let older = index_json(&[(&gar("app:v1"), "prod", "a")]);
    api.insert(configmap(CM_NS, CM_NAME, &[("cache.json", &older)]));
    let w = |n: &str| WorkloadRef::new(WorkloadKind::Deployment, "prod", n);
    let img = ImageRef::parse(&gar("app:v1")).unwrap();
    let at_t1 = Index::build(
        [(w("a"), vec![img.clone()]), (w("b"), vec![img.clone()])],
        Scope::default(),
        "2026-11-25T12:00:01Z".into(),
    );
    let at_t2 = Index::build(
        [(w("a"), vec![img.clone()]), (w("c"), vec![img.clone()])],
        Scope::default(),
        "2026-11-25T12:00:02Z".into(),
    );
    // Both replicas read the same resourceVersion, then both write.
    let replica1 = Store::new(client(&api), cm_target());
    let replica2 = Store::new(client(&api), cm_target());
    replica1.read().await.unwrap();
    replica2.read().await.unwrap();
    assert!(matches!(
        replica2.write(&at_t2).await.unwrap().0,
        Written::Replaced(_)
    ));
    // replica1's resourceVersion is stale: 409, re-read, and the newer index wins.
    assert_eq!(replica1.write(&at_t1).await.unwrap().0, Written::Superseded);
    let puts: Vec<u16> = api
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.status)
        .collect();
    assert_eq!(puts, vec![200, 409], "the 409 path was exercised");
    let stored = Store::new(client(&api), cm_target())
        .read()
        .await
        .unwrap()
        .unwrap();
    assert!(stored.same_content(&at_t2));
    // The other order: an older stored index is replaced after the conflict.
    let at_t3 = Index::build(
        [(w("d"), vec![img.clone()])],
        Scope::default(),
        "2026-11-25T12:00:03Z".into(),
    );
    let stale = Store::new(client(&api), cm_target());
    stale.read().await.unwrap();
    api.modify("configmaps", CM_NS, CM_NAME, |cm| {
        cm["metadata"]["labels"] = serde_json::json!({"touched": "yes"});
    });
    assert!(matches!(
        stale.write(&at_t3).await.unwrap().0,
        Written::Replaced(_)
    ));
    let stored = Store::new(client(&api), cm_target())
        .read()
        .await
        .unwrap()
        .unwrap();
    assert!(stored.same_content(&at_t3));
}

/// Daemon with a mounted index: no API call for the lookup, and a kubelet swap is picked up
/// live; a corrupt swap leaves the previous index in use. This is the snapshot path, so the
/// watch (which lists at start-up and then answers lookups itself) is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_index_is_served_and_swapped_live_without_api_calls() {
    let mut h = Harness::real().await;
    h.extra_args.push("--watch=false".into());
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    h.api
        .insert(deployment("prod", "worker", &[&gar("worker:v1")]));
    kubelet_swap(
        &h.cache_dir(),
        1,
        &index_json(&[(&gar("app:v1"), "prod", "api")]),
    );
    h.start_daemon().await;
    assert!(
        h.daemon_log().contains("index loaded from the mount"),
        "{}",
        h.daemon_log()
    );
    assert!(
        h.api.requests().is_empty(),
        "start-up from the mount makes no API call: {:?}",
        h.api.requests()
    );

    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(wait_until(Duration::from_secs(10), || h.api.patches().len() == 1).await);
    assert_eq!(
        non_patch_requests(h.api.requests()),
        Vec::<String>::new(),
        "a hit costs 0 API calls"
    );

    // kubelet swaps the volume: the new entry is served within 1 s, with no API call.
    let swapped_at = Instant::now();
    kubelet_swap(
        &h.cache_dir(),
        2,
        &index_json(&[
            (&gar("app:v1"), "prod", "api"),
            (&gar("worker:v1"), "prod", "worker"),
        ]),
    );
    assert!(
        wait_until(Duration::from_secs(1), || h
            .metric("gar_restarter_index_images")
            == 2.0)
        .await,
        "swap not served within 1 s"
    );
    let reload = swapped_at.elapsed();
    h.publish(&insert("worker:v1", HEX_B)).await;
    assert!(wait_until(Duration::from_secs(10), || h.api.patches().len() == 2).await);
    assert_eq!(non_patch_requests(h.api.requests()), Vec::<String>::new());
    eprintln!("kubelet swap served after {reload:?}");

    // A corrupt swap is refused; the previous index stays in use.
    kubelet_swap(&h.cache_dir(), 3, "{ this is not json");
    assert!(
        wait_until(Duration::from_secs(2), || h
            .metric("gar_restarter_index_load_failures_total")
            >= 1.0)
        .await,
        "{}",
        h.metrics()
    );
    assert_eq!(h.metric("gar_restarter_index_images"), 2.0);
    h.publish(&insert("worker:v1", HEX_A)).await;
    assert!(wait_until(Duration::from_secs(10), || h.api.patches().len() == 3).await);
    assert_eq!(non_patch_requests(h.api.requests()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_and_check_work_from_the_mount_with_the_api_unreachable() {
    let mut h = Harness::real().await;
    kubelet_swap(&h.cache_dir(), 1, &index_json(&[("nginx", "web", "front")]));
    // KUBECONFIG pointing at a closed port.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let kubeconfig = h.dir.path().join("closed-kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {closed}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gar-restarter"))
        .args([
            "check",
            "--image",
            "docker.io/library/nginx:latest",
            "--cache-dir",
        ])
        .arg(h.cache_dir())
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["source"], "mount");
    assert_eq!(report["image"], "docker.io/library/nginx:latest");
    assert_eq!(
        report["workloads"],
        serde_json::json!([{"kind": "Deployment", "namespace": "web", "name": "front"}])
    );

    // The daemon starts ready from the mount alone and serves a dry-run lookup.
    h.extra_env.push((
        "KUBECONFIG".into(),
        kubeconfig.to_string_lossy().into_owned(),
    ));
    h.extra_args.push("--dry-run".into());
    h.start_daemon().await;
    h.publish(r#"{"action":"INSERT","tag":"nginx:latest"}"#)
        .await;
    assert!(
        wait_until(Duration::from_secs(10), || h
            .daemon_log()
            .contains("dry run: would restart"))
        .await,
        "{}",
        h.daemon_log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || h
            .metric("gar_restarter_events_settled_total{outcome=\"ack\"}")
            == 1.0)
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulsets_and_daemonsets_are_restarted_and_opt_outs_are_not() {
    let mut h = Harness::real().await;
    h.api.insert(statefulset("data", "db", &[&gar("db:v3")]));
    h.api
        .insert(daemonset("kube-system", "agent", &[&gar("agent:v9")]));
    let mut opted_out = deployment("prod", "manual", &[&gar("db:v3")]);
    opted_out["metadata"]["annotations"] = serde_json::json!({"gar-restarter/enabled": "false"});
    h.api.insert(opted_out);
    h.start_daemon().await;
    h.api.clear_requests();
    h.publish(&insert("db:v3", HEX_A)).await;
    h.publish(&insert("agent:v9", HEX_B)).await;
    assert!(
        wait_until(Duration::from_secs(10), || accepted_patches(&h.api).len()
            == 2)
        .await,
        "{}",
        h.daemon_log()
    );
    let mut paths: Vec<String> = accepted_patches(&h.api)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        vec![
            "/apis/apps/v1/namespaces/data/statefulsets/db".to_string(),
            "/apis/apps/v1/namespaces/kube-system/daemonsets/agent".to_string(),
        ]
    );
    let db = h.api.get("statefulsets", "data", "db").unwrap();
    assert_eq!(
        restart_annotations(&db).1.as_deref(),
        Some(format!("sha256:{HEX_A}").as_str())
    );
    assert_eq!(
        restart_annotations(&h.deployment("prod", "manual")),
        (None, None)
    );
}

#[tokio::test]
async fn cache_rebuild_subcommand_writes_the_configmap_and_reports_counts() {
    let api = real_api().await;
    api.insert(deployment("prod", "api", &[&gar("app:v1"), "redis:7"]));
    api.insert(daemonset("ops", "agent", &[&gar("agent:v2")]));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_gar-restarter"))
            .args([
                "cache",
                "rebuild",
                "--cache-configmap",
                &format!("{CM_NS}/{CM_NAME}"),
            ])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["workloads"], 2);
    assert_eq!(report["refs"], 3);
    assert_eq!(report["form"], "plain");
    assert_eq!(report["result"], "created");
    assert!(report["bytes"].as_u64().unwrap() > 0);
    let stored = Store::new(client(&api), cm_target())
        .read()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.workload_count(), 2);
    assert!(stored.get(&ImageRef::parse("redis:7").unwrap()).is_some());
}

/// Issue #14 item 8: a slower writer with an older index writes no shard at all, so the
/// newer sharded set stays whole.
#[tokio::test]
async fn an_older_sharded_write_touches_no_shard_of_a_newer_set() {
    let api = real_api().await;
    let build = |n: usize, at: &str| {
        let entries = (0..n).map(|i| {
            (
                WorkloadRef::new(WorkloadKind::Deployment, "prod", &format!("svc-{i}")),
                vec![ImageRef::parse(&gar(&format!("img-{i}:v{n}"))).unwrap()],
            )
        });
        Index::build(entries, Scope::default(), at.to_string())
    };
    let limits = Limits {
        payload: 2_000,
        shard_raw: 1_500,
        max_shards: 64,
        ..Limits::default()
    };
    let newer = build(400, "2026-12-01T12:00:00Z");
    let older = build(300, "2026-12-01T11:00:00Z");
    let (written, encoded) = Store::new(client(&api), cm_target())
        .with_limits(limits)
        .write(&newer)
        .await
        .unwrap();
    assert!(matches!(written, Written::Created(_)), "{written:?}");
    assert!(encoded.shards.len() >= 2, "{} shards", encoded.shards.len());

    api.clear_requests();
    let (written, _) = Store::new(client(&api), cm_target())
        .with_limits(limits)
        .write(&older)
        .await
        .unwrap();
    assert_eq!(written, Written::Superseded);
    let writes: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    let stored = Store::new(client(&api), cm_target())
        .with_limits(limits)
        .read()
        .await
        .unwrap()
        .unwrap();
    assert!(stored.same_content(&newer));
}

/// Lists every workload on `api` into `view`, as the watch's (re)list does, stream by stream.
fn relist(api: &TestApi, view: &LiveView) {
    fn states<K: Kind>(api: &TestApi) -> Vec<Change> {
        api.list(K::KIND.plural())
            .into_iter()
            .filter_map(|o| serde_json::from_value::<Object<K>>(o).ok()?.into_state())
            .map(Change::Listed)
            .collect()
    }
    for stream in view.streams().to_vec() {
        let listed = match stream.kind {
            WorkloadKind::Deployment => states::<Deployments>(api),
            WorkloadKind::StatefulSet => states::<StatefulSets>(api),
            WorkloadKind::DaemonSet => states::<DaemonSets>(api),
        };
        view.apply(&stream, Change::ListStarted);
        for change in listed {
            view.apply(&stream, change);
        }
        view.apply(&stream, Change::ListDone);
    }
}

/// Once the live view is complete the chain holds no snapshot index (the view answers, and the
/// ConfigMap's snapshot is built from it when written). When the watch falls behind past
/// `--watch-sync-timeout`, what the view last knew answers; a miss still finds a workload
/// created meanwhile through one rebuild, and that index is let go again once the view has
/// caught up.
#[tokio::test]
async fn no_snapshot_index_is_held_while_the_live_view_is_complete() {
    let api = real_api().await;
    api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&api, dir.path(), Duration::ZERO);
    chain.init().await.unwrap();
    assert_eq!(chain.index().workload_count(), 1, "start-up: a scan");
    let scope = Scope::default();
    let live = Arc::new(LiveView::new(
        LiveView::streams_for(&scope),
        false,
        Duration::from_millis(100),
    ));
    let shutdown = tokio_util::sync::CancellationToken::new();
    chain.spawn_background(
        Some((live.clone(), Duration::from_secs(3600))),
        shutdown.clone(),
    );
    let v1 = ImageRef::parse(&gar("app:v1")).unwrap();

    relist(&api, &live);
    assert_eq!(answer(&chain, &v1).await, (LookupSource::Watch, 1));
    assert!(
        released(&chain).await,
        "the snapshot index is still held with the view complete"
    );

    // The watch falls behind (as after a failure) and stays behind.
    for stream in live.streams().to_vec() {
        live.degrade(&stream);
    }
    assert_eq!(
        answer(&chain, &v1).await,
        (LookupSource::LastKnown, 1),
        "after the wait, what the view last knew"
    );
    api.insert(deployment("prod", "new", &[&gar("app:v2")]));
    let v2 = ImageRef::parse(&gar("app:v2")).unwrap();
    let from = api.requests().len();
    assert_eq!(answer(&chain, &v2).await, (LookupSource::Rebuild, 1));
    assert_eq!(lists_since(&api, from), 3, "one rebuild: a LIST per kind");
    assert_eq!(chain.index().workload_count(), 2);

    // Caught up: the view answers again and the rebuild's index is let go.
    relist(&api, &live);
    assert_eq!(answer(&chain, &v2).await, (LookupSource::Watch, 1));
    assert!(
        released(&chain).await,
        "the rebuild's index is still held with the view complete again"
    );
    shutdown.cancel();
}

/// What answered a lookup of `image`, and how many workloads it found.
async fn answer(chain: &CacheChain, image: &ImageRef) -> (LookupSource, usize) {
    let hits = chain.lookup(image).await.unwrap();
    (hits.source, hits.workloads.len())
}

/// Whether the chain lets its snapshot index go within 5 s.
async fn released(chain: &CacheChain) -> bool {
    wait_until(Duration::from_secs(5), || {
        chain.index().workload_count() == 0
    })
    .await
}

fn lists_since(api: &TestApi, from: usize) -> usize {
    api.requests()[from..]
        .iter()
        .filter(|r| {
            r.method == "GET"
                && r.path.starts_with("/apis/apps/v1/")
                && !r.query.as_deref().unwrap_or("").contains("watch")
        })
        .count()
}
