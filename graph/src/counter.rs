//! Per-IoThread counters: one cache line per IoThread, so two IoThreads counting on the same
//! node never write the same line. Readers sum all lines.

use crossbeam_utils::CachePadded;
use iothreads::MAX_IOTHREADS;

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// A counter split into one cache-padded slot per IoThread index.
pub struct PerThreadCounter {
    slots: Box<[CachePadded<AtomicU64>]>,
}

impl Default for PerThreadCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl PerThreadCounter {
    /// All slots at zero.
    pub fn new() -> Self {
        Self::with_slots(MAX_IOTHREADS)
    }

    /// A counter with `n` slots (tests use few).
    pub fn with_slots(n: usize) -> Self {
        PerThreadCounter {
            slots: (0..n)
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
        }
    }

    /// Adds one to the slot of IoThread `t`.
    #[inline]
    pub fn inc(&self, t: usize) {
        self.slots[t].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one from the slot of IoThread `t`.
    #[inline]
    pub fn dec(&self, t: usize) {
        self.slots[t].fetch_sub(1, Ordering::Release);
    }

    /// The request half of the check-then-act protocol ([`crate::quiesce::Gate`] is its one
    /// user on the request path), going in: adds one, then orders every
    /// later SeqCst load after the add, as a SeqCst fence would. Natively the SeqCst
    /// read-modify-write is that fence (one locked instruction on x86); loom, which weakens
    /// SeqCst operations, gets the explicit fence.
    #[inline]
    pub fn enter(&self, t: usize) {
        self.slots[t].fetch_add(1, Ordering::SeqCst);
        #[cfg(loom)]
        loom::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Going out: takes one, ordered before every later SeqCst load (see [`Self::enter`]).
    #[inline]
    pub fn leave(&self, t: usize) {
        self.slots[t].fetch_sub(1, Ordering::SeqCst);
        #[cfg(loom)]
        loom::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The sum of all slots. Each slot only goes up and down by its own thread, so a slot read
    /// is never below zero; the sum is exact when no one counts meanwhile.
    pub fn sum(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .fold(0, u64::wrapping_add)
    }

    /// The slot of IoThread `t`.
    pub fn get(&self, t: usize) -> u64 {
        self.slots[t].load(Ordering::Acquire)
    }
}
