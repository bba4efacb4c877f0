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
//!
//! # Held requests
//!
//! A gate that holds requests while drained (a backend's) keeps, per IoThread, a FIFO of the
//! requests it holds ([`HeldQueue`]) and its length `len`. All of one IoThread's requests run on
//! that IoThread; only the drainer's [`HeldQueues::wake_heads`] comes from another thread.
//! - request, arriving on IoThread `t` ([`HeldQueue::try_enter`]): if `len` is 0 (a SeqCst
//!   load) and [`Gate::try_enter`] lets it in, it is in. Otherwise it waits its turn
//!   ([`HeldQueue::wait`]): it joins the tail with a ticket ([`HeldQueue::join`]: push, then
//!   `len` += 1, a SeqCst read-modify-write ordered like a SeqCst fence), then, each time it is
//!   polled ([`HeldQueue::poll_turn`], under the queue's lock): at the head and no drain
//!   covering the gate, it tries to enter ([`Gate::try_resume`]: counted in flight, the drain
//!   checked again, backing out if one began); in, it leaves the queue (`len` -= 1) and wakes
//!   the next one. Otherwise it leaves its waker and waits.
//! - a held request dropped while it waits ([`HeldQueue::cancel`], under the lock): it leaves
//!   the queue; if it was the head and no drain covers the gate, it wakes the new head (while a
//!   drain covers it, that drain's end does).
//! - drainer, ending the last drain ([`Gate::end`] returned true: quiesce -= 1, a SeqCst
//!   read-modify-write): for each IoThread whose `len` (a SeqCst load) is not 0, takes the lock
//!   and wakes the head ([`HeldQueues::wake_heads`]).
//!
//! No held request waits forever. Take the head when the last drain ends, having read quiesce
//! raised (before the end's subtraction) and left its waker. Its join's add to `len` and the
//! drainer's subtraction from quiesce each come before the other side's read in the SeqCst
//! order, or the other way round; since the request read quiesce raised, the drainer's read of
//! `len` comes after the join, and sees the queue not empty (`len` counts every request from its
//! push until it leaves). The drainer then takes the lock after the request's poll released it
//! (or before: then that poll, taking the lock after it, saw the drain ended), finds the waker
//! and wakes it. A drainer that takes the lock between a join and that request's first poll
//! finds no waker, but the poll, after it, sees the drain ended. The requests behind the head
//! are woken in turn by the head entering, or going (a head dropped while a drain still covers
//! the gate leaves the wake to that drain's end, which finds the new head the same way). None is
//! reordered: a request enters only from the head, and an arriving request passes only when
//! none is held on its IoThread (its own earlier requests, so `len` is exact for it).
//!
//! Cost on the request path: the one SeqCst load of `len` before [`Gate::try_enter`]; the
//! queue's lock is taken only by requests that are held.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crossbeam_utils::CachePadded;
use iothreads::MAX_IOTHREADS;
#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU32, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicU32, AtomicUsize, Ordering};

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
    /// caller then resumes what it held: [`HeldQueues::wake_heads`]). The SeqCst
    /// read-modify-write orders every later SeqCst load after it, as a SeqCst fence would
    /// (the held queues' `len`); loom, which weakens SeqCst operations, gets the explicit
    /// fence.
    #[inline]
    pub fn end(&self) -> bool {
        let last = self.quiesce.fetch_sub(1, Ordering::SeqCst) == 1;
        #[cfg(loom)]
        fence(Ordering::SeqCst);
        last
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

/// The requests held on one IoThread, in arrival order: each one's ticket and the waker its
/// last poll left (none between its join and its first poll).
struct Fifo {
    next_ticket: u64,
    queue: VecDeque<(u64, Option<Waker>)>,
}

#[cfg(loom)]
type FifoLock = loom::sync::Mutex<Fifo>;
#[cfg(not(loom))]
type FifoLock = parking_lot::Mutex<Fifo>;

/// The FIFO of requests held at a gate's entry on one IoThread (see the module's "Held
/// requests"): `len`, read without the lock on every request's way in, and the queue itself.
pub struct HeldQueue {
    len: AtomicUsize,
    fifo: FifoLock,
}

impl Default for HeldQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl HeldQueue {
    /// An empty queue.
    pub fn new() -> Self {
        let fifo = Fifo {
            next_ticket: 0,
            queue: VecDeque::new(),
        };
        HeldQueue {
            len: AtomicUsize::new(0),
            #[cfg(loom)]
            fifo: loom::sync::Mutex::new(fifo),
            #[cfg(not(loom))]
            fifo: parking_lot::Mutex::new(fifo),
        }
    }

    #[inline]
    fn fifo(&self) -> impl std::ops::DerefMut<Target = Fifo> + '_ {
        #[cfg(loom)]
        return self.fifo.lock().unwrap();
        #[cfg(not(loom))]
        return self.fifo.lock();
    }

    /// Whether no request is held here (one SeqCst load, no lock).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::SeqCst) == 0
    }

    /// How many requests are held here now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    /// The way in of a request arriving on this queue's IoThread `t`: counted in flight in
    /// `gate` if no request is held here and no drain covers the gate ([`Gate::try_enter`],
    /// which wakes the drainers if it backs out). False: the request waits its turn
    /// ([`Self::wait`]).
    #[inline]
    pub fn try_enter(&self, gate: &Gate, t: usize, ev: &DrainEvent) -> bool {
        self.is_empty() && gate.try_enter(t, ev)
    }

    /// A request that waits its turn to enter `gate` on IoThread `t` (this queue's): it joins
    /// the tail when first polled, and resolves once it has been counted in flight (the caller
    /// then owns one in-flight unit, as after [`Gate::try_enter`]). Dropped before that, it
    /// leaves the queue ([`Self::cancel`]).
    #[inline]
    pub fn wait<'a>(&'a self, gate: &'a Gate, t: usize, ev: &'a DrainEvent) -> WaitTurn<'a> {
        WaitTurn {
            queue: self,
            gate,
            ev,
            t,
            ticket: None,
        }
    }

    /// Joins the tail: the request's ticket. `len` is raised after the push, under the lock;
    /// its SeqCst read-modify-write orders the request's later reads of the quiesce counter
    /// after it, as a SeqCst fence would (loom, which weakens SeqCst operations, gets the
    /// explicit fence): see the module's "Held requests".
    pub fn join(&self) -> u64 {
        let mut q = self.fifo();
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.queue.push_back((ticket, None));
        self.len.fetch_add(1, Ordering::SeqCst);
        #[cfg(loom)]
        fence(Ordering::SeqCst);
        ticket
    }

    /// A held request's poll, with the `ticket` [`Self::join`] gave it, to enter `gate` on
    /// IoThread `t`: at the head and no drain covering the gate, it tries to enter
    /// ([`Gate::try_resume`]); in, it leaves the queue and wakes the next request (Ready: the
    /// caller owns one in-flight unit). Otherwise it leaves `waker` to be woken when its turn
    /// may have come (Pending).
    pub fn poll_turn(
        &self,
        ticket: u64,
        gate: &Gate,
        t: usize,
        ev: &DrainEvent,
        waker: &Waker,
    ) -> Poll<()> {
        let mut q = self.fifo();
        let at_head = q.queue.front().is_some_and(|(k, _)| *k == ticket);
        // At the head and no drain: try to enter (count in flight, check the drain again; if
        // one began meanwhile, back out and wake its drainer).
        if at_head && gate.try_resume(t, ev) {
            q.queue.pop_front();
            self.len.fetch_sub(1, Ordering::SeqCst);
            // Let the next held request follow.
            if let Some((_, Some(w))) = q.queue.front() {
                w.wake_by_ref();
            }
            return Poll::Ready(());
        }
        if let Some((_, w)) = q.queue.iter_mut().find(|(k, _)| *k == ticket) {
            match w {
                Some(w) if w.will_wake(waker) => {}
                w => *w = Some(waker.clone()),
            }
        }
        Poll::Pending
    }

    /// A held request with `ticket` gives up (it is dropped before it entered `gate`): it
    /// leaves the queue; if it was the head and no drain covers the gate, it wakes the new head
    /// (while a drain covers the gate, that drain's end does).
    pub fn cancel(&self, ticket: u64, gate: &Gate) {
        let mut q = self.fifo();
        if let Some(i) = q.queue.iter().position(|(k, _)| *k == ticket) {
            q.queue.remove(i);
            self.len.fetch_sub(1, Ordering::SeqCst);
            if i == 0 && !gate.is_draining() {
                if let Some((_, Some(w))) = q.queue.front() {
                    w.wake_by_ref();
                }
            }
        }
    }

    /// Wakes the head, if any request is held here (the lock is taken only then).
    pub fn wake_head(&self) {
        if self.len.load(Ordering::SeqCst) > 0 {
            if let Some((_, Some(w))) = self.fifo().queue.front() {
                w.wake_by_ref();
            }
        }
    }
}

/// A request waiting its turn in a [`HeldQueue`] ([`HeldQueue::wait`]).
pub struct WaitTurn<'a> {
    queue: &'a HeldQueue,
    gate: &'a Gate,
    ev: &'a DrainEvent,
    t: usize,
    /// Its place in the queue, from the first poll until it enters.
    ticket: Option<u64>,
}

impl Future for WaitTurn<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let queue = self.queue;
        let ticket = *self.ticket.get_or_insert_with(|| queue.join());
        let r = queue.poll_turn(ticket, self.gate, self.t, self.ev, cx.waker());
        if r.is_ready() {
            self.ticket = None;
        }
        r
    }
}

impl Drop for WaitTurn<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            self.queue.cancel(ticket, self.gate);
        }
    }
}

/// A gate's held queues, one per IoThread (cache-padded, so IoThreads holding requests at
/// once share no written line).
pub struct HeldQueues {
    slots: Box<[CachePadded<HeldQueue>]>,
}

impl Default for HeldQueues {
    fn default() -> Self {
        Self::new()
    }
}

impl HeldQueues {
    /// One empty queue per IoThread index.
    pub fn new() -> Self {
        Self::with_slots(MAX_IOTHREADS)
    }

    /// `n` empty queues (loom models use few).
    pub fn with_slots(n: usize) -> Self {
        HeldQueues {
            slots: (0..n).map(|_| CachePadded::new(HeldQueue::new())).collect(),
        }
    }

    /// The drainer's half, once the last drain covering the gate has ended ([`Gate::end`]
    /// returned true: its read-modify-write orders the reads of `len` here after it): wakes
    /// the head of each IoThread's queue; each request, as it enters, wakes the next one, so
    /// they enter in order.
    pub fn wake_heads(&self) {
        for q in self.slots.iter() {
            q.wake_head();
        }
    }
}

impl std::ops::Index<usize> for HeldQueues {
    type Output = HeldQueue;

    /// The queue of IoThread `t`.
    #[inline]
    fn index(&self, t: usize) -> &HeldQueue {
        &self.slots[t]
    }
}
