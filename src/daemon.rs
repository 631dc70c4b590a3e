//! `run`: wires the stages together and owns start-up and shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::act::events::{EventEmitter, Reason, WorkloadEvent};
use crate::act::notify::{self, Notifier};
use crate::act::restart::{FIELD_MANAGER, Restarter, RestarterConfig, RetryPolicy};
use crate::act::rollout::{Finished, RolloutConfig, RolloutResult, Rollouts};
use crate::cluster::{self, ClusterError};
use crate::config::RunArgs;
use crate::index::cache::{CacheChain, ChainError};
use crate::index::live::LiveView;
use crate::index::table::Scope;
use crate::index::watch::{self, WatchConfig};
use crate::ingest::pubsub::{self, PubSubDeadLetters, PubSubError, PubSubRecords};
use crate::ingest::source::{self, SourceConfig};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::ops::server::{self, BindError};
use crate::pipeline::{Context, Pipeline, PipelineConfig};
use crate::settle::Settler;
use k8s_openapi::api::core::v1::ObjectReference;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    PubSub(#[from] PubSubError),
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// How long one message may be held, its lease extended, while its restarts run.
const MAX_MESSAGE_LEASE: Duration = Duration::from_secs(3600);

/// Runs until SIGTERM/SIGINT, then drains and returns.
pub async fn run(args: RunArgs, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(args.liveness_timeout));
    let addr = server::spawn(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");

    let client = cluster::client_with_metrics(metrics.clone()).await?;
    let chain = CacheChain::new(client.clone(), args.scope.chain_config(), metrics.clone());
    // The index load (CPU: parsing the mounted file) and the Pub/Sub clients (network and
    // credentials) are independent, so they overlap; messages are still only taken once
    // both are done. A Pub/Sub error ends start-up at once, even while the index retries.
    let pubsub_clients = async {
        let sink = PubSubDeadLetters::new(&args.dead_letter_topic).await?;
        let subscriber = pubsub::subscriber().await?;
        Ok::<_, DaemonError>((sink, subscriber))
    };
    let (loaded, (sink, subscriber)) =
        tokio::try_join!(load_index(&chain, &health, &shutdown), pubsub_clients)?;
    if !loaded {
        return Ok(());
    }
    let scope = args.scope.scope();
    let live = if args.watch {
        Some(start_watch(&args, &scope, &metrics, &shutdown).await?)
    } else {
        tracing::info!("--watch=false: lookups and decisions use the snapshot index");
        None
    };
    let notify = match &args.notify_topic {
        Some(topic) => Some(Notifier::spawn(
            PubSubRecords::new(topic).await?,
            metrics.clone(),
            shutdown.clone(),
        )),
        None => None,
    };
    // Kubernetes Events go out in the background, through the same counted client; a dry
    // run writes none.
    let events = if args.dry_run {
        EventEmitter::disabled()
    } else {
        EventEmitter::spawn(client.clone(), reporter(), metrics.clone())
    };
    let rollouts = live.as_ref().map(|live| {
        let rollouts = Arc::new(Rollouts::new(
            RolloutConfig {
                timeout: args.rollout_timeout,
            },
            metrics.clone(),
        ));
        live.set_observer(rollouts.clone());
        if let Some(n) = notify.clone() {
            rollouts.on_finish(move |f| n.send(rollout_record(f)));
        }
        let emitter = events.clone();
        rollouts.on_finish(move |f| emitter.emit(rollout_event(f)));
        tokio::spawn(rollouts.clone().run(shutdown.clone()));
        rollouts
    });
    chain.spawn_background(
        live.clone().map(|l| (l, args.snapshot_interval)),
        shutdown.clone(),
    );
    let index = Arc::new(chain);

    let restarter = Restarter::new(
        client,
        RestarterConfig {
            dry_run: args.dry_run,
            retry: RetryPolicy {
                budget: args.retry_budget,
                ..RetryPolicy::default()
            },
            scope,
            live,
            dedupe_window: args.dedupe_window,
            max_restarts_per_second: std::num::NonZeroU32::new(args.max_restarts_per_second),
            strategy: args.strategy,
            events,
            metrics: metrics.clone(),
        },
    );
    let pipeline = Arc::new(Pipeline::new(
        index,
        restarter,
        Context {
            settler: Settler {
                sink: Arc::new(sink),
                subscription: Arc::from(args.subscription.as_str()),
                metrics: metrics.clone(),
            },
            abort: CancellationToken::new(),
            rollouts,
            notify,
        },
        PipelineConfig {
            max_attempts: args.max_attempts,
        },
    ));
    if let Some(endpoint) = pubsub::emulator_endpoint() {
        tracing::info!(%endpoint, "using the Pub/Sub emulator (PUBSUB_EMULATOR_HOST)");
    }
    source::run(
        subscriber,
        SourceConfig {
            subscription: args.subscription.clone(),
            max_in_flight: args.max_in_flight as usize,
            flow_control: args.flow_control(),
            shutdown_timeout: args.shutdown_timeout,
            // Each workload's retries stay within the budget, but a message's restarts also
            // wait for --max-restarts-per-second: at 10/s, one push for 2,000 workloads takes
            // over 3 minutes. The lease is extended for up to an hour (36,000 restarts at that
            // rate), so such a message is acked once, when all are done, not redelivered
            // halfway; a wedged delivery is the liveness probe's to catch.
            max_lease: (args.retry_budget * 4).max(MAX_MESSAGE_LEASE),
        },
        pipeline,
        health,
        shutdown,
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// The outcome-topic record of a rollout that ended.
fn rollout_record(f: &Finished) -> notify::Record {
    notify::Record {
        kind: "rollout",
        workload: (&f.workload).into(),
        image: f.image.clone(),
        digest: f.digest.clone(),
        strategy: f.strategy,
        result: f.result.as_str(),
        message_id: f.message_id.clone(),
        published_at: f.published_at.map(crate::util::clock::format_rfc3339_nanos),
        at: crate::util::clock::now_rfc3339(),
        detail: Some(f.detail.clone()),
    }
}

/// The Kubernetes Event of a rollout that ended: `RolloutSucceeded`, or `RolloutFailed`
/// (failed or timed out).
fn rollout_event(f: &Finished) -> WorkloadEvent {
    let reason = match f.result {
        RolloutResult::Succeeded => Reason::RolloutSucceeded,
        RolloutResult::Failed | RolloutResult::TimedOut => Reason::RolloutFailed,
    };
    let digest = f.digest.as_deref().unwrap_or("no digest");
    WorkloadEvent {
        reason,
        regarding: ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some(f.workload.kind.as_str().into()),
            namespace: Some(f.workload.namespace.to_string()),
            name: Some(f.workload.name.to_string()),
            uid: f.uid.clone(),
            ..ObjectReference::default()
        },
        note: format!(
            "Rollout for {} ({digest}, Pub/Sub message {}) {}: {}",
            f.image,
            f.message_id,
            f.result.as_str().replace('_', " "),
            f.detail
        ),
    }
}

/// Who writes the Events: `gar-restarter`, from this pod (POD_NAME, else the hostname).
fn reporter() -> kube::runtime::events::Reporter {
    let mut reporter = kube::runtime::events::Reporter::from(FIELD_MANAGER);
    if let Some(pod) = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
        reporter.instance = Some(pod);
    }
    reporter
}

/// Starts the watch streams that keep the live view; it catches up in the background (the
/// daemon is ready on the snapshot) and `watch_synced` turns 1 once every stream has listed.
async fn start_watch(
    args: &RunArgs,
    scope: &Scope,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Arc<LiveView>, DaemonError> {
    let live = Arc::new(LiveView::new(
        LiveView::streams_for(scope),
        scope.opt_in,
        args.watch_sync_timeout,
    ));
    let client = cluster::watch_client(metrics.clone()).await?;
    watch::spawn(
        client,
        live.clone(),
        WatchConfig {
            selector: scope.selector.clone(),
            relist_interval: args.scope.refresh_interval,
        },
        metrics.clone(),
        shutdown.clone(),
    );
    let (synced, gauge) = (live.clone(), metrics.clone());
    tokio::spawn(async move {
        if synced.wait_synced().await {
            gauge.watch_synced.set(1);
            tracing::info!(
                workloads = synced.workload_count(),
                images = synced.image_count(),
                "live view complete: lookups and decisions use the watch"
            );
        } else {
            tracing::warn!(
                "the watch has not listed within --watch-sync-timeout; using the snapshot index until it does"
            );
        }
    });
    Ok(live)
}

/// Loads the first index (mount → ConfigMap → rebuild), retrying with backoff; the daemon
/// stays not-ready meanwhile. `Ok(false)`: shutdown was requested before it succeeded.
async fn load_index(
    chain: &CacheChain,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<bool, DaemonError> {
    let mut delay = Duration::from_millis(500);
    loop {
        match chain.init().await {
            Ok(origin) => {
                tracing::info!(origin = origin.as_str(), "index ready");
                health.index_loaded.store(true, Ordering::Relaxed);
                return Ok(true);
            }
            Err(e) => {
                tracing::warn!(error = %e, ?delay, "no index yet (mount, ConfigMap and rebuild all failed); retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install the SIGTERM handler");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        token.cancel();
    });
}
