//! Nodes: a driver with a unique node-name, a length, read-only state, children and parents,
//! and the in-flight counters through which every request passes.
//!
//! A request entering a node counts itself in flight on the node's [`Gate`] for the current
//! IoThread ([`Gate::enter`]); on the way out it counts itself out and, if the node is
//! quiesced, wakes the drainers ([`Gate::leave`]). The drainer raises the gate's quiesce
//! counter, fences, then reads the counters: one of the two sees the other, so a drain never
//! misses a request and never sleeps through the last one leaving (see [`crate::quiesce`]).
//!
//! Children are read by the I/O path under the graph lock's read side; parents are a weak list
//! the controller reads. A node is kept alive by `Arc`s: its parents' edges, the users and jobs
//! that hold it, the registry of named nodes the monitor keeps. When the last one goes, `Drop`
//! does no I/O: it hands the driver to the closer (the controller), which closes it
//! asynchronously (flush, clear dirty flags, release locks).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use std::sync::{Arc, OnceLock, Weak};

use iothreads::{BufResult, IoBuf};
use parking_lot::Mutex;

use crate::driver::{BlockStatus, Driver, WriteFlags, ZeroFlags};
use crate::edge::{Edge, Role, User};
use crate::error::{Error, ErrorKind, Result};
use crate::lock::{graph_lock, GraphCell, WriteGuard};
use crate::perm::Perm;
use crate::quiesce::{drain_event, Gate};

/// A node of the block graph.
pub struct Node {
    name: String,
    driver: Option<Box<dyn Driver>>,
    read_only: AtomicBool,
    /// Requests in flight through the node and the drains covering it.
    pub(crate) gate: Gate,
    pub(crate) children: GraphCell<Vec<Arc<Edge>>>,
    pub(crate) parents: Mutex<Vec<Weak<Edge>>>,
    /// Users attached while the node was quiesced: drained once, released when the node's
    /// quiesce count returns to zero.
    pub(crate) late_users: Mutex<Vec<Weak<dyn User>>>,
    /// The (perm, shared) last applied to the driver.
    pub(crate) applied: Mutex<(Perm, Perm)>,
    stats: Box<[CachePadded<ThreadStats>]>,
    /// Where the driver goes when the node drops (see [`set_thread_closer`]).
    home_closer: Option<HomeCloser>,
    /// The parent this node was opened as a part of (QEMU's `inherits_from`): see
    /// [`Node::inherits_from`].
    inherits_from: Mutex<Weak<Node>>,
}

/// Per-node request counters (QEMU's query-blockstats), summed over IoThreads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeStats {
    /// Read requests completed.
    pub rd_ops: u64,
    /// Bytes read.
    pub rd_bytes: u64,
    /// Write requests completed (write, write-zeroes).
    pub wr_ops: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Flush requests completed.
    pub flush_ops: u64,
    /// Discard requests completed.
    pub discard_ops: u64,
    /// Requests that failed.
    pub failed_ops: u64,
    /// Time spent in completed reads, in nanoseconds (by IoThread loop turns: a request that
    /// completes within the turn it started in counts 0).
    pub rd_total_time_ns: u64,
    /// Time spent in completed writes (and write-zeroes), in nanoseconds.
    pub wr_total_time_ns: u64,
    /// Time spent in completed flushes, in nanoseconds.
    pub flush_total_time_ns: u64,
}

/// One IoThread's counters of a node. Only that IoThread writes them, so they are bumped
/// with a load and a store (no locked instruction) and read by anyone with relaxed loads.
#[derive(Default)]
struct ThreadStats {
    counts: [AtomicU64; 10],
}

const RD_OPS: usize = 0;
const RD_BYTES: usize = 1;
const WR_OPS: usize = 2;
const WR_BYTES: usize = 3;
const FLUSH_OPS: usize = 4;
const DISCARD_OPS: usize = 5;
const FAILED_OPS: usize = 6;
const RD_TIME: usize = 7;
const WR_TIME: usize = 8;
const FLUSH_TIME: usize = 9;

impl ThreadStats {
    #[inline]
    fn add(&self, i: usize, n: u64) {
        let c = &self.counts[i];
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver_name())
            .field("len", &self.len())
            .field("read_only", &self.is_read_only())
            .finish()
    }
}

fn not_on_iothread() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "block request issued outside an IoThread",
    )
}

/// Counts one request in flight on a node for as long as it lives.
struct InFlight<'a> {
    node: &'a Node,
    thread: usize,
}

impl Drop for InFlight<'_> {
    #[inline]
    fn drop(&mut self) {
        self.node.gate.leave(self.thread, drain_event());
    }
}

// ---- the registry of node-names ----

struct Registry {
    nodes: HashMap<String, Weak<Node>>,
    next_auto: u64,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| {
        Mutex::new(Registry {
            nodes: HashMap::new(),
            next_auto: 0,
        })
    })
}

/// Checks a user-given node-name as QEMU does: a letter, then letters, digits, '-', '.', '_';
/// fewer than 32 characters.
pub fn check_node_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("Invalid node-name: '{name}'"),
        ));
    }
    if name.len() >= 32 {
        return Err(Error::new(ErrorKind::InvalidArgument, "Node name too long"));
    }
    Ok(())
}

/// The live node named `name`.
pub fn find_node(name: &str) -> Option<Arc<Node>> {
    registry().lock().nodes.get(name).and_then(Weak::upgrade)
}

/// Every live node, in no particular order.
pub fn all_nodes() -> Vec<Arc<Node>> {
    registry()
        .lock()
        .nodes
        .values()
        .filter_map(Weak::upgrade)
        .collect()
}

/// Without a closer: close the driver on any live IoThread (fire and forget), or drop it here
/// if there is none (a driver's Drop does no I/O).
fn close_on_any_iothread(driver: Box<dyn Driver>) {
    let here = iothreads::current();
    let target =
        here.or_else(|| (0..iothreads::MAX_IOTHREADS).find_map(iothreads::handle_by_index));
    match target {
        Some(h) => drop(h.spawn_with(move || async move {
            let _ = driver.close().await;
            drop(driver);
        })),
        None => drop(driver),
    }
}

/// Where a dropped node's driver goes to be closed. The engine's controller installs one; with
/// none installed the driver is dropped where the node was (its Drop must then do no I/O).
pub type Closer = Box<dyn Fn(String, Box<dyn Driver>) + Send + Sync>;

static CLOSER: OnceLock<Closer> = OnceLock::new();

/// Installs the closer (once per process).
pub fn set_closer(closer: Closer) -> bool {
    CLOSER.set(closer).is_ok()
}

/// A closer a node keeps from where it was created (its engine's controller).
pub type HomeCloser = Arc<dyn Fn(String, Box<dyn Driver>) + Send + Sync>;

thread_local! {
    static HOME_CLOSER: std::cell::RefCell<Option<HomeCloser>> =
        const { std::cell::RefCell::new(None) };
}

/// Sets the closer that nodes created on this thread keep (an engine sets it on its
/// controller and IoThreads, so that with several engines in a process each node is closed by
/// its own engine's controller, which orders the close before its next change). Nodes
/// created on a thread without one use the process-wide [`set_closer`] closer.
pub fn set_thread_closer(closer: Option<HomeCloser>) {
    HOME_CLOSER.with(|c| *c.borrow_mut() = closer);
}

impl Node {
    /// A node served by `driver`. `name` None gets QEMU-style automatic name `#blockNNN`.
    /// Fails if the name is malformed or taken.
    pub fn new(name: Option<&str>, driver: Box<dyn Driver>, read_only: bool) -> Result<Arc<Node>> {
        // Under the mutation lock: a permission refresh holds every node for a moment, so a
        // node just dropped elsewhere is really gone (and its name free) once we get the lock.
        let _m = crate::txn::mutation();
        let mut reg = registry().lock();
        let name = match name {
            Some(n) => {
                check_node_name(n)?;
                if reg.nodes.get(n).is_some_and(|w| w.strong_count() > 0) {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("Duplicate nodes with node-name='{n}'"),
                    ));
                }
                n.to_string()
            }
            None => loop {
                let n = format!("#block{:03}", reg.next_auto);
                reg.next_auto += 1;
                if !reg.nodes.contains_key(&n) {
                    break n;
                }
            },
        };
        let node = Arc::new(Node {
            name: name.clone(),
            driver: Some(driver),
            read_only: AtomicBool::new(read_only),
            gate: Gate::new(),
            children: GraphCell::new(Vec::new()),
            parents: Mutex::new(Vec::new()),
            late_users: Mutex::new(Vec::new()),
            applied: Mutex::new((Perm::NONE, Perm::ALL)),
            stats: (0..iothreads::MAX_IOTHREADS)
                .map(|_| CachePadded::default())
                .collect(),
            home_closer: HOME_CLOSER.with(|c| c.borrow().clone()),
            inherits_from: Mutex::new(Weak::new()),
        });
        reg.nodes.insert(name, Arc::downgrade(&node));
        Ok(node)
    }

    /// Closes the node here and now when `self` is its last reference, then its children the
    /// same way, so that a caller that made nodes for a moment (image creation, a tool that
    /// opened an image) returns only once the files are closed and their image locks released.
    /// A node someone else still holds is only let go (its last holder's drop closes it).
    /// Takes the mutation lock for a moment: not for use inside a transaction.
    pub fn close_if_last(
        self: Arc<Self>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>>>> {
        Box::pin(async move {
            // Under the mutation lock: a permission refresh elsewhere holds every node for a
            // moment, and must not be the one to drop our last reference.
            let unwrapped = {
                let _m = crate::txn::mutation();
                Arc::try_unwrap(self)
            };
            let Ok(mut node) = unwrapped else {
                return Ok(());
            };
            let Some(driver) = node.driver.take() else {
                return Ok(());
            };
            let mut r = driver.close().await;
            drop(driver);
            let children: Vec<Arc<Node>> = node.children().iter().map(|e| e.child()).collect();
            drop(node);
            for child in children {
                r = r.and(child.close_if_last().await);
            }
            r
        })
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver.
    #[inline]
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_deref().expect("a live node has its driver")
    }

    /// The driver's name.
    pub fn driver_name(&self) -> &'static str {
        self.driver().driver_name()
    }

    /// The driver as its concrete type, if it is a `T`.
    pub fn driver_as<T: Driver>(&self) -> Option<&T> {
        let any: &dyn std::any::Any = self.driver();
        any.downcast_ref::<T>()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.driver().length(self)
    }

    /// Whether the node has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the node refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    pub(crate) fn set_read_only_flag(&self, ro: bool) {
        self.read_only.store(ro, Ordering::Release);
    }

    /// Whether the driver is a filter (one `filtered` child, same data).
    pub fn is_filter(&self) -> bool {
        self.driver().is_filter()
    }

    /// Whether links to this node may never be frozen (QEMU's `never_freeze`: a job's own
    /// filter, which must always be possible to drop): see [`Driver::never_freeze`].
    pub fn never_freeze(&self) -> bool {
        self.driver().never_freeze()
    }

    /// The parent this node was opened as a part of (QEMU's `inherits_from`), if that parent
    /// still exists: a child given inline in its parent's options (a qcow2 node's `file`
    /// spec), not a node opened on its own and referenced by name. A reopen of the parent
    /// (read-only or read-write) takes such a child with it, and only such a child.
    pub fn inherits_from(&self) -> Option<Arc<Node>> {
        self.inherits_from.lock().upgrade()
    }

    /// Records that this node was opened as a part of `parent` (see [`Node::inherits_from`]).
    pub fn set_inherits_from(&self, parent: &Arc<Node>) {
        *self.inherits_from.lock() = Arc::downgrade(parent);
    }

    /// Requests in flight through this node, summed over IoThreads.
    pub fn in_flight(&self) -> u64 {
        self.gate.in_flight()
    }

    /// Requests in flight through this node on IoThread `thread`.
    pub fn in_flight_on(&self, thread: usize) -> u64 {
        self.gate.in_flight_on(thread)
    }

    /// How many drained sections cover this node now.
    pub fn quiesce_count(&self) -> u32 {
        self.gate.quiesce_count()
    }

    /// Request counters, summed over IoThreads.
    pub fn stats(&self) -> NodeStats {
        let sum = |i: usize| {
            self.stats
                .iter()
                .map(|t| t.counts[i].load(Ordering::Relaxed))
                .fold(0, u64::wrapping_add)
        };
        NodeStats {
            rd_ops: sum(RD_OPS),
            rd_bytes: sum(RD_BYTES),
            wr_ops: sum(WR_OPS),
            wr_bytes: sum(WR_BYTES),
            flush_ops: sum(FLUSH_OPS),
            discard_ops: sum(DISCARD_OPS),
            failed_ops: sum(FAILED_OPS),
            rd_total_time_ns: sum(RD_TIME),
            wr_total_time_ns: sum(WR_TIME),
            flush_total_time_ns: sum(FLUSH_TIME),
        }
    }

    /// The (perm, shared) its parents take and share, as last applied.
    pub fn cumulative_perms(&self) -> (Perm, Perm) {
        *self.applied.lock()
    }

    // ---- graph reads ----

    /// The child edges, cloned out of a read section.
    pub fn children(&self) -> Vec<Arc<Edge>> {
        let g = graph_lock().read();
        self.children.read(&g).clone()
    }

    pub(crate) fn children_locked<'g>(&'g self, w: &'g WriteGuard<'_>) -> &'g Vec<Arc<Edge>> {
        self.children.read_locked(w)
    }

    /// The first child edge with `role`.
    pub fn child_edge(&self, role: Role) -> Option<Arc<Edge>> {
        let g = graph_lock().read();
        self.children
            .read(&g)
            .iter()
            .find(|e| e.role() == role)
            .cloned()
    }

    /// The first child with `role`: the request path's way down (one short read section).
    #[inline]
    pub fn child(&self, role: Role) -> Option<Arc<Node>> {
        let g = graph_lock().read();
        let edges = self.children.read(&g);
        edges
            .iter()
            .find(|e| e.role() == role)
            .map(|e| Arc::clone(e.child_in(&g)))
    }

    /// The `file` child.
    pub fn file(&self) -> Option<Arc<Node>> {
        self.child(Role::File)
    }

    /// The `backing` child.
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.child(Role::Backing)
    }

    /// The child a filter passes requests to.
    pub fn filtered(&self) -> Option<Arc<Node>> {
        self.child(Role::Filtered)
    }

    /// The parent edges that still exist.
    pub fn parents(&self) -> Vec<Arc<Edge>> {
        self.parents
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Skips filters downwards: the first node at or below this one that is not a filter
    /// (QEMU's `bdrv_skip_filters`).
    pub fn skip_filters(self: &Arc<Self>) -> Arc<Node> {
        let mut n = Arc::clone(self);
        while n.is_filter() {
            match n.filtered() {
                Some(c) => n = c,
                None => break,
            }
        }
        n
    }

    /// The "filter or COW child": the filtered child of a filter, else the backing child.
    pub fn filter_or_cow_child(&self) -> Option<Arc<Node>> {
        if self.is_filter() {
            self.filtered()
        } else {
            self.backing()
        }
    }

    /// The next image below this one, skipping filters: `skip_filters(filter_or_cow(skip(self)))`
    /// (QEMU's `bdrv_backing_chain_next`).
    pub fn backing_chain_next(self: &Arc<Self>) -> Option<Arc<Node>> {
        self.skip_filters()
            .filter_or_cow_child()
            .map(|c| c.skip_filters())
    }

    /// Whether `other` is this node or lies below it through any edge.
    pub fn reaches(self: &Arc<Self>, other: &Arc<Node>) -> bool {
        if Arc::ptr_eq(self, other) {
            return true;
        }
        self.children().iter().any(|e| e.child().reaches(other))
    }

    // ---- requests ----

    #[inline]
    fn enter(&self) -> io::Result<InFlight<'_>> {
        let thread = iothreads::current_index().ok_or_else(not_on_iothread)?;
        self.gate.enter(thread);
        Ok(InFlight { node: self, thread })
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.is_read_only() {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("node '{}' is read-only", self.name),
            ))
        } else {
            Ok(())
        }
    }

    #[inline]
    fn count<T>(&self, thread: usize, r: &io::Result<T>, ops: usize, bytes: Option<(usize, u64)>) {
        let st = &self.stats[thread];
        if r.is_ok() {
            st.add(ops, 1);
            if let Some((b, n)) = bytes {
                st.add(b, n);
            }
        } else {
            st.add(FAILED_OPS, 1);
        }
    }

    /// Adds the time since `start` (loop-turn clock) to counter `which`.
    #[inline]
    fn time(&self, thread: usize, which: usize, start: std::time::Instant) {
        let ns = iothreads::turn_time()
            .saturating_duration_since(start)
            .as_nanos() as u64;
        if ns > 0 {
            self.stats[thread].add(which, ns);
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Nodes do not check ranges (a format node writes
    /// past its file's end to grow it); the front end checks a guest's requests.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let _g = match self.enter() {
            Ok(g) => g,
            Err(e) => return (Err(e), buf),
        };
        let n = buf.len() as u64;
        let t0 = iothreads::turn_time();
        let (r, buf) = self.driver().read(self, offset, buf).await;
        self.count(_g.thread, &r, RD_OPS, Some((RD_BYTES, n)));
        self.time(_g.thread, RD_TIME, t0);
        (r, buf)
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult<()> {
        if let Err(e) = self.check_writable() {
            return (Err(e), buf);
        }
        let _g = match self.enter() {
            Ok(g) => g,
            Err(e) => return (Err(e), buf),
        };
        let n = buf.len() as u64;
        let t0 = iothreads::turn_time();
        let (r, buf) = self.driver().write(self, offset, buf, flags).await;
        self.count(_g.thread, &r, WR_OPS, Some((WR_BYTES, n)));
        self.time(_g.thread, WR_TIME, t0);
        (r, buf)
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_writable()?;
        let _g = self.enter()?;
        let t0 = iothreads::turn_time();
        let r = self.driver().write_zeroes(self, offset, len, flags).await;
        self.count(_g.thread, &r, WR_OPS, Some((WR_BYTES, len)));
        self.time(_g.thread, WR_TIME, t0);
        r
    }

    /// Discards `len` bytes at `offset`.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let _g = self.enter()?;
        let r = self.driver().discard(self, offset, len).await;
        self.count(_g.thread, &r, DISCARD_OPS, None);
        r
    }

    /// Grows the node to `len` bytes (see [`Driver::truncate`]): refused on a read-only node
    /// as writes are, counted in flight like any request, and run on an IoThread. Afterwards
    /// [`Node::len`] reports `len`. Shrinking is refused (`EINVAL`); the same length is a
    /// no-op.
    pub async fn truncate(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let _g = self.enter()?;
        self.driver().truncate(self, len).await
    }

    /// Preallocates the node's storage up to `len`, or cuts a preallocated tail back to it
    /// (see [`Driver::preallocate`]); refused on a read-only node as writes are.
    pub async fn preallocate(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let _g = self.enter()?;
        self.driver().preallocate(self, len).await
    }

    /// Lets the driver give back what it reserved for writing before a reopen read-only
    /// (see [`Driver::prepare_read_only`]).
    pub async fn prepare_read_only(&self) -> io::Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        let _g = self.enter()?;
        self.driver().prepare_read_only(self).await
    }

    /// The status of the range at `offset`: what it is and for how many bytes (see
    /// [`Driver::block_status`]). Past the end of the node it is unallocated.
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<(BlockStatus, u64)> {
        let size = self.len();
        if offset >= size {
            return Ok((BlockStatus::Unallocated, len));
        }
        let len = len.min(size - offset);
        let _g = self.enter()?;
        let (st, n) = self.driver().block_status(self, offset, len).await?;
        Ok((st, n.clamp(1, len.max(1))))
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> io::Result<()> {
        let _g = self.enter()?;
        let t0 = iothreads::turn_time();
        let r = self.driver().flush(self).await;
        self.count(_g.thread, &r, FLUSH_OPS, None);
        self.time(_g.thread, FLUSH_TIME, t0);
        r
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        {
            let mut reg = registry().lock();
            let me = self as *const Node;
            if reg
                .nodes
                .get(&self.name)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), me))
            {
                reg.nodes.remove(&self.name);
            }
        }
        if let Some(driver) = self.driver.take() {
            let name = std::mem::take(&mut self.name);
            match (&self.home_closer, CLOSER.get()) {
                (Some(close), _) => close(name, driver),
                (None, Some(close)) => close(name, driver),
                (None, None) => close_on_any_iothread(driver),
            }
        }
    }
}
