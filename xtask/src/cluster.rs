//! `cargo xtask cluster`: the tests' real control plane in the foreground, for people.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use gar_testsupport::cluster::kubelet::Kubelet;
use gar_testsupport::cluster::rbac;
use gar_testsupport::cluster::{Cluster, KUBERNETES_VERSION};

/// A real Kubernetes control plane in the foreground, with the daemon's RBAC and kubeconfigs.
///
/// Starts etcd, kube-apiserver and kube-controller-manager (the tests' control plane, built
/// from the pinned Go modules on first use), applies the daemon's RBAC from deploy/, writes
/// an admin kubeconfig and one for the daemon's own service account, and runs until Ctrl-C.
/// A stand-in kubelet marks pods Ready, so rollouts finish.
#[derive(Debug, Parser)]
pub struct Args {
    /// Where to write the admin kubeconfig (system:masters).
    #[arg(long, default_value = "target/cluster/admin.kubeconfig")]
    kubeconfig: PathBuf,
    /// Where to write the kubeconfig of `gar-restarter/gar-restarter`, the identity the
    /// manifests give the daemon.
    #[arg(long, default_value = "target/cluster/gar-restarter.kubeconfig")]
    daemon_kubeconfig: PathBuf,
    /// The deploy/ overlay whose RBAC is applied (e.g. base, overlays/namespaced).
    #[arg(long, default_value = "base")]
    rbac: String,
}

pub fn run(args: Args) -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().context("starting a Tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    eprintln!(
        "starting Kubernetes {KUBERNETES_VERSION} (the first run builds it from the Go module proxy: about 10 min on 2 cores)..."
    );
    let cluster = tokio::task::spawn_blocking(Cluster::start).await??;
    for path in [&args.kubeconfig, &args.daemon_kubeconfig] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    std::fs::copy(cluster.admin_kubeconfig(), &args.kubeconfig)
        .with_context(|| format!("writing {}", args.kubeconfig.display()))?;
    rbac::install_daemon_identity(
        &cluster,
        &args.rbac,
        |grant| grant,
        &args.daemon_kubeconfig,
        None,
    )
    .await?;
    let _kubelet = Kubelet::start(&cluster, None)?;
    println!(
        "Kubernetes {KUBERNETES_VERSION} API server on {}",
        cluster.server()
    );
    println!("  admin kubeconfig   {}", args.kubeconfig.display());
    println!(
        "  daemon kubeconfig  {} (gar-restarter/gar-restarter, RBAC of deploy/{})",
        args.daemon_kubeconfig.display(),
        args.rbac
    );
    println!("  logs               {}", cluster.dir().display());
    println!("Ctrl-C stops it; all state is thrown away.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("stopping");
    drop(cluster);
    Ok(())
}
