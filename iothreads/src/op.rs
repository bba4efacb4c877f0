//! I/O ops as futures over owned buffers.
//!
//! Each op moves its buffer into the IoThread's in-flight table when first polled and gets it
//! back with the completion. Dropping the future early leaves the buffer in the table until the
//! kernel's completion arrives; nothing blocks. Ops must be polled on an IoThread; elsewhere they
//! fail at once with an error (`Unsupported`) and hand their buffer back untouched.
//!
//! Two layers:
//! - single ops (`read_at`, `write_at`, `readv_at`, `writev_at`): one SQE, the kernel's result
//!   as is (it may be short);
//! - whole transfers (`read_exact_at`, `write_all_at`, `readv_exact_at`, `writev_all_at`):
//!   short results are resubmitted for the remainder, EINTR and EAGAIN are retried, a read of 0
//!   is end of file and the rest of the buffer is zero-filled, a write that makes no progress is
//!   `ENOSPC`.

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use crate::buf::{BufResult, IoBuf};
use crate::runtime::{with_local, Held, Local};

/// The file an op targets: a plain descriptor, or an index into the ring's registered file
/// table (see [`crate::register_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fd {
    /// A plain file descriptor.
    Raw(RawFd),
    /// A slot of the current IoThread's registered file table.
    Fixed(u32),
}

impl From<RawFd> for Fd {
    fn from(fd: RawFd) -> Self {
        Fd::Raw(fd)
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Read {
        fd: Fd,
        offset: u64,
    },
    Write {
        fd: Fd,
        offset: u64,
    },
    Readv {
        fd: Fd,
        offset: u64,
    },
    Writev {
        fd: Fd,
        offset: u64,
    },
    Fsync {
        fd: Fd,
        datasync: bool,
    },
    Fallocate {
        fd: Fd,
        mode: i32,
        offset: u64,
        len: u64,
    },
    Timeout,
    Nop,
}

macro_rules! with_fd {
    ($fd:expr, $op:ident, |$t:ident| $body:expr) => {
        match $fd {
            Fd::Raw(raw) => {
                let $t = types::Fd(raw);
                $body
            }
            Fd::Fixed(i) => {
                let $t = types::Fixed(i);
                $body
            }
        }
    };
}

impl Kind {
    /// Builds the SQE. Pointers come from `held`, whose heap memory stays put when `held` moves.
    fn entry(self, held: &mut Held, local: &Local) -> squeue::Entry {
        match (self, held) {
            (Kind::Read { fd, offset }, Held::Buf(b)) => {
                let (ptr, len) = (b.as_mut_ptr(), b.len() as u32);
                match b.fixed_index_for(local.ring_id) {
                    Some(i) => with_fd!(fd, ReadFixed, |t| opcode::ReadFixed::new(t, ptr, len, i)
                        .offset(offset)
                        .build()),
                    None => with_fd!(fd, Read, |t| opcode::Read::new(t, ptr, len)
                        .offset(offset)
                        .build()),
                }
            }
            (Kind::Write { fd, offset }, Held::Buf(b)) => {
                let (ptr, len) = (b.as_ptr(), b.len() as u32);
                match b.fixed_index_for(local.ring_id) {
                    Some(i) => {
                        with_fd!(fd, WriteFixed, |t| opcode::WriteFixed::new(t, ptr, len, i)
                            .offset(offset)
                            .build())
                    }
                    None => with_fd!(fd, Write, |t| opcode::Write::new(t, ptr, len)
                        .offset(offset)
                        .build()),
                }
            }
            (Kind::Readv { fd, offset }, Held::Bufs(_, iov)) => {
                let (ptr, n) = (iov.as_ptr(), iov.len() as u32);
                with_fd!(fd, Readv, |t| opcode::Readv::new(t, ptr, n)
                    .offset(offset)
                    .build())
            }
            (Kind::Writev { fd, offset }, Held::Bufs(_, iov)) => {
                let (ptr, n) = (iov.as_ptr(), iov.len() as u32);
                with_fd!(fd, Writev, |t| opcode::Writev::new(t, ptr, n)
                    .offset(offset)
                    .build())
            }
            (Kind::Fsync { fd, datasync }, _) => {
                let flags = if datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                with_fd!(fd, Fsync, |t| opcode::Fsync::new(t).flags(flags).build())
            }
            (
                Kind::Fallocate {
                    fd,
                    mode,
                    offset,
                    len,
                },
                _,
            ) => {
                with_fd!(fd, Fallocate, |t| opcode::Fallocate::new(t, len)
                    .offset(offset)
                    .mode(mode)
                    .build())
            }
            (Kind::Timeout, Held::Timespec(ts)) => {
                opcode::Timeout::new(&**ts as *const types::Timespec).build()
            }
            (Kind::Nop, _) => opcode::Nop::new().build(),
            (k, _) => unreachable!("op {k:?} built without its resources"),
        }
    }
}

/// One submitted SQE: resolves to the raw CQE result and the resources back.
///
/// `!Send`: once submitted, the op belongs to its IoThread's table and must be dropped there.
struct RawOp {
    kind: Kind,
    held: Option<Held>,
    slot: Option<usize>,
    _not_send: PhantomData<*const ()>,
}

impl RawOp {
    fn new(kind: Kind, held: Held) -> Self {
        RawOp {
            kind,
            held: Some(held),
            slot: None,
            _not_send: PhantomData,
        }
    }
}

/// The error of an op polled off an IoThread.
fn not_on_iothread() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "I/O op polled outside an IoThread",
    )
}

impl Future for RawOp {
    type Output = (io::Result<i32>, Held);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let polled = with_local(|local| match this.slot {
            None => {
                let mut held = this.held.take().expect("RawOp polled after completion");
                let entry = this.kind.entry(&mut held, local);
                this.slot = Some(local.submit(entry, held, cx.waker()));
                Poll::Pending
            }
            Some(idx) => match local.poll_op(idx, cx) {
                Poll::Ready((res, held)) => {
                    this.slot = None;
                    let r = if res < 0 {
                        Err(io::Error::from_raw_os_error(-res))
                    } else {
                        Ok(res)
                    };
                    Poll::Ready((r, held))
                }
                Poll::Pending => Poll::Pending,
            },
        });
        match polled {
            Some(p) => p,
            None => {
                let held = this.held.take().unwrap_or(Held::None);
                Poll::Ready((Err(not_on_iothread()), held))
            }
        }
    }
}

impl Drop for RawOp {
    fn drop(&mut self) {
        if let Some(idx) = self.slot.take() {
            // On an IoThread by construction (the slot was made there and futures with a slot
            // never leave their thread: they are !Send).
            with_local(|local| local.orphan_op(idx));
        }
    }
}

fn into_buf(held: Held) -> IoBuf {
    match held {
        Held::Buf(b) => b,
        _ => unreachable!("a buffer op returns its buffer"),
    }
}

fn into_bufs(held: Held) -> Vec<IoBuf> {
    match held {
        Held::Bufs(b, _) => b,
        _ => unreachable!("a vectored op returns its buffers"),
    }
}

fn usize_result(r: io::Result<i32>) -> io::Result<usize> {
    r.map(|n| n as usize)
}

/// One read of `buf.len()` bytes at `offset` (the result may be short; 0 at end of file).
pub async fn read_at(fd: Fd, offset: u64, buf: IoBuf) -> BufResult<usize> {
    let (r, held) = RawOp::new(Kind::Read { fd, offset }, Held::Buf(buf)).await;
    (usize_result(r), into_buf(held))
}

/// One write of `buf` at `offset` (the result may be short).
pub async fn write_at(fd: Fd, offset: u64, buf: IoBuf) -> BufResult<usize> {
    let (r, held) = RawOp::new(Kind::Write { fd, offset }, Held::Buf(buf)).await;
    (usize_result(r), into_buf(held))
}

fn iovecs(bufs: &mut [IoBuf]) -> Box<[libc::iovec]> {
    bufs.iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

/// One vectored read into `bufs` at `offset` (the result may be short).
pub async fn readv_at(
    fd: Fd,
    offset: u64,
    mut bufs: Vec<IoBuf>,
) -> (io::Result<usize>, Vec<IoBuf>) {
    let iov = iovecs(&mut bufs);
    let (r, held) = RawOp::new(Kind::Readv { fd, offset }, Held::Bufs(bufs, iov)).await;
    (usize_result(r), into_bufs(held))
}

/// One vectored write of `bufs` at `offset` (the result may be short).
pub async fn writev_at(
    fd: Fd,
    offset: u64,
    mut bufs: Vec<IoBuf>,
) -> (io::Result<usize>, Vec<IoBuf>) {
    let iov = iovecs(&mut bufs);
    let (r, held) = RawOp::new(Kind::Writev { fd, offset }, Held::Bufs(bufs, iov)).await;
    (usize_result(r), into_bufs(held))
}

fn retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

/// Reads the whole window of `buf` from `offset`: short reads continue where they stopped, EOF
/// zero-fills the rest.
pub async fn read_exact_at(fd: Fd, offset: u64, buf: IoBuf) -> BufResult<()> {
    let window = buf.window();
    let mut buf = buf;
    let mut done = 0usize;
    while done < window.len() {
        buf.set_window(window.start + done..window.end);
        let (r, b) = read_at(fd, offset + done as u64, buf).await;
        buf = b;
        match r {
            Ok(0) => {
                buf.fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if retryable(&e) => {}
            Err(e) => {
                buf.set_window(window);
                return (Err(e), buf);
            }
        }
    }
    buf.set_window(window);
    (Ok(()), buf)
}

/// Writes the whole window of `buf` at `offset`: short writes continue where they stopped; a
/// write that makes no progress is `ENOSPC`.
pub async fn write_all_at(fd: Fd, offset: u64, buf: IoBuf) -> BufResult<()> {
    let window = buf.window();
    let mut buf = buf;
    let mut done = 0usize;
    while done < window.len() {
        buf.set_window(window.start + done..window.end);
        let (r, b) = write_at(fd, offset + done as u64, buf).await;
        buf = b;
        match r {
            Ok(0) => {
                buf.set_window(window);
                return (Err(io::Error::from_raw_os_error(libc::ENOSPC)), buf);
            }
            Ok(n) => done += n,
            Err(e) if retryable(&e) => {}
            Err(e) => {
                buf.set_window(window);
                return (Err(e), buf);
            }
        }
    }
    buf.set_window(window);
    (Ok(()), buf)
}

/// Narrows the windows of `bufs` to skip their first `skip` bytes in total; returns the original
/// windows so they can be restored.
fn skip_prefix(bufs: &mut [IoBuf], mut skip: usize) -> Vec<std::ops::Range<usize>> {
    let saved: Vec<_> = bufs.iter().map(|b| b.window()).collect();
    for (b, w) in bufs.iter_mut().zip(&saved) {
        let take = skip.min(w.len());
        b.set_window(w.start + take..w.end);
        skip -= take;
    }
    saved
}

fn restore(bufs: &mut [IoBuf], saved: &[std::ops::Range<usize>]) {
    for (b, w) in bufs.iter_mut().zip(saved) {
        b.set_window(w.clone());
    }
}

/// Vectored [`read_exact_at`].
pub async fn readv_exact_at(fd: Fd, offset: u64, bufs: Vec<IoBuf>) -> (io::Result<()>, Vec<IoBuf>) {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut bufs = bufs;
    let mut done = 0usize;
    while done < total {
        let saved = skip_prefix(&mut bufs, done);
        let (r, mut b) = readv_at(fd, offset + done as u64, bufs).await;
        match r {
            Ok(0) => {
                for x in b.iter_mut() {
                    x.fill(0);
                }
                restore(&mut b, &saved);
                return (Ok(()), b);
            }
            Ok(n) => done += n,
            Err(e) if retryable(&e) => {}
            Err(e) => {
                restore(&mut b, &saved);
                return (Err(e), b);
            }
        }
        restore(&mut b, &saved);
        bufs = b;
    }
    (Ok(()), bufs)
}

/// Vectored [`write_all_at`].
pub async fn writev_all_at(fd: Fd, offset: u64, bufs: Vec<IoBuf>) -> (io::Result<()>, Vec<IoBuf>) {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut bufs = bufs;
    let mut done = 0usize;
    while done < total {
        let saved = skip_prefix(&mut bufs, done);
        let (r, mut b) = writev_at(fd, offset + done as u64, bufs).await;
        restore(&mut b, &saved);
        match r {
            Ok(0) => return (Err(io::Error::from_raw_os_error(libc::ENOSPC)), b),
            Ok(n) => done += n,
            Err(e) if retryable(&e) => {}
            Err(e) => return (Err(e), b),
        }
        bufs = b;
    }
    (Ok(()), bufs)
}

async fn simple(kind: Kind) -> io::Result<i32> {
    loop {
        let (r, _) = RawOp::new(kind, Held::None).await;
        match r {
            Err(e) if retryable(&e) => continue,
            r => return r,
        }
    }
}

/// `fsync(2)` through the ring.
pub async fn fsync(fd: Fd) -> io::Result<()> {
    simple(Kind::Fsync {
        fd,
        datasync: false,
    })
    .await
    .map(drop)
}

/// `fdatasync(2)` through the ring.
pub async fn fdatasync(fd: Fd) -> io::Result<()> {
    simple(Kind::Fsync { fd, datasync: true }).await.map(drop)
}

/// `fallocate(2)` through the ring (`mode` as for the syscall: `FALLOC_FL_*`).
pub async fn fallocate(fd: Fd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    simple(Kind::Fallocate {
        fd,
        mode,
        offset,
        len,
    })
    .await
    .map(drop)
}

/// A no-op through the ring (one full submission and completion).
pub async fn nop() -> io::Result<()> {
    simple(Kind::Nop).await.map(drop)
}

/// Sleeps for `dur` on the ring's timer.
pub async fn sleep(dur: Duration) -> io::Result<()> {
    let ts = Box::new(types::Timespec::from(dur));
    let (r, _) = RawOp::new(Kind::Timeout, Held::Timespec(ts)).await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
        Err(e) => Err(e),
    }
}
