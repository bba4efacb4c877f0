//! Block jobs: one state machine for every job, with QEMU's states, verbs, transitions and
//! events (job.c and blockjob.c are the reference for semantics and texts).
//!
//! A job's copy loop ([`JobDriver::run`]) runs as a task on an IoThread and does its I/O
//! through backends that let requests pass drains. It stops at pause points when a user or a
//! drain pauses it; a job parked there, or asleep in its rate limiter, is quiet, so drains that
//! cover its nodes complete. When the loop ends, the job's completion (prepare, then commit or
//! abort, then clean) runs as one change on the controller, like every other graph change.
//!
//! States: created -> running (<-> paused; -> ready <-> standby for jobs that converge) ->
//! waiting -> pending (-> finalize, automatic unless `auto_finalize` is off) -> concluded ->
//! null (dismiss, automatic unless `auto_dismiss` is off); failures and cancels go through
//! aborting. Every change of state is a `JOB_STATUS_CHANGE` event. A drain pauses a job
//! quietly (no events): only user pauses show as `paused`.

pub mod chain;
pub mod commit;
pub mod create;
pub mod mirror;
pub mod stream;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use graph::{Edge, Error, ErrorKind, Node, Perm, Result, Transaction, User};
use parking_lot::{Condvar, Mutex};

use crate::controller::{ChangeCtx, ControllerHandle};

/// A job's state (QEMU's JobStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Not yet created.
    Undefined,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused by the user.
    Paused,
    /// Converged (mirror, active commit): waiting for `complete`.
    Ready,
    /// Paused while ready.
    Standby,
    /// Done, waiting for the other jobs of its transaction.
    Waiting,
    /// Done, waiting to be finalized.
    Pending,
    /// Failing or cancelled, rolling back.
    Aborting,
    /// Finished, waiting to be dismissed.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// QEMU's JobSTT: which transitions are allowed (row: from, column: to), in the order
/// undefined, created, running, paused, ready, standby, waiting, pending, aborting,
/// concluded, null.
const STT: [[bool; 11]; 11] = {
    const O: bool = false;
    const I: bool = true;
    [
        [O, I, O, O, O, O, O, O, O, O, O],
        [O, O, I, O, O, O, O, O, I, O, I],
        [O, O, O, I, I, O, I, O, I, O, O],
        [O, O, I, O, O, O, O, O, O, O, O],
        [O, O, O, O, O, I, I, O, I, O, O],
        [O, O, O, O, I, O, O, O, O, O, O],
        [O, O, O, O, O, O, O, I, I, O, O],
        [O, O, O, O, O, O, O, O, I, I, O],
        [O, O, O, O, O, O, O, O, I, I, O],
        [O, O, O, O, O, O, O, O, O, O, I],
        [O, O, O, O, O, O, O, O, O, O, O],
    ]
};

/// What a user may ask of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    /// Cancel.
    Cancel,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Change the speed limit.
    SetSpeed,
    /// Complete a ready job.
    Complete,
    /// Finalize a pending job.
    Finalize,
    /// Dismiss a concluded job.
    Dismiss,
}

impl JobVerb {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// QEMU's JobVerbTable row.
    fn allowed(self, s: JobStatus) -> bool {
        const O: bool = false;
        const I: bool = true;
        let row: [bool; 11] = match self {
            JobVerb::Cancel => [O, I, I, I, I, I, I, I, O, O, O],
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => {
                [O, I, I, I, I, I, O, O, O, O, O]
            }
            JobVerb::Complete => [O, O, O, O, I, I, O, O, O, O, O],
            JobVerb::Finalize => [O, O, O, O, O, O, O, I, O, O, O],
            JobVerb::Dismiss => [O, O, O, O, O, O, O, O, O, I, O],
        };
        row[s.index()]
    }
}

/// Kinds of jobs (QEMU's JobType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    /// block-stream.
    Stream,
    /// block-commit (intermediate and active).
    Commit,
    /// blockdev-create.
    Create,
}

impl JobType {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Stream => "stream",
            JobType::Commit => "commit",
            JobType::Create => "create",
        }
    }
}

/// What to do when the job's I/O fails (QEMU's BlockdevOnError).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Skip the failed piece and go on.
    Ignore,
    /// Pause the job (the user resumes it to retry).
    Stop,
    /// Stop on ENOSPC, report anything else.
    Enospc,
}

impl OnError {
    /// Parses QEMU's names (`report`, `ignore`, `stop`, `enospc`; `auto` is `report`).
    pub fn parse(s: &str) -> Option<OnError> {
        Some(match s {
            "report" | "auto" => OnError::Report,
            "ignore" => OnError::Ignore,
            "stop" => OnError::Stop,
            "enospc" => OnError::Enospc,
            _ => return None,
        })
    }
}

/// The I/O status a job shows (QEMU's BlockDeviceIoStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoStatus {
    /// No error.
    #[default]
    Ok,
    /// Stopped on an error.
    Failed,
    /// Stopped on ENOSPC.
    Nospc,
}

impl IoStatus {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospc => "nospace",
        }
    }
}

/// Which side of a copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Reading the source.
    Read,
    /// Writing the target.
    Write,
}

/// What was done about an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// The job fails.
    Report,
    /// The piece is skipped.
    Ignore,
    /// The job stops (pauses) until resumed.
    Stop,
}

impl ErrorAction {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// A job event, with the time it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    /// When (wall clock).
    pub at: SystemTime,
    /// What.
    pub kind: JobEventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEventKind {
    /// JOB_STATUS_CHANGE.
    StatusChange {
        /// Job id.
        id: String,
        /// New status.
        status: JobStatus,
    },
    /// BLOCK_JOB_READY.
    Ready {
        /// Job id (QEMU's `device`).
        id: String,
        /// Type.
        kind: JobType,
        /// Total progress.
        len: u64,
        /// Current progress.
        offset: u64,
        /// Speed limit.
        speed: u64,
    },
    /// BLOCK_JOB_PENDING.
    Pending {
        /// Job id.
        id: String,
        /// Type.
        kind: JobType,
    },
    /// BLOCK_JOB_COMPLETED.
    Completed {
        /// Job id.
        id: String,
        /// Type.
        kind: JobType,
        /// Total progress.
        len: u64,
        /// Current progress.
        offset: u64,
        /// Speed limit.
        speed: u64,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// BLOCK_JOB_CANCELLED.
    Cancelled {
        /// Job id.
        id: String,
        /// Type.
        kind: JobType,
        /// Total progress.
        len: u64,
        /// Current progress.
        offset: u64,
        /// Speed limit.
        speed: u64,
    },
    /// BLOCK_JOB_ERROR.
    Error {
        /// Job id.
        id: String,
        /// Which side failed.
        operation: IoOp,
        /// What was done.
        action: ErrorAction,
    },
}

/// Distributes events to subscribers.
#[derive(Default)]
pub struct EventBus {
    subs: Mutex<Vec<crossbeam_channel::Sender<JobEvent>>>,
}

impl EventBus {
    /// A new subscription.
    pub fn subscribe(&self) -> crossbeam_channel::Receiver<JobEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.subs.lock().push(tx);
        rx
    }

    fn send(&self, kind: JobEventKind) {
        let ev = JobEvent {
            at: SystemTime::now(),
            kind,
        };
        self.subs.lock().retain(|s| s.send(ev.clone()).is_ok());
    }
}

/// A job's public state, as query-jobs / query-block-jobs show it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    /// Id.
    pub id: String,
    /// Type.
    pub kind: JobType,
    /// State.
    pub status: JobStatus,
    /// Bytes done.
    pub current_progress: u64,
    /// Bytes to do (an estimate until the job ends).
    pub total_progress: u64,
    /// Speed limit in bytes per second (0: none).
    pub speed: u64,
    /// Doing I/O now (not parked, not sleeping).
    pub busy: bool,
    /// Paused (by the user or a drain).
    pub paused: bool,
    /// Ready to complete.
    pub ready: bool,
    /// I/O status.
    pub io_status: IoStatus,
    /// Why it failed, once it has.
    pub error: Option<String>,
    /// Finalizes itself.
    pub auto_finalize: bool,
    /// Dismisses itself.
    pub auto_dismiss: bool,
    /// The node the job was started on (QEMU's block job `device` for the BlockJobInfo).
    pub device: String,
}

/// What the driver-specific part of a job does.
pub trait JobDriver: Send + 'static {
    /// The type.
    fn kind(&self) -> JobType;

    /// The copy loop, on an IoThread. Returns when done, failed or cancelled.
    fn run<'a>(&'a mut self, cx: &'a JobCx) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

    /// Makes the job's result part of the graph (on the controller). Failure aborts.
    fn prepare<'a>(
        &'a mut self,
        ctx: &'a ChangeCtx,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>> {
        let _ = ctx;
        Box::pin(async { Ok(()) })
    }

    /// After a successful prepare.
    fn commit<'a>(&'a mut self, _ctx: &'a ChangeCtx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async {})
    }

    /// After a failure or cancel.
    fn abort<'a>(&'a mut self, _ctx: &'a ChangeCtx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async {})
    }

    /// Always last: release what the job held (filters, frozen edges, reopened nodes).
    fn clean<'a>(&'a mut self, _ctx: &'a ChangeCtx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async {})
    }

    /// Whether a ready job can be completed (and how); called on `complete`.
    fn can_complete(&self) -> bool {
        false
    }

    /// Whether a cancel of a ready job is soft: the job ends successfully without its final
    /// switch (mirror semantics). Other jobs treat every cancel as forced.
    fn soft_cancel_when_ready(&self) -> bool {
        false
    }
}

struct State {
    status: JobStatus,
    pause_count: u32,
    user_paused: bool,
    parked: bool,
    busy: bool,
    cancelled: bool,
    force_cancel: bool,
    should_complete: bool,
    error: Option<String>,
    current: u64,
    total: u64,
    speed: u64,
    io_status: IoStatus,
    waker: Option<Waker>,
    /// Rate limiting: the current slice, the bytes sent in it, and the end of the delay
    /// they call for.
    slice_start: Instant,
    slice_end: Instant,
    dispatched: u64,
    delay_until: Option<Instant>,
    /// The speed changed since the job last slept for the rate limit: the sleep ends and the
    /// limit starts a new slice at the new speed (QEMU re-enters a job on set-speed).
    speed_changed: bool,
}

/// A job.
pub struct Job {
    id: String,
    kind: JobType,
    device: String,
    auto_finalize: bool,
    auto_dismiss: bool,
    on_error: OnError,
    state: Mutex<State>,
    events: Arc<EventBus>,
    edges: Mutex<Vec<Arc<Edge>>>,
    driver: Mutex<Option<Box<dyn JobDriver>>>,
    /// What the driver can do (asked while its loop runs, when the driver is busy).
    can_complete: bool,
    soft_cancel: bool,
    /// The job as a graph user (its edges hold it weakly).
    user: Mutex<Option<Arc<dyn User>>>,
    manager: Weak<ManagerInner>,
    /// Set once the finalization has been queued (a job finalizes once).
    finalizing: AtomicBool,
    /// Signalled on every change of state (for [`Job::wait`]).
    changed: Condvar,
    /// A pause between the end of the copy loop and the queueing of the completion (a test
    /// aid: it lets completions of concurrent jobs run in every order).
    completion_delay_us: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish()
    }
}

fn verb_error(id: &str, status: JobStatus, verb: JobVerb) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!(
            "Job '{id}' in state '{}' cannot accept command verb '{}'",
            status.as_str(),
            verb.as_str()
        ),
    )
}

impl Job {
    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The type.
    pub fn kind(&self) -> JobType {
        self.kind
    }

    /// The state now.
    pub fn status(&self) -> JobStatus {
        self.state.lock().status
    }

    /// The public state.
    pub fn info(&self) -> JobInfo {
        let st = self.state.lock();
        JobInfo {
            id: self.id.clone(),
            kind: self.kind,
            status: st.status,
            current_progress: st.current,
            total_progress: st.total,
            speed: st.speed,
            busy: st.busy,
            paused: st.pause_count > 0,
            ready: matches!(st.status, JobStatus::Ready | JobStatus::Standby),
            io_status: st.io_status,
            error: st.error.clone(),
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            device: self.device.clone(),
        }
    }

    fn transition(&self, st: &mut State, to: JobStatus) {
        let from = st.status;
        assert!(
            STT[from.index()][to.index()],
            "job {}: {} -> {}",
            self.id,
            from.as_str(),
            to.as_str()
        );
        st.status = to;
        if from != to {
            self.events.send(JobEventKind::StatusChange {
                id: self.id.clone(),
                status: to,
            });
        }
        self.changed.notify_all();
    }

    /// Blocks until the job has concluded, or with `auto_dismiss` until it is gone from the
    /// manager, and returns its last state. Not for IoThreads or the controller.
    pub fn wait(&self) -> JobInfo {
        let mut st = self.state.lock();
        while !(st.status == JobStatus::Null
            || (st.status == JobStatus::Concluded && !self.auto_dismiss))
        {
            self.changed.wait(&mut st);
        }
        drop(st);
        self.info()
    }

    /// Blocks until the job is in `status` or has concluded; returns the state it saw.
    pub fn wait_for(&self, status: JobStatus) -> JobStatus {
        let mut st = self.state.lock();
        while st.status != status && !matches!(st.status, JobStatus::Concluded | JobStatus::Null) {
            self.changed.wait(&mut st);
        }
        st.status
    }

    /// Marks the job quiet (parked, asleep or done) and tells drainers, who may be waiting
    /// for exactly that. Call with the state unlocked.
    fn went_quiet(&self) {
        graph::drain_event().notify();
    }

    fn apply_verb(&self, st: &State, verb: JobVerb) -> Result<()> {
        if verb.allowed(st.status) {
            Ok(())
        } else {
            Err(verb_error(&self.id, st.status, verb))
        }
    }

    fn kick(st: &mut State) {
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }

    /// Pauses the job (QMP job-pause / block-job-pause).
    pub fn user_pause(&self) -> Result<()> {
        let mut st = self.state.lock();
        self.apply_verb(&st, JobVerb::Pause)?;
        if st.user_paused {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Job is already paused",
            ));
        }
        st.user_paused = true;
        st.pause_count += 1;
        // A job already parked (resumed a moment ago, or held by a drain) is paused now;
        // its pause point, when it next runs, sees the status already set.
        if st.parked {
            let to = match st.status {
                JobStatus::Running => Some(JobStatus::Paused),
                JobStatus::Ready => Some(JobStatus::Standby),
                _ => None,
            };
            if let Some(to) = to {
                self.transition(&mut st, to);
            }
        }
        Self::kick(&mut st);
        Ok(())
    }

    /// Resumes a job the user paused.
    pub fn user_resume(&self) -> Result<()> {
        let mut st = self.state.lock();
        if !st.user_paused || st.pause_count == 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Can't resume a job that was not paused",
            ));
        }
        self.apply_verb(&st, JobVerb::Resume)?;
        st.user_paused = false;
        st.pause_count -= 1;
        if st.io_status != IoStatus::Ok {
            st.io_status = IoStatus::Ok;
        }
        // A parked job is running again once the command returns, as in QEMU (whose
        // job_resume enters the job's coroutine at once): a query right after the resume
        // must not see it paused. The pause point sees the status already restored.
        if st.pause_count == 0 && st.parked {
            let to = match st.status {
                JobStatus::Paused => Some(JobStatus::Running),
                JobStatus::Standby => Some(JobStatus::Ready),
                _ => None,
            };
            if let Some(to) = to {
                self.transition(&mut st, to);
            }
        }
        Self::kick(&mut st);
        Ok(())
    }

    /// Changes the speed limit (bytes per second; 0: none).
    pub fn set_speed(&self, speed: i64) -> Result<()> {
        // The verb first, then the value (QEMU's block_job_set_speed_locked).
        let mut st = self.state.lock();
        self.apply_verb(&st, JobVerb::SetSpeed)?;
        if speed < 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        st.speed = speed as u64;
        st.speed_changed = true;
        Self::kick(&mut st);
        Ok(())
    }

    /// Asks a ready job to complete.
    pub fn complete(&self) -> Result<()> {
        let can = self.can_complete;
        let mut st = self.state.lock();
        self.apply_verb(&st, JobVerb::Complete)?;
        if st.cancelled || !can {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("The active block job '{}' cannot be completed", self.id),
            ));
        }
        st.should_complete = true;
        Self::kick(&mut st);
        Ok(())
    }

    /// Cancels the job. `force` matters only for jobs that converge: a soft cancel of a
    /// ready job ends it successfully without its final switch.
    pub fn cancel(self: &Arc<Self>, force: bool) -> Result<()> {
        let soft_ok = self.soft_cancel;
        let mut st = self.state.lock();
        if st.status == JobStatus::Concluded {
            drop(st);
            return self.dismiss();
        }
        self.apply_verb(&st, JobVerb::Cancel)?;
        if st.status == JobStatus::Pending {
            // The run is over and waits for finalize (auto-finalize off): a cancel aborts
            // the job now, as QEMU's job_cancel does (job_completed_txn_abort). Kicking the
            // loop would wake nothing, and the job would stay pending for ever.
            st.cancelled = true;
            st.force_cancel = true;
            if st.error.is_none() {
                st.error = Some("Operation canceled".into());
            }
            self.transition(&mut st, JobStatus::Aborting);
            drop(st);
            self.queue_finalize();
            return Ok(());
        }
        let ready = matches!(st.status, JobStatus::Ready | JobStatus::Standby);
        let force = force || !(soft_ok && ready);
        if st.user_paused {
            st.user_paused = false;
            st.pause_count -= 1;
        }
        st.cancelled = true;
        st.force_cancel |= force;
        if !force {
            // A soft cancel of a ready job: finish now, without the switch.
            st.should_complete = true;
        }
        Self::kick(&mut st);
        Ok(())
    }

    /// Finalizes a pending job (when `auto_finalize` is off).
    pub fn finalize(self: &Arc<Self>) -> Result<()> {
        let st = self.state.lock();
        self.apply_verb(&st, JobVerb::Finalize)?;
        drop(st);
        self.queue_finalize();
        Ok(())
    }

    /// Removes a concluded job.
    pub fn dismiss(self: &Arc<Self>) -> Result<()> {
        let st = self.state.lock();
        self.apply_verb(&st, JobVerb::Dismiss)?;
        drop(st);
        self.remove_and_nullify();
        Ok(())
    }

    fn release_edges(&self) {
        let edges = std::mem::take(&mut *self.edges.lock());
        if edges.is_empty() {
            self.user.lock().take();
            return;
        }
        let m = graph::mutation();
        let mut tx = Transaction::new(&m);
        for e in &edges {
            let _ = tx.detach(e);
        }
        let _ = tx.commit();
        drop(m);
        self.user.lock().take();
    }

    // ---- the run side, on the IoThread ----

    fn on_run_end(self: &Arc<Self>, r: Result<()>) {
        {
            let mut st = self.state.lock();
            st.busy = false;
            if let Err(e) = r {
                if st.error.is_none() {
                    st.error = Some(e.full_message());
                }
            }
        }
        self.went_quiet();
    }

    /// Queues the completion on the controller.
    fn queue_completion(self: &Arc<Self>) {
        let Some(m) = self.manager.upgrade() else {
            return;
        };
        let job = Arc::clone(self);
        drop(m.controller.change(move |ctx| async move {
            job.completed(&ctx).await;
            Ok(())
        }));
    }

    fn queue_finalize(self: &Arc<Self>) {
        if self.finalizing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(m) = self.manager.upgrade() else {
            return;
        };
        let job = Arc::clone(self);
        drop(m.controller.change(move |ctx| async move {
            job.do_finalize(&ctx).await;
            Ok(())
        }));
    }

    /// After the run: waiting -> pending -> (finalize), or aborting -> finalize.
    async fn completed(self: &Arc<Self>, ctx: &ChangeCtx) {
        let failed = {
            let mut st = self.state.lock();
            if st.force_cancel && st.error.is_none() {
                st.error = Some("Operation canceled".into());
            }
            let failed = st.error.is_some();
            if failed {
                self.transition(&mut st, JobStatus::Aborting);
            } else {
                self.transition(&mut st, JobStatus::Waiting);
                self.transition(&mut st, JobStatus::Pending);
                if !self.auto_finalize {
                    self.events.send(JobEventKind::Pending {
                        id: self.id.clone(),
                        kind: self.kind,
                    });
                }
            }
            failed
        };
        if failed || self.auto_finalize {
            self.finalizing.store(true, Ordering::Release);
            self.do_finalize(ctx).await;
        }
    }

    async fn do_finalize(self: &Arc<Self>, ctx: &ChangeCtx) {
        // The job's hold on its nodes goes first (QEMU's block_job_remove_all_bdrv): the
        // final graph change must not conflict with the job's own shared-permission limits.
        // Nothing else can change the graph before this change ends.
        self.release_edges();
        let mut driver = self.driver.lock().take();
        let failed = self.state.lock().error.is_some();
        let mut ok = !failed;
        if let Some(d) = driver.as_mut() {
            if ok {
                if let Err(e) = d.prepare(ctx).await {
                    let mut st = self.state.lock();
                    st.error = Some(e.full_message());
                    self.transition(&mut st, JobStatus::Aborting);
                    ok = false;
                }
            }
            if ok {
                d.commit(ctx).await;
            } else {
                d.abort(ctx).await;
            }
            d.clean(ctx).await;
        }
        drop(driver);
        let mut st = self.state.lock();
        let (len, offset, speed) = (st.total.max(st.current), st.current, st.speed);
        if st.force_cancel {
            self.events.send(JobEventKind::Cancelled {
                id: self.id.clone(),
                kind: self.kind,
                len,
                offset,
                speed,
            });
        } else {
            let error = if ok { None } else { st.error.clone() };
            self.events.send(JobEventKind::Completed {
                id: self.id.clone(),
                kind: self.kind,
                len,
                offset,
                speed,
                error,
            });
        }
        self.transition(&mut st, JobStatus::Concluded);
        drop(st);
        if self.auto_dismiss {
            self.remove_and_nullify();
        }
    }

    /// Leaves the manager's list, then enters NULL: whoever sees NULL sees the job gone.
    /// The state lock is not held while the list is locked (the list is locked first
    /// elsewhere).
    fn remove_and_nullify(&self) {
        if let Some(m) = self.manager.upgrade() {
            m.jobs.lock().remove(&self.id);
        }
        let mut st = self.state.lock();
        if st.status != JobStatus::Null {
            self.transition(&mut st, JobStatus::Null);
        }
    }
}

/// A job as a graph user: drains pause it at its next pause point, and it is quiet while
/// parked there or asleep.
struct JobUser(Weak<Job>);

impl User for JobUser {
    fn describe(&self) -> String {
        match self.0.upgrade() {
            Some(j) => format!("block job '{}'", j.id),
            None => "a finished block job".into(),
        }
    }

    fn drained_begin(&self) {
        if let Some(j) = self.0.upgrade() {
            j.state.lock().pause_count += 1;
        }
    }

    fn drained_end(&self) {
        if let Some(j) = self.0.upgrade() {
            let mut st = j.state.lock();
            st.pause_count = st.pause_count.saturating_sub(1);
            Job::kick(&mut st);
        }
    }

    fn is_quiet(&self) -> bool {
        match self.0.upgrade() {
            Some(j) => !j.state.lock().busy,
            None => true,
        }
    }
}

/// What the copy loop gets: pause points, the rate limiter, progress, errors.
pub struct JobCx {
    job: Arc<Job>,
}

impl JobCx {
    /// The job.
    pub fn job(&self) -> &Arc<Job> {
        &self.job
    }

    /// Whether the job is being cancelled (forced).
    pub fn is_cancelled(&self) -> bool {
        self.job.state.lock().force_cancel
    }

    /// Whether a ready job was asked to complete (or soft-cancelled).
    pub fn should_complete(&self) -> bool {
        self.job.state.lock().should_complete
    }

    /// Whether a soft cancel ended the job (it must skip its final switch).
    pub fn soft_cancelled(&self) -> bool {
        let st = self.job.state.lock();
        st.cancelled && !st.force_cancel
    }

    /// Sets the total amount of work.
    pub fn set_total(&self, total: u64) {
        self.job.state.lock().total = total;
    }

    /// Adds to the total amount of work.
    pub fn add_total(&self, n: u64) {
        self.job.state.lock().total += n;
    }

    /// Sets the total to the work done plus `remaining` (for jobs whose work grows).
    pub fn set_remaining(&self, remaining: u64) {
        let mut st = self.job.state.lock();
        st.total = st.current + remaining;
    }

    /// Records work done.
    pub fn progress(&self, n: u64) {
        self.job.state.lock().current += n;
    }

    /// Moves to READY and sends BLOCK_JOB_READY.
    pub fn ready(&self) {
        let mut st = self.job.state.lock();
        if st.status == JobStatus::Running {
            self.job.transition(&mut st, JobStatus::Ready);
            let (len, offset, speed) = (st.total, st.current, st.speed);
            self.job.events.send(JobEventKind::Ready {
                id: self.job.id.clone(),
                kind: self.job.kind,
                len,
                offset,
                speed,
            });
        }
    }

    /// Parks while the job is paused (by the user or a drain), unless cancelled.
    pub async fn pause_point(&self) {
        let user_paused_state = {
            let mut st = self.job.state.lock();
            if st.pause_count == 0 || st.force_cancel {
                return;
            }
            let from = st.status;
            if st.user_paused {
                let to = if from == JobStatus::Ready {
                    JobStatus::Standby
                } else {
                    JobStatus::Paused
                };
                self.job.transition(&mut st, to);
            }
            st.parked = true;
            st.busy = false;
            from
        };
        self.job.went_quiet();
        // Busy again in the same critical section that sees the pause end, so a drain that
        // begins now waits for the next pause point instead of thinking the job parked.
        let mut st = std::future::poll_fn(|cx| {
            let mut st = self.job.state.lock();
            if st.pause_count == 0 || st.force_cancel {
                st.parked = false;
                st.busy = true;
                return Poll::Ready(st);
            }
            st.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if st.status != user_paused_state
            && matches!(st.status, JobStatus::Paused | JobStatus::Standby)
        {
            self.job.transition(&mut st, user_paused_state);
        }
    }

    /// Sleeps `d` (quiet meanwhile), waking early on cancel, completion or a speed change. A
    /// pause (the user's or a drain's) parks the job at a pause point and then it sleeps on
    /// until `d` has passed, as QEMU's `block_job_ratelimit_sleep` keeps waiting when the job
    /// is re-entered early: a drain never lets a rate-limited job copy ahead of its speed.
    pub async fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            {
                let mut st = self.job.state.lock();
                if st.force_cancel {
                    return;
                }
                st.busy = false;
            }
            self.job.went_quiet();
            // Sleep in the ring's timer, in slices, so a cancel or pause is noticed promptly.
            let paused = loop {
                let now = Instant::now();
                if now >= end {
                    break false;
                }
                let step = (end - now).min(Duration::from_millis(20));
                let _ = iothreads::op::sleep(step).await;
                let st = self.job.state.lock();
                if st.force_cancel || st.should_complete || st.speed_changed {
                    break false;
                }
                if st.pause_count > 0 {
                    break true;
                }
            };
            self.wake_up().await;
            if !paused || Instant::now() >= end {
                return;
            }
        }
    }

    /// Ends a quiet wait: busy again only in a critical section that sees no pause (so a
    /// drain that begins later waits for the next pause point instead of counting the job
    /// parked); while a pause is on, parks at the pause point first.
    async fn wake_up(&self) {
        loop {
            {
                let mut st = self.job.state.lock();
                if st.pause_count == 0 || st.force_cancel {
                    st.busy = true;
                    return;
                }
            }
            self.pause_point().await;
        }
    }

    /// Accounts `n` bytes copied against the speed limit, in 100 ms slices as QEMU's
    /// `ratelimit_calculate_delay` does: a slice whose quota is exceeded is stretched in
    /// proportion, and the next [`JobCx::rate_limit_wait`] sleeps until it ends.
    pub fn rate_account(&self, n: u64) {
        let mut st = self.job.state.lock();
        if st.speed == 0 {
            return;
        }
        let slice = Duration::from_millis(100);
        let quota = (st.speed / 10).max(1);
        let now = Instant::now();
        // A new speed starts a new slice.
        if std::mem::take(&mut st.speed_changed) || st.slice_end < now {
            st.slice_start = now;
            st.slice_end = now + slice;
            st.dispatched = 0;
        }
        st.dispatched += n;
        if st.dispatched >= quota {
            let slices = st.dispatched as f64 / quota as f64;
            st.slice_end = st.slice_start + slice.mul_f64(slices);
            st.delay_until = Some(st.slice_end);
        }
    }

    /// Sleeps as long as the accounted bytes require (quiet meanwhile), or at least passes a
    /// pause point.
    pub async fn rate_limit_wait(&self) {
        let until = {
            let mut st = self.job.state.lock();
            st.speed_changed = false;
            st.delay_until.take()
        };
        match until.map(|u| u.saturating_duration_since(Instant::now())) {
            Some(d) if !d.is_zero() => self.sleep(d).await,
            _ => self.pause_point().await,
        }
    }

    /// Handles an I/O error per `on-error`: the action taken (Stop parks the job until the
    /// user resumes it; the caller then retries the piece).
    pub async fn on_io_error(&self, op: IoOp, e: &io::Error) -> ErrorAction {
        let nospc = e.raw_os_error() == Some(libc::ENOSPC);
        let action = match self.job.on_error {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc => {
                if nospc {
                    ErrorAction::Stop
                } else {
                    ErrorAction::Report
                }
            }
        };
        // A stop pauses the job (user-visibly, so the user resumes it) and sets the io-status
        // before BLOCK_JOB_ERROR goes out: whoever sees the event and queries the job sees it
        // paused, as QEMU's monitor does (iotest 030's test_stop), and can resume it at once.
        if action == ErrorAction::Stop {
            let mut st = self.job.state.lock();
            st.io_status = if nospc {
                IoStatus::Nospc
            } else {
                IoStatus::Failed
            };
            if !st.user_paused {
                st.user_paused = true;
                st.pause_count += 1;
            }
        }
        self.job.events.send(JobEventKind::Error {
            id: self.job.id.clone(),
            operation: op,
            action,
        });
        if action == ErrorAction::Stop {
            self.pause_point().await;
        }
        action
    }
}

struct ManagerInner {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    events: Arc<EventBus>,
    controller: ControllerHandle,
}

/// A subscription to job events (see [`JobManager::subscribe`]): `recv`, `try_iter`,
/// `recv_timeout`.
pub type JobEvents = crossbeam_channel::Receiver<JobEvent>;

/// Every job of an engine (a handle: clones share the jobs).
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<ManagerInner>,
}

/// What a new job needs besides its driver.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Id (QMP `job-id`); required and unique.
    pub id: String,
    /// The node it was started on.
    pub device: String,
    /// Speed limit (bytes per second, 0: none).
    pub speed: i64,
    /// Error policy.
    pub on_error: OnError,
    /// Finalize without `job-finalize`.
    pub auto_finalize: bool,
    /// Dismiss without `job-dismiss`.
    pub auto_dismiss: bool,
}

/// What every block job takes besides its nodes (QMP's common job arguments).
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Job id (default: the job's `device`).
    pub job_id: Option<String>,
    /// Speed limit (bytes per second, 0: none).
    pub speed: i64,
    /// Error policy.
    pub on_error: OnError,
    /// Name for the job's filter node (default: automatic).
    pub filter_node_name: Option<String>,
    /// Finalize without `job-finalize`.
    pub auto_finalize: bool,
    /// Dismiss without `job-dismiss`.
    pub auto_dismiss: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            job_id: None,
            speed: 0,
            on_error: OnError::Report,
            filter_node_name: None,
            auto_finalize: true,
            auto_dismiss: true,
        }
    }
}

impl JobOptions {
    /// The job's id: `job_id`, else the device's name.
    pub fn id_for(&self, device: &str) -> String {
        self.job_id.clone().unwrap_or_else(|| device.to_string())
    }

    /// The manager's description of a job with these options started on `device`.
    pub(crate) fn spec(&self, device: &str) -> JobSpec {
        JobSpec {
            id: self.id_for(device),
            device: device.to_string(),
            speed: self.speed,
            on_error: self.on_error,
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
        }
    }
}

/// Checks a job id as QEMU does (`id_wellformed`: a letter, then letters, digits, `-._`).
pub fn check_job_id(id: &str) -> Result<()> {
    let mut c = id.chars();
    let ok = matches!(c.next(), Some(x) if x.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("Invalid job ID '{id}'"),
        ))
    }
}

impl JobManager {
    /// A manager whose jobs finalize on `controller`.
    pub(crate) fn new(controller: ControllerHandle) -> JobManager {
        JobManager {
            inner: Arc::new(ManagerInner {
                jobs: Mutex::new(HashMap::new()),
                events: Arc::new(EventBus::default()),
                controller,
            }),
        }
    }

    /// Job events, from now on (each subscriber gets every event).
    pub fn subscribe(&self) -> JobEvents {
        self.inner.events.subscribe()
    }

    /// The job `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Job>> {
        self.inner
            .jobs
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("Job '{id}' not found")))
    }

    /// Every job, sorted by id.
    pub fn list(&self) -> Vec<Arc<Job>> {
        let mut v: Vec<Arc<Job>> = self.inner.jobs.lock().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The job that owns `node` (that would make another job on it conflict), if any.
    pub fn owner_of(&self, node: &Node) -> Option<Arc<Job>> {
        let jobs = self.inner.jobs.lock();
        jobs.values()
            .find(|j| {
                j.edges
                    .lock()
                    .iter()
                    .any(|e| std::ptr::eq(Arc::as_ptr(&e.child()), node as *const Node))
                    && !matches!(j.status(), JobStatus::Concluded | JobStatus::Null)
            })
            .cloned()
    }

    /// Fails with QEMU's text if a running job owns `node` ("Node 'x' is busy: block device
    /// is in use by block job: stream"). Called inside the change that creates a job.
    pub fn check_free(&self, node: &Node) -> Result<()> {
        match self.owner_of(node) {
            Some(j) => Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "Node '{}' is busy: block device is in use by block job: {}",
                    node.name(),
                    j.kind.as_str()
                ),
            )),
            None => Ok(()),
        }
    }

    /// Delays job `id`'s completion by `us` microseconds after its copy loop ends (a test
    /// aid for ordering concurrent completions; the job is quiet meanwhile).
    pub fn set_completion_delay(&self, id: &str, us: u64) {
        if let Ok(j) = self.get(id) {
            j.completion_delay_us.store(us, Ordering::Release);
        }
    }

    /// Force-cancels every job and waits until each has concluded (the engine's shutdown).
    pub fn cancel_all_sync(&self) {
        for j in self.list() {
            let _ = j.cancel(true);
        }
        for j in self.list() {
            j.wait();
        }
    }

    /// Registers and starts a job. `setup` runs inside one graph change, after the id was
    /// checked: it validates, checks that no other job owns what it needs
    /// ([`JobManager::check_free`]), and makes its graph changes (filters, frozen edges,
    /// reopens). The job then holds an edge to each node it owns (with the permissions
    /// given), so drains reach it and other jobs see them taken. If that fails, the driver's
    /// `abort` and `clean` undo the setup. The copy loop starts on `io`.
    pub(crate) fn create<F, Fut>(
        &self,
        spec: JobSpec,
        io: iothreads::IoThreadHandle,
        setup: F,
    ) -> Result<Arc<Job>>
    where
        F: FnOnce(ChangeCtx, JobManager) -> Fut + Send + 'static,
        Fut: Future<Output = Result<JobSetup>> + 'static,
    {
        check_job_id(&spec.id)?;
        if spec.speed < 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        let me = JobManager {
            inner: Arc::clone(&self.inner),
        };
        let inner = Arc::clone(&self.inner);
        let job = self.inner.controller.change(move |ctx| async move {
            if inner.jobs.lock().contains_key(&spec.id) {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("Job ID '{}' already in use", spec.id),
                ));
            }
            let JobSetup { mut driver, nodes } = setup(ctx.clone(), me).await?;
            let kind = driver.kind();
            let (can_complete, soft_cancel) =
                (driver.can_complete(), driver.soft_cancel_when_ready());
            let job = Arc::new(Job {
                id: spec.id.clone(),
                kind,
                device: spec.device.clone(),
                auto_finalize: spec.auto_finalize,
                auto_dismiss: spec.auto_dismiss,
                on_error: spec.on_error,
                state: Mutex::new(State {
                    status: JobStatus::Undefined,
                    pause_count: 0,
                    user_paused: false,
                    parked: false,
                    busy: false,
                    cancelled: false,
                    force_cancel: false,
                    should_complete: false,
                    error: None,
                    current: 0,
                    total: 0,
                    speed: spec.speed as u64,
                    io_status: IoStatus::Ok,
                    waker: None,
                    slice_start: Instant::now(),
                    slice_end: Instant::now(),
                    dispatched: 0,
                    delay_until: None,
                    speed_changed: false,
                }),
                events: Arc::clone(&inner.events),
                edges: Mutex::new(Vec::new()),
                driver: Mutex::new(None),
                can_complete,
                soft_cancel,
                user: Mutex::new(None),
                manager: Arc::downgrade(&inner),
                finalizing: AtomicBool::new(false),
                changed: Condvar::new(),
                completion_delay_us: std::sync::atomic::AtomicU64::new(0),
            });
            // The job's own edges: drains of these nodes reach it.
            let user: Arc<dyn User> = Arc::new(JobUser(Arc::downgrade(&job)));
            let held = ctx.transaction(|tx| {
                let mut held = Vec::with_capacity(nodes.len());
                for (n, perm, shared) in &nodes {
                    held.push(tx.attach_user(&user, n, *perm, *shared)?);
                }
                Ok(held)
            });
            let held = match held {
                Ok(h) => h,
                Err(e) => {
                    driver.abort(&ctx).await;
                    driver.clean(&ctx).await;
                    return Err(e);
                }
            };
            job.edges.lock().extend(held);
            *job.user.lock() = Some(user);
            *job.driver.lock() = Some(driver);
            {
                let mut st = job.state.lock();
                job.transition(&mut st, JobStatus::Created);
                // Busy from here: a drain now waits for the loop's first pause point.
                job.transition(&mut st, JobStatus::Running);
                st.busy = true;
            }
            inner.jobs.lock().insert(job.id.clone(), Arc::clone(&job));
            Ok(job)
        });
        let job = job
            .join()
            .map_err(|e| Error::new(ErrorKind::Busy, format!("the controller stopped: {e}")))??;
        let j = Arc::clone(&job);
        let started = io.spawn_with(move || async move {
            let cx = JobCx {
                job: Arc::clone(&j),
            };
            cx.pause_point().await;
            let mut driver = j.driver.lock().take();
            let r = match driver.as_mut() {
                Some(d) => d.run(&cx).await,
                None => Ok(()),
            };
            *j.driver.lock() = driver;
            j.on_run_end(r);
            let delay = j.completion_delay_us.load(Ordering::Acquire);
            if delay > 0 {
                let _ = iothreads::op::sleep(Duration::from_micros(delay)).await;
            }
            j.queue_completion();
        });
        drop(started);
        Ok(job)
    }
}

/// What a job's setup hands back: its driver, and the nodes it owns with the permissions it
/// takes and shares on each.
pub struct JobSetup {
    /// The driver.
    pub driver: Box<dyn JobDriver>,
    /// Owned nodes: (node, permissions taken, permissions shared).
    pub nodes: Vec<(Arc<Node>, Perm, Perm)>,
}

/// QEMU's text for an I/O error: the errno's description alone ("Input/output error").
pub fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let s = io::Error::from_raw_os_error(n).to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        None => e.to_string(),
    }
}

/// A job's I/O error as a control-plane error with QEMU's text.
pub fn job_io_error(e: &io::Error) -> Error {
    Error::new(ErrorKind::Io, errno_text(e))
}
