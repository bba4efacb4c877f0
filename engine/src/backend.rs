//! Backends: the front end a guest or an embedder holds.
//!
//! A backend is a user of its root node (it holds the `root` edge, so the graph can replace the
//! node under it) and is bound to one or more IoThreads. Requests enter as async calls:
//! - called on one of the backend's IoThreads, a request runs right there (the fast path, used
//!   by the bench and by exports);
//! - called anywhere else, it is sent to one of the backend's IoThreads, chosen by the calling
//!   thread, so requests from one submitting thread keep their order.
//!
//! Requests are checked against the root's length here, as a guest device would (QEMU's
//! `blk_check_byte_request`). A request enters (or joins the held FIFO) in its first poll, with
//! no await before, so requests from one IoThread reach the root in the order they were
//! submitted; after it completes it takes one unit of its task's budget, so that requests which
//! complete at once (null, cache hits) cannot starve the loop.
//!
//! # Drain and held requests
//!
//! While the backend is drained, new requests are held at its entry, before they count as in
//! flight and before they read the graph, in a FIFO per IoThread, and they resume in that
//! order when the drain ends: none is lost, failed or reordered per submitting thread. A request
//! arriving while others are held on its IoThread queues behind them. A backend with holding
//! disabled (a job's) lets requests pass a drain, so the job can reach its pause point.
//!
//! The protocol (the entry check, the FIFO, who wakes whom) is graph's
//! ([`graph::quiesce`]'s "Held requests", model-checked under loom); this module only calls it.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use graph::{
    drain_event, BlockStatus, Edge, Error, ErrorKind, Gate, HeldQueues, Node, Perm, Transaction,
    User, WriteFlags, ZeroFlags,
};
use iothreads::{BufResult, IoBuf, IoThreadHandle};
use parking_lot::Mutex;

/// How a backend uses its root.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// The name errors use ("block device 'NAME'").
    pub name: Option<String>,
    /// Only read (take consistent-read, never write).
    pub read_only: bool,
    /// Let other users write the node too (QEMU's `share-rw`).
    pub share_rw: bool,
    /// Let requests pass a drain instead of holding them (jobs).
    pub no_holding: bool,
}

pub(crate) struct Inner {
    name: Option<String>,
    edge: Mutex<Option<Arc<Edge>>>,
    threads: Vec<IoThreadHandle>,
    holding: bool,
    /// Requests in flight and the drains covering the backend.
    gate: Gate,
    /// Requests held while drained, a FIFO per IoThread.
    held: HeldQueues,
    held_total: AtomicU64,
}

/// A front end over a root node.
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
    /// Cached root edge (the edge itself never changes; its child may).
    edge: Arc<Edge>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.inner.name)
            .field("root", &self.root().name().to_string())
            .field("threads", &self.inner.threads)
            .finish()
    }
}

fn out_of_range(offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "request of {len} bytes at offset {offset} is beyond the end of the {size}-byte device"
        ),
    )
}

impl User for Inner {
    fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("block device '{n}'"),
            None => "an unnamed block device".to_string(),
        }
    }

    fn drained_begin(&self) {
        self.gate.begin();
    }

    fn drained_end(&self) {
        if self.gate.end() {
            // Resume: wake the head of each IoThread's queue; each request, as it proceeds,
            // wakes the next one, so they enter in order.
            self.held.wake_heads();
        }
    }

    fn is_quiet(&self) -> bool {
        self.gate.is_quiet()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(edge) = self.edge.lock().take() {
            let m = graph::mutation();
            let mut tx = Transaction::new(&m);
            // A backend's edge is never frozen by others; if detaching fails the transaction
            // rolls back and the edge simply stays until the node goes.
            if tx.detach(&edge).is_ok() {
                let _ = tx.commit();
            }
        }
    }
}

impl Backend {
    /// A read-write (or, for a read-only root, read-only) backend over `root`, served by
    /// `threads`.
    pub fn new(root: Arc<Node>, threads: &[IoThreadHandle]) -> Result<Backend, Error> {
        let opts = BackendOptions {
            read_only: root.is_read_only(),
            ..Default::default()
        };
        Self::with_options(root, threads, opts)
    }

    /// A backend with options. Attaching takes the backend's permissions on the root (and
    /// with them the image locks below); a conflict is an error and nothing is attached.
    pub fn with_options(
        root: Arc<Node>,
        threads: &[IoThreadHandle],
        opts: BackendOptions,
    ) -> Result<Backend, Error> {
        if threads.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "a backend needs at least one IoThread",
            ));
        }
        // A guest device (QEMU's blkconf_apply_backend_options): reads consistently, writes
        // unless read-only, shares consistent read and unchanged writes, writes only with
        // share-rw, never resize.
        let perm = if opts.read_only {
            Perm::CONSISTENT_READ
        } else {
            Perm::CONSISTENT_READ | Perm::WRITE
        };
        let mut shared = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        if opts.share_rw {
            shared |= Perm::WRITE;
        }
        let inner = Arc::new(Inner {
            name: opts.name.clone(),
            edge: Mutex::new(None),
            threads: threads.to_vec(),
            holding: !opts.no_holding,
            gate: Gate::new(),
            held: HeldQueues::new(),
            held_total: AtomicU64::new(0),
        });
        let user: Arc<dyn User> = inner.clone();
        let edge = {
            let m = graph::mutation();
            let mut tx = Transaction::new(&m);
            let edge = tx.attach_user(&user, &root, perm, shared)?;
            tx.commit()?;
            edge
        };
        *inner.edge.lock() = Some(Arc::clone(&edge));
        Ok(Backend { inner, edge })
    }

    /// The root node now (the graph may replace it).
    #[inline]
    pub fn root(&self) -> Arc<Node> {
        self.edge.child()
    }

    /// The edge from this backend to its root.
    pub fn edge(&self) -> &Arc<Edge> {
        &self.edge
    }

    /// This backend as a graph user.
    pub fn as_user(&self) -> Arc<dyn User> {
        self.inner.clone()
    }

    /// The IoThreads serving this backend.
    pub fn threads(&self) -> &[IoThreadHandle] {
        &self.inner.threads
    }

    /// Length of the device in bytes.
    pub fn len(&self) -> u64 {
        self.root().len()
    }

    /// Whether the device has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests in flight through this backend.
    pub fn in_flight(&self) -> u64 {
        self.inner.gate.in_flight()
    }

    /// Requests held so far by drains (a counter, for reports and tests).
    pub fn held_total(&self) -> u64 {
        self.inner.held_total.load(Ordering::Relaxed)
    }

    /// Whether a drain holds this backend now.
    pub fn is_drained(&self) -> bool {
        self.inner.gate.is_draining()
    }

    fn check(&self, root: &Node, offset: u64, len: u64) -> io::Result<()> {
        let size = root.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(out_of_range(offset, len, size)),
        }
    }

    /// Whether the caller is on one of this backend's IoThreads.
    fn on_own_thread(&self) -> Option<usize> {
        let i = iothreads::current_index()?;
        self.inner
            .threads
            .iter()
            .any(|t| t.index() == i)
            .then_some(i)
    }

    /// The IoThread that serves requests from the calling thread.
    fn route(&self) -> &IoThreadHandle {
        let n = self.inner.threads.len();
        &self.inner.threads[submitter_id() % n]
    }

    /// Enters the backend on IoThread `t`: waits while drained (if holding), then counts the
    /// request in flight until the guard drops.
    async fn enter(&self, t: usize) -> Entered<'_> {
        let inner = &*self.inner;
        let held = &inner.held[t];
        if !inner.holding {
            // A job's own backend passes drains and so never holds anything.
            inner.gate.enter(t);
            return Entered { inner, t };
        }
        // Counted in (none held on this IoThread, no drain), or held.
        if held.try_enter(&inner.gate, t, drain_event()) {
            return Entered { inner, t };
        }
        inner.held_total.fetch_add(1, Ordering::Relaxed);
        held.wait(&inner.gate, t, drain_event()).await;
        Entered { inner, t }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let Some(t) = self.on_own_thread() else {
            let me = self.clone();
            return lost_buffer(
                self.route()
                    .spawn_with(move || async move { me.read(offset, buf).await })
                    .await,
            );
        };
        let entered = self.enter(t).await;
        let root = self.edge.child_on(t);
        let r = match self.check(&root, offset, buf.len() as u64) {
            Err(e) => (Err(e), buf),
            Ok(()) => root.read(offset, buf).await,
        };
        drop(entered);
        iothreads::coop_yield().await;
        r
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        self.write_with(offset, buf, WriteFlags::default()).await
    }

    /// Writes `buf` at `offset` with `flags` (FUA).
    pub async fn write_with(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult<()> {
        let Some(t) = self.on_own_thread() else {
            let me = self.clone();
            return lost_buffer(
                self.route()
                    .spawn_with(move || async move { me.write_with(offset, buf, flags).await })
                    .await,
            );
        };
        let entered = self.enter(t).await;
        let root = self.edge.child_on(t);
        let r = match self.check(&root, offset, buf.len() as u64) {
            Err(e) => (Err(e), buf),
            Ok(()) => root.write(offset, buf, flags).await,
        };
        drop(entered);
        iothreads::coop_yield().await;
        r
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let Some(t) = self.on_own_thread() else {
            let me = self.clone();
            return self
                .route()
                .spawn_with(move || async move { me.write_zeroes(offset, len, flags).await })
                .await?;
        };
        let entered = self.enter(t).await;
        let root = self.edge.child_on(t);
        let r = match self.check(&root, offset, len) {
            Err(e) => Err(e),
            Ok(()) => root.write_zeroes(offset, len, flags).await,
        };
        drop(entered);
        iothreads::coop_yield().await;
        r
    }

    /// Discards `len` bytes at `offset`.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some(t) = self.on_own_thread() else {
            let me = self.clone();
            return self
                .route()
                .spawn_with(move || async move { me.discard(offset, len).await })
                .await?;
        };
        let entered = self.enter(t).await;
        let root = self.edge.child_on(t);
        let r = match self.check(&root, offset, len) {
            Err(e) => Err(e),
            Ok(()) => root.discard(offset, len).await,
        };
        drop(entered);
        iothreads::coop_yield().await;
        r
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        let Some(t) = self.on_own_thread() else {
            let me = self.clone();
            return self
                .route()
                .spawn_with(move || async move { me.flush().await })
                .await?;
        };
        let _in = self.enter(t).await;
        self.root().flush().await
    }

    /// What the guest sees at `offset` through the whole chain (QEMU's
    /// `bdrv_block_status_above` with no base), and for how many bytes (at most `len`, at
    /// least 1): the export side of NBD's `base:allocation`.
    pub async fn allocation(&self, offset: u64, len: u64) -> io::Result<(Allocation, u64)> {
        let Some(t) = self.on_own_thread() else {
            let me = self.clone();
            return self
                .route()
                .spawn_with(move || async move { me.allocation(offset, len).await })
                .await?;
        };
        let entered = self.enter(t).await;
        let root = self.edge.child_on(t);
        let r = match self.check(&root, offset, len) {
            Err(e) => Err(e),
            Ok(()) => allocation_above(root, offset, len).await,
        };
        drop(entered);
        r
    }

    /// Blocking read for callers outside any async runtime (tests, tools).
    pub fn read_blocking(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let me = self.clone();
        lost_buffer(
            self.route()
                .block_on(move || async move { me.read(offset, buf).await }),
        )
    }

    /// Blocking write for callers outside any async runtime (tests, tools).
    pub fn write_blocking(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let me = self.clone();
        lost_buffer(
            self.route()
                .block_on(move || async move { me.write(offset, buf).await }),
        )
    }

    /// Blocking flush.
    pub fn flush_blocking(&self) -> io::Result<()> {
        let me = self.clone();
        self.route()
            .block_on(move || async move { me.flush().await })?
    }
}

/// What a range reads as through a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Some image of the chain stores data there (it may be zeroes).
    pub data: bool,
    /// It reads as zeroes for sure.
    pub zero: bool,
}

/// Walks down from `node` (through filters and backing files) until a layer says what the
/// range is; past the end of a shorter layer the rest reads as zeroes.
async fn allocation_above(node: Arc<Node>, offset: u64, len: u64) -> io::Result<(Allocation, u64)> {
    let mut n = node.skip_filters();
    let mut len = len;
    loop {
        if offset >= n.len() {
            return Ok((
                Allocation {
                    data: false,
                    zero: true,
                },
                len,
            ));
        }
        len = len.min(n.len() - offset);
        let (status, run) = n.block_status(offset, len).await?;
        let run = run.clamp(1, len);
        match status {
            BlockStatus::Data => {
                return Ok((
                    Allocation {
                        data: true,
                        zero: false,
                    },
                    run,
                ))
            }
            BlockStatus::Zero => {
                return Ok((
                    Allocation {
                        data: false,
                        zero: true,
                    },
                    run,
                ))
            }
            BlockStatus::Unallocated => {
                len = run;
                match n.backing() {
                    Some(b) => n = b.skip_filters(),
                    None => {
                        return Ok((
                            Allocation {
                                data: false,
                                zero: true,
                            },
                            run,
                        ))
                    }
                }
            }
        }
    }
}

/// A request counted in flight in a backend.
struct Entered<'a> {
    inner: &'a Inner,
    t: usize,
}

impl Drop for Entered<'_> {
    #[inline]
    fn drop(&mut self) {
        self.inner.gate.leave(self.t, drain_event());
    }
}

/// A small number per submitting thread, stable for its life.
fn submitter_id() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static ID: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ID.with(|id| *id)
}

/// A request sent to another IoThread that never ran (that IoThread stopped) loses its buffer:
/// report the error with an empty one.
fn lost_buffer(r: Result<BufResult<()>, iothreads::JoinError>) -> BufResult<()> {
    match r {
        Ok(v) => v,
        Err(e) => (Err(e.into()), IoBuf::new(0)),
    }
}
