//! The graph lock: guards the child pointers that the I/O path reads.
//!
//! Read side (any IoThread, on every hop of a request): add one to this thread's reader slot
//! (a SeqCst read-modify-write, which orders like a SeqCst fence), check that no writer is
//! active; on the way out subtract one. Each IoThread
//! has its own cache-padded slot, so readers never write a shared cache line. Threads that are
//! not IoThreads share one extra slot.
//!
//! Write side (the controller only, inside a drained section): set `writer`, fence, wait until
//! every reader slot is zero, run a synchronous closure, clear `writer`. The closure cannot
//! await, so the write side is held for microseconds. Only the transaction steps take it
//! (crate::txn), and they refuse to edit the children of a node that something reaches unless
//! a drained section covers it; a node nothing reaches yet (one being opened) is edited freely.
//! In the engine only the controller drains (`ChangeCtx::drain`), so the edits of the live
//! graph are the controller's.
//!
//! Why it is sound: a reader increments, fences, then loads `writer`; the writer stores
//! `writer`, fences, then sums the slots. By the SeqCst fences, either the reader sees the
//! writer (and backs out before touching a pointer) or the writer sees the reader's count (and
//! waits for it). So no reader dereferences a child pointer while the writer changes it.
//!
//! Read sections never await: a reader clones the child `Arc` it needs and drops the guard
//! before any I/O (the guard is `!Send`, and clippy.toml lists it under
//! `await-holding-invalid-types`). Hence a writer waits only for a few pointer reads, and a
//! reader that meets a writer may spin briefly. Requests in flight across a graph change are
//! excluded by drain, not by this lock: the lock only keeps pointer reads and writes apart.

use std::marker::PhantomData;

#[cfg(loom)]
use crate::counter::PerThreadCounter;
#[cfg(not(loom))]
use crossbeam_utils::CachePadded;

#[cfg(loom)]
use loom::cell::UnsafeCell;
#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicBool, Ordering};
#[cfg(not(loom))]
use std::cell::UnsafeCell;
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

/// Reader slots: one per IoThread, plus one shared by every other thread.
#[cfg(not(loom))]
const SLOTS: usize = iothreads::MAX_IOTHREADS + 1;

/// The lock. One per process ([`graph_lock`]), built at compile time so that reaching it costs
/// nothing; loom models build their own.
pub struct GraphLock {
    #[cfg(not(loom))]
    readers: [CachePadded<AtomicU64>; SLOTS],
    #[cfg(loom)]
    readers: PerThreadCounter,
    writer: AtomicBool,
}

/// A read section. `!Send`: it must end on the thread that began it, and never cross an await.
#[must_use]
#[cfg_attr(feature = "unsound-no-graph-lock", allow(dead_code))]
pub struct ReadGuard<'a> {
    /// This thread's reader slot (natively the guard needs nothing else).
    #[cfg(not(loom))]
    counter: &'a AtomicU64,
    #[cfg(loom)]
    lock: &'a GraphLock,
    #[cfg(loom)]
    slot: usize,
    _not_send: PhantomData<*const ()>,
}

/// Proof of holding the write side, handed to the write closure.
pub struct WriteGuard<'a> {
    _lock: PhantomData<&'a GraphLock>,
}

impl GraphLock {
    /// A lock with a reader slot per IoThread plus one for other threads.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
        GraphLock {
            readers: [ZERO; SLOTS],
            writer: AtomicBool::new(false),
        }
    }

    /// A lock with `n` reader slots (loom models use few).
    #[cfg(loom)]
    pub fn with_slots(n: usize) -> Self {
        GraphLock {
            readers: PerThreadCounter::with_slots(n),
            writer: AtomicBool::new(false),
        }
    }

    #[cfg(not(loom))]
    #[inline]
    fn my_slot(&self) -> usize {
        iothreads::current_index_or(SLOTS - 1)
    }

    #[cfg(not(loom))]
    #[inline]
    fn slot(&self, slot: usize) -> &AtomicU64 {
        debug_assert!(slot < SLOTS);
        // SAFETY: slots come from `my_slot` (an IoThread index, below MAX_IOTHREADS, or
        // SLOTS - 1) or from callers of `read_in`, which asserts the bound.
        unsafe { self.readers.get_unchecked(slot) }
    }

    #[cfg(not(loom))]
    fn sum(&self) -> u64 {
        self.readers
            .iter()
            .map(|r| r.load(Ordering::Acquire))
            .fold(0, u64::wrapping_add)
    }

    #[cfg(loom)]
    fn inc(&self, slot: usize) {
        self.readers.inc(slot);
    }

    #[cfg(loom)]
    fn dec(&self, slot: usize) {
        self.readers.dec(slot);
    }

    #[cfg(loom)]
    fn sum(&self) -> u64 {
        self.readers.sum()
    }

    /// Begins a read section on the current thread.
    #[cfg(not(loom))]
    #[inline]
    pub fn read(&self) -> ReadGuard<'_> {
        self.read_slot(self.my_slot())
    }

    /// Begins a read section on IoThread `t`, for callers that already know their IoThread
    /// index (the request path): no thread-local lookup. Any `t` is safe; an index that is not
    /// the caller's only shares another thread's slot (which costs that slot's cache line,
    /// never correctness: the writer sums every slot).
    #[cfg(not(loom))]
    #[inline]
    pub fn read_on(&self, t: usize) -> ReadGuard<'_> {
        const _: () = assert!(iothreads::MAX_IOTHREADS.is_power_of_two());
        self.read_slot(t & (iothreads::MAX_IOTHREADS - 1))
    }

    /// Begins a read section counted in reader slot `slot`.
    ///
    /// # Panics
    /// If `slot` is not a slot of this lock.
    #[inline]
    pub fn read_in(&self, slot: usize) -> ReadGuard<'_> {
        #[cfg(not(loom))]
        assert!(slot < SLOTS, "graph lock slot {slot} out of range");
        self.read_slot(slot)
    }

    #[cfg(not(loom))]
    #[inline]
    fn read_slot(&self, slot: usize) -> ReadGuard<'_> {
        let counter = self.slot(slot);
        #[cfg(feature = "unsound-no-graph-lock")]
        return ReadGuard {
            counter,
            _not_send: PhantomData,
        };
        #[allow(unreachable_code)]
        loop {
            // A SeqCst read-modify-write: it orders the load below as the protocol's fence.
            counter.fetch_add(1, Ordering::SeqCst);
            if !self.writer.load(Ordering::SeqCst) {
                return ReadGuard {
                    counter,
                    _not_send: PhantomData,
                };
            }
            counter.fetch_sub(1, Ordering::Release);
            let mut b = Backoff::default();
            while self.writer.load(Ordering::SeqCst) {
                b.wait();
            }
        }
    }

    /// Loom: the same protocol with the explicit fence (loom weakens SeqCst operations).
    #[cfg(loom)]
    fn read_slot(&self, slot: usize) -> ReadGuard<'_> {
        loop {
            self.inc(slot);
            fence(Ordering::SeqCst);
            if !self.writer.load(Ordering::SeqCst) {
                return ReadGuard {
                    lock: self,
                    slot,
                    _not_send: PhantomData,
                };
            }
            self.dec(slot);
            let mut b = Backoff::default();
            while self.writer.load(Ordering::SeqCst) {
                b.wait();
            }
        }
    }

    /// Runs `f` with the write side held. Only the controller calls this (one writer at a
    /// time by construction); the closure cannot await.
    pub fn with_write<R>(&self, f: impl FnOnce(&WriteGuard<'_>) -> R) -> R {
        let was = self.writer.swap(true, Ordering::SeqCst);
        assert!(!was, "two writers on the graph lock");
        fence(Ordering::SeqCst);
        let mut b = Backoff::default();
        while self.sum() != 0 {
            b.wait();
        }
        let r = f(&WriteGuard { _lock: PhantomData });
        self.writer.store(false, Ordering::SeqCst);
        r
    }

    /// Readers inside now (for tests and the contention bench).
    pub fn readers(&self) -> u64 {
        self.sum()
    }
}

/// The process's graph lock.
#[cfg(not(loom))]
#[inline]
pub fn graph_lock() -> &'static GraphLock {
    static LOCK: GraphLock = GraphLock::new();
    &LOCK
}

#[cfg(not(loom))]
impl Default for GraphLock {
    fn default() -> Self {
        Self::new()
    }
}

/// Waiting for the other side: spin a little (sections are a few pointer reads), then yield
/// the CPU, so that a reader preempted inside its section on a busy machine can finish instead
/// of being starved by spinners, and so a spinning writer stops pulling the readers' cache
/// lines away from them.
#[derive(Default)]
struct Backoff {
    spins: u32,
}

impl Backoff {
    #[inline]
    fn wait(&mut self) {
        #[cfg(loom)]
        loom::thread::yield_now();
        #[cfg(not(loom))]
        {
            if self.spins < 6 {
                for _ in 0..(1u32 << self.spins) {
                    std::hint::spin_loop();
                }
                self.spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        #[cfg(all(not(loom), not(feature = "unsound-no-graph-lock")))]
        self.counter.fetch_sub(1, Ordering::Release);
        #[cfg(loom)]
        self.lock.dec(self.slot);
    }
}

/// A value the I/O path reads under the read side and the controller replaces under the write
/// side (a child pointer, a filter's target).
pub struct GraphCell<T> {
    value: UnsafeCell<T>,
}

// SAFETY: access to the value is mediated by the graph lock: shared reads only under a
// ReadGuard, the one write only under a WriteGuard, and the lock excludes the two.
unsafe impl<T: Send + Sync> Sync for GraphCell<T> {}
// SAFETY: as above; moving the cell moves its value.
unsafe impl<T: Send> Send for GraphCell<T> {}

impl<T> GraphCell<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        GraphCell {
            value: UnsafeCell::new(value),
        }
    }

    /// Reads the value inside a read section.
    #[cfg(not(loom))]
    #[inline]
    pub fn read<'g>(&'g self, _guard: &'g ReadGuard<'_>) -> &'g T {
        // SAFETY: a ReadGuard exists, so no writer is inside `with_write`, and writes happen
        // only there; the returned borrow cannot outlive the guard.
        unsafe { &*self.value.get() }
    }

    /// Replaces the value inside the write closure; returns the old one.
    #[cfg(not(loom))]
    pub fn replace(&self, _guard: &WriteGuard<'_>, value: T) -> T {
        // SAFETY: the write side is held: every reader slot was zero after the writer flag was
        // set, and new readers back out while it is set; there is one writer.
        unsafe { std::mem::replace(&mut *self.value.get(), value) }
    }

    /// Reads the value with the write side held (the controller reading what it changes).
    #[cfg(not(loom))]
    pub fn read_locked<'g>(&'g self, _guard: &'g WriteGuard<'_>) -> &'g T {
        // SAFETY: the write side excludes every reader and there is one writer.
        unsafe { &*self.value.get() }
    }

    /// Loom: reads through loom's checked cell.
    #[cfg(loom)]
    pub fn read_with<R>(&self, _guard: &ReadGuard<'_>, f: impl FnOnce(&T) -> R) -> R {
        // SAFETY: as in the non-loom `read`; loom checks it.
        self.value.with(|p| f(unsafe { &*p }))
    }

    /// Loom: writes through loom's checked cell.
    #[cfg(loom)]
    pub fn write_with(&self, _guard: &WriteGuard<'_>, value: T) {
        // SAFETY: as in the non-loom `replace`; loom checks it.
        self.value.with_mut(|p| unsafe { *p = value });
    }
}
