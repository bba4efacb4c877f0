//! Helpers shared by the end-to-end tests of the `strata` binary (bench_cli.rs, cli_images.rs,
//! cli_jobs.rs): private directories, a command's output, its one-line errors, and qemu-io
//! holding an image's locks.

#![allow(dead_code)]

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A private directory, removed at drop.
pub struct TmpDir(pub PathBuf);

impl TmpDir {
    /// A fresh directory `strata-{kind}-test-<pid>-{tag}-<n>` under `base`.
    pub fn under(base: &Path, kind: &str, tag: &str) -> TmpDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = base.join(format!(
            "strata-{kind}-test-{}-{tag}-{n}",
            std::process::id()
        ));
        fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }

    /// The path of `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Creates `name` in the directory, `len` bytes long (sparse); returns its path.
    pub fn file(&self, name: &str, len: u64) -> PathBuf {
        let p = self.0.join(name);
        File::create(&p).unwrap().set_len(len).unwrap();
        p
    }

    /// The names of the directory's entries.
    pub fn entries(&self) -> Vec<String> {
        fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A command's stdout, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command's stderr, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the command (`what`) succeeded, showing its status and output if not.
pub fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({:?}): {}{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// One line on stderr, `strata CMD: error: ...`, exit 1, containing every needle.
pub fn assert_one_line_error(o: &Output, cmd: &str, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    let prefix = format!("strata {cmd}: error: ");
    assert!(lines[0].starts_with(&prefix), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in: {err}");
    }
}

/// Whether another open file description holds a lock on `byte` of `path`.
pub fn byte_locked(path: &Path, byte: i64) -> bool {
    let f = File::open(path).unwrap();
    // SAFETY: an all-zero flock is valid; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass.
    let r = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_OFD_GETLK,
            &mut fl as *mut libc::flock,
        )
    };
    r == 0 && fl.l_type != libc::F_UNLCK as i16
}

/// Holds `path` open for writing in qemu-io until dropped.
pub struct QemuIoHolder(Child);

impl QemuIoHolder {
    /// Starts qemu-io on `path` (format `fmt`) and returns once it holds lock byte `byte`.
    pub fn new(path: &Path, fmt: &str, byte: i64) -> QemuIoHolder {
        let child = Command::new("qemu-io")
            .args(["-f", fmt])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !byte_locked(path, byte) {
            assert!(Instant::now() < deadline, "qemu-io never locked the image");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuIoHolder(child)
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
