//! The cluster scan: a paged LIST of every workload kind in scope, turned into an index.
//! Used at start-up when neither the mount nor the ConfigMap has an index, and as the
//! periodic safety net.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use crate::cluster::ClusterError;
use crate::index::table::{Index, Scope};
use crate::index::workload::{
    ENABLED_ANNOTATION, WorkloadKind, WorkloadRef, enabled, template_images,
};
use crate::ingest::image::ImageRef;

/// Page size for LISTs: big enough to keep round trips few, small enough for the API server.
pub const LIST_PAGE: u32 = 500;

/// Lists every workload in scope and indexes the images their pod templates run.
///
/// Workloads annotated `gar-restarter/enabled: "false"` are left out.
pub async fn scan(client: &Client, scope: &Scope) -> Result<Index, ClusterError> {
    let mut entries = Vec::new();
    scan_kind::<Deployment>(client, scope, WorkloadKind::Deployment, &mut entries, |d| {
        let spec = d.spec.as_ref();
        (
            spec.and_then(|s| s.template.spec.as_ref()),
            spec.and_then(|s| s.paused).unwrap_or(false),
        )
    })
    .await?;
    scan_kind::<StatefulSet>(
        client,
        scope,
        WorkloadKind::StatefulSet,
        &mut entries,
        |s| {
            (
                s.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
                false,
            )
        },
    )
    .await?;
    scan_kind::<DaemonSet>(client, scope, WorkloadKind::DaemonSet, &mut entries, |d| {
        (
            d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
            false,
        )
    })
    .await?;
    Ok(Index::build(
        entries,
        scope.clone(),
        crate::util::clock::now_rfc3339(),
    ))
}

async fn scan_kind<K>(
    client: &Client,
    scope: &Scope,
    kind: WorkloadKind,
    out: &mut Vec<(WorkloadRef, Vec<ImageRef>)>,
    template: impl Fn(&K) -> (Option<&PodSpec>, bool),
) -> Result<(), ClusterError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let apis: Vec<(Api<K>, String)> = if scope.namespaces.is_empty() {
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
            for item in &page.items {
                let meta: &ObjectMeta = item.meta();
                if !wanted(meta, scope.opt_in) {
                    continue;
                }
                let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref())
                else {
                    continue;
                };
                let (spec, paused) = template(item);
                let (images, invalid) = template_images(spec);
                for image in invalid {
                    tracing::warn!(workload = %format!("{kind} {ns}/{name}"), image, "skipping unparseable image reference");
                }
                if images.is_empty() {
                    continue;
                }
                let mut w = WorkloadRef::new(kind, ns, name);
                w.paused = paused;
                out.push((w, images));
            }
            match page.metadata.continue_.as_deref() {
                Some(token) if !token.is_empty() => lp = lp.continue_token(token),
                _ => break,
            }
        }
    }
    Ok(())
}

fn wanted(meta: &ObjectMeta, opt_in: bool) -> bool {
    let flag = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ENABLED_ANNOTATION));
    enabled(flag.map(String::as_str), opt_in)
}
