//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager of one release, built from the Go module proxy
//! ([`crate::gotool`]), on free loopback ports, with RBAC enforced.
//!
//! - **TLS**: kube-apiserver has served TLS only since 1.20 (the insecure port is gone), so
//!   a CA and a serving certificate for `127.0.0.1` are generated at start-up ([`pki`]) and
//!   every kubeconfig verifies against that CA.
//! - **Identities**: a static token file holds one admin (`system:masters`), used by the
//!   tests to set things up and by the controller-manager. The daemon gets a real
//!   service-account token from the TokenRequest API ([`Cluster::service_account_kubeconfig`]),
//!   so RBAC sees exactly the subject the manifests in `deploy/` bind.
//! - **Controllers**: deployment, replicaset, statefulset, daemonset, serviceaccount,
//!   garbagecollector and namespace, so that a restart really creates a ReplicaSet and a
//!   rollout really progresses. There is no kubelet and no scheduler: [`kubelet::Kubelet`]
//!   binds pods to a fake node and marks them Ready through the status subresource.
//! - **Lifetime**: each test owns its [`Cluster`]; dropping it stops the processes and
//!   removes its directory, and every process is killed when the test process exits, however
//!   it exits ([`process`]). (No `static` cluster: statics are never dropped, and each left
//!   its ~120 MB directory behind.)

pub mod kubeconfig;
pub mod kubelet;
pub mod pki;
pub mod process;
pub mod rbac;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use serde_json::Value;

use crate::gotool::{self, GoToolError};
use process::Process;

/// The Kubernetes release of `testsupport/kube/go.mod`, for messages and the README.
pub const KUBERNETES_VERSION: &str = "v1.34.4";
/// How long etcd and the API server get to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Build(#[from] GoToolError),
    #[error("test cluster set-up failed: {0}")]
    Setup(String),
    #[error("{name} did not become ready within {timeout:?}: {reason}\n--- {} (tail) ---\n{log_tail}", .log.display())]
    NotReady {
        name: &'static str,
        timeout: Duration,
        reason: String,
        log: PathBuf,
        log_tail: String,
    },
    #[error("kube API call failed: {context}: {error}")]
    Kube {
        context: String,
        #[source]
        error: kube::Error,
    },
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
}

/// A running control plane. Dropping it stops every process and removes its files.
#[derive(Debug)]
pub struct Cluster {
    // Dropped in declaration order, clients before servers: the controller manager, then
    // the API server, then etcd. The other way round each one would spend its SIGTERM grace
    // retrying a server that is already gone.
    controllers: Mutex<Process>,
    apiserver: Mutex<Process>,
    etcd: Mutex<Process>,
    apiserver_args: Vec<String>,
    server: String,
    admin_token: String,
    pki: pki::Pki,
    kubectl: PathBuf,
    admin_kubeconfig: PathBuf,
    // Last: the processes above stop before their directory goes.
    dir: tempfile::TempDir,
}

/// A free loopback port (bound and released; the caller binds it soon after).
pub fn free_port() -> Result<u16, ClusterError> {
    crate::daemon::free_addr()
        .map(|a| a.port())
        .map_err(|e| ClusterError::Setup(format!("no free loopback port: {e}")))
}

/// Runs a future to completion on a private runtime in a fresh thread, so that blocking
/// callers and callers inside another runtime can both use it.
pub(crate) fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(future))
    })
    .join()
    .unwrap_or_else(|_| panic!("block_on: the runtime thread panicked"))
    .unwrap_or_else(|e| panic!("block_on: cannot build a Tokio runtime: {e}"))
}

fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Cluster {
    /// Builds (if needed) and starts etcd, kube-apiserver and kube-controller-manager.
    pub fn start() -> Result<Cluster, ClusterError> {
        let started = Instant::now();
        let etcd_bin = gotool::ETCD.binary("etcd")?;
        let kube = gotool::KUBE.build()?;
        let dir = tempfile::Builder::new()
            .prefix("gar-cluster-")
            .tempdir()
            .map_err(|e| ClusterError::Setup(format!("cannot create a temp dir: {e}")))?;
        let pki = pki::generate(dir.path())?;
        let admin_token = random_token();
        let tokens = dir.path().join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{admin_token},admin,admin-uid,\"system:masters\"\n"),
        )
        .map_err(|e| ClusterError::Setup(format!("cannot write {}: {e}", tokens.display())))?;

        let (etcd, etcd_url) = on_free_ports(|| {
            let etcd_port = free_port()?;
            let etcd = start_etcd(&etcd_bin, dir.path(), etcd_port)?;
            Ok((etcd, format!("http://127.0.0.1:{etcd_port}")))
        })?;
        let (apiserver, server, apiserver_args) = on_free_ports(|| {
            let port = free_port()?;
            let server = format!("https://127.0.0.1:{port}");
            let args = apiserver_args(dir.path(), &pki, &tokens, &etcd_url, port);
            let mut apiserver = Process::spawn(
                "kube-apiserver",
                &kube.join("kube-apiserver"),
                &args,
                dir.path().join("kube-apiserver.log"),
            )?;
            wait_api_ready(&mut apiserver, &server, &pki.ca_pem, &admin_token)?;
            Ok((apiserver, server, args))
        })?;

        let admin_kubeconfig = dir.path().join("admin.kubeconfig");
        kubeconfig::write(
            &admin_kubeconfig,
            &server,
            &pki.ca_file,
            "admin",
            &admin_token,
        )?;
        let controllers = Process::spawn(
            "kube-controller-manager",
            &kube.join("kube-controller-manager"),
            &controller_args(&admin_kubeconfig, &pki),
            dir.path().join("kube-controller-manager.log"),
        )?;
        let cluster = Cluster {
            etcd: Mutex::new(etcd),
            apiserver: Mutex::new(apiserver),
            controllers: Mutex::new(controllers),
            apiserver_args,
            server,
            admin_token,
            pki,
            kubectl: kube.join("kubectl"),
            admin_kubeconfig,
            dir,
        };
        cluster.wait_controllers()?;
        eprintln!(
            "gar-testsupport: Kubernetes {KUBERNETES_VERSION} control plane on {} ready in {:.1?}",
            cluster.server,
            started.elapsed()
        );
        Ok(cluster)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The PEM of the CA the API server's certificate is signed by.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// The CA file kubeconfigs of this cluster point at.
    pub fn ca_file(&self) -> &Path {
        &self.pki.ca_file
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A kubeconfig for the admin (`system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The kubectl of the same release.
    pub fn kubectl(&self) -> &Path {
        &self.kubectl
    }

    /// The directory holding the cluster's files and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client with the admin identity.
    pub fn admin_client(&self) -> Result<kube::Client, ClusterError> {
        kubeconfig::client(&self.server, &self.pki.ca_pem, &self.admin_token)
    }

    /// Creates `namespace` (if missing).
    pub async fn create_namespace(&self, namespace: &str) -> Result<(), ClusterError> {
        let api: Api<Namespace> = Api::all(self.admin_client()?);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(error) => Err(ClusterError::Kube {
                context: format!("create namespace {namespace}"),
                error,
            }),
        }
    }

    /// Creates every namespace that one of `objects` lives in (if missing): applying a
    /// namespaced object, even as a dry run, needs its namespace to exist.
    pub async fn create_namespaces_of(&self, objects: &[Value]) -> Result<(), ClusterError> {
        let namespaces: std::collections::BTreeSet<&str> = objects
            .iter()
            .filter_map(|o| o.pointer("/metadata/namespace").and_then(Value::as_str))
            .collect();
        for ns in namespaces {
            self.create_namespace(ns).await?;
        }
        Ok(())
    }

    /// Creates the service account `namespace/name` (if missing), asks the TokenRequest
    /// API for a token of it, and writes a kubeconfig with that identity to `path`.
    /// `server` overrides the API server URL (e.g. a fault proxy in front of it).
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        path: &Path,
        server: Option<&str>,
    ) -> Result<String, ClusterError> {
        self.create_namespace(namespace).await?;
        let client = self.admin_client()?;
        let api: Api<ServiceAccount> = Api::namespaced(client, namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match api.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(error) => {
                return Err(ClusterError::Kube {
                    context: format!("create service account {namespace}/{name}"),
                    error,
                });
            }
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(6 * 3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let token: TokenRequest = api
            .create_subresource("token", name, &PostParams::default(), &request)
            .await
            .map_err(|error| ClusterError::Kube {
                context: format!("TokenRequest for {namespace}/{name}"),
                error,
            })?;
        let token = token.status.map(|s| s.token).ok_or_else(|| {
            ClusterError::Setup(format!(
                "TokenRequest for {namespace}/{name} returned no token"
            ))
        })?;
        let server = server.unwrap_or(&self.server);
        let user = format!("system:serviceaccount:{namespace}:{name}");
        kubeconfig::write(path, server, &self.pki.ca_file, &user, &token)?;
        Ok(token)
    }

    /// Stops kube-apiserver and starts it again on the same port and etcd (watches break,
    /// state survives), then waits until it is ready.
    pub fn restart_apiserver(&self) -> Result<Duration, ClusterError> {
        let started = Instant::now();
        let mut apiserver = self.apiserver.lock().unwrap_or_else(|e| e.into_inner());
        apiserver.stop(Duration::from_secs(10));
        let bin = gotool::KUBE.build()?.join("kube-apiserver");
        *apiserver = Process::spawn(
            "kube-apiserver",
            &bin,
            &self.apiserver_args,
            self.dir.path().join("kube-apiserver.log"),
        )?;
        wait_api_ready(
            &mut apiserver,
            &self.server,
            &self.pki.ca_pem,
            &self.admin_token,
        )?;
        Ok(started.elapsed())
    }

    /// The process ids of etcd, kube-apiserver and kube-controller-manager.
    pub fn pids(&self) -> Vec<u32> {
        [&self.etcd, &self.apiserver, &self.controllers]
            .iter()
            .filter_map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).id())
            .collect()
    }

    /// Waits until the controller-manager runs: its serviceaccount controller creates
    /// `default/default`.
    fn wait_controllers(&self) -> Result<(), ClusterError> {
        let (server, ca, token) = (
            self.server.clone(),
            self.pki.ca_pem.clone(),
            self.admin_token.clone(),
        );
        // The client is made inside the runtime that drives it (its buffer is a task there).
        let ok = block_on(async move {
            let Ok(client) = kubeconfig::client(&server, &ca, &token) else {
                return false;
            };
            let api: Api<ServiceAccount> = Api::namespaced(client, "default");
            let deadline = Instant::now() + START_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = api.get_opt("default").await {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        });
        if ok {
            return Ok(());
        }
        let controllers = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        Err(ClusterError::NotReady {
            name: "kube-controller-manager",
            timeout: START_TIMEOUT,
            reason: "default/default ServiceAccount never appeared".into(),
            log: controllers.log.clone(),
            log_tail: controllers.log_tail(4000),
        })
    }

    /// Runs kubectl of the same release with the admin kubeconfig; returns stdout.
    pub fn kubectl_output(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClusterError> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let command = format!("kubectl {}", args.join(" "));
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ClusterError::Command {
                command: command.clone(),
                output: e.to_string(),
            })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input).map_err(|e| ClusterError::Command {
                command: command.clone(),
                output: format!("cannot write stdin: {e}"),
            })?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| ClusterError::Command {
                command: command.clone(),
                output: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                command,
                output: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(out.stdout)
    }
}

/// Runs `start` again, on new ports, when what it started could not bind one: a port found
/// free is released before the server binds it, and in between a test's outgoing connection
/// may take it as its ephemeral port (it happened: etcd exited with "address already in use").
fn on_free_ports<T>(mut start: impl FnMut() -> Result<T, ClusterError>) -> Result<T, ClusterError> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        match start() {
            Err(e) if attempt < ATTEMPTS && e.to_string().contains("address already in use") => {
                eprintln!("gar-testsupport: a port was taken meanwhile, starting again: {e}");
                attempt += 1;
            }
            done => return done,
        }
    }
}

fn start_etcd(bin: &Path, dir: &Path, port: u16) -> Result<Process, ClusterError> {
    // What an attempt that could not bind its ports left (see `on_free_ports`).
    let _ = std::fs::remove_dir_all(dir.join("etcd"));
    // The peer port is bound but never used by a one-member cluster.
    let peer = free_port()?;
    let client_url = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let args = vec![
        "--name=test".to_owned(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=test={peer_url}"),
        // Test data is thrown away: no fsync, which is most of etcd's latency on a VM.
        "--unsafe-no-fsync".to_owned(),
        "--log-level=warn".to_owned(),
    ];
    let mut etcd = Process::spawn("etcd", bin, &args, dir.join("etcd.log"))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(r) = crate::http::get(addr, "/health")
            && r.status == 200
            && r.body.contains("true")
        {
            return Ok(etcd);
        }
        let reason = match etcd.exited() {
            Some(status) => format!("etcd exited: {status}"),
            None if Instant::now() >= deadline => "GET /health never answered 200".into(),
            None => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        return Err(ClusterError::NotReady {
            name: "etcd",
            timeout: START_TIMEOUT,
            reason,
            log: etcd.log.clone(),
            log_tail: etcd.log_tail(4000),
        });
    }
}

fn apiserver_args(
    dir: &Path,
    pki: &pki::Pki,
    tokens: &Path,
    etcd_url: &str,
    port: u16,
) -> Vec<String> {
    vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".to_owned(),
        "--advertise-address=127.0.0.1".to_owned(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", dir.join("certs").display()),
        format!("--tls-cert-file={}", pki.serving_cert.display()),
        format!("--tls-private-key-file={}", pki.serving_key.display()),
        format!("--client-ca-file={}", pki.ca_file.display()),
        format!("--token-auth-file={}", tokens.display()),
        "--authorization-mode=RBAC".to_owned(),
        "--anonymous-auth=false".to_owned(),
        "--service-account-issuer=https://kubernetes.default.svc".to_owned(),
        format!(
            "--service-account-key-file={}",
            pki.service_account_pub.display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            pki.service_account_key.display()
        ),
        "--service-cluster-ip-range=10.96.0.0/24".to_owned(),
        // Watches of one test must not be cut by the server's random 30-60 min timeout.
        "--min-request-timeout=1800".to_owned(),
        "--v=1".to_owned(),
    ]
}

fn controller_args(kubeconfig: &Path, pki: &pki::Pki) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--controllers=deployment,replicaset,statefulset,daemonset,serviceaccount,garbagecollector,namespace".to_owned(),
        "--leader-elect=false".to_owned(),
        "--use-service-account-credentials=false".to_owned(),
        format!("--root-ca-file={}", pki.ca_file.display()),
        // No serving port: several clusters may run at once, and nothing scrapes it.
        "--secure-port=0".to_owned(),
        "--v=1".to_owned(),
    ]
}

fn wait_api_ready(
    apiserver: &mut Process,
    server: &str,
    ca_pem: &str,
    token: &str,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let (server, ca, token) = (server.to_owned(), ca_pem.to_owned(), token.to_owned());
        let ready = block_on(async move {
            let probe = kubeconfig::client(&server, &ca, &token).map_err(|e| e.to_string())?;
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| e.to_string())?;
            probe.request_text(req).await.map_err(|e| e.to_string())
        });
        let reason = match (ready, apiserver.exited()) {
            (Ok(body), _) if body.trim() == "ok" => return Ok(()),
            (_, Some(status)) => format!("kube-apiserver exited: {status}"),
            (r, None) if Instant::now() >= deadline => format!("/readyz: {r:?}"),
            _ => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        return Err(ClusterError::NotReady {
            name: "kube-apiserver",
            timeout: START_TIMEOUT,
            reason,
            log: apiserver.log.clone(),
            log_tail: apiserver.log_tail(6000),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_that_lost_its_port_is_tried_again_on_new_ones() {
        let taken =
            || ClusterError::Setup("listen tcp 127.0.0.1:1: bind: address already in use".into());
        let mut calls = 0;
        let started = on_free_ports(|| {
            calls += 1;
            if calls < 3 { Err(taken()) } else { Ok(calls) }
        });
        assert_eq!(started.unwrap(), 3);

        let mut calls = 0;
        let failed: Result<(), _> = on_free_ports(|| {
            calls += 1;
            Err(taken())
        });
        assert!(failed.is_err());
        assert_eq!(calls, 3, "three attempts, then the error");

        let mut calls = 0;
        let other: Result<(), _> = on_free_ports(|| {
            calls += 1;
            Err(ClusterError::Setup("no such binary".into()))
        });
        assert!(other.is_err());
        assert_eq!(calls, 1, "any other failure is not retried");
    }
}
