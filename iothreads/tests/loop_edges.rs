//! The loop's edge cases: a full SQ, short reads, dropped futures, shutdown with ops in flight,
//! many threads spawning onto one loop, instant completions, panics, and refused rings.

use std::future::Future;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use iothreads::op::{self, fdatasync, read_at, read_exact_at, sleep, write_all_at};
use iothreads::{Fd, IoBuf, IoThread, IoThreadOptions, JoinError};

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn scratch_file(len: usize) -> (tempfile_path::TempPath, std::fs::File) {
    let path = tempfile_path::TempPath::new("loop-edges");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path.0)
        .unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    f.write_all(&data).unwrap();
    (path, f)
}

mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir();
            TempPath(dir.join(format!("strata-{tag}-{}-{n}", std::process::id())))
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn short_read_past_eof_zero_fills() {
    let t = IoThread::new().unwrap();
    let (_p, f) = scratch_file(1000);
    let fd = f.as_raw_fd();
    let buf = t
        .block_on(move || async move {
            let mut b = IoBuf::new(4096);
            b.fill(0xAA);
            let (r, b) = read_exact_at(Fd::Raw(fd), 500, b).await;
            r.unwrap();
            b
        })
        .unwrap();
    for (i, &x) in buf.iter().enumerate() {
        let want = if i < 500 { ((500 + i) % 251) as u8 } else { 0 };
        assert_eq!(x, want, "byte {i}");
    }
    // A single read reports the short count.
    let n = t
        .block_on(move || async move { read_at(Fd::Raw(fd), 900, IoBuf::new(512)).await.0 })
        .unwrap()
        .unwrap();
    assert_eq!(n, 100);
}

#[test]
fn windowed_reads_touch_only_the_window() {
    let t = IoThread::new().unwrap();
    let (_p, f) = scratch_file(8192);
    let fd = f.as_raw_fd();
    let b = t
        .block_on(move || async move {
            let mut b = IoBuf::new(300);
            b.fill(7);
            let b = b.slice(100..200);
            let (r, b) = read_exact_at(Fd::Raw(fd), 10, b).await;
            r.unwrap();
            b.unslice()
        })
        .unwrap();
    assert!(b[..100].iter().all(|&x| x == 7));
    assert!(b[200..].iter().all(|&x| x == 7));
    for i in 0..100 {
        assert_eq!(b[100 + i], ((10 + i) % 251) as u8);
    }
}

#[test]
fn full_sq_parks_ops_and_loses_none() {
    let t = IoThread::with_options(IoThreadOptions {
        sq_entries: 4,
        ..Default::default()
    })
    .unwrap();
    let (_p, f) = scratch_file(1 << 20);
    let fd = f.as_raw_fd();
    let total = t
        .block_on(move || async move {
            let mut handles = Vec::new();
            for i in 0..2000u64 {
                handles.push(iothreads::spawn_local(async move {
                    let off = (i * 512) % (1 << 20);
                    let (r, b) = read_exact_at(Fd::Raw(fd), off, IoBuf::new(512)).await;
                    r.unwrap();
                    assert_eq!(b[0], (off % 251) as u8);
                    1usize
                }));
            }
            let mut n = 0;
            for h in handles {
                n += h.await.unwrap();
            }
            n
        })
        .unwrap();
    assert_eq!(total, 2000);
    assert!(
        t.stats().parked_sqes > 0,
        "a 4-entry SQ must have parked ops: {:?}",
        t.stats()
    );
}

#[test]
fn more_ops_than_the_cq_holds_all_complete() {
    // 8 SQ entries -> 16 CQ entries; 500 pipe reads stay in flight at once.
    let t = IoThread::with_options(IoThreadOptions {
        sq_entries: 8,
        ..Default::default()
    })
    .unwrap();
    let (r, w) = pipe();
    let rfd = r.as_raw_fd();
    let mut handles = Vec::new();
    for _ in 0..500 {
        handles.push(t.spawn_with(move || async move {
            let (res, _) = read_at(Fd::Raw(rfd), 0, IoBuf::new(1)).await;
            res.unwrap()
        }));
    }
    // Let them all submit (or park), then feed one byte per reader.
    std::thread::sleep(Duration::from_millis(50));
    let mut wf = std::fs::File::from(w);
    wf.write_all(&[1u8; 500]).unwrap();
    let n: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(n, 500);
    drop(r);
}

/// A waker that counts wakes, for polling futures by hand.
struct CountWaker(AtomicUsize);
impl Wake for CountWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn dropping_a_future_in_flight_keeps_its_buffer_until_completion() {
    let t = IoThread::new().unwrap();
    let (r, w) = pipe();
    let rfd = r.as_raw_fd();
    let before = t
        .block_on(move || async move {
            // Poll a pipe read once (it submits and pends), then drop it.
            let mut fut = Box::pin(read_at(Fd::Raw(rfd), 0, IoBuf::new(65536)));
            let waker = Waker::from(Arc::new(CountWaker(AtomicUsize::new(0))));
            let mut cx = Context::from_waker(&waker);
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            drop(fut);
            // The op (and its buffer) stays in the table: the kernel still owns the buffer.
            iothreads::ops_in_flight()
        })
        .unwrap();
    assert_eq!(before, 1);
    // The kernel now completes the orphaned read into the buffer the table kept alive,
    // and the table lets go of it.
    let mut wf = std::fs::File::from(w);
    wf.write_all(&[9u8; 100]).unwrap();
    let mut left = 1;
    for _ in 0..1000 {
        left = t.block_on(|| async { iothreads::ops_in_flight() }).unwrap();
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        left, 0,
        "the orphaned op is freed once its completion arrives"
    );
    // The loop stays healthy afterwards.
    let v = t
        .block_on(|| async { op::nop().await.map(|_| 5) })
        .unwrap()
        .unwrap();
    assert_eq!(v, 5);
    drop(r);
}

#[test]
fn shutdown_with_ops_in_flight_cancels_them() {
    let t = IoThread::new().unwrap();
    let (r, _w) = pipe();
    let rfd = r.as_raw_fd();
    let mut handles = Vec::new();
    for _ in 0..64 {
        handles.push(t.spawn_with(move || async move {
            let (res, _) = read_at(Fd::Raw(rfd), 0, IoBuf::new(4096)).await;
            res.map(|_| ())
        }));
    }
    let sleeper = t.spawn_with(|| async { sleep(Duration::from_secs(3600)).await });
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    t.shutdown();
    assert!(start.elapsed() < Duration::from_secs(30));
    for h in handles {
        assert!(matches!(h.join(), Err(JoinError::Cancelled)));
    }
    assert!(matches!(sleeper.join(), Err(JoinError::Cancelled)));
    drop(r);
}

#[test]
fn work_sent_after_shutdown_is_cancelled() {
    let t = IoThread::new().unwrap();
    let h = t.handle();
    t.shutdown();
    assert!(h.is_shut_down());
    assert_eq!(h.spawn(async { 1 }).join(), Err(JoinError::Cancelled));
}

#[test]
fn many_threads_spawn_onto_one_iothread() {
    let t = IoThread::new().unwrap();
    let h = t.handle();
    let counter = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let h = h.clone();
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut handles = Vec::new();
                for i in 0..2000usize {
                    let c = Arc::clone(&counter);
                    handles.push(h.spawn(async move {
                        c.fetch_add(1, Ordering::Relaxed);
                        i
                    }));
                }
                handles
                    .into_iter()
                    .enumerate()
                    .all(|(i, j)| j.join() == Ok(i))
            })
        })
        .collect();
    for th in threads {
        assert!(th.join().unwrap());
    }
    assert_eq!(counter.load(Ordering::Relaxed), 16000);
}

#[test]
fn remote_wakes_reach_a_sleeping_loop() {
    // A task on the loop awaits a JoinHandle resolved by another IoThread: each hop is a remote
    // wake of a sleeping loop through its eventfd.
    let a = IoThread::new().unwrap();
    let b = IoThread::new().unwrap();
    let bh = b.handle();
    let sum = a
        .block_on(move || async move {
            let mut s = 0u64;
            for i in 0..2000u64 {
                s += bh.spawn(async move { i }).await.unwrap();
            }
            s
        })
        .unwrap();
    assert_eq!(sum, 1999 * 2000 / 2);
}

/// A future that is ready at once, as a null driver's request is.
async fn instant(i: u64) -> u64 {
    iothreads::coop_yield().await;
    i
}

#[test]
fn a_million_instant_completions_at_depth_one() {
    let t = IoThread::new().unwrap();
    let s = t
        .block_on(|| async {
            let mut s = 0u64;
            for i in 0..1_000_000u64 {
                s = s.wrapping_add(instant(i).await);
            }
            s
        })
        .unwrap();
    assert_eq!(s, 999_999 * 1_000_000 / 2);
}

#[test]
fn instant_tasks_share_the_loop_fairly() {
    // Two never-waiting tasks: coop_yield makes them alternate instead of one starving the other.
    let t = IoThread::new().unwrap();
    let (a_done, b_seen) = t
        .block_on(|| async {
            let flag = std::rc::Rc::new(std::cell::Cell::new(0u64));
            let f2 = flag.clone();
            let b = iothreads::spawn_local(async move {
                for _ in 0..10_000 {
                    f2.set(f2.get() + 1);
                    iothreads::coop_yield().await;
                }
            });
            let mut seen_progress_while_running = false;
            for _ in 0..10_000 {
                iothreads::coop_yield().await;
                if flag.get() > 0 && flag.get() < 10_000 {
                    seen_progress_while_running = true;
                }
            }
            b.await.unwrap();
            (true, seen_progress_while_running)
        })
        .unwrap();
    assert!(a_done && b_seen);
}

#[test]
fn a_panicking_task_reports_and_the_loop_survives() {
    let t = IoThread::new().unwrap();
    let r = t.spawn(async { panic!("boom") }).join();
    assert_eq!(r, Err(JoinError::Panicked("boom".into())));
    assert_eq!(t.spawn(async { 3 }).join(), Ok(3));
}

#[test]
fn ops_off_an_iothread_fail_cleanly() {
    // Polled by a foreign executor (a plain thread here), an op returns its buffer with an error.
    let fut = read_at(Fd::Raw(0), 0, IoBuf::new(16));
    let waker = Waker::from(Arc::new(CountWaker(AtomicUsize::new(0))));
    let mut cx = Context::from_waker(&waker);
    let mut fut: Pin<Box<dyn Future<Output = _>>> = Box::pin(fut);
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready((Err(e), b)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
            assert_eq!(b.len(), 16);
        }
        other => panic!("unexpected {:?}", other.map(|(r, _)| r.map(|_| ()))),
    }
}

#[test]
fn writes_fsync_and_fallocate_go_through_the_ring() {
    let t = IoThread::new().unwrap();
    let (p, f) = scratch_file(0);
    let fd = f.as_raw_fd();
    t.block_on(move || async move {
        let (r, _) = write_all_at(Fd::Raw(fd), 4096, IoBuf::from_slice(&[5u8; 8192])).await;
        r.unwrap();
        fdatasync(Fd::Raw(fd)).await.unwrap();
        op::fsync(Fd::Raw(fd)).await.unwrap();
        // Punch the first 4 KiB of the data back to zeroes.
        op::fallocate(
            Fd::Raw(fd),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            4096,
            4096,
        )
        .await
        .unwrap();
    })
    .unwrap();
    let data = std::fs::read(&p.0).unwrap();
    assert_eq!(data.len(), 12288);
    assert!(data[..8192].iter().all(|&x| x == 0));
    assert!(data[8192..].iter().all(|&x| x == 5));
}

#[test]
fn write_errors_propagate() {
    let t = IoThread::new().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let fd = full.as_raw_fd();
    let e = t
        .block_on(move || async move { write_all_at(Fd::Raw(fd), 0, IoBuf::new(4096)).await.0 })
        .unwrap()
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
}

#[test]
fn vectored_io_round_trips() {
    let t = IoThread::new().unwrap();
    let (_p, f) = scratch_file(0);
    let fd = f.as_raw_fd();
    let back = t
        .block_on(move || async move {
            let bufs = vec![
                IoBuf::from_slice(&[1u8; 100]),
                IoBuf::from_slice(&[2u8; 50]),
            ];
            let (r, _) = op::writev_all_at(Fd::Raw(fd), 10, bufs).await;
            r.unwrap();
            let (r, bufs) =
                op::readv_exact_at(Fd::Raw(fd), 0, vec![IoBuf::new(60), IoBuf::new(200)]).await;
            r.unwrap();
            bufs
        })
        .unwrap();
    assert!(back[0][..10].iter().all(|&x| x == 0));
    assert!(back[0][10..].iter().all(|&x| x == 1));
    assert!(back[1][..50].iter().all(|&x| x == 1));
    assert!(back[1][50..100].iter().all(|&x| x == 2));
    assert!(back[1][100..].iter().all(|&x| x == 0), "EOF zero-fills");
}

#[test]
fn registered_files_and_buffers_work() {
    let opts = IoThreadOptions {
        registered_files: 8,
        fixed_buffers: Some((4, 4096)),
        ..Default::default()
    };
    let t = IoThread::with_options(opts).unwrap();
    let (_p, f) = scratch_file(16384);
    let fd = f.as_raw_fd();
    let ok = t
        .block_on(move || async move {
            let slot = iothreads::register_file(fd).unwrap();
            let b = iothreads::alloc_buf(4096);
            assert!(b.is_registered());
            let (r, b) = read_exact_at(Fd::Fixed(slot), 4096, b).await;
            r.unwrap();
            let ok = b
                .iter()
                .enumerate()
                .all(|(i, &x)| x == ((4096 + i) % 251) as u8);
            let (r, _) = write_all_at(Fd::Fixed(slot), 0, b).await;
            r.unwrap();
            iothreads::unregister_file(slot).unwrap();
            ok
        })
        .unwrap();
    assert!(ok);
}

#[test]
fn sqpoll_ring_does_io() {
    let opts = IoThreadOptions {
        sqpoll_idle: Some(Duration::from_millis(10)),
        ..Default::default()
    };
    let t = match IoThread::with_options(opts) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipping: SQPOLL unavailable here: {e}");
            return;
        }
    };
    let (_p, f) = scratch_file(8192);
    let fd = f.as_raw_fd();
    let b = t
        .block_on(move || async move { read_exact_at(Fd::Raw(fd), 100, IoBuf::new(10)).await })
        .unwrap();
    b.0.unwrap();
    assert_eq!(b.1[0], 100);
}

/// Child half of `refused_ring_names_the_cause`: installs a seccomp filter that fails
/// io_uring_setup with EPERM, then tries to start an IoThread.
#[test]
fn seccomp_child() {
    if std::env::var_os("STRATA_SECCOMP_CHILD").is_none() {
        return;
    }
    const NR_IO_URING_SETUP: u32 = 425;
    let filter = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: NR_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: plain prctl calls; `prog` points at a live filter array.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const _
            ),
            0
        );
    }
    match IoThread::new() {
        Ok(_) => println!("RESULT: created"),
        Err(e) => println!("RESULT: {e}"),
    }
}

#[test]
fn refused_ring_names_the_cause() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STRATA_SECCOMP_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("RESULT: "))
        .unwrap_or_else(|| {
            panic!(
                "child printed no result: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(line.contains("cannot create an io_uring"), "{line}");
    assert!(
        line.contains("seccomp") || line.contains("io_uring_disabled"),
        "{line}"
    );
}

#[test]
fn cpus_bind_the_iothread() {
    let mine = iothreads::allowed_cpus();
    let last = *mine.last().unwrap();
    let t = IoThread::with_options(IoThreadOptions {
        cpus: Some(vec![last]),
        ..IoThreadOptions::default()
    })
    .unwrap();
    let on = t.block_on(|| async { iothreads::allowed_cpus() }).unwrap();
    assert_eq!(on, vec![last]);
    // The thread that made it keeps its own CPUs.
    assert_eq!(iothreads::allowed_cpus(), mine);
    drop(t);
    // A CPU this process may not use: a clear error, no thread left behind.
    let bad = (0..libc::CPU_SETSIZE as usize)
        .find(|c| !mine.contains(c))
        .unwrap();
    let e = IoThread::with_options(IoThreadOptions {
        cpus: Some(vec![bad]),
        ..IoThreadOptions::default()
    })
    .err()
    .expect("an IoThread on a CPU outside the process's set");
    assert!(
        e.to_string()
            .contains(&format!("cannot bind the IoThread to CPUs {bad}")),
        "{e}"
    );
}
