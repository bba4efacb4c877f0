//! Guest I/O continues during stream, intermediate commit and active commit.
//!
//! Each test opens a 4-image qcow2 chain (16 MiB; base: a position-dependent pattern; the
//! images above: extents of their own, some not cluster-aligned, and a zeroed range) in an
//! engine with 2 IoThreads, and a guest backend on the top bound to both. Four guest workers,
//! two on each IoThread, each own a 3 MiB slice of the first 12 MiB (fio's offset_increment:
//! no worker sees another's writes) and do random 4..64 KiB reads and writes (512-byte
//! aligned, queue depth 1 each), keeping the expected content of their slice in memory: it
//! starts as the flattened chain (`qemu-img convert -U -O raw`, taken before the engine opens
//! it), every write records its data, every read must return exactly the model (a mismatch
//! fails with its offset, and says whether the byte read is the data from before the job or
//! neither). The last 4 MiB belong to the job alone.
//!
//! The job runs with a speed limit first; once the guest has done a number of requests *and*
//! the job has covered half of its work, the limit goes, and the guest keeps going until
//! the job has ended (and, for active commit, through READY, `complete` and the pivot). Waits
//! are on progress (guest requests done, job states), never on time; a wait with no progress
//! at all for two minutes fails as a hang. Afterwards the engine closes, `qemu-img compare`
//! checks the resulting top against the flattened copy with the guest's writes applied, and
//! `qemu-img check` every image.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{assert_all_clean, assert_backing, have_qemu, qemu_content, qemu_img_create};
use common::{run_qemu_io, run_tool, seeded_data, uniq, Rng, Scratch};
use engine::drivers::file::FileOptions;
use engine::job::commit::CommitArgs;
use engine::job::mirror::GRANULARITY;
use engine::job::stream::StreamArgs;
use engine::job::{Job, JobInfo, JobStatus};
use engine::{
    Backend, BackendOptions, BackingSpec, ChildSpec, DriverSpec, Engine, EngineOptions, IoBuf,
    NodeSpec,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
/// Guest workers: two per IoThread, each with its own slice.
const WORKERS: usize = 4;
const SLICE: u64 = 3 * MIB;
/// A wait that sees no progress at all for this long is a hang.
const HANG: Duration = Duration::from_secs(120);
/// The speed limit the jobs start with (bytes per second).
const SLOW: i64 = 4 * MIB as i64;

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// The chain: image 0 (base) holds `pattern_at` everywhere; images 1..3 hold extents of
/// their own (some not cluster-aligned, so their clusters were filled from below), and image
/// 2 zeroes a range of base data.
fn make_images(tag: &str) -> Vec<Scratch> {
    let raw = Scratch::new_in("/var/tmp", &format!("{tag}raw")).with_pattern(SIZE as usize);
    let base = Scratch::new_in("/var/tmp", &format!("{tag}0"));
    run_tool(&[
        "qemu-img",
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.path(),
        base.path(),
    ]);
    drop(raw);
    let layers: [&[&str]; 3] = [
        &["write -P 0x21 1028k 3M", "write -P 0x22 9M 2M"],
        &[
            "write -P 0x31 2097664 1050112",
            "write -z 5M 256k",
            "write -P 0x32 10M 3M",
        ],
        &[
            "write -P 0x41 3M 64k",
            "write -P 0x42 6200k 40k",
            "write -P 0x43 12296k 40k",
        ],
    ];
    let mut imgs = vec![base];
    for (i, cmds) in layers.iter().enumerate() {
        let s = Scratch::new_in("/var/tmp", &format!("{tag}{}", i + 1));
        qemu_img_create(
            "qcow2",
            s.path(),
            Some((imgs[i].path(), "qcow2")),
            Some(SIZE),
        );
        run_qemu_io("qcow2", s.path(), cmds);
        imgs.push(s);
    }
    imgs
}

/// Opens `imgs` as a chain of named qcow2 nodes (each image's backing is the node before
/// it; all but the top read-only), with `cache.direct` if `direct`.
fn open_chain(e: &Engine, imgs: &[Scratch], tag: &str, direct: bool) -> Vec<String> {
    let names: Vec<String> = (0..imgs.len())
        .map(|i| uniq(&format!("{tag}{i}")))
        .collect();
    for (i, img) in imgs.iter().enumerate() {
        let read_only = i + 1 < imgs.len();
        let mut file = FileOptions::new(img.path());
        file.direct = direct;
        e.add_node(NodeSpec {
            node_name: Some(names[i].clone()),
            read_only,
            driver: DriverSpec::Qcow2 {
                file: ChildSpec::Spec(Box::new(NodeSpec {
                    node_name: None,
                    read_only,
                    driver: DriverSpec::File(file),
                })),
                backing: match i {
                    0 => BackingSpec::None,
                    _ => BackingSpec::Node(ChildSpec::Name(names[i - 1].clone())),
                },
                opts: Default::default(),
            },
        })
        .unwrap();
    }
    names
}

// ---------------------------------------------------------------------------------------------
// The guest
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Progress {
    ops: u64,
    failure: Option<String>,
}

/// Writes allowed before READY of an active commit: the guest dirties at most half as much
/// as the job copies (from when pacing began), so the dirty bitmap must run empty. A guest
/// that writes faster than the job copies keeps an active commit from converging (in QEMU
/// too, without `copy-mode=write-blocking`); when a write is not allowed, the worker reads.
struct Pace {
    job: Arc<Job>,
    from: u64,
    dirtied: u64,
}

/// What the test thread and the guest workers share.
#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
    stop: AtomicBool,
    pace: Mutex<Option<Pace>>,
}

impl Shared {
    fn op_done(&self) {
        self.progress.lock().unwrap().ops += 1;
        self.changed.notify_all();
    }

    fn fail(&self, e: String) {
        self.progress.lock().unwrap().failure.get_or_insert(e);
        self.stop.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    fn ops(&self) -> u64 {
        self.progress.lock().unwrap().ops
    }

    fn check(&self) {
        if let Some(f) = &self.progress.lock().unwrap().failure {
            panic!("guest I/O failed: {f}");
        }
    }

    /// Blocks until the guest has done `n` more requests.
    fn wait_ops(&self, n: u64) {
        let mut p = self.progress.lock().unwrap();
        let target = p.ops + n;
        loop {
            if let Some(f) = &p.failure {
                panic!("guest I/O failed: {f}");
            }
            if p.ops >= target {
                return;
            }
            let before = p.ops;
            let (g, t) = self.changed.wait_timeout(p, HANG).unwrap();
            p = g;
            assert!(
                !(t.timed_out() && p.ops == before),
                "the guest did no request for {HANG:?} ({} of {target} done): a hang",
                p.ops
            );
        }
    }

    /// Whether a write of `len` bytes at `off` may go now (see [`Pace`]); counts it if so.
    fn may_write(&self, off: u64, len: u64) -> bool {
        let mut pace = self.pace.lock().unwrap();
        let Some(p) = pace.as_mut() else {
            return true;
        };
        let dirty =
            (off + len).div_ceil(GRANULARITY) * GRANULARITY - off / GRANULARITY * GRANULARITY;
        let copied = p.job.info().current_progress.saturating_sub(p.from);
        if (p.dirtied + dirty) * 2 <= copied {
            p.dirtied += dirty;
            true
        } else {
            false
        }
    }

    fn pace(&self, job: &Arc<Job>) {
        *self.pace.lock().unwrap() = Some(Pace {
            job: Arc::clone(job),
            from: job.info().current_progress,
            dirtied: 0,
        });
    }

    fn unpace(&self) {
        self.pace.lock().unwrap().take();
    }
}

/// One guest worker's slice: its model, and what it was before the test.
struct Slice {
    worker: usize,
    start: u64,
    model: Vec<u8>,
    orig: Vec<u8>,
    /// 512-byte sectors the worker wrote.
    written: Vec<bool>,
}

impl Slice {
    /// Compares a read of `[off, off + got.len())` (slice offsets) with the model.
    fn verify(&self, off: usize, got: &[u8], what: &str) -> Result<(), String> {
        let want = &self.model[off..off + got.len()];
        let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) else {
            return Ok(());
        };
        let at = off + i;
        let end = (at + 16).min(off + got.len());
        let r = at..end;
        let gi = i..i + r.len();
        let source = if self.written[at / 512] {
            "a guest write"
        } else {
            "the image before the job"
        };
        let reads_as = if got[gi.clone()] == self.orig[r.clone()] {
            "the data from before the job (a lost guest write?)"
        } else if got[gi.clone()].iter().all(|&b| b == 0) {
            "zeroes"
        } else {
            "neither the expected data nor the data from before the job"
        };
        Err(format!(
            "guest {}: {what} of {:#x} bytes at {:#x}: byte {:#x} differs: read {:02x?}, \
             expected {:02x?} (from {source}); it reads as {reads_as}",
            self.worker,
            got.len(),
            self.start + off as u64,
            self.start + at as u64,
            &got[gi],
            &self.model[r],
        ))
    }
}

async fn guest_loop(b: &Backend, s: &mut Slice, sh: &Shared, seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed);
    let slice = s.model.len() as u64;
    let mut k = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        let len = (8 + rng.below(121)) * 512; // 4 KiB ..= 64 KiB
        let off = rng.below((slice - len) / 512 + 1) * 512;
        let at = s.start + off;
        let (o, n) = (off as usize, len as usize);
        if rng.below(2) == 0 && sh.may_write(at, len) {
            let data = seeded_data(seed ^ (k << 24) ^ 0x5EED, n);
            let (r, _) = b.write(at, IoBuf::from_slice(&data)).await;
            r.map_err(|e| {
                format!(
                    "guest {}: write of {len:#x} bytes at {at:#x}: {e}",
                    s.worker
                )
            })?;
            s.model[o..o + n].copy_from_slice(&data);
            s.written[o / 512..(o + n) / 512].fill(true);
        } else {
            let (r, buf) = b.read(at, IoBuf::new(n)).await;
            r.map_err(|e| format!("guest {}: read of {len:#x} bytes at {at:#x}: {e}", s.worker))?;
            s.verify(o, &buf, "read")?;
        }
        k += 1;
        sh.op_done();
    }
    // The whole slice, once more.
    let mut off = 0;
    while off < slice {
        let n = MIB.min(slice - off) as usize;
        let (r, buf) = b.read(s.start + off, IoBuf::new(n)).await;
        r.map_err(|e| {
            format!(
                "guest {}: final read at {:#x}: {e}",
                s.worker,
                s.start + off
            )
        })?;
        s.verify(off as usize, &buf, "final read")?;
        off += n as u64;
    }
    Ok(())
}

/// A guest worker: its slice's model when it stops, or the first failure.
async fn guest_worker(
    b: Backend,
    mut s: Slice,
    sh: Arc<Shared>,
    seed: u64,
) -> Result<Vec<u8>, String> {
    match guest_loop(&b, &mut s, &sh, seed).await {
        Ok(()) => Ok(s.model),
        Err(e) => {
            sh.fail(e.clone());
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A test run
// ---------------------------------------------------------------------------------------------

struct Run {
    direct: bool,
    imgs: Vec<Scratch>,
    /// Each image's content (with its backing chain) before the engine opened it.
    flat: Vec<Vec<u8>>,
    names: Vec<String>,
    e: Engine,
    guest: Backend,
    sh: Arc<Shared>,
    workers: Vec<iothreads::JoinHandle<Result<Vec<u8>, String>>>,
    t0: Instant,
}

impl Run {
    /// The chain, flattened copies, the engine (2 IoThreads), the guest backend on the top,
    /// and the guest workers running.
    fn start(tag: &str, seed: u64, direct: bool) -> Option<Run> {
        if !have_qemu() {
            return None;
        }
        let t0 = Instant::now();
        let imgs = make_images(tag);
        let flat: Vec<Vec<u8>> = imgs.iter().map(|i| qemu_content(i.path())).collect();
        let e = Engine::new(EngineOptions {
            iothreads: 2,
            ..Default::default()
        })
        .unwrap();
        let names = open_chain(&e, &imgs, tag, direct);
        let guest = e
            .backend(&names[3], &[], BackendOptions::default())
            .unwrap();
        assert_eq!(
            guest.threads().len(),
            2,
            "the guest is bound to both IoThreads"
        );
        let sh = Arc::new(Shared::default());
        let workers = (0..WORKERS)
            .map(|w| {
                let start = w as u64 * SLICE;
                let orig = flat[3][start as usize..(start + SLICE) as usize].to_vec();
                let s = Slice {
                    worker: w,
                    start,
                    model: orig.clone(),
                    orig,
                    written: vec![false; (SLICE / 512) as usize],
                };
                let (b, sh) = (guest.clone(), Arc::clone(&sh));
                let seed = seed ^ ((w as u64 + 1) << 48);
                e.iothread(w % 2)
                    .unwrap()
                    .spawn_with(move || guest_worker(b, s, sh, seed))
            })
            .collect();
        Some(Run {
            direct,
            imgs,
            flat,
            names,
            e,
            guest,
            sh,
            workers,
            t0,
        })
    }

    fn mode(&self) -> &'static str {
        if self.direct {
            " (cache.direct)"
        } else {
            ""
        }
    }

    /// Lets the guest do at least `ops` requests while the job runs, and then more until the
    /// job has covered half of its work (or is past running).
    fn overlap(&self, job: &Arc<Job>, ops: u64) {
        self.sh.wait_ops(ops);
        loop {
            let i = job.info();
            if (i.total_progress > 0 && i.current_progress * 2 >= i.total_progress)
                || !matches!(i.status, JobStatus::Created | JobStatus::Running)
            {
                return;
            }
            self.sh.wait_ops(32);
        }
    }

    /// Waits for `job` to reach `status` (or to conclude); fails on a guest failure or when
    /// neither the job nor the guest makes progress for [`HANG`].
    fn wait_for(&self, job: &Arc<Job>, status: JobStatus) -> JobInfo {
        let (tx, rx) = std::sync::mpsc::channel();
        let j = Arc::clone(job);
        std::thread::spawn(move || {
            if status == JobStatus::Null {
                j.wait();
            } else {
                j.wait_for(status);
            }
            let _ = tx.send(());
        });
        let mut seen = (self.sh.ops(), job.info().current_progress);
        let mut since = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(()) => return job.info(),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    self.sh.check();
                    let now = (self.sh.ops(), job.info().current_progress);
                    if now != seen {
                        (seen, since) = (now, Instant::now());
                    }
                    assert!(
                        since.elapsed() < HANG,
                        "waiting for {status:?}: neither job nor guest progressed for \
                         {HANG:?}: {:?}",
                        job.info()
                    );
                }
                Err(e) => panic!("the waiter thread failed: {e}"),
            }
        }
    }

    /// Waits until the job has ended (auto-dismissed); returns its last state.
    fn wait_end(&self, job: &Arc<Job>) -> JobInfo {
        self.wait_for(job, JobStatus::Null)
    }

    /// Stops the guest, closes the engine; the expected content of the top (the flattened
    /// copy with the guest's writes) and the images.
    fn finish(self, label: &str) -> (Vec<u8>, Vec<Scratch>) {
        let label = format!("{label}{}", self.mode());
        self.sh.stop.store(true, Ordering::SeqCst);
        let mut expected = self.flat[3].clone();
        for (w, h) in self.workers.into_iter().enumerate() {
            let model = h
                .join()
                .unwrap_or_else(|e| panic!("guest worker {w} did not run to its end: {e}"))
                .unwrap_or_else(|e| panic!("guest I/O failed: {e}"));
            let start = w * SLICE as usize;
            expected[start..start + SLICE as usize].copy_from_slice(&model);
        }
        let ops = self.sh.ops();
        drop(self.guest);
        drop(self.e);
        eprintln!(
            "{label}: {ops} guest requests in all, {:.1}s",
            self.t0.elapsed().as_secs_f64()
        );
        (expected, self.imgs)
    }
}

/// `qemu-img compare` of `expected` (raw) with the qcow2 image `img`.
fn assert_same(expected: &[u8], img: &Scratch, what: &str) {
    let raw = Scratch::new_in("/var/tmp", "gexp");
    std::fs::write(&raw.0, expected).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.path(),
            img.path(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: qemu-img compare of the expected content with {}:\n{}{}",
        img.path(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn guest_ops_line(r: &Run, label: &str, before: u64, during: u64) {
    eprintln!(
        "{label}{}: {before} guest requests before the job, {during} while it ran",
        r.mode()
    );
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Streams images 1 and 2 into the top (base-node: image 0) while the guest works through
/// the copy-on-read filter; afterwards the top's backing node is the base.
fn stream(direct: bool, seed: u64) {
    let Some(r) = Run::start("gios", seed, direct) else {
        return;
    };
    let n = r.names.clone();
    r.sh.wait_ops(200);
    let before = r.sh.ops();
    let mut a = StreamArgs::new(&n[3]);
    a.base_node = Some(n[0].clone());
    a.job.job_id = Some(uniq("gstream"));
    a.job.speed = SLOW;
    let job = r.e.stream(a).unwrap();
    r.overlap(&job, 400);
    let _ = job.set_speed(0);
    let info = r.wait_end(&job);
    assert_eq!(info.error, None, "{info:?}");
    guest_ops_line(&r, "stream", before, r.sh.ops() - before);
    // The guest goes on in the new graph: no filter, base below the top.
    r.sh.wait_ops(200);
    assert_eq!(r.guest.root().name(), n[3]);
    assert_eq!(r.e.node(&n[3]).unwrap().backing().unwrap().name(), n[0]);
    let (expected, imgs) = r.finish("stream");
    assert_backing(imgs[3].path(), Some(imgs[0].path()));
    assert_same(&expected, &imgs[3], "stream");
    assert_all_clean(&imgs);
}

/// Commits images 1 and 2 into image 0 while the guest works on the top (image 3): its
/// writes stay in the top, and base ends up reading as image 2's chain did.
fn intermediate_commit(direct: bool, seed: u64) {
    let Some(r) = Run::start("gioc", seed, direct) else {
        return;
    };
    let n = r.names.clone();
    let mid = r.flat[2].clone();
    r.sh.wait_ops(200);
    let before = r.sh.ops();
    let mut a = CommitArgs::new(&n[3]);
    a.top_node = Some(n[2].clone());
    a.base_node = Some(n[0].clone());
    a.job.job_id = Some(uniq("gcommit"));
    a.job.speed = SLOW;
    let job = r.e.commit(a).unwrap();
    r.overlap(&job, 400);
    let _ = job.set_speed(0);
    let info = r.wait_end(&job);
    assert_eq!(info.error, None, "{info:?}");
    guest_ops_line(&r, "intermediate commit", before, r.sh.ops() - before);
    r.sh.wait_ops(200);
    assert_eq!(r.guest.root().name(), n[3]);
    assert_eq!(r.e.node(&n[3]).unwrap().backing().unwrap().name(), n[0]);
    let (expected, imgs) = r.finish("intermediate commit");
    assert_backing(imgs[3].path(), Some(imgs[0].path()));
    assert_same(&expected, &imgs[3], "intermediate commit: the top");
    assert_same(
        &mid,
        &imgs[0],
        "intermediate commit: base (no guest write in it)",
    );
    assert_all_clean(&imgs);
}

/// Commits the active top into image 0 while the guest writes: through the copy, READY
/// (guest writes paced so the job converges, see [`Pace`]), more writes after READY,
/// `complete` and the pivot (the guest's requests held across it), and more I/O on base.
fn active_commit(direct: bool, seed: u64) {
    let Some(r) = Run::start("gioa", seed, direct) else {
        return;
    };
    let n = r.names.clone();
    r.sh.wait_ops(200);
    let before = r.sh.ops();
    let mut a = CommitArgs::new(&n[3]);
    a.job.job_id = Some(uniq("gactive"));
    a.job.speed = SLOW;
    let job = r.e.commit(a).unwrap();
    r.overlap(&job, 400);
    r.sh.pace(&job);
    let _ = job.set_speed(0);
    let st = r.wait_for(&job, JobStatus::Ready);
    let at_ready = r.sh.ops();
    assert_eq!(st.status, JobStatus::Ready, "{st:?}");
    r.sh.unpace();
    // Writing while READY: the job keeps copying.
    r.sh.wait_ops(400);
    let at_complete = r.sh.ops();
    job.complete().unwrap();
    let info = r.wait_end(&job);
    assert_eq!(info.error, None, "{info:?}");
    guest_ops_line(&r, "active commit", before, r.sh.ops() - before);
    eprintln!(
        "active commit{}: {} guest requests before READY, {} while READY, {} during the \
         completion",
        r.mode(),
        at_ready - before,
        at_complete - at_ready,
        r.sh.ops() - at_complete
    );
    assert_eq!(r.guest.root().name(), n[0], "the guest is on base now");
    assert!(!r.guest.root().is_read_only());
    // And keeps working there.
    r.sh.wait_ops(400);
    assert_eq!(r.guest.root().name(), n[0]);
    let (expected, imgs) = r.finish("active commit");
    assert_same(&expected, &imgs[0], "active commit: base (the new top)");
    assert_all_clean(&imgs);
}

#[test]
fn guest_io_during_stream() {
    stream(false, 0x57AE);
}

#[test]
fn guest_io_during_intermediate_commit() {
    intermediate_commit(false, 0xC0117);
}

#[test]
fn guest_io_during_active_commit() {
    active_commit(false, 0xAC71);
}

/// The same with `cache.direct` on ext4 (/var/tmp): the guest's 512-byte-aligned requests
/// are padded to the file's O_DIRECT alignment (read-modify-write) while the job copies.
#[test]
fn guest_io_during_stream_direct() {
    stream(true, 0x57AE + 1);
}

#[test]
fn guest_io_during_intermediate_commit_direct() {
    intermediate_commit(true, 0xC0117 + 1);
}

#[test]
fn guest_io_during_active_commit_direct() {
    active_commit(true, 0xAC71 + 1);
}

/// 20 rounds of each test with other seeds (a stress run for rare interleavings).
#[test]
#[ignore = "long: 120 job runs under guest I/O"]
fn guest_io_during_jobs_long() {
    for round in 0..20u64 {
        for direct in [false, true] {
            let seed = 0x10_0000 + round * 16 + u64::from(direct) * 8;
            stream(direct, seed);
            intermediate_commit(direct, seed + 1);
            active_commit(direct, seed + 2);
        }
    }
}
