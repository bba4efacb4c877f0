//! `block-commit`: copies the data of the images from `top` down to the image above `base`
//! into `base`, then cuts them out of the chain.
//!
//! Argument checks and their order follow QEMU's `qmp_block_commit` (libvirt probes for the
//! `DeviceNotFound` error, so the device is looked up first). When `top` is the device itself
//! (the active layer) the job is an active commit ([`super::mirror`]); otherwise it is an
//! intermediate commit, here.
//!
//! The copy keeps up to [`MAX_IN_FLIGHT`] chunks of [`COMMIT_BUFFER`] in flight
//! (`InFlight`, `Pacer`: shared with stream and active commit); pause points, the rate
//! limiter's sleeps and error handling come only with none in flight.
//!
//! An intermediate commit puts a `commit` filter above `top` (it takes nothing of `top` and
//! shares everything, so the job may write `base` while the overlay still reads through the
//! chain), freezes the edges from the filter down to `base`, and reopens `base` read-write.
//! It owns the device and `top` down to and including `base` (QEMU's op blockers: its
//! `block_job_create` on the device, `block_job_add_bdrv` on the rest); it checks that the
//! overlay of `top` is free but does not own it, and it does not own its filter either, as
//! QEMU's commit does not block its `commit_top` node. So a stream into the overlay's upper
//! chain may use the filter as its base (iotest 030's overlapping_5); a stream whose range
//! crosses the filter is refused at the first image the commit owns ("Node 'node5' is busy",
//! overlapping_2), or, if it ends right below the filter, because no job may freeze a link
//! into the filter ([`graph::Driver::never_freeze`]: "Cannot freeze 'backing' link to
//! 'commit-filter'", overlapping_4).
//!
//! Completion runs as one graph change: `base` is flushed; every parent of the filter (the
//! overlay, and whatever else was pointed at the filter meanwhile, such as a finished stream's
//! top) is pointed at `base` in one drained transaction; then each of those images gets
//! `base`'s file name in its header (reopened read-write for the write if it was read-only);
//! then the nodes cut out are released.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;

use graph::{
    BlockStatus, Driver, Edge, Error, ErrorKind, LocalBoxFuture, Node, Perm, Result, Role,
    WriteFlags, ZeroFlags,
};
use iothreads::{BufResult, IoBuf};

use super::chain::{
    chain_contains, chain_until, filter_or_cow_edge, find_backing_image, find_base, find_overlay,
    image_filename, image_format,
};
use super::{
    job_io_error, ErrorAction, IoOp, Job, JobCx, JobDriver, JobManager, JobOptions, JobSetup,
    JobType,
};
use crate::controller::ChangeCtx;
use crate::drivers::cor;
use crate::drivers::qcow2::Qcow2Driver;
use crate::engine::{lookup_node, on_io, reopen_drained};

/// How much one iteration copies (QEMU's COMMIT_BUFFER_SIZE).
pub const COMMIT_BUFFER: u64 = 512 * 1024;

/// How many chunks of 512 KiB stream and commit keep in flight at once (4 MiB; active
/// commit keeps up to [`super::mirror::MAX_IN_FLIGHT`] dirty ranges of up to 1 MiB, as QEMU's
/// mirror does). More did not make a stream faster here: the copies' allocating writes to
/// one file are what limits it.
pub const MAX_IN_FLIGHT: usize = 8;

enum Slot<'a, T> {
    Running(LocalBoxFuture<'a, T>, Arc<SlotWaker>),
    Done(T),
}

/// The waker a chunk's future gets: it marks the chunk as woken and wakes the job's task, so
/// a poll of the set polls only the chunks that may have progressed (as `FuturesUnordered`
/// does). Chunks can be woken from other threads (a guest's IoThread releasing a range).
struct SlotWaker {
    woken: AtomicBool,
    task: Arc<Mutex<Option<Waker>>>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(w) = self.task.lock().as_ref() {
            w.wake_by_ref();
        }
    }
}

/// A copy loop's chunks in flight: futures joined in the job's own task on its IoThread
/// (nothing is spawned, so they may borrow the job), kept in the order they were issued, each
/// with a key (what the chunk covers). A poll polls the chunks woken since the last one.
///
/// The loops keep one rule: they reach a pause point (or sleep in the rate limiter, or call
/// `on_io_error`, which may pause) only after [`InFlight::settle`], so a job that reports
/// itself quiet has no chunk in flight.
pub(crate) struct InFlight<'a, K, T> {
    slots: VecDeque<(K, Slot<'a, T>)>,
    /// The job task's waker, as of the last poll.
    task: Arc<Mutex<Option<Waker>>>,
}

impl<'a, K, T> InFlight<'a, K, T> {
    pub(crate) fn new() -> Self {
        InFlight {
            slots: VecDeque::new(),
            task: Arc::new(Mutex::new(None)),
        }
    }

    /// Chunks held, running or done but not yet taken.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The keys of every chunk held.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.slots.iter().map(|(k, _)| k)
    }

    fn running(&self, fut: LocalBoxFuture<'a, T>) -> Slot<'a, T> {
        let w = Arc::new(SlotWaker {
            woken: AtomicBool::new(true),
            task: Arc::clone(&self.task),
        });
        Slot::Running(fut, w)
    }

    /// Issues a chunk (it runs from the next poll on).
    pub(crate) fn push(&mut self, key: K, fut: LocalBoxFuture<'a, T>) {
        let slot = self.running(fut);
        self.slots.push_back((key, slot));
    }

    /// Issues a chunk ahead of every other (a retry of the one taken last).
    pub(crate) fn push_front(&mut self, key: K, fut: LocalBoxFuture<'a, T>) {
        let slot = self.running(fut);
        self.slots.push_front((key, slot));
    }

    /// Polls every running chunk woken since it was last polled; returns how many are still
    /// running.
    fn poll_all(&mut self, cx: &mut Context<'_>) -> usize {
        {
            let mut t = self.task.lock();
            if !t.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *t = Some(cx.waker().clone());
            }
        }
        let mut running = 0;
        for (_, slot) in self.slots.iter_mut() {
            if let Slot::Running(f, w) = slot {
                if !w.woken.swap(false, Ordering::AcqRel) {
                    running += 1;
                    continue;
                }
                let waker = Waker::from(Arc::clone(w));
                match f.as_mut().poll(&mut Context::from_waker(&waker)) {
                    Poll::Ready(v) => *slot = Slot::Done(v),
                    Poll::Pending => running += 1,
                }
            }
        }
        running
    }

    /// The oldest chunk once it is done (the others keep running meanwhile); None if none
    /// is held.
    pub(crate) async fn next_in_order(&mut self) -> Option<(K, T)> {
        std::future::poll_fn(|cx| {
            if self.slots.is_empty() {
                return Poll::Ready(None);
            }
            self.poll_all(cx);
            if matches!(self.slots.front(), Some((_, Slot::Done(_)))) {
                return Poll::Ready(self.take(0));
            }
            Poll::Pending
        })
        .await
    }

    /// Whichever chunk is done first; None if none is held.
    pub(crate) async fn next_any(&mut self) -> Option<(K, T)> {
        std::future::poll_fn(|cx| {
            if self.slots.is_empty() {
                return Poll::Ready(None);
            }
            self.poll_all(cx);
            match self
                .slots
                .iter()
                .position(|(_, s)| matches!(s, Slot::Done(_)))
            {
                Some(i) => Poll::Ready(self.take(i)),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Waits until no chunk is running (the results stay, in order, for the next takes).
    pub(crate) async fn settle(&mut self) {
        std::future::poll_fn(|cx| {
            if self.poll_all(cx) == 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn take(&mut self, i: usize) -> Option<(K, T)> {
        match self.slots.remove(i) {
            Some((k, Slot::Done(v))) => Some((k, v)),
            Some(_) => unreachable!("only done chunks are taken"),
            None => None,
        }
    }
}

/// The speed limit as a copy loop with several chunks in flight keeps it: the bytes copied
/// since the loop last waited in the rate limiter, and those in flight, stay within one
/// slice's quota (a tenth of the speed), so a loop issues while it may and settles, then
/// waits (`JobCx::rate_limit_wait`, which sleeps as long as the accounted bytes require)
/// once the quota is used. Without a limit nothing holds the loop back.
#[derive(Default)]
pub(crate) struct Pacer {
    since_wait: u64,
}

impl Pacer {
    fn quota(speed: u64) -> Option<u64> {
        (speed > 0).then(|| (speed / 10).max(1))
    }

    /// Whether another chunk may be issued with `in_flight` bytes issued and not accounted.
    pub(crate) fn may_issue(&self, speed: u64, in_flight: u64) -> bool {
        Self::quota(speed).is_none_or(|q| self.since_wait + in_flight < q)
    }

    /// Whether the loop should settle and wait in the rate limiter now.
    pub(crate) fn must_wait(&self, speed: u64) -> bool {
        Self::quota(speed).is_some_and(|q| self.since_wait >= q)
    }

    /// Accounts `n` bytes copied.
    pub(crate) fn account(&mut self, cx: &JobCx, n: u64) {
        if n > 0 {
            cx.rate_account(n);
            self.since_wait += n;
        }
    }

    /// Sleeps in the rate limiter (call with nothing in flight).
    pub(crate) async fn wait(&mut self, cx: &JobCx) {
        self.since_wait = 0;
        cx.rate_limit_wait().await;
    }
}

/// What a copy loop checks between chunks: whether a pause (user or drain) was asked for,
/// and the speed limit now.
pub(crate) fn pause_and_speed(cx: &JobCx) -> (bool, u64) {
    let info = cx.job().info();
    (info.paused, info.speed)
}

/// The arguments of `block-commit`.
#[derive(Debug, Clone)]
pub struct CommitArgs {
    /// The active node of the chain (node name).
    pub device: String,
    /// The lowest image merged, by node name (default: the device).
    pub top_node: Option<String>,
    /// The lowest image merged, by file name.
    pub top: Option<String>,
    /// The image merged into, by node name (default: the chain's last image).
    pub base_node: Option<String>,
    /// The image merged into, by file name.
    pub base: Option<String>,
    /// The backing file name written into the overlay's header (default: base's file name).
    pub backing_file: Option<String>,
    /// The options every job takes (id, speed, error policy, filter name, auto-finalize
    /// and -dismiss).
    pub job: JobOptions,
}

impl CommitArgs {
    /// Commits everything below the active layer `device` into the chain's last image.
    pub fn new(device: &str) -> CommitArgs {
        CommitArgs {
            device: device.to_string(),
            top_node: None,
            top: None,
            base_node: None,
            base: None,
            backing_file: None,
            job: JobOptions::default(),
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Starts a commit job (intermediate or active) on `io`.
pub(crate) fn start(
    mgr: &JobManager,
    io: iothreads::IoThreadHandle,
    args: CommitArgs,
) -> Result<Arc<Job>> {
    let spec = args.job.spec(&args.device);
    mgr.create(spec, io, move |ctx, mgr| async move {
        setup(&ctx, &mgr, args).await
    })
}

/// The nodes of a commit, resolved and checked as QEMU's `qmp_block_commit` does.
pub(crate) struct Resolved {
    pub device: Arc<Node>,
    pub top: Arc<Node>,
    pub base: Arc<Node>,
}

fn resolve(mgr: &JobManager, args: &CommitArgs) -> Result<Resolved> {
    let bs = graph::find_node(&args.device).ok_or_else(|| {
        Error::new(
            ErrorKind::DeviceNotFound,
            format!("Device '{}' not found", args.device),
        )
    })?;
    // QEMU's qmp_get_root_bs(): the device is a node no other node sits on (its users are
    // exports, jobs and guests, not parent nodes).
    if bs
        .parents()
        .iter()
        .any(|e| matches!(e.parent(), graph::Parent::Node(_)))
    {
        return Err(invalid("Need a root block node"));
    }
    mgr.check_free(&bs)?;
    let top = match (&args.top_node, &args.top) {
        (Some(_), Some(_)) => return Err(invalid("'top-node' and 'top' are mutually exclusive")),
        (Some(name), None) => {
            let t = lookup_node(name)?;
            if !chain_contains(&bs, &t) {
                return Err(invalid(format!(
                    "'{name}' is not in this backing file chain"
                )));
            }
            Some(t)
        }
        (None, Some(file)) => {
            if image_filename(&bs).as_deref() == Some(file.as_str()) {
                Some(Arc::clone(&bs))
            } else {
                find_backing_image(&bs, file)
            }
        }
        (None, None) => Some(Arc::clone(&bs)),
    };
    let top = top.ok_or_else(|| {
        invalid(format!(
            "Top image file {} not found",
            args.top.as_deref().unwrap_or("NULL")
        ))
    })?;
    let base = match (&args.base_node, &args.base) {
        (Some(_), Some(_)) => return Err(invalid("'base-node' and 'base' are mutually exclusive")),
        (Some(name), None) => {
            let b = lookup_node(name)?;
            if !chain_contains(&top, &b) {
                return Err(invalid(format!(
                    "'{name}' is not in this backing file chain"
                )));
            }
            b
        }
        (None, Some(file)) => find_backing_image(&top, file)
            .ok_or_else(|| invalid(format!("Can't find '{file}' in the backing chain")))?,
        (None, None) => find_base(&top).ok_or_else(|| invalid("There is no backimg image"))?,
    };
    let end = base.filter_or_cow_child();
    for n in chain_until(Some(Arc::clone(&top)), end.as_ref()) {
        mgr.check_free(&n)?;
    }
    if Arc::ptr_eq(&top, &base) {
        return Err(invalid("cannot commit an image into itself"));
    }
    Ok(Resolved {
        device: bs,
        top,
        base,
    })
}

async fn setup(ctx: &ChangeCtx, mgr: &JobManager, args: CommitArgs) -> Result<JobSetup> {
    let r = resolve(mgr, &args)?;
    // Active when top is the device, filters skipped (QEMU's qmp_block_commit): a commit of
    // the image right below the device's filter is an active commit too.
    if Arc::ptr_eq(&r.top.skip_filters(), &r.device.skip_filters()) {
        if args.backing_file.is_some() {
            return Err(invalid(
                "'backing-file' specified, but 'top' is the active layer",
            ));
        }
        return super::mirror::setup_active_commit(ctx, r, &args).await;
    }
    let overlay = find_overlay(&r.device, &r.top)
        .ok_or_else(|| invalid("Could not find overlay image for the top image"))?;
    mgr.check_free(&overlay)?;
    let (top, base) = (r.top, r.base);
    if Arc::ptr_eq(&top.skip_filters(), &base.skip_filters()) {
        return Err(invalid(
            "Invalid files for merge: top and base are the same",
        ));
    }
    let base_overlay = find_overlay(&top, &base).ok_or_else(|| {
        invalid(format!(
            "'{}' is not in the backing chain of '{}'",
            base.name(),
            top.name()
        ))
    })?;
    let base_read_only = base.is_read_only();
    let filter = Node::new(
        args.job.filter_node_name.as_deref(),
        Box::new(CommitTopDriver),
        false,
    )?;
    let job_id = args.job.id_for(&args.device);
    let drained = ctx.drain(&[Arc::clone(&top), Arc::clone(&base)]).await;
    let frozen = std::cell::RefCell::new(Vec::new());
    let res = ctx.transaction(|tx| {
        if base_read_only {
            crate::engine::reopen_image(tx, &base, false)?;
        }
        // Resize only if base must grow (QEMU's commit_start), so filters above base that do
        // not share resizing do not stand in the way.
        let resize = base.len() < top.len();
        let writer = attach_writer_with(tx, &base, &job_id, resize, Perm::NONE)?;
        insert_filter_and_freeze(tx, &filter, &top, &base, &mut frozen.borrow_mut())?;
        Ok(writer)
    });
    drained.end();
    let writer = res?;
    let frozen = frozen.into_inner();

    // Owned: the device (nothing taken), the nodes cut out (shared: writes, since base below
    // them changes; no consistent reads for others, except on the filters between the image
    // above base and base, which show base's data: QEMU's commit_start shares consistent
    // reads from its `filtered_base` on), and base, which the job writes. Not the filter:
    // QEMU does not block its commit_top node, so a job refused through it names the first
    // image below it, or fails to freeze the link into it.
    let mut nodes = vec![(Arc::clone(&r.device), Perm::NONE, Perm::ALL)];
    let filtered_base = base_overlay.filter_or_cow_child();
    let mut shared = Perm::WRITE | Perm::WRITE_UNCHANGED;
    for n in chain_until(Some(Arc::clone(&top)), Some(&base)) {
        if filtered_base.as_ref().is_some_and(|f| Arc::ptr_eq(f, &n)) {
            shared |= Perm::CONSISTENT_READ;
        }
        nodes.push((n, Perm::NONE, shared));
    }
    nodes.push((Arc::clone(&base), Perm::NONE, Perm::ALL));
    let driver = CommitJob {
        writer: Some(writer),
        top,
        base,
        base_overlay,
        filter,
        backing_file: args.backing_file,
        base_read_only,
        frozen,
        filter_dropped: false,
    };
    Ok(JobSetup {
        driver: Box::new(driver),
        nodes,
    })
}

struct CommitJob {
    top: Arc<Node>,
    base: Arc<Node>,
    /// The lowest image copied from (the image right above base).
    base_overlay: Arc<Node>,
    filter: Arc<Node>,
    backing_file: Option<String>,
    base_read_only: bool,
    frozen: Vec<Arc<Edge>>,
    /// Whether the filter left the graph (replaced by base, or dropped on abort).
    filter_dropped: bool,
    /// The job's write access to base (released before base takes the overlay's place).
    writer: Option<WriterEdge>,
}

/// The job's write access to the image it copies into, as its own user edge (QEMU's
/// `s->base` backend), so it can be given up before the final graph change.
struct Writer(String);

impl graph::User for Writer {
    fn describe(&self) -> String {
        format!("block job '{}'", self.0)
    }
}

/// A job's write access: the edge, and the user it belongs to (edges hold users weakly).
pub(crate) struct WriterEdge {
    edge: Arc<Edge>,
    _user: Arc<dyn graph::User>,
}

/// Takes write access to `target` for job `id` in `tx`: consistent reads, writes, resizes;
/// others may read and write-unchanged (`shared`: more, where the job must let a writer in).
pub(crate) fn attach_writer(
    tx: &mut graph::Transaction<'_>,
    target: &Arc<Node>,
    id: &str,
    shared: Perm,
) -> Result<WriterEdge> {
    attach_writer_with(tx, target, id, true, shared)
}

/// [`attach_writer`], taking the resize permission only if `resize`.
pub(crate) fn attach_writer_with(
    tx: &mut graph::Transaction<'_>,
    target: &Arc<Node>,
    id: &str,
    resize: bool,
    shared: Perm,
) -> Result<WriterEdge> {
    let user: Arc<dyn graph::User> = Arc::new(Writer(id.to_string()));
    let mut perm = Perm::CONSISTENT_READ | Perm::WRITE;
    if resize {
        perm |= Perm::RESIZE;
    }
    let edge = tx.attach_user(
        &user,
        target,
        perm,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | shared,
    )?;
    Ok(WriterEdge { edge, _user: user })
}

/// Grows `base` to `len` bytes if it is shorter (as QEMU's commit and mirror do before they
/// copy), through the job's write access (which includes resize). The new range reads as
/// zeroes, so data a shorter base never had cannot show through.
pub(crate) async fn grow_base(base: &Node, len: u64) -> Result<()> {
    if base.len() >= len {
        return Ok(());
    }
    base.truncate(len).await.map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("Could not resize '{}' to {len} bytes: {e}", base.name()),
        )
    })
}

/// Puts the job's `filter` above `top` and freezes every edge from the filter down to
/// `base` (the edge into base included), recording them in `frozen` (commit and mirror alike).
pub(crate) fn insert_filter_and_freeze(
    tx: &mut graph::Transaction<'_>,
    filter: &Arc<Node>,
    top: &Arc<Node>,
    base: &Arc<Node>,
    frozen: &mut Vec<Arc<Edge>>,
) -> Result<()> {
    tx.attach_child(filter, top, Role::Filtered)?;
    tx.insert_filter(filter, top)?;
    let mut edges = Vec::new();
    let mut cur = Arc::clone(filter);
    while !Arc::ptr_eq(&cur, base) {
        let e = filter_or_cow_edge(&cur).expect("base is below top");
        cur = e.child();
        edges.push(e);
    }
    tx.freeze_chain(&edges)?;
    frozen.extend(edges);
    Ok(())
}

/// Gives up write access taken by [`attach_writer`].
pub(crate) fn release_writer(ctx: &ChangeCtx, writer: &mut Option<WriterEdge>) {
    if let Some(w) = writer.take() {
        let _ = ctx.transaction(|tx| tx.detach(&w.edge));
    }
}

/// Thaws `edges` (emptying the list).
pub(crate) fn thaw(ctx: &ChangeCtx, edges: &mut Vec<Arc<Edge>>) {
    let edges = std::mem::take(edges);
    if !edges.is_empty() {
        let _ = ctx.transaction(|tx| {
            for e in &edges {
                tx.set_frozen(e, false);
            }
            Ok(())
        });
    }
}

/// What one chunk of a commit does: the bytes it copied, or which side failed.
type PieceResult = std::result::Result<u64, (IoOp, std::io::Error)>;

/// Copies the extents of `[off, off + want)` allocated from `top` down to `base_overlay` into
/// `base`; returns how many bytes it copied.
async fn copy_piece(
    top: &Arc<Node>,
    base_overlay: &Arc<Node>,
    base: &Arc<Node>,
    off: u64,
    want: u64,
) -> PieceResult {
    let end = off + want;
    let mut o = off;
    let mut copied = 0;
    while o < end {
        let (alloc, mut n) = cor::is_allocated_above(top, Some(base_overlay), o, end - o)
            .await
            .map_err(|e| (IoOp::Read, e))?;
        n = n.clamp(1, end - o);
        // Allocated extents that follow each other (in whichever images) go as one copy.
        while alloc && o + n < end {
            let (more, m) = cor::is_allocated_above(top, Some(base_overlay), o + n, end - o - n)
                .await
                .map_err(|e| (IoOp::Read, e))?;
            if !more {
                break;
            }
            n += m.clamp(1, end - o - n);
        }
        if alloc {
            let (r, buf) = top.read(o, IoBuf::new(n as usize)).await;
            r.map_err(|e| (IoOp::Read, e))?;
            let (r, _) = base.write(o, buf, WriteFlags::default()).await;
            r.map_err(|e| (IoOp::Write, e))?;
            copied += n;
        }
        o += n;
    }
    Ok(copied)
}

/// Copies the extents allocated from `top` down to `base_overlay` into `base`, as QEMU's
/// `commit_run` does, in [`COMMIT_BUFFER`] chunks of which up to [`MAX_IN_FLIGHT`] are in
/// flight at once. Progress counts chunks in order, so the offset a job shows is the end of
/// the chunks done before the first one not done. An error settles the chunks in flight,
/// then pauses, retries or fails the job per `on-error` (a retry redoes the failed chunk
/// first).
pub(crate) async fn copy_down(
    cx: &JobCx,
    top: &Arc<Node>,
    base_overlay: &Arc<Node>,
    base: &Arc<Node>,
    len: u64,
) -> Result<()> {
    let piece = |off: u64, want: u64| -> LocalBoxFuture<'_, PieceResult> {
        Box::pin(copy_piece(top, base_overlay, base, off, want))
    };
    let mut window: InFlight<'_, (u64, u64), PieceResult> = InFlight::new();
    let mut pacer = Pacer::default();
    let mut next = 0;
    loop {
        if cx.is_cancelled() {
            window.settle().await;
            return Ok(());
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
            let in_flight = window.keys().map(|k| k.1).sum();
            if !pacer.may_issue(speed, in_flight) {
                break;
            }
            let want = COMMIT_BUFFER.min(len - next);
            window.push((next, want), piece(next, want));
            next += want;
        }
        let Some(((off, want), r)) = window.next_in_order().await else {
            return Ok(());
        };
        match r {
            Ok(copied) => {
                cx.progress(want);
                pacer.account(cx, copied);
            }
            Err((op, e)) => {
                window.settle().await;
                match cx.on_io_error(op, &e).await {
                    // Commit retries the piece (skipping it would lose data once top is cut
                    // out).
                    ErrorAction::Stop | ErrorAction::Ignore => {
                        if !cx.is_cancelled() {
                            window.push_front((off, want), piece(off, want));
                        }
                    }
                    ErrorAction::Report => return Err(job_io_error(&e)),
                }
            }
        }
    }
}

/// Points every parent of `old` at `base` in one drained transaction, then writes `base`'s
/// name into the header of each image that now has it as backing file. Returns the first
/// header error (the graph stays changed).
pub(crate) async fn replace_with_base(
    ctx: &ChangeCtx,
    old: &Arc<Node>,
    base: &Arc<Node>,
    backing_file: Option<&str>,
    drop_edge_of_old: bool,
) -> Result<()> {
    let drained = ctx.drain(&[Arc::clone(old), Arc::clone(base)]).await;
    let cow_parents: Vec<Arc<Node>> = old
        .parents()
        .iter()
        .filter(|e| e.role() == Role::Backing)
        .filter_map(|e| e.parent().node())
        .collect();
    let r = ctx.transaction(|tx| {
        tx.replace_node(old, base, None)?;
        if drop_edge_of_old {
            for e in old.children() {
                tx.detach(&e)?;
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        drained.end();
        return Err(e);
    }
    let name = backing_file
        .map(str::to_string)
        .or_else(|| image_filename(base));
    let format = image_format(base).to_string();
    let mut first_err = None;
    for p in cow_parents {
        if let Err(e) = write_backing_name(ctx, &p, name.as_deref(), &format).await {
            first_err.get_or_insert(e);
        }
    }
    drained.end();
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Writes a backing file name into `image`'s header (a drained qcow2 node), reopening it
/// read-write for the write if it is read-only.
async fn write_backing_name(
    ctx: &ChangeCtx,
    image: &Arc<Node>,
    name: Option<&str>,
    format: &str,
) -> Result<()> {
    if image.driver_as::<Qcow2Driver>().is_none() {
        return Ok(());
    }
    let was_ro = image.is_read_only();
    if was_ro {
        reopen_drained(ctx, image, false).await?;
    }
    let (n, f, i) = (
        name.map(str::to_string),
        format.to_string(),
        Arc::clone(image),
    );
    let r = on_io(ctx, move || async move {
        let d = i.driver_as::<Qcow2Driver>().expect("qcow2");
        d.change_backing_file(&i, n.as_deref(), Some(&f)).await
    })
    .await;
    if was_ro {
        if let Err(e) = reopen_drained(ctx, image, true).await {
            tracing::warn!(
                "cannot reopen '{}' read-only: {}",
                image.name(),
                e.full_message()
            );
        }
    }
    r
}

impl JobDriver for CommitJob {
    fn kind(&self) -> JobType {
        JobType::Commit
    }

    fn run<'a>(&'a mut self, cx: &'a JobCx) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>> {
        Box::pin(async move {
            let len = self.top.len();
            cx.set_total(len);
            grow_base(&self.base, len).await?;
            copy_down(cx, &self.top, &self.base_overlay, &self.base, len).await
        })
    }

    fn prepare<'a>(
        &'a mut self,
        ctx: &'a ChangeCtx,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>> {
        Box::pin(async move {
            let base = Arc::clone(&self.base);
            on_io(ctx, move || async move {
                base.flush()
                    .await
                    .map_err(|e| Error::io(format!("Failed to flush node '{}'", base.name()), e))
            })
            .await?;
            thaw(ctx, &mut self.frozen);
            release_writer(ctx, &mut self.writer);
            self.filter_dropped = true;
            replace_with_base(
                ctx,
                &self.filter,
                &self.base,
                self.backing_file.as_deref(),
                true,
            )
            .await
        })
    }

    fn abort<'a>(&'a mut self, ctx: &'a ChangeCtx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move {
            thaw(ctx, &mut self.frozen);
            if !self.filter_dropped {
                self.filter_dropped = true;
                let drained = ctx.drain(std::slice::from_ref(&self.filter)).await;
                if let Err(e) = ctx.transaction(|tx| tx.drop_filter(&self.filter)) {
                    tracing::warn!("commit: cannot remove its filter: {}", e.full_message());
                }
                drained.end();
            }
        })
    }

    fn clean<'a>(&'a mut self, ctx: &'a ChangeCtx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move {
            thaw(ctx, &mut self.frozen);
            release_writer(ctx, &mut self.writer);
            if self.base_read_only {
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
}

/// The `commit` filter above top: passes everything to top, takes no permission on it and
/// shares all, so the job may write base below while the overlay reads through.
pub(crate) struct CommitTopDriver;

fn no_child() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotFound, "commit filter has no child")
}

impl Driver for CommitTopDriver {
    fn driver_name(&self) -> &'static str {
        "commit"
    }

    fn length(&self, node: &Node) -> u64 {
        node.filtered().map_or(0, |c| c.len())
    }

    fn is_filter(&self) -> bool {
        true
    }

    /// QEMU's `commit_top_bs->never_freeze`: the job must always be able to drop it.
    fn never_freeze(&self) -> bool {
        true
    }

    fn child_perms(&self, _role: Role, _perm: Perm, _shared: Perm, _ro: bool) -> (Perm, Perm) {
        (Perm::NONE, Perm::ALL)
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
            match node.filtered() {
                Some(c) => c.write(offset, buf, flags).await,
                None => (Err(no_child()), buf),
            }
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
            node.filtered()
                .ok_or_else(no_child)?
                .write_zeroes(offset, len, flags)
                .await
        })
    }

    fn discard<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            node.filtered()
                .ok_or_else(no_child)?
                .discard(offset, len)
                .await
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
    use std::cell::Cell;
    use std::rc::Rc;

    /// A future that completes once `gate` is open, counting its polls; whoever opens the
    /// gate wakes the waker it left.
    struct Gated {
        gate: Rc<Cell<bool>>,
        waker: Rc<Cell<Option<Waker>>>,
        polls: Rc<Cell<u32>>,
    }

    impl Future for Gated {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.set(self.polls.get() + 1);
            if self.gate.get() {
                return Poll::Ready(());
            }
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    }

    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::Release);
        }
    }

    #[test]
    fn in_flight_takes_in_order_and_polls_only_woken_chunks() {
        let task = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let mut set: InFlight<'_, usize, ()> = InFlight::new();
        let chunks: Vec<_> = (0..3)
            .map(|_| {
                (
                    Rc::new(Cell::new(false)),
                    Rc::new(Cell::new(None::<Waker>)),
                    Rc::new(Cell::new(0u32)),
                )
            })
            .collect();
        for (i, (gate, w, polls)) in chunks.iter().enumerate() {
            set.push(
                i,
                Box::pin(Gated {
                    gate: Rc::clone(gate),
                    waker: Rc::clone(w),
                    polls: Rc::clone(polls),
                }),
            );
        }
        let open = |i: usize| {
            chunks[i].0.set(true);
            chunks[i].1.take().expect("a waker").wake();
        };
        {
            let mut next = std::pin::pin!(set.next_in_order());
            assert!(next.as_mut().poll(&mut cx).is_pending());
            // The last chunk ends first: nothing to take yet, and only it is polled again.
            open(2);
            assert!(task.0.swap(false, Ordering::AcqRel), "the task was woken");
            assert!(next.as_mut().poll(&mut cx).is_pending());
            assert_eq!(
                chunks.iter().map(|c| c.2.get()).collect::<Vec<_>>(),
                [1, 1, 2]
            );
            open(0);
            assert!(matches!(
                next.as_mut().poll(&mut cx),
                Poll::Ready(Some((0, ())))
            ));
        }
        assert_eq!(set.len(), 2);
        {
            let mut next = std::pin::pin!(set.next_any());
            // Chunk 2 is done already: taken before chunk 1.
            assert!(matches!(
                next.as_mut().poll(&mut cx),
                Poll::Ready(Some((2, ())))
            ));
        }
        {
            let mut settle = std::pin::pin!(set.settle());
            assert!(settle.as_mut().poll(&mut cx).is_pending());
            open(1);
            assert!(settle.as_mut().poll(&mut cx).is_ready());
        }
        assert_eq!(chunks[1].2.get(), 2, "chunk 1 was polled only when woken");
        {
            let mut next = std::pin::pin!(set.next_in_order());
            assert!(matches!(
                next.as_mut().poll(&mut cx),
                Poll::Ready(Some((1, ())))
            ));
        }
        assert!(set.is_empty());
    }

    #[test]
    fn pacer_keeps_a_slice_quota_in_flight() {
        let p = Pacer::default();
        assert!(p.may_issue(0, u64::MAX / 2), "no limit");
        assert!(!p.must_wait(0));
        // 10 MB/s: 1 MB per 100 ms slice.
        assert!(p.may_issue(10_000_000, 0));
        assert!(p.may_issue(10_000_000, 999_999));
        assert!(!p.may_issue(10_000_000, 1_000_000));
        let p = Pacer {
            since_wait: 1_000_000,
        };
        assert!(p.must_wait(10_000_000));
        assert!(!p.must_wait(20_000_000));
    }
}
