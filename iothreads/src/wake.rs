//! The sleep/wake handshake between an IoThread and the threads that hand it work.
//!
//! The loop announces that it is about to sleep, fences, and looks at its queues once more;
//! an injector publishes its work, fences, and wakes the loop only if it finds it announced
//! (clearing the announcement, so of several injectors only one writes the eventfd). With a
//! SeqCst fence on both sides, at least one of them sees the other: either the loop finds the
//! work and does not sleep, or the injector finds the announcement and wakes it. A busy loop
//! never announces, so injectors then cost no syscall.

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicBool, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicBool, Ordering};

/// The loop's "about to sleep" announcement.
#[derive(Debug, Default)]
pub struct SleepFlag {
    sleeping: AtomicBool,
}

impl SleepFlag {
    /// A flag in the awake state.
    pub fn new() -> Self {
        SleepFlag {
            sleeping: AtomicBool::new(false),
        }
    }

    /// Loop side, before its last look at the queues: announce, then fence.
    pub fn announce(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Loop side, after waking (or deciding not to sleep).
    pub fn clear(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Injector side, after publishing work: whether this caller must wake the loop.
    pub fn must_wake(&self) -> bool {
        fence(Ordering::SeqCst);
        self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst)
    }
}
