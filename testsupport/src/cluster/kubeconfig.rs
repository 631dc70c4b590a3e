//! Kubeconfig files and clients for the test control plane's identities.

use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::ClusterError;

/// Writes a kubeconfig whose only context talks to `server` as `user` with a bearer
/// token, verifying the server against the CA in `ca_file`.
pub fn write(
    path: &Path,
    server: &str,
    ca_file: &Path,
    user: &str,
    token: &str,
) -> Result<(), ClusterError> {
    // JSON is YAML, and serde_json quotes every value correctly.
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": server,
            "certificate-authority": ca_file,
        }}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
        "current-context": "test",
    });
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| ClusterError::Setup(format!("cannot encode a kubeconfig: {e}")))?;
    std::fs::write(path, text)
        .map_err(|e| ClusterError::Setup(format!("cannot write {}: {e}", path.display())))
}

/// A kube client for `server`, verifying it against `ca_pem`, with a bearer token. kube's
/// own retries are off, as in the daemon: tests see each answer as it is.
pub fn client(server: &str, ca_pem: &str, token: &str) -> Result<kube::Client, ClusterError> {
    let url = server
        .parse()
        .map_err(|e| ClusterError::Setup(format!("bad API server URL {server}: {e}")))?;
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| ClusterError::Setup(format!("bad CA PEM: {e}")))?;
    let mut config = kube::Config::new(url);
    config.root_cert = Some(vec![ca.to_vec()]);
    config.auth_info.token = Some(token.to_owned().into());
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|error| ClusterError::Kube {
        context: format!("client for {server}"),
        error,
    })
}
