//! Model checks (run with `RUSTFLAGS="--cfg loom"`, bounded preemptions) of the protocols
//! that keep requests and graph changes apart, on the real code:
//! - the in-flight/quiesce protocol (graph/src/quiesce.rs: `Gate`, `DrainEvent`, which nodes,
//!   drained sections and the engine's backends all call): a drainer that sees its section
//!   quiet has every request that got in ordered before it (loom's UnsafeCell reports a
//!   request still reading what the drainer then changes), and a drainer asleep is always
//!   woken once the section is quiet (loom reports a drainer asleep forever as a deadlock);
//! - the backend's entry check with holding (`Gate::try_enter`, a held request's
//!   `Gate::try_resume`), under two overlapping drains;
//! - the held-request FIFO (graph/src/quiesce.rs: `HeldQueue`, its `WaitTurn` future and
//!   `HeldQueues::wake_heads`, which the engine's backends call): requests held on one IoThread
//!   enter in arrival order when the drain ends, none is left waiting (loom reports an IoThread
//!   asleep forever as a deadlock), one dropped while it waits passes its turn on, and a head
//!   entering as a new drain begins either is seen in flight by that drain or stays held;
//! - the graph lock (graph/src/lock.rs): a writer never changes a child pointer while a
//!   reader reads it.
//!
//! The drainer waits as `Drained::wait_blocking` does: poll (`DrainEvent::poll_quiet`) with a
//! waker that wakes it, sleep, poll again.
//!
//! The held requests' IoThread runs them as the engine's executor does: one thread polls each
//! request's future when its waker has marked it runnable, and sleeps when none is.
//!
//! Each model must fail when the protocol is broken: a fence taken out of `Gate::is_quiet` or
//! `PerThreadCounter::enter`/`leave`, the waker registered after the second look in
//! `poll_quiet`, or a backing-out `try_enter` that does not notify; for the held FIFO,
//! `wake_heads` not waking a head, an entering request not waking the next one, a cancelled
//! head not passing its turn on, a held request counting itself in flight without checking the
//! drain after, or the loom fence after `HeldQueue::join`'s or `Gate::end`'s read-modify-write
//! taken out.

#![cfg(loom)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Wake, Waker};

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;

use graph::lock::{GraphCell, GraphLock};
use graph::quiesce::{DrainEvent, Gate, HeldQueues, WaitTurn};

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

/// The IoThread of the held-request models, as the engine's executor: a request's waker marks
/// it runnable and wakes the loop; the loop polls runnable requests and sleeps when none is.
struct IoThread {
    wake: loom::sync::Notify,
    runnable: [AtomicBool; 2],
}

/// The waker of request `i` on `io`.
struct RequestWaker {
    io: std::sync::Arc<IoThread>,
    i: usize,
}

impl Wake for RequestWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        // A swap, not a store: loom lets a read-modify-write read past a plain store of
        // another thread that it has not ordered yet, even one that happens before it (the
        // loop's swap after the wake), and would report a lost wake that cannot happen.
        self.io.runnable[self.i].swap(true, Ordering::Release);
        self.io.wake.notify();
    }
}

/// Two requests on IoThread 0 of a backend (`gate`, with holding, and its held queues), as
/// `Backend::enter` runs them: each arrives in turn (`HeldQueue::try_enter`, or it waits its
/// turn: the `WaitTurn` future, first polled at once); once in, it reads `graph` (what a drain
/// changes) and leaves. With `cancel_first`, request 0, if held, is dropped right after both
/// arrived (its task cancelled while it waits). Runs until every request entered or was
/// dropped; returns the requests in the order they entered.
fn io_thread(
    gate: &Gate,
    held: &HeldQueues,
    ev: &DrainEvent,
    graph: &[Shared],
    cancel_first: bool,
) -> Vec<usize> {
    let io = std::sync::Arc::new(IoThread {
        wake: loom::sync::Notify::new(),
        runnable: [AtomicBool::new(false), AtomicBool::new(false)],
    });
    let wakers: Vec<Waker> = (0..2)
        .map(|i| Waker::from(std::sync::Arc::new(RequestWaker { io: io.clone(), i })))
        .collect();
    let mut order = Vec::new();
    let run = |i: usize, order: &mut Vec<usize>| {
        for g in graph {
            let _ = g.read();
        }
        gate.leave(0, ev);
        order.push(i);
    };
    let mut waiting: [Option<WaitTurn<'_>>; 2] = [None, None];
    for i in 0..2 {
        if held[0].try_enter(gate, 0, ev) {
            run(i, &mut order);
            continue;
        }
        let mut turn = held[0].wait(gate, 0, ev);
        if Pin::new(&mut turn)
            .poll(&mut Context::from_waker(&wakers[i]))
            .is_ready()
        {
            run(i, &mut order);
        } else {
            waiting[i] = Some(turn);
        }
    }
    if cancel_first {
        waiting[0] = None;
    }
    while waiting.iter().any(Option::is_some) {
        let mut polled = false;
        for i in 0..2 {
            let Some(turn) = &mut waiting[i] else {
                continue;
            };
            if !io.runnable[i].swap(false, Ordering::Acquire) {
                continue;
            }
            polled = true;
            if Pin::new(turn)
                .poll(&mut Context::from_waker(&wakers[i]))
                .is_ready()
            {
                waiting[i] = None;
                run(i, &mut order);
            }
        }
        if !polled {
            io.wake.wait();
        }
    }
    order
}

/// A drained section over a backend, as `drained_begin`/`drained_end` on it: begin (unless
/// `begun`), wait until quiet, change `graph`, end; the last drain to end wakes the held
/// queues' heads.
fn drain_backend(ev: &DrainEvent, gate: &Gate, held: &HeldQueues, graph: &Shared, begun: bool) {
    if !begun {
        gate.begin();
    }
    wait_quiet(ev, || gate.is_quiet());
    graph.write(1);
    if gate.end() {
        held.wake_heads();
    }
}

/// The held-request models' shape: a drain covers the backend from the start; one IoThread
/// runs two requests (the first dropped while held if `drop_first`) and `check`s the order they
/// entered in; the drainer ends that drain and then runs `drains - 1` more, each writing its
/// own cell of the graph. At the end nothing is in flight, drained or held.
fn held_model(preemptions: usize, drains: usize, drop_first: bool, check: fn(&[usize])) {
    model(preemptions, move || {
        let ev = Arc::new(DrainEvent::new());
        let gate = Arc::new(Gate::with_slots(1));
        let held = Arc::new(HeldQueues::with_slots(1));
        let graph: Arc<Vec<Shared>> = Arc::new((0..drains).map(|_| Shared::new()).collect());
        gate.begin();
        let io = {
            let (ev, gate, held, graph) = (ev.clone(), gate.clone(), held.clone(), graph.clone());
            thread::spawn(move || check(&io_thread(&gate, &held, &ev, &graph[..], drop_first)))
        };
        for (i, cell) in graph.iter().enumerate() {
            drain_backend(&ev, &gate, &held, cell, i == 0);
        }
        io.join().unwrap();
        assert_eq!(gate.in_flight(), 0);
        assert_eq!(gate.quiesce_count(), 0);
        assert!(held[0].is_empty());
    });
}

/// Two requests on one IoThread arrive while a drain covers the backend and are held; the
/// drainer ends it (`Gate::end`, `HeldQueues::wake_heads`) concurrently with their arrival and
/// polls. Both enter, in arrival (ticket) order, none while the drain changes the graph, and
/// the IoThread is never left asleep with a request held. Every interleaving: the space is
/// exhausted below 20 preemptions (18118 executions, as many as with no bound).
#[test]
fn held_requests_resume_in_order_when_the_drain_ends() {
    held_model(20, 1, false, |order| assert_eq!(order, [0, 1]));
}

/// As above, but request 0 is dropped while held, concurrently with the drain's end: before the
/// end, after it, after `wake_heads` woke it. Request 1 is still woken and enters. Every
/// interleaving (60953 executions, as many as with no bound).
#[test]
fn a_held_request_dropped_passes_its_turn_on() {
    // Request 0 entered only if the drain had ended before it arrived.
    held_model(20, 1, true, |order| {
        assert!(order == [1] || order == [0, 1], "{order:?}")
    });
}

/// Two requests held by a first drain; the drainer ends it (waking the head) and at once begins
/// a second one while the head is entering. The head either got in before the second drain
/// looked (which then waits for it to leave) or stays held until that drain ends; no request
/// reads what either drain changes while that drain thinks the backend quiet. Six preemptions
/// (182441 executions, about 9 s alone; seven take 620641 and half a minute).
#[test]
fn a_held_head_entering_as_a_drain_begins_again() {
    held_model(6, 2, false, |order| assert_eq!(order, [0, 1]));
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
