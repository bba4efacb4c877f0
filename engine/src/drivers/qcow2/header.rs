//! The qcow2 header and its extensions (QEMU's docs/interop/qcow2.txt), parsed defensively.
//!
//! Every field that sizes a later read or allocation is checked against the spec's limits
//! and the file's length before use, so a hostile header yields an error, never a panic or
//! an allocation sized by the file. Unknown header extensions are kept and written back
//! unchanged, as QEMU does.

use graph::{Error, ErrorKind};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this driver understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is consistent raw data.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// QEMU's limits.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Compression algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (QEMU's default).
    Zlib,
    /// zstd.
    Zstd,
}

/// An extension this driver does not interpret, kept to be written back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    /// Its type.
    pub kind: u32,
    /// Its data (unpadded).
    pub data: Vec<u8>,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in the file (0: none).
    pub backing_file_offset: u64,
    /// Its length.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0: none; other methods are refused.
    pub crypt_method: u32,
    /// Entries of the L1 table.
    pub l1_size: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header structure proper (72 for v2).
    pub header_length: u32,
    /// Compression type.
    pub compression: Compression,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format (extension).
    pub backing_format: Option<String>,
    /// Names of feature bits, from the feature name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Whether a bitmaps extension is present.
    pub has_bitmaps: bool,
    /// Extensions kept as they are.
    pub unknown: Vec<RawExtension>,
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::CorruptImage, what.into())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries carry subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// L1 entries needed for `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l2 = self.l2_entries() * self.cluster_size();
        size.div_ceil(per_l2)
    }

    /// Names an incompatible feature bit (from the image's table, else the spec).
    pub fn feature_name(&self, kind: u8, bit: u8) -> String {
        if let Some((_, _, n)) = self
            .feature_names
            .iter()
            .find(|(t, b, _)| *t == kind && *b == bit)
        {
            return n.clone();
        }
        let known = match (kind, bit) {
            (0, 0) => "dirty bit",
            (0, 1) => "corrupt bit",
            (0, 2) => "external data file",
            (0, 3) => "compression type",
            (0, 4) => "extended L2 entries",
            _ => return format!("unknown feature {bit}"),
        };
        known.to_string()
    }

    /// Parses the header from the first cluster (or at least the first `len` bytes) of a file
    /// of `file_len` bytes.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, Error> {
        if buf.len() < 72 {
            return Err(corrupt("Image is not in qcow2 format (too short)"));
        }
        if be32(buf, 0) != MAGIC {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Image is not in qcow2 format",
            ));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("Unsupported qcow2 version {version}"),
            ));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "Cluster size must be a power of two between 512 and 2048k (cluster_bits {cluster_bits})"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            has_bitmaps: false,
            unknown: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt("qcow2 header too short"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104
                || u64::from(h.header_length) > cluster_size.min(buf.len() as u64)
            {
                return Err(corrupt(format!(
                    "qcow2 header length {} is invalid",
                    h.header_length
                )));
            }
            if h.refcount_order > 6 {
                return Err(corrupt(format!(
                    "Reference count entry width too large; may not exceed 64 bits (order {})",
                    h.refcount_order
                )));
            }
            if h.header_length > 104 {
                h.compression = match buf[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => return Err(corrupt(format!("Unknown compression type {t}"))),
                };
            } else if h.incompatible & INCOMPAT_COMPRESSION != 0 {
                return Err(corrupt(
                    "compression type bit set but the header has no compression type",
                ));
            }
            if h.incompatible & INCOMPAT_COMPRESSION == 0 && h.compression != Compression::Zlib {
                return Err(corrupt(
                    "compression type set without its incompatible feature bit",
                ));
            }
        }
        // Tables must be cluster aligned and, where they matter for reading, inside the file.
        let aligned = |off: u64| off.is_multiple_of(cluster_size);
        if !aligned(h.l1_table_offset) || !aligned(h.refcount_table_offset) {
            return Err(corrupt("qcow2 table offsets are not cluster aligned"));
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "Active L1 table too large ({} entries)",
                h.l1_size
            )));
        }
        if h.l1_size > 0
            && h.l1_table_offset
                .checked_add(l1_bytes)
                .is_none_or(|e| e > file_len)
        {
            return Err(corrupt(
                "Active L1 table offset invalid: it lies past the end of the file",
            ));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt("Reference count table too large"));
        }
        if h.refcount_table_clusters == 0 {
            return Err(corrupt("Image does not contain a reference count table"));
        }
        if h.refcount_table_offset
            .checked_add(rt_bytes)
            .is_none_or(|e| e > file_len)
        {
            return Err(corrupt(
                "Reference count table offset invalid: it lies past the end of the file",
            ));
        }
        // The L1 table must cover the virtual size.
        if h.l1_entries_for(h.size) > u64::from(h.l1_size) {
            return Err(corrupt(format!(
                "L1 table is too small for a {}-byte image ({} entries)",
                h.size, h.l1_size
            )));
        }
        if h.size > (1u64 << 62) {
            return Err(corrupt(format!("Image size {} is too large", h.size)));
        }
        // Backing file name: inside the first cluster.
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt("Backing file name too long"));
            }
            let start = h.backing_file_offset;
            let end = start + u64::from(h.backing_file_size);
            if end > cluster_size || end > buf.len() as u64 {
                return Err(corrupt("Backing file name lies outside the header cluster"));
            }
            let name = &buf[start as usize..end as usize];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        h.parse_extensions(buf, cluster_size)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], cluster_size: u64) -> Result<(), Error> {
        let limit = (cluster_size as usize).min(buf.len());
        let limit = if self.backing_file_offset != 0 {
            limit.min(self.backing_file_offset as usize)
        } else {
            limit
        };
        let mut at = if self.version == 3 {
            self.header_length as usize
        } else {
            72
        };
        loop {
            if at + 8 > limit {
                // QEMU accepts a header without an end marker when the cluster runs out.
                return Ok(());
            }
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                return Ok(());
            }
            if at + len > limit {
                return Err(corrupt(format!(
                    "qcow2 header extension {kind:#x} is truncated"
                )));
            }
            let data = &buf[at..at + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_end = e[2..].iter().position(|&c| c == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&e[2..2 + name_end]).into_owned();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                EXT_BITMAPS => self.has_bitmaps = true,
                _ => {}
            }
            if !matches!(kind, EXT_BACKING_FORMAT | EXT_FEATURE_TABLE) {
                self.unknown.push(RawExtension {
                    kind,
                    data: data.to_vec(),
                });
            }
            at += len.next_multiple_of(8);
        }
    }

    /// The incompatible features set that this driver does not know, by name.
    pub fn unknown_incompatible(&self) -> Vec<String> {
        (0..64u8)
            .filter(|b| self.incompatible & !INCOMPAT_KNOWN & (1 << b) != 0)
            .map(|b| self.feature_name(0, b))
            .collect()
    }

    /// Serialises the header and its extensions into one cluster-sized buffer. The feature
    /// name table written is strata's own (the bits it knows), as QEMU writes its own.
    pub fn serialize(&self) -> Result<Vec<u8>, Error> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let put32 =
            |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut at = 72;
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, 112);
            b[104] = match self.compression {
                Compression::Zlib => 0,
                Compression::Zstd => 1,
            };
            at = 112;
        }
        let ext = |b: &mut Vec<u8>, at: &mut usize, kind: u32, data: &[u8]| -> Result<(), Error> {
            let need = 8 + data.len().next_multiple_of(8);
            if *at + need + 8 > cs {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "qcow2 header extensions do not fit in one cluster",
                ));
            }
            put32(b, *at, kind);
            put32(b, *at + 4, data.len() as u32);
            b[*at + 8..*at + 8 + data.len()].copy_from_slice(data);
            *at += need;
            Ok(())
        };
        if let Some(f) = &self.backing_format {
            ext(&mut b, &mut at, EXT_BACKING_FORMAT, f.as_bytes())?;
        }
        if self.version == 3 {
            let names: [(u8, u8, &str); 7] = [
                (0, 0, "dirty bit"),
                (0, 1, "corrupt bit"),
                (0, 2, "external data file"),
                (0, 3, "compression type"),
                (0, 4, "extended L2 entries"),
                (1, 0, "lazy refcounts"),
                (2, 0, "bitmaps"),
            ];
            let mut table = Vec::with_capacity(names.len() * 48);
            for (t, bit, n) in names {
                let mut e = [0u8; 48];
                e[0] = t;
                e[1] = bit;
                e[2..2 + n.len()].copy_from_slice(n.as_bytes());
                table.extend_from_slice(&e);
            }
            ext(&mut b, &mut at, EXT_FEATURE_TABLE, &table)?;
        }
        for u in &self.unknown {
            ext(&mut b, &mut at, u.kind, &u.data)?;
        }
        // End marker (zeroes already there), then the backing file name.
        at += 8;
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize || at + name.len() > cs {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "Backing file name too long",
                ));
            }
            b[at..at + name.len()].copy_from_slice(name.as_bytes());
            put64(&mut b, 8, at as u64);
            put32(&mut b, 16, name.len() as u32);
            at += name.len();
        }
        b.truncate(at.next_multiple_of(8).min(cs));
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 112,
            compression: Compression::Zlib,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            feature_names: Vec::new(),
            has_bitmaps: false,
            unknown: vec![RawExtension {
                kind: 0x1234_5678,
                data: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn serialize_then_parse_round_trips() {
        let h = sample();
        let mut b = h.serialize().unwrap();
        b.resize(1 << 16, 0);
        let p = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(p.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(p.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(p.unknown, h.unknown);
        assert_eq!(p.size, h.size);
        assert_eq!(p.feature_name(0, 4), "extended L2 entries");
    }

    #[test]
    fn hostile_fields_are_errors() {
        let good = {
            let mut b = sample().serialize().unwrap();
            b.resize(1 << 16, 0);
            b
        };
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (20, 63u32.to_be_bytes().to_vec(), "cluster_bits 63"),
            (20, 8u32.to_be_bytes().to_vec(), "cluster_bits 8"),
            (36, (1u32 << 30).to_be_bytes().to_vec(), "huge L1"),
            (
                40,
                (u64::MAX - 65535).to_be_bytes().to_vec(),
                "L1 past the end",
            ),
            (
                48,
                (1u64 << 40).to_be_bytes().to_vec(),
                "refcount table past the end",
            ),
            (56, 0u32.to_be_bytes().to_vec(), "no refcount table"),
            (96, 7u32.to_be_bytes().to_vec(), "refcount order 7"),
            (100, 50u32.to_be_bytes().to_vec(), "short header length"),
            (24, (1u64 << 63).to_be_bytes().to_vec(), "size beyond L1"),
            (4, 4u32.to_be_bytes().to_vec(), "version 4"),
        ];
        for (at, bytes, what) in cases {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            assert!(Header::parse(&b, 1 << 20).is_err(), "{what} accepted");
        }
        assert!(Header::parse(&good[..50], 1 << 20).is_err());
    }
}
