//! Drains and block jobs: a job asleep in its rate limiter counts as quiet (the drain does not
//! wait for it to wake), a running job parks at its next pause point and makes no progress
//! while drained, and it resumes and finishes with the right data once the drain ends.
//!
//! The images are checked with qemu-img as the oracle (the tests skip where it is absent).

mod common;
#[path = "common/drain_util.rs"]
mod drain_util;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    assert_backing, assert_check_clean, default_engine, file_spec, have_qemu, open_chain,
    qemu_content, qemu_img_create, run_qemu_io, uniq, Scratch,
};
use drain_util::{drain_in_change, join_within, wait_until};
use engine::drivers::file::FileOptions;
use engine::job::stream::StreamArgs;
use engine::job::{Job, JobEventKind, JobInfo, JobStatus};
use engine::{BackingSpec, ChildSpec, DriverSpec, Engine, IoBuf, NodeSpec};
use graph::{BlockStatus, Driver, LocalBoxFuture, Node, Role, WriteFlags, ZeroFlags};
use iothreads::BufResult;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Blocks IoThread `t` (nothing else runs on it) until the returned sender is dropped or
/// sent to. Returns once the IoThread is blocked.
fn block_iothread(t: &iothreads::IoThreadHandle) -> std::sync::mpsc::Sender<()> {
    let (unblock, blocked_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    drop(t.spawn_with(move || async move {
        let _ = started_tx.send(());
        // A blocking wait on purpose: the loop cannot poll any task until it returns.
        let _ = blocked_rx.recv();
    }));
    started
        .recv_timeout(drain_util::HANG)
        .expect("the IoThread never ran the blocking task");
    unblock
}

/// A stream job with `speed` 1 byte/s copies one chunk and then sleeps for hours in its rate
/// limiter. A drain of its node completes while it sleeps: the job counts as quiet there and
/// does not have to wake up (its IoThread is blocked for the whole drain, so it could not),
/// and its progress does not move while drained. Then the job is cancelled and the images
/// are as before.
#[test]
fn a_job_asleep_in_its_rate_limiter_is_quiet() {
    if !have_qemu() {
        return;
    }
    // Base data in every chunk: each chunk the job copies counts against its speed.
    let imgs = make_full_base_chain("dsl", 4 * MIB);
    let top_path = imgs[1].path().to_string();
    let before = qemu_content(&top_path);
    // One IoThread: jobs, the controller's I/O and everything else run on IoThread 0.
    let e = default_engine();
    let names = open_chain(&e, &imgs, "dsl");
    let events = e.jobs().subscribe();
    let id = uniq("sleepy");
    let (job, asleep) = stream_asleep_in_its_rate_limiter(&e, &names[1], id.clone());
    assert_eq!(asleep.status, JobStatus::Running);
    assert!(!asleep.paused);
    assert!(
        asleep.current_progress < asleep.total_progress,
        "{asleep:?}"
    );

    // Nothing runs on the job's IoThread from here until the drain is complete: if the drain
    // needed the job to wake up (or to reach a pause point) it would never complete. (An empty
    // change first: it starts only once no close is pending, so the drain's change, which does
    // no I/O, does not wait for a close on the blocked IoThread either.)
    e.controller()
        .change_blocking(|_ctx| async { Ok(()) })
        .unwrap();
    let unblock = block_iothread(&e.iothread(0).unwrap());
    let top = e.node(&names[1]).unwrap();
    let j = Arc::clone(&job);
    let t2 = Arc::clone(&top);
    let (seen, held) = drain_in_change(&e, vec![Arc::clone(&top)], move || {
        (j.info(), t2.quiesce_count())
    });
    let (at_drain, quiesce) = join_within(seen, "the drain of a node whose job sleeps");
    assert_eq!(quiesce, 1);
    assert_eq!(
        at_drain.current_progress, asleep.current_progress,
        "the job copied during the drain"
    );
    assert!(at_drain.paused, "the drain pauses the job: {at_drain:?}");
    assert!(!at_drain.busy, "{at_drain:?}");
    assert_eq!(
        at_drain.status,
        JobStatus::Running,
        "a drain pauses quietly"
    );
    drop(unblock);
    // The job wakes now, sees the drain and parks: still no progress while drained.
    std::thread::sleep(Duration::from_millis(200));
    let later = job.info();
    assert_eq!(
        later.current_progress, asleep.current_progress,
        "the job copied while drained"
    );
    assert!(later.paused && !later.busy, "{later:?}");
    held.end();
    assert!(!job.info().paused);

    job.cancel(true).unwrap();
    let end = job.wait();
    assert_eq!(end.status, JobStatus::Null, "{end:?}");
    let evs: Vec<JobEventKind> = events.try_iter().map(|e| e.kind).collect();
    assert!(
        evs.iter()
            .any(|k| matches!(k, JobEventKind::Cancelled { id: i, .. } if *i == id)),
        "{evs:?}"
    );
    assert!(
        !evs.iter().any(|k| matches!(
            k,
            JobEventKind::StatusChange {
                status: JobStatus::Paused,
                ..
            }
        )),
        "a drain pauses a job without events: {evs:?}"
    );
    // The cancelled stream leaves the chain as it was, without its filter.
    assert_eq!(top.backing().unwrap().name(), names[0]);
    assert!(top.parents().is_empty(), "the job's filter is gone");
    drop(top);
    drop(e);
    assert_backing(&top_path, Some(imgs[0].path()));
    assert_check_clean(&top_path);
    assert_eq!(qemu_content(&top_path), before);
}

/// QEMU's `block_job_ratelimit_sleep`: "If the job is reentered early, keep waiting until
/// we've waited for the full time that is necessary to keep the job at the right speed." A
/// drain that interrupts a rate-limit sleep must not let the job copy the next chunk at once
/// when it ends: with `speed` 1 byte/s the rest of the sleep is hours long.
#[test]
fn a_drain_does_not_cut_a_rate_limit_sleep_short() {
    if !have_qemu() {
        return;
    }
    let imgs = make_full_base_chain("drs", 4 * MIB);
    let e = default_engine();
    let names = open_chain(&e, &imgs, "drs");
    let (job, asleep) = stream_asleep_in_its_rate_limiter(&e, &names[1], uniq("slow"));
    let top = e.node(&names[1]).unwrap();
    let (seen, held) = drain_in_change(&e, vec![Arc::clone(&top)], || ());
    join_within(seen, "the drain");
    // Let the job see the drain and park at its pause point.
    std::thread::sleep(Duration::from_millis(100));
    held.end();
    // The job owes hours of sleep: it must go back to sleep, not copy.
    std::thread::sleep(Duration::from_millis(500));
    let after = job.info();
    job.cancel(true).unwrap();
    job.wait();
    assert_eq!(
        after.current_progress,
        asleep.current_progress,
        "the job copied {} bytes right after the drain ended, hours early",
        after.current_progress - asleep.current_progress
    );
    drop(top);
    drop(e);
    assert_check_clean(imgs[1].path());
}

/// A filter that lets a given number of reads through and holds the rest until allowed (it
/// counts the reads it holds and the reads it passed). Everything else passes.
struct ReadGate {
    /// Reads that may still pass; `OPEN`: any number.
    allow: AtomicU64,
    waiting: AtomicU64,
    passed: AtomicU64,
}

const OPEN: u64 = u64::MAX;

impl ReadGate {
    fn of(node: &Node) -> &ReadGate {
        node.driver_as::<ReadGate>().unwrap()
    }

    async fn pass(&self) {
        let mut held = false;
        loop {
            let a = self.allow.load(Ordering::SeqCst);
            if a == OPEN {
                break;
            }
            if a > 0
                && self
                    .allow
                    .compare_exchange(a, a - 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                break;
            }
            if !held {
                held = true;
                self.waiting.fetch_add(1, Ordering::SeqCst);
            }
            let _ = iothreads::op::sleep(Duration::from_millis(1)).await;
        }
        if held {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.passed.fetch_add(1, Ordering::SeqCst);
    }
}

fn no_child() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "gate without a child")
}

impl Driver for ReadGate {
    fn driver_name(&self) -> &'static str {
        "read-gate"
    }
    fn length(&self, node: &Node) -> u64 {
        node.filtered().map_or(0, |c| c.len())
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn read<'a>(&'a self, node: &'a Node, off: u64, b: IoBuf) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            self.pass().await;
            match node.filtered() {
                Some(c) => c.read(off, b).await,
                None => (Err(no_child()), b),
            }
        })
    }
    fn write<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        b: IoBuf,
        f: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            match node.filtered() {
                Some(c) => c.write(off, b, f).await,
                None => (Err(no_child()), b),
            }
        })
    }
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
        f: ZeroFlags,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let c = node.filtered().ok_or_else(no_child)?;
            c.write_zeroes(off, len, f).await
        })
    }
    fn discard<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let c = node.filtered().ok_or_else(no_child)?;
            c.discard(off, len).await
        })
    }
    fn flush<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move { node.filtered().ok_or_else(no_child)?.flush().await })
    }
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, io::Result<(BlockStatus, u64)>> {
        Box::pin(async move {
            let c = node.filtered().ok_or_else(no_child)?;
            c.block_status(off, len).await
        })
    }
}

/// A base image of `size` bytes with data everywhere (512 KiB stripe i holds byte i + 1, so
/// every chunk of a stream copies from it) and a top image over it with 64 KiB of its own.
fn make_full_base_chain(tag: &str, size: u64) -> [Scratch; 2] {
    let base = Scratch::new_in("/var/tmp", &format!("{tag}base"));
    let top = Scratch::new_in("/var/tmp", &format!("{tag}top"));
    qemu_img_create("qcow2", base.path(), None, Some(size));
    let stripe = 512 * KIB;
    let cmds: Vec<String> = (0..size / stripe)
        .map(|i| format!("write -P {} {} {}", (i % 250) + 1, i * stripe, stripe))
        .collect();
    run_qemu_io("qcow2", base.path(), &cmds);
    qemu_img_create(
        "qcow2",
        top.path(),
        Some((base.path(), "qcow2")),
        Some(size),
    );
    run_qemu_io("qcow2", top.path(), &["write -P 238 1M 64k"]);
    [base, top]
}

/// Starts stream job `id` into `top` at 1 byte/s and waits until it has copied its first
/// chunk (512 KiB of base data, at once) and sleeps in its rate limiter (512 Ki seconds);
/// returns the job and its info then.
fn stream_asleep_in_its_rate_limiter(e: &Engine, top: &str, id: String) -> (Arc<Job>, JobInfo) {
    let mut args = StreamArgs::new(top);
    args.job.job_id = Some(id);
    args.job.speed = 1;
    let job = e.stream(args).unwrap();
    let asleep = wait_until(
        "the job to copy a chunk and sleep in its rate limiter",
        || {
            let i = job.info();
            (i.current_progress > 0 && !i.busy).then_some(i)
        },
    );
    (job, asleep)
}

/// A stream job with no speed limit, reading its base through a gate that holds its reads,
/// is running (some progress, reads waiting at the gate) when a drain of its nodes begins.
/// The drain cannot complete while the job's reads are held; once the gate opens, the job
/// finishes what it has in flight and parks at its next pause point, and the drain
/// completes. While drained its progress does not move and no read reaches the base. When
/// the drain ends it resumes, completes, and the top image holds the whole chain's data.
#[test]
fn a_running_job_parks_at_its_next_pause_point_under_a_drain() {
    if !have_qemu() {
        return;
    }
    let size = 16 * MIB;
    let [base_img, top_img] = make_full_base_chain("dpp", size);
    let before = qemu_content(top_img.path());
    let e = default_engine();
    let p = uniq("dpp");
    let (file_name, gate_name, base_name, top_name) = (
        format!("{p}file"),
        format!("{p}gate"),
        format!("{p}base"),
        format!("{p}top"),
    );
    // base qcow2 -> file: gate -> filtered: the base image's file node.
    e.add_node(NodeSpec {
        node_name: Some(file_name.clone()),
        read_only: true,
        driver: DriverSpec::File(FileOptions::new(base_img.path())),
    })
    .unwrap();
    let (gn, fname) = (gate_name.clone(), file_name.clone());
    let gate = e
        .controller()
        .change_blocking(move |ctx| async move {
            let file = engine::engine::lookup(&fname)?;
            let g = Node::new(
                Some(&gn),
                Box::new(ReadGate {
                    allow: AtomicU64::new(OPEN),
                    waiting: AtomicU64::new(0),
                    passed: AtomicU64::new(0),
                }),
                true,
            )?;
            ctx.transaction(|tx| tx.attach_child(&g, &file, Role::Filtered).map(drop))?;
            Ok(g)
        })
        .unwrap();
    let base = e
        .add_node(NodeSpec {
            node_name: Some(base_name.clone()),
            read_only: true,
            driver: DriverSpec::Qcow2 {
                file: ChildSpec::Name(gate_name.clone()),
                backing: BackingSpec::None,
                opts: Default::default(),
            },
        })
        .unwrap();
    let top = e
        .add_node(NodeSpec {
            node_name: Some(top_name.clone()),
            read_only: false,
            driver: DriverSpec::Qcow2 {
                file: file_spec(top_img.path(), false),
                backing: BackingSpec::Node(ChildSpec::Name(base_name.clone())),
                opts: Default::default(),
            },
        })
        .unwrap();
    let g = ReadGate::of(&gate);
    g.allow.store(0, Ordering::SeqCst);

    let events = e.jobs().subscribe();
    let mut args = StreamArgs::new(&top_name);
    let id = uniq("busy");
    args.job.job_id = Some(id.clone());
    let job = e.stream(args).unwrap();
    // Let reads through one at a time while the job has no progress. Once it has some, let
    // no more through (revoking a grant not yet taken) and wait until a read is held: the job
    // is then busy and cannot finish (most chunks still need reads), and the reads held stay
    // held until the gate opens.
    let running = wait_until("the job to make progress and wait at the gate", || {
        let i = job.info();
        if i.current_progress > 0 {
            g.allow.store(0, Ordering::SeqCst);
            return (g.waiting.load(Ordering::SeqCst) > 0).then_some(i);
        }
        if g.waiting.load(Ordering::SeqCst) > 0 {
            let _ = g
                .allow
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
        }
        None
    });
    assert_eq!(running.status, JobStatus::Running);
    assert!(running.busy, "{running:?}");
    assert!(running.current_progress < size, "{running:?}");

    let j = Arc::clone(&job);
    let (g2, t2) = (Arc::clone(&gate), Arc::clone(&top));
    let passed = move || ReadGate::of(&g2).passed.load(Ordering::SeqCst);
    let passed_at = passed.clone();
    let (seen, held) = drain_in_change(&e, vec![Arc::clone(&top), Arc::clone(&base)], move || {
        (j.info(), passed_at(), t2.in_flight(), t2.quiesce_count())
    });
    // The drain has begun (the job is asked to pause) but cannot complete: the job is busy,
    // with reads held at the gate.
    wait_until("the drain to reach the job", || {
        job.info().paused.then_some(())
    });
    assert!(
        g.waiting.load(Ordering::SeqCst) > 0,
        "the job's reads are still held"
    );
    assert!(
        !seen.is_finished(),
        "the drain completed while the job had reads in flight"
    );
    g.allow.store(OPEN, Ordering::SeqCst);
    let (at_drain, passed_at_drain, top_in_flight, quiesce) =
        join_within(seen, "the drain of a running job's nodes");
    assert_eq!(top_in_flight, 0);
    assert_eq!(quiesce, 1);
    assert_eq!(
        at_drain.status,
        JobStatus::Running,
        "a drain pauses quietly"
    );
    assert!(at_drain.paused && !at_drain.busy, "{at_drain:?}");
    assert!(
        at_drain.current_progress >= running.current_progress && at_drain.current_progress < size,
        "the job parked before the end: {at_drain:?}"
    );
    // Drained: nothing moves.
    std::thread::sleep(Duration::from_millis(200));
    let later = job.info();
    assert_eq!(
        later.current_progress, at_drain.current_progress,
        "the job made progress while drained"
    );
    assert_eq!(
        passed(),
        passed_at_drain,
        "a read reached the base while drained"
    );
    assert!(later.paused && !later.busy, "{later:?}");
    held.end();

    let end = job.wait();
    assert_eq!(end.error, None);
    assert_eq!(end.status, JobStatus::Null);
    let evs: Vec<JobEventKind> = events.try_iter().map(|e| e.kind).collect();
    assert!(
        evs.iter().any(|k| matches!(
            k,
            JobEventKind::Completed { id: i, error: None, len, offset, .. }
            if *i == id && *len == size && *offset == size
        )),
        "{evs:?}"
    );
    assert!(top.backing().is_none(), "the whole chain was streamed");
    assert_eq!(base.quiesce_count(), 0);
    assert_eq!(top.quiesce_count(), 0);
    drop((top, base, gate, job));
    drop(e);
    assert_backing(top_img.path(), None);
    assert_check_clean(top_img.path());
    assert_eq!(qemu_content(top_img.path()), before);
}
