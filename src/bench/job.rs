//! The per-job load loop: one job runs as tasks on its own IoThread, `iodepth` worker tasks
//! each owning one buffer and keeping one request in flight through the job's backend.
//!
//! Everything the workers share lives in one `Rc<JobState>` with `Cell`/`RefCell` fields: the
//! tasks all run on the same thread, so nothing here needs atomics except the progress
//! counters (read by the main thread) and the process-wide stop flag.
//!
//! Per request a worker reads the clock once, at completion: that reading ends this request's
//! latency, starts the next one's, and is what the ramp and runtime checks compare against
//! (with `--verify` the clock is read again after a write buffer has been filled, so that the
//! fill is not counted as latency). The loop allocates nothing and makes no system call of its
//! own; statistics go into a preallocated HdrHistogram per direction.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use engine::Backend;
use hdrhistogram::Histogram;

use super::options::Options;
use super::progress::{Progress, PHASE_DONE, PHASE_RAMP, PHASE_RUN, PHASE_VERIFY};
use super::verify::{self, Bitmap, Rng};

/// Index of the read direction in per-direction arrays.
pub const READ: usize = 0;
/// Index of the write direction.
pub const WRITE: usize = 1;

/// The largest latency the histograms hold exactly (one hour); longer ones saturate.
const HIST_MAX_NS: u64 = 3_600_000_000_000;

/// Resource usage from `getrusage`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rusage {
    /// User CPU time.
    pub user: Duration,
    /// System CPU time.
    pub sys: Duration,
    /// Voluntary plus involuntary context switches.
    pub ctx: u64,
    /// Major page faults.
    pub majflt: u64,
    /// Minor page faults.
    pub minflt: u64,
}

impl Rusage {
    fn get(who: libc::c_int) -> Rusage {
        // SAFETY: an all-zero rusage is a valid out-parameter.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills `ru`; `who` is RUSAGE_SELF or RUSAGE_THREAD.
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return Rusage::default();
        }
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        Rusage {
            user: tv(ru.ru_utime),
            sys: tv(ru.ru_stime),
            ctx: (ru.ru_nvcsw + ru.ru_nivcsw).max(0) as u64,
            majflt: ru.ru_majflt.max(0) as u64,
            minflt: ru.ru_minflt.max(0) as u64,
        }
    }

    /// The whole process (every thread, io_uring's kernel workers included).
    pub fn process() -> Rusage {
        Rusage::get(libc::RUSAGE_SELF)
    }

    /// The calling thread.
    pub fn thread() -> Rusage {
        Rusage::get(libc::RUSAGE_THREAD)
    }

    /// What was used between `earlier` and `self`.
    pub fn since(&self, earlier: &Rusage) -> Rusage {
        Rusage {
            user: self.user.saturating_sub(earlier.user),
            sys: self.sys.saturating_sub(earlier.sys),
            ctx: self.ctx.saturating_sub(earlier.ctx),
            majflt: self.majflt.saturating_sub(earlier.majflt),
            minflt: self.minflt.saturating_sub(earlier.minflt),
        }
    }
}

/// A point in a job's life: when, and the CPU used so far by the process and by the job's
/// IoThread.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    /// When.
    pub at: Instant,
    /// Process usage at that point.
    pub process: Rusage,
    /// The IoThread's usage at that point.
    pub thread: Rusage,
}

impl Mark {
    /// A mark at `at`, taken on the job's IoThread.
    fn take(at: Instant) -> Mark {
        Mark {
            at,
            process: Rusage::process(),
            thread: Rusage::thread(),
        }
    }
}

/// Completion-latency statistics of one direction.
#[derive(Debug, Clone)]
pub struct DirStats {
    /// Latencies in nanoseconds, 3 significant figures.
    pub hist: Histogram<u64>,
    /// Completed requests.
    pub ios: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Exact minimum latency (ns).
    pub min: u64,
    /// Exact maximum latency (ns).
    pub max: u64,
    sum: u64,
    sumsq: u128,
}

impl DirStats {
    /// Empty statistics.
    pub(crate) fn new() -> DirStats {
        DirStats {
            hist: Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds"),
            ios: 0,
            bytes: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
            sumsq: 0,
        }
    }

    /// Counts one sample of `ns` nanoseconds that moved `bytes`.
    #[inline]
    pub(crate) fn record(&mut self, ns: u64, bytes: u64) {
        self.ios += 1;
        self.bytes += bytes;
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
        self.sum = self.sum.wrapping_add(ns);
        self.sumsq += u128::from(ns) * u128::from(ns);
        self.hist.saturating_record(ns);
    }

    /// Minimum latency (0 without samples).
    pub fn min_ns(&self) -> u64 {
        if self.ios == 0 {
            0
        } else {
            self.min
        }
    }

    /// Mean latency.
    pub fn mean(&self) -> f64 {
        if self.ios == 0 {
            0.0
        } else {
            self.sum as f64 / self.ios as f64
        }
    }

    /// Sample standard deviation of the latency.
    pub fn stddev(&self) -> f64 {
        if self.ios < 2 {
            return 0.0;
        }
        let n = self.ios as f64;
        let mean = self.sum as f64 / n;
        let var = (self.sumsq as f64 - n * mean * mean) / (n - 1.0);
        var.max(0.0).sqrt()
    }
}

/// Why a job stopped early.
#[derive(Debug, Clone)]
pub struct JobError {
    /// errno, as fio's `error` field has it.
    pub errno: i32,
    /// One line saying what failed.
    pub message: String,
}

/// What the verify side of a job did.
#[derive(Debug, Clone, Default)]
pub struct VerifyStats {
    /// Blocks read back and found good.
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Length of the read-back pass that follows a write-only workload, if there was one.
    pub pass: Option<Duration>,
}

/// Everything a job reports when it ends.
#[derive(Debug)]
pub struct JobResult {
    /// Job number.
    pub index: u32,
    /// The IoThread's name.
    pub thread_name: String,
    /// The error that stopped it, if any.
    pub error: Option<JobError>,
    /// Read and write statistics of the measured period.
    pub dirs: [DirStats; 2],
    /// When the job started (ramp included).
    pub start: Instant,
    /// Start of the measured period (`None` if the job ended during the ramp).
    pub measure: Option<Mark>,
    /// End of the workload (before any read-back verify pass).
    pub end: Mark,
    /// Verify figures with `--verify`.
    pub verify: Option<VerifyStats>,
}

impl JobResult {
    /// Length of the measured period.
    pub fn runtime(&self) -> Duration {
        self.measure.map_or(Duration::ZERO, |m| {
            self.end.at.saturating_duration_since(m.at)
        })
    }

    /// The IoThread's CPU over the measured period.
    pub fn thread_cpu(&self) -> Rusage {
        self.measure
            .map_or_else(Rusage::default, |m| self.end.thread.since(&m.thread))
    }
}

/// What the main thread hands a job.
pub struct JobSpec {
    /// Job number (0-based).
    pub index: u32,
    /// The run's options.
    pub opts: Arc<Options>,
    /// The job's backend, bound to its IoThread.
    pub backend: Backend,
    /// Where the job publishes progress.
    pub progress: Arc<Progress>,
    /// Told the job's index when it ends.
    pub done: mpsc::Sender<u32>,
}

/// State shared by a job's tasks (all on its IoThread).
struct JobState {
    backend: Backend,
    region_start: u64,
    nblocks: u64,
    bs: u64,
    random: bool,
    read_pct: u32,
    deadline: Option<Instant>,
    ramp_end: Option<Instant>,
    /// Requests the measured period may issue (`None`: time-based).
    limit: Option<u64>,
    done: Cell<bool>,
    issued: Cell<u64>,
    cursor: Cell<u64>,
    seq: Cell<u64>,
    stats: [RefCell<DirStats>; 2],
    error: RefCell<Option<JobError>>,
    measure: Cell<Option<Mark>>,
    /// When the measured period began (`measure`'s instant, kept apart for the hot path).
    measure_start: Cell<Option<Instant>>,
    progress: Arc<Progress>,
    /// With --verify: blocks that hold a verifiable block.
    written: Option<Bitmap>,
    /// With --verify: blocks with a request in flight.
    busy: Option<Bitmap>,
    verified: Cell<u64>,
}

fn stopped() -> bool {
    super::STOP.load(Ordering::Relaxed)
}

impl JobState {
    fn begin_measuring(&self, now: Instant) {
        self.measure_start.set(Some(now));
        self.measure.set(Some(Mark::take(now)));
        self.progress.set_phase(PHASE_RUN);
    }

    /// Whether a worker may issue another request; `now` is its latest clock reading.
    #[inline]
    fn admit(&self, now: Instant) -> bool {
        if self.done.get() {
            return false;
        }
        if stopped() || self.deadline.is_some_and(|d| now >= d) {
            self.done.set(true);
            return false;
        }
        if self.measure_start.get().is_none() {
            if self.ramp_end.is_some_and(|r| now >= r) {
                self.begin_measuring(now);
            } else {
                return true;
            }
        }
        if let Some(limit) = self.limit {
            let n = self.issued.get();
            if n >= limit {
                self.done.set(true);
                return false;
            }
            self.issued.set(n + 1);
        }
        true
    }

    #[inline]
    fn pick_dir(&self, rng: &mut Rng) -> usize {
        match self.read_pct {
            100 => READ,
            0 => WRITE,
            p => {
                if (rng.below(100) as u32) < p {
                    READ
                } else {
                    WRITE
                }
            }
        }
    }

    #[inline]
    fn next_block(&self, rng: &mut Rng) -> u64 {
        if self.random {
            rng.below(self.nblocks)
        } else {
            let c = self.cursor.get();
            self.cursor
                .set(if c + 1 >= self.nblocks { 0 } else { c + 1 });
            c
        }
    }

    /// A block for the next request; with --verify one no other request of this job uses.
    #[inline]
    fn pick_block(&self, rng: &mut Rng) -> u64 {
        let mut b = self.next_block(rng);
        if let Some(busy) = &self.busy {
            // There are at most min(iodepth, nblocks) workers, so a free block exists.
            while busy.get(b) {
                b = if self.random {
                    if b + 1 >= self.nblocks {
                        0
                    } else {
                        b + 1
                    }
                } else {
                    self.next_block(rng)
                };
            }
            busy.set(b);
        }
        b
    }

    /// Counts a completed request; it enters the statistics if it was issued in the measured
    /// period (requests issued during the ramp are not counted, even if they end after it).
    #[inline]
    fn complete(&self, dir: usize, start: Instant, now: Instant) {
        self.progress.add(dir, self.bs);
        if self.measure_start.get().is_some_and(|m| start >= m) {
            let ns = now.saturating_duration_since(start).as_nanos() as u64;
            self.stats[dir].borrow_mut().record(ns, self.bs);
        }
    }

    fn fail(&self, errno: i32, message: String) {
        self.done.set(true);
        let mut e = self.error.borrow_mut();
        if e.is_none() {
            *e = Some(JobError { errno, message });
        }
    }

    fn fail_io(&self, dir: usize, offset: u64, e: &std::io::Error) {
        let what = if dir == READ { "read" } else { "write" };
        self.fail(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{what} of {} bytes at offset {offset} failed: {e}", self.bs),
        );
    }
}

/// Runs one job on the calling IoThread and reports what it did.
pub async fn run(spec: JobSpec) -> JobResult {
    let start = Instant::now();
    let o = &*spec.opts;
    let nblocks = o.size / o.bs;
    let ramp_end = (o.ramp_time > Duration::ZERO).then(|| start + o.ramp_time);
    let js = Rc::new(JobState {
        backend: spec.backend.clone(),
        region_start: o.region_start(spec.index),
        nblocks,
        bs: o.bs,
        random: o.rw.is_random(),
        read_pct: o.rwmixread,
        deadline: o.runtime.map(|r| start + o.ramp_time + r),
        ramp_end,
        limit: (!o.time_based).then_some(nblocks),
        done: Cell::new(false),
        issued: Cell::new(0),
        cursor: Cell::new(0),
        seq: Cell::new(0),
        stats: [RefCell::new(DirStats::new()), RefCell::new(DirStats::new())],
        error: RefCell::new(None),
        measure: Cell::new(None),
        measure_start: Cell::new(None),
        progress: Arc::clone(&spec.progress),
        written: o.verify.then(|| {
            // A read-only verify run checks what an earlier run wrote: every block counts.
            if o.rw.is_read_only() {
                Bitmap::full(nblocks)
            } else {
                Bitmap::new(nblocks)
            }
        }),
        busy: o.verify.then(|| Bitmap::new(nblocks)),
        verified: Cell::new(0),
    });
    if ramp_end.is_none() {
        js.begin_measuring(start);
    } else {
        js.progress.set_phase(PHASE_RAMP);
    }

    let workers = if o.verify {
        u64::from(o.iodepth).min(nblocks)
    } else {
        u64::from(o.iodepth)
    };
    let seed = u64::from(spec.index) << 32;
    let tasks: Vec<_> = (0..workers)
        .map(|w| iothreads::spawn_local(worker(Rc::clone(&js), seed | w)))
        .collect();
    for t in tasks {
        if let Err(e) = t.await {
            js.fail(libc::EIO, format!("a worker task failed: {e}"));
        }
    }
    let end = Mark::take(Instant::now());

    let mut verify_pass = None;
    if o.verify && o.rw.is_write_only() && js.error.borrow().is_none() && !stopped() {
        js.progress.set_phase(PHASE_VERIFY);
        let t0 = Instant::now();
        js.cursor.set(0);
        let tasks: Vec<_> = (0..workers)
            .map(|_| iothreads::spawn_local(verify_worker(Rc::clone(&js))))
            .collect();
        for t in tasks {
            if let Err(e) = t.await {
                js.fail(libc::EIO, format!("a verify task failed: {e}"));
            }
        }
        verify_pass = Some(t0.elapsed());
    }
    js.progress.set_phase(PHASE_DONE);

    let result = JobResult {
        index: spec.index,
        thread_name: iothreads::current()
            .map(|h| h.name().to_string())
            .unwrap_or_default(),
        error: js.error.borrow_mut().take(),
        dirs: [
            js.stats[READ].borrow().clone(),
            js.stats[WRITE].borrow().clone(),
        ],
        start,
        measure: js.measure.get(),
        end,
        verify: o.verify.then(|| VerifyStats {
            blocks: js.verified.get(),
            bytes: js.verified.get() * o.bs,
            pass: verify_pass,
        }),
    };
    let _ = spec.done.send(spec.index);
    result
}

/// One request slot of a job: issue, wait, record, repeat.
async fn worker(js: Rc<JobState>, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut buf = iothreads::alloc_buf(js.bs as usize);
    let mut now = Instant::now();
    while js.admit(now) {
        let dir = js.pick_dir(&mut rng);
        let block = js.pick_block(&mut rng);
        let offset = js.region_start + block * js.bs;
        if dir == WRITE && js.written.is_some() {
            let seq = js.seq.get();
            js.seq.set(seq + 1);
            verify::fill(&mut buf, offset, seq, &mut rng);
            now = Instant::now();
        }
        let start = now;
        let (r, back) = if dir == READ {
            js.backend.read(offset, buf).await
        } else {
            js.backend.write(offset, buf).await
        };
        buf = back;
        now = Instant::now();
        if let Some(busy) = &js.busy {
            busy.clear(block);
        }
        if let Err(e) = r {
            js.fail_io(dir, offset, &e);
            break;
        }
        if let Some(written) = &js.written {
            if dir == WRITE {
                written.set(block);
            } else if written.get(block) {
                if let Err(m) = verify::check(&buf, offset) {
                    js.fail(verify::EILSEQ, m);
                    break;
                }
                js.verified.set(js.verified.get() + 1);
            }
        }
        js.complete(dir, start, now);
    }
}

/// Reads back every block a write-only job wrote and checks it.
async fn verify_worker(js: Rc<JobState>) {
    let Some(written) = &js.written else { return };
    let mut buf = iothreads::alloc_buf(js.bs as usize);
    loop {
        if js.error.borrow().is_some() || stopped() {
            break;
        }
        let mut b = js.cursor.get();
        while b < js.nblocks && !written.get(b) {
            b += 1;
        }
        if b >= js.nblocks {
            js.cursor.set(b);
            break;
        }
        js.cursor.set(b + 1);
        let offset = js.region_start + b * js.bs;
        let (r, back) = js.backend.read(offset, buf).await;
        buf = back;
        if let Err(e) = r {
            js.fail_io(READ, offset, &e);
            break;
        }
        if let Err(m) = verify::check(&buf, offset) {
            js.fail(verify::EILSEQ, m);
            break;
        }
        js.verified.set(js.verified.get() + 1);
        js.progress.add(READ, js.bs);
    }
}
