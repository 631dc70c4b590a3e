//! gar-restarter: restarts the Kubernetes workloads that run an image when Google Artifact
//! Registry publishes a push event.
//!
//! Data flows one way: [`source`] (receive) → [`event`] (parse) → [`lookup`] → [`restart`] →
//! [`settle`] (ack, nack or dead-letter), wired by [`pipeline`] and [`daemon`].

pub mod apimetrics;
pub mod cache;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod deadletter;
pub mod dedupe;
pub mod event;
pub mod excerpt;
pub mod health;
pub mod image;
pub mod index;
mod json;
pub mod lookup;
pub mod metrics;
pub mod pipeline;
pub mod pubsub;
pub mod replay;
pub mod restart;
pub mod server;
pub mod settle;
pub mod source;
pub mod telemetry;
pub mod workload;
