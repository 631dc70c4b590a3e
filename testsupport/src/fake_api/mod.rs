//! A fake Kubernetes API server for tests.
//!
//! It speaks enough of the real API's REST protocol (paths, verbs, `Status` error bodies,
//! resource versions, paging, label selectors, merge/strategic-merge/JSON patches) that an
//! unmodified `kube` client can talk to it, while letting tests seed objects, inspect every
//! request that was made and inject failures or latency on chosen routes.
//!
//! Objects are stored as plain [`serde_json::Value`]s so tests never have to agree with the
//! server on a typed schema. Behaviour deliberately mirrors the real API server where it is
//! cheap to do so:
//!
//! * every write that changes an object bumps the global `resourceVersion`; a write that leaves
//!   the object byte-for-byte identical is a no-op and keeps it (as etcd-backed storage does);
//! * `metadata.generation` is bumped only when `spec` changes (apps resources only);
//! * writes to the main resource of a type with a `status` subresource cannot change `status`;
//! * a `resourceVersion` in a PUT body, or left in the result of a PATCH, is an optimistic
//!   concurrency precondition and yields `409 Conflict` when stale.
//!
//! Known simplifications: no watch (returns 405), no admission/validation beyond names,
//! server-side apply is approximated by a strategic merge (creating the object if absent),
//! `fieldSelector` only understands `metadata.name` and `metadata.namespace`.
//!
//! Here are the server and the test-facing [`FakeApi`]. A request goes `routing` (what the
//! path addresses) → `store` (the API semantics, with `selectors`, `patch` and
//! `validation`) or `discovery` → `reply`; `resources` lists the types served and
//! `object` holds the helpers on JSON objects.

mod discovery;
mod object;
mod patch;
mod reply;
mod resources;
mod routing;
mod selectors;
mod store;
mod validation;

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use object::{metadata_mut, str_at};
use reply::ApiError;
use resources::{resource_by_kind, resource_for_name_or_panic};
use store::{State, key};

pub use crate::objects::{
    RESTARTED_AT_ANNOTATION, configmap, daemonset, deployment, restarted_at, statefulset,
};
use crate::traffic::RequestLog;
pub use crate::traffic::{Fault, RecordedRequest, Recording};

/// State shared between the handle and the server tasks.
struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("FakeApi state mutex poisoned")
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let received_at = Instant::now();
        let (parts, body) = request.into_parts();
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().map(str::to_owned);
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (body, read_error) = match body.collect().await {
            Ok(collected) => (collected.to_bytes(), None),
            Err(e) => (Bytes::new(), Some(e)),
        };
        let recorded_body = if body.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())),
            )
        };

        let faults = self.lock().roll_faults(&method, &path);
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }

        let mut state = self.lock();
        let reply = match (faults.error, read_error) {
            (Some(err), _) => err.into(),
            (None, Some(e)) => {
                ApiError::bad_request(format!("failed to read request body: {e}")).into()
            }
            (None, None) => state.dispatch(
                self.addr,
                &method,
                &path,
                query.as_deref(),
                content_type.as_deref(),
                &body,
            ),
        };
        state.requests.push(RecordedRequest {
            method,
            path,
            query,
            content_type,
            body: recorded_body,
            status: reply.status,
            received_at,
        });
        drop(state);
        reply.into_response()
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            // Resolves on `stop()` and when the last `FakeApi` handle is dropped.
            _ = shutdown.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, shared.clone(), shutdown.clone()));
            }
            // Transient accept errors (e.g. EMFILE); back off briefly instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Without this every small response waits on Nagle + delayed ACK (~40 ms per request).
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(shared.handle(request).await) }
    });
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        // Client-side I/O errors are of no interest to a fake server.
        _ = connection => {}
        _ = shutdown.wait_for(|stopped| *stopped) => {}
    }
}

/// Owns the shutdown signal; dropping the last handle stops the server.
struct Handle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// A fake Kubernetes API server listening on a local port.
///
/// Cheap to clone (all clones share one server); the server stops on [`FakeApi::stop`] or when
/// the last clone is dropped. All methods are synchronous and safe to call from any thread.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApi")
            .field("addr", &self.inner.shared.addr)
            .finish_non_exhaustive()
    }
}

impl FakeApi {
    /// Starts a server on an ephemeral port of 127.0.0.1. Must be called inside a Tokio runtime.
    pub async fn start() -> io::Result<FakeApi> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts a server on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> io::Result<FakeApi> {
        let listener = TcpListener::bind(addr).await?;
        let shared = Arc::new(Shared {
            addr: listener.local_addr()?,
            state: Mutex::new(State::default()),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(serve(listener, shared.clone(), shutdown_rx));
        Ok(FakeApi {
            inner: Arc::new(Handle { shared, shutdown }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.shared.lock()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.shared.addr
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, no credentials, namespace
    /// `default`), for code that loads its client config from `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        let kubeconfig = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             users:\n\
             - name: fake\n  user: {{}}\n\
             preferences: {{}}\n",
            url = self.url()
        );
        std::fs::write(path, kubeconfig)
    }

    /// Seeds (or overwrites) an object of any supported kind, bypassing the HTTP layer.
    ///
    /// `kind` and `metadata.name` are required, `metadata.namespace` defaults to `default` for
    /// namespaced kinds. Sets a fresh `resourceVersion`, and `uid`, `creationTimestamp` and
    /// (for apps kinds) `generation: 1` unless present. `status` is kept as given.
    ///
    /// # Panics
    /// On an unsupported `kind`/`apiVersion` or a missing name: it is a bug in the test.
    pub fn insert(&self, obj: Value) {
        let kind = str_at(&obj, "/kind")
            .unwrap_or_else(|| panic!("FakeApi::insert: object has no kind: {obj}"));
        let rt = resource_by_kind(kind, str_at(&obj, "/apiVersion"))
            .unwrap_or_else(|| panic!("FakeApi::insert: unsupported kind {kind:?}"));
        let name = str_at(&obj, "/metadata/name")
            .unwrap_or_else(|| panic!("FakeApi::insert: object has no metadata.name: {obj}"))
            .to_owned();
        let namespace = if rt.namespaced {
            str_at(&obj, "/metadata/namespace")
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let mut obj = obj;
        let mut state = self.state();
        state.stamp_new(rt, &mut obj, &namespace, &name, true);
        state.objects.insert(key(rt, Some(&namespace), &name), obj);
    }

    /// The stored object, if any. `resource` is the plural (`deployments`), singular or kind;
    /// `ns` is ignored for cluster-scoped resources.
    ///
    /// # Panics
    /// On an unsupported resource name.
    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let rt = resource_for_name_or_panic(resource);
        self.state().objects.get(&key(rt, Some(ns), name)).cloned()
    }

    /// All stored objects of a resource, sorted by (namespace, name).
    pub fn list_objects(&self, resource: &str) -> Vec<Value> {
        let rt = resource_for_name_or_panic(resource);
        self.state()
            .objects_of(rt)
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// Deletes an object out of band; returns it if it existed.
    pub fn remove(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let rt = resource_for_name_or_panic(resource);
        self.state().objects.remove(&key(rt, Some(ns), name))
    }

    /// Mutates a stored object out of band, as another controller would: bumps its
    /// `resourceVersion` (and `generation` if `spec` changed). Returns the new object, or
    /// `None` if it does not exist. Handy to make a client's cached copy stale.
    pub fn modify(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let rt = resource_for_name_or_panic(resource);
        let mut state = self.state();
        let key = key(rt, Some(ns), name);
        let old = state.objects.get(&key)?.clone();
        let mut new = old.clone();
        f(&mut new);
        let spec_changed = old.get("spec") != new.get("spec");
        let resource_version = state.next_resource_version();
        let meta = metadata_mut(&mut new);
        meta.insert("resourceVersion".into(), json!(resource_version));
        if rt.tracks_generation && spec_changed {
            let generation = meta.get("generation").and_then(Value::as_u64).unwrap_or(0);
            meta.insert("generation".into(), json!(generation + 1));
        }
        state.objects.insert(key, new.clone());
        Some(new)
    }

    /// The last resourceVersion handed out (what a list would report).
    pub fn resource_version(&self) -> u64 {
        self.state().resource_version
    }

    /// Adds a fault rule; rules are evaluated in insertion order (see [`Fault`]).
    pub fn add_fault(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Stops accepting connections and closes open ones. Stored state stays inspectable.
    pub fn stop(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

impl Recording for FakeApi {
    fn with_log<R>(&self, f: impl FnOnce(&mut RequestLog) -> R) -> R {
        f(&mut self.state().requests)
    }
}

#[cfg(test)]
mod tests;
