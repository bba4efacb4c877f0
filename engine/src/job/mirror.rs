//! Active commit: `block-commit` whose top is the active layer, done the way QEMU's mirror
//! does it.
//!
//! A `mirror_top` filter goes above top, under every parent (the guest's backend included).
//! Writes pass through it to top and, once done, mark their range in a dirty bitmap. The job
//! marks every extent allocated from top down to the image above base, then copies dirty
//! ranges into base (clearing a range's bits before reading it, so a write that lands during
//! the copy marks it again) until none is left, flushes base and goes READY. It keeps copying
//! new writes until `complete` (or a cancel, which after READY is soft).
//!
//! Up to [`MAX_IN_FLIGHT`] copies are in flight at once, as QEMU's mirror keeps up to 16;
//! never two of overlapping ranges (a range written again while its copy runs waits for that
//! copy, or the older data could land in base last). The loop reaches a pause point, sleeps
//! in the rate limiter or handles an error only once every copy in flight has ended, so a
//! drained job has none running.
//!
//! The completion is one graph change: with the filter and everything above it drained (no
//! guest write can start), the last dirty ranges are copied and base is flushed; then base
//! takes the filter's place under every parent (the pivot), or on a soft cancel the filter
//! simply goes, leaving base a point-in-time copy. Either way both chains stay valid: base
//! only ever receives data that every image above it shadows.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use graph::{
    BlockStatus, Driver, Edge, Error, ErrorKind, LocalBoxFuture, Node, Perm, Result, Role,
    WriteFlags, ZeroFlags,
};
use iothreads::{BufResult, IoBuf};

use super::chain::{chain_until, find_overlay};
use super::commit::{
    attach_writer, pause_and_speed, release_writer, replace_with_base, thaw, CommitArgs, InFlight,
    Pacer, Resolved, WriterEdge,
};
use super::{job_io_error, ErrorAction, IoOp, JobCx, JobDriver, JobSetup, JobType};
use crate::controller::ChangeCtx;
use crate::drivers::cor;
use crate::engine::{on_io, reopen_drained};

/// Dirty-tracking granularity.
pub const GRANULARITY: u64 = 64 * 1024;
/// The most one copy moves.
pub const MAX_CHUNK: u64 = 1024 * 1024;
/// How many copies are in flight at once (QEMU's mirror: `MAX_IN_FLIGHT`, 16).
pub const MAX_IN_FLIGHT: usize = 16;

/// A dirty bitmap over a node's range, one bit per [`GRANULARITY`] bytes, lock-free: writers
/// set bits with `fetch_or`, the job clears them with `fetch_and`.
pub struct DirtyBitmap {
    len: u64,
    words: Vec<AtomicU64>,
}

impl DirtyBitmap {
    /// A clean bitmap covering `len` bytes.
    pub fn new(len: u64) -> DirtyBitmap {
        let bits = len.div_ceil(GRANULARITY);
        DirtyBitmap {
            len,
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn bits(&self, off: u64, n: u64) -> std::ops::Range<u64> {
        let end = (off + n).min(self.len);
        off / GRANULARITY..end.div_ceil(GRANULARITY)
    }

    /// Marks `[off, off + n)` dirty.
    pub fn set(&self, off: u64, n: u64) {
        for b in self.bits(off, n) {
            self.words[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::AcqRel);
        }
    }

    /// Clears the bits of `[off, off + n)` (granularity-aligned ranges from `next_chunk`).
    pub fn clear(&self, off: u64, n: u64) {
        for b in self.bits(off, n) {
            self.words[(b / 64) as usize].fetch_and(!(1 << (b % 64)), Ordering::AcqRel);
        }
    }

    fn is_set(&self, b: u64) -> bool {
        self.words[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    /// The first dirty run at or after `from` (wrapping around), at most `max` bytes long,
    /// as `(offset, len)`.
    pub fn next_chunk(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let nbits = self.len.div_ceil(GRANULARITY);
        let start = (from / GRANULARITY).min(nbits);
        let first = (start..nbits).chain(0..start).find(|&b| {
            // Skip clean words quickly.
            self.words[(b / 64) as usize].load(Ordering::Acquire) != 0 && self.is_set(b)
        })?;
        let mut end = first + 1;
        while end < nbits && (end - first) * GRANULARITY < max && self.is_set(end) {
            end += 1;
        }
        let off = first * GRANULARITY;
        Some((off, (end * GRANULARITY).min(self.len) - off))
    }

    /// How many bytes are dirty.
    pub fn dirty_bytes(&self) -> u64 {
        let bits: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        (bits * GRANULARITY).min(self.len)
    }
}

/// Sets up an active commit (called by `block-commit` when top is the device).
pub(crate) async fn setup_active_commit(
    ctx: &ChangeCtx,
    r: Resolved,
    args: &CommitArgs,
) -> Result<JobSetup> {
    let (top, base) = (r.top, r.base);
    let base_overlay = find_overlay(&top, &base).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "'{}' is not in the backing chain of '{}'",
                base.name(),
                top.name()
            ),
        )
    })?;
    let job_id = args.job.id_for(&args.device);
    let bitmap = Arc::new(DirtyBitmap::new(top.len()));
    let filter = Node::new(
        args.job.filter_node_name.as_deref(),
        Box::new(MirrorTopDriver {
            bitmap: Arc::clone(&bitmap),
        }),
        false,
    )?;
    let base_read_only = base.is_read_only();
    let top_read_only = top.is_read_only();
    let drained = ctx.drain(&[Arc::clone(&top), Arc::clone(&base)]).await;
    let frozen = std::cell::RefCell::new(Vec::new());
    let res = ctx.transaction(|tx| {
        if base_read_only {
            crate::engine::reopen_image(tx, &base, false)?;
        }
        // Base shares writes: at the pivot, top's writers move onto it.
        let writer = attach_writer(tx, &base, &job_id, Perm::WRITE | Perm::RESIZE)?;
        super::commit::insert_filter_and_freeze(
            tx,
            &filter,
            &top,
            &base,
            &mut frozen.borrow_mut(),
        )?;
        Ok(writer)
    });
    drained.end();
    let writer = res?;
    let frozen = frozen.into_inner();
    let mut nodes = vec![
        (Arc::clone(&filter), Perm::NONE, Perm::ALL),
        (Arc::clone(&top), Perm::NONE, Perm::ALL),
    ];
    for n in chain_until(top.filter_or_cow_child(), Some(&base)) {
        nodes.push((n, Perm::NONE, Perm::WRITE | Perm::WRITE_UNCHANGED));
    }
    nodes.push((Arc::clone(&base), Perm::NONE, Perm::ALL));
    Ok(JobSetup {
        driver: Box::new(ActiveCommitJob {
            top,
            base,
            base_overlay,
            filter,
            bitmap,
            frozen,
            writer: Some(writer),
            base_read_only,
            top_read_only,
            pivot: false,
            pivoted: false,
            filter_dropped: false,
        }),
        nodes,
    })
}

struct ActiveCommitJob {
    top: Arc<Node>,
    base: Arc<Node>,
    base_overlay: Arc<Node>,
    filter: Arc<Node>,
    bitmap: Arc<DirtyBitmap>,
    frozen: Vec<Arc<Edge>>,
    writer: Option<WriterEdge>,
    base_read_only: bool,
    top_read_only: bool,
    /// Set when the loop ends on `complete`: the completion pivots.
    pivot: bool,
    pivoted: bool,
    filter_dropped: bool,
}

/// What one copy of a dirty range ends with: done, or which side failed.
type CopyResult = std::result::Result<(), (IoOp, std::io::Error)>;

/// Copies `[off, off + n)` from top into base.
async fn copy_range(top: &Node, base: &Node, off: u64, n: u64) -> CopyResult {
    let (r, buf) = top.read(off, IoBuf::new(n as usize)).await;
    r.map_err(|e| (IoOp::Read, e))?;
    let (r, _) = base.write(off, buf, WriteFlags::default()).await;
    r.map_err(|e| (IoOp::Write, e))
}

/// Waits for every copy in flight and takes the results: progress for those done, the range
/// dirty again for those that failed; returns the first failure.
async fn settle(
    cx: &JobCx,
    window: &mut InFlight<'_, (u64, u64), CopyResult>,
    bitmap: &DirtyBitmap,
    pacer: &mut Pacer,
) -> Option<(IoOp, std::io::Error)> {
    window.settle().await;
    let mut first = None;
    while let Some(((off, n), r)) = window.next_any().await {
        match r {
            Ok(()) => {
                cx.progress(n);
                pacer.account(cx, n);
            }
            Err(e) => {
                bitmap.set(off, n);
                first.get_or_insert(e);
            }
        }
    }
    first
}

/// Copies every dirty range (nothing may write meanwhile: the caller drained), then flushes.
async fn sync_all(top: Arc<Node>, base: Arc<Node>, bitmap: Arc<DirtyBitmap>) -> Result<()> {
    while let Some((off, n)) = bitmap.next_chunk(0, MAX_CHUNK) {
        bitmap.clear(off, n);
        if let Err((_, e)) = copy_range(&top, &base, off, n).await {
            bitmap.set(off, n);
            return Err(job_io_error(&e));
        }
    }
    base.flush().await.map_err(|e| job_io_error(&e))
}

impl ActiveCommitJob {
    async fn copy_loop(&mut self, cx: &JobCx) -> Result<()> {
        let len = self.top.len();
        super::commit::grow_base(&self.base, len).await?;
        // Everything allocated above base is dirty to begin with.
        let mut off = 0;
        while off < len {
            cx.pause_point().await;
            if cx.is_cancelled() {
                return Ok(());
            }
            let r =
                cor::is_allocated_above(&self.top, Some(&self.base_overlay), off, len - off).await;
            match r {
                Ok((alloc, n)) => {
                    let n = n.clamp(1, len - off);
                    if alloc {
                        self.bitmap.set(off, n);
                    }
                    off += n;
                }
                Err(e) => match cx.on_io_error(IoOp::Read, &e).await {
                    ErrorAction::Report => return Err(job_io_error(&e)),
                    _ => continue,
                },
            }
        }
        cx.set_total(self.bitmap.dirty_bytes());
        // The copies in flight borrow these (not `self`, which the loop sets on its way out).
        let (top, base, bitmap) = (
            Arc::clone(&self.top),
            Arc::clone(&self.base),
            Arc::clone(&self.bitmap),
        );
        let copy = |off: u64, n: u64| -> LocalBoxFuture<'_, CopyResult> {
            Box::pin(copy_range(&top, &base, off, n))
        };
        let mut window: InFlight<'_, (u64, u64), CopyResult> = InFlight::new();
        let mut pacer = Pacer::default();
        let mut cursor = 0;
        let mut ready = false;
        loop {
            if cx.is_cancelled() {
                settle(cx, &mut window, &bitmap, &mut pacer).await;
                return Ok(());
            }
            let (paused, speed) = pause_and_speed(cx);
            if paused || pacer.must_wait(speed) {
                if let Some((op, e)) = settle(cx, &mut window, &bitmap, &mut pacer).await {
                    if cx.on_io_error(op, &e).await == ErrorAction::Report {
                        return Err(job_io_error(&e));
                    }
                    continue;
                }
                if pacer.must_wait(speed) {
                    pacer.wait(cx).await;
                } else {
                    cx.pause_point().await;
                }
                continue;
            }
            // Once READY, `complete` (or a soft cancel) ends the loop now: the completion
            // drains the guest and copies what is still dirty (a copy that failed here is
            // dirty again). Waiting for the bitmap to run empty first would hold `complete`
            // off for as long as the guest keeps writing.
            if ready && cx.should_complete() {
                settle(cx, &mut window, &bitmap, &mut pacer).await;
                self.pivot = !cx.soft_cancelled();
                return Ok(());
            }
            // Issue dirty runs, none overlapping a copy in flight (a range written again while
            // its copy runs waits for that copy: two copies of one range in flight could land
            // in base in the wrong order).
            while window.len() < MAX_IN_FLIGHT {
                let in_flight = window.keys().map(|k| k.1).sum();
                if !pacer.may_issue(speed, in_flight) {
                    break;
                }
                let Some((off, n)) = bitmap.next_chunk(cursor, MAX_CHUNK) else {
                    break;
                };
                if window.keys().any(|&(o, l)| o < off + n && off < o + l) {
                    break;
                }
                bitmap.clear(off, n);
                window.push((off, n), copy(off, n));
                cursor = off + n;
            }
            if window.is_empty() {
                // Nothing dirty (with nothing in flight, nothing blocks an issue).
                if !ready {
                    if let Err(e) = base.flush().await {
                        match cx.on_io_error(IoOp::Write, &e).await {
                            ErrorAction::Report => return Err(job_io_error(&e)),
                            _ => continue,
                        }
                    }
                    ready = true;
                    cx.ready();
                }
                if cx.should_complete() {
                    self.pivot = !cx.soft_cancelled();
                    return Ok(());
                }
                cx.sleep(Duration::from_millis(100)).await;
                continue;
            }
            let Some(((off, n), r)) = window.next_any().await else {
                continue;
            };
            match r {
                Ok(()) => {
                    cx.progress(n);
                    pacer.account(cx, n);
                    let in_flight: u64 = window.keys().map(|k| k.1).sum();
                    cx.set_remaining(bitmap.dirty_bytes() + in_flight);
                }
                Err((op, e)) => {
                    bitmap.set(off, n);
                    // The others finish first: the error is handled with nothing in flight.
                    settle(cx, &mut window, &bitmap, &mut pacer).await;
                    if cx.on_io_error(op, &e).await == ErrorAction::Report {
                        return Err(job_io_error(&e));
                    }
                }
            }
        }
    }

    async fn drop_filter(&mut self, ctx: &ChangeCtx) {
        if self.filter_dropped {
            return;
        }
        self.filter_dropped = true;
        let drained = ctx.drain(std::slice::from_ref(&self.filter)).await;
        if let Err(e) = ctx.transaction(|tx| tx.drop_filter(&self.filter)) {
            tracing::warn!("commit: cannot remove its filter: {}", e.full_message());
        }
        drained.end();
    }
}

impl JobDriver for ActiveCommitJob {
    fn kind(&self) -> JobType {
        JobType::Commit
    }

    fn run<'a>(&'a mut self, cx: &'a JobCx) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>> {
        Box::pin(self.copy_loop(cx))
    }

    fn prepare<'a>(
        &'a mut self,
        ctx: &'a ChangeCtx,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>> {
        Box::pin(async move {
            // No guest write can start from here to the end of the change.
            let drained = ctx
                .drain(&[Arc::clone(&self.filter), Arc::clone(&self.base)])
                .await;
            let (t, b, m) = (
                Arc::clone(&self.top),
                Arc::clone(&self.base),
                Arc::clone(&self.bitmap),
            );
            let r = on_io(ctx, move || sync_all(t, b, m)).await;
            if let Err(e) = r {
                drained.end();
                return Err(e);
            }
            thaw(ctx, &mut self.frozen);
            release_writer(ctx, &mut self.writer);
            let r = if self.pivot {
                self.filter_dropped = true;
                self.pivoted = true;
                replace_with_base(ctx, &self.filter, &self.base, None, true).await
            } else {
                self.drop_filter(ctx).await;
                Ok(())
            };
            drained.end();
            r
        })
    }

    fn abort<'a>(&'a mut self, ctx: &'a ChangeCtx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move {
            thaw(ctx, &mut self.frozen);
            release_writer(ctx, &mut self.writer);
            self.drop_filter(ctx).await;
        })
    }

    fn clean<'a>(&'a mut self, ctx: &'a ChangeCtx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move {
            thaw(ctx, &mut self.frozen);
            release_writer(ctx, &mut self.writer);
            // After a pivot base is what top was (read-write if top was); otherwise it goes
            // back to what it was.
            let want_ro = if self.pivoted {
                self.top_read_only
            } else {
                self.base_read_only
            };
            if want_ro && !self.base.is_read_only() {
                let drained = ctx.drain(std::slice::from_ref(&self.base)).await;
                if let Err(e) = reopen_drained(ctx, &self.base, true).await {
                    tracing::warn!(
                        "commit: cannot reopen '{}' read-only: {}",
                        self.base.name(),
                        e.full_message()
                    );
                }
                drained.end();
            }
        })
    }

    fn can_complete(&self) -> bool {
        true
    }

    fn soft_cancel_when_ready(&self) -> bool {
        true
    }
}

/// The `mirror_top` filter: writes go to top and mark the dirty bitmap when done.
struct MirrorTopDriver {
    bitmap: Arc<DirtyBitmap>,
}

fn no_child() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotFound, "mirror filter has no child")
}

impl Driver for MirrorTopDriver {
    fn driver_name(&self) -> &'static str {
        "mirror_top"
    }

    fn length(&self, node: &Node) -> u64 {
        node.filtered().map_or(0, |c| c.len())
    }

    fn is_filter(&self) -> bool {
        true
    }

    /// QEMU's `mirror_top_bs->never_freeze`: the job must always be able to drop it.
    fn never_freeze(&self) -> bool {
        true
    }

    fn child_perms(&self, _role: Role, perm: Perm, shared: Perm, _ro: bool) -> (Perm, Perm) {
        // No consistent reads (everything above base is unshared for them) and writes shared,
        // or the job could not write base below (QEMU's bdrv_mirror_top_child_perm).
        (perm & !Perm::CONSISTENT_READ, shared | Perm::WRITE)
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            match node.filtered() {
                Some(c) => c.read(offset, buf).await,
                None => (Err(no_child()), buf),
            }
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            let Some(c) = node.filtered() else {
                return (Err(no_child()), buf);
            };
            let n = buf.len() as u64;
            let r = c.write(offset, buf, flags).await;
            self.bitmap.set(offset, n);
            r
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let r = node
                .filtered()
                .ok_or_else(no_child)?
                .write_zeroes(offset, len, flags)
                .await;
            self.bitmap.set(offset, len);
            r
        })
    }

    fn discard<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let r = node
                .filtered()
                .ok_or_else(no_child)?
                .discard(offset, len)
                .await;
            self.bitmap.set(offset, len);
            r
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move { node.filtered().ok_or_else(no_child)?.flush().await })
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, std::io::Result<(BlockStatus, u64)>> {
        Box::pin(async move {
            node.filtered()
                .ok_or_else(no_child)?
                .block_status(offset, len)
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs_wrap_and_clear() {
        let b = DirtyBitmap::new(10 * GRANULARITY + 100);
        assert_eq!(b.next_chunk(0, MAX_CHUNK), None);
        b.set(3 * GRANULARITY + 5, 10);
        b.set(10 * GRANULARITY + 50, 1);
        assert_eq!(
            b.next_chunk(0, MAX_CHUNK),
            Some((3 * GRANULARITY, GRANULARITY))
        );
        assert_eq!(
            b.next_chunk(4 * GRANULARITY, MAX_CHUNK),
            Some((10 * GRANULARITY, 100))
        );
        b.clear(10 * GRANULARITY, 100);
        assert_eq!(
            b.next_chunk(4 * GRANULARITY, MAX_CHUNK),
            Some((3 * GRANULARITY, GRANULARITY))
        );
        assert_eq!(b.dirty_bytes(), GRANULARITY);
        b.set(0, 10 * GRANULARITY);
        assert_eq!(b.next_chunk(0, 2 * GRANULARITY), Some((0, 2 * GRANULARITY)));
        b.clear(0, 10 * GRANULARITY);
        assert_eq!(b.next_chunk(0, MAX_CHUNK), None);
    }
}
