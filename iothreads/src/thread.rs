//! Starting, reaching and stopping IoThreads.
//!
//! An [`IoThread`] owns its OS thread: dropping it (or calling [`IoThread::shutdown`]) stops the
//! loop and joins the thread. [`IoThreadHandle`]s are cheap clones that reach the loop from any
//! thread; they do not keep it alive, and work sent to a stopped loop resolves to
//! [`JoinError::Cancelled`].
//!
//! The ring is created on the new thread itself, because `SINGLE_ISSUER` and `DEFER_TASKRUN`
//! tie a ring to the task that created it.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};
use std::time::Duration;

use io_uring::IoUring;
use parking_lot::Mutex;

use crate::buf::IoBuf;
use crate::join::{self, JoinError, JoinHandle, TaskFuture};
use crate::runtime::{with_local, Local, Shared};

/// How many IoThreads may exist at once in one process; per-node counters are sized by it.
pub const MAX_IOTHREADS: usize = 64;

static INDICES: Mutex<u64> = Mutex::new(0);

/// Live IoThreads by index, so per-thread state (e.g. a registered file) can be cleaned up on
/// the thread that owns it.
static REGISTRY: Mutex<Vec<Option<std::sync::Weak<Shared>>>> = Mutex::new(Vec::new());

fn register(shared: &Arc<Shared>) {
    let mut r = REGISTRY.lock();
    if r.len() < MAX_IOTHREADS {
        r.resize(MAX_IOTHREADS, None);
    }
    r[shared.index] = Some(Arc::downgrade(shared));
}

/// The live IoThread with process-wide index `index`, if any.
pub fn handle_by_index(index: usize) -> Option<IoThreadHandle> {
    let r = REGISTRY.lock();
    let shared = r.get(index)?.as_ref()?.upgrade()?;
    if shared.shutdown.load(Ordering::Acquire) {
        return None;
    }
    Some(IoThreadHandle { shared })
}

fn take_index() -> Option<usize> {
    let mut used = INDICES.lock();
    let free = (!*used).trailing_zeros() as usize;
    if free >= MAX_IOTHREADS {
        return None;
    }
    *used |= 1 << free;
    Some(free)
}

fn release_index(i: usize) {
    *INDICES.lock() &= !(1u64 << i);
}

/// How to build an IoThread's ring.
#[derive(Debug, Clone)]
pub struct IoThreadOptions {
    /// The OS thread's name (default `iothread-N`).
    pub name: Option<String>,
    /// Submission queue entries (the CQ gets twice as many).
    pub sq_entries: u32,
    /// Use a kernel SQ polling thread that sleeps after this idle time.
    pub sqpoll_idle: Option<Duration>,
    /// Size of the registered file table (0: ops use plain descriptors).
    pub registered_files: u32,
    /// Register a pool of `count` buffers of `size` bytes for `READ_FIXED`/`WRITE_FIXED`.
    pub fixed_buffers: Option<(u16, usize)>,
    /// Use `SINGLE_ISSUER | DEFER_TASKRUN` (completions are processed only when the loop
    /// enters the kernel; ignored with SQPOLL). Falls back silently where the kernel lacks it.
    pub defer_taskrun: bool,
    /// Submit each op as soon as it is queued (one `io_uring_enter` each) instead of once per
    /// loop turn: lower latency and more I/O at the device, for a syscall per op.
    pub eager_submit: bool,
    /// Run the IoThread, and the kernel workers its ring starts for requests that cannot be
    /// issued without blocking (io-wq), only on these CPUs (fio's `cpus_allowed`); `None`
    /// leaves both to the scheduler. ([`block_on_current`] runs on the calling thread, and so
    /// binds that thread, for good.)
    pub cpus: Option<Vec<usize>>,
}

impl Default for IoThreadOptions {
    fn default() -> Self {
        IoThreadOptions {
            name: None,
            sq_entries: 256,
            sqpoll_idle: None,
            registered_files: 0,
            fixed_buffers: None,
            defer_taskrun: true,
            eager_submit: true,
            cpus: None,
        }
    }
}

/// A ring (or its thread) could not be set up; the message names the cause.
#[derive(Debug)]
pub struct RingError {
    message: String,
    source: Option<io::Error>,
}

impl RingError {
    fn new(message: impl Into<String>, source: Option<io::Error>) -> Self {
        RingError {
            message: message.into(),
            source,
        }
    }

    /// The OS error behind this one, if any.
    pub fn os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(|e| e.raw_os_error())
    }
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

impl From<RingError> for io::Error {
    fn from(e: RingError) -> Self {
        let kind = match e.os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => io::ErrorKind::PermissionDenied,
            Some(libc::ENOSYS) => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e.message)
    }
}

/// Explains why `io_uring_setup` failed.
fn explain_setup_error(e: io::Error) -> RingError {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let msg = match (e.raw_os_error(), sysctl) {
        (Some(libc::EPERM), Some(2)) => {
            "cannot create an io_uring: io_uring is disabled on this system \
             (sysctl kernel.io_uring_disabled = 2)"
                .to_string()
        }
        (Some(libc::EPERM), Some(1)) => {
            "cannot create an io_uring: io_uring is limited to members of \
             kernel.io_uring_group (sysctl kernel.io_uring_disabled = 1) and this process \
             is not one"
                .to_string()
        }
        (Some(libc::EPERM), _) | (Some(libc::EACCES), _) => {
            "cannot create an io_uring: io_uring_setup was refused (EPERM) although \
             kernel.io_uring_disabled allows it; a seccomp filter or container policy \
             (e.g. Docker's default profile) blocks io_uring"
                .to_string()
        }
        (Some(libc::ENOSYS), _) => {
            "cannot create an io_uring: this kernel has no io_uring support (ENOSYS); \
             strata needs Linux 5.19 or later"
                .to_string()
        }
        (Some(libc::ENOMEM), _) => {
            "cannot create an io_uring: out of locked memory (ENOMEM); raise \
             RLIMIT_MEMLOCK (ulimit -l) or use fewer/smaller rings"
                .to_string()
        }
        _ => format!("cannot create an io_uring: {e}"),
    };
    RingError::new(msg, Some(e))
}

fn build_ring(opts: &IoThreadOptions) -> Result<IoUring, RingError> {
    let entries = opts.sq_entries.clamp(2, 32768).next_power_of_two();
    let mut builder = IoUring::builder();
    builder.setup_cqsize(entries * 2).setup_submit_all();
    if let Some(idle) = opts.sqpoll_idle {
        builder.setup_sqpoll(idle.as_millis().min(u128::from(u32::MAX)) as u32);
    } else if opts.defer_taskrun {
        let mut deferred = builder.clone();
        deferred
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag();
        match deferred.build(entries) {
            Ok(r) => return Ok(r),
            // EINVAL: an older kernel without these flags; try the plain ring below.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(explain_setup_error(e)),
        }
    } else {
        builder.setup_coop_taskrun().setup_taskrun_flag();
    }
    builder.build(entries).map_err(explain_setup_error)
}

/// The CPUs the calling thread may run on now (its affinity mask; every CPU the machine
/// reports if the mask cannot be read).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: each index is below CPU_SETSIZE, the set's size in bits.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Binds the calling thread and its ring's io-wq workers to `cpus` (if given).
fn bind_cpus(ring: IoUring, cpus: Option<&[usize]>) -> Result<IoUring, RingError> {
    let Some(cpus) = cpus else {
        return Ok(ring);
    };
    let list = cpus
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(RingError::new(format!("CPU {c} is out of range"), None));
        }
        // SAFETY: c is below CPU_SETSIZE, the set's size in bits.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(RingError::new(
            format!("cannot bind the IoThread to CPUs {list}: {e}"),
            Some(e),
        ));
    }
    ring.submitter().register_iowq_aff(&set).map_err(|e| {
        RingError::new(
            format!("cannot bind the ring's kernel workers to CPUs {list}: {e}"),
            Some(e),
        )
    })?;
    Ok(ring)
}

/// An IoThread: one OS thread running one ring and one single-threaded executor.
pub struct IoThread {
    handle: IoThreadHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IoThread {
    /// Starts an IoThread with default options.
    pub fn new() -> Result<IoThread, RingError> {
        Self::with_options(IoThreadOptions::default())
    }

    /// Starts an IoThread. Fails with a message naming the cause if the ring cannot be built.
    pub fn with_options(opts: IoThreadOptions) -> Result<IoThread, RingError> {
        let index = take_index().ok_or_else(|| {
            RingError::new(
                format!("too many IoThreads (at most {MAX_IOTHREADS})"),
                None,
            )
        })?;
        let name = opts
            .name
            .clone()
            .unwrap_or_else(|| format!("iothread-{index}"));
        let shared = match Shared::new(index, name.clone()) {
            Ok(s) => s,
            Err(e) => {
                release_index(index);
                return Err(RingError::new(
                    format!("cannot create an eventfd: {e}"),
                    Some(e),
                ));
            }
        };
        let (tx, rx) = mpsc::channel::<Result<(), RingError>>();
        let thread_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            // The index is released when this closure ends, whichever way.
            struct Release(usize);
            impl Drop for Release {
                fn drop(&mut self) {
                    if let Some(slot) = REGISTRY.lock().get_mut(self.0) {
                        *slot = None;
                    }
                    release_index(self.0);
                }
            }
            let _release = Release(index);
            let ring = match build_ring(&opts).and_then(|r| bind_cpus(r, opts.cpus.as_deref())) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let local = match Local::new(
                thread_shared,
                ring,
                opts.fixed_buffers,
                opts.registered_files,
                opts.eager_submit,
            ) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(RingError::new(
                        format!("cannot set up the ring: {e}"),
                        Some(e),
                    )));
                    return;
                }
            };
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            local.shared.os_tid.store(tid, Ordering::Relaxed);
            let _ = tx.send(Ok(()));
            local.run();
            drop(local);
        });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                release_index(index);
                return Err(RingError::new(
                    format!("cannot start a thread: {e}"),
                    Some(e),
                ));
            }
        };
        let started = rx
            .recv()
            .unwrap_or_else(|_| Err(RingError::new("the IoThread died while starting", None)));
        if let Err(e) = started {
            let _ = thread.join();
            return Err(e);
        }
        register(&shared);
        Ok(IoThread {
            handle: IoThreadHandle { shared },
            thread: Some(thread),
        })
    }

    /// A handle to reach this IoThread from anywhere.
    pub fn handle(&self) -> IoThreadHandle {
        self.handle.clone()
    }

    /// Stops the loop: every task is dropped (their JoinHandles resolve to `Cancelled`), every
    /// op in flight is cancelled or completes, and the thread is joined.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let shared = &self.handle.shared;
        shared.shutdown.store(true, Ordering::Release);
        // An injected no-op guarantees the loop wakes and sees the flag.
        shared.inject(Box::new(|| {}));
        if thread.thread().id() == std::thread::current().id() {
            // Dropped on its own thread: the loop ends when this task returns.
            return;
        }
        let _ = thread.join();
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::ops::Deref for IoThread {
    type Target = IoThreadHandle;
    fn deref(&self) -> &IoThreadHandle {
        &self.handle
    }
}

/// Turns the calling thread into an IoThread until `fut` completes, and returns its output.
///
/// The future runs as a task of a loop on this very thread (no thread is started, nothing is
/// injected from elsewhere), with `spawn_local` and the ops available as on any IoThread. Tools
/// that do one job at rest use it, and so do instruction-count measurements: valgrind 3.19
/// treats a waiting `io_uring_enter` as non-blocking and deadlocks a loop woken from another
/// thread, while this one never needs waking from outside.
pub fn block_on_current<F>(opts: IoThreadOptions, fut: F) -> Result<F::Output, RingError>
where
    F: Future + 'static,
{
    let index = take_index().ok_or_else(|| {
        RingError::new(
            format!("too many IoThreads (at most {MAX_IOTHREADS})"),
            None,
        )
    })?;
    struct Release(usize);
    impl Drop for Release {
        fn drop(&mut self) {
            if let Some(slot) = REGISTRY.lock().get_mut(self.0) {
                *slot = None;
            }
            release_index(self.0);
        }
    }
    let _release = Release(index);
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("iothread-{index}"));
    let shared = Shared::new(index, name)
        .map_err(|e| RingError::new(format!("cannot create an eventfd: {e}"), Some(e)))?;
    let ring = bind_cpus(build_ring(&opts)?, opts.cpus.as_deref())?;
    let local = Local::new(
        Arc::clone(&shared),
        ring,
        opts.fixed_buffers,
        opts.registered_files,
        opts.eager_submit,
    )
    .map_err(|e| RingError::new(format!("cannot set up the ring: {e}"), Some(e)))?;
    // SAFETY: gettid has no arguments and cannot fail.
    shared
        .os_tid
        .store(unsafe { libc::gettid() }, Ordering::Relaxed);
    register(&shared);
    let out = std::rc::Rc::new(std::cell::Cell::new(None));
    let (o, s) = (out.clone(), Arc::clone(&shared));
    local.spawn_task(Box::pin(async move {
        o.set(Some(fut.await));
        s.shutdown.store(true, Ordering::Release);
    }));
    local.run();
    drop(local);
    out.take()
        .ok_or_else(|| RingError::new("the loop stopped before the future completed", None))
}

/// Counters an IoThread keeps about its loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// `io_uring_enter` calls.
    pub enters: u64,
    /// Of those, how many waited for a completion.
    pub waits: u64,
    /// SQEs parked because the SQ was full or the CQ could not take more completions.
    pub parked_sqes: u64,
    /// Eventfd writes by other threads to wake the loop.
    pub eventfd_wakes: u64,
}

/// A cheap, cloneable way to reach an IoThread from any thread.
#[derive(Clone)]
pub struct IoThreadHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for IoThreadHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoThreadHandle")
            .field("index", &self.shared.index)
            .field("name", &self.shared.name)
            .finish()
    }
}

impl PartialEq for IoThreadHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}
impl Eq for IoThreadHandle {}

impl IoThreadHandle {
    /// This IoThread's process-wide index (below [`MAX_IOTHREADS`]), for per-thread counters.
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The OS thread id (for per-thread CPU accounting).
    pub fn os_tid(&self) -> i32 {
        self.shared.os_tid.load(Ordering::Relaxed)
    }

    /// Whether the calling thread is this IoThread.
    pub fn is_current(&self) -> bool {
        with_local(|l| Arc::ptr_eq(&l.shared, &self.shared)).unwrap_or(false)
    }

    /// Whether the loop has been asked to stop.
    pub fn is_shut_down(&self) -> bool {
        self.shared.shutdown.load(Ordering::Acquire)
    }

    /// The loop's counters.
    pub fn stats(&self) -> LoopStats {
        let c = &self.shared.counters;
        LoopStats {
            enters: c.enters.load(Ordering::Relaxed),
            waits: c.waits.load(Ordering::Relaxed),
            parked_sqes: c.parked_sqes.load(Ordering::Relaxed),
            eventfd_wakes: c.eventfd_wakes.load(Ordering::Relaxed),
        }
    }

    /// Runs a `Send` future on this IoThread.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn_with(move || fut)
    }

    /// Builds a future on this IoThread with `make` and runs it there. The future need not be
    /// `Send` (ops are not); only `make` and the output cross threads.
    pub fn spawn_with<M, F>(&self, make: M) -> JoinHandle<F::Output>
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future + 'static,
        F::Output: Send + 'static,
    {
        if self.is_current() {
            return spawn_local(make());
        }
        let (tx, rx) = join::channel();
        self.shared.inject(Box::new(move || {
            with_local(|l| l.spawn_task(Box::pin(TaskFuture::new(make(), tx))));
        }));
        rx
    }

    /// Runs `make()`'s future on this IoThread and blocks the caller until it ends.
    ///
    /// Must not be called on this IoThread itself (it would wait for itself): that returns
    /// `Cancelled` at once instead of deadlocking.
    pub fn block_on<M, F>(&self, make: M) -> Result<F::Output, JoinError>
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future + 'static,
        F::Output: Send + 'static,
    {
        if self.is_current() {
            return Err(JoinError::Cancelled);
        }
        self.spawn_with(make).join()
    }
}

/// The IoThread the caller runs on, if any.
pub fn current() -> Option<IoThreadHandle> {
    with_local(|l| IoThreadHandle {
        shared: Arc::clone(&l.shared),
    })
}

/// The index of the IoThread the caller runs on, if any.
#[inline]
pub fn current_index() -> Option<usize> {
    crate::runtime::current_index()
}

/// The index of the IoThread the caller runs on, or `other` elsewhere (`other` must be at
/// least [`MAX_IOTHREADS`]): one thread-local load and a compare, for per-thread counters
/// with a shared slot for other threads.
#[inline]
pub fn current_index_or(other: usize) -> usize {
    debug_assert!(other >= MAX_IOTHREADS);
    crate::runtime::current_index_or(other)
}

/// Runs a future, `Send` or not, as a new task on the current IoThread.
///
/// # Panics
/// If the caller is not on an IoThread.
pub fn spawn_local<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
{
    with_local(|l| l.spawn(fut)).expect("spawn_local called outside an IoThread")
}

/// Tasks on the current IoThread (0 elsewhere).
pub fn task_count() -> usize {
    with_local(|l| l.task_count()).unwrap_or(0)
}

/// Ops whose completion the current IoThread still waits for, including those whose futures
/// were dropped (their buffers live until then); 0 elsewhere.
pub fn ops_in_flight() -> usize {
    with_local(|l| l.op_count()).unwrap_or(0)
}

/// Whether the current IoThread has other work going: ops in the kernel or tasks ready to
/// run. A driver that could do a short job either inline or through the ring uses this to
/// choose: inline when alone (no ring round trip), the ring when there is company (so the
/// kernel's workers run in parallel with the loop).
pub fn is_busy() -> bool {
    with_local(|l| l.op_count() > 0 || l.runnable() > 0).unwrap_or(false)
}

/// A buffer for I/O on the current IoThread: a slot of its registered pool when it has one with
/// a slot free and large enough, else a plain aligned buffer.
pub fn alloc_buf(len: usize) -> IoBuf {
    with_local(|l| l.pool.as_ref().and_then(|p| p.take(len)))
        .flatten()
        .unwrap_or_else(|| IoBuf::new(len))
}

/// Registers `fd` in the current IoThread's file table; ops may then use `Fd::Fixed(slot)`.
///
/// Fails where the thread has no table (`registered_files` = 0), the table is full, or the
/// caller is not on an IoThread.
pub fn register_file(fd: std::os::fd::RawFd) -> io::Result<u32> {
    with_local(|l| {
        let mut files = l.fixed_files.borrow_mut();
        let Some(files) = files.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no registered file table",
            ));
        };
        let Some(slot) = files.free.pop() else {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "registered file table full",
            ));
        };
        match l
            .ring
            .borrow()
            .submitter()
            .register_files_update(slot, &[fd])
        {
            Ok(_) => Ok(slot),
            Err(e) => {
                files.free.push(slot);
                Err(e)
            }
        }
    })
    .unwrap_or_else(|| {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "not on an IoThread",
        ))
    })
}

/// Releases a slot taken by [`register_file`] on the current IoThread.
pub fn unregister_file(slot: u32) -> io::Result<()> {
    with_local(|l| {
        let mut files = l.fixed_files.borrow_mut();
        let Some(files) = files.as_mut() else {
            return Ok(());
        };
        l.ring
            .borrow()
            .submitter()
            .register_files_update(slot, &[-1])?;
        files.free.push(slot);
        Ok(())
    })
    .unwrap_or_else(|| {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "not on an IoThread",
        ))
    })
}

/// Yields once: the task goes to the back of the run queue.
pub fn yield_now() -> YieldNow {
    YieldNow { yielded: false }
}

/// Future of [`yield_now`].
#[derive(Debug)]
pub struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Takes one unit of the running task's budget and yields if it is used up.
///
/// Work that can complete without ever waiting (a null driver, a cache hit) calls this once per
/// request, so a task that never waits still lets the other tasks of its loop run.
pub fn coop_yield() -> CoopYield {
    CoopYield { yielded: false }
}

/// Future of [`coop_yield`].
#[derive(Debug)]
pub struct CoopYield {
    yielded: bool,
}

impl Future for CoopYield {
    type Output = ();
    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded || with_local(|l| l.consume_budget()).unwrap_or(true) {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
