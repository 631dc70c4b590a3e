//! gar-restarter: restarts the Kubernetes workloads that run an image when Google Artifact
//! Registry publishes a push event.
//!
//! Data flows one way, and the folders follow it:
//!
//! ```text
//! ingest (receive, parse) → index (look up) → act (restart) → settle (ack, nack, dead-letter)
//! ```
//!
//! [`pipeline`] drives one delivery through those stages; [`daemon`] wires them together and
//! owns start-up and shutdown. [`cluster`] (the Kubernetes client) and [`ops`] (telemetry,
//! metrics, probes) serve every stage.

pub mod act;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod index;
pub mod ingest;
pub mod ops;
pub mod pipeline;
pub mod settle;
pub mod util;
