//! `--verify=crc32c`: the block format that writes carry and reads are checked against, the
//! payload generator, and the per-job block bitmaps (written blocks, blocks in flight).
//!
//! Every written block starts with a 32-byte header, little-endian:
//!
//! | bytes  | field                                                      |
//! |--------|------------------------------------------------------------|
//! | 0..4   | magic `"SBV1"`                                             |
//! | 4..8   | crc32c of the whole block, computed with this field zeroed |
//! | 8..12  | block length                                               |
//! | 12..16 | reserved (0)                                               |
//! | 16..24 | the block's byte offset in the target                      |
//! | 24..32 | the job's write sequence number                            |
//!
//! and the rest is xorshift payload, generated afresh for every write. The offset in the
//! header is absolute, so a later run over the same region (e.g. `--rw=read --verify=crc32c`)
//! checks what an earlier one wrote.

use std::cell::Cell;

/// Bytes of the header at the start of every block.
pub const HEADER_LEN: usize = 32;

const MAGIC: u32 = u32::from_le_bytes(*b"SBV1");

/// errno reported for a verify failure (fio uses EILSEQ).
pub const EILSEQ: i32 = libc::EILSEQ;

/// A fast pseudo-random generator (xorshift64*), one per worker.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; zero is remapped).
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that neighbouring seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A uniform value in `0..n` (`n` > 0), without a division.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

fn crc_of(block: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&block[..4]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &block[8..])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Fills `block` (one whole block, at least [`HEADER_LEN`] + 8 bytes) for a write at `offset`.
pub fn fill(block: &mut [u8], offset: u64, seq: u64, rng: &mut Rng) {
    let len = block.len();
    block[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    block[4..8].fill(0);
    block[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    block[12..16].fill(0);
    block[16..24].copy_from_slice(&offset.to_le_bytes());
    block[24..32].copy_from_slice(&seq.to_le_bytes());
    let mut chunks = block[HEADER_LEN..].chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let r = rng.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&r[..n]);
    }
    let crc = crc_of(block);
    block[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a block read at `offset`; the error is the one-line message for the report.
pub fn check(block: &[u8], offset: u64) -> Result<(), String> {
    let magic = u32_at(block, 0);
    if magic != MAGIC {
        return Err(format!(
            "verify: bad magic at offset {offset} (expected {MAGIC:#010x}, got {magic:#010x})"
        ));
    }
    let len = u32_at(block, 8);
    if len as usize != block.len() {
        return Err(format!(
            "verify: bad block length at offset {offset} (expected {}, got {len})",
            block.len()
        ));
    }
    let at = u64_at(block, 16);
    if at != offset {
        return Err(format!(
            "verify: bad offset at offset {offset} (the header says {at}: a misplaced write)"
        ));
    }
    let stored = u32_at(block, 4);
    let computed = crc_of(block);
    if stored != computed {
        return Err(format!(
            "verify: bad crc32c at offset {offset} (expected {stored:#010x}, got {computed:#010x})"
        ));
    }
    Ok(())
}

/// A fixed-size bitmap over a job's blocks; the job's tasks share it on one thread.
#[derive(Debug)]
pub struct Bitmap {
    words: Box<[Cell<u64>]>,
}

impl Bitmap {
    /// `n` bits, all clear.
    pub fn new(n: u64) -> Bitmap {
        let words = n.div_ceil(64) as usize;
        Bitmap {
            words: (0..words).map(|_| Cell::new(0)).collect(),
        }
    }

    /// `n` bits, all set.
    pub fn full(n: u64) -> Bitmap {
        let b = Bitmap::new(n);
        for i in 0..n / 64 {
            b.words[i as usize].set(u64::MAX);
        }
        if !n.is_multiple_of(64) {
            b.words[(n / 64) as usize].set((1u64 << (n % 64)) - 1);
        }
        b
    }

    /// Whether bit `i` is set.
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].get() & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`.
    #[inline]
    pub fn set(&self, i: u64) {
        let w = &self.words[(i / 64) as usize];
        w.set(w.get() | 1 << (i % 64));
    }

    /// Clears bit `i`.
    #[inline]
    pub fn clear(&self, i: u64) {
        let w = &self.words[(i / 64) as usize];
        w.set(w.get() & !(1 << (i % 64)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_blocks_check_and_corruption_is_named() {
        let mut rng = Rng::new(1);
        for len in [64usize, 100, 4096] {
            let mut b = vec![0u8; len];
            fill(&mut b, 8192, 7, &mut rng);
            check(&b, 8192).unwrap();
            let e = check(&b, 4096).unwrap_err();
            assert!(e.contains("bad offset at offset 4096"), "{e}");
            b[len - 1] ^= 1;
            let e = check(&b, 8192).unwrap_err();
            assert!(
                e.starts_with("verify: bad crc32c at offset 8192 (expected 0x"),
                "{e}"
            );
        }
        let e = check(&[0u8; 64], 0).unwrap_err();
        assert!(e.contains("bad magic"), "{e}");
    }

    #[test]
    fn bitmaps() {
        let b = Bitmap::new(130);
        assert!(!b.get(129));
        b.set(129);
        assert!(b.get(129));
        b.clear(129);
        assert!(!b.get(129));
        let f = Bitmap::full(130);
        assert!((0..130).all(|i| f.get(i)));
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng::new(0);
        assert!((0..10_000).all(|_| r.below(7) < 7));
    }
}
