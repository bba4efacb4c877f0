//! The controller: the one thread that changes the graph.
//!
//! It runs a small async loop and owns no ring (I/O it needs runs on an IoThread). Work
//! arrives in an inbox:
//! - **changes** are queued and run one at a time, each to its end, before the next begins. A
//!   change that needs a drain awaits it; meanwhile the loop still answers queries and queues
//!   new work, but no other change starts, and no change ever runs inside another's wait.
//!   This is what makes QEMU's stream/commit completion race impossible here: whatever a change
//!   looks up (e.g. "the node below X") it looks up after its drain, inside itself, and no other
//!   change can move the graph between that lookup and its transaction.
//! - **queries** (read-only) run at once, between polls of the running change, so they always
//!   see the graph between two synchronous steps, never in the middle of one.
//! - **closes** of dropped nodes' drivers (flush, clear dirty flags, unlock) run on the
//!   controller's IoThread concurrently with the running change (those nodes are already out
//!   of the graph), but the next change starts only when every pending close has ended, so a
//!   change that reopens a file just released (blockdev-del, then blockdev-add of the same
//!   image) never meets its old image locks.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Wake, Waker};

use graph::{drained_begin, mutation, Drained, Driver, Error, Node, Result, Transaction};
use iothreads::{IoThreadHandle, JoinHandle};
use parking_lot::Mutex;

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type ChangeFn = Box<dyn FnOnce(ChangeCtx) -> LocalFuture + Send>;

enum Work {
    Query(Box<dyn FnOnce() + Send>),
    Change(ChangeFn),
    Close(String, Box<dyn Driver>),
}

struct Shared {
    inbox: Mutex<VecDeque<Work>>,
    thread: OnceLock<std::thread::Thread>,
    stop: AtomicBool,
}

impl Shared {
    fn push(&self, w: Work) {
        self.inbox.lock().push_back(w);
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// The closer nodes created by this controller's engine keep: their closes queue here while
/// it runs (and are dropped without I/O once it stopped, as with no controller at all).
fn home_closer(shared: &Arc<Shared>) -> graph::HomeCloser {
    let weak = Arc::downgrade(shared);
    Arc::new(move |name, driver| match weak.upgrade() {
        Some(s) if !s.stop.load(Ordering::Acquire) => s.push(Work::Close(name, driver)),
        _ => drop(driver),
    })
}

struct CtlWaker(Arc<Shared>);

impl Wake for CtlWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(t) = self.0.thread.get() {
            t.unpark();
        }
    }
}

/// What a change can do: drain, run transactions, and do I/O on the controller's IoThread.
#[derive(Clone)]
pub struct ChangeCtx {
    io: IoThreadHandle,
}

impl ChangeCtx {
    /// Begins a drained section over `nodes` and everything above them, and waits until it is
    /// quiesced. The section ends when the returned value is dropped or ended.
    pub async fn drain(&self, nodes: &[Arc<Node>]) -> Drained {
        let d = {
            let _m = mutation();
            drained_begin(nodes)
        };
        d.wait().await;
        d
    }

    /// Runs `f` as one transaction: committed if it returns Ok, rolled back otherwise.
    pub fn transaction<R>(&self, f: impl FnOnce(&mut Transaction<'_>) -> Result<R>) -> Result<R> {
        let m = mutation();
        let mut tx = Transaction::new(&m);
        let r = f(&mut tx)?;
        tx.commit()?;
        Ok(r)
    }

    /// The IoThread for I/O that changes need (header updates, flushes).
    pub fn io_thread(&self) -> &IoThreadHandle {
        &self.io
    }
}

/// A cheap handle to queue changes and queries on a controller from anywhere.
#[derive(Clone)]
pub struct ControllerHandle {
    shared: Arc<Shared>,
}

impl ControllerHandle {
    /// Queues a graph change (see [`Controller::change`]).
    pub fn change<R, F, Fut>(&self, f: F) -> JoinHandle<Result<R>>
    where
        R: Send + 'static,
        F: FnOnce(ChangeCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R>> + 'static,
    {
        let (tx, rx) = iothreads::join::channel();
        self.shared.push(Work::Change(Box::new(move |ctx| {
            Box::pin(async move {
                let r = f(ctx).await;
                tx.complete(r);
            })
        })));
        rx
    }
}

/// The controller thread and its inbox.
pub struct Controller {
    shared: Arc<Shared>,
    io: IoThreadHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The controller that receives dropped nodes' drivers to close.
static CLOSE_TARGET: Mutex<Option<Weak<Shared>>> = Mutex::new(None);

fn install_closer() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        graph::set_closer(Box::new(|name, driver| {
            let target = CLOSE_TARGET.lock().as_ref().and_then(Weak::upgrade);
            match target {
                Some(s) if !s.stop.load(Ordering::Acquire) => s.push(Work::Close(name, driver)),
                // No controller to close it asynchronously: drivers' Drop does no I/O, so the
                // node simply goes (a format's dirty flag stays set, which its next open fixes).
                _ => drop(driver),
            }
        }));
    });
}

impl Controller {
    /// Starts the controller thread; `io` is the IoThread it uses for its own I/O.
    pub fn start(io: IoThreadHandle) -> Result<Controller> {
        install_closer();
        let shared = Arc::new(Shared {
            inbox: Mutex::new(VecDeque::new()),
            thread: OnceLock::new(),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let io2 = io.clone();
        let thread = std::thread::Builder::new()
            .name("controller".into())
            .spawn(move || run(s, io2))
            .map_err(|e| Error::io("cannot start the controller thread", e))?;
        let _ = shared.thread.set(thread.thread().clone());
        if let Some(t) = shared.thread.get() {
            t.unpark();
        }
        *CLOSE_TARGET.lock() = Some(Arc::downgrade(&shared));
        Ok(Controller {
            shared,
            io,
            thread: Some(thread),
        })
    }

    /// The closer for nodes of this controller's engine (see [`graph::set_thread_closer`]).
    pub fn closer(&self) -> graph::HomeCloser {
        home_closer(&self.shared)
    }

    /// The controller's IoThread.
    pub fn io_thread(&self) -> &IoThreadHandle {
        &self.io
    }

    /// A handle for queueing changes from elsewhere (jobs queue their completions with it).
    pub fn handle(&self) -> ControllerHandle {
        ControllerHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Whether the caller runs on the controller thread.
    pub fn is_current(&self) -> bool {
        self.thread
            .as_ref()
            .is_some_and(|t| t.thread().id() == std::thread::current().id())
    }

    /// Runs a read-only query on the controller thread, between the steps of any change in
    /// progress, and returns its result (blocking the caller).
    pub fn query<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        if self.is_current() {
            return f();
        }
        let (tx, rx) = iothreads::join::channel();
        self.shared
            .push(Work::Query(Box::new(move || tx.complete(f()))));
        rx.join().expect("the controller answers every query")
    }

    /// Queues a graph change. It runs after every change queued before it has ended, and no
    /// other change runs until it ends. The handle resolves to its result (or `Cancelled` if
    /// the controller stopped before running it).
    pub fn change<R, F, Fut>(&self, f: F) -> JoinHandle<Result<R>>
    where
        R: Send + 'static,
        F: FnOnce(ChangeCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R>> + 'static,
    {
        let (tx, rx) = iothreads::join::channel();
        self.shared.push(Work::Change(Box::new(move |ctx| {
            Box::pin(async move {
                let r = f(ctx).await;
                tx.complete(r);
            })
        })));
        rx
    }

    /// Queues a change and blocks until it ends.
    pub fn change_blocking<R, F, Fut>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(ChangeCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R>> + 'static,
    {
        assert!(
            !self.is_current(),
            "a change cannot wait for another change"
        );
        self.change(f).join().map_err(|e| {
            Error::new(
                graph::ErrorKind::Busy,
                format!("the controller stopped: {e}"),
            )
        })?
    }

    /// Stops after the queued work has run, and joins the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.shared.thread.get() {
            t.unpark();
        }
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Closes a dropped node's driver on the controller's IoThread.
async fn close(io: IoThreadHandle, _name: String, driver: Box<dyn Driver>) {
    let h = io.spawn_with(move || async move {
        let _ = driver.close().await;
        drop(driver);
    });
    // If the IoThread is gone the closure was dropped with the driver in it: nothing to wait.
    let _ = h.await;
}

fn run(shared: Arc<Shared>, io: IoThreadHandle) {
    // Wait until the starter has published our Thread handle.
    while shared.thread.get().is_none() {
        std::thread::park();
    }
    graph::set_thread_closer(Some(home_closer(&shared)));
    let waker = Waker::from(Arc::new(CtlWaker(Arc::clone(&shared))));
    let mut cx = Context::from_waker(&waker);
    let mut changes: VecDeque<ChangeFn> = VecDeque::new();
    let mut current: Option<LocalFuture> = None;
    let mut closing: Vec<LocalFuture> = Vec::new();
    let ctx = ChangeCtx { io: io.clone() };
    loop {
        let work: Vec<Work> = shared.inbox.lock().drain(..).collect();
        let got_work = !work.is_empty();
        for w in work {
            match w {
                Work::Query(f) => f(),
                Work::Change(c) => changes.push_back(c),
                Work::Close(name, d) => closing.push(Box::pin(close(io.clone(), name, d))),
            }
        }
        // A change starts only when no close is pending: a node whose last user went (a
        // blockdev-del, a dropped backend) has released its files and image locks before the
        // next change can open them again.
        if current.is_none() && closing.is_empty() {
            if let Some(c) = changes.pop_front() {
                current = Some(c(ctx.clone()));
            }
        }
        let mut ended = false;
        if let Some(f) = current.as_mut() {
            if f.as_mut().poll(&mut cx).is_ready() {
                current = None;
                ended = true;
            }
        }
        let pending = closing.len();
        closing.retain_mut(|f| f.as_mut().poll(&mut cx).is_pending());
        if ended || got_work || closing.len() != pending {
            continue;
        }
        if shared.stop.load(Ordering::Acquire)
            && current.is_none()
            && changes.is_empty()
            && closing.is_empty()
            && shared.inbox.lock().is_empty()
        {
            break;
        }
        std::thread::park();
    }
}
