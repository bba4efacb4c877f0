//! Hot-path benches: a request's round trip through a Backend into a null node (ns per
//! request, depth 1), and 4 KiB reads at queue depth 32 from a tmpfs file (ns per request).
//!
//! Run: `cargo bench --bench request`. The figures and the machine go to BENCHMARKS.md.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::drivers::{file, null};
use engine::{Backend, IoBuf, IoThread};

fn null_round_trip(c: &mut Criterion) {
    let t = IoThread::new().expect("io_uring");
    let node = null::open("null0", null::NullOptions::default()).unwrap();
    let backend = Backend::new(node, &[t.handle()]).unwrap();
    let mut g = c.benchmark_group("null");
    g.throughput(Throughput::Elements(1));
    g.bench_function("read_4k_depth1", |b| {
        b.iter_custom(|iters| {
            let be = backend.clone();
            t.block_on(move || async move {
                let mut buf = IoBuf::new(4096);
                let start = Instant::now();
                for i in 0..iters {
                    let (r, back) = be.read((i % 1024) * 4096, buf).await;
                    r.unwrap();
                    buf = back;
                }
                start.elapsed()
            })
            .unwrap()
        })
    });
    g.finish();
}

/// Runs `iters` 4 KiB random reads split over `depth` tasks on the backend's IoThread.
fn depth_reads(t: &IoThread, backend: &Backend, iters: u64, depth: u64, blocks: u64) -> Duration {
    let be = backend.clone();
    t.block_on(move || async move {
        let start = Instant::now();
        let mut hs = Vec::new();
        for w in 0..depth {
            let be = be.clone();
            let n = iters / depth + u64::from(w < iters % depth);
            hs.push(iothreads::spawn_local(async move {
                let mut buf = iothreads::alloc_buf(4096);
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1);
                for _ in 0..n {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let (r, back) = be.read((x % blocks) * 4096, buf).await;
                    r.unwrap();
                    buf = back;
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        start.elapsed()
    })
    .unwrap()
}

fn tmpfs_reads(c: &mut Criterion) {
    const SIZE: u64 = 256 << 20;
    let path =
        std::path::PathBuf::from(format!("/dev/shm/strata-bench-{}.img", std::process::id()));
    std::fs::write(&path, vec![0x5a; SIZE as usize]).unwrap();
    let t = IoThread::new().expect("io_uring");
    let mut g = c.benchmark_group("tmpfs");
    g.throughput(Throughput::Elements(1));
    for (label, aio) in [
        ("inline", file::Aio::Auto),
        ("io_uring", file::Aio::IoUring),
    ] {
        let opts = file::FileOptions {
            read_only: true,
            aio,
            ..file::FileOptions::new(&path)
        };
        let node = file::open("f0", &opts).unwrap();
        let backend = Backend::new(node, &[t.handle()]).unwrap();
        g.bench_function(format!("randread_4k_qd32_{label}"), |b| {
            b.iter_custom(|iters| depth_reads(&t, &backend, iters, 32, SIZE / 4096))
        });
    }
    g.finish();
    let _ = std::fs::remove_file(&path);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = null_round_trip, tmpfs_reads
}
criterion_main!(benches);
