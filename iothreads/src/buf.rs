//! Owned, aligned I/O buffers.
//!
//! An [`IoBuf`] is a heap allocation aligned for `O_DIRECT` (4096 bytes unless asked otherwise)
//! that an I/O op takes by value and hands back with its result. The kernel is only ever given
//! the address of an `IoBuf` that has moved into the IoThread's in-flight table, so the memory
//! stays valid until the completion arrives even if the future that started the op is dropped.
//!
//! A buffer has a *window*: the part of the allocation that ops read into or write from, and
//! that `Deref` shows. [`IoBuf::slice`] narrows it, [`IoBuf::set_window`] sets it anywhere
//! inside the allocation, so a driver can do I/O into part of a caller's buffer without copying.
//!
//! A buffer may come from an IoThread's registered-buffer pool (see
//! [`crate::IoThreadOptions::fixed_buffers`]); it then remembers its pool and slot, ops on that
//! IoThread use `READ_FIXED`/`WRITE_FIXED`, and dropping it returns the slot to the pool.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::Arc;

/// The alignment of a buffer made by [`IoBuf::new`]: enough for `O_DIRECT` on every device
/// this engine meets (STATX_DIOALIGN reports at most the page size for memory alignment).
pub const DEFAULT_ALIGN: usize = 4096;

/// The result of an op over an owned buffer: the outcome, and the buffer back.
pub type BufResult<T> = (std::io::Result<T>, IoBuf);

/// An owned, aligned, zero-initialised I/O buffer with a window.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    align: usize,
    start: usize,
    end: usize,
    fixed: Option<FixedSlot>,
}

/// Where a pool buffer came from: its pool and slot index.
pub(crate) struct FixedSlot {
    pub(crate) pool: Arc<crate::fixed::PoolShared>,
    pub(crate) index: u16,
}

// SAFETY: an IoBuf exclusively owns its allocation (like a Vec<u8>); nothing else holds the
// pointer except the kernel while the buffer sits in an IoThread's in-flight table, during
// which no IoBuf value exists for it.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give `&[u8]` access to the window.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes aligned to [`DEFAULT_ALIGN`].
    pub fn new(len: usize) -> Self {
        Self::with_align(len, DEFAULT_ALIGN)
    }

    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    /// If `align` is not a power of two or the allocation fails.
    pub fn with_align(len: usize, align: usize) -> Self {
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        let ptr = if len == 0 {
            // A dangling but aligned pointer: never dereferenced for more than 0 bytes.
            NonNull::new(align as *mut u8).expect("alignment is non-zero")
        } else {
            let layout = Layout::from_size_align(len, align).expect("buffer layout");
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { alloc::alloc_zeroed(layout) };
            match NonNull::new(raw) {
                Some(p) => p,
                None => alloc::handle_alloc_error(layout),
            }
        };
        IoBuf {
            ptr,
            cap: len,
            align,
            start: 0,
            end: len,
            fixed: None,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::new(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Wraps a slot of a registered pool. The memory is owned by the pool.
    pub(crate) fn from_fixed(ptr: NonNull<u8>, cap: usize, align: usize, slot: FixedSlot) -> Self {
        IoBuf {
            ptr,
            cap,
            align,
            start: 0,
            end: cap,
            fixed: Some(slot),
        }
    }

    /// Length of the window.
    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the window is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Size of the whole allocation.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Alignment of the allocation's start.
    #[inline]
    pub fn align(&self) -> usize {
        self.align
    }

    /// The window, as a range of the whole allocation.
    #[inline]
    pub fn window(&self) -> Range<usize> {
        self.start..self.end
    }

    /// Sets the window to `range` of the whole allocation.
    ///
    /// # Panics
    /// If the range is inverted or extends past the allocation.
    pub fn set_window(&mut self, range: Range<usize>) {
        assert!(
            range.start <= range.end && range.end <= self.cap,
            "window {range:?} outside a buffer of {} bytes",
            self.cap
        );
        self.start = range.start;
        self.end = range.end;
    }

    /// Narrows the window to `range`, given relative to the current window.
    ///
    /// # Panics
    /// If the range lies outside the current window.
    pub fn slice(mut self, range: Range<usize>) -> Self {
        let abs = self.start + range.start..self.start + range.end;
        assert!(
            range.start <= range.end && abs.end <= self.end,
            "slice {range:?} outside a window of {} bytes",
            self.len()
        );
        self.start = abs.start;
        self.end = abs.end;
        self
    }

    /// Widens the window to the whole allocation.
    pub fn unslice(mut self) -> Self {
        self.start = 0;
        self.end = self.cap;
        self
    }

    /// Whether the window's address and length are multiples of `align`, as `O_DIRECT` needs.
    #[inline]
    pub fn is_aligned_to(&self, align: usize) -> bool {
        (self.as_ptr() as usize).is_multiple_of(align) && self.len().is_multiple_of(align)
    }

    /// The pool index, if this buffer is registered with the ring of `ring_id`.
    #[inline]
    pub(crate) fn fixed_index_for(&self, ring_id: u64) -> Option<u16> {
        match &self.fixed {
            Some(s) if s.pool.ring_id == ring_id => Some(s.index),
            _ => None,
        }
    }

    /// Whether this buffer is a slot of a registered pool.
    pub fn is_registered(&self) -> bool {
        self.fixed.is_some()
    }

    /// Pointer to the start of the window.
    #[inline]
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: start <= cap, so the result is within (or one past) the allocation.
        unsafe { self.ptr.as_ptr().add(self.start) }
    }

    /// Mutable pointer to the start of the window.
    #[inline]
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: start <= cap, so the result is within (or one past) the allocation.
        unsafe { self.ptr.as_ptr().add(self.start) }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: the window lies inside the allocation, which is initialised (zeroed at
        // allocation, and only ever written through this type or by the kernel), and we hold
        // `&self`, so no mutable access exists.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }
}

impl DerefMut for IoBuf {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some(slot) = self.fixed.take() {
            slot.pool.give_back(slot.index);
            return;
        }
        if self.cap != 0 {
            let layout = Layout::from_size_align(self.cap, self.align).expect("buffer layout");
            // SAFETY: allocated in `with_align` with exactly this layout, and freed only here.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("window", &self.window())
            .field("capacity", &self.cap)
            .field("align", &self.align)
            .field("registered", &self.fixed.is_some())
            .finish()
    }
}

impl Clone for IoBuf {
    /// A plain (unregistered) copy of the window.
    fn clone(&self) -> Self {
        let mut b = IoBuf::with_align(self.len(), self.align);
        b.copy_from_slice(self);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_buffer_is_zeroed_and_aligned() {
        let b = IoBuf::new(8192);
        assert_eq!(b.len(), 8192);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(b.as_ptr() as usize % DEFAULT_ALIGN, 0);
        assert!(b.is_aligned_to(4096));
    }

    #[test]
    fn windows_narrow_and_restore() {
        let mut b = IoBuf::new(100);
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        let b = b.slice(10..20);
        assert_eq!(b.len(), 10);
        assert_eq!(b[0], 10);
        let b = b.slice(5..10);
        assert_eq!(&b[..], &[15, 16, 17, 18, 19]);
        assert!(!b.is_aligned_to(512));
        let mut b = b.unslice();
        assert_eq!(b.len(), 100);
        b.set_window(98..100);
        assert_eq!(&b[..], &[98, 99]);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn slice_past_window_panics() {
        let _ = IoBuf::new(10).slice(5..11);
    }

    #[test]
    fn empty_buffer_is_valid() {
        let b = IoBuf::new(0);
        assert!(b.is_empty());
        assert_eq!(&b[..], &[] as &[u8]);
        let c = b.clone();
        assert!(c.is_empty());
    }

    #[test]
    fn clone_copies_window_only() {
        let b = IoBuf::from_slice(b"hello world").slice(6..11);
        let c = b.clone();
        assert_eq!(&c[..], b"world");
        assert_eq!(c.capacity(), 5);
    }
}
