//! qcow2 requests: reads, writes (in place or allocating, with copy-on-write of the rest of
//! the cluster from the backing chain), zeroes, discard, flush and block status.
//!
//! Requests are cut at cluster boundaries. A write to a cluster that is not allocated here
//! (or is shared, compressed, or a zero cluster) claims the guest cluster, so two writes that
//! would allocate the same cluster do not both allocate: the second waits and then writes in
//! place into what the first allocated.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use graph::{BlockStatus, Node, WriteFlags, ZeroFlags};
use iothreads::{BufResult, IoBuf};

use super::header::MAX_L1_BYTES;
use super::layout::{classify, decompress, Cluster, COPIED, ZERO};
use super::Qcow2Driver;

/// The claim key that serialises truncates: no guest cluster (below 2^53) and no L1 index
/// key of `Meta::ensure_l2` (`u64::MAX` less an index below 2^22) is this.
const TRUNCATE_CLAIM: u64 = u64::MAX - (1 << 32);

/// The largest virtual size (QEMU's limit, as the header parser has it).
const MAX_SIZE: u64 = 1 << 62;

fn no_file() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "qcow2 node has no file child")
}

fn ext_l2_write() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "qcow2: writing images with extended L2 entries is not supported",
    )
}

/// Runs `f` with `buf`'s window narrowed to `range` (relative to the window), restoring the
/// window afterwards.
async fn with_window<F, Fut>(buf: IoBuf, start: usize, len: usize, f: F) -> BufResult<()>
where
    F: FnOnce(IoBuf) -> Fut,
    Fut: std::future::Future<Output = BufResult<()>>,
{
    let saved = buf.window();
    let mut b = buf;
    b.set_window(saved.start + start..saved.start + start + len);
    let (r, mut b) = f(b).await;
    b.set_window(saved);
    (r, b)
}

impl Qcow2Driver {
    fn is_v3(&self) -> bool {
        self.version == 3
    }

    fn classify(&self, e: (u64, Option<u64>)) -> Cluster {
        classify(e.0, e.1, self.meta.cluster_bits, self.is_v3())
    }

    /// Reads `buf` (the window) from the backing node at `off`, zeroes past its end.
    async fn read_backing(
        &self,
        backing: Option<&Arc<Node>>,
        off: u64,
        mut buf: IoBuf,
    ) -> BufResult<()> {
        let Some(b) = backing else {
            buf.fill(0);
            return (Ok(()), buf);
        };
        let blen = b.len();
        let n = buf.len() as u64;
        if off >= blen {
            buf.fill(0);
            return (Ok(()), buf);
        }
        if off + n <= blen {
            return b.read(off, buf).await;
        }
        let have = (blen - off) as usize;
        let (r, mut buf) = with_window(buf, 0, have, |w| b.read(off, w)).await;
        buf[have..].fill(0);
        (r, buf)
    }

    /// Decompresses the cluster at (`offset`, `size`) of the file into `out` (one cluster).
    async fn read_compressed(
        &self,
        file: &Node,
        offset: u64,
        size: u64,
        out: &mut [u8],
    ) -> io::Result<()> {
        let size = size.min(2 * self.meta.cs + 512);
        let start = offset & !511;
        let end = (offset + size).next_multiple_of(512);
        let (r, raw) = file.read(start, IoBuf::new((end - start) as usize)).await;
        r?;
        let skip = (offset - start) as usize;
        decompress(self.compression, &raw[skip..skip + size as usize], out)
    }

    pub(crate) async fn do_read(&self, node: &Node, offset: u64, buf: IoBuf) -> BufResult<()> {
        let Some(file) = node.file() else {
            return (Err(no_file()), buf);
        };
        let backing = node.backing();
        let _t = self.meta.enter();
        let cs = self.meta.cs;
        let total = buf.len();
        let mut buf = buf;
        let mut done = 0usize;
        while done < total {
            let off = offset + done as u64;
            let gc = off / cs;
            let in_off = off % cs;
            let n = ((cs - in_off) as usize).min(total - done);
            let entry = match self.meta.l2_entry(&file, gc).await {
                Ok(e) => e,
                Err(e) => return (Err(e), buf),
            };
            let (r, b) = with_window(buf, done, n, |w| {
                self.read_piece(
                    &file,
                    backing.as_ref(),
                    self.classify(entry),
                    off,
                    in_off,
                    w,
                )
            })
            .await;
            buf = b;
            if let Err(e) = r {
                return (Err(e), buf);
            }
            done += n;
        }
        (Ok(()), buf)
    }

    /// Reads one piece inside one guest cluster.
    async fn read_piece(
        &self,
        file: &Node,
        backing: Option<&Arc<Node>>,
        c: Cluster,
        off: u64,
        in_off: u64,
        mut buf: IoBuf,
    ) -> BufResult<()> {
        match c {
            Cluster::Unallocated => self.read_backing(backing, off, buf).await,
            Cluster::Zero { .. } => {
                buf.fill(0);
                (Ok(()), buf)
            }
            Cluster::Normal { host, .. } => file.read(host + in_off, buf).await,
            Cluster::Compressed { offset, size } => {
                let mut cluster = vec![0u8; self.meta.cs as usize];
                let r = self.read_compressed(file, offset, size, &mut cluster).await;
                if r.is_ok() {
                    let n = buf.len();
                    buf.copy_from_slice(&cluster[in_off as usize..in_off as usize + n]);
                }
                (r, buf)
            }
            Cluster::Sub { host, alloc, zero } => {
                let sc = self.meta.cs / 32;
                let mut done = 0usize;
                let total = buf.len();
                while done < total {
                    let pos = in_off + done as u64;
                    let i = (pos / sc) as u32;
                    let n = ((sc - pos % sc) as usize).min(total - done);
                    let (r, b) = with_window(buf, done, n, |mut w| async move {
                        if alloc & (1 << i) != 0 {
                            file.read(host + pos, w).await
                        } else if zero & (1 << i) != 0 {
                            w.fill(0);
                            (Ok(()), w)
                        } else {
                            self.read_backing(backing, off - in_off + pos, w).await
                        }
                    })
                    .await;
                    buf = b;
                    if let Err(e) = r {
                        return (Err(e), buf);
                    }
                    done += n;
                }
                (Ok(()), buf)
            }
        }
    }

    pub(crate) async fn do_write(
        &self,
        node: &Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> BufResult<()> {
        if self.extended_l2 {
            return (Err(ext_l2_write()), buf);
        }
        let Some(file) = node.file() else {
            return (Err(no_file()), buf);
        };
        let backing = node.backing();
        let _t = self.meta.enter();
        let cs = self.meta.cs;
        let total = buf.len();
        let mut buf = buf;
        let mut done = 0usize;
        while done < total {
            let off = offset + done as u64;
            let gc = off / cs;
            let in_off = off % cs;
            let n = ((cs - in_off) as usize).min(total - done);
            let (r, b) = with_window(buf, done, n, |w| {
                self.write_piece(&file, backing.as_ref(), gc, in_off, w)
            })
            .await;
            buf = b;
            if let Err(e) = r {
                return (Err(e), buf);
            }
            done += n;
        }
        if self.meta.needs_writeback() {
            if let Err(e) = self.meta.writeback(&file).await {
                return (Err(e), buf);
            }
        }
        if flags.fua {
            if let Err(e) = self.do_flush(node).await {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// Writes one piece inside one guest cluster.
    async fn write_piece(
        &self,
        file: &Arc<Node>,
        backing: Option<&Arc<Node>>,
        gc: u64,
        in_off: u64,
        buf: IoBuf,
    ) -> BufResult<()> {
        let entry = match self.meta.l2_entry(file, gc).await {
            Ok(e) => e,
            Err(e) => return (Err(e), buf),
        };
        if let Cluster::Normal { host, copied: true } = self.classify(entry) {
            if let Err(e) = self.meta.check_data_cluster(host) {
                return (Err(e), buf);
            }
            let r = file.write(host + in_off, buf, WriteFlags::default()).await;
            self.meta.data_written();
            return r;
        }
        self.meta.claim(gc).await;
        let r = self.allocating_write(file, backing, gc, in_off, buf).await;
        self.meta.release(gc);
        r
    }

    /// Writes into guest cluster `gc` by giving it a new host cluster: the old content (from
    /// backing, a shared or compressed cluster, or zeroes) fills what the write does not
    /// cover. The caller holds the claim on `gc`.
    async fn allocating_write(
        &self,
        file: &Arc<Node>,
        backing: Option<&Arc<Node>>,
        gc: u64,
        in_off: u64,
        buf: IoBuf,
    ) -> BufResult<()> {
        let cs = self.meta.cs;
        // Someone else may have allocated it while we waited for the claim.
        let entry = match self.meta.l2_entry(file, gc).await {
            Ok(e) => e,
            Err(e) => return (Err(e), buf),
        };
        let old = self.classify(entry);
        if let Cluster::Normal { host, copied: true } = old {
            let r = file.write(host + in_off, buf, WriteFlags::default()).await;
            self.meta.data_written();
            return r;
        }
        if let Err(e) = self.meta.ensure_l2(file, gc).await {
            return (Err(e), buf);
        }
        // A preallocated zero cluster of our own is written in place; anything else gets a
        // new cluster.
        let (host, fresh) = match old {
            Cluster::Zero { host, copied: true } if host != 0 => {
                if let Err(e) = self.meta.check_data_cluster(host) {
                    return (Err(e), buf);
                }
                (host, false)
            }
            _ => match self.meta.alloc(file, 1).await {
                Ok(h) => (h, true),
                Err(e) => return (Err(e), buf),
            },
        };
        let whole = in_off == 0 && buf.len() as u64 == cs;
        let (r, buf) = if whole {
            file.write(host, buf, WriteFlags::default()).await
        } else {
            let mut cluster = IoBuf::new(cs as usize);
            let filled = match old {
                Cluster::Unallocated => {
                    let (r, c) = self.read_backing(backing, gc * cs, cluster).await;
                    cluster = c;
                    r
                }
                Cluster::Zero { .. } => Ok(()),
                Cluster::Normal { host: src, .. } => {
                    let (r, c) = file.read(src, cluster).await;
                    cluster = c;
                    r
                }
                Cluster::Compressed { offset, size } => {
                    self.read_compressed(file, offset, size, &mut cluster).await
                }
                Cluster::Sub { .. } => Err(ext_l2_write()),
            };
            if let Err(e) = filled {
                if fresh {
                    self.abandon(host);
                }
                return (Err(e), buf);
            }
            let n = buf.len();
            cluster[in_off as usize..in_off as usize + n].copy_from_slice(&buf);
            let (r, _) = file.write(host, cluster, WriteFlags::default()).await;
            (r, buf)
        };
        if let Err(e) = r {
            if fresh {
                self.abandon(host);
            }
            return (Err(e), buf);
        }
        self.meta.data_written();
        if let Err(e) = self.map(file, gc, host | COPIED, old).await {
            return (Err(e), buf);
        }
        (Ok(()), buf)
    }

    /// A freshly allocated cluster that ended up unused: drop its reference later.
    fn abandon(&self, host: u64) {
        let mut st = self.meta.state.lock();
        self.meta.unmap_later(&mut st, host);
    }

    /// Sets `gc`'s L2 entry to `entry` (loading the table if it was evicted) and schedules
    /// the release of the host cluster(s) `old` mapped.
    async fn map(&self, file: &Node, gc: u64, entry: u64, old: Cluster) -> io::Result<()> {
        loop {
            {
                let mut st = self.meta.state.lock();
                if self.meta.set_l2_entry(&mut st, gc, entry) {
                    let cs = self.meta.cs;
                    let new_host = entry & super::layout::OFFSET_MASK;
                    match old {
                        Cluster::Normal { host, .. } | Cluster::Zero { host, .. }
                            if host != 0 && host != new_host =>
                        {
                            self.meta.unmap_later(&mut st, host);
                        }
                        Cluster::Compressed { offset, size } => {
                            for c in offset / cs..=(offset + size - 1) / cs {
                                self.meta.unmap_later(&mut st, c * cs);
                            }
                        }
                        _ => {}
                    }
                    return Ok(());
                }
            }
            let off = self.meta.l2_table_of(&self.meta.state.lock(), gc);
            self.meta.load(file, off, super::meta::Kind::L2).await?;
        }
    }

    pub(crate) async fn do_write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> io::Result<()> {
        if self.extended_l2 {
            return Err(ext_l2_write());
        }
        let file = node.file().ok_or_else(no_file)?;
        let has_backing = node.backing().is_some();
        let cs = self.meta.cs;
        let size = self.len.load(Ordering::Acquire);
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let gc = off / cs;
            let in_off = off % cs;
            let n = (cs - in_off).min(len - done);
            let whole = in_off == 0 && n == cs;
            let end_of_image = off + n >= size && in_off == 0;
            if (whole || end_of_image) && (self.is_v3() || (!has_backing && flags.may_unmap)) {
                let _t = self.meta.enter();
                self.meta.claim(gc).await;
                let r = self
                    .zero_cluster(&file, gc, has_backing, flags.may_unmap)
                    .await;
                self.meta.release(gc);
                r?;
            } else if flags.no_fallback {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            } else {
                let (r, _) = self
                    .do_write(node, off, IoBuf::new(n as usize), WriteFlags::default())
                    .await;
                r?;
            }
            done += n;
        }
        if self.meta.needs_writeback() {
            self.meta.writeback(&file).await?;
        }
        if flags.fua {
            self.do_flush(node).await?;
        }
        Ok(())
    }

    /// Makes a whole guest cluster read as zeroes through its L2 entry.
    async fn zero_cluster(
        &self,
        file: &Node,
        gc: u64,
        has_backing: bool,
        may_unmap: bool,
    ) -> io::Result<()> {
        let old = self.classify(self.meta.l2_entry(file, gc).await?);
        if old == Cluster::Unallocated && !has_backing {
            return Ok(());
        }
        if matches!(old, Cluster::Zero { .. }) {
            return Ok(());
        }
        let entry = if self.is_v3() {
            match old {
                // Keep a private cluster as a preallocated zero cluster unless unmapping.
                Cluster::Normal { host, copied: true } if !may_unmap => host | COPIED | ZERO,
                _ => ZERO,
            }
        } else {
            0
        };
        self.meta.ensure_l2(file, gc).await?;
        self.map(file, gc, entry, old).await
    }

    pub(crate) async fn do_discard(&self, node: &Node, offset: u64, len: u64) -> io::Result<()> {
        if self.extended_l2 {
            return Err(ext_l2_write());
        }
        let file = node.file().ok_or_else(no_file)?;
        let has_backing = node.backing().is_some();
        let cs = self.meta.cs;
        // Whole clusters only, as QEMU does; partial ones keep their data.
        let first = offset.div_ceil(cs);
        let size = self.len.load(Ordering::Acquire);
        let end = if offset + len >= size {
            size.div_ceil(cs)
        } else {
            (offset + len) / cs
        };
        let _t = self.meta.enter();
        for gc in first..end {
            self.meta.claim(gc).await;
            let r = async {
                let old = self.classify(self.meta.l2_entry(&file, gc).await?);
                if old == Cluster::Unallocated {
                    return Ok(());
                }
                // With a backing file, a discarded cluster must not show the backing data
                // (v3 can say "zeroes"); without one, unallocated reads as zeroes anyway.
                let entry = if self.is_v3() && has_backing { ZERO } else { 0 };
                self.map(&file, gc, entry, old).await
            }
            .await;
            self.meta.release(gc);
            r?;
        }
        if self.meta.needs_writeback() {
            self.meta.writeback(&file).await?;
        }
        Ok(())
    }

    pub(crate) async fn do_flush(&self, node: &Node) -> io::Result<()> {
        let file = node.file().ok_or_else(no_file)?;
        self.meta.writeback(&file).await?;
        file.flush().await
    }

    /// Grows the image to `len` bytes (QEMU's `qcow2_co_truncate` with
    /// `preallocation=off`; see `Meta::grow` for the metadata steps). Where a backing node
    /// is longer than the old size, its data must not show through the new range (as
    /// `bdrv_co_truncate` ensures): the L1 table is grown first, the range up to the
    /// backing node's end is made to read as zeroes and written back, and only then does
    /// the header's size grow, so no crash ever shows backing data there. Truncates of one
    /// image run one at a time.
    pub(crate) async fn do_truncate(&self, node: &Node, len: u64) -> io::Result<()> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if self.is_read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "Block node is read-only",
            ));
        }
        let file = node.file().ok_or_else(no_file)?;
        self.meta.claim(TRUNCATE_CLAIM).await;
        let r = async {
            let cur = self.len.load(Ordering::Acquire);
            if len == cur {
                return Ok(());
            }
            if len < cur {
                return Err(invalid(format!(
                    "qcow2: cannot shrink the image from {cur} to {len} bytes (only growing \
                     is supported)"
                )));
            }
            if !len.is_multiple_of(512) {
                return Err(invalid("The new size must be a multiple of 512".into()));
            }
            if self.extended_l2 {
                return Err(ext_l2_write());
            }
            if self.meta.header.lock().nb_snapshots != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "Can't resize an image which has snapshots",
                ));
            }
            let l1 = len.div_ceil(self.meta.l2_entries * self.meta.cs);
            if len > MAX_SIZE || l1 * 8 > MAX_L1_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!("qcow2: {len} bytes is too large for this cluster size"),
                ));
            }
            let zero_end = node
                .backing()
                .map(|b| b.len().min(len))
                .filter(|&end| end > cur);
            if let Some(end) = zero_end {
                self.meta.grow(&file, cur, l1 as usize).await?;
                self.sync_opened();
                let flags = ZeroFlags {
                    may_unmap: true,
                    ..Default::default()
                };
                self.do_write_zeroes(node, cur, end - cur, flags).await?;
                self.do_flush(node).await?;
            }
            self.meta.grow(&file, len, l1 as usize).await?;
            self.sync_opened();
            self.len.fetch_max(len, Ordering::AcqRel);
            Ok(())
        }
        .await;
        self.meta.release(TRUNCATE_CLAIM);
        r
    }

    /// Copies the size and L1 table fields of the header last written into the one `info`
    /// shows.
    fn sync_opened(&self) {
        let h = self.meta.header.lock().clone();
        let mut o = self.opened.lock();
        o.size = h.size;
        o.l1_size = h.l1_size;
        o.l1_table_offset = h.l1_table_offset;
    }

    pub(crate) async fn do_block_status(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
    ) -> io::Result<(BlockStatus, u64)> {
        let file = node.file().ok_or_else(no_file)?;
        let _t = self.meta.enter();
        let cs = self.meta.cs;
        let status = |c: Cluster, pos: u64| match c {
            Cluster::Unallocated => BlockStatus::Unallocated,
            Cluster::Zero { .. } => BlockStatus::Zero,
            Cluster::Normal { .. } | Cluster::Compressed { .. } => BlockStatus::Data,
            Cluster::Sub { alloc, zero, .. } => {
                let i = ((pos % cs) / (cs / 32)) as u32;
                if alloc & (1 << i) != 0 {
                    BlockStatus::Data
                } else if zero & (1 << i) != 0 {
                    BlockStatus::Zero
                } else {
                    BlockStatus::Unallocated
                }
            }
        };
        let first = status(
            self.classify(self.meta.l2_entry(&file, offset / cs).await?),
            offset,
        );
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let c = self.classify(self.meta.l2_entry(&file, pos / cs).await?);
            if status(c, pos) != first {
                break;
            }
            let step = if matches!(c, Cluster::Sub { .. }) {
                cs / 32 - pos % (cs / 32)
            } else {
                cs - pos % cs
            };
            pos += step;
        }
        Ok((first, pos.min(end) - offset))
    }
}
