//! Helpers for the drain tests (drain.rs, drain_jobs.rs): waits that fail only on a hang,
//! drained sections held open by a change on the controller, and a plain (non-IoThread)
//! submitter that issues requests in a known order.
//!
//! Included with `#[path = "common/drain_util.rs"] mod drain_util;`.

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use engine::Engine;
use graph::Node;
use iothreads::{JoinHandle, JoinSender};

/// How long a wait for a condition may take before the test calls it a hang. Generous: the
/// machine is shared and the debug build is slow; a wait fails the test only if it never ends.
pub const HANG: Duration = Duration::from_secs(60);

/// Polls `f` until it returns `Some`, failing the test (naming `what`) after [`HANG`].
pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + HANG;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "hang: waited {HANG:?} for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Joins `h`, failing the test (naming `what`) if it has not ended after [`HANG`].
pub fn join_within<T>(h: JoinHandle<T>, what: &str) -> T {
    wait_until(what, || h.is_finished().then_some(()));
    h.join()
        .unwrap_or_else(|e| panic!("{what}: the task was dropped: {e}"))
}

/// A drained section held open by a change on the controller (see [`drain_in_change`]).
pub struct HeldDrain {
    release: Option<JoinSender<()>>,
    change: Option<JoinHandle<graph::Result<()>>>,
}

impl HeldDrain {
    /// Ends the section and waits until the change that held it has ended.
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(r) = self.release.take() {
            r.complete(());
        }
        if let Some(c) = self.change.take() {
            join_within(c, "the draining change to end").unwrap();
        }
    }
}

impl Drop for HeldDrain {
    fn drop(&mut self) {
        // On a failed assertion, let the controller go on (no second panic while unwinding).
        if let Some(r) = self.release.take() {
            r.complete(());
        }
    }
}

/// Queues a change that drains `nodes` through the controller (`ctx.drain`), runs `at_quiesce`
/// inside the section as soon as it is quiesced (on the controller thread, before anything
/// else can move), and then holds the section until [`HeldDrain::end`]. The handle resolves to
/// `at_quiesce`'s result once the section is quiesced; it stays pending while the drain waits.
pub fn drain_in_change<R: Send + 'static>(
    e: &Engine,
    nodes: Vec<Arc<Node>>,
    at_quiesce: impl FnOnce() -> R + Send + 'static,
) -> (JoinHandle<R>, HeldDrain) {
    let (release, released) = iothreads::join::channel::<()>();
    let (seen_tx, seen) = iothreads::join::channel::<R>();
    let change = e.controller().change(move |ctx| async move {
        let d = ctx.drain(&nodes).await;
        seen_tx.complete(at_quiesce());
        let _ = released.await;
        d.end();
        Ok(())
    });
    (
        seen,
        HeldDrain {
            release: Some(release),
            change: Some(change),
        },
    )
}

struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// A boxed future run by [`run_in_order`].
pub type LocalFut<T> = Pin<Box<dyn Future<Output = T>>>;

/// Runs `futs` on the calling thread (meant for a plain thread, not an IoThread): polls each
/// once, in order, so that requests made by their first polls are submitted in that order,
/// then polls the rest until every one is done. Returns the results in the same order.
pub fn run_in_order<T>(mut futs: Vec<LocalFut<T>>) -> Vec<T> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    loop {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(&mut cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if !pending {
            break;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
    out.into_iter()
        .map(|o| o.expect("every future ended"))
        .collect()
}
