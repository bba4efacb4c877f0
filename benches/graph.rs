//! Graph hot paths: a drained section on an idle node (begin + end, nothing in flight), the
//! graph lock's read side (enter + exit), and the read side under contention (two IoThreads
//! reading while a third thread takes the write side in a loop).
//!
//! Run: `cargo bench --bench graph`. Figures go to BENCHMARKS.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use engine::drivers::null::{self, NullOptions};
use engine::{Backend, IoThread};

fn drain_idle(c: &mut Criterion) {
    let t = IoThread::new().expect("io_uring");
    let node = null::open("drain-bench", NullOptions::default()).unwrap();
    // A backend above the node, as in real use: the section walks up to it and tells it to hold.
    let _b = Backend::new(node.clone(), &[t.handle()]).unwrap();
    c.bench_function("drain/begin_end_idle", |b| {
        b.iter(|| {
            let d = {
                let _m = graph::mutation();
                graph::drained_begin(std::slice::from_ref(&node))
            };
            assert!(d.is_quiesced());
            d.end();
        })
    });
}

fn lock_read_side(c: &mut Criterion) {
    let t = IoThread::new().expect("io_uring");
    c.bench_function("graph_lock/read_enter_exit", |b| {
        b.iter_custom(|iters| {
            t.block_on(move || async move {
                let lock = graph::graph_lock();
                let start = Instant::now();
                for _ in 0..iters {
                    let g = lock.read();
                    std::hint::black_box(&g);
                    drop(g);
                }
                start.elapsed()
            })
            .unwrap()
        })
    });
}

/// Two IoThreads take the read side `iters` times each while a plain thread takes the write
/// side in a loop (each write section empty, as a graph change's pointer swap nearly is).
/// Reports the time per read section.
fn lock_contended(c: &mut Criterion) {
    let readers = [
        IoThread::new().expect("io_uring"),
        IoThread::new().expect("io_uring"),
    ];
    let writes = Arc::new(AtomicU64::new(0));
    c.bench_function("graph_lock/read_2_threads_with_writer", |b| {
        b.iter_custom(|iters| {
            let stop = Arc::new(AtomicBool::new(false));
            let (s2, w2) = (stop.clone(), writes.clone());
            let writer = std::thread::spawn(move || {
                while !s2.load(Ordering::Relaxed) {
                    graph::graph_lock().with_write(|_| {});
                    w2.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(20));
                }
            });
            let hs: Vec<_> = readers
                .iter()
                .map(|t| {
                    t.spawn_with(move || async move {
                        let lock = graph::graph_lock();
                        let start = Instant::now();
                        for _ in 0..iters {
                            let g = lock.read();
                            std::hint::black_box(&g);
                            drop(g);
                        }
                        start.elapsed()
                    })
                })
                .collect();
            let total: Duration = hs.into_iter().map(|h| h.join().unwrap()).max().unwrap();
            stop.store(true, Ordering::Relaxed);
            writer.join().unwrap();
            total
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = drain_idle, lock_read_side, lock_contended
}
criterion_main!(benches);
