//! Helpers shared by the engine's integration tests: scratch files that clean up after
//! themselves, and the QEMU tools used as independent oracles (skipped with a printed reason
//! where absent).

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

/// A chain of `n` qcow2 images of `size` bytes in `dir`: image 0 is the base, image i has
/// image i-1 as backing file and holds pattern byte `i + 1` in its own 512 KiB stripe
/// `[i * 512 KiB, (i + 1) * 512 KiB)` and in the first 64 KiB of the next stripe (so upper
/// images shadow lower ones there).
pub fn make_chain(dir: &str, tag: &str, n: usize, size: u64) -> Vec<Scratch> {
    let mut imgs: Vec<Scratch> = Vec::new();
    for i in 0..n {
        let s = Scratch::new_in(dir, &format!("{tag}{i}"));
        let size = size.to_string();
        match imgs.last() {
            None => run_tool(&["qemu-img", "create", "-q", "-f", "qcow2", s.path(), &size]),
            Some(b) => run_tool(&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                b.path(),
                "-F",
                "qcow2",
                s.path(),
                &size,
            ]),
        };
        let stripe = 512 * 1024;
        let cmd = format!("write -P {} {} {}", i + 1, i * stripe, stripe + 65536);
        run_tool(&["qemu-io", "-f", "qcow2", "-c", &cmd, s.path()]);
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
        let file = ChildSpec::Spec(Box::new(NodeSpec {
            node_name: None,
            read_only,
            driver: DriverSpec::File(engine::drivers::file::FileOptions::new(img.path())),
        }));
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

/// `qemu-io -c map` of an image (what iotest 030 compares).
pub fn qemu_io_map(path: &str) -> String {
    run_tool(&["qemu-io", "-f", "qcow2", "-r", "-U", "-c", "map", path])
}
