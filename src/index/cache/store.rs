//! The index in its ConfigMap, through the API: read (1 GET, plus one per shard) and write
//! (create on 404, replace with the resourceVersion read, re-read and retry on 409).
//!
//! Concurrent writers converge: on a conflict the writer re-reads, and if the stored index
//! is at least as new as its own it stops, so an older scan never overwrites a newer one.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cluster::{ErrorClass, classify, get_opt};
use crate::config::ObjectName;
use crate::index::cache::codec::{self, CodecError, Encoded, Form, Limits};
use crate::index::table::Index;
use crate::util::lock::lock;

const FIELD_MANAGER: &str = "gar-restarter";
const MAX_CONFLICT_RETRIES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{verb} ConfigMap {name}: {source}")]
    Api {
        verb: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("ConfigMap {name}: {source}")]
    Codec {
        name: String,
        #[source]
        source: CodecError,
    },
    #[error("ConfigMap {name}: still conflicting after {MAX_CONFLICT_RETRIES} retries")]
    Conflict { name: String },
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Api { source, .. } => classify(source),
            StoreError::Codec { .. } => ErrorClass::Permanent,
            StoreError::Conflict { .. } => ErrorClass::Transient { retry_after: None },
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created(Form),
    Replaced(Form),
    /// Another writer stored an index at least as new; ours was dropped.
    Superseded,
    /// The stored index already has this content; nothing was written.
    Unchanged,
}

pub struct Store {
    client: Client,
    target: ObjectName,
    limits: Limits,
    /// The main ConfigMap as last read or written (`Some(None)`: known absent), so a write
    /// right after a read needs no second GET. A stale copy only costs a 409 and a re-read.
    last_seen: std::sync::Mutex<Option<Option<ConfigMap>>>,
}

impl Store {
    pub fn new(client: Client, target: ObjectName) -> Self {
        Self {
            client,
            target,
            limits: Limits::default(),
            last_seen: std::sync::Mutex::new(None),
        }
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn target(&self) -> &ObjectName {
        &self.target
    }

    fn api(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.target.namespace)
    }

    fn api_err(&self, verb: &'static str, name: &str) -> impl FnOnce(kube::Error) -> StoreError {
        let name = format!("{}/{name}", self.target.namespace);
        move |source| StoreError::Api { verb, name, source }
    }

    /// `Ok(None)` when the ConfigMap does not exist.
    pub async fn read(&self) -> Result<Option<Index>, StoreError> {
        let cm = get_opt(&self.api(), &self.target.name)
            .await
            .map_err(self.api_err("GET", &self.target.name))?;
        self.remember(cm.clone());
        match cm {
            Some(cm) => self.decode(&cm).await.map(Some),
            None => Ok(None),
        }
    }

    fn remember(&self, cm: Option<ConfigMap>) {
        *lock(&self.last_seen) = Some(cm);
    }

    fn take_remembered(&self) -> Option<Option<ConfigMap>> {
        lock(&self.last_seen).take()
    }

    async fn decode(&self, cm: &ConfigMap) -> Result<Index, StoreError> {
        let data = cm.data.clone().unwrap_or_default();
        let binary: BTreeMap<String, Vec<u8>> = cm
            .binary_data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        // Shards are fetched only for the sharded form, before decoding (decode is sync).
        let mut shards = Vec::new();
        if data.contains_key(codec::MANIFEST_KEY)
            && !data.contains_key(codec::PLAIN_KEY)
            && !binary.contains_key(codec::GZIP_KEY)
        {
            let count = serde_json::from_str::<codec::Manifest>(&data[codec::MANIFEST_KEY])
                .map(|m| m.shards.min(64))
                .unwrap_or(0);
            for i in 0..count {
                let name = codec::shard_name(&self.target.name, i);
                let shard = get_opt(&self.api(), &name)
                    .await
                    .map_err(self.api_err("GET", &name))?;
                shards.push(shard.and_then(|s| {
                    s.binary_data
                        .and_then(|mut b| b.remove(&codec::shard_key(i)))
                        .map(|b| b.0)
                }));
            }
        }
        codec::decode(&data, &binary, |i| shards.get(i).cloned().flatten())
            .map(|(index, _form)| index)
            .map_err(|source| StoreError::Codec {
                name: self.target.to_string(),
                source,
            })
    }

    /// Writes `index`, shards first and the main ConfigMap last, so readers never see a
    /// manifest that points at shards not yet written.
    pub async fn write(&self, index: &Index) -> Result<(Written, Encoded), StoreError> {
        let encoded = codec::encode(index, self.limits).map_err(|source| StoreError::Codec {
            name: self.target.to_string(),
            source,
        })?;
        // The "is the stored index newer?" check comes before the first shard is written:
        // shards are shared by every writer, so a slower replica that wrote its (older)
        // shards first would corrupt a newer complete set, even though its manifest write
        // would then be refused. `put` checks again for the main ConfigMap, against races.
        if !encoded.shards.is_empty() {
            let current = match self.take_remembered() {
                Some(c) => c,
                None => get_opt(&self.api(), &self.target.name)
                    .await
                    .map_err(self.api_err("GET", &self.target.name))?,
            };
            if let Some(current) = &current
                && let Some(verdict) = self.verdict(current, index).await
            {
                self.remember(Some(current.clone()));
                return Ok((verdict, encoded));
            }
            self.remember(current);
        }
        for (i, (key, bytes)) in encoded.shards.iter().enumerate() {
            let name = codec::shard_name(&self.target.name, i);
            let cm = self.configmap(
                &name,
                BTreeMap::new(),
                BTreeMap::from([(key.clone(), bytes.clone())]),
            );
            self.put(&name, cm, None).await?;
        }
        let main = self.configmap(
            &self.target.name,
            encoded.data.clone(),
            encoded.binary_data.clone(),
        );
        let written = self.put(&self.target.name, main, Some(index)).await?;
        Ok((written, encoded))
    }

    fn configmap(
        &self,
        name: &str,
        data: BTreeMap<String, String>,
        binary: BTreeMap<String, Vec<u8>>,
    ) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(self.target.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "gar-restarter".to_string(),
                )])),
                ..Default::default()
            },
            data: (!data.is_empty()).then_some(data),
            binary_data: (!binary.is_empty()).then(|| {
                binary
                    .into_iter()
                    .map(|(k, v)| (k, ByteString(v)))
                    .collect()
            }),
            ..Default::default()
        }
    }

    /// Create-or-replace with optimistic concurrency. With `newer_than`, a conflicting
    /// write by someone else with an index at least as new wins.
    async fn put(
        &self,
        name: &str,
        mut desired: ConfigMap,
        newer_than: Option<&Index>,
    ) -> Result<Written, StoreError> {
        let api = self.api();
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        let form = form_of(&desired);
        let is_main = name == self.target.name;
        let mut known = if is_main {
            self.take_remembered()
        } else {
            None
        };
        for _ in 0..MAX_CONFLICT_RETRIES {
            let current = match known.take() {
                Some(c) => c,
                None => get_opt(&api, name)
                    .await
                    .map_err(self.api_err("GET", name))?,
            };
            let result = match current {
                None => {
                    desired.metadata.resource_version = None;
                    api.create(&params, &desired)
                        .await
                        .map(|cm| (cm, Written::Created(form)))
                }
                Some(current) => {
                    if let Some(ours) = newer_than
                        && let Some(verdict) = self.verdict(&current, ours).await
                    {
                        self.remember(Some(current));
                        return Ok(verdict);
                    }
                    desired.metadata.resource_version = current.metadata.resource_version.clone();
                    api.replace(name, &params, &desired)
                        .await
                        .map(|cm| (cm, Written::Replaced(form)))
                }
            };
            match result {
                Ok((cm, w)) => {
                    if is_main {
                        self.remember(Some(cm));
                    }
                    return Ok(w);
                }
                // 409: someone wrote between our GET and our write (AlreadyExists on create,
                // Conflict on replace): read again and retry.
                // By code, not kube's reason-based `is_conflict` (see `cluster::is_not_found`).
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tracing::debug!(configmap = name, "write conflict; re-reading");
                    continue;
                }
                Err(e) => return Err(self.api_err("write", name)(e)),
            }
        }
        Err(StoreError::Conflict {
            name: format!("{}/{name}", self.target.namespace),
        })
    }
}

impl Store {
    /// `Some` when `ours` must not replace what `current` holds: the same content, or an
    /// index at least as new. An unreadable stored index is replaced.
    async fn verdict(&self, current: &ConfigMap, ours: &Index) -> Option<Written> {
        let theirs = self.decode(current).await.ok()?;
        if theirs.same_content(ours) {
            return Some(Written::Unchanged);
        }
        is_newer_or_equal(&theirs, ours, OffsetDateTime::now_utc()).then_some(Written::Superseded)
    }
}

fn form_of(cm: &ConfigMap) -> Form {
    let has = |k: &str| cm.data.as_ref().is_some_and(|d| d.contains_key(k));
    if has(codec::PLAIN_KEY) {
        Form::Plain
    } else if has(codec::MANIFEST_KEY) {
        Form::Sharded
    } else {
        Form::Gzip
    }
}

/// A stored `generatedAt` further ahead of our clock than this is a clock gone wrong (a
/// replica with a bad clock, a hand-edited ConfigMap), not a newer index. Honouring it would
/// block every later write until the wall clock caught up, so it is treated as stale.
const MAX_CLOCK_SKEW: time::Duration = time::Duration::minutes(5);

/// RFC 3339 UTC timestamps of equal precision compare correctly as strings.
fn is_newer_or_equal(theirs: &Index, ours: &Index, now: OffsetDateTime) -> bool {
    match (theirs.generated_at(), ours.generated_at()) {
        (Some(t), Some(o)) => t >= o && !in_the_future(t, now),
        _ => false,
    }
}

fn in_the_future(stamp: &str, now: OffsetDateTime) -> bool {
    OffsetDateTime::parse(stamp, &Rfc3339).is_ok_and(|t| t > now + MAX_CLOCK_SKEW)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::table::Scope;

    fn at(stamp: &str) -> Index {
        Index::build(
            Vec::<(_, Vec<&str>)>::new(),
            Scope::default(),
            stamp.to_string(),
        )
    }

    #[test]
    fn a_future_generated_at_does_not_block_later_writes() {
        let now = OffsetDateTime::parse("2026-12-01T12:00:00Z", &Rfc3339).unwrap();
        let ours = at("2026-12-01T12:00:00Z");
        // Newer, within the skew: respected.
        assert!(is_newer_or_equal(&at("2026-12-01T12:04:00Z"), &ours, now));
        assert!(is_newer_or_equal(&at("2026-12-01T12:00:00Z"), &ours, now));
        // Older: replaced.
        assert!(!is_newer_or_equal(&at("2026-12-01T11:00:00Z"), &ours, now));
        // Far in the future (a bad clock): replaced rather than blocking forever.
        assert!(!is_newer_or_equal(&at("2099-01-01T00:00:00Z"), &ours, now));
        assert!(!is_newer_or_equal(&at("2026-12-01T12:06:00Z"), &ours, now));
    }
}
