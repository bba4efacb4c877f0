//! The file driver through a Backend: buffered and O_DIRECT I/O, padding of unaligned
//! requests, zeroes, growth past the end, the I/O mode choice, and QEMU-compatible image
//! locking checked against qemu-io and qemu-img in both directions.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern_at, qemu_tool, run_tool, uniq, Scratch};
use engine::drivers::file::{self, Aio, FileDriver, FileOptions, Locking};
use engine::{Backend, ErrorKind, IoBuf, IoThread, Node, Perm, ZeroFlags};
use graph::{mutation, Mutation, Role, Transaction, User};

fn backend(node: Arc<Node>, t: &IoThread) -> Backend {
    Backend::new(node, &[t.handle()]).unwrap()
}

/// Opens `opts` and attaches a backend (which takes the permissions, hence the locks).
fn open_used(name: &str, opts: &FileOptions, t: &IoThread) -> Result<Backend, engine::Error> {
    let node = file::open(name, opts)?;
    Backend::new(node, &[t.handle()])
}

fn driver(node: &Node) -> &FileDriver {
    node.driver_as::<FileDriver>().expect("a file node")
}

#[test]
fn buffered_read_write_round_trip() {
    let f = Scratch::new("rw").with_pattern(1 << 20);
    let t = IoThread::new().unwrap();
    let node = file::open(&uniq("f0"), &FileOptions::new(&f.0)).unwrap();
    let b = backend(node, &t);
    assert_eq!(b.len(), 1 << 20);
    let (r, buf) = b.read_blocking(1000, IoBuf::new(3000));
    r.unwrap();
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &x)| x == pattern_at(1000 + i)));
    let (r, _) = b.write_blocking(5, IoBuf::from_slice(b"hello"));
    r.unwrap();
    b.flush_blocking().unwrap();
    let data = std::fs::read(&f.0).unwrap();
    assert_eq!(&data[5..10], b"hello");
    assert_eq!(data[4], pattern_at(4));
    assert_eq!(data[10], pattern_at(10));
}

#[test]
fn requests_past_the_end_are_refused() {
    let f = Scratch::new("range").with_pattern(4096);
    let t = IoThread::new().unwrap();
    let b = backend(
        file::open(&uniq("f0"), &FileOptions::new(&f.0)).unwrap(),
        &t,
    );
    let (r, _) = b.read_blocking(4000, IoBuf::new(200));
    let e = r.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("beyond the end"), "{e}");
}

fn direct_opts(f: &Scratch) -> FileOptions {
    FileOptions {
        direct: true,
        ..FileOptions::new(&f.0)
    }
}

/// Opens `f` (in /var/tmp) with O_DIRECT, or `None` (printing why the test skips) where the
/// file system has no O_DIRECT.
fn open_direct(f: &Scratch) -> Option<Arc<Node>> {
    match file::open(&uniq("d0"), &direct_opts(f)) {
        Ok(n) => Some(n),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            eprintln!("skipping: /var/tmp has no O_DIRECT: {e}");
            None
        }
        Err(e) => panic!("{e:?}"),
    }
}

#[test]
fn direct_io_on_disk_takes_statx_alignment_and_pads() {
    let f = Scratch::new_in("/var/tmp", "direct").with_pattern(64 * 1024);
    let t = IoThread::new().unwrap();
    let Some(node) = open_direct(&f) else {
        return;
    };
    let (mem, off) = driver(&node).alignment();
    assert!(
        off >= 512 && off.is_power_of_two(),
        "offset alignment {off}"
    );
    assert!(mem >= 1 && mem.is_power_of_two());
    let b = backend(node, &t);
    // Unaligned read (offset, length, and buffer address).
    let (r, buf) = b.read_blocking(777, IoBuf::new(10_000).slice(3..5003));
    r.unwrap();
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &x)| x == pattern_at(777 + i)));
    // Unaligned write: read-modify-write keeps the neighbours.
    let (r, _) = b.write_blocking(4090, IoBuf::from_slice(&[0xEE; 20]));
    r.unwrap();
    b.flush_blocking().unwrap();
    drop(b);
    let data = std::fs::read(&f.0).unwrap();
    assert_eq!(data.len(), 64 * 1024);
    assert!(data[4090..4110].iter().all(|&x| x == 0xEE));
    assert_eq!(data[4089], pattern_at(4089));
    assert_eq!(data[4110], pattern_at(4110));
}

#[test]
fn concurrent_unaligned_writes_to_shared_blocks_lose_nothing() {
    // Two IoThreads write interleaved 100-byte pieces of the same 4 KiB blocks with O_DIRECT.
    // Each piece is padded by read-modify-write; without serialisation pieces would be lost.
    let f = Scratch::new_in("/var/tmp", "rmw").with_pattern(64 * 1024);
    let (t1, t2) = (IoThread::new().unwrap(), IoThread::new().unwrap());
    let Some(node) = open_direct(&f) else {
        return;
    };
    let b = Backend::new(node, &[t1.handle(), t2.handle()]).unwrap();
    let run = |t: &IoThread, parity: u64| {
        let b = b.clone();
        t.spawn_with(move || async move {
            let mut hs = Vec::new();
            for i in (parity..600).step_by(2) {
                let b = b.clone();
                hs.push(iothreads::spawn_local(async move {
                    let (r, _) = b
                        .write(i * 100, IoBuf::from_slice(&[(i % 200) as u8 + 1; 100]))
                        .await;
                    r.unwrap();
                }));
            }
            for h in hs {
                h.await.unwrap();
            }
        })
    };
    let (a, c) = (run(&t1, 0), run(&t2, 1));
    a.join().unwrap();
    c.join().unwrap();
    b.flush_blocking().unwrap();
    drop(b);
    let data = std::fs::read(&f.0).unwrap();
    for i in 0..600usize {
        let want = (i % 200) as u8 + 1;
        assert!(
            data[i * 100..i * 100 + 100].iter().all(|&x| x == want),
            "piece {i} lost"
        );
    }
    assert_eq!(data[60_000], pattern_at(60_000));
}

#[test]
fn writes_past_the_end_grow_the_file_exactly() {
    for dir in ["/var/tmp", "/dev/shm"] {
        let f = Scratch::new_in(dir, "grow").with_pattern(1000);
        let t = IoThread::new().unwrap();
        let opts = direct_opts(&f);
        let node = match file::open(&uniq("g"), &opts) {
            Ok(n) => n,
            Err(_) => file::open(&uniq("g"), &FileOptions::new(&f.0)).unwrap(),
        };
        let n2 = node.clone();
        t.block_on(move || async move {
            let (r, _) = n2
                .write(1500, IoBuf::from_slice(&[7; 100]), Default::default())
                .await;
            r.unwrap();
        })
        .unwrap();
        assert_eq!(node.len(), 1600);
        drop(node);
        let data = std::fs::read(&f.0).unwrap();
        assert_eq!(data.len(), 1600, "{dir}");
        assert!(data[1000..1500].iter().all(|&x| x == 0));
        assert!(data[1500..].iter().all(|&x| x == 7));
    }
}

/// Preallocation grows the file with its blocks allocated, keeps every byte written before
/// (also bytes written past the old end just before it), reads zeroes in the new range, and
/// a cut brings the file back; on tmpfs and ext4.
#[test]
fn preallocate_grows_allocated_keeps_data_and_cuts_back() {
    use std::os::unix::fs::MetadataExt;
    for dir in ["/var/tmp", "/dev/shm"] {
        let f = Scratch::new_in(dir, "prealloc").with_pattern(10000);
        let t = IoThread::new().unwrap();
        let node = file::open(&uniq("p"), &FileOptions::new(&f.0)).unwrap();
        let n2 = node.clone();
        t.block_on(move || async move {
            // Past the end, before the growth reaches it: kept.
            let (r, _) = n2
                .write(20000, IoBuf::from_slice(&[9; 4096]), Default::default())
                .await;
            r.unwrap();
            n2.preallocate(4 << 20).await.unwrap();
        })
        .unwrap();
        assert_eq!(node.len(), 4 << 20, "{dir}");
        let meta = std::fs::metadata(&f.0).unwrap();
        assert_eq!(meta.len(), 4 << 20, "{dir}");
        assert!(
            meta.blocks() * 512 >= (4 << 20) - 32768,
            "{dir}: the new range is allocated ({} blocks)",
            meta.blocks()
        );
        let data = std::fs::read(&f.0).unwrap();
        assert!(
            data[..10000]
                .iter()
                .enumerate()
                .all(|(i, &x)| x == (i % 251) as u8),
            "{dir}: the old content stays"
        );
        assert!(data[10000..20000].iter().all(|&x| x == 0), "{dir}");
        assert!(data[20000..24096].iter().all(|&x| x == 9), "{dir}");
        assert!(data[24096..].iter().all(|&x| x == 0), "{dir}");
        // Cut back.
        let n2 = node.clone();
        t.block_on(move || async move { n2.preallocate(24096).await })
            .unwrap()
            .unwrap();
        assert_eq!(node.len(), 24096);
        assert_eq!(std::fs::metadata(&f.0).unwrap().len(), 24096, "{dir}");
    }
}

#[test]
fn write_zeroes_and_discard() {
    let f = Scratch::new("zero").with_pattern(1 << 20);
    let t = IoThread::new().unwrap();
    let opts = FileOptions {
        discard: file::Discard::Unmap,
        ..FileOptions::new(&f.0)
    };
    let b = backend(file::open(&uniq("z"), &opts).unwrap(), &t);
    let b2 = b.clone();
    t.block_on(move || async move {
        b2.write_zeroes(4096, 8192, ZeroFlags::default())
            .await
            .unwrap();
        b2.write_zeroes(
            65536,
            65536,
            ZeroFlags {
                may_unmap: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        b2.write_zeroes(100, 50, ZeroFlags::default())
            .await
            .unwrap();
        b2.discard(262144, 65536).await.unwrap();
        b2.flush().await.unwrap();
    })
    .unwrap();
    let data = std::fs::read(&f.0).unwrap();
    assert!(data[4096..12288].iter().all(|&x| x == 0));
    assert!(data[65536..131072].iter().all(|&x| x == 0));
    assert!(data[100..150].iter().all(|&x| x == 0));
    assert_eq!(data[99], pattern_at(99));
    assert_eq!(data[150], pattern_at(150));
    assert_eq!(data[12288], pattern_at(12288));
    assert!(
        data[262144..327680].iter().all(|&x| x == 0),
        "discard=unmap punches a hole"
    );
}

#[test]
fn io_mode_is_inline_only_for_tmpfs_without_nowait() {
    let shm = Scratch::new_in("/dev/shm", "mode").with_pattern(8192);
    let disk = Scratch::new_in("/var/tmp", "mode").with_pattern(8192);
    let t = IoThread::new().unwrap();
    let b1 = open_used(&uniq("a"), &FileOptions::new(&shm.0), &t).unwrap();
    let n2 = file::open(&uniq("b"), &FileOptions::new(&disk.0)).unwrap();
    assert!(
        driver(&b1.root()).is_inline(),
        "tmpfs has no RWF_NOWAIT: plain syscalls"
    );
    assert!(
        !driver(&n2).is_inline(),
        "ext4 buffered reads support RWF_NOWAIT: ring"
    );
    let opts3 = FileOptions {
        aio: Aio::IoUring,
        ..FileOptions::new(&shm.0)
    };
    // Same file used twice in one process: the second writer conflicts.
    let e = open_used(&uniq("c"), &opts3, &t).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionConflict);
    drop(b1);
    let b3 = open_used(&uniq("c"), &opts3, &t).unwrap();
    assert!(!driver(&b3.root()).is_inline());
    // Both modes read the same bytes.
    let (r, buf) = b3.read_blocking(10, IoBuf::new(100));
    r.unwrap();
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &x)| x == pattern_at(10 + i)));
}

#[test]
fn registered_files_work_and_release_locks_on_close() {
    let f = Scratch::new("regf").with_pattern(65536);
    let opts = iothreads::IoThreadOptions {
        registered_files: 4,
        ..Default::default()
    };
    let t = IoThread::with_options(opts).unwrap();
    let opts = FileOptions {
        aio: Aio::IoUring,
        ..FileOptions::new(&f.0)
    };
    let b = open_used(&uniq("r"), &opts, &t).unwrap();
    let (r, buf) = b.read_blocking(100, IoBuf::new(100));
    r.unwrap();
    assert_eq!(buf[0], pattern_at(100));
    drop(b);
    // The lock is gone as soon as the node is: another writer succeeds.
    open_used(&uniq("again"), &FileOptions::new(&f.0), &t).unwrap();
}

#[test]
fn missing_file_and_bad_type_are_clear_errors() {
    let e = file::open(&uniq("m"), &FileOptions::new("/nonexistent/strata-nope")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(
        e.full_message()
            .starts_with("Could not open '/nonexistent/strata-nope'"),
        "{e:?}"
    );
    let e = file::open(
        &uniq("d"),
        &FileOptions {
            read_only: true,
            ..FileOptions::new("/tmp")
        },
    )
    .unwrap_err();
    assert!(
        e.full_message().contains("Could not open")
            || e.full_message().contains("not a regular file")
    );
}

// ---- image locking against QEMU ----

/// Whether another open file description holds a lock on `byte` of `path`.
fn byte_locked(path: &str, byte: i64) -> bool {
    let f = std::fs::File::open(path).unwrap();
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: F_OFD_GETLK fills the flock we pass.
    let r = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_OFD_GETLK,
            &mut fl as *mut libc::flock,
        )
    };
    assert_eq!(r, 0);
    fl.l_type != libc::F_UNLCK as i16
}

/// Starts `qemu-io` holding `path` open as `fmt` (read-write unless `ro`), and waits until
/// it holds lock byte `byte`.
fn qemu_io_holding(qemu_io: &str, path: &str, ro: bool, fmt: &str, byte: i64) -> Child {
    let mut cmd = Command::new(qemu_io);
    if ro {
        cmd.arg("-r");
    }
    let child = cmd
        .args(["-f", fmt, path])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !byte_locked(path, byte) {
        assert!(Instant::now() < deadline, "qemu-io never locked {path}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// qemu-io and qemu-img, or `None` (the test skips) where either is absent.
fn qemu_io_and_img() -> Option<(&'static str, &'static str)> {
    Some((qemu_tool("qemu-io")?, qemu_tool("qemu-img")?))
}

fn stop(mut child: Child) {
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"quit\n");
    }
    let _ = child.wait();
}

#[test]
fn strata_writer_locks_out_qemu() {
    let Some((qemu_io, qemu_img)) = qemu_io_and_img() else {
        return;
    };
    let f = Scratch::new("lock1").with_pattern(1 << 20);
    let t = IoThread::new().unwrap();
    let node = file::open(&uniq("w"), &FileOptions::new(&f.0)).unwrap();
    // An opened node with no users takes nothing, as in QEMU.
    assert!(!byte_locked(f.path(), 100));
    let node = Backend::new(node, &[t.handle()]).unwrap();
    // What QEMU's guest device takes: consistent read and write (100, 101); it shares
    // neither write nor resize (201, 203).
    for b in [100, 101, 201, 203] {
        assert!(byte_locked(f.path(), b), "byte {b}");
    }
    for b in [102, 103, 200, 202] {
        assert!(!byte_locked(f.path(), b), "byte {b}");
    }
    let out = Command::new(qemu_io)
        .args(["-f", "raw", "-c", "write 0 4k", f.path()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || err.contains("lock"),
        "qemu-io wrote: {err}"
    );
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let out = Command::new(qemu_img)
        .args(["resize", "-f", "raw", f.path(), "2M"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qemu-img resize must be refused while strata writes"
    );
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    // QEMU's raw reader shares everything, so `qemu-img info -f raw` still works.
    run_tool(&[qemu_img, "info", "-f", "raw", f.path()]);
    drop(node);
    run_tool(&[qemu_io, "-f", "raw", "-c", "write 0 4k", f.path()]);
}

#[test]
fn qemu_writer_locks_out_strata() {
    let Some(qemu_io) = qemu_tool("qemu-io") else {
        return;
    };
    let f = Scratch::new("lock2").with_pattern(1 << 20);
    let child = qemu_io_holding(qemu_io, f.path(), false, "raw", 100);
    let t = IoThread::new().unwrap();
    let e = open_used(&uniq("w"), &FileOptions::new(&f.0), &t).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionConflict);
    assert!(
        e.message()
            .starts_with("Failed to get shared \"write\" lock"),
        "strata must refuse to share write with a QEMU writer: {e:?}"
    );
    assert!(e.message().contains(f.path()));
    let ro = FileOptions {
        read_only: true,
        ..FileOptions::new(&f.0)
    };
    let e = open_used(&uniq("r"), &ro, &t).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::PermissionConflict,
        "a consistent reader unshares write"
    );
    // With locking off the user takes responsibility.
    open_used(
        &uniq("x"),
        &FileOptions {
            locking: Locking::Off,
            ..FileOptions::new(&f.0)
        },
        &t,
    )
    .unwrap();
    stop(child);
    open_used(&uniq("w"), &FileOptions::new(&f.0), &t).unwrap();
}

#[test]
fn qemu_img_info_of_a_qcow2_is_refused_while_strata_writes_its_file() {
    let Some(qemu_img) = qemu_tool("qemu-img") else {
        return;
    };
    let f = Scratch::new("lock5");
    run_tool(&[qemu_img, "create", "-f", "qcow2", f.path(), "1M"]);
    let t = IoThread::new().unwrap();
    let node = open_used(&uniq("w"), &FileOptions::new(&f.0), &t).unwrap();
    // A qcow2 reader does not share write: it must not read metadata someone else changes.
    let out = Command::new(qemu_img)
        .args(["info", f.path()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    drop(node);
    run_tool(&[qemu_img, "info", f.path()]);
}

#[test]
fn readers_share_with_readers() {
    let Some((qemu_io, qemu_img)) = qemu_io_and_img() else {
        return;
    };
    let f = Scratch::new("lock3").with_pattern(1 << 20);
    let child = qemu_io_holding(qemu_io, f.path(), true, "raw", 100);
    let t = IoThread::new().unwrap();
    let ro = FileOptions {
        read_only: true,
        ..FileOptions::new(&f.0)
    };
    let node = open_used(&uniq("r"), &ro, &t).unwrap();
    run_tool(&[qemu_img, "info", "-f", "raw", f.path()]);
    // A writer is refused while readers are there.
    let e = open_used(&uniq("w"), &FileOptions::new(&f.0), &t).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionConflict);
    stop(child);
    drop(node);
}

#[test]
fn changing_permissions_moves_locks_without_a_window() {
    let f = Scratch::new("lock4").with_pattern(4096);
    let node = file::open(&uniq("p"), &FileOptions::new(&f.0)).unwrap();
    let d = node.driver();
    d.set_perms(
        engine::Perm::CONSISTENT_READ | engine::Perm::WRITE,
        engine::Perm::ALL,
    )
    .unwrap();
    assert!(byte_locked(f.path(), 101));
    // Down to read-only: write bytes released, read kept.
    d.set_perms(engine::Perm::CONSISTENT_READ, engine::Perm::ALL)
        .unwrap();
    assert!(byte_locked(f.path(), 100));
    assert!(!byte_locked(f.path(), 101));
    assert!(!byte_locked(f.path(), 201));
    // A second user now takes write and unshares write.
    let t = IoThread::new().unwrap();
    let other = open_used(&uniq("q"), &FileOptions::new(&f.0), &t).unwrap();
    // Back up to write conflicts, and the failed attempt leaves the old locks exactly.
    let e = d.set_perms(
        engine::Perm::CONSISTENT_READ | engine::Perm::WRITE,
        engine::Perm::ALL,
    );
    assert_eq!(e.unwrap_err().kind(), ErrorKind::PermissionConflict);
    drop(other);
    assert!(byte_locked(f.path(), 100));
    assert!(!byte_locked(f.path(), 101));
    d.set_perms(
        engine::Perm::CONSISTENT_READ | engine::Perm::WRITE,
        engine::Perm::ALL,
    )
    .unwrap();
    assert!(byte_locked(f.path(), 101));
}

#[test]
fn auto_read_only_falls_back_when_the_file_is_not_writable() {
    use std::os::unix::fs::PermissionsExt;
    let f = Scratch::new_in("/var/tmp", "aro").with_pattern(4096);
    // Make the file unwritable even for root: the immutable attribute (EPERM on a write
    // open); for other users a 0444 mode (EACCES) does it.
    // SAFETY: geteuid has no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(&f.0)
            .status()
            .map(|s| s.success());
        if !matches!(ok, Ok(true)) {
            eprintln!("skipping: chattr +i unavailable here");
            return;
        }
    } else {
        std::fs::set_permissions(&f.0, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    let strict = file::open(&uniq("aro"), &FileOptions::new(&f.0));
    let auto = FileOptions {
        auto_read_only: true,
        ..FileOptions::new(&f.0)
    };
    let n = file::open(&uniq("aro"), &auto);
    if root {
        let _ = Command::new("chattr").arg("-i").arg(&f.0).status();
    }
    assert!(strict.is_err(), "a plain read-write open must fail");
    let n = n.unwrap();
    assert!(n.is_read_only(), "auto-read-only falls back to read-only");
}

// ---- reopen read-only <-> read-write inside a transaction ----

const CR: Perm = Perm::CONSISTENT_READ;
const W: Perm = Perm::WRITE;
const WU: Perm = Perm::WRITE_UNCHANGED;

struct Disk(String);
impl User for Disk {
    fn describe(&self) -> String {
        format!("block device '{}'", self.0)
    }
}

/// The descriptors this process holds open on `path`, each with its access mode (O_RDONLY,
/// O_WRONLY or O_RDWR), read from /proc/self/fd and /proc/self/fdinfo: a reopen's
/// descriptors as seen from outside the driver.
fn fds_on(path: &str) -> Vec<(i32, i32)> {
    let want = std::fs::canonicalize(path).unwrap();
    let mut fds = Vec::new();
    for ent in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_link(ent.path()).ok().as_ref() != Some(&want) {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|s| i32::from_str_radix(s.trim(), 8).unwrap())
            .unwrap();
        fds.push((fd, flags & libc::O_ACCMODE));
    }
    fds.sort();
    fds
}

/// The image lock bytes (QEMU's 100-103 held, 200-203 not shared) someone holds on `path`,
/// as another process would see them.
fn lock_bytes(path: &str) -> Vec<i64> {
    (100..104)
        .chain(200..204)
        .filter(|&b| byte_locked(path, b))
        .collect()
}

/// A step that fails and changes nothing: making a node its own backing child.
fn failing_step(tx: &mut Transaction<'_>, node: &Arc<Node>) {
    let e = tx.attach_child(node, node, Role::Backing).unwrap_err();
    assert!(e.to_string().contains("would create a cycle"), "{e}");
}

/// The reopen of `node` (with its user taking `perm` and sharing `shared` to match), as a
/// transaction that is left open.
fn reopen_step(
    tx: &mut Transaction<'_>,
    node: &Arc<Node>,
    edge: &Arc<graph::Edge>,
    read_only: bool,
    perms: (Perm, Perm),
) {
    if read_only {
        tx.update_perms(edge, perms.0, perms.1).unwrap();
        tx.set_read_only(node, true).unwrap();
    } else {
        tx.set_read_only(node, false).unwrap();
        tx.update_perms(edge, perms.0, perms.1).unwrap();
    }
}

fn write_through(node: &Arc<Node>, t: &IoThread, offset: u64, data: &'static [u8]) {
    let n = Arc::clone(node);
    t.block_on(move || async move {
        let (r, _) = n
            .write(offset, IoBuf::from_slice(data), Default::default())
            .await;
        r
    })
    .unwrap()
    .unwrap();
}

/// The access mode of a descriptor opened read-only or read-write, and its name.
fn access_mode(read_only: bool) -> (i32, &'static str) {
    if read_only {
        (libc::O_RDONLY, "read-only")
    } else {
        (libc::O_RDWR, "read-write")
    }
}

/// A file node on `path` with one user edge `e`, reopened in transactions under `m`.
struct Reopen<'a> {
    m: &'a Mutation,
    node: &'a Arc<Node>,
    e: &'a Arc<graph::Edge>,
    path: &'a str,
}

impl Reopen<'_> {
    /// Prepares the reopen to `read_only`, the user taking `to`, and then a failing step: while
    /// prepared, a descriptor of the new mode stands beside the one descriptor the node had;
    /// after the rollback that one is left alone, and the lock bytes, the driver's lock state,
    /// the read-only flag and the permissions (`from`) are as before.
    fn rolled_back(&self, read_only: bool, from: (Perm, Perm), to: (Perm, Perm)) {
        let (node, e, path) = (self.node, self.e, self.path);
        let fds = fds_on(path);
        let locks = lock_bytes(path);
        let state = driver(node).lock_state();
        let (new_mode, new_name) = access_mode(read_only);
        let (_, old_name) = access_mode(!read_only);
        {
            let mut tx = Transaction::new(self.m);
            reopen_step(&mut tx, node, e, read_only, to);
            let during = fds_on(path);
            assert_eq!(
                during.len(),
                2,
                "a prepared {new_name} descriptor: {during:?}"
            );
            assert!(during.contains(&fds[0]));
            assert!(during
                .iter()
                .any(|&(fd, mode)| fd != fds[0].0 && mode == new_mode));
            failing_step(&mut tx, node);
        }
        assert_eq!(fds_on(path), fds, "the {old_name} descriptor, and only it");
        assert_eq!(lock_bytes(path), locks);
        assert_eq!(driver(node).lock_state(), state);
        assert_eq!(node.is_read_only(), !read_only);
        assert_eq!(e.perms(), from);
        assert_eq!(node.cumulative_perms(), from);
    }

    /// Commits the reopen to `read_only`, the user taking `perms`: one descriptor of the new
    /// mode is left, and the lock bytes are `locks`.
    fn committed(&self, read_only: bool, perms: (Perm, Perm), locks: &[i64]) {
        let mut tx = Transaction::new(self.m);
        reopen_step(&mut tx, self.node, self.e, read_only, perms);
        tx.commit().unwrap();
        let fds = fds_on(self.path);
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].1, access_mode(read_only).0);
        assert_eq!(lock_bytes(self.path), locks);
    }
}

#[test]
fn reopen_in_a_transaction_then_a_failing_step_leaves_descriptor_and_locks() {
    let f = Scratch::new("reopen-tx").with_pattern(65536);
    let path = f.path();
    let t = IoThread::new().unwrap();
    let node = file::open(&uniq("rt"), &FileOptions::new(&f.0)).unwrap();
    let u: Arc<dyn User> = Arc::new(Disk("disk".into()));
    let m = mutation();
    let mut tx = Transaction::new(&m);
    let e = tx.attach_user(&u, &node, CR | W, CR | WU).unwrap();
    tx.commit().unwrap();
    let rw = (CR | W, CR | WU);
    let ro = (CR, CR | WU);

    // Read-write -> read-only, then a step that fails.
    let fds = fds_on(path);
    assert_eq!(fds.len(), 1);
    assert_eq!(fds[0].1, libc::O_RDWR);
    assert_eq!(lock_bytes(path), [100, 101, 201, 203]);
    let r = Reopen {
        m: &m,
        node: &node,
        e: &e,
        path,
    };
    r.rolled_back(true, rw, ro);
    // Requests still go to a writable descriptor.
    write_through(&node, &t, 10, b"still rw");
    assert_eq!(&std::fs::read(path).unwrap()[10..18], b"still rw");

    // The same reopen committed: one read-only descriptor, and the write locks are gone.
    r.committed(true, ro, &[100, 201, 203]);
    assert!(node.is_read_only());

    // Read-only -> read-write, then a step that fails.
    r.rolled_back(false, ro, rw);

    // And committed: read-write again, with the write locks back.
    r.committed(false, rw, &[100, 101, 201, 203]);
    write_through(&node, &t, 20, b"rw again");
    assert_eq!(&std::fs::read(path).unwrap()[20..28], b"rw again");
}

/// Reopens a read-only file node read-write for a user that then wants to write, while
/// `holder` (started first, on the same image) does not share write: the commit is refused
/// with QEMU's lock error, and the descriptors, the locks and the graph are as before. Once
/// the holder is gone the same change succeeds.
fn reopen_read_write_refused_while<'a>(
    f: &Scratch,
    holder: impl FnOnce() -> Box<dyn FnOnce() + 'a>,
) {
    let path = f.path();
    let release = holder();
    let ro_opts = FileOptions {
        read_only: true,
        ..FileOptions::new(&f.0)
    };
    let node = file::open(&uniq("rr"), &ro_opts).unwrap();
    let u: Arc<dyn User> = Arc::new(Disk("disk".into()));
    let m = mutation();
    let mut tx = Transaction::new(&m);
    let e = tx.attach_user(&u, &node, CR, Perm::ALL).unwrap();
    tx.commit().unwrap();
    let (ro, rw) = ((CR, Perm::ALL), (CR | W, CR | WU));

    let fds = fds_on(path);
    let locks = lock_bytes(path);
    assert!(
        locks.contains(&201),
        "the holder does not share write: {locks:?}"
    );
    let state = driver(&node).lock_state();
    let before = (node.is_read_only(), e.perms(), node.cumulative_perms());
    assert_eq!(before, (true, ro, ro));

    let mut tx = Transaction::new(&m);
    reopen_step(&mut tx, &node, &e, false, rw);
    let err = tx.commit().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionConflict);
    assert_eq!(
        err.message(),
        format!("Failed to get \"write\" lock. Is another process using the image [{path}]?")
    );
    assert_eq!(
        fds_on(path),
        fds,
        "the prepared descriptor is gone, ours is kept"
    );
    assert_eq!(lock_bytes(path), locks);
    assert_eq!(driver(&node).lock_state(), state);
    assert_eq!(
        (node.is_read_only(), e.perms(), node.cumulative_perms()),
        before
    );

    // Without the holder (gone with its descriptor), only our read lock is left, and the
    // reopen goes through. (Its close takes the mutation lock, on its IoThread.)
    drop(m);
    release();
    let m = mutation();
    assert_eq!(lock_bytes(path), [100], "our read lock, nothing more");
    let r = Reopen {
        m: &m,
        node: &node,
        e: &e,
        path,
    };
    r.committed(false, rw, &[100, 101, 201, 203]);
    assert!(!node.is_read_only());
}

#[test]
fn reopen_read_write_is_refused_at_commit_while_an_independent_open_unshares_write() {
    let f = Scratch::new("reopen-held").with_pattern(65536);
    let t = IoThread::new().unwrap();
    let opts = FileOptions {
        read_only: true,
        ..FileOptions::new(&f.0)
    };
    reopen_read_write_refused_while(&f, || {
        // A read-only guest device: reads consistently, shares neither write nor resize.
        let node = file::open(&uniq("other"), &opts).unwrap();
        let other = Backend::with_options(
            Arc::clone(&node),
            &[t.handle()],
            engine::BackendOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        Box::new(move || {
            drop(other);
            // Closed here and now, not by the closer later: its descriptor is gone on return.
            assert_eq!(Arc::strong_count(&node), 1);
            t.block_on(move || node.close_if_last()).unwrap().unwrap();
        })
    });
}

#[test]
fn reopen_read_write_is_refused_at_commit_while_qemu_reads_a_qcow2() {
    let Some((qemu_io, qemu_img)) = qemu_io_and_img() else {
        return;
    };
    let f = Scratch::new("reopen-qemu");
    run_tool(&[qemu_img, "create", "-f", "qcow2", f.path(), "1M"]);
    let path = f.path().to_string();
    reopen_read_write_refused_while(&f, move || {
        // Another process: a qcow2 reader does not share write on its file.
        let child = qemu_io_holding(qemu_io, &path, true, "qcow2", 201);
        Box::new(move || stop(child))
    });
}
