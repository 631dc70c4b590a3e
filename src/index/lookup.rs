//! Look-up stage: which workloads run an image.
//!
//! The pipeline only sees [`Lookup`]; where the answer comes from (memory, the mounted
//! ConfigMap, the API, a rebuild) is the implementation's business.

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::index::table::Index;
use crate::index::workload::WorkloadRef;
use crate::ingest::image::ImageRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupSource {
    /// The live view fed by the watch.
    Watch,
    /// What the live view last knew: it was complete once, and its watch is failing or
    /// relisting past `--watch-sync-timeout`.
    LastKnown,
    /// The snapshot index in memory (the watch is off or has not listed yet).
    Memory,
    /// The snapshot index, just rebuilt by a cluster scan for this miss.
    Rebuild,
}

impl LookupSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LookupSource::Watch => "watch",
            LookupSource::LastKnown => "last_known",
            LookupSource::Memory => "memory",
            LookupSource::Rebuild => "rebuild",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Hits {
    pub workloads: Arc<[WorkloadRef]>,
    pub source: LookupSource,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("rebuilding the index for {image}: {message}")]
    Rebuild { image: String, message: String },
}

pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, image: &ImageRef) -> impl Future<Output = Result<Hits, LookupError>> + Send;
}

/// An index held in memory and swapped atomically by whoever refreshes it.
#[derive(Debug, Default)]
pub struct SharedIndex {
    current: ArcSwap<Index>,
}

impl SharedIndex {
    pub fn new(index: Index) -> Self {
        Self {
            current: ArcSwap::from_pointee(index),
        }
    }

    pub fn load(&self) -> Arc<Index> {
        self.current.load_full()
    }

    pub fn store(&self, index: Index) {
        self.current.store(Arc::new(index));
    }

    /// The hot path: one hash lookup and no API call; a miss allocates nothing.
    pub fn get(&self, image: &ImageRef) -> Option<Arc<[WorkloadRef]>> {
        self.current.load().get(image)
    }
}

/// Answers from memory only; a miss means no workload runs the image.
impl Lookup for SharedIndex {
    async fn lookup(&self, image: &ImageRef) -> Result<Hits, LookupError> {
        Ok(Hits {
            workloads: self.get(image).unwrap_or_else(|| Arc::from(Vec::new())),
            source: LookupSource::Memory,
        })
    }
}
