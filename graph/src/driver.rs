//! What a node's driver implements: the request methods, plus a few control hooks.
//!
//! Request methods run on an IoThread and return `!Send` futures: they may use the IoThread's
//! ring and its local state. They receive the node they serve, so a format or filter driver
//! reaches its children through it.

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;

use iothreads::{BufResult, IoBuf};

use crate::edge::Role;
use crate::error::Result;
use crate::node::Node;
use crate::perm::Perm;

/// A boxed future that stays on its IoThread.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the request completes.
    pub fua: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated rather than written (a hole that reads as zeroes).
    pub may_unmap: bool,
    /// Fail with `ENOTSUP` rather than write explicit zero bytes.
    pub no_fallback: bool,
    /// Force unit access.
    pub fua: bool,
}

/// What a range of a node holds, as block status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatus {
    /// Data stored in this node (it may be zeroes, but it is stored here).
    Data,
    /// Reads as zeroes, stored as such in this node (no data below shows through).
    Zero,
    /// Not allocated in this node: reads come from below (a backing node), or zeroes.
    Unallocated,
}

/// A block driver: how a node serves requests.
pub trait Driver: Any + Send + Sync + 'static {
    /// The driver's name as QMP shows it (`file`, `null-co`, `raw`, `qcow2`, ...).
    fn driver_name(&self) -> &'static str;

    /// The node's length in bytes (`node` is the node this driver serves: a filter answers
    /// with its child's length).
    fn length(&self, node: &Node) -> u64;

    /// Reads `buf.len()` bytes at `offset` into `buf`'s window.
    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
    ) -> LocalBoxFuture<'a, BufResult<()>>;

    /// Writes `buf`'s window at `offset`.
    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>>;

    /// Makes `len` bytes at `offset` read as zeroes.
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> LocalBoxFuture<'a, io::Result<()>>;

    /// Tells the storage that `len` bytes at `offset` are no longer needed (their content is
    /// then unspecified).
    fn discard<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, io::Result<()>>;

    /// Makes every completed write durable.
    fn flush<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, io::Result<()>>;

    /// Grows the node to `len` bytes (QEMU's `bdrv_co_truncate` for growth with
    /// `preallocation=off`): afterwards [`Driver::length`] reports `len`, and the new range
    /// reads as zeroes. Shrinking is refused with an `EINVAL` error; `len` equal to the
    /// current length succeeds without change. The default refuses with an error of kind
    /// [`io::ErrorKind::Unsupported`] ("operation not supported by this driver").
    fn truncate<'a>(&'a self, _node: &'a Node, _len: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "operation not supported by this driver",
            ))
        })
    }

    /// Sets how far the node's storage reaches ahead of use (QEMU's `preallocation=falloc`
    /// growth, as a hint for speed): with `len` above the current length, grows the node to
    /// `len` with the new range allocated and reading as zeroes, leaving every byte already
    /// written as it is (writes racing with it keep their data); with `len` below it, cuts
    /// the tail that the caller preallocated and knows holds nothing it needs. A format driver
    /// grows its file this way ahead of its allocations, so its data writes land inside the
    /// file rather than extend it (an extending write is one the kernel cannot issue without
    /// blocking, so io_uring hands it to a worker, one at a time per file). The default does
    /// nothing.
    fn preallocate<'a>(&'a self, _node: &'a Node, _len: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Called on a drained node, after its flush, before it is reopened read-only: gives back
    /// what the driver reserved for writing (qcow2 cuts its file's preallocated tail), which it
    /// cannot do once read-only. The default does nothing.
    fn prepare_read_only<'a>(&'a self, _node: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// The status of the range starting at `offset` (at most `len` bytes): what it is, and
    /// for how many bytes from `offset` that holds (at least 1 when `len` > 0). Drivers
    /// without allocation information report data for the whole range.
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, io::Result<(BlockStatus, u64)>> {
        Box::pin(async move { Ok((BlockStatus::Data, len)) })
    }

    /// The permissions the node's users now take and share changed; a protocol driver moves
    /// its image locks to match (taking the new ones before dropping the old). Drivers without
    /// external state accept anything.
    fn set_perms(&self, _perm: Perm, _shared: Perm) -> Result<()> {
        Ok(())
    }

    /// What this node takes and shares on its child in `role`, given what its own parents
    /// take (`perm`) and share (`shared`) and whether it is read-only. The default is QEMU's
    /// for data children: filtered and file children pass the parents' needs through, backing
    /// children are only read.
    fn child_perms(&self, role: Role, perm: Perm, shared: Perm, read_only: bool) -> (Perm, Perm) {
        default_child_perms(role, perm, shared, read_only)
    }

    /// Whether the node is a filter: one `filtered` child whose data it shows unchanged.
    fn is_filter(&self) -> bool {
        false
    }

    /// Whether links to the node may never be frozen (QEMU's `never_freeze`): a job's own
    /// filter (commit, active commit) sets it, so that the job can always drop it; another
    /// job whose chain would freeze an edge into it is refused
    /// ([`crate::Transaction::freeze_chain`]).
    fn never_freeze(&self) -> bool {
        false
    }

    /// Prepares a switch between read-only and read-write (e.g. reopening a file with the other
    /// access mode). Nothing is visible until `reopen_commit`; `reopen_abort` undoes it.
    fn reopen_prepare(&self, _read_only: bool) -> Result<()> {
        Ok(())
    }

    /// Makes a prepared reopen take effect.
    fn reopen_commit(&self) {}

    /// Drops a prepared reopen.
    fn reopen_abort(&self) {}

    /// Closes the node's state asynchronously before the driver is dropped (flush caches,
    /// clear dirty flags). Runs on an IoThread, called by the closer.
    fn close<'a>(&'a self) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether an offset/length must be a multiple of this for requests to go straight to the
    /// storage (callers may still send anything; the driver pads).
    fn request_alignment(&self) -> u32 {
        1
    }

    /// The file name the node was opened from, if it has one.
    fn filename(&self) -> Option<&str> {
        None
    }
}

/// QEMU's default child permissions for data children (`bdrv_default_perms` for filtered and
/// data-only file children, `bdrv_default_perms_for_cow` for backing children).
pub fn default_child_perms(role: Role, perm: Perm, shared: Perm, _read_only: bool) -> (Perm, Perm) {
    match role {
        Role::Backing => {
            let p = perm & Perm::CONSISTENT_READ;
            let mut s = if shared.contains(Perm::WRITE) {
                Perm::WRITE | Perm::RESIZE
            } else {
                Perm::NONE
            };
            s |= Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
            (p, s)
        }
        Role::File | Role::Filtered | Role::Root => (perm, shared),
    }
}

/// QEMU's child permissions for the file under a format with metadata (qcow2): it reads its
/// metadata consistently, writes and resizes it unless read-only, and lets nobody else write
/// or resize under it.
pub fn metadata_file_perms(perm: Perm, shared: Perm, read_only: bool) -> (Perm, Perm) {
    let mut p = perm | Perm::CONSISTENT_READ;
    if !read_only {
        p |= Perm::WRITE | Perm::RESIZE;
    }
    let s =
        (shared | Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED) & !(Perm::WRITE | Perm::RESIZE);
    (p, s)
}
