//! Making new qcow2 images, laid out as QEMU lays them out: the header in cluster 0, then the
//! refcount table, the refcount blocks, the L1 table, and (with preallocation) the L2 tables
//! and data clusters.

use graph::{Error, ErrorKind, Node, WriteFlags};
use iothreads::IoBuf;

use super::header::{Compression, Header, COMPAT_LAZY_REFCOUNTS};
use super::layout::{self, refcount_set, COPIED, ZERO};

/// How much to allocate up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing: clusters are allocated when written.
    #[default]
    Off,
    /// L2 tables and data clusters are allocated (v3: as zero clusters), data not written.
    Metadata,
    /// As metadata, and every data cluster written with zeroes.
    Full,
}

/// Options of a new image (`qemu-img create -o ...`).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size: a power of two from 512 to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Refcount width: a power of two from 1 to 64 (default 16).
    pub refcount_bits: u32,
    /// 2 (compat=0.10) or 3 (compat=1.1, default).
    pub version: u32,
    /// Backing file name as written into the header.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// Preallocation.
    pub preallocation: Preallocation,
    /// Set the lazy-refcounts compatible feature (v3 only).
    pub lazy_refcounts: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
            lazy_refcounts: false,
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

impl CreateOptions {
    /// Checks the options as `qemu-img create` does.
    pub fn validate(&self) -> Result<(), Error> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version == 2 && self.refcount_bits != 16 {
            return Err(invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
        if self.version == 2 && self.lazy_refcounts {
            return Err(invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        if self.version != 2 && self.version != 3 {
            return Err(invalid(format!("Invalid compat version {}", self.version)));
        }
        if self.backing_file.is_none() && self.backing_format.is_some() {
            return Err(invalid(
                "Backing file format may only be given with a backing file",
            ));
        }
        if self.backing_file.as_ref().is_some_and(|b| b.len() > 1023) {
            return Err(invalid("Backing file name too long"));
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off {
            return Err(invalid("Backing file and preallocation can only be used at the same time if extended_l2 is on"));
        }
        if self.size > (1u64 << 62) {
            return Err(invalid("Image size is too large"));
        }
        Ok(())
    }
}

/// The layout of a new image.
struct Layout {
    cs: u64,
    rt_clusters: u64,
    refblocks: u64,
    l1_entries: u64,
    l1_clusters: u64,
    l2_tables: u64,
    data_clusters: u64,
}

impl Layout {
    fn first_rt(&self) -> u64 {
        self.cs
    }
    fn first_refblock(&self) -> u64 {
        self.first_rt() + self.rt_clusters * self.cs
    }
    fn l1(&self) -> u64 {
        self.first_refblock() + self.refblocks * self.cs
    }
    fn first_l2(&self) -> u64 {
        self.l1() + self.l1_clusters * self.cs
    }
    fn first_data(&self) -> u64 {
        self.first_l2() + self.l2_tables * self.cs
    }
    fn total_clusters(&self) -> u64 {
        1 + self.rt_clusters
            + self.refblocks
            + self.l1_clusters
            + self.l2_tables
            + self.data_clusters
    }
}

fn plan(o: &CreateOptions, h: &Header) -> Layout {
    let cs = o.cluster_size;
    let l1_entries = h.l1_entries_for(o.size).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let (l2_tables, data_clusters) = match o.preallocation {
        Preallocation::Off => (0, 0),
        _ => (h.l1_entries_for(o.size), o.size.div_ceil(cs)),
    };
    let per_block = cs * 8 / u64::from(o.refcount_bits);
    let mut l = Layout {
        cs,
        rt_clusters: 1,
        refblocks: 1,
        l1_entries,
        l1_clusters,
        l2_tables,
        data_clusters,
    };
    // Refcount blocks and table must cover every cluster, themselves included.
    loop {
        let blocks = l.total_clusters().div_ceil(per_block);
        let rt = (blocks * 8).div_ceil(cs);
        if blocks == l.refblocks && rt == l.rt_clusters {
            return l;
        }
        l.refblocks = blocks.max(l.refblocks);
        l.rt_clusters = rt.max(l.rt_clusters);
    }
}

/// Writes a new, empty (or preallocated) image onto `file`, which must be empty. Runs on an
/// IoThread.
pub async fn create(file: &Node, o: &CreateOptions) -> Result<(), Error> {
    o.validate()?;
    let cluster_bits = o.cluster_size.trailing_zeros();
    let mut h = Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: o.size,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: 0,
        refcount_table_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: if o.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: 0,
        refcount_order: o.refcount_bits.trailing_zeros(),
        header_length: if o.version == 3 { 112 } else { 72 },
        compression: Compression::Zlib,
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_format.clone(),
        feature_names: Vec::new(),
        has_bitmaps: false,
        unknown: Vec::new(),
    };
    let l = plan(o, &h);
    if l.l1_entries * 8 > super::header::MAX_L1_BYTES {
        return Err(invalid("Image size is too large for this cluster size"));
    }
    let cs = l.cs;
    h.l1_size = l.l1_entries as u32;
    h.l1_table_offset = l.l1();
    h.refcount_table_offset = l.first_rt();
    h.refcount_table_clusters = l.rt_clusters as u32;
    let io = |e: std::io::Error| Error::io("qcow2: cannot write the new image", e);
    let write = |off: u64, data: Vec<u8>| async move {
        let (r, _) = file
            .write(off, IoBuf::from_slice(&data), WriteFlags::default())
            .await;
        r
    };

    // Header cluster.
    let mut cluster0 = vec![0u8; cs as usize];
    let hb = h.serialize()?;
    cluster0[..hb.len()].copy_from_slice(&hb);
    write(0, cluster0).await.map_err(io)?;

    // Refcount table and blocks: every planned cluster has refcount 1.
    let bits = o.refcount_bits;
    let per_block = cs * 8 / u64::from(bits);
    let total = l.total_clusters();
    let mut rt = vec![0u8; (l.rt_clusters * cs) as usize];
    for b in 0..l.refblocks {
        layout::set_be_entry(&mut rt, b as usize, l.first_refblock() + b * cs);
    }
    write(l.first_rt(), rt).await.map_err(io)?;
    for b in 0..l.refblocks {
        let mut block = vec![0u8; cs as usize];
        for c in b * per_block..((b + 1) * per_block).min(total) {
            refcount_set(&mut block, bits, c % per_block, 1);
        }
        write(l.first_refblock() + b * cs, block)
            .await
            .map_err(io)?;
    }

    // L1 table (pointing at preallocated L2 tables, if any).
    let mut l1 = vec![0u8; (l.l1_clusters * cs) as usize];
    for t in 0..l.l2_tables {
        layout::set_be_entry(&mut l1, t as usize, (l.first_l2() + t * cs) | COPIED);
    }
    write(l.l1(), l1).await.map_err(io)?;

    // Preallocated L2 tables and data.
    if l.l2_tables > 0 {
        let per_l2 = h.l2_entries();
        let zero_flag = if o.version == 3 && o.preallocation == Preallocation::Metadata {
            ZERO
        } else {
            0
        };
        for t in 0..l.l2_tables {
            let mut table = vec![0u8; cs as usize];
            for i in 0..per_l2 {
                let gc = t * per_l2 + i;
                if gc >= l.data_clusters {
                    break;
                }
                layout::set_be_entry(
                    &mut table,
                    i as usize,
                    (l.first_data() + gc * cs) | COPIED | zero_flag,
                );
            }
            write(l.first_l2() + t * cs, table).await.map_err(io)?;
        }
        let end = l.first_data() + l.data_clusters * cs;
        if o.preallocation == Preallocation::Full {
            let chunk = (cs * 64).min(8 << 20);
            let mut off = l.first_data();
            while off < end {
                let n = chunk.min(end - off);
                write(off, vec![0u8; n as usize]).await.map_err(io)?;
                off += n;
            }
        } else {
            // Extend the file so every preallocated cluster lies inside it (sparse).
            let (r, _) = file
                .write(end - 512, IoBuf::new(512), WriteFlags::default())
                .await;
            r.map_err(io)?;
        }
    }
    file.flush().await.map_err(io)?;
    Ok(())
}
