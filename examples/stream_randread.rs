//! A guest's 4 KiB random reads at depth 32 on the top of a qcow2 chain, first alone, then
//! while a rate-limited `stream` job copies the chain into the top: prints the IOPS of both
//! phases (one JSON line), for the "guest I/O during a block job" figure of BENCHMARKS.md.
//!
//! ```sh
//! cargo build --release --example stream_randread
//! target/release/examples/stream_randread TOP.qcow2 [SECONDS=5] [SPEED=100M] [--same-thread]
//!     [--paused]
//! ```
//!
//! The chain is opened with `cache.direct` (O_DIRECT) and the engine's default I/O mode. The
//! guest's backend is served by IoThread 1 and the job runs on IoThread 0 (as a VM's device
//! and a job would each have their own), or both on IoThread 0 with `--same-thread`. The job
//! puts its copy-on-read filter above the top; unlike QEMU's, it does not copy on the guest's
//! reads (they are served from below and only leave hints for the job), so the guest pays
//! for the job's own copying alone. The stream is cancelled at the end of the second phase
//! (TOP stays a valid image, partly streamed): use a fresh copy per run. The second phase ends
//! early if the stream ends, so that only reads made while it ran count (`seconds_during`).
//! With `--paused` the job is paused as soon as it starts, so the second phase measures what
//! the filter alone costs the guest, without the job's copying.

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::backend::BackendOptions;
use engine::image::{self, ImageOptions};
use engine::job::stream::StreamArgs;
use engine::job::{JobOptions, JobStatus};
use engine::{Backend, Engine, EngineOptions, IoThreadHandle};

fn parse_size(s: &str) -> u64 {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("a size") * mult
}

/// Runs `seconds` of 4 KiB random reads at depth 32 over the whole device on `io` (less if
/// `stop` is set meanwhile); returns the reads done and the time they took.
fn randread(
    io: &IoThreadHandle,
    backend: &Backend,
    seconds: f64,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (u64, f64) {
    let b = backend.clone();
    io.block_on(move || async move {
        let blocks = b.len() / 4096;
        let done = Rc::new(Cell::new(0u64));
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for w in 0..32u64 {
            let (b, done, stop) = (b.clone(), Rc::clone(&done), Arc::clone(&stop));
            tasks.push(iothreads::spawn_local(async move {
                // xorshift64*, one stream per worker.
                let mut x = (seed ^ (w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
                let mut buf = iothreads::alloc_buf(4096);
                while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    let block = x.wrapping_mul(0x2545_F491_4F6C_DD1D) % blocks;
                    let (r, back) = b.read(block * 4096, buf).await;
                    r.expect("a guest read");
                    buf = back;
                    done.set(done.get() + 1);
                }
            }));
        }
        for t in tasks {
            t.await.expect("a reader task");
        }
        (done.get(), start.elapsed().as_secs_f64())
    })
    .expect("the guest's IoThread")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let same_thread = args.iter().any(|a| a == "--same-thread");
    let paused = args.iter().any(|a| a == "--paused");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let top = PathBuf::from(
        pos.first()
            .expect("usage: stream_randread TOP [SECONDS] [SPEED]"),
    );
    let seconds: f64 = pos.get(1).map_or(5.0, |s| s.parse().expect("seconds"));
    let speed = pos.get(2).map_or(100 << 20, |s| parse_size(s));

    let engine = Engine::new(EngineOptions {
        iothreads: 2,
        ..EngineOptions::default()
    })
    .expect("an engine");
    let job_io = engine.iothread(0).expect("IoThread 0");
    let guest_io = if same_thread {
        job_io.clone()
    } else {
        engine.iothread(1).expect("IoThread 1")
    };
    let opts = ImageOptions {
        direct: true,
        ..ImageOptions::default()
    };
    let path = top.clone();
    let node = job_io
        .block_on(move || async move { image::open(&path, &opts).await })
        .expect("IoThread 0")
        .unwrap_or_else(|e| panic!("cannot open {}: {}", top.display(), e.full_message()));
    let backend = Backend::with_options(
        node.clone(),
        std::slice::from_ref(&guest_io),
        BackendOptions {
            name: Some("guest".into()),
            ..BackendOptions::default()
        },
    )
    .expect("a backend");

    let never = Arc::new(AtomicBool::new(false));
    let (alone, t_alone) = randread(&guest_io, &backend, seconds, 1, never);
    let job = engine
        .stream(StreamArgs {
            job: JobOptions {
                job_id: Some("stream".into()),
                speed: speed as i64,
                ..JobOptions::default()
            },
            ..StreamArgs::new(node.name())
        })
        .expect("a stream job");
    if paused {
        job.user_pause().expect("pause the job");
    }
    // The second phase ends early if the stream does: only reads made while it ran count.
    let ended = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (job, ended) = (Arc::clone(&job), Arc::clone(&ended));
        std::thread::spawn(move || {
            job.wait_for(JobStatus::Waiting);
            ended.store(true, Ordering::Relaxed);
        })
    };
    let (during, t_during) = randread(&guest_io, &backend, seconds, 2, Arc::clone(&ended));
    let copied = job.info().current_progress;
    let finished = matches!(
        job.status(),
        JobStatus::Concluded | JobStatus::Null | JobStatus::Pending | JobStatus::Waiting
    );
    let _ = job.cancel(true);
    job.wait();
    let _ = watcher.join();
    let (a, d) = (alone as f64 / t_alone, during as f64 / t_during);
    println!(
        "{{\"iops_alone\": {a:.0}, \"iops_during_stream\": {d:.0}, \"ratio\": {:.3}, \
         \"stream_speed\": {speed}, \"stream_progress\": {copied}, \"seconds\": {seconds}, \
         \"seconds_during\": {t_during:.3}, \
         \"stream_finished\": {finished}, \"same_thread\": {same_thread}, \"paused\": {paused}}}",
        d / a
    );
    drop(backend);
    drop(node);
    drop(engine);
}
