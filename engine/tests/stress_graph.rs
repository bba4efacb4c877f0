//! Stress: graph changes under load.
//!
//! Two IoThreads run 32 workers each against one backend, every worker verifying its own
//! blocks, while the controller, over and over, drains and
//! - swaps the backing edge of the top node between two nodes with identical content, and
//! - inserts a filter above the top node, then takes it out again.
//!
//! Checked: no request fails or is lost (every worker's data reads back as it wrote it); no
//! request reaches a node while it is cut out of the graph; requests reach the top node in the
//! order each IoThread submitted them; and nothing deadlocks (a watchdog aborts the test if no
//! request or change makes progress for 60 s).
//!
//! `cargo test -p engine --test stress_graph` runs 1,000 changes; the full 10,000 run is
//! `cargo test -p engine --test stress_graph -- --ignored`.

mod common;

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{uniq, Scratch};
use engine::drivers::blkdebug::{BlkdebugDriver, BlkdebugOptions};
use engine::drivers::file::{self, FileOptions};
use engine::{Backend, BackendOptions, Engine, EngineOptions, IoBuf};
use graph::{Driver, LocalBoxFuture, Node, Role, WriteFlags, ZeroFlags};
use iothreads::BufResult;
use parking_lot::Mutex;

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 4096; // 16 MiB
const WORKERS_PER_THREAD: u64 = 32;
const THREADS: usize = 2;

/// Block content: word 0 is the generation (0: never written, the base content); the other
/// words mix generation, block and position, so any misplaced or stale block shows.
fn fill(buf: &mut [u8], gen: u64, block: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = if i == 0 {
            gen
        } else {
            gen.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (block << 20) ^ i as u64
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn check(buf: &[u8], gen: u64, block: u64) -> bool {
    buf.chunks_exact(8).enumerate().all(|(i, w)| {
        let v = u64::from_le_bytes(w.try_into().unwrap());
        let want = if i == 0 {
            gen
        } else {
            gen.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (block << 20) ^ i as u64
        };
        v == want
    })
}

/// A minimal copy-on-write format for the test: a written block lives in the `file` child at
/// the same offset, an unwritten one is read from the `backing` child. It also checks that
/// requests from each IoThread arrive in the order they were submitted: the submitter puts a
/// per-IoThread sequence number in the first 8 bytes of every buffer.
struct Cow {
    written: Vec<AtomicBool>,
    last_seq: Vec<AtomicU64>,
    order_violations: AtomicUsize,
}

impl Cow {
    fn note_order(&self, buf: &IoBuf) {
        let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
        let t = iothreads::current_index().unwrap();
        let last = self.last_seq[t].swap(seq, Ordering::Relaxed);
        if seq <= last && last != u64::MAX {
            self.order_violations.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn missing(what: &str) -> io::Error {
    io::Error::other(format!("cow node has no {what} child"))
}

impl Driver for Cow {
    fn driver_name(&self) -> &'static str {
        "test-cow"
    }
    fn length(&self, _: &Node) -> u64 {
        BLOCK * BLOCKS
    }
    fn read<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        buf: IoBuf,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            self.note_order(&buf);
            let written = self.written[(off / BLOCK) as usize].load(Ordering::Acquire);
            let child = if written { node.file() } else { node.backing() };
            match child {
                Some(c) => c.read(off, buf).await,
                None => (Err(missing(if written { "file" } else { "backing" })), buf),
            }
        })
    }
    fn write<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            self.note_order(&buf);
            let Some(f) = node.file() else {
                return (Err(missing("file")), buf);
            };
            let (r, buf) = f.write(off, buf, flags).await;
            if r.is_ok() {
                self.written[(off / BLOCK) as usize].store(true, Ordering::Release);
            }
            (r, buf)
        })
    }
    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        _: u64,
        _: ZeroFlags,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }
    fn discard<'a>(&'a self, _: &'a Node, _: u64, _: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn flush<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            match node.file() {
                Some(f) => f.flush().await,
                None => Ok(()),
            }
        })
    }
    fn child_perms(
        &self,
        role: Role,
        perm: graph::Perm,
        shared: graph::Perm,
        ro: bool,
    ) -> (graph::Perm, graph::Perm) {
        match role {
            Role::File => graph::metadata_file_perms(perm, shared, ro),
            _ => graph::default_child_perms(role, perm, shared, ro),
        }
    }
}

fn base_file(tag: &str) -> Scratch {
    let s = Scratch::new_in("/dev/shm", tag);
    let mut data = vec![0u8; (BLOCK * BLOCKS) as usize];
    for (b, chunk) in data.chunks_exact_mut(BLOCK as usize).enumerate() {
        fill(chunk, 0, b as u64);
    }
    std::fs::write(&s.0, data).unwrap();
    s
}

fn ops(n: &Node) -> u64 {
    let s = n.stats();
    s.rd_ops + s.wr_ops + s.failed_ops
}

struct Load {
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    handles: Vec<iothreads::JoinHandle<()>>,
}

/// Starts the workers: each owns `BLOCKS / (THREADS * WORKERS)` blocks, writes and reads them
/// at random, and checks every read against what it last wrote.
fn start_load(e: &Engine, backend: &Backend) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let per_worker = BLOCKS / (THREADS as u64 * WORKERS_PER_THREAD);
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (b, stop, progress, failures) = (
            backend.clone(),
            stop.clone(),
            progress.clone(),
            failures.clone(),
        );
        handles.push(e.iothread(t).unwrap().spawn_with(move || async move {
            let seq = Rc::new(Cell::new(0u64));
            let mut ws = Vec::new();
            for w in 0..WORKERS_PER_THREAD {
                let first = (t as u64 * WORKERS_PER_THREAD + w) * per_worker;
                let (b, stop, progress, failures, seq) = (
                    b.clone(),
                    stop.clone(),
                    progress.clone(),
                    failures.clone(),
                    seq.clone(),
                );
                ws.push(iothreads::spawn_local(async move {
                    let mut gens = vec![0u64; per_worker as usize];
                    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (first + 1);
                    let mut buf = IoBuf::new(BLOCK as usize);
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let i = (x % per_worker) as usize;
                        let block = first + i as u64;
                        let s = seq.get() + 1;
                        seq.set(s);
                        if x & (1 << 40) != 0 {
                            fill(&mut buf, s, block);
                            let (r, back) = b.write(block * BLOCK, buf).await;
                            buf = back;
                            if let Err(e) = r {
                                failures.lock().push(format!("write of block {block}: {e}"));
                                return;
                            }
                            gens[i] = s;
                        } else {
                            buf[..8].copy_from_slice(&s.to_le_bytes());
                            let (r, back) = b.read(block * BLOCK, buf).await;
                            buf = back;
                            if let Err(e) = r {
                                failures.lock().push(format!("read of block {block}: {e}"));
                                return;
                            }
                            if !check(&buf, gens[i], block) {
                                failures.lock().push(format!(
                                    "block {block}: expected generation {}, read {}",
                                    gens[i],
                                    u64::from_le_bytes(buf[..8].try_into().unwrap())
                                ));
                                return;
                            }
                        }
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    // Read everything back once more.
                    for (i, g) in gens.iter().enumerate() {
                        let block = first + i as u64;
                        let s = seq.get() + 1;
                        seq.set(s);
                        buf[..8].copy_from_slice(&s.to_le_bytes());
                        let (r, back) = b.read(block * BLOCK, buf).await;
                        buf = back;
                        if r.is_err() || !check(&buf, *g, block) {
                            failures
                                .lock()
                                .push(format!("final read of block {block} wrong"));
                            return;
                        }
                    }
                }));
            }
            for w in ws {
                w.await.unwrap();
            }
        }));
    }
    Load {
        stop,
        progress,
        failures,
        handles,
    }
}

/// Aborts the process if neither requests nor changes progress for `limit`.
fn watchdog(progress: Vec<Arc<AtomicU64>>, done: Arc<AtomicBool>, limit: Duration) {
    std::thread::spawn(move || {
        let sum = || {
            progress
                .iter()
                .map(|p| p.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let mut last = sum();
        let mut since = Instant::now();
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let now = sum();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() > limit {
                eprintln!("watchdog: no progress for {limit:?}: deadlock");
                std::process::abort();
            }
        }
    });
}

fn stress(changes: usize) {
    // Stress runs are serialised within this binary: they measure nothing, but two at once
    // would starve each other on a small machine and stretch the watchdog's margins.
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock();
    let e = Engine::new(EngineOptions {
        iothreads: THREADS,
        ..Default::default()
    })
    .unwrap();
    let (fa, fb) = (base_file("base-a"), base_file("base-b"));
    let top_file = Scratch::new_in("/dev/shm", "top");
    std::fs::File::create(&top_file.0)
        .unwrap()
        .set_len(BLOCK * BLOCKS)
        .unwrap();
    let ro = |s: &Scratch| FileOptions {
        read_only: true,
        ..FileOptions::new(&s.0)
    };
    let a = file::open(&uniq("a"), &ro(&fa)).unwrap();
    let b = file::open(&uniq("b"), &ro(&fb)).unwrap();
    let tf = file::open(&uniq("tf"), &FileOptions::new(&top_file.0)).unwrap();
    let cow = Cow {
        written: (0..BLOCKS).map(|_| AtomicBool::new(false)).collect(),
        last_seq: (0..iothreads::MAX_IOTHREADS)
            .map(|_| AtomicU64::new(u64::MAX))
            .collect(),
        order_violations: AtomicUsize::new(0),
    };
    let top = Node::new(Some(&uniq("top")), Box::new(cow), false).unwrap();
    {
        let m = graph::mutation();
        let mut tx = graph::Transaction::new(&m);
        tx.attach_child(&top, &tf, Role::File).unwrap();
        tx.set_backing(&top, Some(&a)).unwrap();
        tx.commit().unwrap();
    }
    let backend =
        Backend::with_options(top.clone(), &e.iothreads(), BackendOptions::default()).unwrap();
    let load = start_load(&e, &backend);
    let change_count = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    watchdog(
        vec![load.progress.clone(), change_count.clone()],
        done.clone(),
        Duration::from_secs(60),
    );

    // Ops each node had when it was last cut out; it must not serve anything while out.
    let cut_out_at = Arc::new(Mutex::new(std::collections::HashMap::<String, u64>::new()));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut filters: Vec<Arc<Node>> = Vec::new();
    let mut filter_in: Option<Arc<Node>> = None;
    for i in 0..changes {
        let (top2, cut, viol) = (top.clone(), cut_out_at.clone(), violations.clone());
        if i % 2 == 0 {
            // Swap the backing edge between the identical nodes.
            let (a2, b2) = (a.clone(), b.clone());
            e.controller()
                .change_blocking(move |ctx| async move {
                    let d = ctx.drain(std::slice::from_ref(&top2)).await;
                    // Looked up after the drain, inside the change.
                    let cur = top2.backing().unwrap();
                    let next = if Arc::ptr_eq(&cur, &a2) { b2 } else { a2 };
                    if let Some(&was) = cut.lock().get(next.name()) {
                        if ops(&next) != was {
                            viol.lock()
                                .push(format!("{} served while cut out", next.name()));
                        }
                    }
                    ctx.transaction(|tx| tx.set_backing(&top2, Some(&next)))?;
                    cut.lock().insert(cur.name().to_string(), ops(&cur));
                    d.end();
                    Ok(())
                })
                .unwrap();
        } else if let Some(f) = filter_in.take() {
            let f2 = f.clone();
            e.controller()
                .change_blocking(move |ctx| async move {
                    let d = ctx.drain(std::slice::from_ref(&f2)).await;
                    ctx.transaction(|tx| tx.drop_filter(&f2))?;
                    cut.lock().insert(f2.name().to_string(), ops(&f2));
                    d.end();
                    Ok(())
                })
                .unwrap();
            filters.push(f);
        } else {
            let f = e
                .controller()
                .change_blocking(move |ctx| async move {
                    let f = Node::new(
                        Some(&uniq("flt")),
                        Box::new(BlkdebugDriver::new(BlkdebugOptions::default())),
                        false,
                    )?;
                    ctx.transaction(|tx| tx.attach_child(&f, &top2, Role::Filtered).map(drop))?;
                    let d = ctx.drain(std::slice::from_ref(&top2)).await;
                    ctx.transaction(|tx| tx.insert_filter(&f, &top2))?;
                    d.end();
                    Ok(f)
                })
                .unwrap();
            filter_in = Some(f);
        }
        change_count.fetch_add(1, Ordering::Relaxed);
        if !load.failures.lock().is_empty() {
            break;
        }
        // Let the load run between changes, so every change meets requests in flight.
        let start = load.progress.load(Ordering::Relaxed);
        while load.progress.load(Ordering::Relaxed) < start + 64 && load.failures.lock().is_empty()
        {
            std::thread::yield_now();
        }
    }
    load.stop.store(true, Ordering::Relaxed);
    for h in load.handles {
        h.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);

    let failures = load.failures.lock().clone();
    assert!(
        failures.is_empty(),
        "requests failed or read wrong data: {failures:?}"
    );
    let cow = top.driver_as::<Cow>().unwrap();
    assert_eq!(
        cow.order_violations.load(Ordering::Relaxed),
        0,
        "requests reordered"
    );
    let cut = cut_out_at.lock();
    for f in &filters {
        assert_eq!(
            ops(f),
            cut[f.name()],
            "filter {} served after it was cut out",
            f.name()
        );
    }
    let cur = top.backing().unwrap();
    let out = if Arc::ptr_eq(&cur, &a) { &b } else { &a };
    assert_eq!(
        ops(out),
        cut[out.name()],
        "{} served after it was cut out",
        out.name()
    );
    assert!(violations.lock().is_empty(), "{:?}", violations.lock());
    assert!(load.progress.load(Ordering::Relaxed) > 0);
    assert!(backend.held_total() > 0, "the drains held requests");
    eprintln!(
        "{changes} changes, {} requests, {} held",
        load.progress.load(Ordering::Relaxed),
        backend.held_total()
    );
}

#[test]
fn graph_changes_under_load() {
    stress(1_000);
}

#[test]
#[ignore = "long: 10,000 graph changes (run with --ignored)"]
fn graph_changes_under_load_10000() {
    stress(10_000);
}
