//! Operability, used by every stage: traces and logs ([`telemetry`]), Prometheus metrics
//! ([`metrics`]), the liveness and readiness state ([`health`]) and the HTTP server that
//! exposes them ([`server`]).

pub mod health;
pub mod metrics;
pub mod server;
pub mod telemetry;
