//! The decision taken just before each PATCH: restart this workload for this push, or skip it
//! and say why.
//!
//! It reads the workload as the live view has it *now* (not as the index had it when the
//! event was looked up): scope, opt-out and pause are decided at the moment of acting. The
//! workload's pod template records the push it was last restarted for, so dedupe and the
//! out-of-order guard are exact across replicas and restarts at no API cost; the memory
//! record only covers the moment between our own PATCH and the watch event that shows it.

use time::OffsetDateTime;

use crate::act::strategy::{PullPolicy, Strategy, effective_pull_policy, pinned_image};
use crate::index::live::Current;
use crate::index::table::Scope;
use crate::index::workload::{RestartRecord, WorkloadKind, WorkloadRef, WorkloadState};
use crate::ingest::image::ImageRef;

/// The push an event announces, as the restart records it.
#[derive(Debug, Clone)]
pub struct Push {
    pub image: ImageRef,
    pub digest: Option<String>,
    /// The message's publish time: the order of pushes, whatever order Pub/Sub delivers in.
    pub published_at: OffsetDateTime,
    /// The Pub/Sub message id, named by the Kubernetes Events and log lines.
    pub message_id: String,
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
        plan: Plan,
    },
    Skip(Skip),
    /// Cannot be decided now (pin-digest needs the containers, and the live view has not
    /// listed): a transient failure, retried and then redelivered.
    Defer(&'static str),
}

/// What the PATCH does besides the restart annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub strategy: Strategy,
    /// pin-digest: each matching container and its new image; empty under restart.
    pub pins: Vec<Pin>,
    /// restart: matching containers whose effective pull policy may start the old image.
    pub stale_risks: Vec<StaleRisk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub container: String,
    pub init: bool,
    /// `REPO:TAG@sha256:…`, spelled as the pod template spells the repository.
    pub image: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleRisk {
    pub container: String,
    pub policy: PullPolicy,
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
    /// `gar-restarter/strategy` has a value this version does not know: not guessed.
    UnknownStrategy,
    /// Under `restart`, every container running the tag pins a digest (`repo:tag@sha256:…`
    /// written by hand, or left by pin-digest): a restart would not change what it runs.
    DigestPinned,
    /// The workload no longer runs the tag (its template changed after the lookup).
    NotRunning,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::OutOfScope => "out_of_scope",
            Skip::OptedOut => "opted_out",
            Skip::Paused => "skipped_paused",
            Skip::Duplicate => "duplicate",
            Skip::Stale => "stale",
            Skip::UnknownStrategy => "unknown_strategy",
            Skip::DigestPinned => "digest_pinned",
            Skip::NotRunning => "not_running",
        }
    }
}

/// Decides for `workload` (as the index listed it) given what the live view has now and what
/// this process last did to it.
///
/// `default` is `--strategy`, for workloads without a `gar-restarter/strategy` annotation (and
/// for every workload while the live view is not complete: the annotation is read from it).
pub fn decide(
    workload: &WorkloadRef,
    current: &Current,
    ours: Option<&RestartRecord>,
    push: &Push,
    scope: &Scope,
    default: Strategy,
) -> Decision {
    let (paused, recorded, precondition, live) = match current {
        Current::Absent => return Decision::Skip(Skip::OutOfScope),
        Current::Live(state) => {
            if !state.enabled(scope.opt_in) {
                return Decision::Skip(Skip::OptedOut);
            }
            (
                state.paused,
                Some(&state.last_restart),
                state.resource_version.as_deref().map(String::from),
                Some(&**state),
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
            (workload.paused, None, None, None)
        }
    };
    if paused && workload.kind == WorkloadKind::Deployment {
        return Decision::Skip(Skip::Paused);
    }
    let strategy = match live.and_then(|s| s.strategy.as_deref()) {
        None => default,
        Some(raw) => match Strategy::from_annotation(raw) {
            Ok(s) => s,
            Err(_) => return Decision::Skip(Skip::UnknownStrategy),
        },
    };
    if let Some(skip) = latest(recorded, ours).and_then(|l| compare(l, push)) {
        return Decision::Skip(skip);
    }
    let Some(state) = live else {
        // Without the live view there are no containers to pin or to judge: a restart is
        // today's PATCH, a pin has to wait for the view.
        return match strategy {
            Strategy::Restart => Decision::Restart {
                precondition,
                plan: Plan::default(),
            },
            Strategy::PinDigest => Decision::Defer(
                "pin-digest needs the workload's containers and the live view has not listed yet",
            ),
        };
    };
    match plan(state, push, strategy) {
        Ok(plan) => Decision::Restart { precondition, plan },
        Err(skip) => Decision::Skip(skip),
    }
}

/// The containers that run the pushed tag, and what the strategy does with them.
fn plan(state: &WorkloadState, push: &Push, strategy: Strategy) -> Result<Plan, Skip> {
    let matching: Vec<_> = state
        .containers
        .iter()
        .filter(|c| c.runs(&push.image))
        .collect();
    if matching.is_empty() {
        return Err(Skip::NotRunning);
    }
    let tag = push.image.tag().unwrap_or("latest");
    match (strategy, push.digest.as_deref()) {
        (Strategy::PinDigest, Some(digest)) => {
            let pins: Vec<Pin> = matching
                .iter()
                .map(|c| Pin {
                    container: c.container.to_string(),
                    init: c.init,
                    image: pinned_image(c.spelled().unwrap_or(push.image.as_str()), tag, digest),
                })
                .collect();
            // Already pinned to this digest (by hand, or before the annotations): a PATCH
            // would only roll the pods out again onto what they run.
            let unchanged = matching
                .iter()
                .zip(&pins)
                .all(|(c, p)| c.spelled() == Some(p.image.as_str()));
            if unchanged {
                return Err(Skip::Duplicate);
            }
            Ok(Plan {
                strategy,
                pins,
                stale_risks: Vec::new(),
            })
        }
        // A tag-only event has no digest to pin: restarted (and judged) like `restart`.
        _ => {
            let unpinned: Vec<_> = matching.iter().filter(|c| !c.digest_pinned()).collect();
            if unpinned.is_empty() {
                return Err(Skip::DigestPinned);
            }
            let stale_risks = unpinned
                .iter()
                .filter_map(|c| {
                    let written = c.spelled().unwrap_or(push.image.as_str());
                    let policy = effective_pull_policy(written, c.pull_policy);
                    policy.may_reuse_cached().then(|| StaleRisk {
                        container: c.container.to_string(),
                        policy,
                    })
                })
                .collect();
            Ok(Plan {
                strategy: Strategy::Restart,
                pins: Vec::new(),
                stale_risks,
            })
        }
    }
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
    use crate::index::workload::{ContainerImage, RolloutStatus};

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_764_000_000 + secs).unwrap()
    }

    fn push(digest: &str, at: i64) -> Push {
        Push {
            image: ImageRef::parse("gcr.io/p/app:v1").unwrap(),
            digest: Some(digest.into()),
            published_at: t(at),
            message_id: "m1".into(),
        }
    }

    fn live(last: Option<Push>) -> (WorkloadRef, Current) {
        let w = WorkloadRef::new(WorkloadKind::Deployment, "apps", "web");
        let state = WorkloadState {
            workload: w.clone(),
            containers: vec![container("app", false, "gcr.io/p/app:v1", "IfNotPresent")].into(),
            paused: false,
            annotations_enabled: None,
            strategy: None,
            last_restart: last.map(|p| p.record()).unwrap_or_default(),
            resource_version: Some("42".into()),
            uid: None,
            generation: 1,
            status: RolloutStatus::default(),
        };
        (w, Current::Live(Arc::new(state)))
    }

    fn container(name: &str, init: bool, image: &str, policy: &str) -> ContainerImage {
        ContainerImage {
            container: name.into(),
            init,
            image: crate::ingest::image::index_key(image),
            pull_policy: PullPolicy::declared(policy),
            written: Some(image.into()),
        }
    }

    fn restart() -> Decision {
        Decision::Restart {
            precondition: Some("42".into()),
            plan: Plan {
                strategy: Strategy::Restart,
                pins: vec![],
                stale_risks: vec![StaleRisk {
                    container: "app".into(),
                    policy: PullPolicy::IfNotPresent,
                }],
            },
        }
    }

    fn with(state: &Current, f: impl FnOnce(&mut WorkloadState)) -> Current {
        let Current::Live(s) = state else {
            unreachable!()
        };
        let mut s = (**s).clone();
        f(&mut s);
        Current::Live(Arc::new(s))
    }

    const R: Strategy = Strategy::Restart;
    const HEX: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn a_to_b_to_a_restarts_each_time() {
        let scope = Scope::default();
        let (w, never) = live(None);
        assert_eq!(
            decide(&w, &never, None, &push("A", 1), &scope, R),
            restart()
        );
        let (w, at_a) = live(Some(push("A", 1)));
        assert_eq!(decide(&w, &at_a, None, &push("B", 2), &scope, R), restart());
        let (w, at_b) = live(Some(push("B", 2)));
        assert_eq!(decide(&w, &at_b, None, &push("A", 3), &scope, R), restart());
    }

    #[test]
    fn the_same_push_again_is_a_duplicate() {
        let (w, at_a) = live(Some(push("A", 1)));
        assert_eq!(
            decide(&w, &at_a, None, &push("A", 1), &Scope::default(), R),
            Decision::Skip(Skip::Duplicate)
        );
        // A re-push of the same digest later is a duplicate too: the pods already run it.
        assert_eq!(
            decide(&w, &at_a, None, &push("A", 5), &Scope::default(), R),
            Decision::Skip(Skip::Duplicate)
        );
    }

    #[test]
    fn an_older_event_is_stale() {
        let (w, at_b) = live(Some(push("B", 10)));
        assert_eq!(
            decide(&w, &at_b, None, &push("A", 3), &Scope::default(), R),
            Decision::Skip(Skip::Stale)
        );
    }

    #[test]
    fn our_own_patch_counts_before_the_watch_shows_it() {
        let (w, at_a) = live(Some(push("A", 1)));
        let ours = push("B", 2).record();
        assert_eq!(
            decide(&w, &at_a, Some(&ours), &push("B", 2), &Scope::default(), R),
            Decision::Skip(Skip::Duplicate)
        );
        assert_eq!(
            decide(&w, &at_a, Some(&ours), &push("A", 1), &Scope::default(), R),
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
            decide(&w, &Current::Absent, None, &push("A", 1), &scope, R),
            Decision::Skip(Skip::OutOfScope)
        );
        assert_eq!(
            decide(&w, &Current::Unknown, None, &push("A", 1), &scope, R),
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
                &scope,
                R
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
                &scope,
                R
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
                &scope,
                R
            ),
            restart()
        );
    }

    fn pin_push(at: i64) -> Push {
        Push {
            digest: Some(HEX.into()),
            ..push("unused", at)
        }
    }

    #[test]
    fn pin_digest_pins_only_the_matching_containers() {
        let (w, base) = live(None);
        let state = with(&base, |s| {
            s.strategy = Some("pin-digest".into());
            s.containers = vec![
                container("app", false, "gcr.io/p/app:v1", "IfNotPresent"),
                container("sidecar", false, "gcr.io/p/proxy:v1", "IfNotPresent"),
                container(
                    "migrate",
                    true,
                    &format!("gcr.io/p/app:v1@sha256:{}", "2".repeat(64)),
                    "Always",
                ),
            ]
            .into();
        });
        let Decision::Restart { plan, precondition } =
            decide(&w, &state, None, &pin_push(1), &Scope::default(), R)
        else {
            panic!("expected a restart")
        };
        assert_eq!(precondition.as_deref(), Some("42"));
        assert_eq!(plan.strategy, Strategy::PinDigest);
        assert!(plan.stale_risks.is_empty());
        assert_eq!(
            plan.pins,
            vec![
                Pin {
                    container: "app".into(),
                    init: false,
                    image: format!("gcr.io/p/app:v1@{HEX}"),
                },
                Pin {
                    container: "migrate".into(),
                    init: true,
                    image: format!("gcr.io/p/app:v1@{HEX}"),
                },
            ]
        );
        // The default decides without the annotation.
        let plain = with(&base, |s| s.strategy = None);
        let d = decide(
            &w,
            &plain,
            None,
            &pin_push(1),
            &Scope::default(),
            Strategy::PinDigest,
        );
        assert!(
            matches!(&d, Decision::Restart { plan, .. } if plan.pins.len() == 1),
            "{d:?}"
        );
        // Already pinned to exactly this digest: nothing to do.
        let done = with(&base, |s| {
            s.strategy = Some("pin-digest".into());
            s.containers = vec![container(
                "app",
                false,
                &format!("gcr.io/p/app:v1@{HEX}"),
                "IfNotPresent",
            )]
            .into();
        });
        assert_eq!(
            decide(&w, &done, None, &pin_push(1), &Scope::default(), R),
            Decision::Skip(Skip::Duplicate)
        );
    }

    #[test]
    fn restart_flags_cached_pull_policies_and_skips_pinned_containers() {
        let (w, base) = live(None);
        let always = with(&base, |s| {
            s.containers = vec![container("app", false, "gcr.io/p/app:v1", "Always")].into();
        });
        let Decision::Restart { plan, .. } =
            decide(&w, &always, None, &push("A", 1), &Scope::default(), R)
        else {
            panic!()
        };
        assert!(plan.stale_risks.is_empty());
        let never = with(&base, |s| {
            s.containers = vec![container("app", false, "gcr.io/p/app:v1", "Never")].into();
        });
        let Decision::Restart { plan, .. } =
            decide(&w, &never, None, &push("A", 1), &Scope::default(), R)
        else {
            panic!()
        };
        assert_eq!(plan.stale_risks[0].policy, PullPolicy::Never);
        // Pinned by hand under `restart`: never restarted, as before.
        let pinned = with(&base, |s| {
            s.containers = vec![container(
                "app",
                false,
                &format!("gcr.io/p/app:v1@{HEX}"),
                "IfNotPresent",
            )]
            .into();
        });
        assert_eq!(
            decide(&w, &pinned, None, &push("A", 1), &Scope::default(), R),
            Decision::Skip(Skip::DigestPinned)
        );
        let other = with(&base, |s| {
            s.containers = vec![container("app", false, "gcr.io/p/app:v2", "Always")].into();
        });
        assert_eq!(
            decide(&w, &other, None, &push("A", 1), &Scope::default(), R),
            Decision::Skip(Skip::NotRunning)
        );
    }

    #[test]
    fn an_unknown_strategy_is_not_guessed_and_the_guard_still_applies() {
        let (w, base) = live(None);
        let typo = with(&base, |s| s.strategy = Some("pin_digest".into()));
        assert_eq!(
            decide(&w, &typo, None, &push("A", 1), &Scope::default(), R),
            Decision::Skip(Skip::UnknownStrategy)
        );
        // An older push never pins an older digest.
        let (w, at_b) = live(Some(push("B", 10)));
        let pinning = with(&at_b, |s| s.strategy = Some("pin-digest".into()));
        assert_eq!(
            decide(&w, &pinning, None, &pin_push(3), &Scope::default(), R),
            Decision::Skip(Skip::Stale)
        );
        // Without the live view a pin waits; a restart does not.
        assert!(matches!(
            decide(
                &w,
                &Current::Unknown,
                None,
                &pin_push(11),
                &Scope::default(),
                Strategy::PinDigest
            ),
            Decision::Defer(_)
        ));
        assert!(matches!(
            decide(
                &w,
                &Current::Unknown,
                None,
                &pin_push(11),
                &Scope::default(),
                R
            ),
            Decision::Restart { .. }
        ));
    }
}
