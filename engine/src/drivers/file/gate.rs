//! Serialises read-modify-write against other writes on an `O_DIRECT` file.
//!
//! An unaligned write is padded: read the aligned blocks around it, patch, write them back. A
//! write to those blocks landing between the read and the write-back would be lost, so a padded
//! write runs alone: it closes the gate, waits until the writes already inside have left, does
//! its read-modify-write, and opens the gate again. Padded writes queue among themselves.
//!
//! Aligned writes (the common case) only touch their own IoThread's counter: add one, fence
//! (SeqCst), check that the gate is open. The closer sets `closed`, fences, then sums the
//! counters; whichever of the two comes second sees the other (the same check-then-act as
//! drain). A writer that finds the gate closed steps back out and waits for it to open.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use graph::counter::PerThreadCounter;
use parking_lot::Mutex;

#[derive(Default)]
struct Waiters {
    /// Padded writes take tickets and hold the gate in ticket order.
    next_ticket: u64,
    /// The ticket whose turn it is.
    serving: u64,
    /// Padded writes waiting for their turn, by ticket.
    queue: BTreeMap<u64, Waker>,
    /// Aligned writes waiting for the gate to open.
    blocked: Vec<Waker>,
    /// The padded write waiting for the writes inside to leave.
    closer: Option<Waker>,
    /// Tickets whose futures were dropped before their turn.
    skipped: Vec<u64>,
}

/// The gate.
pub struct WriteGate {
    writers: PerThreadCounter,
    closed: AtomicBool,
    waiters: Mutex<Waiters>,
}

impl Default for WriteGate {
    fn default() -> Self {
        WriteGate {
            writers: PerThreadCounter::new(),
            closed: AtomicBool::new(false),
            waiters: Mutex::new(Waiters::default()),
        }
    }
}

/// An aligned write inside the gate.
pub struct Shared<'a> {
    gate: &'a WriteGate,
    thread: usize,
}

impl Drop for Shared<'_> {
    fn drop(&mut self) {
        self.gate.writers.dec(self.thread);
        fence(Ordering::SeqCst);
        if self.gate.closed.load(Ordering::SeqCst) {
            self.gate.wake_closer();
        }
    }
}

/// A padded write holding the gate closed.
pub struct Exclusive<'a> {
    gate: &'a WriteGate,
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.gate.release();
    }
}

impl WriteGate {
    /// Ends the current padded write's turn: hand the gate to the next ticket, or open it.
    fn release(&self) {
        let mut w = self.waiters.lock();
        w.serving += 1;
        while let Some(i) = w.skipped.iter().position(|&t| t == w.serving) {
            w.skipped.swap_remove(i);
            w.serving += 1;
        }
        let serving = w.serving;
        if serving < w.next_ticket {
            // The next padded write is queued (tickets register under this lock): it keeps
            // the gate closed.
            if let Some(next) = w.queue.remove(&serving) {
                next.wake();
            }
            return;
        }
        self.closed.store(false, Ordering::SeqCst);
        for b in w.blocked.drain(..) {
            b.wake();
        }
    }

    fn wake_closer(&self) {
        if let Some(w) = self.waiters.lock().closer.take() {
            w.wake();
        }
    }

    /// Enters as an aligned write on IoThread `thread`.
    pub fn enter(&self, thread: usize) -> EnterShared<'_> {
        EnterShared { gate: self, thread }
    }

    /// Closes the gate for a padded write (waiting for its turn and for the writes inside).
    pub fn close(&self) -> CloseExclusive<'_> {
        CloseExclusive {
            gate: self,
            state: CloseState::Start,
        }
    }
}

/// Future of [`WriteGate::enter`].
pub struct EnterShared<'a> {
    gate: &'a WriteGate,
    thread: usize,
}

impl<'a> Future for EnterShared<'a> {
    type Output = Shared<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Shared<'a>> {
        let gate = self.gate;
        gate.writers.inc(self.thread);
        fence(Ordering::SeqCst);
        if !gate.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Shared {
                gate,
                thread: self.thread,
            });
        }
        gate.writers.dec(self.thread);
        fence(Ordering::SeqCst);
        gate.wake_closer();
        let mut w = gate.waiters.lock();
        if !gate.closed.load(Ordering::SeqCst) {
            // Opened meanwhile: try again at once.
            drop(w);
            cx.waker().wake_by_ref();
        } else {
            w.blocked.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

enum CloseState {
    Start,
    Waiting(u64),
    Drain,
    Done,
}

/// Future of [`WriteGate::close`].
pub struct CloseExclusive<'a> {
    gate: &'a WriteGate,
    state: CloseState,
}

impl<'a> Future for CloseExclusive<'a> {
    type Output = Exclusive<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Exclusive<'a>> {
        let gate = self.gate;
        if let CloseState::Start = self.state {
            let mut w = gate.waiters.lock();
            let t = w.next_ticket;
            w.next_ticket += 1;
            self.state = CloseState::Waiting(t);
        }
        if let CloseState::Waiting(t) = self.state {
            let mut w = gate.waiters.lock();
            if w.serving != t {
                w.queue.insert(t, cx.waker().clone());
                return Poll::Pending;
            }
            gate.closed.store(true, Ordering::SeqCst);
            self.state = CloseState::Drain;
        }
        fence(Ordering::SeqCst);
        if gate.writers.sum() != 0 {
            gate.waiters.lock().closer = Some(cx.waker().clone());
            // A writer may have left between the sum and storing the waker: look again.
            fence(Ordering::SeqCst);
            if gate.writers.sum() != 0 {
                return Poll::Pending;
            }
            gate.waiters.lock().closer = None;
        }
        self.state = CloseState::Done;
        Poll::Ready(Exclusive { gate })
    }
}

impl Drop for CloseExclusive<'_> {
    fn drop(&mut self) {
        match self.state {
            // Abandoned while holding its turn: pass the gate on.
            CloseState::Drain => self.gate.release(),
            CloseState::Waiting(t) => {
                let mut w = self.gate.waiters.lock();
                w.queue.remove(&t);
                if w.serving == t {
                    drop(w);
                    self.gate.release();
                } else {
                    // Its turn will be skipped when it comes.
                    w.skipped.push(t);
                }
            }
            CloseState::Start | CloseState::Done => {}
        }
    }
}
