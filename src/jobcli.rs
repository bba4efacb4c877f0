//! `strata stream` and `strata commit`: the engine's block jobs run on images at rest, in the
//! manner of `qemu-img rebase -b ''` (but keeping the data) and `qemu-img commit`.
//!
//! ```text
//! strata stream [-f FMT] [-t CACHE] [-b BASE] [-r RATE] [-p] [-q] FILE
//! strata commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-r RATE] [-p] [-q] FILE
//! ```
//!
//! Both open FILE read-write with its backing chain (the backing images read-only, as the
//! jobs reopen what they write), attach a backend to FILE as a guest device would (so FILE is
//! locked for writing, and a FILE another process uses is refused), and start the job through
//! the engine's API ([`Engine::stream`], [`Engine::commit`]), watching its progress through the
//! job manager's events.
//!
//! - **stream** copies into FILE the data of every image below it down to BASE (not BASE
//!   itself), then makes BASE FILE's backing file; without `-b` the whole chain is copied
//!   and FILE ends standalone.
//! - **commit** copies the data of FILE and of every image between FILE and BASE (default:
//!   FILE's backing file) into BASE. FILE is the top of the chain the tool opened, so in the
//!   engine's terms this is an *active* commit: it goes READY once everything is copied, and
//!   the tool completes it at once (nothing writes meanwhile, so nothing is left to copy).
//!   Then, where BASE is further down, FILE's header is made to name BASE (the images between
//!   them drop out of FILE's chain: BASE now holds their data); last, unless `-d`, FILE is
//!   emptied, so it reads the same as before as an empty overlay of BASE. qemu-img empties
//!   FILE too but leaves its header alone, which is why its `-b` implies `-d`; strata can
//!   empty FILE safely in both cases because it rewrites the header first.
//!
//! Each step leaves a valid chain if the process dies in the middle: BASE receives only data
//! that the images above it shadow; FILE names BASE only once BASE has been flushed; FILE is
//! emptied only once it names BASE. The tools end with every image flushed and closed.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use engine::backend::BackendOptions;
use engine::drivers::file::Aio;
use engine::drivers::qcow2::Qcow2Driver;
use engine::image::{self, Format, ImageOptions};
use engine::job::chain::image_filename;
use engine::job::commit::CommitArgs as EngineCommitArgs;
use engine::job::stream::StreamArgs as EngineStreamArgs;
use engine::job::{Job, JobEvent, JobEventKind, JobOptions};
use engine::{Backend, Engine, EngineOptions, Error, IoThreadHandle, Node};

use crate::imgcli;

/// Options both tools take.
#[derive(Debug, Args)]
pub struct JobOpts {
    /// Format of FILE: qcow2 [default: probed]
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Cache mode of every image: none (O_DIRECT, cache.direct=on) or writeback
    #[arg(
        short = 't',
        long = "cache",
        value_name = "CACHE",
        default_value = "writeback"
    )]
    pub cache: String,
    /// Speed limit in bytes per second (k, M, G suffixes) [default: none]
    #[arg(
        short = 'r',
        long = "speed",
        visible_alias = "rate",
        value_name = "RATE"
    )]
    pub speed: Option<String>,
    /// Show progress even where stderr is not a terminal (one line per percent)
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing but errors (no progress)
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
}

/// The command line of `strata stream`.
#[derive(Debug, Args)]
pub struct StreamArgs {
    /// The image that stays the new backing file of FILE [default: none: FILE ends
    /// standalone]
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    pub base: Option<String>,
    #[command(flatten)]
    pub opts: JobOpts,
    /// The image to stream into (the top of its chain)
    #[arg(value_name = "FILE")]
    pub file: String,
}

/// The command line of `strata commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The image to commit into [default: FILE's backing file]
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    pub base: Option<String>,
    /// Do not empty FILE once its data is in BASE
    #[arg(short = 'd', long = "drop")]
    pub drop: bool,
    #[command(flatten)]
    pub opts: JobOpts,
    /// The image whose data to commit (the top of its chain)
    #[arg(value_name = "FILE")]
    pub file: String,
}

/// Set by SIGINT/SIGTERM: the job is cancelled.
static STOP: AtomicBool = AtomicBool::new(false);

/// Exit code after an interruption (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: i32 = 130;

/// Runs `strata stream`; returns the exit code.
pub fn stream_main(args: StreamArgs) -> i32 {
    finish("stream", run_stream(&args))
}

/// Runs `strata commit`; returns the exit code.
pub fn commit_main(args: CommitArgs) -> i32 {
    finish("commit", run_commit(&args))
}

fn finish(cmd: &str, r: Result<(), String>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(_) if STOP.load(Ordering::SeqCst) => {
            eprintln!("strata {cmd}: interrupted (the job was cancelled; the images are valid)");
            EXIT_INTERRUPTED
        }
        Err(msg) => {
            eprintln!("strata {cmd}: error: {msg}");
            1
        }
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is valid; the fields we need are set below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa` is a valid sigaction with an empty mask; the handler only stores to an
        // atomic.
        unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Runs `f` with SIGINT and SIGTERM blocked, so that the threads it starts (IoThreads, the
/// controller) inherit the mask and only the main thread takes those signals.
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

/// The options both tools check before opening anything.
struct Checked {
    format: Option<Format>,
    direct: bool,
    speed: i64,
    show: Show,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Show {
    Nothing,
    /// A bar on the terminal.
    Bar,
    /// One line per percent (`-p` where stderr is not a terminal).
    Lines,
}

fn check_opts(o: &JobOpts) -> Result<Checked, String> {
    let format = match o.format.as_deref() {
        Some(f) => Some(Format::parse(f).map_err(|_| format!("Unknown file format '{f}'"))?),
        None => None,
    };
    let direct = match o.cache.as_str() {
        "none" => true,
        "writeback" => false,
        c => {
            return Err(format!(
                "Invalid cache option: '{c}' (strata supports none and writeback)"
            ))
        }
    };
    let speed = match o.speed.as_deref() {
        None => 0,
        Some(s) => match imgcli::parse_size(s) {
            Ok(v) => v as i64,
            Err(_) => return Err(format!("Invalid rate limit specified: '{s}'")),
        },
    };
    let tty = std::io::stderr().is_terminal();
    let show = match (o.quiet, tty, o.progress) {
        (true, _, _) => Show::Nothing,
        (false, true, _) => Show::Bar,
        (false, false, true) => Show::Lines,
        (false, false, false) => Show::Nothing,
    };
    Ok(Checked {
        format,
        direct,
        speed,
        show,
    })
}

/// An open chain: the engine, FILE's top node with its chain, and the backend that holds
/// FILE the way a guest device would (its write permission takes the image locks).
struct Session {
    // Field order is drop order: the backend and the nodes go before the engine, whose
    // controller then runs their closes (flush, clean flag, unlock) before it stops.
    backend: Option<Backend>,
    top: Arc<Node>,
    engine: Engine,
    /// FILE as the user named it.
    name: String,
}

impl Session {
    fn open(file: &str, c: &Checked) -> Result<Session, String> {
        let engine = with_signals_blocked(|| Engine::new(EngineOptions::default()))
            .map_err(|e| e.full_message())?;
        let io = engine.iothread(0).expect("one IoThread");
        let opts = ImageOptions {
            format: c.format,
            read_only: false,
            direct: c.direct,
            aio: Aio::Auto,
            backing: true,
            ..ImageOptions::default()
        };
        let p = PathBuf::from(file);
        let top = block_on(&io, move || async move {
            image::open(&p, &opts).await.map_err(|e| e.full_message())
        })??;
        if top.driver_as::<Qcow2Driver>().is_none() {
            return Err(format!(
                "'{file}' is a {} image, which has no backing file (only qcow2 images have one)",
                top.driver_name()
            ));
        }
        let backend = attach(&top, &io)?;
        Ok(Session {
            backend: Some(backend),
            top,
            engine,
            name: file.to_string(),
        })
    }

    fn io(&self) -> IoThreadHandle {
        self.engine.iothread(0).expect("one IoThread")
    }

    /// The image right below FILE, if any.
    fn backing(&self) -> Option<Arc<Node>> {
        self.top.backing_chain_next()
    }

    /// The image of FILE's chain (below FILE) that `name` names: by its path (relative to
    /// the working directory, as the user typed it) or by the backing file name the header
    /// above it records. Returns it and the image right above it.
    fn find_base(&self, name: &str) -> Result<(Arc<Node>, Arc<Node>), String> {
        let want = std::fs::canonicalize(name).ok();
        let top_canon = image_filename(&self.top).and_then(|f| std::fs::canonicalize(f).ok());
        if want.is_some() && want == top_canon {
            return Err(format!(
                "'{name}' is '{}' itself, not an image of its backing chain",
                self.name
            ));
        }
        let mut cur = self.top.skip_filters();
        while let Some(next) = cur.backing_chain_next() {
            let by_header = cur
                .driver_as::<Qcow2Driver>()
                .and_then(|d| d.backing_name().0)
                .is_some_and(|h| h == name);
            let by_path = want.is_some()
                && image_filename(&next).and_then(|f| std::fs::canonicalize(f).ok()) == want;
            if by_header || by_path {
                return Ok((next, cur));
            }
            cur = next;
        }
        Err(format!(
            "'{name}' is not in the backing chain of '{}'",
            self.name
        ))
    }

    /// Flushes FILE and everything below it.
    fn flush_chain(&self) -> Result<(), String> {
        let mut nodes = Vec::new();
        let mut cur = Some(Arc::clone(&self.top));
        while let Some(n) = cur {
            cur = n.backing_chain_next();
            nodes.push(n);
        }
        block_on(&self.io(), move || async move {
            for n in nodes {
                if n.is_read_only() {
                    continue;
                }
                n.flush().await.map_err(|e| {
                    let f = image_filename(&n).unwrap_or_else(|| n.name().to_string());
                    format!("Failed to flush '{f}': {}", graph_text(&e))
                })?;
            }
            Ok(())
        })?
    }
}

fn graph_text(e: &std::io::Error) -> String {
    engine::job::errno_text(e)
}

/// Runs `f` on the IoThread `io` and waits for it.
fn block_on<T, F, Fut>(io: &IoThreadHandle, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    io.block_on(f)
        .map_err(|e| format!("the IoThread stopped: {e}"))
}

/// A read-write backend on `node`, as a guest device (QEMU's BlockBackend of qemu-img).
fn attach(node: &Arc<Node>, io: &IoThreadHandle) -> Result<Backend, String> {
    attach_with(node, io, false)
}

/// [`attach`], sharing writes with other users if `share_rw` (QEMU's `share-rw`).
fn attach_with(node: &Arc<Node>, io: &IoThreadHandle, share_rw: bool) -> Result<Backend, String> {
    let bo = BackendOptions {
        name: Some("strata".into()),
        share_rw,
        ..BackendOptions::default()
    };
    Backend::with_options(Arc::clone(node), std::slice::from_ref(io), bo)
        .map_err(|e| e.full_message())
}

/// The backing file name to write into FILE's header for `base`, whose overlay (the image
/// above it) is `overlay`: the name that overlay's header records, where it means the same
/// seen from FILE's folder (an absolute name, or an overlay in FILE's folder); else BASE's
/// path relative to FILE's folder, or absolute where BASE is not under it.
fn backing_name_for(top: &Arc<Node>, overlay: &Arc<Node>, base: &Arc<Node>) -> Option<String> {
    let dir_of = |n: &Arc<Node>| {
        image_filename(n).and_then(|f| {
            let p = Path::new(&f).parent().map(Path::to_path_buf);
            let p = match p {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => PathBuf::from("."),
            };
            std::fs::canonicalize(p).ok()
        })
    };
    let recorded = overlay
        .driver_as::<Qcow2Driver>()
        .and_then(|d| d.backing_name().0);
    let top_dir = dir_of(top);
    if let Some(r) = &recorded {
        if Path::new(r).is_absolute() || (top_dir.is_some() && dir_of(overlay) == top_dir) {
            return recorded;
        }
    }
    let base_path = image_filename(base).and_then(|f| std::fs::canonicalize(f).ok())?;
    match top_dir.and_then(|d| base_path.strip_prefix(d).ok().map(Path::to_path_buf)) {
        Some(rel) => Some(rel.display().to_string()),
        None => Some(base_path.display().to_string()),
    }
}

/// The progress display.
struct Progress {
    show: Show,
    bar: Option<indicatif::ProgressBar>,
    last_pct: u64,
}

impl Progress {
    fn new(show: Show, what: &str) -> Progress {
        let bar = (show == Show::Bar).then(|| {
            let b = indicatif::ProgressBar::with_draw_target(
                Some(0),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{prefix} [{wide_bar}] {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_prefix(what.to_string());
            b
        });
        Progress {
            show,
            bar,
            last_pct: u64::MAX,
        }
    }

    fn update(&mut self, current: u64, total: u64) {
        match self.show {
            Show::Nothing => {}
            Show::Bar => {
                if let Some(b) = &self.bar {
                    b.set_length(total.max(current));
                    b.set_position(current);
                }
            }
            Show::Lines => {
                let pct = (current.saturating_mul(100))
                    .checked_div(total)
                    .unwrap_or(0)
                    .min(100);
                if pct != self.last_pct {
                    self.last_pct = pct;
                    let mut e = std::io::stderr().lock();
                    let _ = writeln!(e, "    ({pct}.00/100%)");
                }
            }
        }
    }

    fn done(&mut self, ok: bool) {
        if let Some(b) = self.bar.take() {
            if ok {
                b.finish();
            } else {
                b.abandon();
            }
        }
        if ok && self.show == Show::Lines && self.last_pct != 100 {
            self.last_pct = 99;
            self.update(1, 1);
        }
    }
}

/// Watches `job` until it ends: shows progress, completes it once READY (`complete_ready`),
/// cancels it on SIGINT/SIGTERM. Returns the job's error text, if it failed.
fn watch(
    job: &Arc<Job>,
    events: &dyn Fn(Duration) -> Option<JobEvent>,
    complete_ready: bool,
    progress: &mut Progress,
) -> Result<(), String> {
    let id = job.id().to_string();
    let mut cancelled = false;
    let result = loop {
        if STOP.load(Ordering::SeqCst) && !cancelled {
            cancelled = true;
            let _ = job.cancel(true);
        }
        let info = job.info();
        progress.update(info.current_progress, info.total_progress);
        let Some(ev) = events(Duration::from_millis(100)) else {
            continue;
        };
        match ev.kind {
            JobEventKind::Ready { id: i, .. } if i == id && complete_ready => {
                if let Err(e) = job.complete() {
                    break Err(e.full_message());
                }
            }
            JobEventKind::Completed { id: i, error, .. } if i == id => {
                break match error {
                    None => Ok(()),
                    Some(e) => Err(e),
                };
            }
            JobEventKind::Cancelled { id: i, .. } if i == id => {
                break Err("the job was cancelled".to_string());
            }
            _ => {}
        }
    };
    if result.is_ok() {
        let info = job.info();
        progress.update(info.total_progress, info.total_progress);
    }
    progress.done(result.is_ok());
    result
}

fn run_stream(args: &StreamArgs) -> Result<(), String> {
    let c = check_opts(&args.opts)?;
    install_signal_handlers();
    let s = Session::open(&args.file, &c)?;
    let file = &s.name;
    let Some(backing) = s.backing() else {
        if let Some(b) = &args.base {
            return Err(format!("'{b}' is not in the backing chain of '{file}'"));
        }
        // Already standalone: nothing to copy.
        return s.flush_chain();
    };
    let (base, backing_file) = match &args.base {
        None => (None, None),
        Some(b) => {
            let (base, overlay) = s.find_base(b)?;
            let name = backing_name_for(&s.top, &overlay, &base);
            (Some(base), name)
        }
    };
    drop(backing);
    let rx = s.engine.jobs().subscribe();
    let events = move |t: Duration| rx.recv_timeout(t).ok();
    let job = s
        .engine
        .stream(EngineStreamArgs {
            base_node: base.as_ref().map(|b| b.name().to_string()),
            backing_file,
            job: JobOptions {
                job_id: Some("stream".into()),
                speed: c.speed,
                ..JobOptions::default()
            },
            ..EngineStreamArgs::new(s.top.name())
        })
        .map_err(|e| format!("'{file}': {}", e.full_message()))?;
    drop(base);
    let mut progress = Progress::new(c.show, "stream");
    watch(&job, &events, false, &mut progress).map_err(|e| format!("'{file}': {e}"))?;
    drop(job);
    s.flush_chain()?;
    close(s);
    Ok(())
}

fn run_commit(args: &CommitArgs) -> Result<(), String> {
    let c = check_opts(&args.opts)?;
    install_signal_handlers();
    let mut s = Session::open(&args.file, &c)?;
    let file = s.name.clone();
    let Some(backing) = s.backing() else {
        return Err(format!("'{file}' has no backing file to commit into"));
    };
    let (base, overlay) = match &args.base {
        None => (Arc::clone(&backing), Arc::clone(&s.top)),
        Some(b) => s.find_base(b)?,
    };
    let further_down = !Arc::ptr_eq(&base, &backing);
    let new_name = if further_down {
        backing_name_for(&s.top, &overlay, &base)
    } else {
        None
    };
    drop((backing, overlay));
    let base_name = image_filename(&base).unwrap_or_else(|| base.name().to_string());
    let rx = s.engine.jobs().subscribe();
    let events = move |t: Duration| rx.recv_timeout(t).ok();
    let job = s
        .engine
        .commit(EngineCommitArgs {
            base_node: Some(base.name().to_string()),
            job: JobOptions {
                job_id: Some("commit".into()),
                speed: c.speed,
                ..JobOptions::default()
            },
            ..EngineCommitArgs::new(s.top.name())
        })
        .map_err(|e| format!("'{file}': {}", e.full_message()))?;
    let mut progress = Progress::new(c.show, "commit");
    watch(&job, &events, true, &mut progress).map_err(|e| format!("'{file}': {e}"))?;
    drop(job);

    // The commit pivoted the backend onto BASE (it holds BASE as a guest device would after
    // an active commit). FILE gets a backend of its own again before that one lets go, so
    // FILE stays locked for writing throughout. It shares writes (QEMU's share-rw), or the
    // chain below FILE would refuse the first backend its writes to BASE; holding the write
    // permission still keeps out every writer that does not share writes (qemu-img, qemu-io
    // and VMs by default).
    let io = s.io();
    let again = attach_with(&s.top, &io, true)?;
    drop(s.backend.replace(again));

    if further_down {
        // BASE has been flushed: FILE may name it now (its own data still shadows BASE).
        set_backing_file(&s, &base, new_name)
            .map_err(|e| format!("'{file}': cannot make '{base_name}' its backing file: {e}"))?;
    }
    if !args.drop {
        empty(&s).map_err(|e| format!("'{file}': cannot empty it: {e}"))?;
    }
    drop(base);
    s.flush_chain()?;
    let quiet = args.opts.quiet;
    close(s);
    if !quiet {
        println!("Image committed.");
    }
    Ok(())
}

/// Makes `base` FILE's backing node and writes `name` into FILE's header, in one graph
/// change with FILE drained.
fn set_backing_file(s: &Session, base: &Arc<Node>, name: Option<String>) -> Result<(), String> {
    let (top, base) = (Arc::clone(&s.top), Arc::clone(base));
    let format = engine::job::chain::image_format(&base).to_string();
    s.engine
        .controller()
        .change_blocking(move |ctx| async move {
            let drained = ctx.drain(std::slice::from_ref(&top)).await;
            let r = async {
                ctx.transaction(|tx| tx.set_backing(&top, Some(&base)))?;
                let t = Arc::clone(&top);
                ctx.io_thread()
                    .spawn_with(move || async move {
                        let d = t.driver_as::<Qcow2Driver>().expect("a qcow2 node");
                        d.change_backing_file(&t, name.as_deref(), Some(&format))
                            .await
                    })
                    .await
                    .map_err(|e| {
                        Error::new(
                            engine::ErrorKind::Busy,
                            format!("the controller's IoThread stopped: {e}"),
                        )
                    })?
            }
            .await;
            drained.end();
            r
        })
        .map_err(|e| e.full_message())
}

/// Empties FILE: every cluster becomes unallocated, so FILE reads what its backing file has
/// (which, after the commit, is what FILE had). The discard runs with FILE's backing edge
/// taken out of the graph (its header still names BASE): a qcow2 image with a backing node
/// must turn discarded clusters into zero clusters, one without may leave them unallocated.
/// A crash half way leaves some clusters unallocated, which read the same from BASE.
fn empty(s: &Session) -> Result<(), String> {
    let name = s.top.name().to_string();
    s.engine
        .set_backing(&name, None)
        .map_err(|e| e.full_message())?;
    let backend = s.backend.clone().expect("a backend on FILE");
    let len = s.top.len();
    block_on(&s.io(), move || async move {
        backend.discard(0, len).await.map_err(|e| graph_text(&e))?;
        backend.flush().await.map_err(|e| graph_text(&e))
    })?
}

/// Lets go of everything in the order that closes the images before the engine stops.
fn close(s: Session) {
    let Session {
        backend,
        top,
        engine,
        ..
    } = s;
    drop(backend);
    drop(top);
    drop(engine);
}
