//! The in-flight/quiesce protocol itself, apart from the graph: the [`Gate`] every request
//! passes (a node's, a backend's) and the [`DrainEvent`] drainers sleep on. Nodes
//! ([`crate::node`]), drained sections ([`crate::drain`]) and the engine's backends all go
//! through these few functions, and the loom models (graph/tests/loom_graph.rs) check exactly
//! them: this module and [`crate::counter`] are all of the protocol, and they build under
//! `--cfg loom`.
//!
//! The check-then-act, for one gate:
//! - request, going in: in-flight += 1 (a SeqCst read-modify-write, ordered like a SeqCst
//!   fence), then, where it may be held, read quiesce and back out if it is raised
//!   ([`Gate::try_enter`]); going out: in-flight -= 1 (the same), read quiesce, and wake the
//!   drainers if it is raised ([`Gate::leave`]). A request that backs out also wakes them: a
//!   drainer may have seen it counted and gone to sleep.
//! - drainer: quiesce += 1 ([`Gate::begin`]); then, until quiet: fence(SeqCst) and read
//!   in-flight ([`Gate::is_quiet`]); if not quiet, register its waker and look again
//!   ([`DrainEvent::poll_quiet`]); sleep.
//!
//! Either the request's read of quiesce comes first in the SeqCst order, and then the
//! drainer's read of in-flight (after its fence) sees the request's add or subtract, or the
//! request sees quiesce raised: going in it backs out, going out it wakes the drainer. A
//! drainer that registered before that wake is woken; one that registers after it takes the
//! event's lock after the request released it, so its second look sees the subtraction. Either
//! way a drainer never sleeps through the last request leaving, and one that sees the gate
//! quiet has every request that got in ordered before it (the subtraction is a release, the
//! drainer's read an acquire).
//!
//! Cost on the request path: one SeqCst read-modify-write of this IoThread's own cache line
//! in, one out, one SeqCst load of quiesce (a line that is only written by drains) each way
//! where it is read; the event is touched only while quiesce is raised.

use std::task::Waker;

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU32, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicU32, Ordering};

use crate::counter::PerThreadCounter;

/// What a request passes to enter a node or a backend: the per-IoThread in-flight counter and
/// the quiesce counter (how many drained sections cover it now).
pub struct Gate {
    in_flight: PerThreadCounter,
    quiesce: AtomicU32,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    /// An open gate with one in-flight slot per IoThread.
    pub fn new() -> Self {
        Gate {
            in_flight: PerThreadCounter::new(),
            quiesce: AtomicU32::new(0),
        }
    }

    /// An open gate with `n` in-flight slots (loom models use few).
    pub fn with_slots(n: usize) -> Self {
        Gate {
            in_flight: PerThreadCounter::with_slots(n),
            quiesce: AtomicU32::new(0),
        }
    }

    /// Counts a request in flight on IoThread `t`, whatever the drains (a node: its users
    /// stop sending while drained, and what they already sent must get through).
    #[inline]
    pub fn enter(&self, t: usize) {
        self.in_flight.enter(t);
    }

    /// Counts a request in flight on IoThread `t` unless a drain covers the gate: then it
    /// backs out, wakes the drainers (one may have seen it counted and gone to sleep) and
    /// returns false; the caller holds the request.
    #[inline]
    pub fn try_enter(&self, t: usize, ev: &DrainEvent) -> bool {
        self.in_flight.enter(t);
        if self.quiesce.load(Ordering::SeqCst) == 0 {
            return true;
        }
        self.in_flight.leave(t);
        ev.notify();
        false
    }

    /// A held request's retry: [`Self::try_enter`] if no drain covers the gate now, else false
    /// without touching the in-flight counter (and so without waking anyone).
    #[inline]
    pub fn try_resume(&self, t: usize, ev: &DrainEvent) -> bool {
        !self.is_draining() && self.try_enter(t, ev)
    }

    /// Counts a request out of IoThread `t`'s slot, and wakes the drainers if a drain covers
    /// the gate (they re-check their own sets).
    #[inline]
    pub fn leave(&self, t: usize, ev: &DrainEvent) {
        self.in_flight.leave(t);
        if self.quiesce.load(Ordering::SeqCst) > 0 {
            ev.notify();
        }
    }

    /// The drainer raises the quiesce counter (drains nest: it counts). Requests that pass
    /// [`Self::try_enter`] from now on stay out, and every request leaving wakes the drainers.
    #[inline]
    pub fn begin(&self) {
        self.quiesce.fetch_add(1, Ordering::SeqCst);
    }

    /// Undoes one [`Self::begin`]; true when that was the last drain covering the gate (the
    /// caller then resumes what it held).
    #[inline]
    pub fn end(&self) -> bool {
        self.quiesce.fetch_sub(1, Ordering::SeqCst) == 1
    }

    /// The drainer's look: fences (ordering every earlier [`Self::begin`] and waker
    /// registration before the read), then whether no request is in flight.
    #[inline]
    pub fn is_quiet(&self) -> bool {
        fence(Ordering::SeqCst);
        self.in_flight.sum() == 0
    }

    /// Whether a drain covers the gate now.
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.quiesce.load(Ordering::SeqCst) > 0
    }

    /// How many drained sections cover the gate now.
    pub fn quiesce_count(&self) -> u32 {
        self.quiesce.load(Ordering::SeqCst)
    }

    /// Requests in flight, summed over IoThreads.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.sum()
    }

    /// Requests in flight on IoThread `t`.
    pub fn in_flight_on(&self, t: usize) -> u64 {
        self.in_flight.get(t)
    }
}

#[cfg(loom)]
type WaitersLock = loom::sync::Mutex<Vec<Waker>>;
#[cfg(not(loom))]
type WaitersLock = parking_lot::Mutex<Vec<Waker>>;

/// Wakes drainers when a request leaves a quiesced gate or a user becomes quiet. One per
/// process ([`drain_event`]); loom models make their own.
pub struct DrainEvent {
    waiters: WaitersLock,
}

impl DrainEvent {
    /// An event with no one waiting.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        DrainEvent {
            waiters: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// An event with no one waiting.
    #[cfg(loom)]
    pub fn new() -> Self {
        DrainEvent {
            waiters: loom::sync::Mutex::new(Vec::new()),
        }
    }

    #[inline]
    fn waiters(&self) -> impl std::ops::DerefMut<Target = Vec<Waker>> + '_ {
        #[cfg(loom)]
        return self.waiters.lock().unwrap();
        #[cfg(not(loom))]
        return self.waiters.lock();
    }

    /// Wakes every waiting drainer (they re-check their own sets).
    #[cold]
    pub fn notify(&self) {
        let waiters = std::mem::take(&mut *self.waiters());
        for w in waiters {
            w.wake();
        }
    }

    /// Registers `waker` to be woken by the next [`Self::notify`] (once).
    pub fn register(&self, waker: &Waker) {
        let mut ws = self.waiters();
        if !ws.iter().any(|w| w.will_wake(waker)) {
            ws.push(waker.clone());
        }
    }

    /// The drainer's step: true if `quiet()` holds; otherwise registers `waker` and asks
    /// again, since a request may have left between the first look and the registration.
    /// False means that whatever makes it quiet later wakes `waker`. `quiet` must fence before
    /// it reads in-flight counters ([`Gate::is_quiet`] does).
    pub fn poll_quiet(&self, waker: &Waker, mut quiet: impl FnMut() -> bool) -> bool {
        if quiet() {
            return true;
        }
        self.register(waker);
        quiet()
    }
}

impl Default for DrainEvent {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's drain event.
#[cfg(not(loom))]
#[inline]
pub fn drain_event() -> &'static DrainEvent {
    static E: DrainEvent = DrainEvent::new();
    &E
}
