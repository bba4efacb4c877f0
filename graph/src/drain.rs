//! Drained sections: stop every request that could reach a set of nodes, and wait until none
//! is in flight.
//!
//! `drained_begin(targets)` raises the quiesce counter of the targets and of every node above
//! them (everything that can send them requests, as QEMU does since 8.0), tells every user
//! above them (backends, jobs, exports) to stop. The section is quiesced when every
//! one of those nodes has nothing in flight and every user says it is quiet. Waiting sleeps on a
//! waker; a request leaving a quiesced node wakes it. `end` undoes exactly what `begin` did.
//! Sections nest and overlap: the counters count.
//!
//! The protocol for one node or user and its requests is [`crate::quiesce`]'s: each node's
//! [`Gate`](crate::quiesce::Gate) counts requests in and out and wakes the drainers through
//! the [`DrainEvent`] when one leaves a quiesced gate; a drainer raises the gates, then looks,
//! registers its waker and looks again ([`DrainEvent::poll_quiet`]). Each look fences before
//! it reads ([`Gate::is_quiet`](crate::quiesce::Gate::is_quiet)), so [`drained_begin`] itself
//! needs no fence.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::edge::{Parent, User};
use crate::node::Node;
pub use crate::quiesce::{drain_event, DrainEvent};

/// A drained section. Ends (undoing exactly what began) on [`Drained::end`] or drop.
pub struct Drained {
    nodes: Vec<Arc<Node>>,
    users: Vec<Arc<dyn User>>,
    ended: bool,
}

impl std::fmt::Debug for Drained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name()).collect();
        f.debug_struct("Drained")
            .field("nodes", &names)
            .field("users", &self.users.len())
            .finish()
    }
}

/// The targets and everything above them: nodes (deduplicated) and users.
fn ancestors(targets: &[Arc<Node>]) -> (Vec<Arc<Node>>, Vec<Arc<dyn User>>) {
    let mut seen = HashSet::new();
    let mut nodes = Vec::new();
    let mut users: Vec<Arc<dyn User>> = Vec::new();
    let mut stack: Vec<Arc<Node>> = targets.to_vec();
    while let Some(n) = stack.pop() {
        if !seen.insert(Arc::as_ptr(&n)) {
            continue;
        }
        for e in n.parents() {
            match e.parent() {
                Parent::Node(_) => {
                    if let Some(p) = e.parent().node() {
                        stack.push(p);
                    }
                }
                Parent::User(_) => {
                    if let Some(u) = e.parent().user() {
                        if !users.iter().any(|x| Arc::ptr_eq(x, &u)) {
                            users.push(u);
                        }
                    }
                }
            }
        }
        nodes.push(n);
    }
    (nodes, users)
}

/// Begins a drained section over `targets` and everything that can send them requests.
///
/// Call it with the mutation lock held ([`crate::txn::mutation`]) so the set of parents is
/// stable while it is collected.
pub fn drained_begin(targets: &[Arc<Node>]) -> Drained {
    let (nodes, users) = ancestors(targets);
    for n in &nodes {
        n.gate.begin();
    }
    for u in &users {
        u.drained_begin();
    }
    Drained {
        nodes,
        users,
        ended: false,
    }
}

impl Drained {
    /// Whether nothing is in flight in the section and every user is quiet. Each node's look
    /// fences first ([`Gate::is_quiet`](crate::quiesce::Gate::is_quiet)).
    pub fn is_quiesced(&self) -> bool {
        self.nodes.iter().all(|n| n.gate.is_quiet()) && self.users.iter().all(|u| u.is_quiet())
    }

    /// The nodes the section covers.
    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// Resolves when the section is quiesced.
    pub fn wait(&self) -> DrainWait<'_> {
        DrainWait { drained: self }
    }

    /// Blocks the calling thread until the section is quiesced (for callers outside any
    /// executor; never call it on an IoThread that serves the section).
    pub fn wait_blocking(&self) {
        let thread = std::thread::current();
        let waker = Waker::from(Arc::new(ThreadWaker(thread)));
        let mut cx = Context::from_waker(&waker);
        let mut w = self.wait();
        while Pin::new(&mut w).poll(&mut cx).is_pending() {
            std::thread::park();
        }
    }

    /// Ends the section.
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        for u in &self.users {
            u.drained_end();
        }
        for n in &self.nodes {
            if n.gate.end() {
                let late = std::mem::take(&mut *n.late_users.lock());
                for u in late.iter().filter_map(|w| w.upgrade()) {
                    u.drained_end();
                }
            }
        }
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        self.finish();
    }
}

struct ThreadWaker(std::thread::Thread);

impl std::task::Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Future of [`Drained::wait`].
pub struct DrainWait<'a> {
    drained: &'a Drained,
}

impl Future for DrainWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if drain_event().poll_quiet(cx.waker(), || self.drained.is_quiesced()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
