//! Micro benchmarks of the hot path: index lookup, and parse + normalise + lookup of one GAR
//! message, against 10,000 workloads and 50,000 indexed refs; and the live view: the cost of
//! applying one watch event, and its heap at 10,000 and 100,000 workloads.
//!
//! `cargo bench --bench lookup`
//!
//! Criterion reports the mean of batched iterations. The targets are percentiles of single
//! calls, so the bench first prints a per-call distribution over keys spread across the whole
//! index (not one hot key), timed one call at a time (`Instant` adds ~20 ns to each figure).

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use gar_restarter::index::cache::codec;
use gar_restarter::index::live::{Change, LiveView, StreamId};
use gar_restarter::index::lookup::SharedIndex;
use gar_restarter::index::table::Index;
use gar_restarter::index::workload::{
    ContainerImage, PullPolicy, RestartRecord, RolloutStatus, WorkloadKind, WorkloadRef,
    WorkloadState,
};
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

/// Heap bytes in use, mapped blocks included: a large table (the view's image map at
/// 500,000 refs) is one block of its own mapping, and glibc's `uordblks` alone misses it.
fn heap_in_use() -> Option<usize> {
    gar_restarter::util::heap::stats().map(|s| s.in_use)
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

/// Workload `i` as the watch reports it, running `images` fixture images (version `v`).
fn workload(i: usize, images: usize, v: usize) -> WorkloadState {
    let mut w = WorkloadRef::new(
        WorkloadKind::Deployment,
        &format!("ns-{}", i % 50),
        &format!("svc-{i}"),
    );
    w.paused = false;
    WorkloadState {
        workload: w,
        containers: (0..images)
            .map(|j| ContainerImage {
                container: format!("c{j}").into(),
                init: false,
                image: ImageRef::parse(&fixtures::image(i, j + v)).ok(),
                pull_policy: Some(PullPolicy::IfNotPresent),
                // Fully spelled, like every GAR image: not stored twice.
                written: None,
            })
            .collect(),
        paused: false,
        annotations_enabled: None,
        strategy: None,
        last_restart: RestartRecord::default(),
        resource_version: Some(format!("{}", 1000 + i).into()),
        // As the API server writes one: a UUID.
        uid: Some(format!("{i:08x}-5d2c-4f0e-9a4b-{i:012x}").into()),
        generation: 1,
        status: RolloutStatus::default(),
    }
}

/// A live view listed with `n` workloads of `images` each, and the heap it holds.
fn listed(n: usize, images: usize) -> (LiveView, Option<usize>, std::time::Duration) {
    let stream = StreamId {
        kind: WorkloadKind::Deployment,
        namespace: None,
    };
    // Measured from before the states exist: the view keeps them, so they are its heap too.
    let before = heap_in_use();
    let states: Vec<WorkloadState> = (0..n).map(|i| workload(i, images, 0)).collect();
    let view = LiveView::new(vec![stream.clone()], false, std::time::Duration::ZERO);
    let started = Instant::now();
    view.apply(&stream, Change::ListStarted);
    for w in states {
        view.apply(&stream, Change::Listed(w));
    }
    view.apply(&stream, Change::ListDone);
    let took = started.elapsed();
    let heap = before.zip(heap_in_use()).map(|(b, a)| a.saturating_sub(b));
    assert!(view.is_synced());
    (view, heap, took)
}

fn bench_live(c: &mut Criterion) {
    let stream = StreamId {
        kind: WorkloadKind::Deployment,
        namespace: None,
    };
    for (n, images) in [(10_000, 5), (100_000, 5)] {
        let (view, heap, took) = listed(n, images);
        println!(
            "live view: {n} workloads / {} refs listed in {:.0} ms ({:.2} µs per event), heap {}",
            n * images,
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e6 / n as f64,
            heap.map_or("n/a".into(), |h| format!(
                "{:.1} MiB",
                h as f64 / 1_048_576.0
            )),
        );
        assert_eq!(view.image_count(), n * images);
    }
    let (view, _, _) = listed(10_000, 5);
    // Image changes spread over the whole view, prepared ahead so only `apply` is timed.
    let changes: Vec<WorkloadState> = (0..10_000)
        .map(|n| workload(n * 7_919 % 10_000, 5, 1 + n % 2))
        .collect();
    let mut next = changes.iter().cycle();
    print_distribution(
        "live/apply image change (10,000 workloads)",
        distribution(&changes, 2, |w| {
            view.apply(&stream, Change::Applied(black_box(w.clone())));
        }),
    );
    let probe = ImageRef::parse(&fixtures::image(4_321, 2)).expect("ref");
    let mut g = c.benchmark_group("live");
    g.bench_function("apply_image_change", |b| {
        b.iter(|| {
            let w = next.next().expect("cycle").clone();
            view.apply(&stream, Change::Applied(black_box(w)))
        })
    });
    g.bench_function("lookup_hit", |b| {
        b.iter(|| black_box(view.lookup(black_box(&probe))))
    });
    g.finish();
}

/// The snapshot at 100,000 workloads and 500,000 refs: its stored form and size, and the
/// cost of reading it back as a start-up does from a mounted sharded set (shards joined,
/// checksum, gunzip, parse, index built).
fn bench_snapshot(c: &mut Criterion) {
    let index = Index::from_json(&fixtures::cache_json(100_000, 5)).expect("index");
    let plain = index.to_json().len();
    let compact = index.to_compact_json().len();
    let enc = codec::encode(&index, codec::Limits::default()).expect("encodes");
    println!(
        "snapshot (100,000 workloads / 500,000 refs): plain JSON {:.1} MiB, compact JSON {:.1} MiB, \
         stored {} as {:.2} MiB in {} shards",
        plain as f64 / 1_048_576.0,
        compact as f64 / 1_048_576.0,
        enc.form.as_str(),
        enc.bytes as f64 / 1_048_576.0,
        enc.shards.len(),
    );
    let decode = || {
        codec::decode(&enc.data, &enc.binary_data, |i| {
            enc.shards.get(i).map(|(_, b)| b.clone())
        })
        .expect("decodes")
    };
    let started = Instant::now();
    let (back, _) = decode();
    println!(
        "snapshot decode (100,000 workloads): {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert!(back.same_content(&index));
    drop(back);
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    g.bench_function("decode_sharded_100k_workloads_500k_refs", |b| {
        b.iter(|| black_box(decode()))
    });
    g.finish();
}

criterion_group!(benches, bench, bench_live, bench_snapshot);
criterion_main!(benches);
