//! The certificates and keys a test control plane needs, generated at start-up.
//!
//! kube-apiserver 1.20+ has no insecure port: it serves TLS only. We make a throw-away CA
//! so that clients verify the server properly (no `insecure-skip-tls-verify`), a serving
//! certificate for `127.0.0.1` and `localhost`, and the key that signs service-account
//! tokens (the API server refuses to start without one).

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use super::ClusterError;

/// Paths of the generated files, and the CA in PEM for kubeconfigs.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_pem: String,
    pub ca_file: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub service_account_key: PathBuf,
    /// Its public half: `--service-account-key-file` wants a public key.
    pub service_account_pub: PathBuf,
}

fn tls(what: &'static str) -> impl FnOnce(rcgen::Error) -> ClusterError {
    move |e| ClusterError::Setup(format!("cannot generate the {what}: {e}"))
}

/// Writes a CA, a serving certificate signed by it and a service-account key into `dir`.
pub fn generate(dir: &Path) -> Result<Pki, ClusterError> {
    let ca_key = KeyPair::generate().map_err(tls("CA key"))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(tls("CA"))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "gar-restarter test CA");
    let ca_cert = ca.self_signed(&ca_key).map_err(tls("CA"))?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().map_err(tls("serving key"))?;
    // rcgen turns the strings that parse as IP addresses into IP SANs.
    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ])
    .map_err(tls("serving certificate"))?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let cert = serving
        .signed_by(&key, &issuer)
        .map_err(tls("serving certificate"))?;

    // ECDSA P-256: the API server signs tokens with ES256.
    let sa_key = KeyPair::generate().map_err(tls("service-account key"))?;

    let pki = Pki {
        ca_pem: ca_cert.pem(),
        ca_file: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        service_account_key: dir.join("sa.key"),
        service_account_pub: dir.join("sa.pub"),
    };
    for (path, pem) in [
        (&pki.ca_file, pki.ca_pem.clone()),
        (&pki.serving_cert, cert.pem()),
        (&pki.serving_key, key.serialize_pem()),
        (&pki.service_account_key, sa_key.serialize_pem()),
        (&pki.service_account_pub, sa_key.public_key_pem()),
    ] {
        fs::write(path, pem)
            .map_err(|e| ClusterError::Setup(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(pki)
}
