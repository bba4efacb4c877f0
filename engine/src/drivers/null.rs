//! `null-co`: a node that does no I/O, for measuring the engine itself (QEMU's null-co).
//!
//! Options as QEMU has them: `size` (default 1 GiB), `read-zeroes` (default off: reads leave
//! the buffer as it was), `latency-ns` (each request waits that long on the IoThread's timer).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use graph::{Driver, Error, LocalBoxFuture, Node, WriteFlags, ZeroFlags};
use iothreads::{BufResult, IoBuf};

/// Options of a null node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NullOptions {
    /// Length in bytes.
    pub size: u64,
    /// Fill read buffers with zeroes.
    pub read_zeroes: bool,
    /// Delay of every request, in nanoseconds (0: complete at once).
    pub latency_ns: u64,
}

impl Default for NullOptions {
    fn default() -> Self {
        NullOptions {
            size: 1 << 30,
            read_zeroes: false,
            latency_ns: 0,
        }
    }
}

/// The null driver.
#[derive(Debug)]
pub struct NullDriver {
    opts: NullOptions,
}

/// Opens a null node named `name` (fails if the name is malformed or taken).
pub fn open(name: &str, opts: NullOptions) -> Result<Arc<Node>, Error> {
    Node::new(Some(name), Box::new(NullDriver { opts }), false)
}

impl NullDriver {
    /// A driver with `opts`.
    pub fn new(opts: NullOptions) -> Self {
        NullDriver { opts }
    }

    async fn delay(&self) -> io::Result<()> {
        if self.opts.latency_ns > 0 {
            iothreads::op::sleep(Duration::from_nanos(self.opts.latency_ns)).await?;
        }
        Ok(())
    }
}

impl Driver for NullDriver {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }

    fn length(&self, _: &Node) -> u64 {
        self.opts.size
    }

    fn read<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        mut buf: IoBuf,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            if self.opts.read_zeroes {
                buf.fill(0);
            }
            (self.delay().await, buf)
        })
    }

    fn write<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        buf: IoBuf,
        _: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move { (self.delay().await, buf) })
    }

    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        _: u64,
        _: ZeroFlags,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(self.delay())
    }

    fn discard<'a>(&'a self, _: &'a Node, _: u64, _: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(self.delay())
    }

    fn flush<'a>(&'a self, _: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(self.delay())
    }
}
