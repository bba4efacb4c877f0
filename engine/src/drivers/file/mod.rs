//! `file`: a regular file or block device, I/O through the IoThread's ring.
//!
//! - `cache.direct` opens with `O_DIRECT`. The alignment comes from `statx(STATX_DIOALIGN)`
//!   (4096 where the kernel does not report it). Requests that are not aligned (offset, length
//!   or buffer address) go through an aligned bounce buffer; unaligned writes are padded by
//!   read-modify-write, serialised against other writes by a [`gate::WriteGate`].
//! - Zeroes and discard use `fallocate` (`ZERO_RANGE`, `PUNCH_HOLE`); flush is `fdatasync`.
//! - Image locks follow QEMU's byte-range scheme ([`lock`]), so strata and QEMU refuse to write
//!   one image at once.
//! - I/O mode (`aio`): `io_uring` always uses the ring; `inline` uses plain `pread`/`pwrite`
//!   on the IoThread; `auto` (default) uses the ring, except for files on tmpfs/ramfs whose
//!   reads do not support `RWF_NOWAIT` (probed once at open). There io_uring can only punt each
//!   request to a kernel worker (about 22k IOPS at depth 1), while a plain syscall is a memory
//!   copy that never blocks; but at depth, the workers copy on other cores in parallel. So on
//!   such files `auto` is a hybrid: a request runs inline when its IoThread has nothing else
//!   going (no op in the kernel, no other task ready), and goes to the ring when it has
//!   company. Any other file, even one that lacks
//!   `RWF_NOWAIT` (NFS, FUSE), stays on the ring, since a plain syscall there could block.
//! - A write past the end grows the file (as a format node writing its file needs), and reads
//!   past the end return zeroes.
//! - Truncate grows a regular file with `ftruncate` (sparse, as QEMU's `preallocation=off`);
//!   shrinking and growing a block device are refused.

pub mod gate;
pub mod lock;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use graph::{Driver, Error, ErrorKind, LocalBoxFuture, Node, Perm, WriteFlags, ZeroFlags};
use iothreads::op::{self, read_exact_at, write_all_at};
use iothreads::{BufResult, Fd, IoBuf, MAX_IOTHREADS};
use parking_lot::Mutex;

use gate::WriteGate;
use lock::LockState;

/// Whether to take image locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Lock where the file system supports OFD locks (always on Linux).
    #[default]
    Auto,
    /// Always lock.
    On,
    /// Never lock (the user takes responsibility, like QEMU's `locking=off`).
    Off,
}

/// How requests reach the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aio {
    /// `inline` for tmpfs files without `RWF_NOWAIT`, the ring for everything else.
    #[default]
    Auto,
    /// Always the ring.
    IoUring,
    /// Plain `preadv`/`pwritev` on the IoThread.
    Inline,
}

/// What to do with discard requests (QEMU's `discard` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// Ignore them (QEMU's default).
    #[default]
    Ignore,
    /// Punch holes.
    Unmap,
}

/// Options of a file node.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Path of the file or block device.
    pub filename: PathBuf,
    /// Open read-only.
    pub read_only: bool,
    /// `cache.direct`: bypass the page cache with `O_DIRECT`.
    pub direct: bool,
    /// `cache.no-flush`: make flush a no-op.
    pub no_flush: bool,
    /// Image locking.
    pub locking: Locking,
    /// I/O mode.
    pub aio: Aio,
    /// Discard handling.
    pub discard: Discard,
    /// Use the IoThread's registered file table when it has one.
    pub register_file: bool,
    /// `auto-read-only`: if the file cannot be opened read-write (EACCES, EPERM, EROFS),
    /// open it read-only instead, as QEMU does; the node is then read-only.
    pub auto_read_only: bool,
}

impl FileOptions {
    /// Defaults for `filename`: read-write, page cache, locking on, mode auto.
    pub fn new(filename: impl Into<PathBuf>) -> Self {
        FileOptions {
            filename: filename.into(),
            read_only: false,
            direct: false,
            no_flush: false,
            locking: Locking::Auto,
            aio: Aio::Auto,
            discard: Discard::Ignore,
            register_file: true,
            auto_read_only: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ring,
    Inline,
    /// Inline when the request is alone in flight on its IoThread, else the ring.
    Hybrid,
}

const FIXED_UNTRIED: i64 = -2;
const FIXED_NONE: i64 = -1;

/// The descriptors of a file node: the one requests use, and the one a reopen prepared.
struct Files {
    current: File,
    pending: Option<File>,
    /// The image locks held, and whether they sit on the pending descriptor (moved there by
    /// a permission change during a reopen).
    locks: LockState,
    locks_on_pending: bool,
}

/// The file driver.
pub struct FileDriver {
    /// Opened read-only (asked for, or fallen back to by auto-read-only).
    read_only: bool,
    fd: AtomicI32,
    files: Mutex<Files>,
    path: String,
    len: AtomicU64,
    is_blockdev: bool,
    direct: bool,
    mem_align: usize,
    req_align: usize,
    mode: Mode,
    no_flush: bool,
    discard: Discard,
    locking: bool,
    direct_flag: bool,
    gate: Option<WriteGate>,
    fixed: Box<[AtomicI64]>,
}

impl std::fmt::Debug for FileDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDriver")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .field("mode", &self.mode)
            .field("align", &(self.mem_align, self.req_align))
            .finish()
    }
}

fn open_error(path: &str, e: io::Error) -> Error {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionConflict,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("Could not open '{path}'")).with_source(e)
}

/// `statx` DIOALIGN: (memory alignment, offset alignment), or None where not reported.
fn dio_align(fd: RawFd) -> Option<(usize, usize)> {
    // SAFETY: an all-zero statx is a valid value to be overwritten.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a valid C string and `stx` a valid out-parameter.
    let r = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((
        stx.stx_dio_mem_align.max(1) as usize,
        stx.stx_dio_offset_align as usize,
    ))
}

fn blockdev_size(fd: RawFd) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Whether the file lives in memory (tmpfs or ramfs).
fn on_tmpfs(fd: RawFd) -> bool {
    // SAFETY: an all-zero statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills `st`.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return false;
    }
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let t = st.f_type as i64;
    t == libc::TMPFS_MAGIC || t == RAMFS_MAGIC
}

/// Whether buffered reads of `fd` support RWF_NOWAIT (if not, io_uring punts every read).
fn supports_nowait(fd: RawFd, align: usize) -> bool {
    let mut buf = IoBuf::new(align.max(512));
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over a live buffer of its stated length.
    let r = unsafe { libc::preadv2(fd, &iov, 1, 0, libc::RWF_NOWAIT) };
    !(r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP))
}

/// Opens a file node named `name`.
pub fn open(name: &str, opts: &FileOptions) -> Result<Arc<Node>, Error> {
    graph::check_node_name(name)?;
    let driver = FileDriver::open(opts)?;
    let ro = driver.is_read_only();
    Node::new(Some(name), Box::new(driver), ro)
}

impl FileDriver {
    /// Opens the file (image locks come with the node's permissions).
    pub fn open(opts: &FileOptions) -> Result<FileDriver, Error> {
        let path = opts.filename.display().to_string();
        let mut read_only = opts.read_only;
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let opened = match oo.open(&opts.filename) {
            Err(e)
                if !opts.read_only
                    && opts.auto_read_only
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EPERM | libc::EROFS)
                    ) =>
            {
                oo.write(false);
                read_only = true;
                oo.open(&opts.filename)
            }
            r => r,
        };
        let file = opened.map_err(|e| {
            if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("Could not open '{path}': the file system does not support O_DIRECT"),
                )
            } else {
                open_error(&path, e)
            }
        })?;
        let fd = file.as_raw_fd();
        let meta = file.metadata().map_err(|e| open_error(&path, e))?;
        let ft = meta.file_type();
        let is_blockdev = ft.is_block_device();
        if !ft.is_file() && !is_blockdev {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("'{path}' is not a regular file or block device"),
            ));
        }
        let len = if is_blockdev {
            blockdev_size(fd)
                .map_err(|e| Error::io(format!("Could not get the size of '{path}'"), e))?
        } else {
            meta.len()
        };
        let (mem_align, req_align) = if opts.direct {
            dio_align(fd).unwrap_or((4096, 4096))
        } else {
            (1, 1)
        };
        let mode = match opts.aio {
            Aio::IoUring => Mode::Ring,
            Aio::Inline => Mode::Inline,
            Aio::Auto => {
                if on_tmpfs(fd) && !supports_nowait(fd, req_align) {
                    Mode::Hybrid
                } else {
                    Mode::Ring
                }
            }
        };
        // Image locks follow the node's permissions, applied when users attach
        // (`set_perms`), as QEMU's file driver does.
        let locking = opts.locking != Locking::Off;
        let gate = (opts.direct && (req_align > 1 || mem_align > 1)).then(WriteGate::default);
        let init = if opts.register_file {
            FIXED_UNTRIED
        } else {
            FIXED_NONE
        };
        Ok(FileDriver {
            read_only,
            fd: AtomicI32::new(fd),
            files: Mutex::new(Files {
                current: file,
                pending: None,
                locks: LockState::default(),
                locks_on_pending: false,
            }),
            path,
            len: AtomicU64::new(len),
            is_blockdev,
            direct: opts.direct,
            mem_align,
            req_align,
            mode,
            no_flush: opts.no_flush,
            discard: opts.discard,
            locking,
            direct_flag: opts.direct,
            gate,
            fixed: (0..MAX_IOTHREADS).map(|_| AtomicI64::new(init)).collect(),
        })
    }

    /// Whether the file was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The cache mode it was opened with: (`cache.direct`, `cache.no-flush`).
    pub fn cache_mode(&self) -> (bool, bool) {
        (self.direct_flag, self.no_flush)
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The O_DIRECT alignment in use: (memory, offset/length); (1, 1) without O_DIRECT.
    pub fn alignment(&self) -> (usize, usize) {
        (self.mem_align, self.req_align)
    }

    /// Whether requests may use plain syscalls on the IoThread instead of the ring.
    pub fn is_inline(&self) -> bool {
        self.mode != Mode::Ring
    }

    /// Whether this request runs as a plain syscall.
    #[inline]
    fn inline_now(&self, _node: &Node) -> bool {
        match self.mode {
            Mode::Ring => false,
            Mode::Inline => true,
            Mode::Hybrid => !iothreads::is_busy(),
        }
    }

    /// The image locks now held.
    pub fn lock_state(&self) -> LockState {
        self.files.lock().locks
    }

    #[inline]
    fn raw_fd(&self) -> RawFd {
        self.fd.load(Ordering::Acquire)
    }

    /// Forgets registered slots of the old descriptor (released on their own threads).
    fn drop_registrations(&self) {
        for (t, slot) in self.fixed.iter().enumerate() {
            let v = slot.load(Ordering::Relaxed);
            if v >= 0 {
                slot.store(FIXED_UNTRIED, Ordering::Relaxed);
                if let Some(h) = iothreads::handle_by_index(t) {
                    drop(h.spawn_with(move || async move {
                        let _ = iothreads::unregister_file(v as u32);
                    }));
                }
            }
        }
    }

    /// The descriptor to use on this IoThread: its registered slot if it has one.
    fn fd(&self) -> Fd {
        let Some(t) = iothreads::current_index() else {
            return Fd::Raw(self.raw_fd());
        };
        let v = self.fixed[t].load(Ordering::Relaxed);
        if v >= 0 {
            return Fd::Fixed(v as u32);
        }
        if v == FIXED_UNTRIED {
            match iothreads::register_file(self.raw_fd()) {
                Ok(slot) => {
                    self.fixed[t].store(i64::from(slot), Ordering::Relaxed);
                    return Fd::Fixed(slot);
                }
                Err(_) => self.fixed[t].store(FIXED_NONE, Ordering::Relaxed),
            }
        }
        Fd::Raw(self.raw_fd())
    }

    fn is_aligned(&self, offset: u64, buf: &IoBuf) -> bool {
        let a = self.req_align as u64;
        offset.is_multiple_of(a)
            && (buf.len() as u64).is_multiple_of(a)
            && buf.is_aligned_to(self.mem_align)
    }

    fn align_out(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.req_align as u64;
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        (start, end)
    }

    fn grow_to(&self, end: u64) {
        self.len.fetch_max(end, Ordering::AcqRel);
    }

    // ---- raw transfers: aligned (or buffered) requests, by mode ----

    async fn raw_read(&self, inline: bool, offset: u64, buf: IoBuf) -> BufResult<()> {
        if inline {
            inline::pread_exact(self.raw_fd(), offset, buf)
        } else {
            read_exact_at(self.fd(), offset, buf).await
        }
    }

    async fn raw_write(&self, inline: bool, offset: u64, buf: IoBuf) -> BufResult<()> {
        if inline {
            inline::pwrite_all(self.raw_fd(), offset, buf)
        } else {
            write_all_at(self.fd(), offset, buf).await
        }
    }

    async fn datasync(&self) -> io::Result<()> {
        match self.mode {
            Mode::Ring => op::fdatasync(self.fd()).await,
            Mode::Inline | Mode::Hybrid => inline::fdatasync(self.raw_fd()),
        }
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        match self.mode {
            Mode::Ring => op::fallocate(self.fd(), mode, offset, len).await,
            Mode::Inline | Mode::Hybrid => inline::fallocate(self.raw_fd(), mode, offset, len),
        }
    }

    // ---- requests ----

    async fn do_read(&self, inline: bool, offset: u64, mut buf: IoBuf) -> BufResult<()> {
        if !self.direct || self.is_aligned(offset, &buf) {
            return self.raw_read(inline, offset, buf).await;
        }
        let (a0, a1) = self.align_out(offset, buf.len() as u64);
        let bounce = IoBuf::with_align((a1 - a0) as usize, self.mem_align.max(512));
        let (r, bounce) = self.raw_read(inline, a0, bounce).await;
        if r.is_ok() {
            let skip = (offset - a0) as usize;
            let n = buf.len();
            buf.copy_from_slice(&bounce[skip..skip + n]);
        }
        (r, buf)
    }

    async fn do_write(
        &self,
        inline: bool,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> BufResult<()> {
        let end = offset + buf.len() as u64;
        let (r, buf) = match &self.gate {
            Some(gate) if !self.is_aligned(offset, &buf) => {
                let _excl = gate.close().await;
                (self.padded_write(inline, offset, &buf).await, buf)
            }
            Some(gate) => {
                let t = iothreads::current_index().unwrap_or(0);
                let _inside = gate.enter(t).await;
                self.raw_write(inline, offset, buf).await
            }
            None => self.raw_write(inline, offset, buf).await,
        };
        if r.is_err() {
            return (r, buf);
        }
        self.grow_to(end);
        if flags.fua && !self.no_flush {
            return (self.datasync().await, buf);
        }
        (Ok(()), buf)
    }

    /// Read-modify-write of the aligned blocks around an unaligned write. The caller holds the
    /// write gate closed.
    async fn padded_write(&self, inline: bool, offset: u64, data: &IoBuf) -> io::Result<()> {
        let len = data.len() as u64;
        let (a0, a1) = self.align_out(offset, len);
        let bounce = IoBuf::with_align((a1 - a0) as usize, self.mem_align.max(512));
        let (r, mut bounce) = self.raw_read(inline, a0, bounce).await;
        r?;
        let skip = (offset - a0) as usize;
        bounce[skip..skip + data.len()].copy_from_slice(data);
        let old_len = self.len.load(Ordering::Acquire);
        let (r, _) = self.raw_write(inline, a0, bounce).await;
        r?;
        // The padded tail may have grown the file past the request's end: cut it back.
        let end = offset + len;
        let true_len = old_len.max(end);
        if !self.is_blockdev && a1 > true_len {
            // SAFETY: ftruncate takes only integers.
            if unsafe { libc::ftruncate(self.raw_fd(), true_len as i64) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    async fn do_write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let _inside = match &self.gate {
            Some(g) => Some(g.enter(iothreads::current_index().unwrap_or(0)).await),
            None => None,
        };
        let cur_len = self.len.load(Ordering::Acquire);
        let end = offset + len;
        let mode = if flags.may_unmap && end <= cur_len {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        let r = self.fallocate(mode, offset, len).await;
        let r = match r {
            Err(e) if mode != libc::FALLOC_FL_ZERO_RANGE && unsupported(&e) => {
                self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
                    .await
            }
            r => r,
        };
        drop(_inside);
        match r {
            Ok(()) => {
                self.grow_to(end);
                if flags.fua && !self.no_flush {
                    self.datasync().await?;
                }
                Ok(())
            }
            Err(e) if unsupported(&e) && !flags.no_fallback => {
                self.write_zero_buffers(offset, len, flags).await
            }
            Err(e) if unsupported(&e) => Err(io::Error::from_raw_os_error(libc::ENOTSUP)),
            Err(e) => Err(e),
        }
    }

    /// Writes explicit zero bytes where fallocate cannot zero.
    async fn write_zero_buffers(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut done = 0;
        let mut zero = IoBuf::new(CHUNK.min(len) as usize);
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            zero.set_window(0..n);
            let inline = self.mode == Mode::Inline;
            let (r, b) = self
                .do_write(inline, offset + done, zero, WriteFlags::default())
                .await;
            r?;
            zero = b;
            done += n as u64;
        }
        if flags.fua && !self.no_flush {
            self.datasync().await?;
        }
        Ok(())
    }

    /// Grows the file to `len` bytes with `ftruncate` (a sparse extension: the new range
    /// reads as zeroes, nothing is allocated), run inline on the IoThread as the padded write
    /// does: it only changes the inode's size. On `O_DIRECT` files the write gate is held
    /// closed so no write is in flight meanwhile. A write that already took the file past
    /// `len` is never cut back: the file's real size is checked first.
    async fn do_truncate(&self, len: u64) -> io::Result<()> {
        let cur = self.len.load(Ordering::Acquire);
        if len == cur {
            return Ok(());
        }
        if len < cur {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: cannot shrink from {cur} to {len} bytes (only growing is supported)",
                    self.path
                ),
            ));
        }
        // Write access is the node's to check (it may have been reopened read-write since
        // the file was opened read-only); a read-only descriptor fails ftruncate anyway.
        if self.is_blockdev {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: cannot grow device files", self.path),
            ));
        }
        let Ok(new_len) = i64::try_from(len) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        let _excl = match &self.gate {
            Some(g) => Some(g.close().await),
            None => None,
        };
        let fd = self.raw_fd();
        // SAFETY: an all-zero stat is a valid out-parameter for fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat fills `st`.
        if unsafe { libc::fstat(fd, &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if st.st_size < new_len {
            // SAFETY: ftruncate takes only integers.
            if unsafe { libc::ftruncate(fd, new_len) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        self.grow_to(len);
        Ok(())
    }

    /// See [`Driver::preallocate`]: growth is `fallocate` mode 0 from the current length
    /// (allocates what is not, keeps what is, so writes racing with it are safe); a cut is
    /// `ftruncate` with the write gate closed. Device files have nothing to do.
    async fn do_preallocate(&self, len: u64) -> io::Result<()> {
        if self.is_blockdev {
            return Ok(());
        }
        let cur = self.len.load(Ordering::Acquire);
        if len > cur {
            self.fallocate(0, cur, len - cur).await?;
            self.grow_to(len);
            return Ok(());
        }
        if len < cur {
            let Ok(new_len) = i64::try_from(len) else {
                return Err(io::Error::from_raw_os_error(libc::EFBIG));
            };
            let _excl = match &self.gate {
                Some(g) => Some(g.close().await),
                None => None,
            };
            // SAFETY: ftruncate takes only integers.
            if unsafe { libc::ftruncate(self.raw_fd(), new_len) } < 0 {
                return Err(io::Error::last_os_error());
            }
            self.len.store(len, Ordering::Release);
        }
        Ok(())
    }

    async fn do_discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.discard == Discard::Ignore {
            return Ok(());
        }
        let cur_len = self.len.load(Ordering::Acquire);
        let end = (offset + len).min(cur_len);
        if end <= offset {
            return Ok(());
        }
        match self
            .fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                end - offset,
            )
            .await
        {
            // Discard is advisory: a file system that cannot punch holes just keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

impl Drop for FileDriver {
    fn drop(&mut self) {
        // Registered slots hold the file open on their rings; release each on its own thread.
        self.drop_registrations();
        // Release the image locks now: a registered slot may keep the open file description
        // alive a little longer, and the locks belong to it, not to our descriptor.
        let files = self.files.lock();
        if self.locking {
            let fd = match (&files.pending, files.locks_on_pending) {
                (Some(p), true) => p.as_raw_fd(),
                _ => files.current.as_raw_fd(),
            };
            lock::release_all(fd, files.locks);
        }
    }
}

impl Driver for FileDriver {
    fn driver_name(&self) -> &'static str {
        if self.is_blockdev {
            "host_device"
        } else {
            "file"
        }
    }

    fn length(&self, _: &Node) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(self.do_read(self.inline_now(node), offset, buf))
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(self.do_write(self.inline_now(node), offset, buf, flags))
    }

    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(self.do_write_zeroes(offset, len, flags))
    }

    fn discard<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(self.do_discard(offset, len))
    }

    fn truncate<'a>(&'a self, _: &'a Node, len: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(self.do_truncate(len))
    }

    fn preallocate<'a>(&'a self, _: &'a Node, len: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(self.do_preallocate(len))
    }

    fn flush<'a>(&'a self, _: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            if self.no_flush {
                Ok(())
            } else {
                self.datasync().await
            }
        })
    }

    fn set_perms(&self, perm: Perm, shared: Perm) -> Result<(), Error> {
        if !self.locking {
            return Ok(());
        }
        let new = lock::state_for(perm, shared);
        let mut guard = self.files.lock();
        let f = &mut *guard;
        match (&f.pending, f.locks_on_pending) {
            (Some(p), false) => {
                lock::transfer(
                    f.current.as_raw_fd(),
                    p.as_raw_fd(),
                    &self.path,
                    &mut f.locks,
                    new,
                )?;
                f.locks_on_pending = true;
                Ok(())
            }
            (Some(p), true) => lock::apply(p.as_raw_fd(), &self.path, &mut f.locks, new),
            (None, _) => lock::apply(f.current.as_raw_fd(), &self.path, &mut f.locks, new),
        }
    }

    fn reopen_prepare(&self, read_only: bool) -> Result<(), Error> {
        if self.is_blockdev && !read_only {
            // Block devices reopen like files; nothing special.
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!read_only);
        let mut flags = libc::O_CLOEXEC;
        if self.direct_flag {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let file = oo.open(&self.path).map_err(|e| open_error(&self.path, e))?;
        let mut f = self.files.lock();
        f.pending = Some(file);
        f.locks_on_pending = false;
        Ok(())
    }

    fn reopen_commit(&self) {
        let mut guard = self.files.lock();
        let f = &mut *guard;
        let Some(new) = f.pending.take() else { return };
        if !f.locks_on_pending && self.locking {
            // The permissions did not change: move the same locks to the new descriptor.
            let state = f.locks;
            lock::move_back(f.current.as_raw_fd(), new.as_raw_fd(), state);
        }
        f.locks_on_pending = false;
        self.fd.store(new.as_raw_fd(), Ordering::Release);
        let old = std::mem::replace(&mut f.current, new);
        drop(guard);
        // Reopens run in drained sections: no request uses the old descriptor any more.
        self.drop_registrations();
        drop(old);
    }

    fn reopen_abort(&self) {
        let mut guard = self.files.lock();
        let f = &mut *guard;
        let Some(p) = f.pending.take() else { return };
        if f.locks_on_pending {
            lock::move_back(p.as_raw_fd(), f.current.as_raw_fd(), f.locks);
            f.locks_on_pending = false;
        }
        drop(p);
    }

    fn request_alignment(&self) -> u32 {
        self.req_align as u32
    }

    fn filename(&self) -> Option<&str> {
        Some(&self.path)
    }
}

/// Plain syscalls on the IoThread, with the same short-transfer rules as the ring ops.
mod inline {
    use super::*;

    pub(super) fn pread_exact(fd: RawFd, offset: u64, mut buf: IoBuf) -> BufResult<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: reads at most `rest.len()` bytes into the live slice `rest`.
            let n = unsafe {
                libc::pread(
                    fd,
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (offset + done as u64) as i64,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                    continue;
                }
                return (Err(e), buf);
            }
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n as usize;
        }
        (Ok(()), buf)
    }

    pub(super) fn pwrite_all(fd: RawFd, offset: u64, buf: IoBuf) -> BufResult<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            // SAFETY: writes at most `rest.len()` bytes from the live slice `rest`.
            let n = unsafe {
                libc::pwrite(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    (offset + done as u64) as i64,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                    continue;
                }
                return (Err(e), buf);
            }
            if n == 0 {
                return (Err(io::Error::from_raw_os_error(libc::ENOSPC)), buf);
            }
            done += n as usize;
        }
        (Ok(()), buf)
    }

    pub(super) fn fdatasync(fd: RawFd) -> io::Result<()> {
        // SAFETY: fdatasync takes only a descriptor.
        if unsafe { libc::fdatasync(fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate takes only integers.
        if unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Creates (or truncates) a regular file of `size` bytes for use as an image, refusing to
/// touch one that another process has locked.
pub fn create_file(path: &Path, size: u64) -> Result<(), Error> {
    let display = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| open_error(&display, e))?;
    let mut st = LockState::default();
    lock::apply(
        file.as_raw_fd(),
        &display,
        &mut st,
        lock::read_write_state(),
    )?;
    let r = file
        .set_len(0)
        .and_then(|_| file.set_len(size))
        .map_err(|e| Error::io(format!("Could not resize '{display}' to {size} bytes"), e));
    // Released explicitly, not by the close: a child that another thread is spawning shares
    // the open file description until it execs, and the locks would live on with it.
    lock::release_all(file.as_raw_fd(), st);
    r
}
