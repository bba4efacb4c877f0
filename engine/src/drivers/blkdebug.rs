//! `blkdebug`: a filter for fault injection, in the spirit of QEMU's blkdebug.
//!
//! It passes every request to its child unchanged, except that rules can fail requests with
//! an errno (on reads, writes, zero-writes, discards or flushes, optionally only those that
//! touch an offset range, once or every time) and add latency. With no rules it is a plain
//! filter, which is also how tests put a node into a request path and take it out again.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use graph::{Driver, LocalBoxFuture, Node, WriteFlags, ZeroFlags};
use iothreads::{BufResult, IoBuf};
use parking_lot::Mutex;

/// Which requests a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Write-zeroes.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes.
    Flush,
}

/// A fault: fail matching requests with `errno`.
#[derive(Debug, Clone)]
pub struct ErrorRule {
    /// Requests of this type.
    pub iotype: IoType,
    /// The error to return (e.g. `libc::EIO`, `libc::ENOSPC`).
    pub errno: i32,
    /// Only requests overlapping `[offset, offset + len)`; `None` matches all.
    pub range: Option<(u64, u64)>,
    /// Fire once, then disarm.
    pub once: bool,
}

/// Options of a blkdebug node.
#[derive(Debug, Clone, Default)]
pub struct BlkdebugOptions {
    /// Error rules, checked in order.
    pub inject_error: Vec<ErrorRule>,
    /// Delay every request by this much.
    pub latency_ns: u64,
}

struct Rule {
    rule: ErrorRule,
    spent: AtomicBool,
}

/// The blkdebug driver.
pub struct BlkdebugDriver {
    rules: Mutex<Vec<Arc<Rule>>>,
    latency_ns: u64,
}

impl BlkdebugDriver {
    /// A driver with `opts`.
    pub fn new(opts: BlkdebugOptions) -> Self {
        let rules = opts
            .inject_error
            .into_iter()
            .map(|rule| {
                Arc::new(Rule {
                    rule,
                    spent: AtomicBool::new(false),
                })
            })
            .collect();
        BlkdebugDriver {
            rules: Mutex::new(rules),
            latency_ns: opts.latency_ns,
        }
    }

    /// Adds a rule while the node is in use.
    pub fn add_rule(&self, rule: ErrorRule) {
        self.rules.lock().push(Arc::new(Rule {
            rule,
            spent: AtomicBool::new(false),
        }));
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.rules.lock().clear();
    }

    fn check(&self, iotype: IoType, offset: u64, len: u64) -> io::Result<()> {
        let rules = self.rules.lock();
        for r in rules.iter() {
            if r.rule.iotype != iotype {
                continue;
            }
            if let Some((start, rlen)) = r.rule.range {
                let overlaps = offset < start.saturating_add(rlen)
                    && start < offset.saturating_add(len.max(1));
                if !overlaps {
                    continue;
                }
            }
            if r.rule.once && r.spent.swap(true, Ordering::AcqRel) {
                continue;
            }
            return Err(io::Error::from_raw_os_error(r.rule.errno));
        }
        Ok(())
    }

    async fn delay(&self) -> io::Result<()> {
        if self.latency_ns > 0 {
            iothreads::op::sleep(Duration::from_nanos(self.latency_ns)).await?;
        }
        Ok(())
    }
}

fn no_child() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "blkdebug node has no child")
}

impl Driver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    fn length(&self, node: &Node) -> u64 {
        node.filtered().map_or(0, |c| c.len())
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            if let Err(e) = self.delay().await {
                return (Err(e), buf);
            }
            if let Err(e) = self.check(IoType::Read, offset, buf.len() as u64) {
                return (Err(e), buf);
            }
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
            if let Err(e) = self.delay().await {
                return (Err(e), buf);
            }
            if let Err(e) = self.check(IoType::Write, offset, buf.len() as u64) {
                return (Err(e), buf);
            }
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
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            self.delay().await?;
            self.check(IoType::WriteZeroes, offset, len)?;
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
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            self.delay().await?;
            self.check(IoType::Discard, offset, len)?;
            node.filtered()
                .ok_or_else(no_child)?
                .discard(offset, len)
                .await
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            self.delay().await?;
            self.check(IoType::Flush, 0, 0)?;
            node.filtered().ok_or_else(no_child)?.flush().await
        })
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
