//! Act: for each matched workload, decide on its live state ([`decide`]: scope, opt-out,
//! pause, duplicate, stale), then restart it the way `kubectl rollout restart` does
//! ([`restart`]). The outcome goes back to the pipeline, which
//! turns it into a settlement.

pub mod decide;
pub mod dedupe;
pub mod restart;
