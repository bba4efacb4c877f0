//! `block-stream`: copies the data of the images between a node and a base into the node,
//! then makes the base the node's backing file.
//!
//! The job puts a copy-on-read filter above the node (its `bottom` is the lowest image whose
//! data is copied), so the job's copies and the guest's writes through the filter exclude each
//! other: a guest write is never overwritten by stale copied data.
//!
//! Guest reads do not copy (the filter runs in [`CorMode::Stream`]): they are served straight
//! from below, and the clusters they touch become hints the job may copy first. This departs
//! from QEMU, whose stream copies on guest reads too. Stream correctness does not depend on
//! guest reads copying: the job walks the whole range and copies every cluster between the
//! node and the base, so a read that copied would only do early what the job does anyway, at
//! a price: copying on read cost the guest about 3x its read IOPS during a stream (a 4 KiB
//! read of a cluster not yet in the node became a 64 KiB read and an allocating write before
//! it was answered; see BENCHMARKS.md, "Block jobs").
//!
//! The walk keeps up to [`MAX_IN_FLIGHT`] chunks of [`STREAM_CHUNK`] in flight; it reaches a
//! pause point, sleeps in the rate limiter or handles an error only with none in flight (a
//! drained job has no copy running), and counts progress in order. The edges from the node down to the image above the base
//! are frozen while the job runs; the job owns the filter, the node and the images it will
//! drop ([`super::JobManager::check_free`]), so overlapping jobs are refused as QEMU refuses
//! them, while jobs on disjoint parts of one chain run in parallel.
//!
//! Completion runs as one graph change: the base is looked up then (another job may have put
//! or removed a filter above it meanwhile), the node is drained, its backing edge is set and
//! its header rewritten, and the filter goes. Nothing else changes the graph in between.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use graph::{Edge, Error, ErrorKind, LocalBoxFuture, Node, Perm, Result, Role};

use super::chain::{
    chain_contains, chain_until, filter_or_cow_edge, find_backing_image, find_overlay,
    image_filename, image_format,
};
use super::commit::{pause_and_speed, InFlight, Pacer, MAX_IN_FLIGHT};
use super::{
    job_io_error, ErrorAction, IoOp, Job, JobCx, JobDriver, JobManager, JobOptions, JobSetup,
    JobType,
};
use crate::controller::ChangeCtx;
use crate::drivers::cor::{CorDriver, CorMode, CorOptions};
use crate::drivers::qcow2::Qcow2Driver;
use crate::engine::{lookup, lookup_node, on_io, reopen_drained};

/// How much one iteration looks at and copies (QEMU's STREAM_CHUNK).
pub const STREAM_CHUNK: u64 = 512 * 1024;

/// The arguments of `block-stream`.
#[derive(Debug, Clone)]
pub struct StreamArgs {
    /// The node to stream into (node name).
    pub device: String,
    /// The base, by file name: images below `device` down to (not including) it are copied.
    pub base: Option<String>,
    /// The base, by node name.
    pub base_node: Option<String>,
    /// The lowest image to copy from, by node name (instead of a base).
    pub bottom: Option<String>,
    /// The backing file name to write into the header (default: the base's file name).
    pub backing_file: Option<String>,
    /// The options every job takes (id, speed, error policy, filter name, auto-finalize
    /// and -dismiss).
    pub job: JobOptions,
}

impl StreamArgs {
    /// Streams the whole chain below `device` into it.
    pub fn new(device: &str) -> StreamArgs {
        StreamArgs {
            device: device.to_string(),
            base: None,
            base_node: None,
            bottom: None,
            backing_file: None,
            job: JobOptions::default(),
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Starts a stream job on `io`.
pub(crate) fn start(
    mgr: &JobManager,
    io: iothreads::IoThreadHandle,
    args: StreamArgs,
) -> Result<Arc<Job>> {
    if args.base.is_some() && args.base_node.is_some() {
        return Err(invalid(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if args.base.is_some() && args.bottom.is_some() {
        return Err(invalid(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if args.bottom.is_some() && args.base_node.is_some() {
        return Err(invalid(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }
    let spec = args.job.spec(&args.device);
    mgr.create(spec, io, move |ctx, mgr| async move {
        setup(&ctx, &mgr, args).await
    })
}

/// Validation and graph setup, inside the creating change. The checks, their order and
/// their texts are QEMU's (`qmp_block_stream`, then `stream_start`).
async fn setup(ctx: &ChangeCtx, mgr: &JobManager, args: StreamArgs) -> Result<JobSetup> {
    let bs = lookup(&args.device)?;
    let mut base: Option<Arc<Node>> = None;
    if let Some(name) = &args.base {
        base = Some(
            find_backing_image(&bs, name)
                .ok_or_else(|| invalid(format!("Can't find '{name}' in the backing chain")))?,
        );
    }
    if let Some(name) = &args.base_node {
        let b = lookup_node(name)?;
        // The device itself is no base either (QEMU: `bs == base_bs || !bdrv_chain_contains`).
        if Arc::ptr_eq(&bs, &b) || !chain_contains(&bs, &b) {
            return Err(invalid(format!(
                "Node '{name}' is not a backing image of '{}'",
                args.device
            )));
        }
        base = Some(b);
    }
    let mut bottom: Option<Arc<Node>> = None;
    if let Some(name) = &args.bottom {
        let b = lookup_node(name)?;
        if b.is_filter() {
            return Err(invalid(format!(
                "Node '{name}' is a filter, use a non-filter node as 'bottom'"
            )));
        }
        if !chain_contains(&bs, &b) {
            return Err(invalid(format!(
                "Node '{name}' is not in a chain starting from '{}'",
                args.device
            )));
        }
        bottom = Some(b);
    }
    // Every node the job will touch must be free of other jobs (QEMU's op blockers, checked
    // from the device down: the first one owned is the one named).
    let end = match &bottom {
        Some(b) => b.filter_or_cow_child(),
        None => base.clone(),
    };
    for n in chain_until(Some(Arc::clone(&bs)), end.as_ref()) {
        mgr.check_free(&n)?;
    }
    // Without a base the result has no backing file (with `bottom` too: QEMU has no base
    // node then, and refuses a backing file name with this text).
    if base.is_none() && args.backing_file.is_some() {
        return Err(invalid(
            "backing file specified, but streaming the entire chain",
        ));
    }

    // The image directly above the base (the lowest one copied) and the node directly above
    // the base (the same, or a filter between them).
    let (base_overlay, above_base) = match (&bottom, &base) {
        (Some(b), _) => (Arc::clone(b), Arc::clone(b)),
        (None, Some(b)) => {
            let overlay = find_overlay(&bs, b).ok_or_else(|| {
                invalid(format!(
                    "'{}' is not in the backing chain of '{}'",
                    b.name(),
                    bs.name()
                ))
            })?;
            let mut above = Arc::clone(&overlay);
            while let Some(next) = above.filter_or_cow_child() {
                if Arc::ptr_eq(&next, b) {
                    break;
                }
                above = next;
            }
            (overlay, above)
        }
        (None, None) => {
            // The whole chain: its last image is the lowest one copied.
            let mut last = bs.skip_filters();
            while let Some(next) = last.backing_chain_next() {
                last = next;
            }
            let mut above = Arc::clone(&last);
            while let Some(next) = above.filter_or_cow_child() {
                above = next;
            }
            (last, above)
        }
    };

    // The edges from the node down to the node above the base stay frozen while the job
    // runs. Freezing them checks them as QEMU's `bdrv_freeze_backing_chain` does: none may be
    // frozen already, none may lead to a job's own filter (a commit's filter right above the
    // base: "Cannot freeze 'backing' link to 'commit-filter'", iotest 030's overlapping_4).
    // QEMU freezes that far only around the reopen of a read-only node (its copy-on-read
    // filter then keeps the chain down to the lowest image copied frozen), so it would start
    // the stream of a read-write node there, with the commit's filter (which the commit drops
    // when it completes) as the node above its base; strata refuses that case too.
    let chain = chain_until(Some(Arc::clone(&bs)), Some(&above_base));
    let frozen: Vec<Arc<Edge>> = chain.iter().filter_map(|n| filter_or_cow_edge(n)).collect();
    let read_only = bs.is_read_only();
    let filter = Node::new(
        args.job.filter_node_name.as_deref(),
        Box::new(CorDriver::new(CorOptions {
            bottom: Some(Arc::clone(&base_overlay)),
            granularity: 0,
            mode: CorMode::Stream,
        })),
        false,
    )?;

    // One drained transaction: freeze, reopen read-write, insert the filter. All or nothing.
    let drained = ctx.drain(std::slice::from_ref(&bs)).await;
    let r = ctx.transaction(|tx| {
        tx.freeze_chain(&frozen)?;
        if read_only {
            crate::engine::reopen_image(tx, &bs, false)?;
        }
        tx.attach_child(&filter, &bs, Role::Filtered)?;
        tx.insert_filter(&filter, &bs)
    });
    drained.end();
    r?;

    // What the job owns: the filter (its main node), the node, and every node between the
    // node and the base, which it lets nobody else write or resize.
    let mut nodes = vec![
        (Arc::clone(&filter), Perm::NONE, Perm::ALL),
        (Arc::clone(&bs), Perm::NONE, Perm::ALL),
    ];
    let base_now = above_base.filter_or_cow_child();
    for n in chain_until(bs.filter_or_cow_child(), base_now.as_ref()) {
        nodes.push((n, Perm::NONE, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED));
    }
    let driver = StreamJob {
        top: bs,
        filter,
        base_overlay,
        above_base,
        backing_file: args.backing_file,
        read_only,
        frozen,
        filter_dropped: false,
    };
    Ok(JobSetup {
        driver: Box::new(driver),
        nodes,
    })
}

struct StreamJob {
    /// The node streamed into (QEMU's target_bs).
    top: Arc<Node>,
    /// The copy-on-read filter above it.
    filter: Arc<Node>,
    /// The lowest image copied from.
    base_overlay: Arc<Node>,
    /// The node directly above the base.
    above_base: Arc<Node>,
    backing_file: Option<String>,
    /// Whether `top` was read-only before the job (it is reopened so afterwards).
    read_only: bool,
    /// Edges frozen while the job runs (emptied when thawed).
    frozen: Vec<Arc<Edge>>,
    filter_dropped: bool,
}

impl StreamJob {
    async fn drop_filter(&mut self, ctx: &ChangeCtx) {
        if self.filter_dropped {
            return;
        }
        self.filter_dropped = true;
        let drained = ctx.drain(std::slice::from_ref(&self.filter)).await;
        let r = ctx.transaction(|tx| tx.drop_filter(&self.filter));
        drained.end();
        if let Err(e) = r {
            tracing::warn!(
                "stream: cannot remove the copy-on-read filter: {}",
                e.full_message()
            );
        }
    }

    fn thaw(&mut self, ctx: &ChangeCtx) {
        let edges = std::mem::take(&mut self.frozen);
        if !edges.is_empty() {
            let _ = ctx.transaction(|tx| {
                for e in &edges {
                    tx.set_frozen(e, false);
                }
                Ok(())
            });
        }
    }

    /// Walks the top's range in [`STREAM_CHUNK`] chunks, up to [`MAX_IN_FLIGHT`] in flight,
    /// each copying through the filter ([`CorDriver::prefetch`]) what lies between the top
    /// and the base; before each chunk it may copy one cluster a guest read touched ahead of
    /// the walk (a hint). Progress counts chunks in order (hints count only against the speed
    /// limit). An error settles the chunks in flight, then pauses (and redoes the chunk),
    /// skips the chunk or fails the job per `on-error`.
    async fn copy_loop(&self, cx: &JobCx) -> Result<()> {
        let top = self.top.skip_filters();
        if Arc::ptr_eq(&top, &self.base_overlay) {
            return Ok(()); // nothing to stream
        }
        let cor = self
            .filter
            .driver_as::<CorDriver>()
            .expect("the stream filter is copy-on-read");
        let len = self.filter.len();
        cx.set_total(len);
        let filter = &self.filter;
        let chunk = |off: u64, want: u64| -> LocalBoxFuture<'_, std::io::Result<u64>> {
            Box::pin(cor.prefetch(filter, off, want))
        };
        let mut window: InFlight<'_, Chunk, std::io::Result<u64>> = InFlight::new();
        let mut pacer = Pacer::default();
        let mut next = 0;
        let mut first_error: Option<std::io::Error> = None;
        loop {
            if cx.is_cancelled() {
                window.settle().await;
                break;
            }
            let (paused, speed) = pause_and_speed(cx);
            if paused || pacer.must_wait(speed) {
                window.settle().await;
                if pacer.must_wait(speed) {
                    pacer.wait(cx).await;
                } else {
                    cx.pause_point().await;
                }
                continue;
            }
            while window.len() < MAX_IN_FLIGHT && next < len {
                let in_flight = window.keys().map(|k| k.len).sum();
                if !pacer.may_issue(speed, in_flight) {
                    break;
                }
                let want = STREAM_CHUNK.min(len - next);
                if window.len() + 1 < MAX_IN_FLIGHT {
                    if let Some(h) = Self::hint_ahead(cor, next + want, len) {
                        let n = HINT_LEN.min(len - h);
                        window.push(Chunk::hint(h, n), chunk(h, n));
                    }
                }
                window.push(Chunk::walk(next, want), chunk(next, want));
                next += want;
            }
            let Some((c, r)) = window.next_in_order().await else {
                break;
            };
            match r {
                Ok(copied) => {
                    if !c.hint {
                        cx.progress(c.len);
                    }
                    pacer.account(cx, copied);
                }
                // A hint is only a hint: the walk gets to the cluster in any case.
                Err(e) if c.hint => {
                    tracing::debug!("stream: copying a hinted cluster at {}: {e}", c.off);
                }
                Err(e) => {
                    window.settle().await;
                    match cx.on_io_error(IoOp::Read, &e).await {
                        ErrorAction::Stop => {
                            // Redo the chunk once resumed.
                            if !cx.is_cancelled() {
                                window.push_front(c, chunk(c.off, c.len));
                            }
                        }
                        ErrorAction::Report => {
                            first_error.get_or_insert(e);
                            break;
                        }
                        ErrorAction::Ignore => {
                            first_error.get_or_insert(e);
                            cx.progress(c.len);
                        }
                    }
                }
            }
        }
        match first_error {
            // An ignored error still keeps the backing file (the copy is incomplete).
            Some(e) => Err(job_io_error(&e)),
            None => Ok(()),
        }
    }

    /// The first hint at or after `from` (hints behind it are dropped: the walk has issued
    /// those clusters already).
    fn hint_ahead(cor: &CorDriver, from: u64, len: u64) -> Option<u64> {
        while let Some(h) = cor.take_hint() {
            if h >= from && h < len {
                return Some(h);
            }
        }
        None
    }
}

/// How much a hinted copy covers (the filter rounds it out to its granularity).
const HINT_LEN: u64 = 64 * 1024;

/// A chunk in flight: the walk's, or a hinted cluster's.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    off: u64,
    len: u64,
    hint: bool,
}

impl Chunk {
    fn walk(off: u64, len: u64) -> Chunk {
        Chunk {
            off,
            len,
            hint: false,
        }
    }

    fn hint(off: u64, len: u64) -> Chunk {
        Chunk {
            off,
            len,
            hint: true,
        }
    }
}

impl JobDriver for StreamJob {
    fn kind(&self) -> JobType {
        JobType::Stream
    }

    fn run<'a>(&'a mut self, cx: &'a JobCx) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>> {
        Box::pin(self.copy_loop(cx))
    }

    fn prepare<'a>(
        &'a mut self,
        ctx: &'a ChangeCtx,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>> {
        Box::pin(async move {
            self.thaw(ctx);
            // The order DESIGN.md gives: drop the filter, flush top, change the edges in one
            // drained transaction, then write the header.
            self.drop_filter(ctx).await;
            let top = self.top.skip_filters();
            if top.filter_or_cow_child().is_none() {
                return Ok(());
            }
            let t = Arc::clone(&top);
            on_io(ctx, move || async move {
                t.flush()
                    .await
                    .map_err(|e| Error::io(format!("Failed to flush node '{}'", t.name()), e))
            })
            .await?;
            // The base as it is now, read after the drain (never before it): another job may
            // have put a filter above it or taken one away since this job started. No other
            // change runs until this one ends.
            let drained = ctx.drain(std::slice::from_ref(&top)).await;
            let base = self.above_base.filter_or_cow_child();
            let unfiltered_base = base.as_ref().map(|b| b.skip_filters());
            let (name, format) = match &unfiltered_base {
                Some(b) => (
                    self.backing_file.clone().or_else(|| image_filename(b)),
                    Some(image_format(b).to_string()),
                ),
                None => (None, None),
            };
            let r = async {
                ctx.transaction(|tx| tx.set_backing(&top, base.as_ref()))?;
                if top.driver_as::<Qcow2Driver>().is_some() {
                    let t = Arc::clone(&top);
                    on_io(ctx, move || async move {
                        let d = t.driver_as::<Qcow2Driver>().expect("qcow2");
                        d.change_backing_file(&t, name.as_deref(), format.as_deref())
                            .await
                    })
                    .await?;
                }
                Ok(())
            }
            .await;
            drained.end();
            r
        })
    }

    fn abort<'a>(&'a mut self, ctx: &'a ChangeCtx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move { self.thaw(ctx) })
    }

    fn clean<'a>(&'a mut self, ctx: &'a ChangeCtx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move {
            self.thaw(ctx);
            self.drop_filter(ctx).await;
            if self.read_only {
                let drained = ctx.drain(std::slice::from_ref(&self.top)).await;
                if let Err(e) = reopen_drained(ctx, &self.top, true).await {
                    tracing::warn!(
                        "stream: cannot reopen '{}' read-only: {}",
                        self.top.name(),
                        e.full_message()
                    );
                }
                drained.end();
            }
        })
    }
}
