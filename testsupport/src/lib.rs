//! Test support shared by the integration tests, the benches and `cargo xtask`.
//!
//! Kept out of the daemon crate so that nothing here can leak into the shipped binary.

pub mod cluster;
pub mod daemon;
pub mod emulator;
pub mod fake_api;
pub mod fixtures;
pub mod gotool;
pub mod http;
pub mod kube_api;
pub mod metrics;
pub mod objects;
pub mod proxy;
pub mod traffic;
