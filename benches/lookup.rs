//! Micro benchmarks of the hot path: index lookup, and parse + normalise + lookup of one GAR
//! message, against 10,000 workloads and 50,000 indexed refs.
//!
//! `cargo bench --bench lookup`
//!
//! Criterion reports the mean of batched iterations. The targets are percentiles of single
//! calls, so the bench first prints a per-call distribution over keys spread across the whole
//! index (not one hot key), timed one call at a time (`Instant` adds ~20 ns to each figure).

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use gar_restarter::index::lookup::SharedIndex;
use gar_restarter::index::table::Index;
use gar_restarter::ingest::event::{self, Event};
use gar_restarter::ingest::image::ImageRef;
use gar_testsupport::fixtures;

/// Per-call latencies (ns) of `f` over `inputs`, cycled `rounds` times: p50, p99, p99.9, max.
fn distribution<T>(inputs: &[T], rounds: usize, mut f: impl FnMut(&T)) -> [u128; 4] {
    let mut ns = Vec::with_capacity(inputs.len() * rounds);
    for _ in 0..rounds {
        for input in inputs {
            let started = Instant::now();
            f(input);
            ns.push(started.elapsed().as_nanos());
        }
    }
    ns.sort_unstable();
    let at = |p: f64| ns[((ns.len() - 1) as f64 * p) as usize];
    [at(0.5), at(0.99), at(0.999), ns[ns.len() - 1]]
}

fn print_distribution(name: &str, [p50, p99, p999, max]: [u128; 4]) {
    println!("{name:<40} per call: p50 {p50} ns, p99 {p99} ns, p99.9 {p999} ns, max {max} ns");
}

/// Heap bytes in use (glibc's count), to report what a loaded index holds.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> Option<usize> {
    // SAFETY: mallinfo2 only reads glibc's allocator statistics.
    Some(unsafe { libc::mallinfo2() }.uordblks)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> Option<usize> {
    None
}

fn bench(c: &mut Criterion) {
    let json = fixtures::cache_json(10_000, 5);
    let before = heap_in_use();
    let index = SharedIndex::new(Index::from_json(&json).expect("index"));
    if let (Some(before), Some(after)) = (before, heap_in_use()) {
        println!(
            "index heap: {:.1} MiB for 10,000 workloads / 50,000 refs (cache.json is {:.1} MiB)",
            after.saturating_sub(before) as f64 / 1_048_576.0,
            json.len() as f64 / 1_048_576.0
        );
    }
    assert_eq!(index.load().image_count(), 50_000);

    // A pseudo-random walk over every workload's images (a multiplicative step, no RNG):
    // the n-th (workload, image) pair visited.
    let walk = |n: usize| {
        let k = n * 7_919 % 50_000;
        (k / 5, k % 5)
    };
    let hits: Vec<ImageRef> = (0..50_000)
        .map(|n| {
            let (i, j) = walk(n);
            ImageRef::parse(&fixtures::image(i, j)).expect("ref")
        })
        .collect();
    let messages: Vec<Vec<u8>> = (0..10_000)
        .map(|n| {
            let (i, j) = walk(n);
            fixtures::gar_insert(i, j)
        })
        .collect();
    print_distribution(
        "lookup/hit (50,000 distinct keys)",
        distribution(&hits, 4, |r| {
            assert!(black_box(index.get(r)).is_some());
        }),
    );
    print_distribution(
        "message/parse_normalise_lookup (10,000)",
        distribution(&messages, 4, |m| {
            let Ok(Event::Insert { tag, .. }) = event::parse(black_box(m)) else {
                panic!("fixture is an INSERT")
            };
            assert!(black_box(index.get(&tag)).is_some());
        }),
    );
    let hit = ImageRef::parse(&fixtures::image(4_321, 2)).expect("ref");
    let miss = ImageRef::parse("europe-west4-docker.pkg.dev/p/t/unknown:v1").expect("ref");
    let message = fixtures::gar_insert(4_321, 2);

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
