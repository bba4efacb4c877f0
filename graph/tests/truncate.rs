//! `Node::truncate`: the default refuses, a driver that grows is reached through the node
//! (counted in flight, on an IoThread), and a read-only node refuses as writes do.

mod common;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{plain_io, uniq};
use graph::{Driver, LocalBoxFuture, Node, WriteFlags};
use iothreads::IoBuf;

/// A leaf whose length can grow; it records the in-flight count its truncate saw.
struct Growable {
    len: AtomicU64,
    seen_in_flight: AtomicU64,
}

/// A leaf without truncate (the trait's default).
struct Fixed;

impl Driver for Growable {
    fn driver_name(&self) -> &'static str {
        "growable"
    }
    fn length(&self, _: &Node) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn truncate<'a>(&'a self, node: &'a Node, len: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            self.seen_in_flight
                .store(node.in_flight(), Ordering::Relaxed);
            let cur = self.len.load(Ordering::Acquire);
            if len < cur {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.len.store(len, Ordering::Release);
            Ok(())
        })
    }
    plain_io!();
}

impl Driver for Fixed {
    fn driver_name(&self) -> &'static str {
        "fixed"
    }
    fn length(&self, _: &Node) -> u64 {
        4096
    }
    plain_io!();
}

fn growable(read_only: bool) -> Arc<Node> {
    let d = Growable {
        len: AtomicU64::new(4096),
        seen_in_flight: AtomicU64::new(0),
    };
    Node::new(Some(&uniq("grow")), Box::new(d), read_only).unwrap()
}

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    iothreads::block_on_current(Default::default(), f).expect("io_uring")
}

#[test]
fn truncate_reaches_the_driver_counted_in_flight_and_len_follows() {
    let node = growable(false);
    let n = Arc::clone(&node);
    run(async move { n.truncate(1 << 20).await }).unwrap();
    assert_eq!(node.len(), 1 << 20);
    let d = node.driver_as::<Growable>().unwrap();
    assert_eq!(d.seen_in_flight.load(Ordering::Relaxed), 1);
    assert_eq!(node.in_flight(), 0);
    let n = Arc::clone(&node);
    let e = run(async move { n.truncate(4096).await }).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    assert_eq!(node.len(), 1 << 20);
}

#[test]
fn the_default_truncate_is_unsupported() {
    let node = Node::new(Some(&uniq("fixed")), Box::new(Fixed), false).unwrap();
    let n = Arc::clone(&node);
    let e = run(async move { n.truncate(8192).await }).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    assert_eq!(e.to_string(), "operation not supported by this driver");
    assert_eq!(node.len(), 4096);
}

#[test]
fn a_read_only_node_refuses_truncate_as_it_refuses_writes() {
    let node = growable(true);
    let n = Arc::clone(&node);
    let (te, we) = run(async move {
        let te = n.truncate(1 << 20).await.unwrap_err();
        let (we, _) = n.write(0, IoBuf::new(512), WriteFlags::default()).await;
        (te, we.unwrap_err())
    });
    assert_eq!(te.kind(), io::ErrorKind::PermissionDenied);
    assert_eq!(te.kind(), we.kind());
    assert_eq!(node.len(), 4096);
    let d = node.driver_as::<Growable>().unwrap();
    assert_eq!(d.seen_in_flight.load(Ordering::Relaxed), 0, "never reached");
}

#[test]
fn truncate_outside_an_iothread_is_refused() {
    let node = growable(false);
    let e = poll_once(node.truncate(1 << 20)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    assert_eq!(node.len(), 4096);
}

/// Polls a future once: the refusal is immediate.
fn poll_once<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("expected an immediate result"),
    }
}
