//! `check` and `cache rebuild`: one-shot uses of the lookup chain.

use std::sync::Arc;

use serde::Serialize;

use crate::config::{CheckArgs, RebuildArgs};
use crate::index::cache::store::Written;
use crate::index::cache::{CacheChain, ChainError, Origin};
use crate::index::workload::WorkloadRef;
use crate::ingest::image::{ImageRef, ImageRefError};
use crate::ops::metrics::Metrics;

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub image: String,
    /// Where the index came from: mount, api or rebuild.
    pub source: &'static str,
    pub workloads: Vec<CheckedWorkload>,
}

/// `kind` is always spelled out here, unlike in `cache.json` where it defaults.
#[derive(Debug, Serialize)]
pub struct CheckedWorkload {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl From<&WorkloadRef> for CheckedWorkload {
    fn from(w: &WorkloadRef) -> Self {
        Self {
            kind: w.kind.as_str(),
            namespace: w.namespace.to_string(),
            name: w.name.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("--image: {0}")]
    Image(#[from] ImageRefError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A usage error found once the command knows what it will do (exit code 2).
    #[error("{0}")]
    Usage(String),
}

impl CheckError {
    /// Whether the user's input is at fault (exit 2) rather than the cluster (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, CheckError::Image(_) | CheckError::Usage(_))
    }
}

/// Mount → API → rebuild, exactly as the daemon starts; `--rebuild` forces the last step.
/// A lookup here never triggers a rebuild by itself, so a mounted index needs no API at all.
pub async fn check(args: &CheckArgs) -> Result<CheckReport, CheckError> {
    let image = ImageRef::parse(&args.image)?;
    let mut config = args.scope.chain_config();
    // Without --rebuild, `check` only reads: a start-up rebuild answers but is not stored.
    config.store_rebuilds = false;
    if args.rebuild {
        // `--rebuild` writes the ConfigMap too: resolved before any API call, so that an
        // off-cluster run without --cache-configmap stops instead of writing to `default`.
        config.configmap = args
            .scope
            .cache_configmap_for_write()
            .map_err(CheckError::Usage)?;
    }
    // Without --rebuild the mount may answer alone, so a missing kubeconfig is only an error
    // once the API is needed (issue #14 item 9).
    let client = if args.rebuild {
        crate::cluster::client().await?
    } else {
        crate::cluster::client_or_unconfigured().await
    };
    let chain = CacheChain::new(client, config, Arc::new(Metrics::new()));
    let origin = if args.rebuild {
        chain.rebuild_and_store().await?;
        Origin::Rebuild
    } else {
        chain.init().await?
    };
    let index = chain.index();
    let workloads = index
        .get(&image)
        .map(|w| w.iter().map(CheckedWorkload::from).collect())
        .unwrap_or_default();
    Ok(CheckReport {
        image: image.to_string(),
        source: origin.as_str(),
        workloads,
    })
}

#[derive(Debug, Serialize)]
pub struct RebuildReport {
    pub workloads: usize,
    pub refs: usize,
    pub bytes: usize,
    pub form: &'static str,
    pub result: &'static str,
    pub configmap: String,
}

pub async fn cache_rebuild(args: &RebuildArgs) -> Result<RebuildReport, CheckError> {
    let mut config = args.scope.chain_config();
    config.configmap = args
        .scope
        .cache_configmap_for_write()
        .map_err(CheckError::Usage)?;
    let client = crate::cluster::client().await?;
    let configmap = config.configmap.to_string();
    let chain = CacheChain::new(client, config, Arc::new(Metrics::new()));
    let (written, encoded) = chain.rebuild_and_store().await?;
    let index = chain.index();
    Ok(RebuildReport {
        workloads: index.workload_count(),
        refs: index.image_count(),
        bytes: encoded.bytes,
        form: encoded.form.as_str(),
        result: match written {
            Written::Created(_) => "created",
            Written::Replaced(_) => "replaced",
            Written::Superseded => "superseded",
            Written::Unchanged => "unchanged",
        },
        configmap,
    })
}
