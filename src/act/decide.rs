//! The decision taken just before each PATCH: restart this workload for this push, or skip it
//! and say why.
//!
//! It reads the workload as the live view has it *now* (not as the index had it when the
//! event was looked up): scope, opt-out and pause are decided at the moment of acting. The
//! workload's pod template records the push it was last restarted for, so dedupe and the
//! out-of-order guard are exact across replicas and restarts at no API cost; the memory
//! record only covers the moment between our own PATCH and the watch event that shows it.

use time::OffsetDateTime;

use crate::index::live::Current;
use crate::index::table::Scope;
use crate::index::workload::{RestartRecord, WorkloadKind, WorkloadRef};
use crate::ingest::image::ImageRef;

/// The push an event announces, as the restart records it.
#[derive(Debug, Clone)]
pub struct Push {
    pub image: ImageRef,
    pub digest: Option<String>,
    /// The message's publish time: the order of pushes, whatever order Pub/Sub delivers in.
    pub published_at: OffsetDateTime,
}

impl Push {
    pub fn record(&self) -> RestartRecord {
        RestartRecord {
            image: Some(self.image.as_str().to_string()),
            digest: self.digest.clone(),
            published_at: Some(self.published_at),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// PATCH, with the resourceVersion the decision was taken on (when the view is live), so
    /// that a change in between fails with 409 and the decision is taken again.
    Restart {
        precondition: Option<String>,
    },
    Skip(Skip),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Deleted, or outside `--namespace`/`--selector`, whatever the index said.
    OutOfScope,
    /// `gar-restarter/enabled: "false"` (or not `"true"` under `--opt-in`).
    OptedOut,
    /// A paused Deployment (kubectl refuses to restart one too).
    Paused,
    /// Its latest restart was for this push already.
    Duplicate,
    /// It was restarted for a later push of the same tag: this event is late.
    Stale,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::OutOfScope => "out_of_scope",
            Skip::OptedOut => "opted_out",
            Skip::Paused => "skipped_paused",
            Skip::Duplicate => "duplicate",
            Skip::Stale => "stale",
        }
    }
}

/// Decides for `workload` (as the index listed it) given what the live view has now and what
/// this process last did to it.
pub fn decide(
    workload: &WorkloadRef,
    current: &Current,
    ours: Option<&RestartRecord>,
    push: &Push,
    scope: &Scope,
) -> Decision {
    let (paused, recorded, precondition) = match current {
        Current::Absent => return Decision::Skip(Skip::OutOfScope),
        Current::Live(state) => {
            if !state.enabled(scope.opt_in) {
                return Decision::Skip(Skip::OptedOut);
            }
            (
                state.paused,
                Some(&state.last_restart),
                state.resource_version.clone(),
            )
        }
        // The view is incomplete: the namespaces at least are known without it.
        Current::Unknown => {
            if !scope.namespaces.is_empty()
                && !scope
                    .namespaces
                    .iter()
                    .any(|ns| **ns == *workload.namespace)
            {
                return Decision::Skip(Skip::OutOfScope);
            }
            (workload.paused, None, None)
        }
    };
    if paused && workload.kind == WorkloadKind::Deployment {
        return Decision::Skip(Skip::Paused);
    }
    if let Some(skip) = latest(recorded, ours).and_then(|l| compare(l, push)) {
        return Decision::Skip(skip);
    }
    Decision::Restart { precondition }
}

/// The later of the two records, by publish time; the workload's own when they tie.
fn latest<'a>(
    recorded: Option<&'a RestartRecord>,
    ours: Option<&'a RestartRecord>,
) -> Option<&'a RestartRecord> {
    match (recorded, ours) {
        (Some(r), Some(o)) if o.published_at > r.published_at => Some(o),
        (Some(r), _) => Some(r),
        (None, o) => o,
    }
}

fn compare(latest: &RestartRecord, push: &Push) -> Option<Skip> {
    let same_image = latest.image.as_deref() == Some(push.image.as_str());
    if same_image && latest.published_at.is_some_and(|at| at > push.published_at) {
        return Some(Skip::Stale);
    }
    // A record without the image (written before it was recorded) still names the digest.
    let maybe_same_image = same_image || latest.image.is_none();
    if push.digest.is_some() && latest.digest == push.digest && maybe_same_image {
        return Some(Skip::Duplicate);
    }
    // A tag-only event has no digest to compare: the same tag at the same publish time is
    // the same message delivered again.
    if push.digest.is_none() && same_image && latest.published_at == Some(push.published_at) {
        return Some(Skip::Duplicate);
    }
    None
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::index::workload::{RolloutStatus, WorkloadState};

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_764_000_000 + secs).unwrap()
    }

    fn push(digest: &str, at: i64) -> Push {
        Push {
            image: ImageRef::parse("gcr.io/p/app:v1").unwrap(),
            digest: Some(digest.into()),
            published_at: t(at),
        }
    }

    fn live(last: Option<Push>) -> (WorkloadRef, Current) {
        let w = WorkloadRef::new(WorkloadKind::Deployment, "apps", "web");
        let state = WorkloadState {
            workload: w.clone(),
            containers: vec![],
            paused: false,
            annotations_enabled: None,
            last_restart: last.map(|p| p.record()).unwrap_or_default(),
            resource_version: Some("42".into()),
            generation: 1,
            status: RolloutStatus::default(),
        };
        (w, Current::Live(Arc::new(state)))
    }

    fn restart() -> Decision {
        Decision::Restart {
            precondition: Some("42".into()),
        }
    }

    #[test]
    fn a_to_b_to_a_restarts_each_time() {
        let scope = Scope::default();
        let (w, never) = live(None);
        assert_eq!(decide(&w, &never, None, &push("A", 1), &scope), restart());
        let (w, at_a) = live(Some(push("A", 1)));
        assert_eq!(decide(&w, &at_a, None, &push("B", 2), &scope), restart());
        let (w, at_b) = live(Some(push("B", 2)));
        assert_eq!(decide(&w, &at_b, None, &push("A", 3), &scope), restart());
    }

    #[test]
    fn the_same_push_again_is_a_duplicate() {
        let (w, at_a) = live(Some(push("A", 1)));
        assert_eq!(
            decide(&w, &at_a, None, &push("A", 1), &Scope::default()),
            Decision::Skip(Skip::Duplicate)
        );
        // A re-push of the same digest later is a duplicate too: the pods already run it.
        assert_eq!(
            decide(&w, &at_a, None, &push("A", 5), &Scope::default()),
            Decision::Skip(Skip::Duplicate)
        );
    }

    #[test]
    fn an_older_event_is_stale() {
        let (w, at_b) = live(Some(push("B", 10)));
        assert_eq!(
            decide(&w, &at_b, None, &push("A", 3), &Scope::default()),
            Decision::Skip(Skip::Stale)
        );
    }

    #[test]
    fn our_own_patch_counts_before_the_watch_shows_it() {
        let (w, at_a) = live(Some(push("A", 1)));
        let ours = push("B", 2).record();
        assert_eq!(
            decide(&w, &at_a, Some(&ours), &push("B", 2), &Scope::default()),
            Decision::Skip(Skip::Duplicate)
        );
        assert_eq!(
            decide(&w, &at_a, Some(&ours), &push("A", 1), &Scope::default()),
            Decision::Skip(Skip::Stale)
        );
    }

    #[test]
    fn scope_opt_out_and_pause_are_read_now() {
        let scope = Scope {
            namespaces: vec!["apps".into()],
            ..Scope::default()
        };
        let w = WorkloadRef::new(WorkloadKind::Deployment, "kube-system", "coredns");
        assert_eq!(
            decide(&w, &Current::Absent, None, &push("A", 1), &scope),
            Decision::Skip(Skip::OutOfScope)
        );
        assert_eq!(
            decide(&w, &Current::Unknown, None, &push("A", 1), &scope),
            Decision::Skip(Skip::OutOfScope),
            "without the live view the namespaces still decide"
        );
        let (w, Current::Live(state)) = live(None) else {
            unreachable!()
        };
        let mut off = (*state).clone();
        off.annotations_enabled = Some("false".into());
        assert_eq!(
            decide(
                &w,
                &Current::Live(Arc::new(off)),
                None,
                &push("A", 1),
                &scope
            ),
            Decision::Skip(Skip::OptedOut)
        );
        let mut paused = (*state).clone();
        paused.paused = true;
        assert_eq!(
            decide(
                &w,
                &Current::Live(Arc::new(paused)),
                None,
                &push("A", 1),
                &scope
            ),
            Decision::Skip(Skip::Paused)
        );
        // The index said paused, the live view says resumed: the live view wins.
        let mut stale_ref = w.clone();
        stale_ref.paused = true;
        assert_eq!(
            decide(
                &stale_ref,
                &Current::Live(state),
                None,
                &push("A", 1),
                &scope
            ),
            restart()
        );
    }
}
