//! The progress line: counters each job publishes from its IoThread, and the line the main
//! thread redraws on stderr about once a second while the jobs run (only on a terminal).
//!
//! A job's counters have a single writer (its IoThread), so it publishes with a relaxed load
//! and store rather than a read-modify-write: the hot path pays a plain store, and the main
//! thread reads them once a second.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::options::Options;
use super::report::{fmt_bw_iec, fmt_count};

/// Job phases, as the progress line shows them.
pub const PHASE_RAMP: u8 = 0;
/// The measured workload.
pub const PHASE_RUN: u8 = 1;
/// The read-back pass of a write-only verify job.
pub const PHASE_VERIFY: u8 = 2;
/// Finished.
pub const PHASE_DONE: u8 = 3;

/// Counters one job publishes (cumulative, ramp included).
#[derive(Debug, Default)]
pub struct Progress {
    ios: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    phase: AtomicU8,
}

impl Progress {
    /// Counts one completed request of `bytes` in direction `dir` (0 read, 1 write). Only the
    /// job's own IoThread calls this.
    #[inline]
    pub fn add(&self, dir: usize, bytes: u64) {
        let ios = &self.ios[dir];
        ios.store(ios.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let b = &self.bytes[dir];
        b.store(b.load(Ordering::Relaxed) + bytes, Ordering::Relaxed);
    }

    /// Enters a phase.
    pub fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::Relaxed);
    }

    fn snapshot(&self) -> [u64; 4] {
        [
            self.ios[0].load(Ordering::Relaxed),
            self.ios[1].load(Ordering::Relaxed),
            self.bytes[0].load(Ordering::Relaxed),
            self.bytes[1].load(Ordering::Relaxed),
        ]
    }
}

/// Whether stderr is a terminal.
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
}

/// Redraws the progress line.
pub struct Ticker {
    enabled: bool,
    start: Instant,
    last: Instant,
    prev: [u64; 4],
    drawn: bool,
}

impl Ticker {
    /// A ticker that draws only if `enabled`.
    pub fn new(enabled: bool) -> Ticker {
        let now = Instant::now();
        Ticker {
            enabled,
            start: now,
            last: now,
            prev: [0; 4],
            drawn: false,
        }
    }

    /// When the next line is due.
    pub fn next_due(&self) -> Instant {
        self.last + Duration::from_secs(1)
    }

    /// Redraws the line if a second has passed.
    pub fn tick(&mut self, opts: &Options, jobs: &[&Progress]) {
        let now = Instant::now();
        if now < self.next_due() {
            return;
        }
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        if !self.enabled {
            return;
        }
        let mut total = [0u64; 4];
        let mut states = String::new();
        let mut running = 0;
        for p in jobs {
            let s = p.snapshot();
            for (t, v) in total.iter_mut().zip(s) {
                *t += v;
            }
            let phase = p.phase.load(Ordering::Relaxed);
            if phase != PHASE_DONE {
                running += 1;
            }
            states.push(match phase {
                PHASE_RAMP => '/',
                PHASE_RUN => opts.rw.letter(),
                PHASE_VERIFY => 'V',
                _ => '_',
            });
        }
        let rate = |i: usize| (total[i] - self.prev[i]) as f64 / dt;
        let (riops, wiops, rbw, wbw) = (rate(0), rate(1), rate(2), rate(3));
        self.prev = total;
        let elapsed = now.duration_since(self.start);
        let (pct, eta) = self.estimate(opts, elapsed, total[2] + total[3]);
        let mut line = format!("Jobs: {running} (f={running}): [{states}][{pct:.1}%]");
        line.push_str(&format!(
            "[r={},w={}][r={},w={} IOPS]",
            fmt_bw_iec(rbw),
            fmt_bw_iec(wbw),
            fmt_count(riops),
            fmt_count(wiops)
        ));
        if let Some(eta) = eta {
            let s = eta.as_secs_f64().ceil() as u64;
            line.push_str(&format!("[eta {:02}m:{:02}s]", s / 60, s % 60));
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{line}");
        let _ = err.flush();
        self.drawn = true;
    }

    fn estimate(&self, opts: &Options, elapsed: Duration, bytes: u64) -> (f64, Option<Duration>) {
        let by_time = opts.runtime.map(|r| {
            let total = opts.ramp_time + r;
            (
                elapsed.as_secs_f64() / total.as_secs_f64(),
                total.saturating_sub(elapsed),
            )
        });
        if opts.time_based {
            let (f, eta) = by_time.unwrap_or((0.0, Duration::ZERO));
            return ((f * 100.0).min(100.0), Some(eta));
        }
        let want = opts.size.saturating_mul(u64::from(opts.numjobs)).max(1);
        let f_size = bytes as f64 / want as f64;
        let eta_size = (f_size > 0.0).then(|| elapsed.mul_f64(((1.0 - f_size) / f_size).max(0.0)));
        match by_time {
            Some((f, eta)) if f > f_size => ((f * 100.0).min(99.9), Some(eta)),
            _ => ((f_size * 100.0).min(99.9), eta_size),
        }
    }

    /// Clears the line before the report.
    pub fn finish(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}
