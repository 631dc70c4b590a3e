//! The Kubernetes API a harness runs the daemon against: a real control plane of the test's
//! own (etcd, kube-apiserver, kube-controller-manager and a stand-in kubelet) behind the
//! recording fault proxy. Every integration test runs against it; the fake API server in
//! `testsupport` is left to the demo and the benchmarks (see the README's test section).

use std::sync::Arc;

use gar_testsupport::kube_api::KubeApi;

/// Shared so that a test can hand the API to a background task while it keeps asserting.
pub type TestApi = Arc<KubeApi>;
