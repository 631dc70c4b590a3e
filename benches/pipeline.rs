//! In-process pipeline throughput: an in-memory source feeds the real delivery path
//! (`Pipeline::handle`: span, attempt, parse → lookup, settle; non-matching events, so no
//! PATCH), with a kube client pointed at the fake API.
//!
//! `cargo bench --bench pipeline`

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gar_restarter::act::restart::{Restarter, RestarterConfig};
use gar_restarter::index::lookup::SharedIndex;
use gar_restarter::index::table::Index;
use gar_restarter::ingest::inbound::Inbound;
use gar_restarter::ops::metrics::Metrics;
use gar_restarter::pipeline::{Context, Pipeline, PipelineConfig};
use gar_restarter::settle::deadletter::{DeadLetter, DeadLetterSink, PublishError};
use gar_restarter::settle::{AckHandle, Settler};
use gar_testsupport::fake_api::FakeApi;
use gar_testsupport::fixtures;

struct NoopHandle;
impl AckHandle for NoopHandle {
    fn ack(self) {}
    fn nack(self) {}
}

struct NullSink;
impl DeadLetterSink for NullSink {
    async fn publish(&self, _: DeadLetter) -> Result<String, PublishError> {
        Ok(String::new())
    }
}

const BATCH: usize = 10_000;

fn bench(c: &mut Criterion) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let api = rt.block_on(FakeApi::start()).expect("fake api");
    let mut config = kube::Config::new(api.url().parse().expect("url"));
    config.default_retry = false;
    let client = rt
        .block_on(async { kube::Client::try_from(config) })
        .expect("client");
    let index =
        SharedIndex::new(Index::from_json(&fixtures::cache_json(10_000, 5)).expect("index"));
    let metrics = Arc::new(Metrics::new());
    let pipeline = Arc::new(Pipeline::new(
        Arc::new(index),
        Restarter::new(client, RestarterConfig::default()),
        Context {
            settler: Settler {
                sink: Arc::new(NullSink),
                subscription: Arc::from("projects/p/subscriptions/s"),
                metrics,
            },
            abort: tokio_util::sync::CancellationToken::new(),
            rollouts: None,
            notify: None,
        },
        PipelineConfig { max_attempts: 5 },
    ));
    // Events for images nobody runs: the whole path except the PATCH.
    let messages: Vec<Inbound> = (0..BATCH)
        .map(|i| Inbound {
            id: format!("m{i}"),
            data: Bytes::from(fixtures::gar_insert(100_000 + i, 0)),
            attributes: HashMap::new(),
            publish_time: None,
            delivery_attempt: Some(1),
        })
        .collect();
    let messages = Arc::new(messages);

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.bench_function("non_matching_events", |b| {
        b.to_async(&rt).iter(|| {
            let pipeline = pipeline.clone();
            let messages = messages.clone();
            async move {
                // Two workers, like the daemon's runtime on this 2-core machine.
                let mut tasks = Vec::new();
                for w in 0..2 {
                    let (pipeline, messages) = (pipeline.clone(), messages.clone());
                    tasks.push(tokio::spawn(async move {
                        // What the source does per message: one call, span to settle.
                        for msg in messages.iter().skip(w).step_by(2) {
                            pipeline.handle(msg.clone(), NoopHandle).await;
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
