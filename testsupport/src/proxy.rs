//! A fault-injecting, recording HTTP proxy in front of the real API server.
//!
//! The daemon under test talks plain HTTP to the proxy on loopback; the proxy forwards every
//! request over TLS to kube-apiserver (verified against the cluster's CA) and streams the
//! answer back, watches included. On the way it records each request
//! ([`RecordedRequest`]) and applies the [`Fault`] rules: an error `Status` with the real
//! API server's reasons (and `Retry-After`), added latency, or a dropped connection. So
//! faults come from the network path, as they do in production, and Kubernetes itself stays
//! real.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::traffic::{self, Fault, RecordedRequest, Recording, RequestLog};

type Body = BoxBody<Bytes, hyper::Error>;
type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("API proxy set-up failed: {0}")]
    Setup(String),
}

#[derive(Default)]
struct State {
    requests: RequestLog,
    faults: Vec<Fault>,
}

struct Shared {
    upstream: http::uri::Authority,
    client: HttpsClient,
    state: Mutex<State>,
}

/// A running proxy; stops when dropped.
pub struct ApiProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _shutdown: watch::Sender<bool>,
    /// Bumped by [`ApiProxy::cut_connections`]: every connection open then is closed.
    cuts: watch::Sender<u64>,
}

impl std::fmt::Debug for ApiProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .finish()
    }
}

impl ApiProxy {
    /// Starts a proxy on a free loopback port for `upstream` (`https://HOST:PORT`), whose
    /// certificate is verified against `ca_pem`.
    pub async fn start(upstream: &str, ca_pem: &str) -> Result<ApiProxy, ProxyError> {
        let uri: http::Uri = upstream
            .parse()
            .map_err(|e| ProxyError::Setup(format!("bad upstream {upstream}: {e}")))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| ProxyError::Setup(format!("upstream {upstream} has no host")))?;
        let mut roots = rustls::RootCertStore::empty();
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| ProxyError::Setup(format!("bad CA PEM: {e}")))?;
        roots
            .add(ca)
            .map_err(|e| ProxyError::Setup(format!("bad CA: {e}")))?;
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        // The proxy runs on a runtime of its own, on its own thread: a test may block its
        // own runtime (a synchronous wait for a subprocess that talks through the proxy)
        // and must not starve the proxy by doing so.
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| ProxyError::Setup(format!("cannot bind a loopback port: {e}")))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| ProxyError::Setup(e.to_string()))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| ProxyError::Setup(e.to_string()))?;
        let shared = Arc::new(Shared {
            upstream: authority,
            client,
            state: Mutex::new(State::default()),
        });
        let (tx, rx) = watch::channel(false);
        let (cuts, cut_rx) = watch::channel(0u64);
        let served = shared.clone();
        std::thread::Builder::new()
            .name("gar-api-proxy".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    serve(listener, served, rx, cut_rx).await;
                });
            })
            .map_err(|e| ProxyError::Setup(format!("cannot start the proxy thread: {e}")))?;
        Ok(ApiProxy {
            addr,
            shared,
            _shutdown: tx,
            cuts,
        })
    }

    /// `http://127.0.0.1:PORT`, the server for the daemon's kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a fault rule; rules are evaluated in insertion order.
    pub fn add_fault(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Closes every connection open now, open watches included, as an API server restart
    /// or a load balancer does; later connections are served as usual. The client sees its
    /// watches end mid-stream and must resume (or relist) on its own.
    pub fn cut_connections(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    cuts: watch::Receiver<u64>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        let mut cut = cuts.clone();
        cut.mark_unchanged();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { shared.handle(req).await }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
                _ = cut.changed() => {}
            }
        });
    }
}

/// Returned by the service to make hyper close the connection without an answer, which is
/// what a client sees when a load balancer or the network drops it.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by a fault rule")
    }
}

impl std::error::Error for Dropped {}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

fn status_response(code: u16, retry_after: Option<u64>, message: String) -> Response<Body> {
    let mut details = json!({});
    if let Some(secs) = retry_after {
        details["retryAfterSeconds"] = json!(secs);
    }
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message,
        "reason": traffic::reason_for(code), "details": details, "code": code,
    });
    let mut response = Response::new(full(status.to_string()));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = retry_after
        && let Ok(v) = http::HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    response
}

/// What kube-apiserver sends for a watch from a resourceVersion older than it keeps: a
/// successful response whose one event is a `410 Gone` error, then the end of the stream.
fn expired_watch() -> Response<Body> {
    let event = json!({
        "type": "ERROR",
        "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": "too old resource version (injected by the test proxy)",
        },
    });
    let mut response = Response::new(full(format!("{event}\n")));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(&self, request: Request<Incoming>) -> Result<Response<Body>, Dropped> {
        Ok(match self.forward(request).await {
            Some(response) => response,
            None => return Err(Dropped),
        })
    }

    /// `None`: drop the connection.
    async fn forward(&self, request: Request<Incoming>) -> Option<Response<Body>> {
        let received_at = Instant::now();
        let (mut parts, body) = request.into_parts();
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().map(str::to_owned);
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return Some(status_response(
                    400,
                    None,
                    format!("proxy: cannot read the body: {e}"),
                ));
            }
        };
        let recorded_body = (!body.is_empty()).then(|| {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        });
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let rolled = traffic::roll(&mut self.state().faults, &method, &target);
        if !rolled.latency.is_zero() {
            tokio::time::sleep(rolled.latency).await;
        }
        let record = |status: u16| RecordedRequest {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: recorded_body.clone(),
            status,
            received_at,
        };
        if rolled.drop_connection {
            self.state().requests.push(record(0));
            return None;
        }
        if rolled.expire_watch {
            self.state().requests.push(record(200));
            return Some(expired_watch());
        }
        if let Some((code, retry_after)) = rolled.status {
            self.state().requests.push(record(code));
            return Some(status_response(
                code,
                retry_after,
                format!("injected fault on {method} {path}"),
            ));
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let uri = http::Uri::builder()
            .scheme("https")
            .authority(self.upstream.clone())
            .path_and_query(path_and_query)
            .build();
        let Ok(uri) = uri else {
            return Some(status_response(
                400,
                None,
                format!("proxy: bad request URI {path}"),
            ));
        };
        parts.uri = uri;
        parts.headers.remove(http::header::HOST);
        let upstream = Request::from_parts(parts, Full::new(body));
        Some(match self.client.request(upstream).await {
            Ok(response) => {
                self.state()
                    .requests
                    .push(record(response.status().as_u16()));
                response.map(|b| b.boxed())
            }
            Err(e) => {
                self.state().requests.push(record(502));
                status_response(502, None, format!("proxy: upstream failed: {e}"))
            }
        })
    }
}

impl Recording for ApiProxy {
    fn with_log<R>(&self, f: impl FnOnce(&mut RequestLog) -> R) -> R {
        f(&mut self.state().requests)
    }
}
