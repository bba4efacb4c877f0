//! The report: fio's human-readable layout (`--output-format=normal`) and fio's JSON layout
//! (`--output-format=json`), built from the jobs' results.
//!
//! JSON field names, units and percentile keys are fio's, so that tools written for fio's JSON
//! read this one. Where strata has something fio does not (the IoThread's own CPU, a verify
//! pass, the drains of `--drain-every`), it adds fields with new names and never changes fio's.
//!
//! CPU figures are whole-process (`RUSAGE_SELF`, which counts io_uring's kernel workers), over
//! the measured period, as fio counts them; each job adds its IoThread's own usage
//! (`RUSAGE_THREAD`, taken on that thread).

use std::ffi::CStr;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::drain::DrainReport;
use super::job::{DirStats, JobResult, Rusage, READ, WRITE};
use super::options::{DriverKind, Options};

/// The percentiles fio reports by default, in percent.
pub const PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// Everything the report needs besides the job results.
pub struct RunInfo<'a> {
    /// The run's options.
    pub opts: &'a Options,
    /// The command line.
    pub argv: &'a [String],
    /// What the jobs ran against (a path, or `null-co`).
    pub target: &'a str,
    /// The image: its format and, for a chain, its depth (`qcow2`, `qcow2, backing chain of
    /// 3 images`); empty for null runs.
    pub image: &'a str,
    /// The format of the top image (`raw`, `qcow2`); empty for null runs.
    pub image_format: &'a str,
    /// The jobs' results, by job number.
    pub results: &'a [JobResult],
    /// What the drainer measured, with `--drain-every`.
    pub drain: Option<&'a DrainReport>,
}

// ---- number formatting, after fio's num2str ----

/// `v` in at most four significant digits with a unit from `units` (each `base` times the
/// previous): `8543`, `28.2k`, `145k`, `9.77GiB`.
fn num4(v: f64, base: f64, units: &[&str]) -> String {
    let mut v = if v.is_finite() { v.max(0.0) } else { 0.0 };
    let mut i = 0;
    while v >= 9999.5 && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    let digits = if i == 0 || v >= 99.95 {
        0
    } else if v >= 9.995 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{}", units[i])
}

/// A count or rate: `8543`, `28.2k`, `1.23M`.
pub fn fmt_count(v: f64) -> String {
    num4(v, 1000.0, &["", "k", "M", "G", "T"])
}

/// Bytes in powers of 1024.
pub fn fmt_size_iec(v: f64) -> String {
    num4(v, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB", "PiB"])
}

/// Bytes in powers of 1000.
pub fn fmt_size_si(v: f64) -> String {
    num4(v, 1000.0, &["B", "kB", "MB", "GB", "TB", "PB"])
}

/// Bandwidth in powers of 1024.
pub fn fmt_bw_iec(v: f64) -> String {
    format!("{}/s", fmt_size_iec(v))
}

/// Bandwidth in powers of 1000.
pub fn fmt_bw_si(v: f64) -> String {
    format!("{}/s", fmt_size_si(v))
}

fn pct(part: Duration, whole: Duration) -> f64 {
    if whole.is_zero() {
        0.0
    } else {
        part.as_secs_f64() / whole.as_secs_f64() * 100.0
    }
}

// ---- the machine ----

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: an all-zero utsname is a valid out-parameter.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills `u`.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates its fields.
    let release = unsafe { CStr::from_ptr(u.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

/// `nproc`: CPUs this process may run on.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Local time in ctime's layout (`Thu Mar  7 10:43:14 2024`), as fio prints it.
fn ctime(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: an all-zero tm is a valid out-parameter.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `secs` and fills `tm`.
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return String::new();
    }
    let mut buf = [0u8; 64];
    let fmt = c"%a %b %e %H:%M:%S %Y";
    // SAFETY: strftime writes at most `buf.len()` bytes into `buf` and returns how many.
    let n = unsafe { libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm) };
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

// ---- CPU over the whole run ----

/// Process CPU over the measured period of all jobs: from the earliest job's start of
/// measurement to the latest job's end of workload.
struct ProcessCpu {
    wall: Duration,
    usage: Rusage,
}

fn process_cpu(results: &[JobResult]) -> ProcessCpu {
    let first = results
        .iter()
        .filter_map(|r| r.measure)
        .min_by_key(|m| m.at);
    let last = results
        .iter()
        .filter(|r| r.measure.is_some())
        .map(|r| r.end)
        .max_by_key(|m| m.at);
    match (first, last) {
        (Some(a), Some(b)) => ProcessCpu {
            wall: b.at.saturating_duration_since(a.at),
            usage: b.process.since(&a.process),
        },
        _ => ProcessCpu {
            wall: Duration::ZERO,
            usage: Rusage::default(),
        },
    }
}

// ---- per-direction figures ----

struct Dir<'a> {
    s: &'a DirStats,
    runtime: Duration,
}

impl Dir<'_> {
    fn iops(&self) -> f64 {
        per_sec(self.s.ios, self.runtime)
    }
    fn bw(&self) -> f64 {
        per_sec(self.s.bytes, self.runtime)
    }
}

/// The default percentiles of `st`'s histogram: (percent, ns).
fn percentiles(st: &DirStats) -> Vec<(f64, u64)> {
    PERCENTILES
        .iter()
        .map(|&p| (p, st.hist.value_at_quantile(p / 100.0)))
        .collect()
}

fn per_sec(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

// ---- normal output ----

/// The lines printed before the jobs start.
pub fn header(info: &RunInfo<'_>) -> String {
    let o = info.opts;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "strata-{}: {}",
        env!("CARGO_PKG_VERSION"),
        info.argv.join(" ")
    );
    let _ = writeln!(s, "machine: Linux {}, nproc={}", kernel_release(), nproc());
    let target = match (o.driver, o.scratch()) {
        (DriverKind::Null, _) => "null-co (no I/O)".to_string(),
        (DriverKind::File, true) => format!(
            "{} ({} scratch file of {}, removed at exit)",
            info.target,
            info.image,
            fmt_size_iec(o.extent() as f64)
        ),
        (DriverKind::File, false) => format!("{} ({})", info.target, info.image),
    };
    let _ = writeln!(s, "target: {target}");
    let bs = format!("{}B-{}B", o.bs, o.bs);
    let _ = writeln!(
        s,
        "{}: (g=0): rw={}, bs=(R) {bs}, (W) {bs}, (T) {bs}, ioengine={}, iodepth={}",
        o.name,
        o.rw.name(),
        driver_name(o),
        o.iodepth
    );
    let n = o.numjobs;
    let _ = writeln!(
        s,
        "Starting {n} job{} on {n} IoThread{}\n",
        if n == 1 { "" } else { "s" },
        if n == 1 { "" } else { "s" }
    );
    s
}

fn driver_name(o: &Options) -> &'static str {
    match o.driver {
        DriverKind::File => "file",
        DriverKind::Null => "null",
    }
}

/// fio's choice of latency unit: (name, divisor).
fn lat_unit(min: u64, max: u64) -> (&'static str, f64) {
    if min > 2_000_000 && max > 99_999_999 {
        ("msec", 1e6)
    } else if min > 2000 && max > 99_999 {
        ("usec", 1e3)
    } else {
        ("nsec", 1.0)
    }
}

fn write_dir(s: &mut String, label: &str, d: &Dir<'_>) {
    let st = d.s;
    let _ = writeln!(
        s,
        "  {label}: IOPS={}, BW={} ({})({}/{}msec)",
        fmt_count(d.iops()),
        fmt_bw_iec(d.bw()),
        fmt_bw_si(d.bw()),
        fmt_size_iec(st.bytes as f64),
        d.runtime.as_millis()
    );
    write_lat(s, "clat", st);
}

/// The latency lines of `st` as fio prints them: `    {name} (unit): min=...` and the
/// `    {name} percentiles (unit):` table.
fn write_lat(s: &mut String, name: &str, st: &DirStats) {
    let (unit, div) = lat_unit(st.min_ns(), st.max);
    let _ = writeln!(
        s,
        "    {name} ({unit}): min={}, max={}, avg={:.2}, stdev={:.2}",
        (st.min_ns() as f64 / div) as u64,
        (st.max as f64 / div) as u64,
        st.mean() / div,
        st.stddev() / div
    );
    let ps = percentiles(st);
    let lo = ps.first().map_or(0, |p| p.1);
    let hi = ps.last().map_or(0, |p| p.1);
    let (unit, div) = lat_unit(lo, hi);
    let vals: Vec<u64> = ps
        .iter()
        .map(|&(_, v)| (v as f64 / div).round() as u64)
        .collect();
    let width = vals
        .iter()
        .map(|v| v.to_string().len())
        .max()
        .unwrap_or(1)
        .max(5);
    let _ = writeln!(s, "    {name} percentiles ({unit}):");
    for (row, chunk) in ps.chunks(4).enumerate() {
        s.push_str("     |");
        for (i, &(p, _)) in chunk.iter().enumerate() {
            let k = row * 4 + i;
            let sep = if k + 1 == ps.len() { "" } else { "," };
            let _ = write!(s, " {p:5.2}th=[{:>width$}]{sep}", vals[k]);
        }
        s.push('\n');
    }
}

/// The report in fio's human-readable layout.
pub fn normal(info: &RunInfo<'_>) -> String {
    let o = info.opts;
    let cpu = process_cpu(info.results);
    let pid = std::process::id();
    let now = ctime(SystemTime::now());
    let mut s = String::new();
    for r in info.results {
        let runtime = r.runtime();
        let err = match &r.error {
            None => " 0".to_string(),
            Some(e) => format!("{} ({})", e.errno, e.message),
        };
        let _ = writeln!(
            s,
            "{}: (groupid=0, jobs=1): err={err}: pid={pid}: {now}",
            o.name
        );
        for (dir, label) in [(READ, "read"), (WRITE, "write")] {
            if r.dirs[dir].ios > 0 {
                write_dir(
                    &mut s,
                    label,
                    &Dir {
                        s: &r.dirs[dir],
                        runtime,
                    },
                );
            }
        }
        if let Some(v) = &r.verify {
            match v.pass {
                Some(d) => {
                    let _ = writeln!(
                        s,
                        "  verify: {} blocks ({}) read back and checked in {}msec",
                        v.blocks,
                        fmt_size_iec(v.bytes as f64),
                        d.as_millis()
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "  verify: {} reads ({}) of written blocks checked",
                        v.blocks,
                        fmt_size_iec(v.bytes as f64)
                    );
                }
            }
        }
        let u = &cpu.usage;
        let _ = writeln!(
            s,
            "  cpu          : usr={:.2}%, sys={:.2}%, ctx={}, majf={}, minf={}",
            pct(u.user, cpu.wall),
            pct(u.sys, cpu.wall),
            u.ctx,
            u.majflt,
            u.minflt
        );
        let t = r.thread_cpu();
        let _ = writeln!(
            s,
            "  iothread {}: usr={:.2}%, sys={:.2}%, ctx={}",
            r.thread_name,
            pct(t.user, runtime),
            pct(t.sys, runtime),
            t.ctx
        );
        s.push('\n');
    }
    if let Some(d) = info.drain {
        let _ = writeln!(
            s,
            "  drain: every={}ms, count={}",
            d.every_ms(),
            d.stats.ios
        );
        if d.stats.ios > 0 {
            write_lat(&mut s, "drain", &d.stats);
        }
        s.push('\n');
    }
    let _ = writeln!(s, "Run status group 0 (all jobs):");
    for (dir, label) in [(READ, "READ"), (WRITE, "WRITE")] {
        let rs: Vec<&JobResult> = info
            .results
            .iter()
            .filter(|r| r.dirs[dir].ios > 0)
            .collect();
        if rs.is_empty() {
            continue;
        }
        let bytes: u64 = rs.iter().map(|r| r.dirs[dir].bytes).sum();
        let ios: u64 = rs.iter().map(|r| r.dirs[dir].ios).sum();
        let run_max = rs.iter().map(|r| r.runtime()).max().unwrap_or_default();
        let run_min = rs.iter().map(|r| r.runtime()).min().unwrap_or_default();
        let bws: Vec<f64> = rs
            .iter()
            .map(|r| per_sec(r.dirs[dir].bytes, r.runtime()))
            .collect();
        let bw_min = bws.iter().copied().fold(f64::INFINITY, f64::min);
        let bw_max = bws.iter().copied().fold(0.0, f64::max);
        let bw = per_sec(bytes, run_max);
        let _ = writeln!(
            s,
            "{label:>7}: bw={} ({}), {}-{} ({}-{}), iops={}, io={} ({}), run={}-{}msec",
            fmt_bw_iec(bw),
            fmt_bw_si(bw),
            fmt_bw_iec(bw_min),
            fmt_bw_iec(bw_max),
            fmt_bw_si(bw_min),
            fmt_bw_si(bw_max),
            fmt_count(per_sec(ios, run_max)),
            fmt_size_iec(bytes as f64),
            fmt_size_si(bytes as f64),
            run_min.as_millis(),
            run_max.as_millis()
        );
    }
    s
}

// ---- JSON output ----

/// A JSON object whose keys keep their order.
#[derive(Clone)]
struct Ordered<V>(Vec<(String, V)>);

impl<V: Serialize> Serialize for Ordered<V> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct JsonRoot {
    #[serde(rename = "fio version")]
    fio_version: String,
    timestamp: u64,
    timestamp_ms: u64,
    time: String,
    #[serde(rename = "global options")]
    global_options: Ordered<String>,
    jobs: Vec<JsonJob>,
    /// strata's own, with `--drain-every`: the drains' figures (also in every job).
    #[serde(skip_serializing_if = "Option::is_none")]
    drain: Option<JsonDrain>,
    /// strata's own: the command line and the machine.
    strata: JsonMachine,
}

#[derive(Serialize)]
struct JsonMachine {
    command_line: String,
    kernel: String,
    nproc: usize,
    target: String,
    /// The image's format (and chain depth); absent for null runs.
    #[serde(skip_serializing_if = "String::is_empty")]
    image: String,
}

#[derive(Serialize)]
struct JsonJob {
    jobname: String,
    groupid: u32,
    error: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<String>,
    /// Seconds from the job's start (ramp included) to its end.
    elapsed: u64,
    /// Milliseconds measured.
    job_runtime: u64,
    #[serde(rename = "job options")]
    job_options: Ordered<String>,
    read: JsonDir,
    write: JsonDir,
    trim: JsonDir,
    sync: JsonSync,
    usr_cpu: f64,
    sys_cpu: f64,
    ctx: u64,
    majf: u64,
    minf: u64,
    iothread: JsonIoThread,
    #[serde(skip_serializing_if = "Option::is_none")]
    verify: Option<JsonVerify>,
    /// strata's own, with `--drain-every`: the run's drains (the same object as the
    /// top-level `drain`; the drains cover every job's node at once).
    #[serde(skip_serializing_if = "Option::is_none")]
    drain: Option<JsonDrain>,
}

#[derive(Serialize, Clone)]
struct JsonDrain {
    every_ms: u64,
    /// Measured drains (those that began after the ramp).
    count: u64,
    /// Time from drained_begin to quiesced, in the layout of `clat_ns`.
    drain_ns: JsonLat,
}

#[derive(Serialize)]
struct JsonIoThread {
    name: String,
    usr_cpu: f64,
    sys_cpu: f64,
    ctx: u64,
}

#[derive(Serialize)]
struct JsonVerify {
    /// Blocks read back and checked.
    total_ios: u64,
    io_bytes: u64,
    /// Milliseconds of the read-back pass after a write-only workload (0 when reads were
    /// checked inline).
    runtime: u64,
}

#[derive(Serialize, Default)]
struct JsonDir {
    io_bytes: u64,
    io_kbytes: u64,
    bw_bytes: u64,
    bw: u64,
    iops: f64,
    runtime: u64,
    total_ios: u64,
    short_ios: u64,
    drop_ios: u64,
    slat_ns: JsonLat,
    clat_ns: JsonLat,
    lat_ns: JsonLat,
}

#[derive(Serialize, Default, Clone)]
struct JsonLat {
    min: u64,
    max: u64,
    mean: f64,
    stddev: f64,
    #[serde(rename = "N")]
    n: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    percentile: Option<Ordered<u64>>,
}

#[derive(Serialize, Default)]
struct JsonSync {
    total_ios: u64,
    lat_ns: JsonLat,
}

/// `st` as fio's latency object (percentiles only when there are samples).
fn json_lat(st: &DirStats) -> JsonLat {
    let percentile = (st.ios > 0).then(|| {
        Ordered(
            percentiles(st)
                .into_iter()
                .map(|(p, v)| (format!("{p:.6}"), v))
                .collect(),
        )
    });
    JsonLat {
        min: st.min_ns(),
        max: st.max,
        mean: st.mean(),
        stddev: st.stddev(),
        n: st.ios,
        percentile,
    }
}

fn json_drain(d: &DrainReport) -> JsonDrain {
    JsonDrain {
        every_ms: d.every_ms(),
        count: d.stats.ios,
        drain_ns: json_lat(&d.stats),
    }
}

fn json_dir(d: &Dir<'_>) -> JsonDir {
    let st = d.s;
    let bw = d.bw();
    let clat = json_lat(st);
    JsonDir {
        io_bytes: st.bytes,
        io_kbytes: st.bytes / 1024,
        bw_bytes: bw.round() as u64,
        bw: (bw / 1024.0).round() as u64,
        iops: d.iops(),
        // fio reports no runtime for a direction that did no I/O.
        runtime: if st.ios == 0 {
            0
        } else {
            d.runtime.as_millis() as u64
        },
        total_ios: st.ios,
        short_ios: 0,
        drop_ios: 0,
        slat_ns: JsonLat::default(),
        lat_ns: clat.clone(),
        clat_ns: clat,
    }
}

fn secs(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}", ms / 1000)
    } else {
        format!("{}ms", ms)
    }
}

/// The options job `i` ran with, resolved, as fio names them.
fn job_options(info: &RunInfo<'_>, i: u32) -> Ordered<String> {
    let o = info.opts;
    let b = |v: bool| if v { "1" } else { "0" }.to_string();
    let mut v: Vec<(String, String)> = vec![("name".into(), o.name.clone())];
    if o.driver == DriverKind::File {
        v.push(("filename".into(), info.target.to_string()));
    }
    v.push(("driver".into(), driver_name(o).into()));
    if o.driver == DriverKind::File {
        v.push(("format".into(), info.image_format.to_string()));
    }
    v.push(("rw".into(), o.rw.name().into()));
    if o.rw.is_mixed() {
        v.push(("rwmixread".into(), o.rwmixread.to_string()));
    }
    v.push(("bs".into(), o.bs.to_string()));
    v.push(("size".into(), o.size.to_string()));
    v.push(("offset".into(), o.region_start(i).to_string()));
    v.push(("iodepth".into(), o.iodepth.to_string()));
    v.push(("numjobs".into(), o.numjobs.to_string()));
    if let Some(r) = o.runtime {
        v.push(("runtime".into(), secs(r)));
    }
    v.push(("time_based".into(), b(o.time_based)));
    if !o.ramp_time.is_zero() {
        v.push(("ramp_time".into(), secs(o.ramp_time)));
    }
    if o.driver == DriverKind::File {
        v.push(("direct".into(), b(o.direct)));
        let aio = match o.aio {
            engine::drivers::file::Aio::Auto => "auto",
            engine::drivers::file::Aio::IoUring => "io_uring",
            engine::drivers::file::Aio::Inline => "inline",
        };
        v.push(("aio".into(), aio.into()));
    }
    if o.verify {
        v.push(("verify".into(), "crc32c".into()));
    }
    v.push(("registerfiles".into(), b(o.registerfiles)));
    v.push(("fixedbufs".into(), b(o.fixedbufs)));
    v.push(("sqthread_poll".into(), b(o.sqthread_poll)));
    if let Some(every) = o.drain_every {
        v.push(("drain_every".into(), every.as_millis().to_string()));
    }
    Ordered(v)
}

/// The report in fio's JSON layout.
pub fn json(info: &RunInfo<'_>) -> String {
    let o = info.opts;
    let cpu = process_cpu(info.results);
    let now = SystemTime::now();
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let drain = info.drain.map(json_drain);
    let jobs = info
        .results
        .iter()
        .map(|r| {
            let runtime = r.runtime();
            let t = r.thread_cpu();
            let dir = |d: usize| {
                json_dir(&Dir {
                    s: &r.dirs[d],
                    runtime,
                })
            };
            JsonJob {
                jobname: o.name.clone(),
                groupid: 0,
                error: r.error.as_ref().map_or(0, |e| e.errno),
                error_message: r.error.as_ref().map(|e| e.message.clone()),
                elapsed: r
                    .end
                    .at
                    .saturating_duration_since(r.start)
                    .as_secs_f64()
                    .round() as u64,
                job_runtime: runtime.as_millis() as u64,
                job_options: job_options(info, r.index),
                read: dir(READ),
                write: dir(WRITE),
                trim: JsonDir::default(),
                sync: JsonSync::default(),
                usr_cpu: pct(cpu.usage.user, cpu.wall),
                sys_cpu: pct(cpu.usage.sys, cpu.wall),
                ctx: cpu.usage.ctx,
                majf: cpu.usage.majflt,
                minf: cpu.usage.minflt,
                iothread: JsonIoThread {
                    name: r.thread_name.clone(),
                    usr_cpu: pct(t.user, runtime),
                    sys_cpu: pct(t.sys, runtime),
                    ctx: t.ctx,
                },
                verify: r.verify.as_ref().map(|v| JsonVerify {
                    total_ios: v.blocks,
                    io_bytes: v.bytes,
                    runtime: v.pass.map_or(0, |d| d.as_millis() as u64),
                }),
                drain: drain.clone(),
            }
        })
        .collect();
    let root = JsonRoot {
        fio_version: format!("strata-{}", env!("CARGO_PKG_VERSION")),
        timestamp: since_epoch.as_secs(),
        timestamp_ms: since_epoch.as_millis() as u64,
        time: ctime(now),
        global_options: Ordered(
            o.given
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ),
        jobs,
        drain,
        strata: JsonMachine {
            command_line: info.argv.join(" "),
            kernel: kernel_release(),
            nproc: nproc(),
            target: info.target.to_string(),
            image: info.image.to_string(),
        },
    };
    let mut s =
        serde_json::to_string_pretty(&root).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_like_fio() {
        assert_eq!(fmt_count(8543.0), "8543");
        assert_eq!(fmt_count(28234.0), "28.2k");
        assert_eq!(fmt_count(145_000.0), "145k");
        assert_eq!(fmt_count(512_000.0), "512k");
        assert_eq!(fmt_size_iec(10.0 * 1024.0 * 1024.0 * 1000.0), "9.77GiB");
        assert_eq!(fmt_bw_iec(2000.0 * 1024.0 * 1024.0), "2000MiB/s");
        assert_eq!(fmt_bw_si(2000.0 * 1024.0 * 1024.0), "2097MB/s");
        assert_eq!(fmt_size_iec(512.0), "512B");
    }

    #[test]
    fn percentile_keys_like_fio() {
        assert_eq!(format!("{:.6}", 99.0), "99.000000");
        assert_eq!(format!("{:.6}", 99.99), "99.990000");
        assert_eq!(format!("{:.6}", 1.0), "1.000000");
    }
}
