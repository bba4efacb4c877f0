//! Registered ("fixed") buffers: one aligned region per IoThread, cut into equal slots and
//! registered with that IoThread's ring, so `READ_FIXED`/`WRITE_FIXED` skip the kernel's
//! per-op page pinning.
//!
//! The region is owned by a [`PoolShared`] behind an `Arc` that the ring's thread and every
//! buffer cut from it hold, so the memory outlives both the registration and the last buffer.
//! A slot's contents on reuse are whatever the last user left (initialised, unspecified).

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::buf::{FixedSlot, IoBuf};

/// A region of equal slots registered with one ring.
pub(crate) struct PoolShared {
    pub(crate) ring_id: u64,
    base: NonNull<u8>,
    slot_size: usize,
    count: usize,
    align: usize,
    free: ArrayQueue<u16>,
}

// SAFETY: the region is only reached through IoBufs, each of which owns one slot exclusively;
// the free list is a lock-free queue.
unsafe impl Send for PoolShared {}
// SAFETY: as above.
unsafe impl Sync for PoolShared {}

impl PoolShared {
    /// Allocates `count` zeroed slots of `slot_size` bytes (a multiple of `align`).
    pub(crate) fn new(ring_id: u64, count: u16, slot_size: usize, align: usize) -> Arc<Self> {
        let count = usize::from(count.max(1));
        let slot_size = slot_size.max(align).next_multiple_of(align);
        let layout = Layout::from_size_align(slot_size * count, align).expect("pool layout");
        // SAFETY: the layout's size is non-zero (count >= 1, slot_size >= align >= 1).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        let free = ArrayQueue::new(count);
        for i in 0..count {
            free.push(i as u16).expect("free list sized to count");
        }
        Arc::new(PoolShared {
            ring_id,
            base,
            slot_size,
            count,
            align,
            free,
        })
    }

    /// The iovecs to register, one per slot.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                // SAFETY: i < count, so the slot lies inside the region.
                iov_base: unsafe { self.base.as_ptr().add(i * self.slot_size) }.cast(),
                iov_len: self.slot_size,
            })
            .collect()
    }

    /// A free slot as a buffer whose window is `len` bytes, if one is free and big enough.
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> Option<IoBuf> {
        if len > self.slot_size {
            return None;
        }
        let index = self.free.pop()?;
        // SAFETY: index < count, so the slot lies inside the region; the free list hands each
        // index to one buffer at a time.
        let ptr = unsafe { self.base.as_ptr().add(usize::from(index) * self.slot_size) };
        let ptr = NonNull::new(ptr).expect("slot pointer is non-null");
        let slot = FixedSlot {
            pool: Arc::clone(self),
            index,
        };
        let mut buf = IoBuf::from_fixed(ptr, self.slot_size, self.align, slot);
        buf.set_window(0..len);
        Some(buf)
    }

    /// Returns a slot to the free list (called by the buffer's Drop).
    pub(crate) fn give_back(&self, index: u16) {
        // Cannot fail: the queue holds `count` entries and each index is out at most once.
        let _ = self.free.push(index);
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        let layout =
            Layout::from_size_align(self.slot_size * self.count, self.align).expect("pool layout");
        // SAFETY: allocated in `new` with this layout; the last Arc (ring or buffer) is gone,
        // so neither the kernel registration nor any IoBuf refers to it any more.
        unsafe { alloc::dealloc(self.base.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_handed_out_once_and_come_back() {
        let pool = PoolShared::new(7, 2, 4096, 4096);
        let a = pool.take(4096).unwrap();
        let b = pool.take(512).unwrap();
        assert!(pool.take(1).is_none());
        assert_eq!(b.len(), 512);
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert!(a.fixed_index_for(7).is_some());
        assert_eq!(a.fixed_index_for(8), None);
        drop(a);
        let c = pool.take(100).unwrap();
        assert!(c.is_registered());
        assert!(pool.take(8192).is_none());
    }
}
