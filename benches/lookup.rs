//! Micro benchmarks of the hot path: index lookup, and parse + normalise + lookup of one GAR
//! message, against 10,000 workloads and 50,000 indexed refs.
//!
//! `cargo bench --bench lookup`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use gar_restarter::event::{self, Event};
use gar_restarter::image::ImageRef;
use gar_restarter::index::Index;
use gar_restarter::lookup::SharedIndex;
use gar_testsupport::fixtures;

fn bench(c: &mut Criterion) {
    let index =
        SharedIndex::new(Index::from_json(&fixtures::cache_json(10_000, 5)).expect("index"));
    assert_eq!(index.load().image_count(), 50_000);
    let hit = ImageRef::parse(&fixtures::image(4_321, 2)).expect("ref");
    let miss = ImageRef::parse("europe-west4-docker.pkg.dev/p/t/unknown:v1").expect("ref");
    let message = fixtures::gar_insert(4_321, 2);

    let json = fixtures::cache_json(10_000, 5);
    let mut g = c.benchmark_group("index");
    g.sample_size(10);
    g.bench_function("load_10k_workloads_50k_refs", |b| {
        b.iter(|| black_box(Index::from_json(black_box(&json)).expect("index")))
    });
    g.finish();

    let mut g = c.benchmark_group("lookup");
    g.bench_function("hit", |b| b.iter(|| black_box(index.get(black_box(&hit)))));
    g.bench_function("miss", |b| {
        b.iter(|| black_box(index.get(black_box(&miss))))
    });
    g.finish();

    let mut g = c.benchmark_group("message");
    g.bench_function("parse_normalise_lookup", |b| {
        b.iter(|| {
            let Ok(Event::Insert { tag, .. }) = event::parse(black_box(&message)) else {
                panic!("fixture is an INSERT")
            };
            black_box(index.get(&tag))
        })
    });
    g.bench_function("normalise_only", |b| {
        b.iter(|| black_box(ImageRef::parse(black_box("nginx:1.27"))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
