//! qcow2 requests: reads, writes (in place or allocating, with copy-on-write of the rest of
//! the cluster from the backing chain), zeroes, discard, flush and block status.
//!
//! A request inside one cluster is one piece. A larger one is mapped whole first (the L2
//! entries of all its clusters), then cut into as few pieces as the mapping allows, and the
//! pieces run concurrently:
//!
//! - Reads: guest clusters contiguous on the host become one read of the file, runs read
//!   from the backing node one backing read, zero and unallocated-without-backing runs one
//!   fill (no I/O). The largest piece reads straight into the caller's buffer, the others
//!   into buffers of their own that are copied in when all are done (`IoBuf`s cannot share
//!   an allocation).
//! - Writes: clusters that are allocated here and writable in place (refcount one) are
//!   written where they are. All the others are claimed (one claim per guest cluster, taken
//!   in ascending order, so two requests never wait for each other in a cycle) and mapped
//!   again under the claims; their L2 tables are made to exist first, then runs of clusters
//!   needing a new host cluster get a run of contiguous host clusters at once
//!   (`Meta::alloc_run`). The data goes out with one write per host-contiguous run; a
//!   partial first or last cluster that is not written in place is built whole (the part
//!   the write does not cover read from where the cluster's data is now: the backing
//!   chain, a shared or compressed cluster, or zeroes) and written alone. Only when every
//!   data write has completed are the L2 entries set (so no mapping in the cache ever points
//!   at data not written; writeback then makes the data durable before the mapping, see
//!   `meta`). The claims are released after that.
//!
//! A claim makes two writes that would allocate the same cluster not both allocate: the
//! second waits and then writes in place into what the first allocated. Every request holds
//! a ticket of the current epoch for its whole duration, mapping included, so a host
//! cluster it mapped is not reused before it ends even if a discard frees it meanwhile.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use graph::{BlockStatus, LocalBoxFuture, Node, WriteFlags, ZeroFlags};
use iothreads::{BufResult, IoBuf};

use super::header::MAX_L1_BYTES;
use super::layout::{classify, decompress, Cluster, COPIED, ZERO};
use super::meta::WriteTarget;
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

/// A boxed future of one piece of a request, with the buffer it ran on.
type PieceFuture<'a> = Pin<Box<dyn Future<Output = BufResult<()>> + 'a>>;

/// Polls every future until all are done (each op is submitted on its first poll, so they
/// are all in flight together); returns their outputs in order.
async fn join_all<T>(futs: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let mut futs: Vec<Option<Pin<Box<dyn Future<Output = T> + '_>>>> =
        futs.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *o = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}

/// Where the data of a piece of a read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    /// The file, from this host byte offset.
    Host(u64),
    /// The backing node (zeroes past its end), from this guest byte offset.
    Backing(u64),
    /// Zeroes.
    Zero,
    /// Bytes from `in_off` of the compressed cluster at (`offset`, `size`).
    Compressed { offset: u64, size: u64, in_off: u64 },
}

/// A piece of a read: `len` bytes at `at` in the caller's buffer, from `src`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadPiece {
    at: usize,
    len: usize,
    src: Src,
}

/// Appends `p`, merged into the last piece where both continue each other (same kind of
/// source, contiguous in it).
fn push_read(pieces: &mut Vec<ReadPiece>, p: ReadPiece) {
    if p.len == 0 {
        return;
    }
    if let Some(last) = pieces.last_mut() {
        let ll = last.len as u64;
        let merge = last.at + last.len == p.at
            && match (last.src, p.src) {
                (Src::Host(a), Src::Host(b)) | (Src::Backing(a), Src::Backing(b)) => a + ll == b,
                (Src::Zero, Src::Zero) => true,
                _ => false,
            };
        if merge {
            last.len += p.len;
            return;
        }
    }
    pieces.push(p);
}

/// What a cluster of a multi-cluster write becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Allocated here with refcount one: written where it is, the mapping unchanged.
    InPlace(u64),
    /// A zero cluster with a preallocated host cluster of its own: written there, then
    /// mapped as data.
    Prealloc(u64),
    /// Needs a new host cluster.
    Fresh,
}

/// A piece of a multi-cluster write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WritePiece {
    /// `len` bytes at `at` in the caller's buffer, to the file at `host`.
    Direct { at: usize, len: usize, host: u64 },
    /// Cluster `k` of the request (partial, not in place): written whole at its new host
    /// cluster, the part outside the request filled from its old content.
    Cow { k: usize },
}

/// Appends a direct piece, merged into the last one where both are contiguous in the buffer
/// and on the host.
fn push_write(pieces: &mut Vec<WritePiece>, at: usize, len: usize, host: u64) {
    if let Some(WritePiece::Direct {
        at: la,
        len: ll,
        host: lh,
    }) = pieces.last_mut()
    {
        if *la + *ll == at && *lh + *ll as u64 == host {
            *ll += len;
            return;
        }
    }
    pieces.push(WritePiece::Direct { at, len, host });
}

/// Releases the claims of a multi-cluster write when dropped (also if the request is
/// dropped half-way).
struct Claims<'a> {
    meta: &'a super::meta::Meta,
    gcs: Vec<u64>,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        for &gc in &self.gcs {
            self.meta.release(gc);
        }
    }
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

    /// The host cluster an L2 entry lets a write overwrite as it is (allocated here, refcount
    /// 1), if any.
    fn in_place_host(&self, e: (u64, Option<u64>)) -> Option<u64> {
        match self.classify(e) {
            Cluster::Normal { host, copied: true } => Some(host),
            _ => None,
        }
    }

    /// The common read as a small future of its own: inside one cluster whose L2 table is
    /// cached and that is allocated here, zero, or unallocated (read from the backing
    /// chain). Err(buf) sends the request down the general path ([`Self::do_read`]), whose
    /// future is several times larger to build and move; a fallback repeats no work but
    /// the lookup.
    pub(crate) fn fast_read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
    ) -> Result<LocalBoxFuture<'a, BufResult<()>>, IoBuf> {
        let cs = self.meta.cs;
        let len = buf.len() as u64;
        if len == 0 || offset / cs != (offset + len - 1) / cs {
            return Err(buf);
        }
        let Some(file) = node.file() else {
            return Err(buf);
        };
        // Entered before the mapping is read, as on the general path.
        let ticket = self.meta.enter();
        let Some(c) = self
            .meta
            .try_l2_entry(offset / cs)
            .map(|e| self.classify(e))
        else {
            return Err(buf);
        };
        let backing = match c {
            Cluster::Unallocated => node.backing(),
            _ => None,
        };
        match self.src_of(c, backing.is_some(), offset) {
            Some(Src::Host(host)) => Ok(Box::pin(async move {
                let _t = ticket;
                file.read(host, buf).await
            })),
            // An image above others: the read goes down the chain from here, once.
            Some(Src::Backing(off)) => Ok(Box::pin(async move {
                let _t = ticket;
                self.read_backing(backing.as_ref(), off, buf).await
            })),
            Some(Src::Zero) => {
                let mut buf = buf;
                buf.fill(0);
                Ok(Box::pin(std::future::ready((Ok(()), buf))))
            }
            _ => Err(buf),
        }
    }

    /// The common write as a small future (see [`Self::fast_read`]): inside one cluster
    /// that is writable in place, with its L2 table cached, and no FUA.
    pub(crate) fn fast_write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> Result<LocalBoxFuture<'a, BufResult<()>>, IoBuf> {
        let cs = self.meta.cs;
        let len = buf.len() as u64;
        if self.extended_l2 || flags.fua || len == 0 || offset / cs != (offset + len - 1) / cs {
            return Err(buf);
        }
        let Some(file) = node.file() else {
            return Err(buf);
        };
        let ticket = self.meta.enter();
        let host = match self
            .meta
            .cached_write_target(offset / cs, |e| self.in_place_host(e))
        {
            Ok(Ok(WriteTarget::InPlace(host))) => host,
            _ => return Err(buf),
        };
        Ok(Box::pin(async move {
            let _t = ticket;
            let r = file
                .write(host + offset % cs, buf, WriteFlags::default())
                .await;
            self.meta.data_written();
            r
        }))
    }

    pub(crate) async fn do_read(&self, node: &Node, offset: u64, buf: IoBuf) -> BufResult<()> {
        let Some(file) = node.file() else {
            return (Err(no_file()), buf);
        };
        let backing = node.backing();
        let _t = self.meta.enter();
        let cs = self.meta.cs;
        let total = buf.len() as u64;
        if total == 0 {
            return (Ok(()), buf);
        }
        let first = offset / cs;
        let count = (offset + total - 1) / cs - first + 1;
        if count == 1 {
            // One cluster: one piece, unless an extended L2 entry cuts it into subclusters.
            let entry = match self.meta.l2_entry(&file, first).await {
                Ok(e) => e,
                Err(e) => return (Err(e), buf),
            };
            if let Some(src) = self.src_of(self.classify(entry), backing.is_some(), offset) {
                return self.read_src(&file, backing.as_ref(), src, buf).await;
            }
        }
        let entries = match self.meta.l2_entries(&file, first, count).await {
            Ok(e) => e,
            Err(e) => return (Err(e), buf),
        };
        let mut pieces = Vec::new();
        for (k, e) in entries.into_iter().enumerate() {
            let cstart = (first + k as u64) * cs;
            let s = offset.max(cstart);
            let e_end = (offset + total).min(cstart + cs);
            self.push_cluster(
                &mut pieces,
                self.classify(e),
                backing.is_some(),
                (s - offset) as usize,
                s,
                (e_end - s) as usize,
            );
        }
        self.read_pieces(&file, backing.as_ref(), &pieces, buf)
            .await
    }

    /// Where the bytes of a (non-extended) cluster `c` are, from guest offset `off` on; None
    /// for an extended L2 entry (see [`Self::push_cluster`]).
    fn src_of(&self, c: Cluster, has_backing: bool, off: u64) -> Option<Src> {
        let in_off = off % self.meta.cs;
        Some(match c {
            Cluster::Unallocated if has_backing => Src::Backing(off),
            Cluster::Unallocated | Cluster::Zero { .. } => Src::Zero,
            Cluster::Normal { host, .. } => Src::Host(host + in_off),
            Cluster::Compressed { offset, size } => Src::Compressed {
                offset,
                size,
                in_off,
            },
            Cluster::Sub { .. } => return None,
        })
    }

    /// Appends the pieces of `n` bytes at guest offset `off` (inside cluster `c`), which go
    /// to `at` in the caller's buffer.
    fn push_cluster(
        &self,
        pieces: &mut Vec<ReadPiece>,
        c: Cluster,
        has_backing: bool,
        at: usize,
        off: u64,
        n: usize,
    ) {
        let Cluster::Sub { host, alloc, zero } = c else {
            if let Some(src) = self.src_of(c, has_backing, off) {
                push_read(pieces, ReadPiece { at, len: n, src });
            }
            return;
        };
        let cs = self.meta.cs;
        let sc = cs / 32;
        let in_off = off % cs;
        let mut done = 0usize;
        while done < n {
            let pos = in_off + done as u64;
            let i = (pos / sc) as u32;
            let m = ((sc - pos % sc) as usize).min(n - done);
            let src = if alloc & (1 << i) != 0 {
                Src::Host(host + pos)
            } else if zero & (1 << i) != 0 || !has_backing {
                Src::Zero
            } else {
                Src::Backing(off - in_off + pos)
            };
            push_read(
                pieces,
                ReadPiece {
                    at: at + done,
                    len: m,
                    src,
                },
            );
            done += m;
        }
    }

    /// Reads `buf` (its window) from `src`.
    async fn read_src(
        &self,
        file: &Node,
        backing: Option<&Arc<Node>>,
        src: Src,
        mut buf: IoBuf,
    ) -> BufResult<()> {
        match src {
            Src::Host(host) => file.read(host, buf).await,
            Src::Backing(off) => self.read_backing(backing, off, buf).await,
            Src::Zero => {
                buf.fill(0);
                (Ok(()), buf)
            }
            Src::Compressed {
                offset,
                size,
                in_off,
            } => {
                let mut cluster = vec![0u8; self.meta.cs as usize];
                let r = self.read_compressed(file, offset, size, &mut cluster).await;
                if r.is_ok() {
                    let n = buf.len();
                    buf.copy_from_slice(&cluster[in_off as usize..in_off as usize + n]);
                }
                (r, buf)
            }
        }
    }

    /// Runs the pieces of a read concurrently: zero pieces are filled first, the largest
    /// piece that is a plain read goes straight into the caller's buffer, the others into
    /// buffers of their own that are copied in when all are done.
    async fn read_pieces(
        &self,
        file: &Node,
        backing: Option<&Arc<Node>>,
        pieces: &[ReadPiece],
        mut buf: IoBuf,
    ) -> BufResult<()> {
        for p in pieces.iter().filter(|p| p.src == Src::Zero) {
            buf[p.at..p.at + p.len].fill(0);
        }
        let io: Vec<&ReadPiece> = pieces.iter().filter(|p| p.src != Src::Zero).collect();
        match io.as_slice() {
            [] => return (Ok(()), buf),
            [p] => {
                return with_window(buf, p.at, p.len, |w| self.read_src(file, backing, p.src, w))
                    .await
            }
            _ => {}
        }
        let primary = io
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.src, Src::Host(_) | Src::Backing(_)))
            .max_by_key(|(_, p)| p.len)
            .map(|(i, _)| i);
        let saved = buf.window();
        let mut main = Some(buf);
        let mut futs: Vec<PieceFuture<'_>> = Vec::with_capacity(io.len());
        for (i, p) in io.iter().enumerate() {
            let b = if Some(i) == primary {
                let mut b = main.take().expect("one primary piece");
                b.set_window(saved.start + p.at..saved.start + p.at + p.len);
                b
            } else {
                IoBuf::new(p.len)
            };
            futs.push(Box::pin(self.read_src(file, backing, p.src, b)));
        }
        let mut err = None;
        let mut temps = Vec::with_capacity(io.len());
        for (i, (r, b)) in join_all(futs).await.into_iter().enumerate() {
            if let Err(e) = r {
                err.get_or_insert(e);
            }
            if Some(i) == primary {
                main = Some(b);
            } else {
                temps.push((io[i].at, b));
            }
        }
        let mut buf = main.expect("the caller's buffer is back");
        buf.set_window(saved);
        if let Some(e) = err {
            return (Err(e), buf);
        }
        for (at, t) in temps {
            buf[at..at + t.len()].copy_from_slice(&t);
        }
        (Ok(()), buf)
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
        let total = buf.len() as u64;
        let (r, buf) = if total == 0 {
            (Ok(()), buf)
        } else if offset / cs == (offset + total - 1) / cs {
            self.write_piece(&file, backing.as_ref(), offset / cs, offset % cs, buf)
                .await
        } else {
            self.write_multi(&file, backing.as_ref(), offset, buf).await
        };
        if let Err(e) = r {
            return (Err(e), buf);
        }
        if flags.fua {
            if let Err(e) = self.do_flush(node).await {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// Writes a request that spans more than one guest cluster (see the module doc): maps
    /// it, claims the clusters that are not writable in place (ascending), maps those again
    /// under the claims, and writes.
    async fn write_multi(
        &self,
        file: &Arc<Node>,
        backing: Option<&Arc<Node>>,
        offset: u64,
        buf: IoBuf,
    ) -> BufResult<()> {
        let cs = self.meta.cs;
        let first = offset / cs;
        let count = (offset + buf.len() as u64 - 1) / cs - first + 1;
        let entries = match self.meta.l2_entries(file, first, count).await {
            Ok(e) => e,
            Err(e) => return (Err(e), buf),
        };
        let mut old: Vec<Cluster> = entries.into_iter().map(|e| self.classify(e)).collect();
        let mut claims = Claims {
            meta: &self.meta,
            gcs: Vec::new(),
        };
        for (k, c) in old.iter().enumerate() {
            if !matches!(c, Cluster::Normal { copied: true, .. }) {
                let gc = first + k as u64;
                self.meta.claim(gc).await;
                claims.gcs.push(gc);
            }
        }
        if !claims.gcs.is_empty() {
            // Someone else may have allocated (or changed) a cluster while we waited for it.
            let again = match self.meta.l2_entries(file, first, count).await {
                Ok(e) => e,
                Err(e) => return (Err(e), buf),
            };
            for &gc in &claims.gcs {
                let k = (gc - first) as usize;
                old[k] = self.classify(again[k]);
            }
        }
        let (r, buf) = self.write_claimed(file, backing, offset, buf, &old).await;
        drop(claims);
        (self.writeback_if_full(file, r).await, buf)
    }

    /// The body of [`Self::write_multi`], under the claims: `old` is what each cluster of the
    /// request maps to now.
    async fn write_claimed(
        &self,
        file: &Arc<Node>,
        backing: Option<&Arc<Node>>,
        offset: u64,
        buf: IoBuf,
        old: &[Cluster],
    ) -> BufResult<()> {
        let cs = self.meta.cs;
        let first = offset / cs;
        let total = buf.len() as u64;
        let n = old.len();
        // The part of the request in its cluster k: (at in the buffer, length, offset in the
        // cluster).
        let span = |k: usize| -> (usize, usize, u64) {
            let cstart = (first + k as u64) * cs;
            let s = offset.max(cstart);
            let e = (offset + total).min(cstart + cs);
            ((s - offset) as usize, (e - s) as usize, s - cstart)
        };
        let mut targets = Vec::with_capacity(n);
        for c in old {
            let t = match *c {
                Cluster::Normal { host, copied: true } => Target::InPlace(host),
                // A preallocated zero cluster of our own is written in place; anything else
                // gets a new cluster.
                Cluster::Zero { host, copied: true } if host != 0 => Target::Prealloc(host),
                Cluster::Sub { .. } => return (Err(ext_l2_write()), buf),
                _ => Target::Fresh,
            };
            if let Target::InPlace(h) | Target::Prealloc(h) = t {
                if let Err(e) = self.meta.check_data_cluster(h) {
                    return (Err(e), buf);
                }
            }
            targets.push(t);
        }
        // The L2 tables first, so a new table does not land inside a run of new data
        // clusters.
        let mut table = None;
        for (k, t) in targets.iter().enumerate() {
            let gc = first + k as u64;
            let l1i = gc / self.meta.l2_entries;
            if !matches!(t, Target::InPlace(_)) && table != Some(l1i) {
                if let Err(e) = self.meta.ensure_l2(file, gc).await {
                    return (Err(e), buf);
                }
                table = Some(l1i);
            }
        }
        // Host clusters: runs of new ones allocated as runs.
        let mut hosts = vec![0u64; n];
        let mut fresh: Vec<u64> = Vec::new();
        let mut k = 0;
        while k < n {
            match targets[k] {
                Target::InPlace(h) | Target::Prealloc(h) => {
                    hosts[k] = h;
                    k += 1;
                }
                Target::Fresh => {
                    let end = (k..n).find(|&j| targets[j] != Target::Fresh).unwrap_or(n);
                    while k < end {
                        match self.meta.alloc_run(file, (end - k) as u64).await {
                            Ok((h, got)) => {
                                for j in 0..got as usize {
                                    hosts[k + j] = h + j as u64 * cs;
                                    fresh.push(h + j as u64 * cs);
                                }
                                k += got as usize;
                            }
                            Err(e) => {
                                self.abandon_all(&fresh);
                                return (Err(e), buf);
                            }
                        }
                    }
                }
            }
        }
        // The writes: one per host-contiguous run of what comes from the buffer, and one per
        // partial cluster that needs the rest of its old content.
        let mut pieces = Vec::new();
        for (k, t) in targets.iter().enumerate() {
            let (at, len, in_off) = span(k);
            if matches!(t, Target::InPlace(_)) || len as u64 == cs {
                push_write(&mut pieces, at, len, hosts[k] + in_off);
            } else {
                pieces.push(WritePiece::Cow { k });
            }
        }
        let primary = pieces
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match p {
                WritePiece::Direct { len, .. } => Some((i, *len)),
                WritePiece::Cow { .. } => None,
            })
            .max_by_key(|&(_, len)| len)
            .map(|(i, _)| i);
        // Every other piece's buffer is built (copied out of the caller's) before the
        // caller's buffer moves into the largest direct piece.
        let mut bufs: Vec<Option<IoBuf>> = Vec::with_capacity(pieces.len());
        for (i, p) in pieces.iter().enumerate() {
            bufs.push(match *p {
                WritePiece::Direct { .. } if Some(i) == primary => None,
                WritePiece::Direct { at, len, .. } => Some(IoBuf::from_slice(&buf[at..at + len])),
                WritePiece::Cow { k } => {
                    let (at, len, in_off) = span(k);
                    let mut c = IoBuf::new(cs as usize);
                    c[in_off as usize..in_off as usize + len].copy_from_slice(&buf[at..at + len]);
                    Some(c)
                }
            });
        }
        let saved = buf.window();
        let mut main = Some(buf);
        let mut futs: Vec<PieceFuture<'_>> = Vec::with_capacity(pieces.len());
        for (p, b) in pieces.iter().zip(bufs) {
            futs.push(match *p {
                WritePiece::Direct { at, len, host } => {
                    let b = b.unwrap_or_else(|| {
                        let mut b = main.take().expect("one primary piece");
                        b.set_window(saved.start + at..saved.start + at + len);
                        b
                    });
                    Box::pin(file.write(host, b, WriteFlags::default()))
                }
                WritePiece::Cow { k } => {
                    let (_, len, in_off) = span(k);
                    let gc = first + k as u64;
                    let c = b.expect("built above");
                    Box::pin(self.cow_cluster(
                        file,
                        backing,
                        gc,
                        old[k],
                        (in_off, len as u64),
                        hosts[k],
                        c,
                    ))
                }
            });
        }
        let mut err = None;
        for (i, (r, b)) in join_all(futs).await.into_iter().enumerate() {
            if let Err(e) = r {
                err.get_or_insert(e);
            }
            if Some(i) == primary {
                main = Some(b);
            }
        }
        let mut buf = main.expect("the caller's buffer is back");
        buf.set_window(saved);
        if let Some(e) = err {
            self.abandon_all(&fresh);
            return (Err(e), buf);
        }
        self.meta.data_written();
        // The data is written: now the mappings.
        for k in 0..n {
            if matches!(targets[k], Target::InPlace(_)) {
                continue;
            }
            if let Err(e) = self
                .map(file, first + k as u64, hosts[k] | COPIED, old[k])
                .await
            {
                // The new clusters not mapped yet stay unused.
                let rest: Vec<u64> = (k..n)
                    .filter(|&j| targets[j] == Target::Fresh)
                    .map(|j| hosts[j])
                    .collect();
                self.abandon_all(&rest);
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// Writes guest cluster `gc` whole at `host`: `cluster` holds the new data at
    /// `keep` = (offset, length); the rest is filled from `old`, what the cluster maps to now
    /// (the backing chain, a shared or compressed cluster, or zeroes).
    #[allow(clippy::too_many_arguments)]
    async fn cow_cluster(
        &self,
        file: &Node,
        backing: Option<&Arc<Node>>,
        gc: u64,
        old: Cluster,
        keep: (u64, u64),
        host: u64,
        cluster: IoBuf,
    ) -> BufResult<()> {
        let cs = self.meta.cs;
        let mut cluster = cluster;
        let (in_off, len) = keep;
        let rest = [(0, in_off), (in_off + len, cs)];
        if let Cluster::Compressed { offset, size } = old {
            let mut data = vec![0u8; cs as usize];
            if let Err(e) = self.read_compressed(file, offset, size, &mut data).await {
                return (Err(e), cluster);
            }
            for (s, e) in rest {
                cluster[s as usize..e as usize].copy_from_slice(&data[s as usize..e as usize]);
            }
        } else {
            for (s, e) in rest {
                if s >= e {
                    continue;
                }
                let (r, c) = match old {
                    Cluster::Unallocated => {
                        with_window(cluster, s as usize, (e - s) as usize, |w| {
                            self.read_backing(backing, gc * cs + s, w)
                        })
                        .await
                    }
                    Cluster::Normal { host: src, .. } => {
                        with_window(cluster, s as usize, (e - s) as usize, |w| {
                            file.read(src + s, w)
                        })
                        .await
                    }
                    Cluster::Sub { .. } => (Err(ext_l2_write()), cluster),
                    // Zeroes: the buffer is zeroed already.
                    Cluster::Zero { .. } | Cluster::Compressed { .. } => (Ok(()), cluster),
                };
                cluster = c;
                if let Err(e) = r {
                    return (Err(e), cluster);
                }
            }
        }
        file.write(host, cluster, WriteFlags::default()).await
    }

    /// Freshly allocated clusters that ended up unused: drop their references later.
    fn abandon_all(&self, hosts: &[u64]) {
        if hosts.is_empty() {
            return;
        }
        let mut st = self.meta.state.lock();
        for &host in hosts {
            self.meta.unmap_later(&mut st, host);
        }
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
        match self
            .meta
            .write_target(file, gc, |e| self.in_place_host(e))
            .await
        {
            Ok(WriteTarget::InPlace(host)) => {
                let r = file.write(host + in_off, buf, WriteFlags::default()).await;
                self.meta.data_written();
                return r;
            }
            Ok(WriteTarget::Allocate) => {}
            Err(e) => return (Err(e), buf),
        }
        self.meta.claim(gc).await;
        let (r, buf) = self.allocating_write(file, backing, gc, in_off, buf).await;
        self.meta.release(gc);
        (self.writeback_if_full(file, r).await, buf)
    }

    /// After a write that may have dirtied metadata (an in-place overwrite does not): writes
    /// the cache back when too much of it is dirty.
    async fn writeback_if_full(&self, file: &Node, r: io::Result<()>) -> io::Result<()> {
        r?;
        if self.meta.needs_writeback() {
            self.meta.writeback(file).await?;
        }
        Ok(())
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
