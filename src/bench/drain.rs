//! `--drain-every`: a drainer that drains the bench's target node(s) on a fixed period while
//! the load runs, through the engine's controller, and times each drain.
//!
//! The drainer is a plain thread. Every period it queues one graph change on the controller
//! (`change_blocking`) that begins a drained section over the target nodes (and so over the
//! backends above them, which hold new requests meanwhile), waits until the section is
//! quiesced, ends it, and reports how long the wait took: the time from `drained_begin` to
//! quiesced. With several null jobs (one node each) one section covers all the nodes.
//!
//! Only drains that begin at or after the end of the ramp enter the statistics. The controller
//! lives inside the drainer thread and is shut down when that thread ends, which
//! [`Drainer::finish`] (or `Drop`) waits for: the run keeps the drainer declared after its
//! IoThreads, so the controller is gone before they are.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::{Controller, Node};

use super::job::DirStats;

/// The longest the drainer sleeps before it looks at its stop flag again.
const STOP_POLL: Duration = Duration::from_millis(10);

/// What the drainer measured.
#[derive(Debug, Clone)]
pub struct DrainReport {
    /// The period (`--drain-every`).
    pub every: Duration,
    /// Time from `drained_begin` to quiesced of each measured drain, in nanoseconds (bytes are
    /// always 0).
    pub stats: DirStats,
}

impl DrainReport {
    /// The period in whole milliseconds.
    pub fn every_ms(&self) -> u64 {
        self.every.as_millis() as u64
    }
}

/// The running drainer thread.
pub struct Drainer {
    every: Duration,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<DirStats, String>>>,
}

impl Drainer {
    /// Starts the drainer thread: every `every` it drains `nodes` through `controller`, and
    /// records the drains that begin at or after `measure_from`. The thread owns the
    /// controller and shuts it down when it ends.
    pub fn start(
        controller: Controller,
        nodes: Vec<Arc<Node>>,
        every: Duration,
        measure_from: Instant,
    ) -> Result<Drainer, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("drainer".into())
            .spawn(move || {
                let r = drain_loop(&controller, &nodes, every, measure_from, &flag);
                controller.shutdown();
                r
            })
            .map_err(|e| format!("cannot start the drainer thread: {e}"))?;
        Ok(Drainer {
            every,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the drainer (after the drain in progress, if any), waits for it and its
    /// controller to end, and returns what it measured.
    pub fn finish(mut self) -> Result<DrainReport, String> {
        let stats = self.stop_and_join()?;
        Ok(DrainReport {
            every: self.every,
            stats,
        })
    }

    fn stop_and_join(&mut self) -> Result<DirStats, String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "the drainer thread panicked".to_string())?,
            None => Ok(DirStats::new()),
        }
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Sleeps `d` in slices of at most [`STOP_POLL`]; returns false if `stop` was raised.
fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    loop {
        if stop.load(Ordering::SeqCst) || super::STOP.load(Ordering::Relaxed) {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(STOP_POLL));
    }
}

fn drain_loop(
    controller: &Controller,
    nodes: &[Arc<Node>],
    every: Duration,
    measure_from: Instant,
    stop: &AtomicBool,
) -> Result<DirStats, String> {
    let mut stats = DirStats::new();
    while sleep_unless_stopped(every, stop) {
        let nodes = nodes.to_vec();
        let (began, took) = controller
            .change_blocking(move |ctx| async move {
                let t0 = Instant::now();
                let d = ctx.drain(&nodes).await;
                let dt = t0.elapsed();
                d.end();
                Ok((t0, dt))
            })
            .map_err(|e| format!("drain: {}", e.full_message()))?;
        if began >= measure_from {
            stats.record(took.as_nanos().min(u128::from(u64::MAX)) as u64, 0);
        }
    }
    Ok(stats)
}
