//! Receive stage: a streaming pull on the subscription, re-created with backoff whenever it
//! ends, handing each message to the pipeline (one call per message) with bounded
//! concurrency, and draining cleanly on shutdown. It only moves messages.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use google_cloud_pubsub::client::Subscriber;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::ShutdownBehavior;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::index::lookup::Lookup;
use crate::ingest::inbound::Inbound;
use crate::ops::health::Health;
use crate::pipeline::Pipeline;
use crate::settle::deadletter::DeadLetterSink;

/// A stream that has not failed within this long after opening is considered connected; an
/// idle but healthy subscription delivers nothing, so there is no positive signal to wait for.
/// A missing subscription fails the stream within milliseconds, well inside this.
const CONNECT_GRACE: Duration = Duration::from_millis(100);

pub use crate::ingest::pubsub::LEASE_EXTENSION;

pub struct SourceConfig {
    pub subscription: String,
    pub max_in_flight: usize,
    /// Per stream: bounds the memory held by received messages before the 64 KiB check can
    /// refuse any of them (the SDK's default of 100 MiB let 10 MB messages OOM-kill us).
    pub flow_control: crate::config::FlowControl,
    pub shutdown_timeout: Duration,
    /// How long a received message may be held in total: the SDK keeps extending its lease
    /// until then (`set_max_lease`). Not the SDK's `max_lease_extension`, which is the
    /// deadline of each extension; that one is [`LEASE_EXTENSION`].
    pub max_lease: Duration,
}

/// Our transport-independent message, from Pub/Sub's.
pub fn inbound(message: &Message, delivery_attempt: Option<i32>) -> Inbound {
    Inbound {
        id: message.message_id.clone(),
        data: message.data.clone(),
        attributes: message.attributes.clone(),
        publish_time: message
            .publish_time
            .and_then(|t| SystemTime::try_from(t).ok()),
        delivery_attempt,
    }
}

/// Runs until `shutdown` fires, then drains: in-flight messages get `shutdown_timeout` to
/// finish, the rest are nacked, and pending acks are flushed.
pub async fn run<L: Lookup, D: DeadLetterSink>(
    subscriber: Subscriber,
    config: SourceConfig,
    pipeline: Arc<Pipeline<L, D>>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(config.max_in_flight));
    let abort = pipeline.abort_token();
    let metrics = pipeline.metrics().clone();
    let mut tasks = JoinSet::new();
    let subscription = Arc::new(config.subscription.clone());
    let mut backoff = reconnect_backoff();
    let mut first = true;
    // Liveness: beaten from every wait below, so it stops only if this loop stops being
    // polled (see health.rs).
    let mut heartbeat = tokio::time::interval(health.beat_interval());
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'outer: while !shutdown.is_cancelled() {
        if !first {
            metrics.stream_reconnects.inc();
            let delay = backoff.next().unwrap_or(Duration::from_secs(30));
            tracing::info!(subscription = %subscription, ?delay, "re-creating the streaming pull");
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = heartbeat.tick() => health.beat(),
                    _ = &mut sleep => break,
                }
            }
        }
        first = false;
        let mut stream = subscriber
            .subscribe(subscription.as_str())
            .set_max_lease(config.max_lease)
            .set_max_lease_extension(LEASE_EXTENSION)
            .set_max_outstanding_messages(config.flow_control.max_outstanding_messages)
            .set_max_outstanding_bytes(config.flow_control.max_outstanding_bytes)
            .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
            .build();
        let token = stream.shutdown_token();
        let grace =
            connected_after_grace(crate::ingest::pubsub::endpoint_authority(), &subscription);
        tokio::pin!(grace);
        let mut grace_done = false;
        loop {
            // Reap finished tasks so the set does not grow.
            while tasks.try_join_next().is_some() {}
            // The grace timer must not cancel `next()`: until the first message the SDK is
            // still opening the StreamingPull, and dropping that open abandons a stream the
            // service may just have handed a message to (it would then sit out its ack
            // deadline). So the same `next()` future is polled until it yields.
            let next = {
                let next = stream.next();
                tokio::pin!(next);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break None,
                        _ = &mut grace, if !grace_done => {
                            grace_done = true;
                            mark_connected(&health, &subscription);
                            backoff = reconnect_backoff();
                        }
                        _ = heartbeat.tick() => health.beat(),
                        next = &mut next => break Some(next),
                    }
                }
            };
            let Some(next) = next else {
                drain(&mut tasks, &abort, config.shutdown_timeout).await;
                flush(stream, &token).await;
                break 'outer;
            };
            match next {
                Some(Ok((message, handler))) => {
                    if !grace_done {
                        grace_done = true;
                        mark_connected(&health, &subscription);
                        backoff = reconnect_backoff();
                    }
                    // Waiting for a permit is waiting on the work in flight, which is
                    // bounded by the retry budget: the loop is busy, not wedged.
                    let acquire = permits.clone().acquire_owned();
                    tokio::pin!(acquire);
                    let permit = loop {
                        tokio::select! {
                            p = &mut acquire => break p,
                            _ = heartbeat.tick() => health.beat(),
                            _ = shutdown.cancelled() => {
                                handler.nack();
                                drain(&mut tasks, &abort, config.shutdown_timeout).await;
                                flush(stream, &token).await;
                                break 'outer;
                            }
                        }
                    };
                    let Ok(permit) = permit else { break 'outer };
                    let pipeline = pipeline.clone();
                    tasks.spawn(async move {
                        let msg = inbound(&message, handler.delivery_attempt());
                        pipeline.handle(msg, handler).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    health.stream_connected.store(false, Ordering::Relaxed);
                    tracing::warn!(subscription = %subscription, error = %e, "streaming pull failed; not ready until it reconnects");
                }
                None => {
                    health.stream_connected.store(false, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    health.stream_connected.store(false, Ordering::Relaxed);
    drain(&mut tasks, &abort, config.shutdown_timeout).await;
}

/// Resolves once a new stream has gone `CONNECT_GRACE` without failing *and* the endpoint
/// accepts TCP connections. The SDK retries refused connections silently, so "no error yet"
/// alone would report ready while Pub/Sub is unreachable.
async fn connected_after_grace(authority: String, subscription: &str) {
    tokio::time::sleep(CONNECT_GRACE).await;
    let mut warned = false;
    loop {
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(authority.as_str()),
        )
        .await;
        match probe {
            Ok(Ok(_)) => return,
            Ok(Err(e)) if !warned => {
                tracing::warn!(subscription, endpoint = %authority, error = %e, "Pub/Sub endpoint unreachable; not ready");
                warned = true;
            }
            Err(_) if !warned => {
                tracing::warn!(subscription, endpoint = %authority, "Pub/Sub endpoint did not answer within 2 s; not ready");
                warned = true;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn mark_connected(health: &Health, subscription: &str) {
    if !health.stream_connected.swap(true, Ordering::Relaxed) {
        tracing::info!(subscription, "streaming pull connected");
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Lets in-flight messages finish, then tells the rest to give up (they nack).
async fn drain(tasks: &mut JoinSet<()>, abort: &CancellationToken, timeout: Duration) {
    if tasks.is_empty() {
        return;
    }
    tracing::info!(
        in_flight = tasks.len(),
        ?timeout,
        "draining in-flight messages"
    );
    let finished = tokio::time::timeout(timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "shutdown timeout reached; nacking unfinished messages"
        );
        abort.cancel();
        while tasks.join_next().await.is_some() {}
    }
}

/// Closes the stream, then sends pending acks and nacks before the process exits.
///
/// Called once every handler is settled, so nothing is lost by closing the stream first, and
/// closing it first means the service cannot hand the messages we nack straight back to this
/// dying stream, where they would sit unseen until their ack deadline ran out.
async fn flush(
    stream: google_cloud_pubsub::subscriber::MessageStream,
    token: &google_cloud_pubsub::subscriber::ShutdownToken,
) {
    drop(stream);
    if tokio::time::timeout(Duration::from_secs(5), token.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("timed out flushing acknowledgements");
    }
}
