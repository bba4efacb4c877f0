//! `strata bench`: a fio-like load harness over the engine.
//!
//! The entry point runs four steps: parse (clap, in `main.rs`), validate ([`options`]), run
//! (open the target, one IoThread and one backend per job, the load loop of [`job`] on each),
//! and report ([`report`]). The main thread only sets up, waits, draws the progress line
//! ([`progress`]) and prints; all I/O runs on the IoThreads.
//!
//! With the file driver the target is an image opened with [`engine::image::open`]: its format
//! given by `--format` or probed, a qcow2 image with its backing chain, and the jobs run on the
//! top format node (`raw` over `file` for a plain file). A qcow2 image is flushed on a job's
//! IoThread before the nodes go. Without `--filename` the run makes a raw scratch file in the
//! temporary directory and lays it out by writing it fully, so that reads hit real data. The
//! file is removed on every way out: normal ends and errors by a guard's `Drop`, Ctrl-C (or
//! SIGTERM) by a handler that only sets a stop flag (the jobs stop, the report is printed, the
//! guard runs), and a second Ctrl-C by the handler itself (unlink, then `_exit`).
//!
//! With `--drain-every` the run also starts a controller (on job 0's IoThread) and a drainer
//! thread ([`drain`]) that drains the target node(s) on that period while the jobs run.

pub mod drain;
pub mod job;
pub mod options;
pub mod progress;
pub mod report;
pub mod verify;

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use engine::backend::BackendOptions;
use engine::drivers::{file, null};
use engine::image::{self, Format, ImageOptions};
use engine::{Backend, Node};
use iothreads::{IoThread, IoThreadHandle, IoThreadOptions};

pub use options::BenchArgs;
use options::{DriverKind, Options, OutputFormat};
use progress::{Progress, Ticker};

/// Set by SIGINT/SIGTERM: every job stops at its next request.
pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

/// The scratch file's path as a C string, for the signal handler (null when there is none).
static SCRATCH_PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

/// Exit code after an interruption (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: i32 = 130;

/// Runs `strata bench`; returns the exit code.
pub fn main(args: BenchArgs, argv: Vec<String>) -> i32 {
    install_signal_handlers();
    let result = options::validate(&args).and_then(|opts| run(opts, &argv));
    match result {
        Ok(code) => code,
        Err(_) if STOP.load(Ordering::SeqCst) => {
            eprintln!("strata bench: interrupted");
            EXIT_INTERRUPTED
        }
        Err(msg) => {
            eprintln!("strata bench: error: {msg}");
            1
        }
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // A second signal: the run is not stopping fast enough for the user. Remove the
        // scratch file here (unlink and _exit are async-signal-safe) and leave.
        let p = SCRATCH_PATH.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` is a leaked, NUL-terminated CString that is never freed.
            unsafe { libc::unlink(p) };
        }
        // SAFETY: _exit ends the process at once; nothing runs after it.
        unsafe { libc::_exit(EXIT_INTERRUPTED) };
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is valid; the fields we need are set below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa` is a valid sigaction with an empty mask; the handler only touches
        // atomics and calls async-signal-safe functions.
        unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Runs `f` with SIGINT and SIGTERM blocked, so that threads it starts inherit the mask and
/// only the main thread takes those signals.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: all-zero sigsets are valid out-parameters.
    let (mut set, mut old): (libc::sigset_t, libc::sigset_t) = unsafe { std::mem::zeroed() };
    // SAFETY: the sets are valid; pthread_sigmask only changes this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
    }
    let r = f();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    r
}

/// The scratch file: removed when this guard drops.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(path: PathBuf) -> Scratch {
        if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
            // Leaked on purpose: the signal handler may read it at any time.
            SCRATCH_PATH.store(c.into_raw(), Ordering::SeqCst);
        }
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        SCRATCH_PATH.store(std::ptr::null_mut(), Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes the whole scratch file once, so that reads find real blocks.
fn lay_out(path: &Path, len: u64) -> Result<(), String> {
    let err =
        |e: std::io::Error| format!("cannot lay out the scratch file '{}': {e}", path.display());
    let f = OpenOptions::new().write(true).open(path).map_err(err)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut rng = verify::Rng::new(u64::from(std::process::id()));
    for c in chunk.chunks_exact_mut(8) {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let mut off = 0u64;
    while off < len {
        if STOP.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        let n = (len - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off).map_err(err)?;
        off += n as u64;
    }
    Ok(())
}

/// The O_DIRECT offset/length alignment of a file node (`FileDriver::alignment`; 1 without
/// O_DIRECT). Other drivers report theirs through the `Driver` trait.
fn direct_alignment(node: &Node) -> u64 {
    let a = match node.driver_as::<file::FileDriver>() {
        Some(d) => d.alignment().1 as u64,
        None => u64::from(node.driver().request_alignment()),
    };
    a.max(1)
}

/// What the jobs run against.
struct Target {
    /// One image's top node for all jobs, or one null node per job.
    nodes: Vec<Arc<Node>>,
    /// The path, or `null-co`.
    label: String,
    /// The top image's format (`raw`, `qcow2`); empty for null nodes.
    format: &'static str,
    /// The format and the chain's depth, for the report; empty for null nodes.
    image: String,
}

/// Opens the image at `path` on the IoThread `io` (formats read their headers there).
fn open_image(
    io: &IoThreadHandle,
    path: &Path,
    io_opts: ImageOptions,
) -> Result<Arc<Node>, String> {
    let p = path.to_path_buf();
    io.block_on(move || async move {
        image::open(&p, &io_opts)
            .await
            .map_err(|e| e.full_message())
    })
    .map_err(|e| e.to_string())?
}

fn open_target(
    opts: &mut Options,
    scratch: &mut Option<Scratch>,
    io: &IoThreadHandle,
) -> Result<Target, String> {
    if opts.driver == DriverKind::Null {
        let size = opts.extent();
        let nodes = (0..opts.numjobs)
            .map(|i| {
                null::open(
                    &format!("bench-null{i}"),
                    null::NullOptions {
                        size,
                        read_zeroes: false,
                        latency_ns: 0,
                    },
                )
                .map_err(|e| e.full_message())
            })
            .collect::<Result<_, _>>()?;
        return Ok(Target {
            nodes,
            label: "null-co".into(),
            format: "",
            image: String::new(),
        });
    }
    let path = match &opts.filename {
        Some(p) => p.clone(),
        None => {
            let p = std::env::temp_dir().join(format!("strata-bench-{}.img", std::process::id()));
            let guard = scratch.insert(Scratch::new(p.clone()));
            file::create_file(&guard.path, opts.extent()).map_err(|e| e.full_message())?;
            p
        }
    };
    let label = path.display().to_string();
    // The file of every image in the chain uses the IoThreads' registered file tables when
    // they have them, which they do with --registerfiles=1.
    let io_opts = ImageOptions {
        format: if scratch.is_some() {
            Some(Format::Raw)
        } else {
            opts.image_format
        },
        read_only: opts.rw.is_read_only(),
        direct: opts.direct,
        aio: opts.aio,
        ..ImageOptions::default()
    };
    let node = open_image(io, &path, io_opts)?;
    let format = node.driver_name();
    let depth = std::iter::successors(Some(Arc::clone(&node)), |n| n.backing()).count();
    let image = match depth {
        1 => format.to_string(),
        n => format!("{format}, backing chain of {n} images"),
    };
    let len = node.len();
    if opts.size_from_file {
        opts.size_from_len(len, &format!("'{label}'"))?;
    } else if opts.extent() > len {
        let last = opts.numjobs - 1;
        let start = opts.region_start(last);
        let which = if opts.numjobs > 1 {
            format!("job {last}'s region")
        } else {
            "the region".into()
        };
        let given = opts.given.iter().find(|(k, _)| *k == "size");
        let size = given.map_or_else(|| opts.size.to_string(), |(_, v)| v.clone());
        return Err(format!(
            "--size={size}: {which} [{start}, {}) extends beyond the end of '{label}' ({len} bytes)",
            start + opts.size
        ));
    }
    if opts.direct {
        // The alignment is the top image's file's (raw and qcow2 nodes pass requests of any
        // alignment down to it).
        let a = direct_alignment(&node.file().unwrap_or_else(|| Arc::clone(&node)));
        if !opts.bs.is_multiple_of(a) {
            let how = if opts.bs < a {
                "is below"
            } else {
                "is not a multiple of"
            };
            return Err(format!(
                "--bs={} {how} the O_DIRECT alignment of '{label}' ({a} bytes)",
                opts.bs
            ));
        }
        for (name, v) in [
            ("offset", opts.offset),
            ("offset_increment", opts.offset_increment),
        ] {
            if !v.is_multiple_of(a) {
                return Err(format!(
                    "--{name}={v} is not a multiple of the O_DIRECT alignment of '{label}' ({a} bytes)"
                ));
            }
        }
    }
    // Laid out only once every check has passed.
    if let Some(guard) = scratch {
        lay_out(&guard.path, opts.extent())?;
    }
    Ok(Target {
        nodes: vec![node],
        label,
        format,
        image,
    })
}

/// The backends of the jobs. A file run has one node shared by every job, served by one
/// backend bound to all the jobs' IoThreads (each job's requests run on its own IoThread, so
/// they share no queue); a null run has a node and a backend per job. Attaching takes the
/// permissions, and with them the image locks.
fn attach(target: &Target, threads: &[IoThread]) -> Result<Vec<Backend>, String> {
    let open = |node: &Arc<Node>, name: String, threads: &[IoThreadHandle]| {
        let bo = BackendOptions {
            name: Some(name),
            read_only: node.is_read_only(),
            ..BackendOptions::default()
        };
        Backend::with_options(Arc::clone(node), threads, bo).map_err(|e| e.full_message())
    };
    if target.nodes.len() == 1 {
        let handles: Vec<IoThreadHandle> = threads.iter().map(|t| t.handle()).collect();
        let b = open(&target.nodes[0], "bench".into(), &handles)?;
        return Ok(vec![b; threads.len()]);
    }
    target
        .nodes
        .iter()
        .zip(threads)
        .enumerate()
        .map(|(i, (n, t))| open(n, format!("bench{i}"), &[t.handle()]))
        .collect()
}

fn start_iothreads(opts: &Options) -> Result<Vec<IoThread>, String> {
    let iot = IoThreadOptions {
        sq_entries: opts
            .iodepth
            .saturating_add(16)
            .next_power_of_two()
            .clamp(256, 32768),
        sqpoll_idle: opts.sqthread_poll.then_some(Duration::from_secs(1)),
        registered_files: if opts.registerfiles { 4 } else { 0 },
        fixed_buffers: opts
            .fixedbufs
            .then_some((opts.iodepth as u16, opts.bs as usize)),
        cpus: opts.cpus_allowed.clone(),
        ..IoThreadOptions::default()
    };
    with_signals_blocked(|| {
        (0..opts.numjobs)
            .map(|_| IoThread::with_options(iot.clone()).map_err(|e| e.to_string()))
            .collect()
    })
}

fn run(mut opts: Options, argv: &[String]) -> Result<i32, String> {
    // Declared first, so dropped last: after the nodes and IoThreads are gone.
    let mut scratch: Option<Scratch> = None;
    let threads = start_iothreads(&opts)?;
    let target = open_target(&mut opts, &mut scratch, &threads[0].handle())?;
    let opts = Arc::new(opts);
    let backends = attach(&target, &threads)?;
    // Started before the jobs, so that a failure leaves nothing running; the drainer that
    // owns it is declared after `threads`, so it (and the controller) drops before them.
    let controller = match opts.drain_every {
        Some(_) => Some(with_signals_blocked(|| {
            engine::Controller::start(threads[0].handle()).map_err(|e| e.full_message())
        })?),
        None => None,
    };

    let header_info = report::RunInfo {
        opts: &opts,
        argv,
        target: &target.label,
        image: &target.image,
        image_format: target.format,
        results: &[],
        drain: None,
    };
    if opts.format == OutputFormat::Normal {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(report::header(&header_info).as_bytes());
        let _ = out.flush();
    }

    let (tx, rx) = mpsc::channel();
    let run_start = Instant::now();
    let progress: Vec<Arc<Progress>> = (0..opts.numjobs).map(|_| Arc::default()).collect();
    let handles: Vec<_> = (0..opts.numjobs)
        .map(|i| {
            let spec = job::JobSpec {
                index: i,
                opts: Arc::clone(&opts),
                backend: backends[i as usize].clone(),
                progress: Arc::clone(&progress[i as usize]),
                done: tx.clone(),
            };
            threads[i as usize].spawn_with(move || job::run(spec))
        })
        .collect();
    drop(tx);
    let drainer = match (controller, opts.drain_every) {
        (Some(c), Some(every)) => {
            let nodes = target.nodes.clone();
            let measure_from = run_start + opts.ramp_time;
            Some(with_signals_blocked(|| {
                drain::Drainer::start(c, nodes, every, measure_from)
            })?)
        }
        _ => None,
    };

    let mut ticker = Ticker::new(progress::stderr_is_tty());
    let refs: Vec<&Progress> = progress.iter().map(|p| &**p).collect();
    let mut ended = 0;
    while ended < handles.len() && !handles.iter().all(|h| h.is_finished()) {
        let wait = ticker.next_due().saturating_duration_since(Instant::now());
        if rx.recv_timeout(wait.max(Duration::from_millis(10))).is_ok() {
            ended += 1;
        }
        ticker.tick(&opts, &refs);
    }
    ticker.finish();

    let mut results = Vec::with_capacity(handles.len());
    for (i, h) in handles.into_iter().enumerate() {
        results.push(h.join().map_err(|e| format!("job {i}: {e}"))?);
    }
    // The jobs have ended: stop the drainer and its controller before the report.
    let drain_report = drainer.map(drain::Drainer::finish).transpose()?;
    // A qcow2 image keeps metadata in its caches: write it back (and make it durable) on a
    // job's IoThread while everything is still up, before the nodes are dropped.
    let flushed = if target.format == "qcow2" && !opts.rw.is_read_only() {
        backends[0]
            .flush_blocking()
            .map_err(|e| format!("cannot flush '{}': {e}", target.label))
    } else {
        Ok(())
    };
    let info = report::RunInfo {
        results: &results,
        drain: drain_report.as_ref(),
        ..header_info
    };
    let text = match opts.format {
        OutputFormat::Normal => report::normal(&info),
        OutputFormat::Json => report::json(&info),
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    let mut code = 0;
    for r in &results {
        if let Some(e) = &r.error {
            eprintln!(
                "strata bench: error: job {} ('{}'): {}",
                r.index, opts.name, e.message
            );
            code = 1;
        }
    }
    if let Err(e) = flushed {
        eprintln!("strata bench: error: {e}");
        code = 1;
    }
    if code == 0 && STOP.load(Ordering::SeqCst) {
        eprintln!("strata bench: interrupted");
        code = EXIT_INTERRUPTED;
    }
    drop(backends);
    drop(target);
    drop(threads);
    drop(scratch);
    Ok(code)
}
