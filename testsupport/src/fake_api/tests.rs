//! The fake API server end to end: requests over TCP, as a client sends them.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// A response read off the wire by [`send`].
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Minimal HTTP/1.1 client: one request per connection, `Connection: close`, so the
/// response is simply everything until EOF.
async fn send(
    api: &FakeApi,
    method: &str,
    target: &str,
    content_type: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        api.addr(),
        body.len()
    );
    if let Some(ct) = content_type {
        request.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    let mut stream = TcpStream::connect(api.addr()).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    Resp {
        status,
        headers,
        body,
    }
}

/// A request with a JSON body.
async fn send_json(api: &FakeApi, method: &str, target: &str, body: &Value) -> Resp {
    send(api, method, target, Some("application/json"), Some(body)).await
}

async fn get(api: &FakeApi, target: &str) -> Resp {
    send(api, "GET", target, None, None).await
}

const SMP: &str = "application/strategic-merge-patch+json";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const DEPLOY: &str = "/apis/apps/v1/namespaces/prod/deployments/web";

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["metadata"]["namespace"].as_str().unwrap(),
                i["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn lists_across_pages_with_exact_query_recorded() {
    let api = FakeApi::start().await.unwrap();
    for (ns, name) in [("b", "x"), ("a", "z"), ("a", "y"), ("c", "w"), ("b", "a")] {
        api.insert(deployment(ns, name, &["img:1"]));
    }
    api.insert(statefulset("a", "not-a-deployment", &["img:1"]));

    let mut seen = Vec::new();
    let mut target = "/apis/apps/v1/deployments?&limit=2".to_owned();
    let mut pages = 0;
    loop {
        let resp = get(&api, &target).await;
        assert_eq!(resp.status, 200, "{:?}", resp.body);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(resp.body["kind"], "DeploymentList");
        assert_eq!(resp.body["apiVersion"], "apps/v1");
        assert_eq!(resp.body["metadata"]["resourceVersion"], "6");
        for item in resp.body["items"].as_array().unwrap() {
            assert_eq!(item["kind"], "Deployment");
            assert_eq!(item["apiVersion"], "apps/v1");
        }
        seen.extend(names(&resp.body));
        pages += 1;
        match resp.body["metadata"]["continue"]
            .as_str()
            .filter(|c| !c.is_empty())
        {
            Some(token) => target = format!("/apis/apps/v1/deployments?&limit=2&continue={token}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["a/y", "a/z", "b/a", "b/x", "c/w"]);

    let requests = api.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].path, "/apis/apps/v1/deployments");
    assert_eq!(requests[0].query.as_deref(), Some("&limit=2"));
    assert!(
        requests[1]
            .query
            .as_deref()
            .unwrap()
            .starts_with("&limit=2&continue=")
    );
    assert_eq!(requests[0].body, None);
    assert_eq!(requests[0].status, 200);
    assert_eq!(requests[1].query_param("limit").as_deref(), Some("2"));
    assert_eq!(api.count("GET", "/apis/apps/v1/deployments"), 3);
    assert_eq!(api.count("get", "/apis/apps/v1/statefulsets"), 0);

    // A namespaced list without a limit returns everything in one page.
    let resp = get(&api, "/apis/apps/v1/namespaces/a/deployments").await;
    assert_eq!(names(&resp.body), ["a/y", "a/z"]);
    assert!(resp.body["metadata"].get("continue").is_none());

    // Garbage continue tokens are a 400, like the real server.
    let resp = get(&api, "/apis/apps/v1/deployments?limit=1&continue=zz").await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.body["reason"], "BadRequest");

    api.clear_requests();
    assert!(api.requests().is_empty());
}

#[tokio::test]
async fn filters_by_label_selector() {
    let api = FakeApi::start().await.unwrap();
    let labelled = |name: &str, labels: Value| {
        let mut d = deployment("ns", name, &["img"]);
        d["metadata"]["labels"] = labels;
        d
    };
    api.insert(labelled("a", json!({ "tier": "web", "env": "prod" })));
    api.insert(labelled("b", json!({ "tier": "db", "env": "prod" })));
    api.insert(labelled("c", json!({ "tier": "web" })));
    api.insert(deployment("other", "d", &["img"]));

    let cases = [
        ("tier%3Dweb", vec!["ns/a", "ns/c"]),
        ("tier%3D%3Dweb,env%3Dprod", vec!["ns/a"]),
        ("tier!%3Dweb", vec!["ns/b"]),
        ("tier+in+(db,web),env", vec!["ns/a", "ns/b"]),
        ("tier%20notin%20(db)", vec!["ns/a", "ns/c"]),
        ("!env", vec!["ns/c"]),
        ("env", vec!["ns/a", "ns/b"]),
    ];
    for (selector, want) in cases {
        let resp = get(
            &api,
            &format!("/apis/apps/v1/namespaces/ns/deployments?&limit=500&labelSelector={selector}"),
        )
        .await;
        assert_eq!(resp.status, 200, "{selector}: {:?}", resp.body);
        assert_eq!(names(&resp.body), want, "selector {selector}");
    }

    let resp = get(&api, "/apis/apps/v1/deployments?labelSelector=app+in+d").await;
    assert_eq!(resp.status, 400);

    // fieldSelector on metadata.name is understood, other fields are ignored.
    let resp = get(
        &api,
        "/apis/apps/v1/deployments?fieldSelector=metadata.name%3Db,status.phase%3DRunning",
    )
    .await;
    assert_eq!(names(&resp.body), ["ns/b"]);
}

#[tokio::test]
async fn get_missing_object_is_a_not_found_status() {
    let api = FakeApi::start().await.unwrap();
    let resp = get(&api, "/apis/apps/v1/namespaces/prod/deployments/ghost").await;
    assert_eq!(resp.status, 404);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(
        resp.body,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "deployments.apps \"ghost\" not found",
            "reason": "NotFound",
            "details": { "name": "ghost", "group": "apps", "kind": "deployments" },
            "code": 404,
        })
    );

    let resp = get(&api, "/api/v1/namespaces/prod/configmaps/ghost").await;
    assert_eq!(resp.body["message"], "configmaps \"ghost\" not found");
    assert!(resp.body["details"].get("group").is_none());

    for unknown in [
        "/apis/apps/v1/namespaces/prod/widgets",
        "/nope",
        "/api/v1/deployments",
    ] {
        let resp = get(&api, unknown).await;
        assert_eq!(resp.status, 404, "{unknown}");
        assert_eq!(resp.body["reason"], "NotFound");
    }

    api.insert(deployment("prod", "web", &["img"]));
    let resp = get(&api, DEPLOY).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body["metadata"]["generation"], 1);
    assert_eq!(
        resp.body["spec"]["template"]["spec"]["containers"][0]["name"],
        "c0"
    );

    let resp = get(&api, "/apis/apps/v1/deployments?watch=true").await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.body["reason"], "MethodNotAllowed");
    let resp = send_json(&api, "POST", DEPLOY, &json!({})).await;
    assert_eq!(resp.status, 405);
}

#[tokio::test]
async fn create_then_conflicting_create_and_replace() {
    let api = FakeApi::start().await.unwrap();
    let path = "/api/v1/namespaces/gar/configmaps";
    let cm = configmap("gar", "state", &[("k", "v1")]);

    let resp = send_json(&api, "POST", &format!("{path}?&fieldManager=gar"), &cm).await;
    assert_eq!(resp.status, 201, "{:?}", resp.body);
    let created = resp.body;
    assert_eq!(created["metadata"]["resourceVersion"], "1");
    assert_eq!(created["kind"], "ConfigMap");
    assert!(created["metadata"]["uid"].as_str().unwrap().len() == 36);
    assert!(
        created["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert!(created["metadata"].get("generation").is_none());
    assert_eq!(api.get("configmaps", "gar", "state").unwrap(), created);

    let resp = send_json(&api, "POST", path, &cm).await;
    assert_eq!(resp.status, 409);
    assert_eq!(resp.body["reason"], "AlreadyExists");

    // PUT with the current resourceVersion succeeds and bumps it.
    let obj_path = format!("{path}/state");
    let mut update = created.clone();
    update["data"]["k"] = json!("v2");
    let resp = send_json(&api, "PUT", &format!("{obj_path}?"), &update).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.body["metadata"]["resourceVersion"], "2");
    assert_eq!(resp.body["metadata"]["uid"], created["metadata"]["uid"]);

    // Replaying it with the now stale resourceVersion is a Conflict that changes nothing.
    update["data"]["k"] = json!("v3");
    let resp = send_json(&api, "PUT", &format!("{obj_path}?"), &update).await;
    assert_eq!(resp.status, 409);
    assert_eq!(resp.body["reason"], "Conflict");
    assert_eq!(resp.body["code"], 409);
    assert_eq!(
        api.get("configmaps", "gar", "state").unwrap()["data"]["k"],
        "v2"
    );

    // Without a resourceVersion the PUT is unconditional.
    update["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let resp = send_json(&api, "PUT", &obj_path, &update).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body["data"]["k"], "v3");
    assert_eq!(resp.body["metadata"]["resourceVersion"], "3");

    let puts = api.requests_matching("PUT", &obj_path);
    assert_eq!(puts.len(), 3);
    assert_eq!(puts[0].query.as_deref(), Some(""));
    assert_eq!(puts[2].query, None);
    assert_eq!(puts[1].status, 409);
    assert_eq!(puts[1].content_type.as_deref(), Some("application/json"));
    assert_eq!(puts[1].body.as_ref().unwrap()["data"]["k"], "v3");

    let resp = send_json(&api, "PUT", &format!("{path}/missing"), &update).await;
    assert_eq!(resp.status, 400, "name mismatch with the URL");

    // DELETE answers with a Success Status; the object is gone afterwards.
    let resp = send(&api, "DELETE", &obj_path, None, None).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body["status"], "Success");
    assert_eq!(resp.body["details"]["name"], "state");
    assert_eq!(get(&api, &obj_path).await.status, 404);
    assert_eq!(
        send(&api, "DELETE", &obj_path, None, None).await.status,
        404
    );
}

#[tokio::test]
async fn patch_merges_annotations_and_bumps_versions() {
    let api = FakeApi::start().await.unwrap();
    let mut web = deployment("prod", "web", &["img:1", "sidecar:1"]);
    web["spec"]["template"]["metadata"]["annotations"] = json!({ "keep": "me" });
    web["status"] = json!({ "observedGeneration": 1 });
    api.insert(web);
    api.insert(configmap("prod", "unrelated", &[]));
    let before = api.get("deployments", "prod", "web").unwrap();
    assert_eq!(before["metadata"]["resourceVersion"], "1");

    let patch = json!({ "spec": { "template": { "metadata": { "annotations": {
        RESTARTED_AT_ANNOTATION: "2025-01-01T00:00:00Z"
    } } } } });
    let target = format!("{DEPLOY}?&fieldManager=gar-restarter");
    let resp = send(&api, "PATCH", &target, Some(SMP), Some(&patch)).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    let after = resp.body;
    assert_eq!(
        restarted_at(&after).as_deref(),
        Some("2025-01-01T00:00:00Z")
    );
    assert_eq!(
        after["spec"]["template"]["metadata"]["annotations"]["keep"],
        "me"
    );
    assert_eq!(
        after["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(after["metadata"]["resourceVersion"], "3");
    assert_eq!(after["metadata"]["generation"], 2);
    assert_eq!(after["status"], before["status"]);
    assert_eq!(api.get("deployments", "prod", "web").unwrap(), after);

    // The same patch again changes nothing and, like the real server, keeps the version.
    let resp = send(&api, "PATCH", &target, Some(SMP), Some(&patch)).await;
    assert_eq!(resp.body["metadata"]["resourceVersion"], "3");

    // A resourceVersion in the patch is a precondition.
    let guarded = json!({ "metadata": { "resourceVersion": "1", "annotations": { "x": "y" } } });
    let resp = send(&api, "PATCH", &target, Some(SMP), Some(&guarded)).await;
    assert_eq!(resp.status, 409);
    assert_eq!(resp.body["reason"], "Conflict");
    let guarded = json!({ "metadata": { "resourceVersion": "3", "annotations": { "x": "y" } } });
    let resp = send(&api, "PATCH", &target, Some(MERGE), Some(&guarded)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body["metadata"]["resourceVersion"], "4");
    assert_eq!(
        resp.body["metadata"]["generation"], 2,
        "metadata-only change keeps generation"
    );

    // Strategic merge merges containers by name; JSON merge replaces the list.
    let image = json!({ "spec": { "template": { "spec": { "containers": [
        { "name": "c1", "image": "sidecar:2" }
    ] } } } });
    let resp = send(&api, "PATCH", DEPLOY, Some(SMP), Some(&image)).await;
    let containers = resp.body["spec"]["template"]["spec"]["containers"].clone();
    assert_eq!(
        containers,
        json!([{ "name": "c0", "image": "img:1" }, { "name": "c1", "image": "sidecar:2" }])
    );
    let resp = send(&api, "PATCH", DEPLOY, Some(MERGE), Some(&image)).await;
    assert_eq!(
        resp.body["spec"]["template"]["spec"]["containers"],
        json!([{ "name": "c1", "image": "sidecar:2" }])
    );
    assert_eq!(resp.body["metadata"]["generation"], 4);

    // null deletes.
    let delete =
        json!({ "spec": { "template": { "metadata": { "annotations": { "keep": null } } } } });
    let resp = send(&api, "PATCH", DEPLOY, Some(SMP), Some(&delete)).await;
    assert!(
        resp.body["spec"]["template"]["metadata"]["annotations"]
            .get("keep")
            .is_none()
    );

    // JSON patch works too; a failed test op is a 422.
    let ops = json!([{ "op": "replace", "path": "/spec/replicas", "value": 3 }]);
    let resp = send(&api, "PATCH", DEPLOY, Some(JSON_PATCH), Some(&ops)).await;
    assert_eq!(resp.body["spec"]["replicas"], 3);
    let ops = json!([{ "op": "test", "path": "/spec/replicas", "value": 1 }]);
    let resp = send(&api, "PATCH", DEPLOY, Some(JSON_PATCH), Some(&ops)).await;
    assert_eq!(resp.status, 422);

    let resp = send_json(&api, "PATCH", DEPLOY, &patch).await;
    assert_eq!(resp.status, 415);
    assert_eq!(resp.body["reason"], "UnsupportedMediaType");
    let resp = send(
        &api,
        "PATCH",
        "/apis/apps/v1/namespaces/prod/deployments/nope",
        Some(SMP),
        Some(&patch),
    )
    .await;
    assert_eq!(resp.status, 404);

    let patches = api.patches();
    assert_eq!(patches.len(), 11);
    assert_eq!(
        patches[0].query.as_deref(),
        Some("&fieldManager=gar-restarter")
    );
    assert_eq!(patches[0].content_type.as_deref(), Some(SMP));
    assert_eq!(patches[0].body.as_ref(), Some(&patch));
    assert_eq!(patches[2].status, 409);
}

#[tokio::test]
async fn status_writes_only_touch_status() {
    let api = FakeApi::start().await.unwrap();
    api.insert(deployment("prod", "web", &["img"]));
    let patch = json!({ "status": { "readyReplicas": 1 }, "spec": { "replicas": 9 } });
    let resp = send(
        &api,
        "PATCH",
        &format!("{DEPLOY}/status"),
        Some(MERGE),
        Some(&patch),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body["status"]["readyReplicas"], 1);
    assert_eq!(resp.body["spec"]["replicas"], 1);
    assert_eq!(resp.body["metadata"]["generation"], 1);
    assert_eq!(get(&api, &format!("{DEPLOY}/scale")).await.status, 404);
}

#[tokio::test]
async fn injected_faults_fire_the_requested_number_of_times() {
    let api = FakeApi::start().await.unwrap();
    api.insert(deployment("prod", "web", &["img"]));
    api.add_fault(Fault {
        method: Some("PATCH".into()),
        path_contains: "/deployments/web".into(),
        status: Some(503),
        times: Some(2),
        retry_after: Some(7),
        ..Fault::default()
    });
    let patch = json!({ "metadata": { "labels": { "x": "y" } } });
    for _ in 0..2 {
        let resp = send(&api, "PATCH", DEPLOY, Some(SMP), Some(&patch)).await;
        assert_eq!(resp.status, 503);
        assert_eq!(resp.body["reason"], "ServiceUnavailable");
        assert_eq!(resp.body["kind"], "Status");
        assert_eq!(resp.header("retry-after"), Some("7"));
    }
    assert_eq!(
        api.get("deployments", "prod", "web").unwrap()["metadata"]["resourceVersion"],
        "1"
    );
    // GETs never matched the PATCH-only fault.
    assert_eq!(get(&api, DEPLOY).await.status, 200);
    let resp = send(&api, "PATCH", DEPLOY, Some(SMP), Some(&patch)).await;
    assert_eq!(resp.status, 200);
    let statuses: Vec<u16> = api.patches().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);

    // Reasons follow the code.
    for (code, reason) in [
        (429, "TooManyRequests"),
        (403, "Forbidden"),
        (500, "InternalError"),
        (409, "Conflict"),
    ] {
        api.add_fault(Fault::error("/deployments", code).times(1));
        let resp = get(&api, DEPLOY).await;
        assert_eq!(
            (resp.status, resp.body["reason"].as_str()),
            (code, Some(reason))
        );
        assert_eq!(resp.header("retry-after"), None);
    }

    // Probability zero never fires; clear_faults removes everything.
    api.add_fault(Fault::error("", 500).with_probability(0.0));
    assert_eq!(get(&api, DEPLOY).await.status, 200);
    api.add_fault(Fault::error("", 500));
    assert_eq!(get(&api, DEPLOY).await.status, 500);
    api.clear_faults();
    assert_eq!(get(&api, DEPLOY).await.status, 200);

    // Latency alone delays, then serves normally.
    api.add_fault(
        Fault::delay("/deployments/web", Duration::from_millis(200))
            .on_method("get")
            .times(1),
    );
    let started = std::time::Instant::now();
    let resp = get(&api, DEPLOY).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(resp.status, 200);
    let started = std::time::Instant::now();
    get(&api, DEPLOY).await;
    assert!(started.elapsed() < Duration::from_millis(200));
}

#[tokio::test]
async fn out_of_band_changes_make_clients_stale() {
    let api = FakeApi::start().await.unwrap();
    api.insert(deployment("prod", "web", &["img"]));
    let stale = api.get("deployment", "prod", "web").unwrap();
    let changed = api
        .modify("Deployment", "prod", "web", |d| {
            d["spec"]["replicas"] = json!(2)
        })
        .unwrap();
    assert_eq!(changed["metadata"]["generation"], 2);
    assert_eq!(api.resource_version(), 2);
    let resp = send_json(&api, "PUT", DEPLOY, &stale).await;
    assert_eq!(resp.status, 409);
    assert_eq!(api.list_objects("deployments").len(), 1);
    assert!(api.remove("deployments", "prod", "web").is_some());
    assert!(api.list_objects("deployments").is_empty());
}

#[tokio::test]
async fn stops_serving_and_writes_kubeconfig() {
    let api = FakeApi::start().await.unwrap();
    assert!(api.url().starts_with("http://127.0.0.1:"));
    let path = std::env::temp_dir().join(format!("fake-api-kubeconfig-{}", api.addr().port()));
    api.write_kubeconfig(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(text.contains(&format!("server: {}", api.url())));
    assert!(text.contains("namespace: default"));

    assert_eq!(get(&api, "/version").await.body["major"], "1");
    assert_eq!(
        get(&api, "/apis/apps/v1").await.body["resources"][0]["name"],
        "deployments"
    );

    let addr = api.addr();
    api.stop();
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "server still accepting after stop()");
}
