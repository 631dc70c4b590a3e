//! The test control plane itself: it starts, enforces RBAC, runs the workload controllers
//! (with the fake kubelet a Deployment rolls out) and leaves no process behind.

use std::time::{Duration, Instant};

use gar_testsupport::cluster::kubelet::Kubelet;
use gar_testsupport::cluster::{Cluster, kubeconfig};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

fn deployment(name: &str, image: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image}]},
            },
        },
    }))
    .expect("deployment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_control_plane_rolls_out_enforces_rbac_and_stops_cleanly() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("join")
        .expect("cluster");
    eprintln!("cluster up in {:?}", started.elapsed());
    let pids = cluster.pids();
    assert_eq!(
        pids.len(),
        3,
        "etcd, kube-apiserver, kube-controller-manager"
    );

    let ns = "smoke";
    cluster.create_namespace(ns).await.expect("namespace");
    let admin = cluster.admin_client().expect("client");
    let _kubelet = Kubelet::start(&cluster, Some(ns)).expect("kubelet");
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), ns);
    deployments
        .create(&PostParams::default(), &deployment("web", "example/web:v1"))
        .await
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let d = deployments.get("web").await.expect("get");
        let s = d.status.clone().unwrap_or_default();
        if s.available_replicas == Some(2) && s.updated_replicas == Some(2) {
            break s;
        }
        assert!(Instant::now() < deadline, "never rolled out: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.ready_replicas, Some(2));

    // A service account with no bindings is denied, with a real Status body.
    let path = cluster.dir().join("nobody.kubeconfig");
    let token = cluster
        .service_account_kubeconfig(ns, "nobody", &path, None)
        .await
        .expect("token");
    let nobody = kubeconfig::client(cluster.server(), cluster.ca_pem(), &token).expect("client");
    let err = Api::<ConfigMap>::namespaced(nobody, ns)
        .get("anything")
        .await
        .expect_err("RBAC must deny");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(
                s.message.contains("system:serviceaccount:smoke:nobody"),
                "{}",
                s.message
            );
        }
        other => panic!("expected a 403 Status, got {other}"),
    }

    drop(cluster);
    for pid in pids {
        // SAFETY: signal 0 only checks that the pid exists.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
        assert!(!alive, "process {pid} outlived the cluster");
    }
}
