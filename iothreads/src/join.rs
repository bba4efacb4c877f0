//! The result of a task spawned onto an IoThread, awaitable from any thread or executor, or
//! waited for by blocking.
//!
//! The task side holds a [`JoinSender`]; if it is dropped without sending (the task was dropped
//! at shutdown, or a spawn reached a thread that had already stopped) the handle resolves to
//! [`JoinError::Cancelled`]. A task that panics resolves to [`JoinError::Panicked`] and the
//! IoThread keeps running.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::{Condvar, Mutex};

/// Why a task produced no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// The task was dropped before it finished (its IoThread shut down).
    Cancelled,
    /// The task panicked with this message.
    Panicked(String),
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Cancelled => write!(f, "task cancelled: its IoThread shut down"),
            JoinError::Panicked(m) => write!(f, "task panicked: {m}"),
        }
    }
}

impl std::error::Error for JoinError {}

impl From<JoinError> for std::io::Error {
    fn from(e: JoinError) -> Self {
        std::io::Error::other(e)
    }
}

struct Inner<T> {
    result: Option<Result<T, JoinError>>,
    waker: Option<Waker>,
    done: bool,
}

struct State<T> {
    inner: Mutex<Inner<T>>,
    cond: Condvar,
}

/// Awaits (or blocks on) a task's output.
#[must_use = "dropping a JoinHandle detaches the task; await it or call join() for its result"]
pub struct JoinHandle<T> {
    state: Arc<State<T>>,
}

/// The producing end of a [`JoinHandle`]: a task's, or any code's that hands a result to
/// another thread. Dropping it unsent resolves the handle to [`JoinError::Cancelled`].
pub struct JoinSender<T> {
    state: Option<Arc<State<T>>>,
}

/// A connected sender and handle (a one-shot channel usable across threads and executors).
pub fn channel<T>() -> (JoinSender<T>, JoinHandle<T>) {
    let state = Arc::new(State {
        inner: Mutex::new(Inner {
            result: None,
            waker: None,
            done: false,
        }),
        cond: Condvar::new(),
    });
    (
        JoinSender {
            state: Some(Arc::clone(&state)),
        },
        JoinHandle { state },
    )
}

impl<T> JoinSender<T> {
    /// Resolves the handle with `value`.
    pub fn complete(self, value: T) {
        self.send(Ok(value));
    }

    /// Resolves the handle with a result.
    pub fn send(mut self, value: Result<T, JoinError>) {
        if let Some(state) = self.state.take() {
            complete(&state, value);
        }
    }
}

fn complete<T>(state: &State<T>, value: Result<T, JoinError>) {
    let waker = {
        let mut inner = state.inner.lock();
        inner.result = Some(value);
        inner.done = true;
        inner.waker.take()
    };
    state.cond.notify_all();
    if let Some(w) = waker {
        w.wake();
    }
}

impl<T> Drop for JoinSender<T> {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            complete(&state, Err(JoinError::Cancelled));
        }
    }
}

impl<T> JoinHandle<T> {
    /// Blocks the calling thread until the task ends.
    ///
    /// Never call this on the IoThread that runs the task: that thread would wait for itself.
    pub fn join(self) -> Result<T, JoinError> {
        let mut inner = self.state.inner.lock();
        while !inner.done {
            self.state.cond.wait(&mut inner);
        }
        inner.result.take().unwrap_or(Err(JoinError::Cancelled))
    }

    /// Whether the task has ended (its result can be taken without waiting).
    pub fn is_finished(&self) -> bool {
        self.state.inner.lock().done
    }

    /// A handle that is already resolved to `Cancelled`.
    pub(crate) fn cancelled() -> Self {
        let (tx, rx) = channel();
        drop(tx);
        rx
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.state.inner.lock();
        if inner.done {
            return Poll::Ready(inner.result.take().unwrap_or(Err(JoinError::Cancelled)));
        }
        match &inner.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inner.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// A spawned future with its sender: polls the future, catching a panic so that the IoThread
/// survives it, and sends the output when it is ready.
pub(crate) struct TaskFuture<F: Future> {
    fut: F,
    sender: Option<JoinSender<F::Output>>,
}

impl<F: Future> TaskFuture<F> {
    pub(crate) fn new(fut: F, sender: JoinSender<F::Output>) -> Self {
        TaskFuture {
            fut,
            sender: Some(sender),
        }
    }
}

impl<F: Future> Future for TaskFuture<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `fut` is structurally pinned (never moved out of the pinned TaskFuture);
        // `sender` is not pinned and is only taken by value.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: see above; `this.fut` stays in place for as long as `this` is pinned.
        let fut = unsafe { Pin::new_unchecked(&mut this.fut) };
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => {
                if let Some(s) = this.sender.take() {
                    s.send(Ok(v));
                }
                Poll::Ready(())
            }
            Err(payload) => {
                if let Some(s) = this.sender.take() {
                    s.send(Err(JoinError::Panicked(panic_message(&*payload))));
                }
                Poll::Ready(())
            }
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
