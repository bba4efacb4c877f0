//! Decoding of table entries: what an L1, L2 or refcount table entry says, and the
//! decompression of compressed clusters.

use std::io;

use super::header::Compression;

/// Bits 9-55: a host offset in an L1, L2 or refcount table entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the refcount of the cluster is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard (v3, not extended) L2 entry: reads as zeroes.
pub const ZERO: u64 = 1;
/// Bits an L1 entry may have.
pub const L1_VALID_BITS: u64 = OFFSET_MASK | COPIED;

/// What a guest cluster is, per its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated in this image: read from the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocation kept for it, if any.
    Zero {
        /// Preallocated host cluster (0: none).
        host: u64,
        /// The preallocation's refcount is one (it can be written in place).
        copied: bool,
    },
    /// Data at `host`; `copied` means its refcount is one (writable in place).
    Normal {
        /// Host cluster offset.
        host: u64,
        /// Refcount exactly one.
        copied: bool,
    },
    /// Compressed data at byte `offset`, `size` bytes long (a bound: decompression stops
    /// when a cluster is produced).
    Compressed {
        /// Host byte offset.
        offset: u64,
        /// Bytes to read.
        size: u64,
    },
    /// Extended L2: per-subcluster status (`alloc` and `zero` bitmaps) over `host`.
    Sub {
        /// Host cluster offset (may be 0 when nothing is allocated).
        host: u64,
        /// Subclusters allocated (bit i).
        alloc: u32,
        /// Subclusters reading as zeroes (bit i).
        zero: u32,
    },
}

/// Decodes an L2 entry. `bitmap` is the second word of an extended entry (None for standard).
pub fn classify(entry: u64, bitmap: Option<u64>, cluster_bits: u32, v3: bool) -> Cluster {
    if entry & COMPRESSED != 0 {
        let shift = 62 - (cluster_bits - 8);
        let offset_mask = (1u64 << shift) - 1;
        let sectors_mask = (1u64 << (cluster_bits - 8)) - 1;
        let offset = entry & offset_mask;
        let nb_sectors = ((entry >> shift) & sectors_mask) + 1;
        let size = nb_sectors * 512 - (offset & 511);
        return Cluster::Compressed { offset, size };
    }
    let host = entry & OFFSET_MASK;
    if let Some(bm) = bitmap {
        return Cluster::Sub {
            host,
            alloc: bm as u32,
            zero: (bm >> 32) as u32,
        };
    }
    if v3 && entry & ZERO != 0 {
        return Cluster::Zero {
            host,
            copied: entry & COPIED != 0,
        };
    }
    if host == 0 {
        return Cluster::Unallocated;
    }
    Cluster::Normal {
        host,
        copied: entry & COPIED != 0,
    }
}

/// Decompresses `input` into exactly `out.len()` bytes, as QEMU's qcow2 does: raw deflate for
/// zlib, a zstd stream for zstd. Input past what produces the cluster is ignored (another
/// compressed cluster may share the last sector).
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("qcow2: {what}"));
    match kind {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let mut produced = 0usize;
            let mut consumed = 0usize;
            while produced < out.len() {
                let before_in = d.total_in();
                let before_out = d.total_out();
                let st = d
                    .decompress(
                        &input[consumed..],
                        &mut out[produced..],
                        flate2::FlushDecompress::Finish,
                    )
                    .map_err(|e| bad(&format!("compressed cluster is corrupt: {e}")))?;
                consumed += (d.total_in() - before_in) as usize;
                produced += (d.total_out() - before_out) as usize;
                let progressed = d.total_in() != before_in || d.total_out() != before_out;
                if st == flate2::Status::StreamEnd || !progressed {
                    break;
                }
            }
            if produced != out.len() {
                return Err(bad("compressed cluster is truncated"));
            }
            Ok(())
        }
        Compression::Zstd => {
            let mut src = input;
            let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
                .map_err(|e| bad(&format!("compressed cluster is corrupt: {e}")))?;
            let mut produced = 0usize;
            while produced < out.len() {
                let n = std::io::Read::read(&mut dec, &mut out[produced..])
                    .map_err(|e| bad(&format!("compressed cluster is corrupt: {e}")))?;
                if n == 0 {
                    break;
                }
                produced += n;
            }
            if produced != out.len() {
                return Err(bad("compressed cluster is truncated"));
            }
            Ok(())
        }
    }
}

/// Reads refcount `index` of a refcount block of `bits`-wide big-endian entries.
pub fn refcount_get(block: &[u8], bits: u32, index: u64) -> u64 {
    match bits {
        64 => u64::from_be_bytes(block[index as usize * 8..][..8].try_into().expect("8")),
        32 => u64::from(u32::from_be_bytes(
            block[index as usize * 4..][..4].try_into().expect("4"),
        )),
        16 => u64::from(u16::from_be_bytes(
            block[index as usize * 2..][..2].try_into().expect("2"),
        )),
        8 => u64::from(block[index as usize]),
        _ => {
            // 1, 2 or 4 bits: bit 0 is the least significant of its byte.
            let per_byte = 8 / bits as u64;
            let byte = block[(index / per_byte) as usize];
            let shift = (index % per_byte) * u64::from(bits);
            u64::from((byte >> shift) & ((1u16 << bits) - 1) as u8)
        }
    }
}

/// Writes refcount `index`. The caller checks `value` fits in `bits`.
pub fn refcount_set(block: &mut [u8], bits: u32, index: u64, value: u64) {
    match bits {
        64 => block[index as usize * 8..][..8].copy_from_slice(&value.to_be_bytes()),
        32 => block[index as usize * 4..][..4].copy_from_slice(&(value as u32).to_be_bytes()),
        16 => block[index as usize * 2..][..2].copy_from_slice(&(value as u16).to_be_bytes()),
        8 => block[index as usize] = value as u8,
        _ => {
            let per_byte = 8 / bits as u64;
            let at = (index / per_byte) as usize;
            let shift = (index % per_byte) * u64::from(bits);
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            block[at] = (block[at] & !mask) | (((value as u8) << shift) & mask);
        }
    }
}

/// The largest refcount a `bits`-wide entry holds.
pub fn refcount_max(bits: u32) -> u64 {
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Reads big-endian u64 `index` of a table.
#[inline]
pub fn be_entry(table: &[u8], index: usize) -> u64 {
    u64::from_be_bytes(table[index * 8..index * 8 + 8].try_into().expect("8"))
}

/// Writes big-endian u64 `index` of a table.
#[inline]
pub fn set_be_entry(table: &mut [u8], index: usize, v: u64) {
    table[index * 8..index * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let bits = 1 << order;
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as u64;
            for i in 0..n {
                refcount_set(&mut block, bits, i, (i * 7 + 3) & refcount_max(bits));
            }
            for i in 0..n {
                assert_eq!(
                    refcount_get(&block, bits, i),
                    (i * 7 + 3) & refcount_max(bits),
                    "bits {bits} index {i}"
                );
            }
        }
    }

    #[test]
    fn entries_classify() {
        assert_eq!(classify(0, None, 16, true), Cluster::Unallocated);
        assert_eq!(
            classify(ZERO, None, 16, true),
            Cluster::Zero {
                host: 0,
                copied: false
            }
        );
        assert_eq!(
            classify(0x10000 | COPIED, None, 16, true),
            Cluster::Normal {
                host: 0x10000,
                copied: true
            }
        );
        assert_eq!(
            classify(0x10000 | ZERO, None, 16, false),
            Cluster::Normal {
                host: 0x10000,
                copied: false
            }
        );
        // Compressed, cluster_bits 16: offset in bits 0..54, sectors in 54..61.
        let e = COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            classify(e, None, 16, true),
            Cluster::Compressed {
                offset: 0x12345,
                size: 4 * 512 - 0x145
            }
        );
    }

    #[test]
    fn deflate_round_trip_and_truncation() {
        use std::io::Write;
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0xAA; 100]); // trailing bytes of a shared sector
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(Compression::Zlib, &c[..c.len() / 3], &mut out).is_err());
        assert!(decompress(Compression::Zlib, &[0xff; 64], &mut out).is_err());
    }
}
