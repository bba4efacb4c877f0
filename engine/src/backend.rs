//! Backends: the front end a guest or an embedder holds.
//!
//! A backend points at a root node and is bound to one or more IoThreads. Requests enter as
//! async calls and walk down the graph on an IoThread:
//! - called on one of the backend's IoThreads, a request runs right there (the fast path, used
//!   by the bench and by exports);
//! - called anywhere else, it is sent to one of the backend's IoThreads, chosen by the calling
//!   thread, so requests from one submitting thread keep their order.
//!
//! Requests are checked against the root's length here, as a guest device would (QEMU's
//! `blk_check_byte_request`), and each request first takes one unit of its task's budget so
//! that requests which complete at once (null, cache hits) cannot starve the loop.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use graph::{Error, ErrorKind, Node, WriteFlags, ZeroFlags};
use iothreads::{BufResult, IoBuf, IoThreadHandle};

struct Inner {
    root: Arc<Node>,
    threads: Vec<IoThreadHandle>,
}

/// A front end over a root node.
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("root", &self.inner.root.name())
            .field("threads", &self.inner.threads)
            .finish()
    }
}

fn out_of_range(offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("request of {len} bytes at offset {offset} is beyond the end of the {size}-byte device"),
    )
}

impl Backend {
    /// A backend over `root`, served by `threads`.
    pub fn new(root: Arc<Node>, threads: &[IoThreadHandle]) -> Result<Backend, Error> {
        if threads.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "a backend needs at least one IoThread"));
        }
        Ok(Backend { inner: Arc::new(Inner { root, threads: threads.to_vec() }) })
    }

    /// The root node.
    pub fn root(&self) -> &Arc<Node> {
        &self.inner.root
    }

    /// The IoThreads serving this backend.
    pub fn threads(&self) -> &[IoThreadHandle] {
        &self.inner.threads
    }

    /// Length of the device in bytes.
    pub fn len(&self) -> u64 {
        self.inner.root.len()
    }

    /// Whether the device has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(out_of_range(offset, len, size)),
        }
    }

    /// Whether the caller is on one of this backend's IoThreads.
    fn on_own_thread(&self) -> bool {
        match iothreads::current_index() {
            Some(i) => self.inner.threads.iter().any(|t| t.index() == i),
            None => false,
        }
    }

    /// The IoThread that serves requests from the calling thread.
    fn route(&self) -> &IoThreadHandle {
        let n = self.inner.threads.len();
        if n == 1 {
            return &self.inner.threads[0];
        }
        &self.inner.threads[submitter_id() % n]
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        if let Err(e) = self.check(offset, buf.len() as u64) {
            return (Err(e), buf);
        }
        if !self.on_own_thread() {
            let me = self.clone();
            return lost_buffer(self.route().spawn_with(move || async move { me.read(offset, buf).await }).await);
        }
        iothreads::coop_yield().await;
        self.inner.root.read(offset, buf).await
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        self.write_with(offset, buf, WriteFlags::default()).await
    }

    /// Writes `buf` at `offset` with `flags` (FUA).
    pub async fn write_with(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult<()> {
        if let Err(e) = self.check(offset, buf.len() as u64) {
            return (Err(e), buf);
        }
        if !self.on_own_thread() {
            let me = self.clone();
            return lost_buffer(
                self.route().spawn_with(move || async move { me.write_with(offset, buf, flags).await }).await,
            );
        }
        iothreads::coop_yield().await;
        self.inner.root.write(offset, buf, flags).await
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check(offset, len)?;
        if !self.on_own_thread() {
            let me = self.clone();
            return self
                .route()
                .spawn_with(move || async move { me.write_zeroes(offset, len, flags).await })
                .await?;
        }
        iothreads::coop_yield().await;
        self.inner.root.write_zeroes(offset, len, flags).await
    }

    /// Discards `len` bytes at `offset`.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        if !self.on_own_thread() {
            let me = self.clone();
            return self.route().spawn_with(move || async move { me.discard(offset, len).await }).await?;
        }
        iothreads::coop_yield().await;
        self.inner.root.discard(offset, len).await
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        if !self.on_own_thread() {
            let me = self.clone();
            return self.route().spawn_with(move || async move { me.flush().await }).await?;
        }
        self.inner.root.flush().await
    }

    /// Blocking read for callers outside any async runtime (tests, tools).
    pub fn read_blocking(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let me = self.clone();
        lost_buffer(self.route().block_on(move || async move { me.read(offset, buf).await }))
    }

    /// Blocking write for callers outside any async runtime (tests, tools).
    pub fn write_blocking(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let me = self.clone();
        lost_buffer(self.route().block_on(move || async move { me.write(offset, buf).await }))
    }

    /// Blocking flush.
    pub fn flush_blocking(&self) -> io::Result<()> {
        let me = self.clone();
        self.route().block_on(move || async move { me.flush().await })?
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
