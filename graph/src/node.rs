//! Nodes: a driver with a name, a length, read-only state, and the in-flight counters through
//! which every request passes.
//!
//! A request entering a node adds one to the node's counter for the current IoThread, fences
//! (SeqCst) and only then proceeds; on the way out it subtracts one and fences again before it
//! looks whether a drain waits. This is the request half of the check-then-act protocol with
//! the drainer (which raises the node's quiesce counter, fences, then reads in-flight).

use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use iothreads::{BufResult, IoBuf};

use crate::counter::PerThreadCounter;
use crate::driver::{Driver, WriteFlags, ZeroFlags};

/// A node of the block graph.
pub struct Node {
    name: String,
    driver: Box<dyn Driver>,
    read_only: AtomicBool,
    in_flight: PerThreadCounter,
    quiesce: AtomicU32,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .field("len", &self.len())
            .field("read_only", &self.is_read_only())
            .finish()
    }
}

fn not_on_iothread() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "block request issued outside an IoThread")
}

/// Counts one request in flight on a node for as long as it lives.
struct InFlight<'a> {
    node: &'a Node,
    thread: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.node.in_flight.dec(self.thread);
        fence(Ordering::SeqCst);
        // A drainer that raised `quiesce` before our decrement sees the new sum when it looks;
        // one that raises it after sees it too. Waking it is the drain's business (graph::drain).
    }
}

impl Node {
    /// A node named `name` served by `driver`.
    pub fn new(name: impl Into<String>, driver: Box<dyn Driver>, read_only: bool) -> Arc<Node> {
        Arc::new(Node {
            name: name.into(),
            driver,
            read_only: AtomicBool::new(read_only),
            in_flight: PerThreadCounter::new(),
            quiesce: AtomicU32::new(0),
        })
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver's name.
    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    /// The driver.
    pub fn driver(&self) -> &dyn Driver {
        &*self.driver
    }

    /// The driver as its concrete type, if it is a `T`.
    pub fn driver_as<T: Driver>(&self) -> Option<&T> {
        let any: &dyn std::any::Any = &*self.driver;
        any.downcast_ref::<T>()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.driver.len()
    }

    /// Whether the node has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the node refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Requests in flight through this node, summed over IoThreads.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.sum()
    }

    /// How many drained sections cover this node now.
    pub fn quiesce_count(&self) -> u32 {
        self.quiesce.load(Ordering::SeqCst)
    }

    #[inline]
    fn enter(&self) -> io::Result<InFlight<'_>> {
        let thread = iothreads::current_index().ok_or_else(not_on_iothread)?;
        self.in_flight.inc(thread);
        fence(Ordering::SeqCst);
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

    /// Reads `buf.len()` bytes at `offset`. Nodes do not check ranges (a format node writes
    /// past its file's end to grow it); the front end checks a guest's requests.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> BufResult<()> {
        let _g = match self.enter() {
            Ok(g) => g,
            Err(e) => return (Err(e), buf),
        };
        self.driver.read(self, offset, buf).await
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
        self.driver.write(self, offset, buf, flags).await
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_writable()?;
        let _g = self.enter()?;
        self.driver.write_zeroes(self, offset, len, flags).await
    }

    /// Discards `len` bytes at `offset`.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let _g = self.enter()?;
        self.driver.discard(self, offset, len).await
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> io::Result<()> {
        let _g = self.enter()?;
        self.driver.flush(self).await
    }
}
