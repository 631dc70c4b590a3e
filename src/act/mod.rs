//! Act: restart each matched workload the way `kubectl rollout restart` does ([`restart`]),
//! once per (workload, digest) ([`dedupe`]). The outcome goes back to the pipeline, which
//! turns it into a settlement.

pub mod dedupe;
pub mod restart;
