//! The Kubernetes API a harness runs the daemon against: the real control plane (behind the
//! fault proxy) for everything Kubernetes decides, or the fake API server for the few tests
//! that need what only a fake can do (see the README's test section).

use std::path::Path;
use std::sync::Arc;

use gar_testsupport::fake_api::FakeApi;
use gar_testsupport::kube_api::KubeApi;
use gar_testsupport::traffic::{Fault, RecordedRequest};
use serde_json::Value;

#[derive(Clone)]
pub enum TestApi {
    Fake(FakeApi),
    Kube(Arc<KubeApi>),
}

macro_rules! delegate {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) $(-> $ret:ty)?;)*) => {
        $(pub fn $name(&self $(, $arg: $ty)*) $(-> $ret)? {
            match self {
                TestApi::Fake(api) => api.$name($($arg),*),
                TestApi::Kube(api) => api.$name($($arg),*),
            }
        })*
    };
}

impl TestApi {
    delegate! {
        fn insert(&self, obj: Value);
        fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value>;
        fn remove(&self, resource: &str, ns: &str, name: &str) -> Option<Value>;
        fn requests(&self) -> Vec<RecordedRequest>;
        fn clear_requests(&self);
        fn requests_matching(&self, method: &str, path_prefix: &str) -> Vec<RecordedRequest>;
        fn count(&self, method: &str, path_prefix: &str) -> usize;
        fn patches(&self) -> Vec<RecordedRequest>;
        fn add_fault(&self, fault: Fault);
        fn clear_faults(&self);
        fn url(&self) -> String;
        fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()>;
    }

    pub fn modify(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        match self {
            TestApi::Fake(api) => api.modify(resource, ns, name, f),
            TestApi::Kube(api) => api.modify(resource, ns, name, f),
        }
    }

    /// The real control plane; panics for a fake-backed harness.
    pub fn kube(&self) -> &KubeApi {
        match self {
            TestApi::Kube(api) => api,
            TestApi::Fake(_) => panic!("this harness runs against the fake API server"),
        }
    }

    /// The fake API server; panics for a real-backed harness.
    pub fn fake(&self) -> &FakeApi {
        match self {
            TestApi::Fake(api) => api,
            TestApi::Kube(_) => panic!("this harness runs against the real API server"),
        }
    }
}
