//! The cluster scan: a paged LIST of every workload kind in scope, turned into an index.
//! Used at start-up when neither the mount nor the ConfigMap has an index, and as the
//! periodic safety net.

use kube::Client;
use kube::api::{Api, ListParams};

use crate::cluster::ClusterError;
use crate::index::object::{DaemonSets, Deployments, Kind, Object, StatefulSets};
use crate::index::table::{Index, Scope};
use crate::index::workload::{WorkloadRef, WorkloadState};
use crate::ingest::image::ImageRef;

/// Page size for LISTs: big enough to keep round trips few, small enough for the API server.
pub const LIST_PAGE: u32 = 500;

/// Lists every workload in scope and indexes the images their pod templates run.
///
/// Workloads annotated `gar-restarter/enabled: "false"` are left out.
pub async fn scan(client: &Client, scope: &Scope) -> Result<Index, ClusterError> {
    let mut entries = Vec::new();
    scan_kind::<Deployments>(client, scope, &mut entries).await?;
    scan_kind::<StatefulSets>(client, scope, &mut entries).await?;
    scan_kind::<DaemonSets>(client, scope, &mut entries).await?;
    Ok(Index::build(
        entries,
        scope.clone(),
        crate::util::clock::now_rfc3339(),
    ))
}

/// Lists one kind page by page, decoded into [`Object`]s (only the fields the index needs),
/// the same way the watch decodes them, so that both index a pod template alike.
async fn scan_kind<K: Kind>(
    client: &Client,
    scope: &Scope,
    out: &mut Vec<(WorkloadRef, Vec<Box<str>>)>,
) -> Result<(), ClusterError> {
    let kind = K::KIND;
    let apis: Vec<(Api<Object<K>>, String)> = if scope.namespaces.is_empty() {
        vec![(Api::all(client.clone()), String::new())]
    } else {
        scope
            .namespaces
            .iter()
            .map(|ns| {
                (
                    Api::namespaced(client.clone(), ns),
                    format!(" in namespace {ns}"),
                )
            })
            .collect()
    };
    for (api, where_) in apis {
        let mut lp = ListParams::default().limit(LIST_PAGE);
        if let Some(sel) = &scope.selector {
            lp = lp.labels(sel);
        }
        loop {
            let page = api.list(&lp).await.map_err(|source| ClusterError::List {
                resource: kind.plural(),
                scope: where_.clone(),
                source,
            })?;
            let next = page.metadata.continue_.filter(|t| !t.is_empty());
            for state in page.items.into_iter().filter_map(Object::into_state) {
                if let Some(entry) = entry(state, scope.opt_in) {
                    out.push(entry);
                }
            }
            match next {
                Some(token) => lp = lp.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(())
}

/// The index entry of an enabled workload that runs at least one tag; unparseable images
/// are logged and left out.
fn entry(state: WorkloadState, opt_in: bool) -> Option<(WorkloadRef, Vec<Box<str>>)> {
    if !state.enabled(opt_in) {
        return None;
    }
    for c in state.containers.iter() {
        if let Some(image) = c.unindexed()
            && ImageRef::parse(image).is_err()
        {
            tracing::warn!(workload = %state.workload, container = %c.container, image, "skipping unparseable image reference");
        }
    }
    let images: Vec<Box<str>> = state.images().into_iter().map(Box::from).collect();
    (!images.is_empty()).then_some((state.workload, images))
}
