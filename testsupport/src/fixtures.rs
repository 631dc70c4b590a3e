//! Synthetic clusters for benches and tests: realistic registry paths, namespaces and kinds.

use serde_json::{Map, Value, json};

const KINDS: [&str; 3] = ["Deployment", "StatefulSet", "DaemonSet"];

/// Image `j` of workload `i`: a GAR path with a tag, as a push event would name it.
pub fn image(i: usize, j: usize) -> String {
    format!(
        "europe-west4-docker.pkg.dev/project-{}/team-{}/service-{}-{}:v{}.{}",
        i % 11,
        i % 37,
        i,
        j,
        1 + j % 3,
        i % 10
    )
}

/// `cache.json` for `workloads` workloads, each running `images_per_workload` distinct images
/// (so `workloads * images_per_workload` refs). 10,000 × 5 = the 50,000-ref benchmark index.
pub fn cache_json(workloads: usize, images_per_workload: usize) -> Vec<u8> {
    let mut images = Map::new();
    for i in 0..workloads {
        for j in 0..images_per_workload {
            let mut w =
                json!({"name": format!("service-{i}"), "namespace": format!("ns-{}", i % 200)});
            let kind = KINDS[i % KINDS.len()];
            if kind != "Deployment" {
                w["kind"] = json!(kind);
            }
            images.insert(image(i, j), Value::Array(vec![w]));
        }
    }
    serde_json::to_vec(
        &json!({"version": 1, "generatedAt": "2026-11-25T00:00:00Z", "images": images}),
    )
    .unwrap_or_default()
}

/// A GAR INSERT payload for `image(i, j)` pushed with a digest.
pub fn gar_insert(i: usize, j: usize) -> Vec<u8> {
    let tag = image(i, j);
    let repo = tag.rsplit_once(':').map(|(r, _)| r).unwrap_or(&tag);
    json!({
        "action": "INSERT",
        "digest": format!("{repo}@sha256:{:064x}", i * 1000 + j),
        "tag": tag,
    })
    .to_string()
    .into_bytes()
}
