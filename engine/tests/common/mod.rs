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
