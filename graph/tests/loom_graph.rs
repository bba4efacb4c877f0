//! Model checks (run with `RUSTFLAGS="--cfg loom"`, bounded preemptions) of the protocols
//! that keep requests and graph changes apart, on the real code:
//! - the in-flight/quiesce protocol (graph/src/quiesce.rs: `Gate`, `DrainEvent`, which nodes,
//!   drained sections and the engine's backends all call): a drainer that sees its section
//!   quiet has every request that got in ordered before it (loom's UnsafeCell reports a
//!   request still reading what the drainer then changes), and a drainer asleep is always
//!   woken once the section is quiet (loom reports a drainer asleep forever as a deadlock);
//! - the backend's entry check with holding (`Gate::try_enter`, a held request's
//!   `Gate::try_resume`), under two overlapping drains;
//! - the graph lock (graph/src/lock.rs): a writer never changes a child pointer while a
//!   reader reads it.
//!
//! The drainer waits as `Drained::wait_blocking` does: poll (`DrainEvent::poll_quiet`) with a
//! waker that wakes it, sleep, poll again.
//!
//! Each model must fail when the protocol is broken: a fence taken out of `Gate::is_quiet` or
//! `PerThreadCounter::enter`/`leave`, the waker registered after the second look in
//! `poll_quiet`, or a backing-out `try_enter` that does not notify.

#![cfg(loom)]

use std::task::{Wake, Waker};

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

use graph::lock::{GraphCell, GraphLock};
use graph::quiesce::{DrainEvent, Gate};

/// Runs `f` under loom with `preemptions` preemptions at most (`LOOM_MAX_PREEMPTIONS` in the
/// environment overrides it); prints how many executions it explored (seen with
/// `--nocapture`).
fn model(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut b = loom::model::Builder::new();
    let preemptions = *b.preemption_bound.get_or_insert(preemptions);
    // The lock's and the held request's waits spin (yielding under loom); give them room.
    b.max_branches = 100_000;
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let start = std::time::Instant::now();
    b.check(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        f()
    });
    println!(
        "{} executions, preemption bound {preemptions}, {:.1?}",
        runs.load(Ordering::Relaxed),
        start.elapsed()
    );
}

/// A drainer's sleep: a waker that notifies, and the wait for it. (Not park/unpark: loom's
/// join waits on the same park state, and a late wake of a stale waker would trip it.)
struct Sleep(loom::sync::Notify);

impl Wake for Sleep {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.notify();
    }
}

/// The drainer's wait, as `Drained::wait_blocking`: sleeps until `quiet` holds.
fn wait_quiet(ev: &DrainEvent, mut quiet: impl FnMut() -> bool) {
    let sleep = std::sync::Arc::new(Sleep(loom::sync::Notify::new()));
    let waker = Waker::from(sleep.clone());
    while !ev.poll_quiet(&waker, &mut quiet) {
        sleep.0.wait();
    }
}

/// What a graph change writes and requests read (a child pointer).
struct Shared(UnsafeCell<u32>);

impl Shared {
    fn new() -> Self {
        Shared(UnsafeCell::new(0))
    }

    /// A request reads it.
    fn read(&self) -> u32 {
        // SAFETY: loom checks every access for a race and reports it.
        self.0.with(|p| unsafe { *p })
    }

    /// A drainer changes it.
    fn write(&self, v: u32) {
        // SAFETY: as above.
        self.0.with_mut(|p| unsafe { *p = v })
    }
}

/// Two requests, on two IoThreads, through a backend (which holds them while drained) and the
/// node below it; one drainer over both, as `drained_begin(node)` raises the node and its user,
/// waits, changes the graph, ends. A request that sees the drain stays out (held; resuming is
/// the next model's).
#[test]
fn a_drain_waits_for_every_request_and_is_always_woken() {
    model(4, || {
        let ev = Arc::new(DrainEvent::new());
        let backend = Arc::new(Gate::with_slots(2));
        let node = Arc::new(Gate::with_slots(2));
        let graph = Arc::new(Shared::new());
        let requests: Vec<_> = (0..2)
            .map(|t| {
                let (ev, backend, node, graph) =
                    (ev.clone(), backend.clone(), node.clone(), graph.clone());
                thread::spawn(move || {
                    // Backend::enter, then Node::enter below it; the guards drop in reverse.
                    if backend.try_enter(t, &ev) {
                        node.enter(t);
                        let _ = graph.read();
                        node.leave(t, &ev);
                        backend.leave(t, &ev);
                    }
                })
            })
            .collect();
        // drained_begin: the node, then its user; wait; change the graph; end.
        node.begin();
        backend.begin();
        wait_quiet(&ev, || node.is_quiet() && backend.is_quiet());
        graph.write(1);
        backend.end();
        node.end();
        for r in requests {
            r.join().unwrap();
        }
        assert_eq!(node.in_flight() + backend.in_flight(), 0);
    });
}

/// A drained section over one gate: begin, wait until quiet, change `graph`, end.
fn drain(ev: &DrainEvent, gate: &Gate, graph: &Shared) {
    gate.begin();
    wait_quiet(ev, || gate.is_quiet());
    graph.write(1);
    gate.end();
}

/// A request entering a backend with holding, under two overlapping drained sections (each
/// with its own drainer): it either sees a drain and is held, retrying as a held request does
/// once no drain covers the backend, or the drainers see it in flight and wait for it. Drains
/// nest: the request stays out until both have ended.
#[test]
fn a_held_request_stays_out_of_overlapping_drains() {
    model(5, || {
        let ev = Arc::new(DrainEvent::new());
        let backend = Arc::new(Gate::with_slots(1));
        // What each drainer changes while its section is quiet.
        let graph = Arc::new([Shared::new(), Shared::new()]);
        let request = {
            let (ev, backend, graph) = (ev.clone(), backend.clone(), graph.clone());
            thread::spawn(move || {
                // Backend::enter; if held, Held::poll's retry (the FIFO's wake-up at
                // drained_end is a yield here).
                if !backend.try_enter(0, &ev) {
                    while !backend.try_resume(0, &ev) {
                        thread::yield_now();
                    }
                }
                let _ = graph[0].read();
                let _ = graph[1].read();
                backend.leave(0, &ev);
            })
        };
        let other = {
            let (ev, backend, graph) = (ev.clone(), backend.clone(), graph.clone());
            thread::spawn(move || drain(&ev, &backend, &graph[1]))
        };
        drain(&ev, &backend, &graph[0]);
        other.join().unwrap();
        request.join().unwrap();
        assert_eq!(backend.in_flight(), 0);
        assert_eq!(backend.quiesce_count(), 0);
    });
}

/// Readers on their own slots and the writer: no reader reads the cell while the writer writes
/// it (loom's UnsafeCell reports any overlap).
fn graph_lock_model(readers: usize, preemptions: usize) {
    model(preemptions, move || {
        let lock = Arc::new(GraphLock::with_slots(2));
        let cell = Arc::new(GraphCell::new(1u32));
        let readers: Vec<_> = (0..readers)
            .map(|slot| {
                let (lock, cell) = (lock.clone(), cell.clone());
                thread::spawn(move || {
                    let g = lock.read_in(slot);
                    let v = cell.read_with(&g, |v| *v);
                    assert!(v == 1 || v == 2);
                    drop(g);
                })
            })
            .collect();
        lock.with_write(|w| cell.write_with(w, 2));
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(lock.readers(), 0);
    });
}

/// One reader and the writer, every interleaving (the space is exhausted well below 8
/// preemptions: 155 executions).
#[test]
fn graph_lock_excludes_a_reader_from_the_writer() {
    graph_lock_model(1, 8);
}

/// Two readers and the writer, with one preemption: the waits spin (a yield each turn under
/// loom), and with two readers backing out and retrying, two preemptions already take more
/// than ten minutes (over two million executions).
#[test]
fn graph_lock_excludes_two_readers_from_the_writer() {
    graph_lock_model(2, 1);
}
