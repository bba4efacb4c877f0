//! The graph lock: guards the child pointers that the I/O path reads.
//!
//! Read side (any IoThread, on every hop of a request): add one to this thread's reader slot,
//! fence (SeqCst), check that no writer is active; on the way out subtract one. Each IoThread
//! has its own cache-padded slot, so readers never write a shared cache line. Threads that are
//! not IoThreads share one extra slot.
//!
//! Write side (the controller only, inside a drained section): set `writer`, fence, wait until
//! every reader slot is zero, run a synchronous closure, clear `writer`. The closure cannot
//! await, so the write side is held for microseconds.
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

use crate::counter::PerThreadCounter;

#[cfg(loom)]
use loom::cell::UnsafeCell;
#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicBool, Ordering};
#[cfg(not(loom))]
use std::cell::UnsafeCell;
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicBool, Ordering};

/// The lock. One per process ([`GRAPH_LOCK`]) in the engine; tests build their own.
pub struct GraphLock {
    readers: PerThreadCounter,
    writer: AtomicBool,
    #[cfg_attr(loom, allow(dead_code))]
    other_slot: usize,
}

/// A read section. `!Send`: it must end on the thread that began it, and never cross an await.
#[must_use]
pub struct ReadGuard<'a> {
    lock: &'a GraphLock,
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
    pub fn new() -> Self {
        Self::with_slots(iothreads::MAX_IOTHREADS + 1)
    }

    /// A lock with `n` reader slots; the last serves threads that are not IoThreads.
    pub fn with_slots(n: usize) -> Self {
        assert!(n >= 1);
        GraphLock {
            readers: PerThreadCounter::with_slots(n),
            writer: AtomicBool::new(false),
            other_slot: n - 1,
        }
    }

    #[cfg(not(loom))]
    fn my_slot(&self) -> usize {
        iothreads::current_index().unwrap_or(self.other_slot)
    }

    /// Begins a read section on the current thread.
    #[cfg(not(loom))]
    #[inline]
    pub fn read(&self) -> ReadGuard<'_> {
        self.read_in(self.my_slot())
    }

    /// Begins a read section counted in reader slot `slot`.
    #[inline]
    pub fn read_in(&self, slot: usize) -> ReadGuard<'_> {
        loop {
            self.readers.inc(slot);
            fence(Ordering::SeqCst);
            if !self.writer.load(Ordering::SeqCst) {
                return ReadGuard {
                    lock: self,
                    slot,
                    _not_send: PhantomData,
                };
            }
            self.readers.dec(slot);
            while self.writer.load(Ordering::SeqCst) {
                spin();
            }
        }
    }

    /// Runs `f` with the write side held. Only the controller calls this (one writer at a
    /// time by construction); the closure cannot await.
    pub fn with_write<R>(&self, f: impl FnOnce(&WriteGuard<'_>) -> R) -> R {
        let was = self.writer.swap(true, Ordering::SeqCst);
        assert!(!was, "two writers on the graph lock");
        fence(Ordering::SeqCst);
        while self.readers.sum() != 0 {
            spin();
        }
        let r = f(&WriteGuard { _lock: PhantomData });
        self.writer.store(false, Ordering::SeqCst);
        r
    }

    /// Readers inside now (for tests and the contention bench).
    pub fn readers(&self) -> u64 {
        self.readers.sum()
    }
}

/// The process's graph lock.
#[cfg(not(loom))]
pub fn graph_lock() -> &'static GraphLock {
    static LOCK: std::sync::OnceLock<GraphLock> = std::sync::OnceLock::new();
    LOCK.get_or_init(GraphLock::new)
}

#[cfg(not(loom))]
impl Default for GraphLock {
    fn default() -> Self {
        Self::new()
    }
}

#[inline]
fn spin() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.lock.readers.dec(self.slot);
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
