//! Helpers shared by the engine's integration tests: scratch files that clean up after
//! themselves, the QEMU tools used as independent oracles (skipped with a printed reason
//! where absent) and the images made and checked with them, engines with chains of images
//! open, job events, and seeded test data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A scratch path removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh path in `dir` (e.g. "/dev/shm" or "/var/tmp").
    pub fn new_in(dir: &str, tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Scratch(Path::new(dir).join(format!("strata-test-{tag}-{}-{n}", std::process::id())))
    }

    /// A fresh path in the system temp dir.
    pub fn new(tag: &str) -> Scratch {
        Scratch::new_in(std::env::temp_dir().to_str().unwrap(), tag)
    }

    /// Creates the file with `len` bytes of a known pattern (byte i = i % 251).
    pub fn with_pattern(self, len: usize) -> Scratch {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&self.0, data).unwrap();
        self
    }

    /// The path as a string.
    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether qemu-img and qemu-io, the oracles of most tests, are both installed; else prints
/// why the caller skips.
pub fn have_qemu() -> bool {
    qemu_tool("qemu-img").is_some() && qemu_tool("qemu-io").is_some()
}

/// An engine with the default options: one IoThread, which runs jobs and the controller's
/// I/O too.
pub fn default_engine() -> engine::Engine {
    engine::Engine::new(engine::EngineOptions::default()).unwrap()
}

/// The next job event on `rx` (a failsafe timeout, so that a lost event fails the test
/// instead of hanging it; no test outcome depends on time).
pub fn next_event(
    rx: &crossbeam_channel::Receiver<engine::job::JobEvent>,
) -> engine::job::JobEventKind {
    rx.recv_timeout(std::time::Duration::from_secs(120))
        .expect("no job event within 120 s")
        .kind
}

/// A file node for `path` as an inline child spec (read-only if `read_only`).
pub fn file_spec(path: &str, read_only: bool) -> engine::ChildSpec {
    engine::ChildSpec::Spec(Box::new(engine::NodeSpec {
        node_name: None,
        read_only,
        driver: engine::DriverSpec::File(engine::drivers::file::FileOptions::new(path)),
    }))
}

/// The path of a QEMU tool if it is installed; else prints why the caller skips.
pub fn qemu_tool(name: &str) -> Option<&'static str> {
    let path: &'static str = match name {
        "qemu-img" => "qemu-img",
        "qemu-io" => "qemu-io",
        "qemu-nbd" => "qemu-nbd",
        "qemu-storage-daemon" => "qemu-storage-daemon",
        _ => return None,
    };
    match Command::new(path).arg("--version").output() {
        Ok(o) if o.status.success() => Some(path),
        _ => {
            eprintln!("skipping: {name} is not installed (the test uses it as an oracle)");
            None
        }
    }
}

/// The byte pattern `with_pattern` writes, at file offset `off`.
pub fn pattern_at(off: usize) -> u8 {
    (off % 251) as u8
}

/// A node-name unique in this test process (tests run in parallel and names are global).
pub fn uniq(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Runs a QEMU tool, panicking with its output if it fails; returns stdout.
pub fn run_tool(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{:?} failed:\n{}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts `qemu-img check` finds no errors in `path`.
pub fn assert_check_clean(path: &str) {
    let out = Command::new("qemu-img")
        .args(["check", path])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {path}:\n{text}"
    );
}

/// Where `qemu-img check` says the image at `path` ends ("Image end offset"); reads with
/// `-U`, so the image may be open elsewhere.
pub fn qemu_image_end(path: &str) -> u64 {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "--output=json", path])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check {path}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["image-end-offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("qemu-img check {path}: no image-end-offset in {v}"))
}

/// The guest content of `path` (any format, with its backing chain) as QEMU reads it.
pub fn qemu_content(path: &str) -> Vec<u8> {
    let raw = Scratch::new("content");
    run_tool(&["qemu-img", "convert", "-U", "-O", "raw", path, raw.path()]);
    std::fs::read(&raw.0).unwrap()
}

/// The backing file `qemu-img info` reports for `path`, if any.
pub fn qemu_backing(path: &str) -> Option<String> {
    let out = run_tool(&["qemu-img", "info", "--output=json", path]);
    let key = "\"backing-filename\": \"";
    out.find(key).map(|i| {
        let rest = &out[i + key.len()..];
        rest[..rest.find('"').unwrap()].to_string()
    })
}

/// splitmix64: small, fast, good enough for test workloads.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator for `seed`, mixed with a constant first.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_5EED)
    }
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability num/den.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// Log-uniform in lo..=hi: small and large values both common.
    pub fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        let x = l + (h - l) * (self.below(1 << 30) as f64 / (1u64 << 30) as f64);
        (x.exp() as u64).clamp(lo, hi)
    }
}

/// Regenerable write data, distinct for every seed: 8 bytes per step of xorshift64*.
pub fn seeded_data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// iotests.create_image: a raw file of `len` bytes in which every 512-byte sector holds its
/// index (big-endian i32) in its first and last four bytes, zeroes between (struct '>l504xl').
pub fn create_image(path: &str, len: u64) {
    let mut v = vec![0u8; len as usize];
    for (i, s) in v.chunks_mut(512).enumerate() {
        let b = (i as i32).to_be_bytes();
        s[..4].copy_from_slice(&b);
        s[508..].copy_from_slice(&b);
    }
    std::fs::write(path, v).unwrap();
}

/// `qemu-img create -q -f fmt [-b backing -F backing_fmt] path [size]`: without a size, the
/// image is as large as its backing file.
pub fn qemu_img_create(fmt: &str, path: &str, backing: Option<(&str, &str)>, size: Option<u64>) {
    qemu_img_create_with_opts(fmt, None, path, backing, size);
}

/// [`qemu_img_create`] with format options (`-o opts`, given before the backing file).
pub fn qemu_img_create_with_opts(
    fmt: &str,
    opts: Option<&str>,
    path: &str,
    backing: Option<(&str, &str)>,
    size: Option<u64>,
) {
    let size = size.map(|s| s.to_string());
    let mut args = vec!["qemu-img", "create", "-q", "-f", fmt];
    if let Some(o) = opts {
        args.extend(["-o", o]);
    }
    if let Some((b, bf)) = backing {
        args.extend(["-b", b, "-F", bf]);
    }
    args.push(path);
    if let Some(s) = &size {
        args.push(s);
    }
    run_tool(&args);
}

/// Runs qemu-io on `path` (format `fmt`) with each of `cmds` as a `-c` command, in one
/// process, panicking with its output if it fails; returns stdout.
pub fn run_qemu_io<S: AsRef<str>>(fmt: &str, path: &str, cmds: &[S]) -> String {
    let mut args = vec!["qemu-io", "-f", fmt];
    for c in cmds {
        args.extend(["-c", c.as_ref()]);
    }
    args.push(path);
    run_tool(&args)
}

/// How many bytes of `[off, off + len)` `path` (qcow2) holds itself (`qemu-io -c alloc`).
pub fn qemu_allocated(path: &str, off: u64, len: u64) -> u64 {
    let out = run_tool(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-r",
        "-U",
        "-c",
        &format!("alloc {off} {len}"),
        path,
    ]);
    out.split('/')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected qemu-io alloc output: {out}"))
}

/// Asserts that `qemu-img info` names `want` as the backing file of `path` (`None`: it has
/// none).
#[track_caller]
pub fn assert_backing(path: &str, want: Option<&str>) {
    assert_eq!(qemu_backing(path).as_deref(), want);
}

/// Asserts `qemu-img check` finds no errors in any of `imgs`.
pub fn assert_all_clean(imgs: &[Scratch]) {
    for i in imgs {
        assert_check_clean(i.path());
    }
}

/// A chain of `n` qcow2 images of `size` bytes in `dir`: image 0 is the base, image i has
/// image i-1 as backing file and holds pattern byte `i + 1` in its own 512 KiB stripe
/// `[i * 512 KiB, (i + 1) * 512 KiB)` and in the first 64 KiB of the next stripe (so upper
/// images shadow lower ones there).
pub fn make_chain(dir: &str, tag: &str, n: usize, size: u64) -> Vec<Scratch> {
    let mut imgs: Vec<Scratch> = Vec::new();
    for i in 0..n {
        let s = Scratch::new_in(dir, &format!("{tag}{i}"));
        let backing = imgs.last().map(|b| (b.path(), "qcow2"));
        qemu_img_create("qcow2", s.path(), backing, Some(size));
        let stripe = 512 * 1024;
        let cmd = format!("write -P {} {} {}", i + 1, i * stripe, stripe + 65536);
        run_qemu_io("qcow2", s.path(), &[cmd]);
        imgs.push(s);
    }
    imgs
}

/// Opens `imgs` as a chain of named nodes (each image's backing is the node before it); all
/// but the top read-only, as QEMU opens backing files.
pub fn open_chain(e: &engine::Engine, imgs: &[Scratch], tag: &str) -> Vec<String> {
    let names: Vec<String> = (0..imgs.len())
        .map(|i| uniq(&format!("{tag}{i}")))
        .collect();
    open_chain_named(e, imgs, &names, false);
    names
}

/// Opens `imgs` as a chain with node names `names`; image 0 is raw if `raw_base`.
pub fn open_chain_named(e: &engine::Engine, imgs: &[Scratch], names: &[String], raw_base: bool) {
    use engine::{BackingSpec, ChildSpec, DriverSpec, NodeSpec};
    for (i, img) in imgs.iter().enumerate() {
        let read_only = i + 1 < imgs.len();
        let file = file_spec(img.path(), read_only);
        let driver = if i == 0 && raw_base {
            DriverSpec::Raw {
                file,
                opts: Default::default(),
            }
        } else {
            DriverSpec::Qcow2 {
                file,
                backing: if i == 0 {
                    BackingSpec::None
                } else {
                    BackingSpec::Node(ChildSpec::Name(names[i - 1].clone()))
                },
                opts: Default::default(),
            }
        };
        e.add_node(NodeSpec {
            node_name: Some(names[i].clone()),
            read_only,
            driver,
        })
        .unwrap();
    }
}

/// Opens the image at `path` on the first of two new IoThreads and a backend on it bound to
/// both; returns the IoThreads and the backend (drop the backend first).
pub fn backend_on_two_iothreads(path: &Path) -> ([engine::IoThread; 2], engine::Backend) {
    use engine::image::{self, ImageOptions};
    let t = [
        engine::IoThread::new().unwrap(),
        engine::IoThread::new().unwrap(),
    ];
    let p = path.to_path_buf();
    let node = t[0]
        .block_on(move || async move { image::open(&p, &ImageOptions::default()).await })
        .unwrap()
        .unwrap();
    let b = engine::Backend::new(node, &[t[0].handle(), t[1].handle()]).unwrap();
    (t, b)
}

/// The first `len` bytes `b` reads, read in one request on IoThread `t`.
pub fn read_whole(t: &engine::IoThread, b: &engine::Backend, len: u64) -> Vec<u8> {
    let b2 = b.clone();
    t.block_on(move || async move {
        let (r, buf) = b2.read(0, engine::IoBuf::new(len as usize)).await;
        r.unwrap();
        buf.to_vec()
    })
    .unwrap()
}

/// `qemu-io -c map` of an image (what iotest 030 compares).
pub fn qemu_io_map(path: &str) -> String {
    run_tool(&["qemu-io", "-f", "qcow2", "-r", "-U", "-c", "map", path])
}
