//! Look up: which workloads run an image. A snapshot index ([`table`]) is loaded at start-up
//! from the mounted ConfigMap, then the API, then a cluster [`scan`] ([`cache`]); a
//! [`watch`] then keeps a [`live`] view of every workload in scope. The pipeline asks through
//! [`lookup::Lookup`] and hands the workloads on to `act`, which reads the live view again
//! just before it acts.

pub mod cache;
pub mod check;
pub mod containers;
pub mod live;
pub mod lookup;
pub mod object;
pub mod scan;
pub mod table;
pub mod watch;
pub mod workload;
