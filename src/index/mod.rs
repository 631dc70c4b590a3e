//! Look up: which workloads run an image. The index ([`table`]) lives in memory and is
//! loaded from the mounted ConfigMap, then the API, then a cluster [`scan`] ([`cache`]); the
//! pipeline asks it through [`lookup::Lookup`] and hands the workloads on to `act`.

pub mod cache;
pub mod check;
pub mod lookup;
pub mod scan;
pub mod table;
pub mod workload;
