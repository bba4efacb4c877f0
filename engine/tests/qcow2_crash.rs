//! qcow2 crash consistency, proven two ways, with QEMU as the oracle.
//!
//! 1. **SIGKILL**: the test re-executes itself as a child writer (the hidden test
//!    `sigkill_child_writer`, selected with `--exact` and the `STRATA_QCOW2_CRASH_CHILD`
//!    variable). The child writes at random into a qcow2 overlay whose backing file is a qcow2
//!    base filled with a known pattern (partial clusters copy on write from it), flushes now and
//!    then, and tells the parent on stdout what it does (`@W`: a write about to be submitted;
//!    `@F`: a flush completed, with the writes acknowledged before it). The parent kills it with
//!    SIGKILL at a random moment and checks the image. SIGKILL keeps the page cache, so this
//!    shows what the driver keeps only in memory, not a missing flush.
//! 2. **Power loss**: a recording protocol driver ([`MemDisk`]) keeps the image in memory and
//!    logs every write and flush. A random workload (allocating writes, zero writes, discards,
//!    flushes, some concurrent) runs through a qcow2 node over it; then, for many crash points,
//!    the disk is rebuilt from the log: every write before the last flush exactly, then a random
//!    subset of the later ones in a random order (some dropped, some reordered, at most one torn
//!    at a 512-byte boundary), as a volatile disk cache may leave it.
//!
//! After every simulated crash:
//! - `qemu-img check` finds no corruption (exit 0, or 3: leaked clusters only);
//! - every write acknowledged before a flush that *completed* reads back, through strata and
//!   through `qemu-img convert -O raw`;
//! - every other byte reads as its durable content or as the data of a write (zero write,
//!   discard) issued after that flush, checked per 512-byte piece of each written range;
//! - a cluster that only one unflushed request ever touched (an allocating write, with COW of
//!   the rest of the cluster from the backing file) reads either entirely old or entirely new.
//!   (Overwrites of clusters already allocated go to the disk in place and may tear at sector
//!   or page granularity, so for them only the per-piece rule holds.)
//!
//! Unflushed writes are reordered freely: nothing but a completed flush orders two writes on
//! the disk. `power_loss_sees_a_disk_that_ignores_flushes` shows the power-loss check catches a
//! lost flush at all. Regression: the driver once wrote a new refcount block and the refcount
//! table entry pointing at it before one flush, so a power loss could keep the entry and lose
//! the block (`qemu-img check`: `ERROR cluster N refcount=0 reference=1`); found by
//! `power_loss_512` (seed 13), now pinned down by
//! `a_new_refcount_block_is_durable_before_the_table_entry_that_points_at_it`.
//!
//! The default tests run 56 SIGKILL rounds and 440 crash points (about 20 s in the dev
//! profile). The long variants are `#[ignore]`d: `cargo test -p engine --test qcow2_crash --
//! --ignored --exact sigkill_rounds_long` (500 rounds) and `... power_loss_long` (2100 crash
//! points). `STRATA_CRASH_SEED=<n>` replaces the seeds. A failing image is kept beside the
//! others as `<name>.failed`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{qemu_tool, seeded_data, Rng, Scratch};
use engine::drivers::qcow2::create::CreateOptions;
use engine::drivers::qcow2::{self, Qcow2Options};
use engine::image::{self, Format, ImageOptions};
use engine::{IoBuf, Node, WriteFlags, ZeroFlags};
use graph::{Driver, LocalBoxFuture};
use iothreads::BufResult;

const CHILD_ENV: &str = "STRATA_QCOW2_CRASH_CHILD";
const SECTOR: u64 = 512;

// ---------------------------------------------------------------------------------------------
// Small deterministic helpers
// ---------------------------------------------------------------------------------------------

/// The base image's content: a pattern in its first 7/8, unallocated (zeroes) after.
fn base_content(size: u64) -> Vec<u8> {
    let mut v = seeded_data(0xBA5E, size as usize);
    let tail = (size - size / 8) as usize;
    v[tail..].fill(0);
    v
}

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    iothreads::block_on_current(Default::default(), f).expect("io_uring")
}

fn seed_from_env(default: u64) -> u64 {
    std::env::var("STRATA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// QEMU as the oracle
// ---------------------------------------------------------------------------------------------

/// `qemu-img check`: Ok(leaks) if there is no corruption (exit 0, or 3 with leaks only).
fn qemu_check(path: &Path) -> Result<u64, String> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap_or(-1);
    let lower = text.to_lowercase();
    let bad = lower.contains("error") && !lower.contains("no errors were found")
        || lower.contains("corrupt");
    match code {
        0 if !bad => Ok(0),
        3 if !bad && lower.contains("leaked clusters") => {
            let n = text
                .lines()
                .find(|l| l.contains("leaked clusters were found"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            Ok(n)
        }
        _ => {
            // The leak list can be long: keep the errors and the summary.
            let leaked = text
                .lines()
                .filter(|l| l.starts_with("Leaked cluster"))
                .count();
            let rest: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("Leaked cluster") && !l.is_empty())
                .collect();
            Err(format!(
                "qemu-img check exit {code} ({leaked} 'Leaked cluster' lines omitted):\n{}",
                rest.join("\n")
            ))
        }
    }
}

/// The guest content as QEMU reads it (`qemu-img convert -O raw`).
fn qemu_content(path: &Path) -> Result<Vec<u8>, String> {
    let raw = Scratch::new_in("/dev/shm", "crash-conv");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&raw.0)
        .output()
        .expect("run qemu-img convert");
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::read(&raw.0).map_err(|e| e.to_string())
}

async fn read_all(node: &Node) -> std::io::Result<Vec<u8>> {
    let len = node.len() as usize;
    let mut out = vec![0u8; len];
    let chunk = 4 << 20;
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        let (r, b) = node.read(off as u64, IoBuf::new(n)).await;
        r?;
        out[off..off + n].copy_from_slice(&b);
        off += n;
    }
    Ok(out)
}

/// The guest content as strata reads it (the image and its backing chain, read-only).
fn strata_content(path: &Path, direct: bool) -> Result<Vec<u8>, String> {
    let p = path.to_path_buf();
    run(async move {
        let opts = ImageOptions {
            format: Some(Format::Qcow2),
            read_only: true,
            direct,
            ..Default::default()
        };
        let node = image::open(&p, &opts)
            .await
            .map_err(|e| format!("strata cannot open the image: {e}"))?;
        let data = read_all(&node)
            .await
            .map_err(|e| format!("strata cannot read the image: {e}"));
        let _ = node.close_if_last().await;
        data
    })
}

/// Creates a qcow2 base image at `path` holding `base_content(size)` (flushed and closed).
fn make_base(path: &Path, cs: u64, size: u64, direct: bool) {
    let p = path.to_path_buf();
    run(async move {
        image::create(
            &p,
            Format::Qcow2,
            &CreateOptions {
                size,
                cluster_size: cs,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let node = image::open(
            &p,
            &ImageOptions {
                direct,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let data = base_content(size);
        let filled = size - size / 8;
        let chunk = 1 << 20;
        let mut off = 0;
        while off < filled {
            let n = chunk.min(filled - off);
            let (r, _) = node
                .write(
                    off,
                    IoBuf::from_slice(&data[off as usize..(off + n) as usize]),
                    WriteFlags::default(),
                )
                .await;
            r.unwrap();
            off += n;
        }
        node.flush().await.unwrap();
        node.close_if_last().await.unwrap();
    });
}

fn overlay_options(base: &Path, cs: u64, size: u64, refcount_bits: u32) -> CreateOptions {
    CreateOptions {
        size,
        cluster_size: cs,
        refcount_bits,
        backing_file: Some(base.to_str().unwrap().to_string()),
        backing_format: Some("qcow2".to_string()),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The model of guest requests and the read-back rule
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Data from `seeded_data(seed, len)`.
    Write(u64),
    /// write_zeroes (with or without may_unmap).
    Zero(bool),
    /// Discard: whole clusters read as zeroes (if they were allocated) or as before.
    Discard,
    Flush,
}

#[derive(Debug, Clone, Copy)]
struct GuestOp {
    off: u64,
    len: u64,
    kind: Kind,
}

impl GuestOp {
    /// The bytes the op may change.
    fn effect(&self, cs: u64) -> Option<(u64, u64)> {
        match self.kind {
            Kind::Flush => None,
            Kind::Discard => {
                let a = self.off.div_ceil(cs) * cs;
                let b = (self.off + self.len) / cs * cs;
                (a < b).then_some((a, b))
            }
            _ => (self.len > 0).then_some((self.off, self.off + self.len)),
        }
    }

    /// The new content of `effect`.
    fn data(&self, cs: u64) -> Vec<u8> {
        let Some((a, b)) = self.effect(cs) else {
            return Vec::new();
        };
        match self.kind {
            Kind::Write(seed) => seeded_data(seed, (b - a) as usize),
            _ => vec![0u8; (b - a) as usize],
        }
    }

    /// The range widened to whole clusters (for disjointness of concurrent requests).
    fn cluster_span(&self, cs: u64) -> (u64, u64) {
        (self.off / cs * cs, (self.off + self.len).div_ceil(cs) * cs)
    }
}

/// What must and may be read back after a crash.
struct Expectation {
    cs: u64,
    /// Content every guaranteed request (acknowledged before a completed flush) left.
    durable: Vec<u8>,
    /// Guest clusters a guaranteed request touched.
    touched: Vec<bool>,
    /// Bytes that may also read as zeroes: discarded while unallocated in the overlay (strata
    /// leaves such a cluster alone, so it keeps showing the backing file; QEMU makes it a
    /// zero cluster; the content of a discarded range is unspecified).
    maybe_zero: Option<Vec<bool>>,
    /// Requests not guaranteed (issued after that flush): each with its new data.
    candidates: Vec<(GuestOp, Vec<u8>)>,
}

impl Expectation {
    /// `base`: the content before any request; `guaranteed` in completion order.
    fn new(base: &[u8], cs: u64, guaranteed: &[GuestOp], candidates: &[GuestOp]) -> Expectation {
        let mut durable = base.to_vec();
        let mut touched = vec![false; base.len().div_ceil(cs as usize)];
        // Clusters a guaranteed write or zero write touched (so allocated, or zero clusters).
        let mut allocated = touched.clone();
        let mut maybe_zero: Option<Vec<bool>> = None;
        for op in guaranteed {
            let Some((a, b)) = op.effect(cs) else {
                continue;
            };
            match op.kind {
                Kind::Discard => {
                    // Allocated clusters become zero clusters; unallocated ones read as before
                    // or as zeroes.
                    for c in a / cs..b / cs {
                        let r = (c * cs) as usize..((c + 1) * cs) as usize;
                        if allocated[c as usize] {
                            durable[r.clone()].fill(0);
                            if let Some(z) = maybe_zero.as_mut() {
                                z[r].fill(false);
                            }
                        } else {
                            maybe_zero.get_or_insert_with(|| vec![false; base.len()])[r].fill(true);
                        }
                        touched[c as usize] = true;
                    }
                }
                _ => {
                    durable[a as usize..b as usize].copy_from_slice(&op.data(cs));
                    if let Some(z) = maybe_zero.as_mut() {
                        z[a as usize..b as usize].fill(false);
                    }
                    for c in a / cs..b.div_ceil(cs) {
                        touched[c as usize] = true;
                        allocated[c as usize] = true;
                    }
                }
            }
        }
        let candidates = candidates
            .iter()
            .filter(|o| o.effect(cs).is_some())
            .map(|o| (*o, o.data(cs)))
            .collect();
        Expectation {
            cs,
            durable,
            touched,
            maybe_zero,
            candidates,
        }
    }

    /// Whether `actual[s..e]` is the durable content (where allowed, zeroes instead).
    fn is_durable(&self, actual: &[u8], s: usize, e: usize) -> bool {
        if actual[s..e] == self.durable[s..e] {
            return true;
        }
        let Some(z) = &self.maybe_zero else {
            return false;
        };
        (s..e).all(|i| actual[i] == self.durable[i] || (z[i] && actual[i] == 0))
    }

    fn describe_candidates(&self) -> String {
        let mut s = String::new();
        for (o, _) in &self.candidates {
            s += &format!("    {:?} at {:#x}+{:#x}\n", o.kind, o.off, o.len);
        }
        s
    }

    /// Checks `actual` (the guest content read back) against the rule.
    fn verify(&self, actual: &[u8]) -> Result<(), String> {
        if actual.len() != self.durable.len() {
            return Err(format!(
                "guest size {} instead of {}",
                actual.len(),
                self.durable.len()
            ));
        }
        let cs = self.cs;
        let mut ranges: Vec<(u64, u64)> = self
            .candidates
            .iter()
            .map(|(o, _)| o.effect(cs).unwrap())
            .collect();
        ranges.sort();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(m) if a <= m.1 => m.1 = m.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        // Outside every unflushed request: exactly the durable content.
        let mut pos = 0u64;
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        for &(a, b) in &merged {
            gaps.push((pos, a));
            pos = b;
        }
        gaps.push((pos, actual.len() as u64));
        for (a, b) in gaps {
            if !self.is_durable(actual, a as usize, b as usize) {
                let z = self.maybe_zero.as_ref();
                let i = (a..b)
                    .find(|&i| {
                        let i = i as usize;
                        actual[i] != self.durable[i] && !(z.is_some_and(|z| z[i]) && actual[i] == 0)
                    })
                    .unwrap();
                return Err(format!(
                    "byte {i:#x} (guest cluster {}) differs from its durable content and no \
                     unflushed request covers it: read {:02x?}, expected {:02x?}\n  unflushed \
                     requests:\n{}",
                    i / cs,
                    &actual[i as usize..(i as usize + 16).min(actual.len())],
                    &self.durable[i as usize..(i as usize + 16).min(actual.len())],
                    self.describe_candidates()
                ));
            }
        }
        // Inside: each piece (cut at request boundaries and at 512-byte boundaries) is its
        // durable content or the new content of one unflushed request covering it.
        let mut cuts: Vec<u64> = Vec::new();
        for (o, _) in &self.candidates {
            let (a, b) = o.effect(cs).unwrap();
            cuts.push(a);
            cuts.push(b);
        }
        cuts.sort();
        cuts.dedup();
        let mut ci = 0;
        for &(a, b) in &merged {
            let mut s = a;
            while s < b {
                while ci < cuts.len() && cuts[ci] <= s {
                    ci += 1;
                }
                let next_sector = (s / SECTOR + 1) * SECTOR;
                let e = next_sector
                    .min(b)
                    .min(cuts.get(ci).copied().unwrap_or(u64::MAX));
                let piece = &actual[s as usize..e as usize];
                if !self.is_durable(actual, s as usize, e as usize) {
                    let ok = self.candidates.iter().any(|(o, d)| {
                        let (oa, ob) = o.effect(cs).unwrap();
                        oa <= s && e <= ob && &d[(s - oa) as usize..(e - oa) as usize] == piece
                    });
                    if !ok {
                        return Err(format!(
                            "bytes {s:#x}..{e:#x} (guest cluster {}) read as neither their \
                             durable content nor the data of an unflushed request: read \
                             {:02x?}, durable {:02x?}\n  unflushed requests:\n{}",
                            s / cs,
                            &piece[..piece.len().min(16)],
                            &self.durable[s as usize..(s as usize + 16).min(e as usize)],
                            self.describe_candidates()
                        ));
                    }
                }
                s = e;
            }
        }
        // Clusters only one unflushed request ever touched (allocations): all old or all new.
        let mut count: HashMap<u64, usize> = HashMap::new();
        for (o, _) in &self.candidates {
            let (a, b) = o.effect(cs).unwrap();
            for c in a / cs..b.div_ceil(cs) {
                *count.entry(c).or_default() += 1;
            }
        }
        for (o, d) in &self.candidates {
            let (a, b) = o.effect(cs).unwrap();
            for c in a / cs..b.div_ceil(cs) {
                if self.touched[c as usize] || count[&c] > 1 {
                    continue;
                }
                let (s, e) = (a.max(c * cs), b.min((c + 1) * cs));
                let piece = &actual[s as usize..e as usize];
                if piece != &self.durable[s as usize..e as usize]
                    && piece != &d[(s - a) as usize..(e - a) as usize]
                {
                    return Err(format!(
                        "guest cluster {c} was written only by the unflushed {:?} at \
                         {:#x}+{:#x} (an allocation), yet reads as a mix of old and new data",
                        o.kind, o.off, o.len
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks an image after a crash: qemu-img check, then the content through QEMU and strata.
fn check_crashed(path: &Path, direct: bool, exp: &Expectation) -> Result<u64, String> {
    let leaks = qemu_check(path)?;
    let q = qemu_content(path)?;
    exp.verify(&q).map_err(|e| format!("QEMU reads: {e}"))?;
    let s = strata_content(path, direct)?;
    if s != q {
        let i = s.iter().zip(&q).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "strata and QEMU read the image differently from byte {i:#x}"
        ));
    }
    Ok(leaks)
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL
// ---------------------------------------------------------------------------------------------

/// One SIGKILL configuration: where the files live, the cluster size, O_DIRECT or not.
#[derive(Debug, Clone, Copy)]
struct KillConfig {
    dir: &'static str,
    cs: u64,
    size: u64,
    direct: bool,
}

/// Picks a request range: sizes 512 B .. 200 KiB, offsets byte-, sector- or cluster-aligned.
fn pick_range(rng: &mut Rng, size: u64, cs: u64) -> (u64, u64) {
    let len = rng.log_range(512, 200 << 10).min(size);
    let mut off = rng.below(size - len + 1);
    match rng.below(3) {
        0 => {}
        1 => off = off / SECTOR * SECTOR,
        _ => off = off / cs * cs,
    }
    (off, len)
}

/// The child writer: only does something when the parent sets `CHILD_ENV`.
#[test]
fn sigkill_child_writer() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let f: Vec<&str> = spec.split('|').collect();
    let path = PathBuf::from(f[0]);
    let seed: u64 = f[1].parse().unwrap();
    let direct = f[2] == "1";
    let cache_size: u64 = f[3].parse().unwrap();
    let cs: u64 = f[4].parse().unwrap();
    run(async move {
        let node = image::open(
            &path,
            &ImageOptions {
                direct,
                qcow2: Qcow2Options {
                    cache_size,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let size = node.len();
        // (On a line of its own: the harness has printed "test ... " without a newline.)
        println!("\n@READY");
        let mut rng = Rng::new(seed);
        let mut idx = 0u64;
        let mut unreported: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            // A batch of 1-3 concurrent writes on disjoint bytes (they may share clusters).
            let k = rng.range(1, 3);
            let mut batch: Vec<(u64, u64, u64)> = Vec::new();
            for _ in 0..k * 4 {
                if batch.len() as u64 == k {
                    break;
                }
                let (off, len) = pick_range(&mut rng, size, cs);
                if batch
                    .iter()
                    .all(|&(o, l, _)| off + len <= o || o + l <= off)
                {
                    batch.push((off, len, rng.next()));
                }
            }
            let mut handles = Vec::new();
            for &(off, len, s) in &batch {
                println!("@W {idx} {off} {len} {s}");
                idx += 1;
                let n = Arc::clone(&node);
                handles.push(iothreads::spawn_local(async move {
                    let data = seeded_data(s, len as usize);
                    let (r, _) = n
                        .write(off, IoBuf::from_slice(&data), WriteFlags::default())
                        .await;
                    r
                }));
            }
            for h in handles {
                h.await.unwrap().expect("write");
            }
            for &(off, len, s) in &batch {
                unreported.push(format!("{off}:{len}:{s}"));
            }
            if rng.chance(1, 4) {
                node.flush().await.expect("flush");
                // Everything acknowledged so far is durable: the writes since the last line.
                println!("@F {idx} {}", unreported.join(","));
                unreported.clear();
            }
        }
        println!("@DONE");
    });
}

/// Waits until no process holds a QEMU-style image lock on `path` (bytes 100..300). A killed
/// process's io_uring is torn down asynchronously: its files (and their locks) close, and
/// its in-flight writes land, a little after `wait` returns. The released lock is the sign
/// that nothing will change the image any more.
fn wait_unlocked(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let t0 = Instant::now();
    loop {
        // SAFETY: `flock` is plain old data; all zeroes is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = 100;
        fl.l_len = 201;
        // SAFETY: fcntl on a descriptor we own, with a pointer to a live flock.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
        if fl.l_type == libc::F_UNLCK as i16 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{} is still locked 20s after its writer was killed",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What the parent learnt from a killed child.
#[derive(Default)]
struct ChildLog {
    /// Every write the child started, by index.
    writes: Vec<GuestOp>,
    /// How many writes (a prefix) were acknowledged before the last completed flush.
    flushed: usize,
    flushes: usize,
    done: bool,
}

fn parse_child(lines: &[String]) -> ChildLog {
    let mut log = ChildLog::default();
    let mut reported = 0usize;
    for l in lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.first().copied() {
            Some("@W") => {
                let idx: usize = w[1].parse().unwrap();
                assert_eq!(idx, log.writes.len(), "child log out of order");
                log.writes.push(GuestOp {
                    off: w[2].parse().unwrap(),
                    len: w[3].parse().unwrap(),
                    kind: Kind::Write(w[4].parse().unwrap()),
                });
            }
            Some("@F") => {
                let n: usize = w[1].parse().unwrap();
                let entries: Vec<&str> = w.get(2).map_or(Vec::new(), |s| s.split(',').collect());
                // The flush line lists the writes acknowledged since the previous one: they
                // must be exactly the intents logged in between.
                assert_eq!(reported + entries.len(), n, "flush line count");
                for (i, e) in entries.iter().enumerate() {
                    let p: Vec<u64> = e.split(':').map(|x| x.parse().unwrap()).collect();
                    let op = log.writes[reported + i];
                    assert_eq!((op.off, op.len, op.kind), (p[0], p[1], Kind::Write(p[2])));
                }
                reported = n;
                log.flushed = n;
                log.flushes += 1;
            }
            Some("@DONE") => log.done = true,
            _ => {}
        }
    }
    log
}

struct KillStats {
    rounds: usize,
    writes: usize,
    flushed: usize,
    flushes: usize,
    leaks: u64,
    finished: usize,
}

fn sigkill_rounds(cfg: KillConfig, rounds: usize, seed: u64) {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    let t0 = Instant::now();
    let tag = format!("kill{}", cfg.cs);
    let base = Scratch::new_in(cfg.dir, &format!("{tag}-base"));
    let template = Scratch::new_in(cfg.dir, &format!("{tag}-top0"));
    make_base(&base.0, cfg.cs, cfg.size, cfg.direct);
    {
        let (t, o) = (
            template.0.clone(),
            overlay_options(&base.0, cfg.cs, cfg.size, 16),
        );
        run(async move { image::create(&t, Format::Qcow2, &o).await.unwrap() });
    }
    let base_data = base_content(cfg.size);
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::new(seed);
    let mut st = KillStats {
        rounds: 0,
        writes: 0,
        flushed: 0,
        flushes: 0,
        leaks: 0,
        finished: 0,
    };
    for round in 0..rounds {
        let child_seed = rng.next();
        let delay = Duration::from_millis(rng.log_range(3, 150));
        let cache_size = if rng.chance(1, 2) { 0 } else { 32 << 20 };
        let img = Scratch::new_in(cfg.dir, &format!("{tag}-top"));
        std::fs::copy(&template.0, &img.0).unwrap();
        let spec = format!(
            "{}|{child_seed}|{}|{cache_size}|{}",
            img.path(),
            u8::from(cfg.direct),
            cfg.cs
        );
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "sigkill_child_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut r = BufReader::new(stdout);
            let mut buf = String::new();
            // Only whole lines count: a line cut by the kill has no newline.
            while r.read_line(&mut buf).unwrap_or(0) > 0 {
                if buf.ends_with('\n') && buf.starts_with('@') {
                    if buf.starts_with("@READY") {
                        let _ = ready_tx.send(());
                    }
                    lines.push(buf.trim_end().to_string());
                }
                buf.clear();
            }
            lines
        });
        let ready = ready_rx.recv_timeout(Duration::from_secs(30)).is_ok();
        if ready {
            std::thread::sleep(delay);
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        let lines = reader.join().unwrap();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        use std::os::unix::process::ExitStatusExt;
        assert!(
            ready && (status.success() || status.signal() == Some(libc::SIGKILL)),
            "round {round} (child seed {child_seed}): the child writer failed ({status:?}):\n{}\n{stderr}",
            lines.join("\n")
        );
        wait_unlocked(&img.0);
        let log = parse_child(&lines);
        let exp = Expectation::new(
            &base_data,
            cfg.cs,
            &log.writes[..log.flushed],
            &log.writes[log.flushed..],
        );
        match check_crashed(&img.0, cfg.direct, &exp) {
            Ok(leaks) => st.leaks += leaks,
            Err(e) => {
                let keep = format!("{}.failed", img.path());
                let _ = std::fs::copy(&img.0, &keep);
                panic!(
                    "{cfg:?} round {round} (test seed {seed}, child seed {child_seed}, kill after \
                     {delay:?}, cache {cache_size}): {} writes, {} acknowledged before the last \
                     of {} completed flushes: {e}\n(image kept as {keep}; base {})",
                    log.writes.len(),
                    log.flushed,
                    log.flushes,
                    base.path()
                );
            }
        }
        st.rounds += 1;
        st.writes += log.writes.len();
        st.flushed += log.flushed;
        st.flushes += log.flushes;
        st.finished += usize::from(log.done);
    }
    assert!(
        st.flushes > 0,
        "{cfg:?}: no child completed a flush before its kill"
    );
    eprintln!(
        "sigkill {cfg:?}: {} rounds, {} writes ({} durable), {} flushes, {} leaked clusters, \
         {} children finished before the kill, {:.1}s",
        st.rounds,
        st.writes,
        st.flushed,
        st.flushes,
        st.leaks,
        st.finished,
        t0.elapsed().as_secs_f64()
    );
}

const SHM_64K: KillConfig = KillConfig {
    dir: "/dev/shm",
    cs: 64 << 10,
    size: 32 << 20,
    direct: false,
};
const SHM_4K: KillConfig = KillConfig {
    dir: "/dev/shm",
    cs: 4 << 10,
    size: 32 << 20,
    direct: false,
};
const DISK_64K: KillConfig = KillConfig {
    dir: "/var/tmp",
    cs: 64 << 10,
    size: 32 << 20,
    direct: true,
};
const DISK_4K: KillConfig = KillConfig {
    dir: "/var/tmp",
    cs: 4 << 10,
    size: 32 << 20,
    direct: true,
};

#[test]
fn sigkill_64k_shm() {
    sigkill_rounds(SHM_64K, 14, seed_from_env(1));
}

#[test]
fn sigkill_4k_shm() {
    sigkill_rounds(SHM_4K, 14, seed_from_env(2));
}

#[test]
fn sigkill_64k_direct_disk() {
    sigkill_rounds(DISK_64K, 14, seed_from_env(3));
}

#[test]
fn sigkill_4k_direct_disk() {
    sigkill_rounds(DISK_4K, 14, seed_from_env(4));
}

/// 500 rounds across the four configurations.
#[test]
#[ignore = "long: 500 SIGKILL rounds"]
fn sigkill_rounds_long() {
    for (i, cfg) in [SHM_64K, SHM_4K, DISK_64K, DISK_4K].into_iter().enumerate() {
        sigkill_rounds(cfg, 125, seed_from_env(100 + i as u64));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Power loss: a recording protocol driver
// ---------------------------------------------------------------------------------------------

/// One entry of the recording: disk requests as the disk saw them, and guest request
/// boundaries (so a crash point knows which guest requests had completed).
#[derive(Debug, Clone)]
enum Ev {
    Write { off: u64, data: Arc<[u8]> },
    Flush,
    Start(usize),
    End(usize),
}

type Log = Arc<Mutex<Vec<Ev>>>;

/// A protocol driver keeping the disk in memory: reads and writes go to a byte vector, and
/// every write and flush is appended to a shared log. Requests complete at once.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    log: Log,
}

impl MemDisk {
    fn new(log: Log) -> MemDisk {
        MemDisk {
            data: Mutex::new(Vec::new()),
            log,
        }
    }

    fn store(&self, off: u64, bytes: &[u8]) {
        {
            let mut d = self.data.lock().unwrap();
            let end = off as usize + bytes.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[off as usize..end].copy_from_slice(bytes);
        }
        self.log.lock().unwrap().push(Ev::Write {
            off,
            data: bytes.into(),
        });
    }

    fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl Driver for MemDisk {
    fn driver_name(&self) -> &'static str {
        "test-memdisk"
    }

    fn length(&self, _: &Node) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        mut buf: IoBuf,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            let d = self.data.lock().unwrap();
            let n = buf.len();
            let off = offset as usize;
            let have = d.len().saturating_sub(off).min(n);
            if have > 0 {
                buf[..have].copy_from_slice(&d[off..off + have]);
            }
            buf[have..].fill(0);
            (Ok(()), buf)
        })
    }

    fn write<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            self.store(offset, &buf);
            if flags.fua {
                self.log.lock().unwrap().push(Ev::Flush);
            }
            (Ok(()), buf)
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            self.store(offset, &vec![0u8; len as usize]);
            if flags.fua {
                self.log.lock().unwrap().push(Ev::Flush);
            }
            Ok(())
        })
    }

    fn discard<'a>(
        &'a self,
        _: &'a Node,
        _offset: u64,
        _len: u64,
    ) -> LocalBoxFuture<'a, std::io::Result<()>> {
        // Content unspecified afterwards: keeping it is a valid choice.
        Box::pin(async { Ok(()) })
    }

    fn flush<'a>(&'a self, _: &'a Node) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            self.log.lock().unwrap().push(Ev::Flush);
            Ok(())
        })
    }
}

/// One power-loss configuration.
#[derive(Debug, Clone, Copy)]
struct LossConfig {
    cs: u64,
    refcount_bits: u32,
    size: u64,
    /// qcow2 cache size (0: the minimum, 16 tables, so cache pressure writes back).
    cache_size: u64,
    steps: usize,
}

/// A recorded workload: the overlay's bytes before it, the log, and the guest requests.
struct Recording {
    initial: Vec<u8>,
    log: Vec<Ev>,
    ops: Vec<GuestOp>,
}

/// Creates the overlay in a memory disk and runs a random workload through a qcow2 node over
/// it, recording every disk write and flush.
fn record_workload(cfg: LossConfig, base: &Path, seed: u64) -> Recording {
    let base = base.to_path_buf();
    run(async move {
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let disk = Node::new(None, Box::new(MemDisk::new(Arc::clone(&log))), false).unwrap();
        let name = base.file_name().unwrap().to_str().unwrap().to_string();
        qcow2::create::create(
            &disk,
            &overlay_options(Path::new(&name), cfg.cs, cfg.size, cfg.refcount_bits),
        )
        .await
        .unwrap();
        let initial = disk.driver_as::<MemDisk>().unwrap().contents();
        log.lock().unwrap().clear();
        let top = qcow2::open(
            None,
            &disk,
            &Qcow2Options {
                cache_size: cfg.cache_size,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let backing = image::open(
            &base,
            &ImageOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        {
            let m = graph::mutation();
            let mut tx = graph::Transaction::new(&m);
            tx.set_backing(&top, Some(&backing)).unwrap();
            tx.commit().unwrap();
        }
        let mut ops: Vec<GuestOp> = Vec::new();
        let mut rng = Rng::new(seed);
        let (size, cs) = (cfg.size, cfg.cs);
        for _ in 0..cfg.steps {
            let mut batch: Vec<GuestOp> = Vec::new();
            let k = rng.range(1, 3);
            for _ in 0..k * 4 {
                if batch.len() as u64 == k {
                    break;
                }
                let (off, len) = pick_range(&mut rng, size, cs);
                let kind = match rng.below(10) {
                    0..=5 => Kind::Write(rng.next()),
                    6 | 7 => Kind::Zero(rng.chance(1, 2)),
                    _ => Kind::Discard,
                };
                let op = GuestOp { off, len, kind };
                // Concurrent requests touch disjoint bytes; zeroes and discards (which
                // change whole clusters' entries) disjoint clusters.
                let disjoint = batch.iter().all(|o| {
                    let wide = |x: &GuestOp| !matches!(x.kind, Kind::Write(_));
                    let (a, b) = if wide(o) || wide(&op) {
                        (o.cluster_span(cs), op.cluster_span(cs))
                    } else {
                        ((o.off, o.off + o.len), (op.off, op.off + op.len))
                    };
                    a.1 <= b.0 || b.1 <= a.0
                });
                if disjoint {
                    batch.push(op);
                }
            }
            // Sometimes a flush runs concurrently with the batch: it need not cover it.
            if rng.chance(1, 4) {
                batch.push(GuestOp {
                    off: 0,
                    len: 0,
                    kind: Kind::Flush,
                });
            }
            let alone_flush = rng.chance(1, 5);
            let mut handles = Vec::new();
            for op in batch {
                ops.push(op);
                let id = ops.len() - 1;
                let (n, log) = (Arc::clone(&top), Arc::clone(&log));
                handles.push(iothreads::spawn_local(async move {
                    log.lock().unwrap().push(Ev::Start(id));
                    let r = match op.kind {
                        Kind::Write(s) => {
                            let data = seeded_data(s, op.len as usize);
                            n.write(op.off, IoBuf::from_slice(&data), WriteFlags::default())
                                .await
                                .0
                        }
                        Kind::Zero(unmap) => {
                            n.write_zeroes(
                                op.off,
                                op.len,
                                ZeroFlags {
                                    may_unmap: unmap,
                                    ..Default::default()
                                },
                            )
                            .await
                        }
                        Kind::Discard => n.discard(op.off, op.len).await,
                        Kind::Flush => n.flush().await,
                    };
                    log.lock().unwrap().push(Ev::End(id));
                    r.map_err(|e| format!("{op:?}: {e}"))
                }));
            }
            for h in handles {
                h.await.unwrap().unwrap();
            }
            if alone_flush {
                ops.push(GuestOp {
                    off: 0,
                    len: 0,
                    kind: Kind::Flush,
                });
                let id = ops.len() - 1;
                log.lock().unwrap().push(Ev::Start(id));
                top.flush().await.unwrap();
                log.lock().unwrap().push(Ev::End(id));
            }
        }
        // The workload's final state must itself be right (no crash: everything reads back).
        let exp = Expectation::new(&base_content(size), cs, &ops, &[]);
        let got = read_all(&top).await.unwrap();
        exp.verify(&got)
            .unwrap_or_else(|e| panic!("seed {seed}: strata reads back other data: {e}"));
        let log = log.lock().unwrap().clone();
        Recording { initial, log, ops }
    })
}

/// Where each guest request started and ended in the log.
fn markers(rec: &Recording) -> (Vec<usize>, Vec<usize>) {
    let mut start = vec![usize::MAX; rec.ops.len()];
    let mut end = vec![usize::MAX; rec.ops.len()];
    for (i, e) in rec.log.iter().enumerate() {
        match e {
            Ev::Start(id) => start[*id] = i,
            Ev::End(id) => end[*id] = i,
            _ => {}
        }
    }
    (start, end)
}

/// The disk after a power loss just before log entry `p`, and a description of what was done:
/// every write before the last flush, then a random subset of the later ones in a random
/// order (nothing but a flush orders writes), perhaps one torn.
fn disk_after_crash(rec: &Recording, p: usize, rng: &mut Rng) -> (Vec<u8>, String) {
    disk_after_crash_on(rec, p, rng, true)
}

/// As [`disk_after_crash`]; `honour_flushes` false: a broken disk that ignores flushes.
fn disk_after_crash_on(
    rec: &Recording,
    p: usize,
    rng: &mut Rng,
    honour_flushes: bool,
) -> (Vec<u8>, String) {
    let last_flush = if honour_flushes {
        rec.log[..p].iter().rposition(|e| matches!(e, Ev::Flush))
    } else {
        None
    };
    let mut disk = rec.initial.clone();
    let apply = |disk: &mut Vec<u8>, off: u64, data: &[u8]| {
        let end = off as usize + data.len();
        if disk.len() < end {
            disk.resize(end, 0);
        }
        disk[off as usize..end].copy_from_slice(data);
    };
    let from = match last_flush {
        Some(f) => {
            for e in &rec.log[..f] {
                if let Ev::Write { off, data } = e {
                    apply(&mut disk, *off, data);
                }
            }
            f + 1
        }
        None => 0,
    };
    // Unflushed writes: a random subset, in a random order, perhaps one torn.
    let mut pending: Vec<usize> = (from..p)
        .filter(|&i| matches!(rec.log[i], Ev::Write { .. }))
        .collect();
    // Keep each with probability keep/3: none, 1/3, 2/3, all (a broken disk: 1/3).
    let keep = if honour_flushes {
        [0, 1, 2, 3, 3][rng.below(5) as usize]
    } else {
        1
    };
    pending.retain(|_| rng.below(3) < keep);
    for i in (1..pending.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        pending.swap(i, j);
    }
    let tear = if !pending.is_empty() && rng.chance(1, 3) {
        Some(rng.below(pending.len() as u64) as usize)
    } else {
        None
    };
    let mut what = format!(
        "last disk flush at log entry {last_flush:?}; applied {} unflushed write(s) of {} in \
         order {pending:?}",
        pending.len(),
        (from..p)
            .filter(|&i| matches!(rec.log[i], Ev::Write { .. }))
            .count()
    );
    for (k, &i) in pending.iter().enumerate() {
        let Ev::Write { off, data } = &rec.log[i] else {
            unreachable!()
        };
        let mut data: &[u8] = data;
        if tear == Some(k) {
            let end = off + data.len() as u64;
            let first = (off / SECTOR + 1) * SECTOR;
            if first < end {
                let cut = first + rng.below((end - first).div_ceil(SECTOR)) * SECTOR;
                data = &data[..(cut - off) as usize];
                what += &format!("; entry {i} torn at {cut:#x}");
            }
        }
        apply(&mut disk, *off, data);
    }
    (disk, what)
}

/// What must and may read back after a crash before log entry `p`.
fn expectation_at(
    rec: &Recording,
    base: &[u8],
    cs: u64,
    p: usize,
    marks: &(Vec<usize>, Vec<usize>),
) -> (Expectation, String) {
    let (start, end) = marks;
    // The completed guest flush that started last.
    let flush = (0..rec.ops.len())
        .filter(|&i| rec.ops[i].kind == Kind::Flush && end[i] < p)
        .max_by_key(|&i| start[i]);
    let cut = flush.map_or(0, |f| start[f]);
    let mut guaranteed: Vec<usize> = (0..rec.ops.len())
        .filter(|&i| rec.ops[i].kind != Kind::Flush && end[i] < cut)
        .collect();
    guaranteed.sort_by_key(|&i| end[i]);
    let candidates: Vec<GuestOp> = (0..rec.ops.len())
        .filter(|&i| rec.ops[i].kind != Kind::Flush && start[i] < p && end[i] >= cut)
        .map(|i| rec.ops[i])
        .collect();
    let g: Vec<GuestOp> = guaranteed.iter().map(|&i| rec.ops[i]).collect();
    let what = format!(
        "guest flush {flush:?} completed last; {} guest requests guaranteed, {} unflushed",
        g.len(),
        candidates.len()
    );
    (Expectation::new(base, cs, &g, &candidates), what)
}

static LOSS_N: AtomicUsize = AtomicUsize::new(0);

fn power_loss(cfg: LossConfig, points: usize, seed: u64) {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    let t0 = Instant::now();
    let tag = format!("loss{}", cfg.cs);
    let base = Scratch::new_in("/dev/shm", &format!("{tag}-base"));
    make_base(&base.0, cfg.cs, cfg.size, false);
    // The overlay names its backing file by a short relative name (a symlink beside the
    // crash images): with 512-byte clusters the header, its feature table and the name must
    // fit in 512 bytes.
    let link = Scratch(PathBuf::from(format!(
        "/dev/shm/sb{}-{}",
        std::process::id(),
        LOSS_N.fetch_add(1, Ordering::Relaxed)
    )));
    std::os::unix::fs::symlink(&base.0, &link.0).unwrap();
    let base_data = base_content(cfg.size);
    let rec = record_workload(cfg, &link.0, seed);
    let marks = markers(&rec);
    let disk_events: Vec<usize> = (0..rec.log.len())
        .filter(|&i| matches!(rec.log[i], Ev::Write { .. } | Ev::Flush))
        .collect();
    let flushes: Vec<usize> = disk_events
        .iter()
        .copied()
        .filter(|&i| matches!(rec.log[i], Ev::Flush))
        .collect();
    let mut rng = Rng::new(seed ^ 0xC0FFEE);
    let mut leaks = 0;
    // Flush windows that touch the header or the refcount table (new refcount blocks, a
    // growing table) are rare and matter most: a few crash points in each come first.
    let rt_writes = refcount_table_writes(&rec, cfg.cs);
    let special = table_windows(&rec, &rt_writes, cfg.cs);
    let headers = rec
        .log
        .iter()
        .filter(|e| matches!(e, Ev::Write { off: 0, .. }))
        .count();
    let mut planned: Vec<usize> = Vec::new();
    for &f in &special {
        planned.extend([f; 4]);
    }
    planned.truncate(points / 2);
    for k in 0..points {
        // Then half the crash points just before a disk flush (the widest unflushed window),
        // half anywhere (just before any disk request, or after the last).
        let p = if let Some(&f) = planned.get(k) {
            f
        } else if k % 2 == 0 && !flushes.is_empty() {
            flushes[rng.below(flushes.len() as u64) as usize]
        } else {
            let i = rng.below(disk_events.len() as u64 + 1) as usize;
            disk_events.get(i).copied().unwrap_or(rec.log.len())
        };
        let (disk, how) = disk_after_crash(&rec, p, &mut rng);
        let (exp, guest) = expectation_at(&rec, &base_data, cfg.cs, p, &marks);
        let img = Scratch::new_in(
            "/dev/shm",
            &format!("{tag}-crash{}", LOSS_N.fetch_add(1, Ordering::Relaxed)),
        );
        std::fs::write(&img.0, &disk).unwrap();
        match check_crashed(&img.0, false, &exp) {
            Ok(n) => leaks += n,
            Err(e) => {
                let keep = format!("{}.failed", img.path());
                let _ = std::fs::copy(&img.0, &keep);
                panic!(
                    "{cfg:?} seed {seed}, crash point {k}: power loss before log entry {p} of \
                     {}: {how}; {guest}:\n{e}\n(image kept as {keep}; base {})\nlog around the \
                     crash point:\n{}",
                    rec.log.len(),
                    base.path(),
                    describe_log(&rec, p)
                );
            }
        }
    }
    let writes = disk_events.len() - flushes.len();
    eprintln!(
        "power loss {cfg:?}: {} guest requests, {writes} disk writes ({headers} of the \
         header), {} disk flushes ({} after header or refcount table writes), {points} crash \
         points, {leaks} leaked clusters in all, {:.1}s",
        rec.ops.len(),
        flushes.len(),
        special.len(),
        t0.elapsed().as_secs_f64()
    );
}

/// Which log entries write the refcount table: the one the header names, or a new one (written
/// before the header write that switches to it, which names it). Guest data may come in
/// writes larger than a cluster (a multi-cluster write's run of host clusters), so a write is
/// told by where it goes, not by its size.
fn refcount_table_writes(rec: &Recording, cs: u64) -> Vec<bool> {
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let table_of = |b: &[u8]| (be64(b, 48), u64::from(be32(b, 56)) * cs);
    let is_header = |off: u64, data: &[u8]| off == 0 && data.len() >= 64;
    // For each entry, the table the next header write names.
    let mut next = vec![None; rec.log.len()];
    let mut ahead = None;
    for (i, e) in rec.log.iter().enumerate().rev() {
        next[i] = ahead;
        if let Ev::Write { off, data } = e {
            if is_header(*off, data) {
                ahead = Some(table_of(data));
            }
        }
    }
    let mut rt = table_of(&rec.initial);
    let mut out = vec![false; rec.log.len()];
    for (i, e) in rec.log.iter().enumerate() {
        if let Ev::Write { off, data } = e {
            let end = off + data.len() as u64;
            let hits = |t: (u64, u64)| *off < t.0 + t.1 && t.0 < end;
            out[i] = hits(rt) || next[i].is_some_and(hits);
            if is_header(*off, data) {
                rt = table_of(data);
            }
        }
    }
    out
}

/// The log indices of the disk flushes that end a window writing the header or a refcount
/// table: those with a header write (the table moved) first, then those writing a new table
/// (more than one cluster), then the others (a new block's entry in the table).
fn table_windows(rec: &Recording, rt_writes: &[bool], cs: u64) -> Vec<usize> {
    let mut out: Vec<(u8, usize)> = Vec::new();
    let mut rank = 0u8;
    for (i, e) in rec.log.iter().enumerate() {
        match e {
            Ev::Write { off, data } => {
                if *off == 0 {
                    rank = rank.max(3);
                } else if rt_writes[i] && data.len() as u64 > cs {
                    rank = rank.max(2);
                } else if rt_writes[i] {
                    rank = rank.max(1);
                }
            }
            Ev::Flush => {
                if rank > 0 {
                    out.push((rank, i));
                }
                rank = 0;
            }
            _ => {}
        }
    }
    out.sort_by_key(|&(r, i)| (std::cmp::Reverse(r), i));
    out.into_iter().map(|(_, i)| i).collect()
}

fn describe_log(rec: &Recording, p: usize) -> String {
    let from = rec.log[..p]
        .iter()
        .rposition(|e| matches!(e, Ev::Flush))
        .map_or(0, |f| f.saturating_sub(12));
    let mut s = String::new();
    for (i, e) in rec.log.iter().enumerate().take(p + 3).skip(from) {
        let mark = if i == p {
            "  <== crash before this"
        } else {
            ""
        };
        let line = match e {
            Ev::Write { off, data } => format!("write {off:#x}+{:#x}", data.len()),
            Ev::Flush => "flush".to_string(),
            Ev::Start(id) => format!("guest start #{id} {:?}", rec.ops[*id]),
            Ev::End(id) => format!("guest end #{id}"),
        };
        s += &format!("  [{i}] {line}{mark}\n");
    }
    s
}

const LOSS_64K: LossConfig = LossConfig {
    cs: 64 << 10,
    refcount_bits: 16,
    size: 4 << 20,
    cache_size: 32 << 20,
    steps: 120,
};
/// 4 KiB clusters, 64-bit refcounts: a refcount block covers 2 MiB of file, so the file
/// outgrows its first blocks and new ones are made.
const LOSS_4K: LossConfig = LossConfig {
    cs: 4 << 10,
    refcount_bits: 64,
    size: 4 << 20,
    cache_size: 32 << 20,
    steps: 120,
};
/// 512-byte clusters, 64-bit refcounts, the smallest cache: new refcount blocks, a refcount
/// table that grows (and moves), and writebacks forced by cache pressure.
const LOSS_512: LossConfig = LossConfig {
    cs: 512,
    refcount_bits: 64,
    size: 3 << 20,
    cache_size: 0,
    steps: 120,
};

#[test]
fn power_loss_64k() {
    power_loss(LOSS_64K, 80, seed_from_env(11));
}

#[test]
fn power_loss_4k() {
    power_loss(LOSS_4K, 80, seed_from_env(12));
}

#[test]
fn power_loss_512() {
    power_loss(LOSS_512, 80, seed_from_env(13));
}

/// 2100 crash points across the three configurations, over several workloads.
#[test]
#[ignore = "long: 2100 power-loss crash points"]
fn power_loss_long() {
    for s in 0..7 {
        for (i, cfg) in [LOSS_64K, LOSS_4K, LOSS_512].into_iter().enumerate() {
            power_loss(cfg, 100, seed_from_env(1000 + 10 * s + i as u64));
        }
    }
}

/// The power-loss check sees a missing flush: on a disk that ignores flushes (any write may
/// be lost), some crash points fail it. (SIGKILL keeps the page cache and cannot show this.)
#[test]
fn power_loss_sees_a_disk_that_ignores_flushes() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    let cfg = LOSS_64K;
    let base = Scratch::new_in("/dev/shm", "lossbad-base");
    make_base(&base.0, cfg.cs, cfg.size, false);
    let base_data = base_content(cfg.size);
    let rec = record_workload(cfg, &base.0, 21);
    let marks = markers(&rec);
    let mut rng = Rng::new(21);
    let mut failed = 0;
    let tries = 10;
    for _ in 0..tries {
        // A crash late in the workload, when many writes were flushed.
        let p = rec.log.len() - rng.below(rec.log.len() as u64 / 4) as usize;
        let (disk, _) = disk_after_crash_on(&rec, p, &mut rng, false);
        let (exp, _) = expectation_at(&rec, &base_data, cfg.cs, p, &marks);
        let img = Scratch::new_in("/dev/shm", "lossbad");
        std::fs::write(&img.0, &disk).unwrap();
        if check_crashed(&img.0, false, &exp).is_err() {
            failed += 1;
        }
    }
    eprintln!("a disk that ignores flushes: {failed} of {tries} crash points fail the check");
    assert!(
        failed >= tries / 2,
        "only {failed} of {tries} crash points on a disk that ignores flushes failed the check"
    );
}

// ---------------------------------------------------------------------------------------------
// Bugs found
// ---------------------------------------------------------------------------------------------

/// Runs `f` on its own IoThread; Err if it has not finished after `secs` (the thread is left
/// spinning: the test process ends with the test).
fn with_timeout(secs: u64, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => Ok(()),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("still running after {secs}s"))
        }
        Err(e) => Err(format!("the worker panicked ({e})")),
    }
}

/// Regression: when every table in the qcow2 table cache was dirty, loading another table
/// evicted the table just loaded (the only clean one) and the lookup reloaded it forever at
/// 100% CPU; `discard` and `write_zeroes` never wrote back on cache pressure. The power-loss
/// workload with the smallest cache hung there (fixed in 0428e5c while this test was written).
/// Here: 512-byte clusters, a 16-table cache, 1 MiB of data (32 L2 tables), flushed, then one
/// discard of the whole disk.
#[test]
fn no_livelock_on_a_discard_larger_than_the_table_cache() {
    let img = Scratch::new_in("/dev/shm", "livelock");
    let p = img.0.clone();
    let r = with_timeout(20, move || {
        run(async move {
            image::create(
                &p,
                Format::Qcow2,
                &CreateOptions {
                    size: 1 << 20,
                    cluster_size: 512,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let node = image::open(
                &p,
                &ImageOptions {
                    qcow2: Qcow2Options {
                        cache_size: 0,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            for i in 0..32u64 {
                let (r, _) = node
                    .write(
                        i << 15,
                        IoBuf::from_slice(&seeded_data(i, 32 << 10)),
                        WriteFlags::default(),
                    )
                    .await;
                r.unwrap();
            }
            node.flush().await.unwrap();
            node.discard(0, 1 << 20).await.unwrap();
            node.flush().await.unwrap();
        })
    });
    r.unwrap_or_else(|e| panic!("discard of 32 L2 tables' worth with a 16-table cache: {e}"));
}

/// Regression (power loss only): the driver wrote a new refcount block and the refcount table
/// entry that points at it in the same flush window (blocks, table, then one flush). A disk
/// cache may persist the table entry and lose the block: the table then points at a cluster
/// of zeroes (or past the end of the file), and `qemu-img check` reported `ERROR cluster N
/// refcount=0 reference=1` (exit 2). QEMU writes and flushes the new block before it writes
/// the entry (`alloc_refcount_block`: cache flush, then `bdrv_pwrite_sync` of the entry), and
/// so does the driver now (`write_snapshot`: blocks, a flush, then the table).
///
/// Found by `power_loss_512` (seed 13, 512-byte clusters, 64-bit refcounts, a power loss before
/// log entry 297: the window 291..296 wrote refcount blocks at 0x20000, 0x8000, 0x400, 0x10000
/// (new), 0x18000 and the table at 0x200; the table landed, the new block did not). Here, the
/// minimal case: the first write past the clusters the image's first refcount block covers,
/// then a flush. The new block's write must be followed by a flush before the table write that
/// points at it, and a power loss that keeps the table write but drops every other unflushed
/// write of its window must leave a clean image.
#[test]
fn a_new_refcount_block_is_durable_before_the_table_entry_that_points_at_it() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    // 512-byte clusters, 64-bit refcounts: a block covers 64 clusters (32 KiB of file). A new
    // image uses clusters 0..4 (header, table, block, L1); 64 KiB of data needs a second block.
    let rec = run(async move {
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let disk = Node::new(None, Box::new(MemDisk::new(Arc::clone(&log))), false).unwrap();
        let opts = CreateOptions {
            size: 1 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        };
        qcow2::create::create(&disk, &opts).await.unwrap();
        let initial = disk.driver_as::<MemDisk>().unwrap().contents();
        log.lock().unwrap().clear();
        let top = qcow2::open(None, &disk, &Qcow2Options::default())
            .await
            .unwrap();
        let (r, _) = top
            .write(
                0,
                IoBuf::from_slice(&seeded_data(7, 64 << 10)),
                WriteFlags::default(),
            )
            .await;
        r.unwrap();
        top.flush().await.unwrap();
        let log = log.lock().unwrap().clone();
        Recording {
            initial,
            log,
            ops: Vec::new(),
        }
    });
    let rt = refcount_table_writes(&rec, 512);
    let t = rt.iter().position(|&b| b).expect("a refcount table write");
    // The table write's flush window: from the flush before it to the flush after it.
    let from = rec.log[..t]
        .iter()
        .rposition(|e| matches!(e, Ev::Flush))
        .expect("a flush before the refcount table write");
    let to = t + rec.log[t..]
        .iter()
        .position(|e| matches!(e, Ev::Flush))
        .expect("a flush after the refcount table write");
    // The new block: the cluster the table's new entry points at.
    let Ev::Write {
        off: rt_off,
        data: rt_data,
    } = &rec.log[t]
    else {
        unreachable!()
    };
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let new_block = (0..rt_data.len() / 8)
        .map(|i| {
            (
                be64(rt_data, i * 8),
                be64(&rec.initial, *rt_off as usize + i * 8),
            )
        })
        .find(|(n, o)| n != o)
        .map(|(n, _)| n)
        .expect("a new table entry");
    // Its last write before the table write, then a flush in between.
    let b = rec.log[..t]
        .iter()
        .rposition(|e| matches!(e, Ev::Write { off, .. } if *off == new_block))
        .unwrap_or_else(|| {
            panic!(
                "the new refcount block {new_block:#x} is not written before the table write \
                 (log entry {t}) that points at it:\n{}",
                describe_log(&rec, t)
            )
        });
    assert!(
        b < from,
        "the new refcount block {new_block:#x} (log entry {b}) and the table write pointing at \
         it (log entry {t}) share a flush window (no flush between them):\n{}",
        describe_log(&rec, t)
    );
    // Power loss at the end of the window: everything before its opening flush, and of the
    // window only the table write.
    let mut disk = rec.initial.clone();
    let mut apply = |off: u64, data: &[u8]| {
        let end = off as usize + data.len();
        if disk.len() < end {
            disk.resize(end, 0);
        }
        disk[off as usize..end].copy_from_slice(data);
    };
    let mut dropped = 0;
    for (i, e) in rec.log[..to].iter().enumerate() {
        if let Ev::Write { off, data } = e {
            if i > from && i != t {
                dropped += 1;
                continue;
            }
            apply(*off, data);
        }
    }
    let img = Scratch::new_in("/dev/shm", "rtorder");
    std::fs::write(&img.0, &disk).unwrap();
    if let Err(e) = qemu_check(&img.0) {
        panic!(
            "power loss at the end of the flush window {from}..{to}: the table write (log entry \
             {t}) reached the disk, the {dropped} other write(s) of the window did not:\n{e}\n\
             log:\n{}",
            describe_log(&rec, to)
        );
    }
}

/// More crash points with full reordering (200, over a workload with 4 KiB clusters whose
/// file outgrows its first refcount blocks), beyond `power_loss_4k`'s 80.
#[test]
fn power_loss_full_reorder() {
    power_loss(LOSS_4K, 200, seed_from_env(12));
}
