//! Act: for each matched workload, decide on its live state ([`decide`]: scope, opt-out,
//! pause, strategy, duplicate, stale), then restart it the way `kubectl rollout restart` does
//! or pin the pushed digest ([`restart`], [`strategy`]), and say so with a Kubernetes Event
//! ([`events`]). The outcome goes back to the pipeline, which turns it into a settlement; the
//! restart's rollout is then followed on the live view ([`rollout`]), after the ack, and
//! restarts and rollout outcomes go to the outcome topic ([`notify`]).

pub mod decide;
pub mod dedupe;
pub mod events;
pub mod notify;
pub mod restart;
pub mod rollout;
pub mod strategy;
