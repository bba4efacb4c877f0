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

/// A block driver: how a node serves requests.
pub trait Driver: Any + Send + Sync + 'static {
    /// The driver's name as QMP shows it (`file`, `null-co`, `raw`, `qcow2`, ...).
    fn driver_name(&self) -> &'static str;

    /// The node's length in bytes.
    fn len(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset` into `buf`'s window.
    fn read<'a>(&'a self, node: &'a Node, offset: u64, buf: IoBuf)
        -> LocalBoxFuture<'a, BufResult<()>>;

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
    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64)
        -> LocalBoxFuture<'a, io::Result<()>>;

    /// Makes every completed write durable.
    fn flush<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, io::Result<()>>;

    /// The permissions the node's users now take and share changed; a protocol driver moves
    /// its image locks to match (taking the new ones before dropping the old). Drivers without
    /// external state accept anything.
    fn set_perms(&self, _perm: Perm, _shared: Perm) -> Result<()> {
        Ok(())
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
