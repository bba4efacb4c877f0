//! `copy-on-read`: a filter whose reads copy data found below the top image into it.
//!
//! A read of a range the top image (the filtered child) does not hold, but some image below
//! it does (down to and including `bottom`, or the whole chain), reads the range through the
//! child, cluster-aligned, and writes it into the child with write-unchanged semantics; later
//! reads find it there. Copies and guest writes to overlapping ranges exclude each other, so a
//! guest write is never overwritten by stale copied data: a copy waits for overlapping writes
//! in flight, checks the allocation again under its range, then reads and writes; writes wait
//! for overlapping copies.
//!
//! The filter has two modes ([`CorMode`]). A node added as such (the `copy-on-read` driver,
//! e.g. by blockdev-add) copies on every read, as QEMU's does. The filter a `stream` job puts
//! above its top runs in [`CorMode::Stream`]: guest reads are served straight from below
//! without copying, and the clusters they touch are recorded as hints for the job (a bounded
//! set; a dropped hint costs nothing, the job copies every cluster anyway); only the job's own
//! [`CorDriver::prefetch`] copies, serialised against overlapping guest writes exactly as in
//! the copying mode.
//!
//! This is a decision where strata departs from QEMU, whose `block-stream` lets guest reads
//! copy too. Stream correctness does not depend on guest reads copying: the job walks the
//! whole range and copies every cluster that lies below the top, whatever the guest did. A
//! guest read of a cluster the job has not reached yet reads the same bytes through the
//! chain, and one that races the job's copy of that cluster reads them either from below or
//! from the top (the qcow2 driver maps a freshly allocated cluster only after its data is
//! written). Copying on guest reads costs the guest about 3x its read IOPS (each 4 KiB read of
//! a cluster not yet in the top became a 64 KiB read and an allocating 64 KiB write before it
//! was answered), and buys nothing the job does not do anyway.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use graph::{BlockStatus, Driver, LocalBoxFuture, Node, Perm, Role, WriteFlags, ZeroFlags};
use iothreads::{BufResult, IoBuf};
use parking_lot::Mutex;

/// What guest reads through the filter do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CorMode {
    /// Reads copy what lies below into the child before they are answered (the
    /// `copy-on-read` driver as such, as QEMU's).
    #[default]
    CopyOnRead,
    /// Reads pass straight through and record the clusters they touch as hints
    /// ([`CorDriver::take_hint`]); only [`CorDriver::prefetch`] copies (a stream job's
    /// filter).
    Stream,
}

/// Options of a copy-on-read node.
#[derive(Debug, Clone, Default)]
pub struct CorOptions {
    /// The lowest node whose data is copied (None: the whole chain below the child).
    pub bottom: Option<Arc<Node>>,
    /// Copy granularity (a multiple of the child's cluster size; default 64 KiB).
    pub granularity: u64,
    /// What guest reads do (default: copy).
    pub mode: CorMode,
}

/// How many hints a [`CorMode::Stream`] filter keeps (the oldest go first).
pub const MAX_HINTS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Copy,
    Write,
}

#[derive(Default)]
struct Ranges {
    next: u64,
    active: Vec<(u64, u64, u64, Kind)>,
    waiters: Vec<std::task::Waker>,
}

/// The copy-on-read driver.
pub struct CorDriver {
    bottom: Option<std::sync::Weak<Node>>,
    granularity: u64,
    mode: CorMode,
    ranges: Mutex<Ranges>,
    /// Clusters (by offset) guest reads touched, newest last ([`CorMode::Stream`]).
    hints: Mutex<VecDeque<u64>>,
}

fn no_child() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "copy-on-read node has no child")
}

/// Whether `off..` is allocated in `top` or any image below it, down to (and including)
/// `bottom` (or the chain's end). Returns the answer and for how many bytes it holds.
pub async fn is_allocated_above(
    top: &Arc<Node>,
    bottom: Option<&Arc<Node>>,
    off: u64,
    len: u64,
) -> io::Result<(bool, u64)> {
    let mut n = len;
    let mut cur = Some(Arc::clone(top));
    while let Some(node) = cur {
        let (st, pn) = node.block_status(off, n).await?;
        n = pn.min(n).max(1);
        if st != BlockStatus::Unallocated {
            return Ok((true, n));
        }
        if bottom.is_some_and(|b| Arc::ptr_eq(b, &node)) {
            break;
        }
        cur = node.filter_or_cow_child();
    }
    Ok((false, n))
}

/// Whether `[off, off + n)` is to be copied into `child` (not allocated in it, allocated in
/// an image below it down to `bottom`), and for how many bytes that holds (at most
/// `end - off`). Runs to copy are merged across the images they come from (one piece from
/// the image below, the next from the base), so one read and one write cover them: a
/// write per run, not per extent of some image below, is what a copy into a qcow2 image
/// costs.
async fn copy_run(
    child: &Arc<Node>,
    bottom: Option<&Arc<Node>>,
    off: u64,
    end: u64,
) -> io::Result<(bool, u64)> {
    let below = child.filter_or_cow_child();
    let mut run = 0;
    while off + run < end {
        let o = off + run;
        let (st, n) = child.block_status(o, end - o).await?;
        let n = n.clamp(1, end - o);
        let (copy, n) = match &below {
            Some(b) if st == BlockStatus::Unallocated => {
                let (a, n) = is_allocated_above(b, bottom, o, n).await?;
                (a, n.clamp(1, end - o))
            }
            _ => (false, n),
        };
        if !copy {
            // The end of a run to copy, or a run to skip (not merged: nothing is done there).
            return Ok(if run > 0 { (true, run) } else { (false, n) });
        }
        run += n;
    }
    Ok((true, run))
}

impl CorDriver {
    /// A driver copying data from below the child down to `opts.bottom`.
    pub fn new(opts: CorOptions) -> Self {
        CorDriver {
            bottom: opts.bottom.as_ref().map(Arc::downgrade),
            granularity: if opts.granularity == 0 {
                65536
            } else {
                opts.granularity
            },
            mode: opts.mode,
            ranges: Mutex::new(Ranges::default()),
            hints: Mutex::new(VecDeque::new()),
        }
    }

    /// The mode the filter runs in.
    pub fn mode(&self) -> CorMode {
        self.mode
    }

    /// Takes the oldest hint: the offset of a cluster (of the copy granularity) a guest read
    /// touched since, which may or may not lie below the top still ([`CorMode::Stream`]).
    pub fn take_hint(&self) -> Option<u64> {
        self.hints.lock().pop_front()
    }

    /// Records the clusters of `[start, end)` (granularity-aligned) as hints, dropping the
    /// oldest beyond [`MAX_HINTS`]; a run of reads in one cluster records it once.
    fn hint(&self, start: u64, end: u64) {
        let mut h = self.hints.lock();
        let mut c = start;
        while c < end {
            if h.back() != Some(&c) {
                if h.len() == MAX_HINTS {
                    h.pop_front();
                }
                h.push_back(c);
            }
            c += self.granularity;
        }
    }

    /// Takes range `[start, end)` for `kind`, waiting for conflicting ones (a copy conflicts
    /// with everything overlapping it; writes only with copies).
    async fn take(&self, start: u64, end: u64, kind: Kind) -> RangeGuard<'_> {
        let id = std::future::poll_fn(|cx| {
            let mut r = self.ranges.lock();
            let conflict = r.active.iter().any(|&(s, e, _, k)| {
                s < end && start < e && (kind == Kind::Copy || k == Kind::Copy)
            });
            if conflict {
                r.waiters.push(cx.waker().clone());
                return std::task::Poll::Pending;
            }
            r.next += 1;
            let id = r.next;
            r.active.push((start, end, id, kind));
            std::task::Poll::Ready(id)
        })
        .await;
        RangeGuard { d: self, id }
    }

    /// Copies what lies below the child into it for `[start, end)`; returns how many bytes
    /// it copied.
    async fn copy_in(&self, child: &Arc<Node>, start: u64, end: u64) -> io::Result<u64> {
        let bottom = self.bottom.as_ref().and_then(|w| w.upgrade());
        let _g = self.take(start, end, Kind::Copy).await;
        let mut copied = 0;
        let mut off = start;
        while off < end {
            let (copy, n) = copy_run(child, bottom.as_ref(), off, end).await?;
            if copy {
                let (r, buf) = child.read(off, IoBuf::new(n as usize)).await;
                r?;
                let (r, _) = child.write(off, buf, WriteFlags::default()).await;
                r?;
                copied += n;
            }
            off += n;
        }
        Ok(copied)
    }

    /// Copies what lies below the child into it for `[offset, offset + len)`, without reading
    /// it back (a stream job's prefetch; it copies in either mode). `node` is this driver's
    /// node. Returns how many bytes it copied.
    pub async fn prefetch(&self, node: &Node, offset: u64, len: u64) -> io::Result<u64> {
        let child = node.filtered().ok_or_else(no_child)?;
        let g = self.granularity;
        let start = offset / g * g;
        let end = ((offset + len).div_ceil(g) * g).min(child.len());
        if child.filter_or_cow_child().is_some() && start < end {
            return self.copy_in(&child, start, end).await;
        }
        Ok(0)
    }

    async fn do_read(&self, node: &Node, offset: u64, buf: IoBuf) -> BufResult<()> {
        let Some(child) = node.filtered() else {
            return (Err(no_child()), buf);
        };
        // Copy what lies below first (aligned, bounded by the child's length), then read.
        let g = self.granularity;
        let start = offset / g * g;
        let end = ((offset + buf.len() as u64).div_ceil(g) * g).min(child.len());
        if child.filter_or_cow_child().is_some() && start < end {
            match self.mode {
                CorMode::CopyOnRead => {
                    if let Err(e) = self.copy_in(&child, start, end).await {
                        return (Err(e), buf);
                    }
                }
                // Straight from below: the job copies (see the module doc).
                CorMode::Stream => self.hint(start, end),
            }
        }
        child.read(offset, buf).await
    }
}

struct RangeGuard<'a> {
    d: &'a CorDriver,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.d.ranges.lock();
        r.active.retain(|&(_, _, id, _)| id != self.id);
        for w in r.waiters.drain(..) {
            w.wake();
        }
    }
}

/// Opens a copy-on-read node named `name` (None: automatic) over `child`.
pub fn open(name: Option<&str>, child: &Arc<Node>, opts: CorOptions) -> graph::Result<Arc<Node>> {
    let node = Node::new(name, Box::new(CorDriver::new(opts)), false)?;
    let m = graph::mutation();
    let mut tx = graph::Transaction::new(&m);
    tx.attach_child(&node, child, Role::Filtered)?;
    tx.commit()?;
    Ok(node)
}

impl Driver for CorDriver {
    fn driver_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn length(&self, node: &Node) -> u64 {
        node.filtered().map_or(0, |c| c.len())
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn child_perms(&self, _role: Role, perm: Perm, shared: Perm, _ro: bool) -> (Perm, Perm) {
        // It writes copied data into its child, which changes nothing a reader sees.
        (perm | Perm::WRITE_UNCHANGED, shared)
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(self.do_read(node, offset, buf))
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            let Some(child) = node.filtered() else {
                return (Err(no_child()), buf);
            };
            let _g = self
                .take(offset, offset + buf.len() as u64, Kind::Write)
                .await;
            child.write(offset, buf, flags).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let child = node.filtered().ok_or_else(no_child)?;
            let _g = self.take(offset, offset + len, Kind::Write).await;
            child.write_zeroes(offset, len, flags).await
        })
    }

    fn discard<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let child = node.filtered().ok_or_else(no_child)?;
            let _g = self.take(offset, offset + len, Kind::Write).await;
            child.discard(offset, len).await
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move { node.filtered().ok_or_else(no_child)?.flush().await })
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, io::Result<(graph::BlockStatus, u64)>> {
        Box::pin(async move {
            node.filtered()
                .ok_or_else(no_child)?
                .block_status(offset, len)
                .await
        })
    }
}
