//! Kubernetes API request metrics: a tower layer on the kube client that counts every request
//! in `gar_restarter_api_requests_total{verb,resource,code}`.
//!
//! It sits outside kube's own stack, so it sees the request path relative to the cluster URL
//! (`/apis/apps/v1/namespaces/prod/deployments/web`) and the final HTTP status, or `error`
//! when no response arrived (connection refused, timeout, TLS).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::ops::metrics::{ApiLabels, Metrics};

/// Installs [`ApiMetrics`] on a kube `ClientBuilder` with `.with_layer(&layer)`.
#[derive(Clone)]
pub struct ApiMetricsLayer {
    metrics: Arc<Metrics>,
}

impl ApiMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ApiMetricsLayer {
    type Service = ApiMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ApiMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> Service<Request<B>> for ApiMetrics<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (verb, resource) = classify(req.method(), req.uri().path(), req.uri().query());
        let metrics = self.metrics.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(res) => res.status().as_u16().to_string(),
                Err(_) => "error".to_string(),
            };
            metrics
                .api_requests
                .get_or_create(&ApiLabels {
                    verb: verb.to_string(),
                    resource,
                    code,
                })
                .inc();
            result
        })
    }
}

/// The kubectl/apiserver verb and the resource (plural, `/subresource` appended) of a request.
///
/// Paths that are not resources (`/version`, `/openapi/v2`, discovery of `/api` and `/apis`)
/// get resource `nonresource` (or `discovery`) so the label set stays small.
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> (&'static str, String) {
    let target = resource_path(path);
    let (resource, named, watch_path) = match &target {
        Some(t) => (t.resource(), t.name.is_some(), t.watch),
        None => (non_resource(path), true, false),
    };
    let watch_query = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch=True"))
    });
    let verb = match *method {
        Method::GET if watch_path || watch_query => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        Method::HEAD => "head",
        Method::OPTIONS => "options",
        _ => "other",
    };
    (verb, resource)
}

struct ResourcePath<'a> {
    resource: &'a str,
    name: Option<&'a str>,
    subresource: Option<&'a str>,
    watch: bool,
}

impl ResourcePath<'_> {
    fn resource(&self) -> String {
        match self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.to_string(),
        }
    }
}

/// Splits `/api/v1/[watch/][namespaces/NS/]RESOURCE[/NAME[/SUB]]` and the `/apis/GROUP/VERSION/…`
/// equivalent; `None` for everything that is not a resource.
fn resource_path(path: &str) -> Option<ResourcePath<'_>> {
    let mut segs = path.trim_matches('/').split('/').filter(|s| !s.is_empty());
    match segs.next()? {
        "api" => {
            segs.next()?; // version
        }
        "apis" => {
            segs.next()?; // group
            segs.next()?; // version
        }
        _ => return None,
    }
    let mut rest: Vec<&str> = segs.collect();
    let mut watch = false;
    if rest.first() == Some(&"watch") {
        watch = true;
        rest.remove(0);
    }
    // `namespaces/NS/RESOURCE…` is namespaced; `namespaces[/NS[/SUB]]` is the Namespace itself,
    // except `namespaces/NS/status` and `/finalize`, which are Namespace subresources.
    if rest.len() >= 3 && rest[0] == "namespaces" && !matches!(rest[2], "status" | "finalize") {
        rest.drain(..2);
    }
    let resource = *rest.first()?;
    Some(ResourcePath {
        resource,
        name: rest.get(1).copied(),
        subresource: rest.get(2).copied(),
        watch,
    })
}

fn non_resource(path: &str) -> String {
    let trimmed = path.trim_matches('/');
    match trimmed.split('/').next().unwrap_or("") {
        // `/api`, `/apis`, `/apis/apps`, `/apis/apps/v1`: API discovery.
        "api" | "apis" => "discovery".to_string(),
        _ => "nonresource".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: Method, path_and_query: &str) -> (&'static str, String) {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        classify(&method, path, query)
    }

    #[test]
    fn maps_paths_to_verb_and_resource() {
        let cases: &[(Method, &str, &str, &str)] = &[
            (
                Method::GET,
                "/apis/apps/v1/deployments?limit=500",
                "list",
                "deployments",
            ),
            (
                Method::GET,
                "/apis/apps/v1/namespaces/prod/deployments?limit=500&labelSelector=a%3Db",
                "list",
                "deployments",
            ),
            (
                Method::GET,
                "/apis/apps/v1/namespaces/prod/deployments/web",
                "get",
                "deployments",
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/prod/deployments/web?fieldManager=gar-restarter",
                "patch",
                "deployments",
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/prod/statefulsets/db",
                "patch",
                "statefulsets",
            ),
            (
                Method::GET,
                "/apis/apps/v1/namespaces/prod/daemonsets?watch=true&resourceVersion=7",
                "watch",
                "daemonsets",
            ),
            (
                Method::GET,
                "/api/v1/watch/namespaces/prod/configmaps",
                "watch",
                "configmaps",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/gar-restarter/configmaps/gar-restarter-cache",
                "get",
                "configmaps",
            ),
            (
                Method::POST,
                "/api/v1/namespaces/gar-restarter/configmaps",
                "create",
                "configmaps",
            ),
            (
                Method::PUT,
                "/api/v1/namespaces/gar-restarter/configmaps/gar-restarter-cache",
                "update",
                "configmaps",
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/gar-restarter/configmaps/x",
                "delete",
                "configmaps",
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/gar-restarter/configmaps",
                "deletecollection",
                "configmaps",
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/gar-restarter/leases/leader",
                "update",
                "leases",
            ),
            (
                Method::GET,
                "/apis/apps/v1/namespaces/prod/deployments/web/scale",
                "get",
                "deployments/scale",
            ),
            (Method::GET, "/api/v1/namespaces", "list", "namespaces"),
            (Method::GET, "/api/v1/namespaces/prod", "get", "namespaces"),
            (
                Method::PUT,
                "/api/v1/namespaces/prod/finalize",
                "update",
                "namespaces/finalize",
            ),
            (Method::GET, "/api/v1/nodes/n1", "get", "nodes"),
            (Method::GET, "/version", "get", "nonresource"),
            (Method::GET, "/apis/apps/v1", "get", "discovery"),
            (Method::GET, "/api", "get", "discovery"),
        ];
        for (method, path, verb, resource) in cases {
            assert_eq!(
                c(method.clone(), path),
                (*verb, resource.to_string()),
                "{method} {path}"
            );
        }
    }

    #[tokio::test]
    async fn counts_status_codes_and_transport_errors() {
        #[derive(Clone)]
        struct Fixed(Option<u16>);
        impl Service<Request<()>> for Fixed {
            type Response = Response<()>;
            type Error = &'static str;
            type Future = std::future::Ready<Result<Response<()>, &'static str>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<()>) -> Self::Future {
                std::future::ready(match self.0 {
                    Some(code) => Ok(Response::builder().status(code).body(()).unwrap()),
                    None => Err("connection refused"),
                })
            }
        }

        let metrics = Arc::new(Metrics::new());
        let layer = ApiMetricsLayer::new(metrics.clone());
        let req = |m: Method, p: &str| Request::builder().method(m).uri(p).body(()).unwrap();
        let mut ok = layer.layer(Fixed(Some(200)));
        let mut denied = layer.layer(Fixed(Some(403)));
        let mut down = layer.layer(Fixed(None));
        ok.call(req(
            Method::PATCH,
            "/apis/apps/v1/namespaces/a/deployments/b",
        ))
        .await
        .unwrap();
        ok.call(req(Method::GET, "/apis/apps/v1/deployments?limit=500"))
            .await
            .unwrap();
        denied
            .call(req(
                Method::PATCH,
                "/apis/apps/v1/namespaces/a/deployments/b",
            ))
            .await
            .unwrap();
        assert!(
            down.call(req(Method::GET, "/api/v1/namespaces/a/configmaps/c"))
                .await
                .is_err()
        );
        let text = metrics.encode();
        for line in [
            r#"gar_restarter_api_requests_total{verb="patch",resource="deployments",code="200"} 1"#,
            r#"gar_restarter_api_requests_total{verb="list",resource="deployments",code="200"} 1"#,
            r#"gar_restarter_api_requests_total{verb="patch",resource="deployments",code="403"} 1"#,
            r#"gar_restarter_api_requests_total{verb="get",resource="configmaps",code="error"} 1"#,
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }
}
