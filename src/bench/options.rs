//! `strata bench` options: the command line, spelled as fio spells it, and its validation into
//! the [`Options`] a run uses.
//!
//! Every option arrives as a string and is parsed here rather than by clap, so that each bad
//! value gets one line naming the option and what is wrong with it. Values follow fio: sizes
//! take k/m/g/t/p suffixes (all powers of 1024, also `KiB`, `MiB`, ...), times take
//! us/ms/s/m/h suffixes (seconds without one), booleans are 0/1.
//!
//! Without `--filename` the run uses the quick-start profile (a scratch file, or one null node
//! per job): rw=randrw, rwmixread=70, iodepth=32, size=256m, runtime=5s, time_based. Options
//! given on the command line override their part of it; with `--filename` fio's own defaults
//! apply (rw=read, iodepth=1, one pass over the file).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use engine::drivers::file::Aio;
use engine::image::Format;

/// The command line of `strata bench`.
#[derive(Debug, Default, Args)]
pub struct BenchArgs {
    /// File or block device to run against [default: a scratch file in $TMPDIR, removed at exit]
    #[arg(long, value_name = "PATH")]
    pub filename: Option<String>,
    /// Bytes per job region (k/m/g/t suffixes, powers of 1024) [default: the file's size]
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Where the first job's region starts [default: 0]
    #[arg(long, value_name = "SIZE")]
    pub offset: Option<String>,
    /// Job i's region starts at offset + i * offset_increment [default: 0]
    #[arg(
        long = "offset_increment",
        alias = "offset-increment",
        value_name = "SIZE"
    )]
    pub offset_increment: Option<String>,
    /// read, write, randread, randwrite, rw (readwrite), randrw [default: read]
    #[arg(long, alias = "readwrite", value_name = "PATTERN")]
    pub rw: Option<String>,
    /// Percentage of requests that read in a mixed workload [default: 50]
    #[arg(long, value_name = "PERCENT")]
    pub rwmixread: Option<String>,
    /// Block size of every request [default: 4k]
    #[arg(long, value_name = "SIZE")]
    pub bs: Option<String>,
    /// Requests in flight per job [default: 1]
    #[arg(long, value_name = "N")]
    pub iodepth: Option<String>,
    /// Jobs, each on its own IoThread [default: 1]
    #[arg(long, value_name = "N")]
    pub numjobs: Option<String>,
    /// Stop after this long (seconds; s/m/h suffixes)
    #[arg(long, value_name = "TIME")]
    pub runtime: Option<String>,
    /// Run for --runtime, wrapping around the region, instead of one pass
    #[arg(
        long = "time_based",
        alias = "time-based",
        value_name = "0|1",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "1"
    )]
    pub time_based: Option<String>,
    /// Use O_DIRECT (0/1) [default: 0]
    #[arg(long, value_name = "0|1")]
    pub direct: Option<String>,
    /// Run this long before the statistics start
    #[arg(long = "ramp_time", alias = "ramp-time", value_name = "TIME")]
    pub ramp_time: Option<String>,
    /// normal or json [default: normal]
    #[arg(long = "output-format", value_name = "FORMAT")]
    pub output_format: Option<String>,
    /// crc32c: write checkable blocks and check every read of them
    #[arg(long, value_name = "METHOD")]
    pub verify: Option<String>,
    /// Job name [default: job]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// file or null (fio's ioengine) [default: file]
    #[arg(long, value_name = "DRIVER")]
    pub driver: Option<String>,
    /// Image format of --filename: raw or qcow2 (a qcow2 image runs with its backing chain)
    /// [default: probed]
    #[arg(long = "format", value_name = "FMT")]
    pub image_format: Option<String>,
    /// Register the file in each IoThread's ring (0/1) [default: 0]
    #[arg(long, value_name = "0|1")]
    pub registerfiles: Option<String>,
    /// Register iodepth buffers of bs bytes with each ring (0/1) [default: 0]
    #[arg(long, value_name = "0|1")]
    pub fixedbufs: Option<String>,
    /// Use a kernel SQ polling thread per ring (0/1) [default: 0]
    #[arg(long = "sqthread_poll", alias = "sqthread-poll", value_name = "0|1")]
    pub sqthread_poll: Option<String>,
    /// How file requests reach the kernel: auto, io_uring, inline [default: auto]
    #[arg(long, value_name = "MODE")]
    pub aio: Option<String>,
    /// CPUs the IoThreads (and their rings' kernel workers) may run on, as fio's
    /// cpus_allowed: a list like 0,2-3 [default: any]
    #[arg(long = "cpus_allowed", alias = "cpus-allowed", value_name = "LIST")]
    pub cpus_allowed: Option<String>,
    /// strata's own: drain the target node(s) every MS milliseconds while the load runs, and
    /// report how long each drain took to quiesce [default: no drains]
    #[arg(long = "drain-every", alias = "drain_every", value_name = "MS")]
    pub drain_every: Option<String>,
}

impl BenchArgs {
    /// The options given on the command line, by fio name, in a fixed order.
    pub fn given(&self) -> Vec<(&'static str, String)> {
        let all: [(&'static str, &Option<String>); 24] = [
            ("name", &self.name),
            ("filename", &self.filename),
            ("driver", &self.driver),
            ("format", &self.image_format),
            ("rw", &self.rw),
            ("rwmixread", &self.rwmixread),
            ("bs", &self.bs),
            ("size", &self.size),
            ("offset", &self.offset),
            ("offset_increment", &self.offset_increment),
            ("iodepth", &self.iodepth),
            ("numjobs", &self.numjobs),
            ("runtime", &self.runtime),
            ("time_based", &self.time_based),
            ("ramp_time", &self.ramp_time),
            ("direct", &self.direct),
            ("verify", &self.verify),
            ("registerfiles", &self.registerfiles),
            ("fixedbufs", &self.fixedbufs),
            ("sqthread_poll", &self.sqthread_poll),
            ("aio", &self.aio),
            ("cpus_allowed", &self.cpus_allowed),
            ("drain_every", &self.drain_every),
            ("output-format", &self.output_format),
        ];
        all.into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
            .collect()
    }
}

/// The I/O pattern (fio's `rw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential mixed reads and writes.
    Rw,
    /// Random mixed reads and writes.
    RandRw,
}

const PATTERNS: &str = "read, write, randread, randwrite, rw, readwrite, randrw";

impl Pattern {
    fn parse(s: &str) -> Option<Pattern> {
        Some(match s {
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "rw" | "readwrite" => Pattern::Rw,
            "randrw" => Pattern::RandRw,
            _ => return None,
        })
    }

    /// The name fio prints.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Rw => "rw",
            Pattern::RandRw => "randrw",
        }
    }

    /// Whether offsets are random (else one sequential cursor per job).
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw
        )
    }

    /// Whether the pattern only reads.
    pub fn is_read_only(self) -> bool {
        matches!(self, Pattern::Read | Pattern::RandRead)
    }

    /// Whether the pattern only writes.
    pub fn is_write_only(self) -> bool {
        matches!(self, Pattern::Write | Pattern::RandWrite)
    }

    /// Whether both directions are used.
    pub fn is_mixed(self) -> bool {
        matches!(self, Pattern::Rw | Pattern::RandRw)
    }

    /// fio's one-letter run state for the progress line.
    pub fn letter(self) -> char {
        match self {
            Pattern::Read => 'R',
            Pattern::RandRead => 'r',
            Pattern::Write => 'W',
            Pattern::RandWrite => 'w',
            Pattern::Rw => 'M',
            Pattern::RandRw => 'm',
        }
    }
}

/// Which driver serves the jobs (fio's ioengine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// The `file` protocol driver.
    File,
    /// `null-co`: no I/O.
    Null,
}

/// How the report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// fio's human-readable layout.
    Normal,
    /// fio's JSON layout.
    Json,
}

/// The quick-start profile used without `--filename`.
pub const QUICK_SIZE: u64 = 256 << 20;
const QUICK_RW: Pattern = Pattern::RandRw;
const QUICK_RWMIXREAD: u32 = 70;
const QUICK_IODEPTH: u32 = 32;
const QUICK_RUNTIME: Duration = Duration::from_secs(5);

/// The longest `--drain-every` period, in milliseconds (one hour).
pub const DRAIN_EVERY_MAX_MS: u32 = 3_600_000;

/// The smallest block that holds a verify header and some payload.
pub const VERIFY_MIN_BS: u64 = 64;

/// A validated run configuration.
#[derive(Debug, Clone)]
pub struct Options {
    /// The file to use; `None` with the file driver means a scratch file.
    pub filename: Option<PathBuf>,
    /// The driver.
    pub driver: DriverKind,
    /// The image format of `filename` (None: probed); the scratch file is raw.
    pub image_format: Option<Format>,
    /// Bytes per job region (0 until resolved when `size_from_file`).
    pub size: u64,
    /// Whether `size` is still to be taken from the file's length.
    pub size_from_file: bool,
    /// Start of job 0's region.
    pub offset: u64,
    /// Distance between the starts of consecutive jobs' regions.
    pub offset_increment: u64,
    /// The I/O pattern.
    pub rw: Pattern,
    /// Percentage of reads (100 for read-only patterns, 0 for write-only ones).
    pub rwmixread: u32,
    /// Bytes per request.
    pub bs: u64,
    /// Requests in flight per job.
    pub iodepth: u32,
    /// Jobs (IoThreads).
    pub numjobs: u32,
    /// Run time limit.
    pub runtime: Option<Duration>,
    /// Run for `runtime` regardless of size.
    pub time_based: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Warm-up before the statistics start.
    pub ramp_time: Duration,
    /// Report layout.
    pub format: OutputFormat,
    /// crc32c verification.
    pub verify: bool,
    /// Job name.
    pub name: String,
    /// Register the file with each ring.
    pub registerfiles: bool,
    /// Register buffers with each ring.
    pub fixedbufs: bool,
    /// SQ polling thread per ring.
    pub sqthread_poll: bool,
    /// File I/O mode.
    pub aio: Aio,
    /// With `--cpus_allowed`: the CPUs of the IoThreads and their kernel workers.
    pub cpus_allowed: Option<Vec<usize>>,
    /// With `--drain-every`: the period of the drainer.
    pub drain_every: Option<Duration>,
    /// The options as given, for the JSON report.
    pub given: Vec<(&'static str, String)>,
}

impl Options {
    /// Start of job `i`'s region.
    pub fn region_start(&self, i: u32) -> u64 {
        self.offset + u64::from(i) * self.offset_increment
    }

    /// End of the last job's region: how long the target must be.
    pub fn extent(&self) -> u64 {
        self.region_start(self.numjobs - 1) + self.size
    }

    /// Whether the run uses a scratch file.
    pub fn scratch(&self) -> bool {
        self.driver == DriverKind::File && self.filename.is_none()
    }

    /// Takes the region size from the target's length (`--size` not given): what is left
    /// after the last job's start, rounded down to whole blocks.
    pub fn size_from_len(&mut self, len: u64, what: &str) -> Result<(), String> {
        let last = self.region_start(self.numjobs - 1);
        if last >= len {
            return Err(if self.numjobs > 1 {
                format!("the last job's region would start at {last}, at or beyond the end of {what} ({len} bytes)")
            } else {
                format!("--offset={last} is at or beyond the end of {what} ({len} bytes)")
            });
        }
        let size = (len - last) / self.bs * self.bs;
        if size == 0 {
            return Err(format!(
                "{what} has {} bytes after offset {last}, less than one block (--bs={})",
                len - last,
                self.bs
            ));
        }
        self.size = size;
        self.size_from_file = false;
        self.check_size()
    }

    /// Checks what depends on the region size (run again when it is taken from the file).
    pub fn check_size(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("--size=0: must be at least one block".into());
        }
        if !self.size.is_multiple_of(self.bs) {
            return Err(format!(
                "--size={} is not a multiple of --bs={}",
                self.size, self.bs
            ));
        }
        if self.verify && self.numjobs > 1 && self.offset_increment < self.size {
            return Err(format!(
                "--verify with --numjobs={} needs --offset_increment >= --size ({}), so that each job \
                 verifies its own region (got --offset_increment={})",
                self.numjobs, self.size, self.offset_increment
            ));
        }
        u64::from(self.numjobs - 1)
            .checked_mul(self.offset_increment)
            .and_then(|x| x.checked_add(self.offset))
            .and_then(|x| x.checked_add(self.size))
            .ok_or_else(|| {
                "--offset, --offset_increment and --size overflow 64 bits".to_string()
            })?;
        Ok(())
    }
}

/// Parses a size with fio's suffixes (all powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Parses a time: seconds by default, or with a us/ms/s/m/h/d suffix.
pub fn parse_time(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let unit = match suffix.to_ascii_lowercase().as_str() {
        "us" | "usec" => 1e-6,
        "ms" | "msec" => 1e-3,
        "" | "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(n * unit).ok()
}

fn parse_bool(opt: &str, s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("--{opt}={s}: expected 0 or 1")),
    }
}

fn size_opt(opt: &str, v: &Option<String>) -> Result<Option<u64>, String> {
    match v {
        None => Ok(None),
        Some(s) => parse_size(s).map(Some).ok_or_else(|| {
            format!(
                "--{opt}={s}: not a size (a number with an optional k, m, g or t suffix, e.g. 4k)"
            )
        }),
    }
}

fn time_opt(opt: &str, v: &Option<String>) -> Result<Option<Duration>, String> {
    match v {
        None => Ok(None),
        Some(s) => parse_time(s).map(Some).ok_or_else(|| {
            format!("--{opt}={s}: not a time (seconds, or a number with an s, m or h suffix)")
        }),
    }
}

fn count_opt(opt: &str, v: &Option<String>, min: u32, max: u32) -> Result<Option<u32>, String> {
    let Some(s) = v else { return Ok(None) };
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("--{opt}={s}: not a whole number"))?;
    if n < u64::from(min) {
        return Err(format!("--{opt}={s}: must be at least {min}"));
    }
    if n > u64::from(max) {
        return Err(format!("--{opt}={s}: must be at most {max}"));
    }
    Ok(Some(n as u32))
}

/// Parses fio's CPU list syntax (`0,2-3`): every CPU must be one this process may use.
pub fn cpu_list(list: &str, usable: Vec<usize>) -> Result<Vec<usize>, String> {
    let bad = |why: String| format!("--cpus_allowed={list}: {why}");
    let num = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| bad(format!("'{}' is not a CPU number", s.trim())))
    };
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let c = num(part)?;
                (c, c)
            }
        };
        if lo > hi {
            return Err(bad(format!("the range {lo}-{hi} is reversed")));
        }
        for c in lo..=hi {
            if !usable.contains(&c) {
                let have = usable
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                return Err(bad(format!(
                    "CPU {c} is not available (this process may use {have})"
                )));
            }
            if !cpus.contains(&c) {
                cpus.push(c);
            }
        }
    }
    Ok(cpus)
}

fn bool_opt(opt: &str, v: &Option<String>) -> Result<Option<bool>, String> {
    v.as_deref().map(|s| parse_bool(opt, s)).transpose()
}

/// Checks the command line and fills in defaults.
pub fn validate(args: &BenchArgs) -> Result<Options, String> {
    let given = args.given();
    let driver = match args.driver.as_deref() {
        None | Some("file") => DriverKind::File,
        Some("null") | Some("null-co") => DriverKind::Null,
        Some(d) => return Err(format!("--driver={d}: unknown driver (valid: file, null)")),
    };
    let filename = args.filename.as_ref().map(PathBuf::from);
    if driver == DriverKind::Null && filename.is_some() {
        return Err("--filename cannot be used with --driver=null (it does no I/O)".into());
    }
    if filename.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
        return Err("--filename is empty".into());
    }
    let quick = filename.is_none();
    let image_format = match args.image_format.as_deref() {
        None => None,
        Some(_) if driver == DriverKind::Null => {
            return Err("--format cannot be used with --driver=null (it has no image)".into())
        }
        Some(f) => {
            let fmt = Format::parse(f)
                .map_err(|_| format!("--format={f}: unknown image format (valid: raw, qcow2)"))?;
            if quick && fmt != Format::Raw {
                return Err(format!(
                    "--format={f} needs --filename (the scratch file is raw)"
                ));
            }
            Some(fmt)
        }
    };

    let rw = match args.rw.as_deref() {
        None => {
            if quick {
                QUICK_RW
            } else {
                Pattern::Read
            }
        }
        Some(s) => Pattern::parse(s.trim())
            .ok_or_else(|| format!("--rw={s}: unknown I/O pattern (valid: {PATTERNS})"))?,
    };
    let mix = count_opt("rwmixread", &args.rwmixread, 0, 100)?.unwrap_or(if quick {
        QUICK_RWMIXREAD
    } else {
        50
    });
    let rwmixread = match rw {
        p if p.is_read_only() => 100,
        p if p.is_write_only() => 0,
        _ => mix,
    };
    let bs = size_opt("bs", &args.bs)?.unwrap_or(4096);
    if bs == 0 {
        return Err("--bs=0: the block size must be at least 1 byte".into());
    }
    if bs > 1 << 30 {
        return Err(format!("--bs={bs}: at most 1 GiB per request"));
    }
    let iodepth = count_opt("iodepth", &args.iodepth, 1, 65535)?.unwrap_or(if quick {
        QUICK_IODEPTH
    } else {
        1
    });
    let max_jobs = iothreads::MAX_IOTHREADS as u32;
    let numjobs = match &args.numjobs {
        Some(s) => match s.trim().parse::<u64>() {
            Ok(0) => return Err(format!("--numjobs={s}: must be at least 1")),
            Ok(n) if n > u64::from(max_jobs) => {
                return Err(format!(
                    "--numjobs={s}: at most {max_jobs} jobs (each runs on its own IoThread, and a \
                     process has at most {max_jobs})"
                ))
            }
            Ok(n) => n as u32,
            Err(_) => return Err(format!("--numjobs={s}: not a whole number")),
        },
        None => 1,
    };
    let size = size_opt("size", &args.size)?;
    let offset = size_opt("offset", &args.offset)?.unwrap_or(0);
    let offset_increment = size_opt("offset_increment", &args.offset_increment)?.unwrap_or(0);
    let mut runtime = time_opt("runtime", &args.runtime)?;
    if runtime == Some(Duration::ZERO) {
        // fio: runtime=0 means no limit.
        runtime = None;
    }
    let time_based = bool_opt("time_based", &args.time_based)?.unwrap_or(quick);
    if quick && args.runtime.is_none() {
        runtime = Some(QUICK_RUNTIME);
    }
    if time_based && runtime.is_none() {
        return Err("--time_based needs a --runtime".into());
    }
    let ramp_time = time_opt("ramp_time", &args.ramp_time)?.unwrap_or(Duration::ZERO);
    let direct = bool_opt("direct", &args.direct)?.unwrap_or(false);
    let format = match args.output_format.as_deref() {
        None | Some("normal") => OutputFormat::Normal,
        Some("json") => OutputFormat::Json,
        Some(f) => {
            return Err(format!(
                "--output-format={f}: unknown format (valid: normal, json)"
            ))
        }
    };
    let verify = match args.verify.as_deref() {
        None | Some("0") | Some("none") => false,
        Some("crc32c") | Some("crc32c-intel") => true,
        Some(v) => {
            return Err(format!(
                "--verify={v}: unknown verify method (valid: crc32c)"
            ))
        }
    };
    if verify && bs < VERIFY_MIN_BS {
        return Err(format!(
            "--bs={bs}: --verify needs blocks of at least {VERIFY_MIN_BS} bytes (header and payload)"
        ));
    }
    let name = args.name.clone().unwrap_or_else(|| "job".into());
    if name.is_empty() {
        return Err("--name is empty".into());
    }
    let registerfiles = bool_opt("registerfiles", &args.registerfiles)?.unwrap_or(false);
    let fixedbufs = bool_opt("fixedbufs", &args.fixedbufs)?.unwrap_or(false);
    let sqthread_poll = bool_opt("sqthread_poll", &args.sqthread_poll)?.unwrap_or(false);
    let aio = match args.aio.as_deref() {
        None | Some("auto") => Aio::Auto,
        Some("io_uring") | Some("io-uring") => Aio::IoUring,
        Some("inline") => Aio::Inline,
        Some(a) => {
            return Err(format!(
                "--aio={a}: unknown mode (valid: auto, io_uring, inline)"
            ))
        }
    };
    let cpus_allowed = args
        .cpus_allowed
        .as_deref()
        .map(|l| cpu_list(l, iothreads::allowed_cpus()))
        .transpose()?;
    let drain_every = count_opt("drain-every", &args.drain_every, 1, DRAIN_EVERY_MAX_MS)?
        .map(|ms| Duration::from_millis(u64::from(ms)));

    let (size, size_from_file) = match size {
        Some(s) => (s, false),
        None if quick => (QUICK_SIZE, false),
        None => (0, true),
    };
    let opts = Options {
        filename,
        driver,
        image_format,
        size,
        size_from_file,
        offset,
        offset_increment,
        rw,
        rwmixread,
        bs,
        iodepth,
        numjobs,
        runtime,
        time_based,
        direct,
        ramp_time,
        format,
        verify,
        name,
        registerfiles,
        fixedbufs,
        sqthread_poll,
        aio,
        cpus_allowed,
        drain_every,
        given,
    };
    if !opts.size_from_file {
        opts.check_size()?;
    }
    if opts.verify && opts.driver == DriverKind::Null {
        return Err("--verify needs a driver that keeps data (--driver=file)".into());
    }
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_as_fio_writes_them() {
        let four = || vec![0, 1, 2, 3];
        assert_eq!(cpu_list("0", four()), Ok(vec![0]));
        assert_eq!(cpu_list("0,2-3", four()), Ok(vec![0, 2, 3]));
        assert_eq!(cpu_list("1-2,2", four()), Ok(vec![1, 2]));
        let e = cpu_list("4", four()).unwrap_err();
        assert_eq!(
            e,
            "--cpus_allowed=4: CPU 4 is not available (this process may use 0,1,2,3)"
        );
        assert!(cpu_list("3-1", four()).unwrap_err().contains("reversed"));
        assert!(cpu_list("a", four())
            .unwrap_err()
            .contains("'a' is not a CPU number"));
        assert!(cpu_list("", four()).is_err());
    }

    #[test]
    fn sizes_use_1024_powers() {
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("2MiB"), Some(2 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("1t"), Some(1 << 40));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("abc"), None);
        assert_eq!(parse_size("4x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999p"), None);
    }

    #[test]
    fn times_default_to_seconds() {
        assert_eq!(parse_time("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_time("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_time("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_time("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_time("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_time("x"), None);
    }

    fn args(list: &[(&str, &str)]) -> BenchArgs {
        let mut a = BenchArgs::default();
        for &(k, v) in list {
            let v = Some(v.to_string());
            match k {
                "filename" => a.filename = v,
                "size" => a.size = v,
                "bs" => a.bs = v,
                "rw" => a.rw = v,
                "iodepth" => a.iodepth = v,
                "numjobs" => a.numjobs = v,
                "verify" => a.verify = v,
                "driver" => a.driver = v,
                "format" => a.image_format = v,
                "runtime" => a.runtime = v,
                "time_based" => a.time_based = v,
                "offset_increment" => a.offset_increment = v,
                "drain_every" => a.drain_every = v,
                _ => panic!("{k}"),
            }
        }
        a
    }

    #[test]
    fn quick_profile_without_filename() {
        let o = validate(&BenchArgs::default()).unwrap();
        assert!(o.scratch());
        assert_eq!(o.rw, Pattern::RandRw);
        assert_eq!(o.rwmixread, 70);
        assert_eq!(o.iodepth, 32);
        assert_eq!(o.size, QUICK_SIZE);
        assert_eq!(o.runtime, Some(Duration::from_secs(5)));
        assert!(o.time_based);
        let o = validate(&args(&[("runtime", "1")])).unwrap();
        assert_eq!(o.runtime, Some(Duration::from_secs(1)));
        assert!(o.time_based);
    }

    #[test]
    fn fio_defaults_with_filename() {
        let o = validate(&args(&[("filename", "/x")])).unwrap();
        assert_eq!(o.rw, Pattern::Read);
        assert_eq!(o.iodepth, 1);
        assert!(o.size_from_file);
        assert!(!o.time_based);
        assert_eq!(o.runtime, None);
    }

    #[test]
    fn bad_values_name_the_option() {
        let e = |l: &[(&str, &str)]| validate(&args(l)).unwrap_err();
        assert!(e(&[("size", "5000")]).contains("not a multiple of --bs"));
        assert!(e(&[("iodepth", "0")]).contains("--iodepth=0"));
        assert!(e(&[("numjobs", "0")]).contains("--numjobs=0"));
        assert!(e(&[("numjobs", "65")]).contains("at most 64"));
        assert!(e(&[("rw", "sideways")]).contains("randrw"));
        assert!(e(&[("bs", "4q")]).contains("--bs=4q"));
        assert!(e(&[("verify", "crc32c"), ("bs", "32"), ("size", "1m")]).contains("64"));
        assert!(e(&[("verify", "crc32c"), ("driver", "null")]).contains("--driver=file"));
        assert!(e(&[("verify", "crc32c"), ("numjobs", "2"), ("size", "1m")])
            .contains("offset_increment"));
        assert!(e(&[("driver", "null"), ("filename", "/x")]).contains("--filename"));
        assert!(e(&[("filename", "/x"), ("time_based", "1")]).contains("--runtime"));
        assert!(e(&[("drain_every", "0")]).contains("--drain-every=0"));
        assert!(e(&[("drain_every", "1.5")]).contains("--drain-every=1.5"));
        assert!(e(&[("drain_every", "10ms")]).contains("not a whole number"));
        assert!(e(&[("format", "vmdk"), ("filename", "/x")]).contains("--format=vmdk"));
        assert!(e(&[("format", "qcow2")]).contains("needs --filename"));
        assert!(e(&[("format", "raw"), ("driver", "null")]).contains("--driver=null"));
        assert_eq!(
            validate(&args(&[("format", "qcow2"), ("filename", "/x")]))
                .unwrap()
                .image_format,
            Some(Format::Qcow2)
        );
        assert_eq!(
            validate(&args(&[("drain_every", "10")]))
                .unwrap()
                .drain_every,
            Some(Duration::from_millis(10))
        );
        assert!(validate(&args(&[
            ("verify", "crc32c"),
            ("numjobs", "2"),
            ("size", "1m"),
            ("offset_increment", "1m")
        ]))
        .is_ok());
    }
}
