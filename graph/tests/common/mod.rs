//! Helpers shared by the graph's integration tests (graph.rs, truncate.rs): the I/O methods of
//! test drivers that do nothing, and node names unique in the test process.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

use graph::LocalBoxFuture;

/// A future that is ready at once with `v`.
pub fn ready<T: 'static>(v: T) -> LocalBoxFuture<'static, T> {
    Box::pin(async move { v })
}

/// A node name unique in this test process (tests run in parallel and names are global).
pub fn uniq(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{tag}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The I/O methods of a `graph::Driver` that does nothing: reads leave the buffer as it is,
/// writes, zeroes, discards and flushes succeed.
macro_rules! plain_io {
    () => {
        fn read<'a>(
            &'a self,
            _: &'a graph::Node,
            _: u64,
            b: iothreads::IoBuf,
        ) -> graph::LocalBoxFuture<'a, iothreads::BufResult<()>> {
            $crate::common::ready((Ok(()), b))
        }
        fn write<'a>(
            &'a self,
            _: &'a graph::Node,
            _: u64,
            b: iothreads::IoBuf,
            _: graph::WriteFlags,
        ) -> graph::LocalBoxFuture<'a, iothreads::BufResult<()>> {
            $crate::common::ready((Ok(()), b))
        }
        fn write_zeroes<'a>(
            &'a self,
            _: &'a graph::Node,
            _: u64,
            _: u64,
            _: graph::ZeroFlags,
        ) -> graph::LocalBoxFuture<'a, std::io::Result<()>> {
            $crate::common::ready(Ok(()))
        }
        fn discard<'a>(
            &'a self,
            _: &'a graph::Node,
            _: u64,
            _: u64,
        ) -> graph::LocalBoxFuture<'a, std::io::Result<()>> {
            $crate::common::ready(Ok(()))
        }
        fn flush<'a>(
            &'a self,
            _: &'a graph::Node,
        ) -> graph::LocalBoxFuture<'a, std::io::Result<()>> {
            $crate::common::ready(Ok(()))
        }
    };
}
pub(crate) use plain_io;
