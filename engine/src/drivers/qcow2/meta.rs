//! qcow2 metadata: the L1 table, the refcount table, a cache of L2 tables and refcount
//! blocks, cluster allocation and freeing, and the ordered writeback that makes it durable.
//!
//! All of it sits behind one mutex, held only for in-memory work; every read or write of a
//! table is an I/O on the `file` child, done with the mutex released.
//!
//! # Crash consistency
//!
//! Tables are written back lazily (on a guest flush, on cache pressure, at close), always in
//! this order, each step awaited and then made durable with a flush before the next begins:
//!
//! 1. guest data (a flush), so no durable mapping ever points at data not yet durable;
//! 2. refcount blocks, then (after a flush) the refcount table if it changed, and if the
//!    table moved, a flush and the header that points at it; so no durable table entry
//!    points at a block not yet written, and no durable mapping at a cluster not yet counted;
//! 3. L2 tables; 4. L1 entries.
//!
//! The tables written in one writeback are copies taken at one instant under the mutex, so a
//! mapping made after that instant (whose data may not be durable yet) waits for the next
//! writeback. Clusters that lose their last mapping are freed (refcount decremented) only
//! after the L2 table without the mapping is durable, and are reused only after every request
//! that started before they were freed has ended (a two-bucket epoch), so no in-flight read can
//! see a cluster rewritten under it. A crash at any point leaves an image whose on-disk
//! mappings and refcounts agree, at worst with leaked clusters, which `qemu-img check`
//! reports as leaks.

use std::collections::{BTreeSet, HashMap};
use std::future::poll_fn;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Poll, Waker};

use graph::counter::PerThreadCounter;
use graph::{Node, WriteFlags};
use iothreads::IoBuf;
use parking_lot::Mutex;

use super::header::Header;
use super::layout::{self, refcount_get, refcount_set, OFFSET_MASK};

/// What a cached table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    L2,
    Refblock,
}

pub(crate) struct Table {
    pub(crate) data: Box<[u8]>,
    kind: Kind,
    dirty: bool,
    gen: u64,
    used: u64,
}

/// Keys for waiting on the metadata state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitKey {
    Table(u64),
    Claim(u64),
    Flush,
}

pub(crate) struct State {
    pub(crate) l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    /// Where the L1 table is, and how many clusters it occupies (it may hold more entries
    /// than `l1.len()`: the rest of its last cluster).
    l1_offset: u64,
    l1_clusters: u64,
    rt: Vec<u64>,
    rt_dirty: bool,
    rt_offset: u64,
    rt_clusters: u32,
    /// Old refcount tables to free once the header pointing at the new one is durable.
    rt_retired: Vec<(u64, u64)>,
    header_dirty: bool,
    tables: HashMap<u64, Table, BuildHasherDefault<OffsetHasher>>,
    loading: BTreeSet<u64>,
    tick: u64,
    gen: u64,
    /// First cluster-aligned byte past every cluster in use.
    end: u64,
    /// Free clusters ready for reuse.
    free: Vec<u64>,
    /// `free` is sorted from the highest offset down (see `Meta::free_run`).
    free_sorted: bool,
    /// Clusters whose refcount reached 0, with the epoch they did.
    grace: Vec<(u64, u64)>,
    /// Clusters unmapped in a cached L2 table: freed after that table is durable.
    unmapped: Vec<u64>,
    /// Guest clusters being allocated.
    claims: BTreeSet<u64>,
    waiters: Vec<(WaitKey, Waker)>,
    /// How far the file reaches (preallocated ahead of `end`; see `Meta::grow_ahead`).
    grown: u64,
    /// Preallocation failed once: not tried again.
    prealloc_off: bool,
    flushing: bool,
    pub(crate) dirty_tables: usize,
}

/// Hashes the cached tables' keys, which are cluster-aligned file offsets chosen by the
/// image, not by an adversary: one multiply instead of SipHash on the lookup every request
/// makes.
#[derive(Default)]
pub(crate) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // The low bits of an offset are zero; the multiply spreads the high ones down, and
        // the fold brings the product's well-mixed top half to where hashbrown looks.
        let x = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 32);
    }
}

/// Where a write into one guest cluster goes (see [`Meta::write_target`]).
pub(crate) enum WriteTarget {
    /// Over the host cluster at this offset, as it is.
    InPlace(u64),
    /// A new cluster must be allocated (under the guest cluster's claim).
    Allocate,
}

/// The metadata of one image.
pub(crate) struct Meta {
    pub(crate) cluster_bits: u32,
    pub(crate) cs: u64,
    refcount_bits: u32,
    refblock_entries: u64,
    pub(crate) l2_entries: u64,
    pub(crate) l2_entry_size: u64,
    capacity: usize,
    pub(crate) state: Mutex<State>,
    /// Data written since the last flush began (read and cleared by a writeback).
    data_dirty: AtomicBool,
    /// Requests in flight, by epoch parity (see the module doc).
    epoch: AtomicU64,
    active: [PerThreadCounter; 2],
    /// The header as last written (for rewrites).
    pub(crate) header: Mutex<Header>,
}

/// An entered request: counted in its epoch's bucket until dropped.
pub(crate) struct Ticket<'a> {
    meta: &'a Meta,
    bucket: usize,
    thread: usize,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.meta.active[self.bucket].dec(self.thread);
    }
}

fn eio(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn wake(st: &mut State, key: WaitKey) {
    let mut i = 0;
    while i < st.waiters.len() {
        if st.waiters[i].0 == key {
            st.waiters.swap_remove(i).1.wake();
        } else {
            i += 1;
        }
    }
}

/// Reads one cluster-sized table (zeroes past the end of the file).
async fn read_table(file: &Node, off: u64, len: usize) -> io::Result<IoBuf> {
    let (r, b) = file.read(off, IoBuf::new(len)).await;
    r.map(|_| b)
}

async fn write_bytes(file: &Node, off: u64, data: &[u8]) -> io::Result<()> {
    let (r, _) = file
        .write(off, IoBuf::from_slice(data), WriteFlags::default())
        .await;
    r
}

impl Meta {
    /// Metadata over a parsed header, its L1 table and refcount table, for a file of
    /// `file_len` bytes.
    pub(crate) fn new(
        h: &Header,
        l1: Vec<u64>,
        rt: Vec<u64>,
        file_len: u64,
        cache_bytes: u64,
    ) -> Meta {
        let cs = h.cluster_size();
        let refcount_bits = h.refcount_bits();
        let capacity = (cache_bytes / cs).max(16) as usize;
        let l1_clusters = (l1.len() as u64 * 8).div_ceil(cs);
        Meta {
            cluster_bits: h.cluster_bits,
            cs,
            refcount_bits,
            refblock_entries: cs * 8 / u64::from(refcount_bits),
            l2_entries: h.l2_entries(),
            l2_entry_size: h.l2_entry_size(),
            capacity,
            state: Mutex::new(State {
                l1,
                l1_dirty: BTreeSet::new(),
                l1_offset: h.l1_table_offset,
                l1_clusters,
                rt,
                rt_dirty: false,
                rt_offset: h.refcount_table_offset,
                rt_clusters: h.refcount_table_clusters,
                rt_retired: Vec::new(),
                header_dirty: false,
                tables: HashMap::default(),
                loading: BTreeSet::new(),
                tick: 0,
                gen: 0,
                end: file_len.next_multiple_of(cs),
                grown: file_len,
                prealloc_off: false,
                free: Vec::new(),
                free_sorted: true,
                grace: Vec::new(),
                unmapped: Vec::new(),
                claims: BTreeSet::new(),
                waiters: Vec::new(),
                flushing: false,
                dirty_tables: 0,
            }),
            data_dirty: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            active: [PerThreadCounter::new(), PerThreadCounter::new()],
            header: Mutex::new(h.clone()),
        }
    }

    /// Counts a request in its epoch until the ticket drops.
    pub(crate) fn enter(&self) -> Ticket<'_> {
        let thread = iothreads::current_index().unwrap_or(0);
        let bucket = (self.epoch.load(Ordering::SeqCst) & 1) as usize;
        self.active[bucket].enter(thread);
        Ticket {
            meta: self,
            bucket,
            thread,
        }
    }

    /// Advances the epoch if every request of the previous one has ended.
    fn try_advance(&self) -> u64 {
        let e = self.epoch.load(Ordering::SeqCst);
        // Requests of epoch e-1 sit in bucket (e+1)&1: advancing to e+1 reuses that bucket.
        if self.active[((e + 1) & 1) as usize].sum() == 0 {
            let _ = self
                .epoch
                .compare_exchange(e, e + 1, Ordering::SeqCst, Ordering::SeqCst);
        }
        self.epoch.load(Ordering::SeqCst)
    }

    /// Waits until `done` holds, registering under `key` to be woken.
    pub(crate) async fn wait(&self, key: WaitKey, done: impl Fn(&State) -> bool) {
        poll_fn(|cx| {
            let mut st = self.state.lock();
            if done(&st) {
                Poll::Ready(())
            } else {
                st.waiters.push((key, cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    // ---- the table cache ----

    /// Makes sure the table at `off` is cached, reading it if needed (one reader at a time).
    pub(crate) async fn load(&self, file: &Node, off: u64, kind: Kind) -> io::Result<()> {
        loop {
            {
                let mut st = self.state.lock();
                if st.tables.contains_key(&off) {
                    return Ok(());
                }
                if !st.loading.contains(&off) {
                    st.loading.insert(off);
                    break;
                }
            }
            self.wait(WaitKey::Table(off), |st| !st.loading.contains(&off))
                .await;
        }
        let r = read_table(file, off, self.cs as usize).await;
        let mut st = self.state.lock();
        st.loading.remove(&off);
        wake(&mut st, WaitKey::Table(off));
        let buf = r?;
        st.tick += 1;
        let used = st.tick;
        self.evict(&mut st, Some(off));
        st.tables.insert(
            off,
            Table {
                data: buf.to_vec().into_boxed_slice(),
                kind,
                dirty: false,
                gen: 0,
                used,
            },
        );
        Ok(())
    }

    /// Drops least recently used clean tables until the cache is within its capacity (less
    /// one slot for `keep`, about to be inserted). Dirty tables stay: the cache may grow past
    /// its capacity until a writeback cleans them (writes trigger one). The table being
    /// loaded is never the victim, or a lookup could load it forever.
    fn evict(&self, st: &mut State, keep: Option<u64>) {
        let limit = if keep.is_some() {
            self.capacity.saturating_sub(1)
        } else {
            self.capacity
        };
        while st.tables.len() > limit {
            let victim = st
                .tables
                .iter()
                .filter(|(o, t)| !t.dirty && Some(**o) != keep)
                .min_by_key(|(_, t)| t.used)
                .map(|(o, _)| *o);
            match victim {
                Some(o) => {
                    st.tables.remove(&o);
                }
                None => break,
            }
        }
    }

    /// Marks a cached table changed.
    pub(crate) fn touch(st: &mut State, off: u64) {
        st.gen += 1;
        let gen = st.gen;
        if let Some(t) = st.tables.get_mut(&off) {
            if !t.dirty {
                st.dirty_tables += 1;
            }
            t.dirty = true;
            t.gen = gen;
        }
    }

    /// Whether enough tables are dirty that a writeback should run now.
    pub(crate) fn needs_writeback(&self) -> bool {
        let st = self.state.lock();
        st.dirty_tables * 2 > self.capacity
    }

    /// Whether any metadata table is dirty in the cache (a reopen read-only needs none).
    pub(crate) fn has_dirty(&self) -> bool {
        self.state.lock().dirty_tables > 0
    }

    /// Records that guest data was written since the last writeback.
    pub(crate) fn data_written(&self) {
        // After the write completed: a flush that takes the flag before this store covers
        // only writes that completed before it began, which this one had not.
        self.data_dirty.store(true, Ordering::Release);
    }

    // ---- L1/L2 lookups ----

    /// The L2 table offset for guest cluster `gc` (0: none).
    pub(crate) fn l2_table_of(&self, st: &State, gc: u64) -> u64 {
        let l1i = (gc / self.l2_entries) as usize;
        st.l1.get(l1i).map_or(0, |e| e & OFFSET_MASK)
    }

    /// Reads the L2 entry (and extended bitmap) of guest cluster `gc`, loading its table.
    pub(crate) async fn l2_entry(&self, file: &Node, gc: u64) -> io::Result<(u64, Option<u64>)> {
        loop {
            let need = match self.cached_l2_entry(&mut self.state.lock(), gc) {
                Ok(e) => return Ok(e),
                Err(off) => off,
            };
            self.load(file, need, Kind::L2).await?;
        }
    }

    /// The L2 entry of guest cluster `gc` if its table is cached (or there is none: an
    /// unallocated entry); else Err(the table's offset) to load.
    fn cached_l2_entry(&self, st: &mut State, gc: u64) -> Result<(u64, Option<u64>), u64> {
        let off = self.l2_table_of(st, gc);
        if off == 0 {
            return Ok((0, None));
        }
        st.tick += 1;
        let tick = st.tick;
        let Some(t) = st.tables.get_mut(&off) else {
            return Err(off);
        };
        t.used = tick;
        let i = (gc % self.l2_entries) as usize;
        if self.l2_entry_size == 16 {
            return Ok((
                layout::be_entry(&t.data, i * 2),
                Some(layout::be_entry(&t.data, i * 2 + 1)),
            ));
        }
        Ok((layout::be_entry(&t.data, i), None))
    }

    /// For a write into guest cluster `gc`, under one lock: its L2 entry, and, when
    /// `in_place` finds it names a host cluster the write may overwrite as it is, that
    /// cluster, checked not to be metadata (see [`Self::check_data_cluster`]).
    pub(crate) async fn write_target(
        &self,
        file: &Node,
        gc: u64,
        in_place: impl Fn((u64, Option<u64>)) -> Option<u64>,
    ) -> io::Result<WriteTarget> {
        loop {
            match self.cached_write_target(gc, &in_place) {
                Ok(t) => return t,
                Err(need) => self.load(file, need, Kind::L2).await?,
            }
        }
    }

    /// [`Self::write_target`] if the L2 table is cached; else Err(the table's offset).
    pub(crate) fn cached_write_target(
        &self,
        gc: u64,
        in_place: impl Fn((u64, Option<u64>)) -> Option<u64>,
    ) -> Result<io::Result<WriteTarget>, u64> {
        let mut st = self.state.lock();
        let e = self.cached_l2_entry(&mut st, gc)?;
        Ok(match in_place(e) {
            Some(host) => self
                .data_cluster_ok(&st, host)
                .map(|_| WriteTarget::InPlace(host)),
            None => Ok(WriteTarget::Allocate),
        })
    }

    /// The L2 entry of guest cluster `gc` if its table is cached (or there is none).
    pub(crate) fn try_l2_entry(&self, gc: u64) -> Option<(u64, Option<u64>)> {
        self.cached_l2_entry(&mut self.state.lock(), gc).ok()
    }

    /// Reads the L2 entries (and extended bitmaps) of guest clusters `gc..gc + n`, loading
    /// their tables: one lock per table instead of one per cluster.
    pub(crate) async fn l2_entries(
        &self,
        file: &Node,
        gc: u64,
        n: u64,
    ) -> io::Result<Vec<(u64, Option<u64>)>> {
        let mut out: Vec<(u64, Option<u64>)> = Vec::with_capacity(n as usize);
        loop {
            let need = {
                let mut st = self.state.lock();
                let mut need = None;
                while (out.len() as u64) < n {
                    let c = gc + out.len() as u64;
                    let first = c % self.l2_entries;
                    let here = (self.l2_entries - first).min(n - out.len() as u64);
                    let off = self.l2_table_of(&st, c);
                    if off == 0 {
                        out.resize(out.len() + here as usize, (0, None));
                        continue;
                    }
                    st.tick += 1;
                    let tick = st.tick;
                    let Some(t) = st.tables.get_mut(&off) else {
                        need = Some(off);
                        break;
                    };
                    t.used = tick;
                    for i in first as usize..(first + here) as usize {
                        out.push(if self.l2_entry_size == 16 {
                            (
                                layout::be_entry(&t.data, i * 2),
                                Some(layout::be_entry(&t.data, i * 2 + 1)),
                            )
                        } else {
                            (layout::be_entry(&t.data, i), None)
                        });
                    }
                }
                need
            };
            match need {
                Some(off) => self.load(file, off, Kind::L2).await?,
                None => return Ok(out),
            }
        }
    }

    /// Sets the L2 entry of guest cluster `gc` in its cached table (the caller loaded it).
    /// Returns false if the table is no longer cached.
    pub(crate) fn set_l2_entry(&self, st: &mut State, gc: u64, entry: u64) -> bool {
        let off = self.l2_table_of(st, gc);
        let i = (gc % self.l2_entries) as usize;
        match st.tables.get_mut(&off) {
            Some(t) => {
                layout::set_be_entry(&mut t.data, i, entry);
                Self::touch(st, off);
                true
            }
            None => false,
        }
    }

    // ---- claims: one allocation per guest cluster at a time ----

    /// Claims guest cluster `gc` for allocation, waiting while someone else holds it.
    pub(crate) async fn claim(&self, gc: u64) {
        loop {
            {
                let mut st = self.state.lock();
                if !st.claims.contains(&gc) {
                    st.claims.insert(gc);
                    return;
                }
            }
            self.wait(WaitKey::Claim(gc), |st| !st.claims.contains(&gc))
                .await;
        }
    }

    /// Releases a claim.
    pub(crate) fn release(&self, gc: u64) {
        let mut st = self.state.lock();
        st.claims.remove(&gc);
        wake(&mut st, WaitKey::Claim(gc));
    }

    // ---- refcounts ----

    /// Where the refcount of host cluster `c` lives: Ok(block offset) or the table index that
    /// has no block yet.
    fn refblock_of(&self, st: &State, c: u64) -> Result<u64, usize> {
        let ti = (c / self.refblock_entries) as usize;
        match st.rt.get(ti) {
            Some(&e) if e & OFFSET_MASK != 0 => Ok(e & OFFSET_MASK),
            _ => Err(ti),
        }
    }

    /// The refcount of host cluster `c`, if its block is cached (0 where no block exists).
    fn refcount(&self, st: &State, c: u64) -> Option<u64> {
        match self.refblock_of(st, c) {
            Err(_) => Some(0),
            Ok(b) => st
                .tables
                .get(&b)
                .map(|t| refcount_get(&t.data, self.refcount_bits, c % self.refblock_entries)),
        }
    }

    fn set_refcount(&self, st: &mut State, c: u64, v: u64) -> io::Result<()> {
        let b = self
            .refblock_of(st, c)
            .map_err(|_| eio("qcow2: refcount block missing"))?;
        let i = c % self.refblock_entries;
        let bits = self.refcount_bits;
        let t = st
            .tables
            .get_mut(&b)
            .ok_or_else(|| eio("qcow2: refcount block not cached"))?;
        refcount_set(&mut t.data, bits, i, v);
        Self::touch(st, b);
        Ok(())
    }

    /// The refcount of host cluster at byte `host`, loading its block.
    pub(crate) async fn refcount_of(&self, file: &Node, host: u64) -> io::Result<u64> {
        let c = host / self.cs;
        loop {
            let need = {
                let st = self.state.lock();
                match self.refblock_of(&st, c) {
                    Err(_) => return Ok(0),
                    Ok(b) => match st.tables.get(&b) {
                        Some(t) => {
                            return Ok(refcount_get(
                                &t.data,
                                self.refcount_bits,
                                c % self.refblock_entries,
                            ))
                        }
                        None => b,
                    },
                }
            };
            self.load(file, need, Kind::Refblock).await?;
        }
    }

    /// Allocates `n` contiguous clusters (refcount 1 each) and returns the first's offset.
    /// Single clusters reuse freed ones; runs come from the end of the file.
    pub(crate) async fn alloc(&self, file: &Node, n: u64) -> io::Result<u64> {
        let r = self.alloc_inner(file, n, true).await.map(|(host, _)| host);
        self.grow_ahead(file).await;
        r
    }

    /// Allocates a run of between 1 and `n` contiguous clusters (refcount 1 each) and returns
    /// the first's offset and how many: the lowest run of freed clusters (at most `n`) if any
    /// cluster is free, else `n` clusters at the end of the file. A multi-cluster write calls
    /// it until it has as many clusters as it needs, so it writes its data with as few
    /// requests as the free space allows.
    pub(crate) async fn alloc_run(&self, file: &Node, n: u64) -> io::Result<(u64, u64)> {
        let r = self.alloc_inner(file, n, false).await;
        self.grow_ahead(file).await;
        r
    }

    /// Keeps the file preallocated ahead of the allocation frontier (`end`), a quarter of
    /// the image's size at a time (1 to 64 MiB), so that new clusters' data writes land
    /// inside the file instead of extending it: an extending write is one the kernel cannot
    /// start without blocking, so io_uring hands each to a worker, one at a time per file (a
    /// stream into a growing image had one write at the device). Concurrent allocations do
    /// not wait for it: a write that gets there first extends the file as before, and the
    /// growth (`fallocate`, which keeps written bytes) is safe beside it. What is left past
    /// `end` is cut at close and before a reopen read-only ([`Self::trim_ahead`]); after a
    /// crash it stays, unused (space, not corruption: no refcount or mapping points there).
    async fn grow_ahead(&self, file: &Node) {
        let target = {
            let mut st = self.state.lock();
            if st.prealloc_off || st.end <= st.grown {
                return;
            }
            let step = (st.end / 4)
                .clamp(1 << 20, 64 << 20)
                .next_multiple_of(self.cs);
            st.grown = st.end + step;
            st.grown
        };
        if file.preallocate(target).await.is_err() {
            // No fallocate here (or no space for the step): writes extend the file as before.
            self.state.lock().prealloc_off = true;
        }
    }

    /// Cuts the preallocated tail past the allocation frontier (at close and before a reopen
    /// read-only: nothing is allocated there).
    pub(crate) async fn trim_ahead(&self, file: &Node) -> io::Result<()> {
        let end = {
            let mut st = self.state.lock();
            if st.grown <= st.end {
                return Ok(());
            }
            st.grown = st.end;
            st.end
        };
        file.preallocate(end).await
    }

    async fn alloc_inner(&self, file: &Node, n: u64, exact: bool) -> io::Result<(u64, u64)> {
        debug_assert!(n > 0);
        loop {
            let need = {
                let mut st = self.state.lock();
                self.recycle(&mut st);
                loop {
                    let from_free = (n == 1 || !exact) && !st.free.is_empty();
                    let (start, k) = if from_free {
                        self.free_run(&mut st, n)
                    } else {
                        (st.end, n)
                    };
                    match self.prepare(&mut st, start / self.cs, k)? {
                        Some(b) => break b,
                        // A new refcount block took the spot at the end: try again there.
                        None if !from_free && start != st.end => continue,
                        None => {
                            if from_free {
                                let keep = st.free.len() - k as usize;
                                st.free.truncate(keep);
                            }
                            let c0 = start / self.cs;
                            for c in c0..c0 + k {
                                self.set_refcount(&mut st, c, 1)?;
                            }
                            if !from_free {
                                st.end = start + k * self.cs;
                            }
                            return Ok((start, k));
                        }
                    }
                }
            };
            self.load(file, need, Kind::Refblock).await?;
        }
    }

    /// The lowest free cluster and how many free clusters follow it contiguously (at most
    /// `n`, counting it). The free list is kept sorted from the highest offset down, so the
    /// run is the list's tail (taken by truncating it).
    fn free_run(&self, st: &mut State, n: u64) -> (u64, u64) {
        if !st.free_sorted {
            st.free.sort_unstable_by(|a, b| b.cmp(a));
            st.free.dedup();
            st.free_sorted = true;
        }
        let len = st.free.len();
        let start = st.free[len - 1];
        let mut k = 1u64;
        while k < n && (k as usize) < len && st.free[len - 1 - k as usize] == start + k * self.cs {
            k += 1;
        }
        (start, k)
    }

    /// Makes sure refcount blocks for clusters `c0..c0+n` exist and are cached. Returns the
    /// offset of a block to load first, if one is missing from the cache. Missing blocks are
    /// created at the end of the file (growing the refcount table if needed).
    fn prepare(&self, st: &mut State, c0: u64, n: u64) -> io::Result<Option<u64>> {
        for c in c0..c0 + n {
            match self.refblock_of(st, c) {
                Ok(b) => {
                    if !st.tables.contains_key(&b) {
                        return Ok(Some(b));
                    }
                }
                Err(ti) => self.new_refblock(st, ti)?,
            }
        }
        Ok(None)
    }

    /// Creates the refcount block for table index `ti` at the end of the file.
    fn new_refblock(&self, st: &mut State, ti: usize) -> io::Result<()> {
        if ti >= st.rt.len() {
            self.grow_refcount_table(st, ti + 1)?;
            if self
                .refblock_of(st, ti as u64 * self.refblock_entries)
                .is_ok()
            {
                return Ok(());
            }
        }
        let off = st.end;
        let c = off / self.cs;
        st.end += self.cs;
        st.rt[ti] = off;
        st.rt_dirty = true;
        st.tick += 1;
        let used = st.tick;
        st.tables.insert(
            off,
            Table {
                data: vec![0u8; self.cs as usize].into_boxed_slice(),
                kind: Kind::Refblock,
                dirty: false,
                gen: 0,
                used,
            },
        );
        Self::touch(st, off);
        // The block's own cluster needs a refcount: in itself if it covers itself, else in
        // the block that does (created or loaded as needed by a later `prepare`).
        match self.refblock_of(st, c) {
            Ok(b) if st.tables.contains_key(&b) => self.set_refcount(st, c, 1),
            Ok(_) => Err(eio("qcow2: refcount block for a new block is not cached")),
            Err(ti2) => {
                self.new_refblock(st, ti2)?;
                self.set_refcount(st, c, 1)
            }
        }
    }

    /// Grows the refcount table to at least `entries` entries: a new table at the end of the
    /// file (with refcount blocks for its own clusters), switched to by the next writeback
    /// (table, flush, header, flush), after which the old table is freed.
    fn grow_refcount_table(&self, st: &mut State, entries: usize) -> io::Result<()> {
        let per_cluster = (self.cs / 8) as usize;
        let mut want = (st.rt.len() * 2).max(entries).max(per_cluster);
        want = want.next_multiple_of(per_cluster);
        let clusters = (want / per_cluster) as u64;
        if clusters * self.cs > super::header::MAX_REFTABLE_BYTES {
            return Err(eio("qcow2: the refcount table would exceed its size limit"));
        }
        let off = st.end;
        st.end += clusters * self.cs;
        let old = (st.rt_offset, u64::from(st.rt_clusters));
        st.rt.resize(want, 0);
        st.rt_offset = off;
        st.rt_clusters = clusters as u32;
        st.rt_dirty = true;
        st.header_dirty = true;
        st.rt_retired.push(old);
        // Count the new table's clusters (their blocks may be new too).
        for c in off / self.cs..off / self.cs + clusters {
            match self.refblock_of(st, c) {
                Ok(b) if st.tables.contains_key(&b) => {}
                Ok(_) => return Err(eio("qcow2: refcount block for the new table is not cached")),
                Err(ti) => self.new_refblock(st, ti)?,
            }
            self.set_refcount(st, c, 1)?;
        }
        Ok(())
    }

    /// Drops one reference to the cluster at `host` once the L2 table that no longer maps it
    /// is durable.
    pub(crate) fn unmap_later(&self, st: &mut State, host: u64) {
        st.unmapped.push(host);
    }

    /// Moves clusters whose grace period has passed to the free list.
    fn recycle(&self, st: &mut State) {
        if st.grace.is_empty() {
            return;
        }
        let now = self.try_advance();
        let mut i = 0;
        while i < st.grace.len() {
            if now >= st.grace[i].0 + 2 {
                let (_, c) = st.grace.swap_remove(i);
                // Still free? (It may have been reallocated by a path that appends.)
                if self.refcount(st, c) == Some(0) {
                    st.free.push(c * self.cs);
                    st.free_sorted = false;
                }
            } else {
                i += 1;
            }
        }
    }

    // ---- writeback ----

    /// Takes the right to write metadata back (one writeback, or one L1 resize, at a time).
    async fn begin_writeback(&self) {
        loop {
            {
                let mut st = self.state.lock();
                if !st.flushing {
                    st.flushing = true;
                    return;
                }
            }
            self.wait(WaitKey::Flush, |st| !st.flushing).await;
        }
    }

    /// Gives back what [`Meta::begin_writeback`] took.
    fn end_writeback(&self) {
        let mut st = self.state.lock();
        st.flushing = false;
        wake(&mut st, WaitKey::Flush);
    }

    /// Writes every dirty table back in the crash-safe order (see the module doc).
    pub(crate) async fn writeback(&self, file: &Node) -> io::Result<()> {
        self.begin_writeback().await;
        // Freeing clusters (after their unmapping is durable) dirties refcount blocks again;
        // a few passes leave everything clean.
        let mut r = Ok(());
        for _ in 0..4 {
            r = self.writeback_locked(file).await;
            let again = {
                let st = self.state.lock();
                st.dirty_tables > 0
                    || !st.unmapped.is_empty()
                    || st.rt_dirty
                    || !st.l1_dirty.is_empty()
            };
            if r.is_err() || !again {
                break;
            }
        }
        self.end_writeback();
        r
    }

    async fn writeback_locked(&self, file: &Node) -> io::Result<()> {
        // Unmapped clusters may need their refcount blocks loaded to be freed; load them
        // before the snapshot so the whole writeback needs no more reads.
        let pending: Vec<u64> = self.state.lock().unmapped.clone();
        for host in &pending {
            self.refcount_of(file, *host).await?;
        }
        let snap = {
            let mut st = self.state.lock();
            let mut blocks = Vec::new();
            let mut l2s = Vec::new();
            for (off, t) in st.tables.iter() {
                if t.dirty {
                    let copy = (*off, t.data.clone(), t.gen);
                    match t.kind {
                        Kind::Refblock => blocks.push(copy),
                        Kind::L2 => l2s.push(copy),
                    }
                }
            }
            let l1: Vec<usize> = std::mem::take(&mut st.l1_dirty).into_iter().collect();
            let l1_entries: Vec<(usize, u64)> = l1.iter().map(|&i| (i, st.l1[i])).collect();
            let l1_copy = if l1_entries.is_empty() {
                Vec::new()
            } else {
                st.l1.clone()
            };
            let l1_offset = st.l1_offset;
            let rt = st
                .rt_dirty
                .then(|| (st.rt_offset, st.rt.clone(), st.rt_clusters));
            st.rt_dirty = false;
            let header = std::mem::take(&mut st.header_dirty);
            let retired = std::mem::take(&mut st.rt_retired);
            let unmapped = std::mem::take(&mut st.unmapped);
            let data = self.data_dirty.swap(false, Ordering::AcqRel);
            Snapshot {
                blocks,
                l2s,
                l1_entries,
                l1: l1_copy,
                l1_offset,
                rt,
                header,
                retired,
                unmapped,
                data,
            }
        };
        let r = self.write_snapshot(file, &snap).await;
        let mut st = self.state.lock();
        if let Err(e) = r {
            // Nothing is lost: mark everything dirty again so a later writeback retries.
            for (i, _) in &snap.l1_entries {
                st.l1_dirty.insert(*i);
            }
            if snap.rt.is_some() {
                st.rt_dirty = true;
            }
            st.header_dirty |= snap.header;
            st.rt_retired.extend(snap.retired.iter().copied());
            st.unmapped.extend(snap.unmapped.iter().copied());
            if snap.data {
                self.data_dirty.store(true, Ordering::Release);
            }
            return Err(e);
        }
        for (off, _, gen) in snap.blocks.iter().chain(snap.l2s.iter()) {
            if let Some(t) = st.tables.get_mut(off) {
                if t.dirty && t.gen == *gen {
                    t.dirty = false;
                    st.dirty_tables -= 1;
                }
            }
        }
        // The L2 tables without the unmapped clusters are durable: drop the references.
        let epoch = self.epoch.load(Ordering::SeqCst);
        for host in snap.unmapped.iter().copied() {
            let c = host / self.cs;
            match self.refcount(&st, c) {
                Some(0) | None => {}
                Some(n) => {
                    self.set_refcount(&mut st, c, n - 1)?;
                    if n == 1 {
                        st.grace.push((epoch, c));
                    }
                }
            }
        }
        // The header points at the new refcount table: free the old ones.
        for (off, clusters) in snap.retired.iter().copied() {
            for c in off / self.cs..off / self.cs + clusters {
                st.unmapped.push(c * self.cs);
            }
        }
        self.evict(&mut st, None);
        Ok(())
    }

    async fn write_snapshot(&self, file: &Node, s: &Snapshot) -> io::Result<()> {
        let metadata =
            !s.l2s.is_empty() || !s.l1_entries.is_empty() || !s.blocks.is_empty() || s.rt.is_some();
        if s.data && metadata {
            file.flush().await?;
        }
        if !s.blocks.is_empty() || s.rt.is_some() {
            for (off, data, _) in &s.blocks {
                write_bytes(file, *off, data).await?;
            }
            if let Some((off, rt, clusters)) = &s.rt {
                // A table entry must never be durable before the block it points at (a disk
                // cache may keep the entry and lose the block): the blocks first, a flush,
                // then the table, as QEMU's alloc_refcount_block orders them.
                if !s.blocks.is_empty() {
                    file.flush().await?;
                }
                let mut buf = vec![0u8; (*clusters as u64 * self.cs) as usize];
                for (i, e) in rt.iter().enumerate() {
                    layout::set_be_entry(&mut buf, i, *e);
                }
                write_bytes(file, *off, &buf).await?;
            }
            file.flush().await?;
            if s.header {
                let bytes = {
                    let mut h = self.header.lock();
                    if let Some((off, _, clusters)) = &s.rt {
                        h.refcount_table_offset = *off;
                        h.refcount_table_clusters = *clusters;
                    }
                    h.serialize().map_err(io::Error::from)?
                };
                let mut cluster = vec![0u8; self.cs.min(1 << 16) as usize];
                cluster[..bytes.len()].copy_from_slice(&bytes);
                write_bytes(file, 0, &cluster).await?;
                file.flush().await?;
            }
        }
        if !s.l2s.is_empty() {
            for (off, data, _) in &s.l2s {
                write_bytes(file, *off, data).await?;
            }
            file.flush().await?;
        }
        if !s.l1_entries.is_empty() {
            // Write each dirty entry's 512-byte sector from the L1 copy taken with the other
            // tables: entries set after that instant keep their on-disk value (zero) for now.
            let mut sectors: BTreeSet<usize> = BTreeSet::new();
            for (i, _) in &s.l1_entries {
                sectors.insert(i / 64);
            }
            for sector in sectors {
                let mut buf = [0u8; 512];
                for k in 0..64 {
                    let v = s.l1.get(sector * 64 + k).copied().unwrap_or(0);
                    layout::set_be_entry(&mut buf, k, v);
                }
                write_bytes(file, s.l1_offset + sector as u64 * 512, &buf).await?;
            }
            file.flush().await?;
        }
        Ok(())
    }

    // ---- growing the image ----

    /// Rewrites the header with `change` applied to the copy last written, then flushes.
    /// On failure the copy is restored (the file may hold either header then).
    async fn write_header(&self, file: &Node, change: impl FnOnce(&mut Header)) -> io::Result<()> {
        let (bytes, old) = {
            let mut h = self.header.lock();
            let old = h.clone();
            change(&mut h);
            match h.serialize() {
                Ok(b) => (b, old),
                Err(e) => {
                    *h = old;
                    return Err(e.into());
                }
            }
        };
        let mut cluster = vec![0u8; self.cs.min(1 << 16) as usize];
        cluster[..bytes.len()].copy_from_slice(&bytes);
        let r = async {
            write_bytes(file, 0, &cluster).await?;
            file.flush().await
        }
        .await;
        if r.is_err() {
            *self.header.lock() = old;
        }
        r
    }

    /// Grows the virtual size to `size` bytes (or leaves it, if equal), with an L1 table of
    /// at least `l1_size` entries, as QEMU's `qcow2_co_truncate` does for growth without
    /// preallocation. Returns the size before. Runs as a writeback does (one at a time with writebacks), so
    /// no table is written while the L1 table moves.
    ///
    /// - The L1 table is long enough: only the header's size changes.
    /// - Its clusters hold the new entries: they are zeroed on disk (the rest of a cluster
    ///   may hold anything), flushed, then the header gets the new size and L1 length.
    /// - Otherwise a new table: allocate its clusters, write every dirty table back (so their
    ///   refcounts are durable), write the new table (entries not yet durable as zeroes, as
    ///   on disk; the next writeback writes them there), flush, switch the header to it,
    ///   flush, and only then free the old table's clusters (through the unmapped list: after
    ///   the next writeback and the grace period, as the refcount table's growth does).
    pub(crate) async fn grow(&self, file: &Node, size: u64, l1_size: usize) -> io::Result<u64> {
        self.begin_writeback().await;
        let r = self.grow_locked(file, size, l1_size).await;
        self.end_writeback();
        r
    }

    async fn grow_locked(&self, file: &Node, size: u64, l1_size: usize) -> io::Result<u64> {
        let cs = self.cs;
        let old_size = self.header.lock().size;
        if size < old_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("qcow2: cannot shrink the image from {old_size} to {size} bytes"),
            ));
        }
        let (old_len, old_off, old_clusters) = {
            let st = self.state.lock();
            (st.l1.len(), st.l1_offset, st.l1_clusters)
        };
        if l1_size <= old_len {
            if size > old_size {
                self.write_header(file, |h| h.size = size).await?;
            }
            return Ok(old_size);
        }
        let l1_len = l1_size as u32;
        if l1_size as u64 * 8 <= old_clusters * cs {
            // In place: the new entries are zeroes before the header counts them.
            let zeroes = vec![0u8; (l1_size - old_len) * 8];
            write_bytes(file, old_off + old_len as u64 * 8, &zeroes).await?;
            file.flush().await?;
            self.write_header(file, |h| {
                h.size = size;
                h.l1_size = l1_len;
            })
            .await?;
            self.state.lock().l1.resize(l1_size, 0);
            return Ok(old_size);
        }
        let clusters = (l1_size as u64 * 8).div_ceil(cs);
        let new_off = self.alloc(file, clusters).await?;
        let free_new = |this: &Self| {
            let mut st = this.state.lock();
            for c in 0..clusters {
                this.unmap_later(&mut st, new_off + c * cs);
            }
        };
        // Refcounts (the new table's among them) before the table that relies on them.
        if let Err(e) = self.writeback_locked(file).await {
            free_new(self);
            return Err(e);
        }
        let table = {
            let st = self.state.lock();
            let mut buf = vec![0u8; (clusters * cs) as usize];
            for (i, e) in st.l1.iter().enumerate() {
                if !st.l1_dirty.contains(&i) {
                    layout::set_be_entry(&mut buf, i, *e);
                }
            }
            buf
        };
        let written = async {
            write_bytes(file, new_off, &table).await?;
            file.flush().await
        }
        .await;
        if let Err(e) = written {
            free_new(self);
            return Err(e);
        }
        // If this fails the header may or may not point at the new table: keep both tables
        // (a leak at worst).
        self.write_header(file, |h| {
            h.size = size;
            h.l1_size = l1_len;
            h.l1_table_offset = new_off;
        })
        .await?;
        let mut st = self.state.lock();
        st.l1.resize(l1_size, 0);
        st.l1_offset = new_off;
        st.l1_clusters = clusters;
        if old_len > 0 {
            for c in 0..old_clusters {
                self.unmap_later(&mut st, old_off + c * cs);
            }
        }
        Ok(old_size)
    }

    // ---- L2 tables ----

    /// Gives guest cluster `gc` an L2 table if it has none (a zeroed table in a new cluster,
    /// its L1 entry set). The caller holds the claim on `gc`.
    pub(crate) async fn ensure_l2(&self, file: &Node, gc: u64) -> io::Result<()> {
        let l1i = (gc / self.l2_entries) as usize;
        let existing = {
            let st = self.state.lock();
            if l1i >= st.l1.len() {
                return Err(eio(format!(
                    "qcow2: guest cluster {gc} lies beyond the L1 table"
                )));
            }
            st.l1[l1i] & OFFSET_MASK
        };
        if existing != 0 {
            return self.load(file, existing, Kind::L2).await;
        }
        // Another writer may be creating the same table (a different guest cluster of it):
        // serialise through a claim on the table's first guest cluster, offset past every
        // real guest cluster.
        let key = u64::MAX - l1i as u64;
        self.claim(key).await;
        let r = async {
            if self.state.lock().l1[l1i] & OFFSET_MASK != 0 {
                return Ok(());
            }
            let off = self.alloc(file, 1).await?;
            let mut st = self.state.lock();
            st.tick += 1;
            let used = st.tick;
            st.tables.insert(
                off,
                Table {
                    data: vec![0u8; self.cs as usize].into_boxed_slice(),
                    kind: Kind::L2,
                    dirty: false,
                    gen: 0,
                    used,
                },
            );
            Self::touch(&mut st, off);
            st.l1[l1i] = off | layout::COPIED;
            st.l1_dirty.insert(l1i);
            Ok(())
        }
        .await;
        self.release(key);
        r
    }

    /// Checks that a data cluster does not overlap the image's own fixed metadata.
    pub(crate) fn check_data_cluster(&self, host: u64) -> io::Result<()> {
        self.data_cluster_ok(&self.state.lock(), host)
    }

    fn data_cluster_ok(&self, st: &State, host: u64) -> io::Result<()> {
        let l1_end = st.l1_offset + st.l1_clusters * self.cs;
        let rt_end = st.rt_offset + u64::from(st.rt_clusters) * self.cs;
        let bad = host < self.cs
            || (host >= st.l1_offset && host < l1_end)
            || (host >= st.rt_offset && host < rt_end)
            || st.tables.contains_key(&host);
        if bad {
            return Err(eio(format!(
                "qcow2: an L2 entry points at metadata (host offset {host:#x}); refusing to write there"
            )));
        }
        Ok(())
    }

    /// Counters for tests: (cached tables, dirty tables, free clusters, clusters in grace).
    pub(crate) fn debug_counts(&self) -> (usize, usize, usize, usize) {
        let st = self.state.lock();
        (
            st.tables.len(),
            st.dirty_tables,
            st.free.len(),
            st.grace.len(),
        )
    }
}

struct Snapshot {
    blocks: Vec<(u64, Box<[u8]>, u64)>,
    l2s: Vec<(u64, Box<[u8]>, u64)>,
    l1_entries: Vec<(usize, u64)>,
    l1: Vec<u64>,
    l1_offset: u64,
    rt: Option<(u64, Vec<u64>, u32)>,
    header: bool,
    retired: Vec<(u64, u64)>,
    unmapped: Vec<u64>,
    data: bool,
}
