//! `qcow2`: QEMU's copy-on-write image format, versions 2 and 3, read and write.
//!
//! - [`header`]: the header and its extensions, checked against the file before use.
//! - [`layout`]: what table entries mean; refcount entries of any width; decompression.
//! - [`meta`]: the L1 and refcount tables, the table cache, allocation, ordered writeback.
//! - [`io`]: the request paths.
//! - [`create`]: making new images.
//!
//! What is refused, with an error that says so: encrypted images, external data files,
//! unknown incompatible features (named from the image's feature table), writing an image
//! marked corrupt or dirty (run `qemu-img check -r all` first), writing extended-L2 images
//! (reading them works), writing compressed clusters. An image with persistent dirty bitmaps
//! opens read-only unless `discard_bitmaps` is set, because writing it would clear the bit
//! that keeps the user's incremental-backup bitmaps valid.
//!
//! Allocation appends at the end of the file and reuses clusters this driver freed (after
//! their grace period), lowest first and as contiguous runs where a multi-cluster write needs
//! several; it does not hunt for holes left by earlier users of the image. Requests larger
//! than a cluster are mapped whole and cut into one piece per host-contiguous run, run
//! concurrently (see the `io` module).

pub mod create;
pub mod header;
mod io;
pub mod layout;
mod meta;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use graph::{
    BlockStatus, Driver, Error, ErrorKind, LocalBoxFuture, Node, Perm, Role, WriteFlags, ZeroFlags,
};
use iothreads::{BufResult, IoBuf};

use header::{Compression, Header};
use meta::Meta;

/// Options of a qcow2 node.
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    /// Open read-only.
    pub read_only: bool,
    /// Bytes of L2 tables and refcount blocks to cache (QEMU's `cache-size`).
    pub cache_size: u64,
    /// Open an image with persistent dirty bitmaps read-write, invalidating the bitmaps.
    pub discard_bitmaps: bool,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            read_only: false,
            cache_size: 32 << 20,
            discard_bitmaps: false,
        }
    }
}

/// What `strata info` and QMP show of an open image.
#[derive(Debug, Clone)]
pub struct Qcow2Info {
    /// The header as opened.
    pub header: Header,
}

/// The qcow2 driver.
pub struct Qcow2Driver {
    version: u32,
    extended_l2: bool,
    compression: Compression,
    read_only: AtomicBool,
    /// A prepared reopen's mode (see [`Driver::reopen_prepare`]).
    reopen_to: parking_lot::Mutex<Option<bool>>,
    meta: Meta,
    /// The header as opened, with the size and L1 table as grown since.
    opened: parking_lot::Mutex<Header>,
    /// The virtual size.
    len: AtomicU64,
    /// The file child, held for the asynchronous close (the node is gone by then).
    close_file: std::sync::OnceLock<Arc<Node>>,
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("version", &self.version)
            .field("size", &self.len.load(Ordering::Relaxed))
            .field("cluster_size", &self.meta.cs)
            .finish()
    }
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::io(format!("qcow2: {what}"), e)
}

fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

/// Reads the header cluster of an image on `file` and parses it.
pub async fn read_header(file: &Node) -> Result<Header, Error> {
    let len = file.len();
    let first = (4096u64).min(len.max(512)) as usize;
    let (r, b) = file.read(0, IoBuf::new(first)).await;
    r.map_err(|e| io_error("cannot read the header", e))?;
    if b.len() < 24 || u32::from_be_bytes(b[0..4].try_into().expect("4")) != header::MAGIC {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "Image is not in qcow2 format",
        ));
    }
    let cluster_bits = u32::from_be_bytes(b[20..24].try_into().expect("4"));
    if !(9..=21).contains(&cluster_bits) {
        return Header::parse(&b, len);
    }
    let cs = (1u64 << cluster_bits) as usize;
    let buf = if cs > first {
        let (r, b) = file.read(0, IoBuf::new(cs)).await;
        r.map_err(|e| io_error("cannot read the header", e))?;
        b
    } else {
        b
    };
    Header::parse(&buf, len)
}

async fn read_u64_table(file: &Node, off: u64, n: usize) -> Result<Vec<u64>, Error> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let (r, b) = file.read(off, IoBuf::new(n * 8)).await;
    r.map_err(|e| io_error("cannot read a table", e))?;
    Ok((0..n).map(|i| layout::be_entry(&b, i)).collect())
}

impl Qcow2Driver {
    /// Opens the image on `file`. Runs on an IoThread (it reads the header and tables).
    pub async fn open(file: &Node, opts: &Qcow2Options) -> Result<Qcow2Driver, Error> {
        let mut h = read_header(file).await?;
        if h.crypt_method != 0 {
            return Err(unsupported("qcow2: encrypted images are not supported"));
        }
        let unknown = h.unknown_incompatible();
        if !unknown.is_empty() {
            return Err(unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                unknown.join(", ")
            )));
        }
        if h.incompatible & header::INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(
                "qcow2: images with an external data file are not supported",
            ));
        }
        let mut read_only = opts.read_only;
        if !read_only {
            if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return Err(Error::new(
                    ErrorKind::CorruptImage,
                    "qcow2: Image is corrupt; cannot be opened read/write",
                ));
            }
            if h.incompatible & header::INCOMPAT_DIRTY != 0 {
                return Err(Error::new(
                    ErrorKind::CorruptImage,
                    "qcow2: the image was not closed cleanly (dirty bit set); run \
                     'qemu-img check -r all' on it before opening it read-write",
                ));
            }
            if h.extended_l2() {
                return Err(unsupported(
                    "qcow2: writing images with extended L2 entries (subclusters) is not \
                     supported; open it read-only",
                ));
            }
            if h.nb_snapshots != 0 {
                // Snapshots share clusters and L2 tables (refcount > 1) that a write would
                // have to copy first; writing them in place would change the snapshots.
                return Err(unsupported(format!(
                    "qcow2: the image has {} internal snapshot(s), which strata does not \
                     write; open it read-only, or remove them with 'qemu-img snapshot -d'",
                    h.nb_snapshots
                )));
            }
            if h.has_bitmaps
                && h.autoclear & header::AUTOCLEAR_BITMAPS != 0
                && !opts.discard_bitmaps
            {
                return Err(Error::new(
                    ErrorKind::PermissionConflict,
                    "qcow2: the image has persistent dirty bitmaps, which writing it would \
                     invalidate; open it read-only, or set discard-bitmaps to write it anyway",
                ));
            }
        }
        if file.is_read_only() {
            read_only = true;
        }
        let l1 = read_u64_table(file, h.l1_table_offset, h.l1_size as usize).await?;
        let rt_entries = (u64::from(h.refcount_table_clusters) * h.cluster_size() / 8) as usize;
        let rt = read_u64_table(file, h.refcount_table_offset, rt_entries).await?;
        let cs = h.cluster_size();
        for (what, entries) in [("L1", &l1), ("refcount", &rt)] {
            if entries
                .iter()
                .any(|e| !(e & layout::OFFSET_MASK).is_multiple_of(cs))
            {
                return Err(Error::new(
                    ErrorKind::CorruptImage,
                    format!("qcow2: {what} table entry is not cluster aligned"),
                ));
            }
        }
        let opened = h.clone();
        if !read_only && h.autoclear != 0 {
            // Autoclear bits this driver does not maintain are cleared on the first write of
            // the header, as the specification asks.
            h.autoclear = 0;
            let bytes = h.serialize()?;
            let mut cluster = vec![0u8; cs.min(1 << 16) as usize];
            cluster[..bytes.len()].copy_from_slice(&bytes);
            let (r, _) = file
                .write(0, IoBuf::from_slice(&cluster), WriteFlags::default())
                .await;
            r.map_err(|e| io_error("cannot update the header", e))?;
            file.flush()
                .await
                .map_err(|e| io_error("cannot update the header", e))?;
        }
        let meta = Meta::new(&h, l1, rt, file.len(), opts.cache_size);
        Ok(Qcow2Driver {
            version: h.version,
            extended_l2: h.extended_l2(),
            compression: h.compression,
            read_only: AtomicBool::new(read_only),
            reopen_to: parking_lot::Mutex::new(None),
            meta,
            len: AtomicU64::new(h.size),
            opened: parking_lot::Mutex::new(opened),
            close_file: std::sync::OnceLock::new(),
        })
    }

    /// Whether the image is open read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// The header as it was when the image was opened, with the virtual size and L1 table
    /// as grown since (see [`Driver::truncate`]).
    pub fn info(&self) -> Qcow2Info {
        Qcow2Info {
            header: self.opened.lock().clone(),
        }
    }

    /// The backing file name and format the header names now.
    pub fn backing_name(&self) -> (Option<String>, Option<String>) {
        let h = self.meta.header.lock();
        (h.backing_file.clone(), h.backing_format.clone())
    }

    /// Writes a new backing file name (and format) into the header, as QEMU's
    /// `bdrv_change_backing_file` does: the image's metadata is written back first, then the
    /// header, then a flush. `node` is this driver's node. Runs on an IoThread.
    pub async fn change_backing_file(
        &self,
        node: &Node,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<(), Error> {
        if self.is_read_only() {
            return Err(Error::new(
                ErrorKind::PermissionConflict,
                "Block node is read-only",
            ));
        }
        let file = node
            .file()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "qcow2 node has no file child"))?;
        self.meta
            .writeback(&file)
            .await
            .map_err(|e| io_error("cannot write metadata back", e))?;
        let bytes = {
            let mut h = self.meta.header.lock();
            let old = (h.backing_file.clone(), h.backing_format.clone());
            h.backing_file = name.map(str::to_string);
            h.backing_format = if name.is_some() {
                format.map(str::to_string)
            } else {
                None
            };
            match h.serialize() {
                Ok(b) => b,
                Err(e) => {
                    (h.backing_file, h.backing_format) = old;
                    return Err(e);
                }
            }
        };
        let mut cluster = vec![0u8; self.meta.cs.min(1 << 16) as usize];
        cluster[..bytes.len()].copy_from_slice(&bytes);
        let (r, _) = file
            .write(0, IoBuf::from_slice(&cluster), WriteFlags::default())
            .await;
        r.map_err(|e| io_error("cannot write the header", e))?;
        file.flush()
            .await
            .map_err(|e| io_error("cannot write the header", e))
    }

    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.meta.cs
    }

    /// Counters for tests: (cached tables, dirty tables, free clusters, clusters in grace).
    pub fn cache_counts(&self) -> (usize, usize, usize, usize) {
        self.meta.debug_counts()
    }
}

impl Driver for Qcow2Driver {
    fn driver_name(&self) -> &'static str {
        "qcow2"
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
        match self.fast_read(node, offset, buf) {
            Ok(fut) => fut,
            Err(buf) => Box::pin(self.do_read(node, offset, buf)),
        }
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        match self.fast_write(node, offset, buf, flags) {
            Ok(fut) => fut,
            Err(buf) => Box::pin(self.do_write(node, offset, buf, flags)),
        }
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(self.do_write_zeroes(node, offset, len, flags))
    }

    fn discard<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(self.do_discard(node, offset, len))
    }

    fn flush<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(self.do_flush(node))
    }

    fn truncate<'a>(&'a self, node: &'a Node, len: u64) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(self.do_truncate(node, len))
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, std::io::Result<(BlockStatus, u64)>> {
        Box::pin(self.do_block_status(node, offset, len))
    }

    fn child_perms(&self, role: Role, perm: Perm, shared: Perm, read_only: bool) -> (Perm, Perm) {
        match role {
            Role::File => graph::metadata_file_perms(perm, shared, read_only),
            _ => graph::default_child_perms(role, perm, shared, read_only),
        }
    }

    /// Reopening read-write checks what opening read-write checks (the header as opened:
    /// this driver is its only writer); reopening read-only needs the metadata written back
    /// first (callers flush the drained node before). The file child reopens on its own
    /// (see `engine::reopen_image`).
    fn reopen_prepare(&self, read_only: bool) -> Result<(), Error> {
        let h = self.opened.lock().clone();
        if !read_only {
            let refuse = |why: &str| {
                Err(Error::new(
                    ErrorKind::PermissionConflict,
                    format!("qcow2: cannot reopen read-write: {why}"),
                ))
            };
            if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return refuse("the image is marked corrupt");
            }
            if h.incompatible & header::INCOMPAT_DIRTY != 0 {
                return refuse("the image was not closed cleanly (dirty bit set)");
            }
            if h.extended_l2() {
                return refuse("writing images with extended L2 entries is not supported");
            }
            if h.nb_snapshots != 0 {
                return refuse("the image has internal snapshots, which strata does not write");
            }
            if h.autoclear != 0 {
                return refuse(
                    "the image has autoclear feature bits this driver does not maintain",
                );
            }
        } else if self.meta.has_dirty() {
            return Err(Error::new(
                ErrorKind::Busy,
                "qcow2: cannot reopen read-only: metadata not written back (flush first)",
            ));
        }
        *self.reopen_to.lock() = Some(read_only);
        Ok(())
    }

    fn reopen_commit(&self) {
        if let Some(ro) = self.reopen_to.lock().take() {
            self.read_only.store(ro, Ordering::Release);
        }
    }

    fn reopen_abort(&self) {
        self.reopen_to.lock().take();
    }

    fn prepare_read_only<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            match node.file() {
                Some(file) => self.meta.trim_ahead(&file).await,
                None => Ok(()),
            }
        })
    }

    fn close<'a>(&'a self) -> LocalBoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            match self.close_file.get() {
                Some(file) if !self.is_read_only() => {
                    self.meta.writeback(file).await?;
                    self.meta.trim_ahead(file).await?;
                    file.flush().await
                }
                _ => Ok(()),
            }
        })
    }
}

/// Opens a qcow2 node named `name` (None: automatic) over `file`. Runs on an IoThread.
pub async fn open(
    name: Option<&str>,
    file: &Arc<Node>,
    opts: &Qcow2Options,
) -> Result<Arc<Node>, Error> {
    let driver = Qcow2Driver::open(file, opts).await?;
    let _ = driver.close_file.set(Arc::clone(file));
    let ro = driver.is_read_only();
    let node = Node::new(name, Box::new(driver), ro)?;
    let m = graph::mutation();
    let mut tx = graph::Transaction::new(&m);
    tx.attach_child(&node, file, Role::File)?;
    tx.commit()?;
    Ok(node)
}
