//! Hostile qcow2 images: mutated headers and tables must give errors (or read as something),
//! never a panic, an out-of-bounds access, or an allocation sized by the file.
//!
//! A property test mutates random bytes and fields of a valid image (header, refcount table,
//! refcount block, L1 and L2 tables, compressed-cluster descriptors) and then opens it
//! read-only and read-write, reads it, asks block status and writes. Cases found are kept
//! below as named regression tests.

mod common;

use std::path::Path;
use std::process::Command;

use common::{qemu_tool, Scratch};
use engine::image::{self, ImageOptions};
use engine::{IoBuf, WriteFlags};
use proptest::prelude::*;

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    iothreads::block_on_current(Default::default(), f).expect("io_uring")
}

/// A valid image with data, zero clusters and a compressed cluster, made by QEMU.
fn template() -> Option<Vec<u8>> {
    qemu_tool("qemu-img")?;
    qemu_tool("qemu-io")?;
    static T: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    Some(
        T.get_or_init(|| {
            let img = Scratch::new("tmpl");
            let raw = Scratch::new("tmplraw");
            let data: Vec<u8> = (0..(256usize << 10)).map(|i| (i % 97) as u8).collect();
            std::fs::write(&raw.0, &data).unwrap();
            let o = Command::new("qemu-img")
                .args([
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=4096",
                    raw.path(),
                    img.path(),
                ])
                .output()
                .unwrap();
            assert!(o.status.success());
            let o = Command::new("qemu-img")
                .args(["resize", img.path(), "2M"])
                .output()
                .unwrap();
            assert!(o.status.success());
            for cmd in [
                "write -P 0x11 300k 20k",
                "write -z 600k 64k",
                "write -P 0x22 1M 8k",
            ] {
                let o = Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", cmd, img.path()])
                    .output()
                    .unwrap();
                assert!(o.status.success());
            }
            std::fs::read(&img.0).unwrap()
        })
        .clone(),
    )
}

/// Opens the image both ways and exercises it; any panic fails the test.
fn exercise(path: &Path) {
    let p = path.to_path_buf();
    run(async move {
        for ro in [true, false] {
            let o = ImageOptions {
                read_only: ro,
                backing: false,
                ..Default::default()
            };
            let Ok(node) = image::open(&p, &o).await else {
                continue;
            };
            let len = node.len().min(4 << 20);
            let mut off = 0;
            while off < len {
                let n = (256u64 << 10).min(len - off) as usize;
                let _ = node.read(off, IoBuf::new(n)).await;
                let _ = node.block_status(off, n as u64).await;
                off += n as u64;
            }
            if !ro {
                for (off, n) in [
                    (0u64, 512usize),
                    (5000, 9000),
                    (1 << 20, 4096),
                    (600 << 10, 100),
                ] {
                    if off + n as u64 <= node.len() {
                        let _ = node
                            .write(
                                off,
                                IoBuf::from_slice(&vec![0x5a; n]),
                                WriteFlags::default(),
                            )
                            .await;
                    }
                }
                let _ = node.flush().await;
            }
        }
    });
}

fn mutated(base: &[u8], edits: &[(usize, u8)], fields: &[(usize, u64)]) -> Scratch {
    let mut b = base.to_vec();
    for &(at, v) in edits {
        let at = at % b.len();
        b[at] = v;
    }
    for &(at, v) in fields {
        let at = at % (b.len() - 8);
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    let s = Scratch::new_in("/dev/shm", "hostile");
    std::fs::write(&s.0, &b).unwrap();
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// Random bytes anywhere in the metadata area.
    #[test]
    fn random_byte_edits_never_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..12)) {
        let Some(base) = template() else { return Ok(()) };
        let s = mutated(&base, &edits, &[]);
        exercise(&s.0);
    }

    /// Whole 64-bit fields set to extreme or random values at 8-byte boundaries (table
    /// entries, header offsets and sizes).
    #[test]
    fn extreme_fields_never_panic(
        fields in prop::collection::vec(
            ((0usize..65536).prop_map(|i| i * 8), prop_oneof![
                Just(0u64), Just(u64::MAX), Just(1u64 << 63), Just((1u64 << 62) | 0xffff),
                Just(0x0000_ffff_ffff_fe00), Just(512), any::<u64>()
            ]),
            1..6,
        )
    ) {
        let Some(base) = template() else { return Ok(()) };
        let s = mutated(&base, &[], &fields);
        exercise(&s.0);
    }
}

fn header_field(base: &[u8], at: usize, bytes: &[u8]) -> Scratch {
    let edits: Vec<(usize, u8)> = bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| (at + i, b))
        .collect();
    mutated(base, &edits, &[])
}

fn open_error(s: &Scratch) -> String {
    let p = s.0.clone();
    run(async move {
        match image::open(
            &p,
            &ImageOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .await
        {
            Ok(_) => "opened".to_string(),
            Err(e) => e.full_message(),
        }
    })
}

#[test]
fn named_hostile_headers_are_clear_errors() {
    let Some(base) = template() else { return };
    let cases: Vec<(&str, usize, Vec<u8>, &str)> = vec![
        (
            "an L1 table of 2^30 entries",
            36,
            (1u32 << 30).to_be_bytes().to_vec(),
            "L1 table too large",
        ),
        (
            "a refcount table past the end",
            48,
            (1u64 << 40).to_be_bytes().to_vec(),
            "past the end",
        ),
        (
            "cluster_bits 63",
            20,
            63u32.to_be_bytes().to_vec(),
            "Cluster size must be",
        ),
        (
            "an L1 table past the end",
            40,
            (1u64 << 40).to_be_bytes().to_vec(),
            "past the end",
        ),
        (
            "a refcount order of 7",
            96,
            7u32.to_be_bytes().to_vec(),
            "64 bits",
        ),
        ("encryption", 32, 1u32.to_be_bytes().to_vec(), "encrypted"),
        ("version 4", 4, 4u32.to_be_bytes().to_vec(), "version 4"),
        (
            "a huge virtual size",
            24,
            (u64::MAX >> 1).to_be_bytes().to_vec(),
            "L1 table is too small",
        ),
    ];
    for (what, at, bytes, want) in cases {
        let s = header_field(&base, at, &bytes);
        let msg = open_error(&s);
        assert!(msg.contains(want), "{what}: got {msg:?}");
    }
}

#[test]
fn overlapping_metadata_is_never_written_over() {
    let Some(base) = template() else { return };
    // Point the first L2 entry (guest cluster 0) at the header cluster's neighbour, the
    // refcount table: reading shows its bytes, writing must be refused rather than
    // destroying the table.
    let p = Scratch::new("ovl");
    std::fs::write(&p.0, &base).unwrap();
    let (l1_off, rt_off) = {
        let b = &base;
        (
            u64::from_be_bytes(b[40..48].try_into().unwrap()),
            u64::from_be_bytes(b[48..56].try_into().unwrap()),
        )
    };
    let l1e = u64::from_be_bytes(
        base[l1_off as usize..l1_off as usize + 8]
            .try_into()
            .unwrap(),
    );
    let l2_off = (l1e & 0x00ff_ffff_ffff_fe00) as usize;
    let mut b = base.clone();
    b[l2_off..l2_off + 8].copy_from_slice(&(rt_off | (1 << 63)).to_be_bytes());
    std::fs::write(&p.0, &b).unwrap();
    let path = p.0.clone();
    let r = run(async move {
        let node = image::open(
            &path,
            &ImageOptions {
                backing: false,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let (r, _) = node
            .write(0, IoBuf::from_slice(&[1u8; 512]), WriteFlags::default())
            .await;
        r
    });
    let e = r.unwrap_err();
    assert!(e.to_string().contains("points at metadata"), "{e}");
    let after = std::fs::read(&p.0).unwrap();
    assert_eq!(
        &after[rt_off as usize..rt_off as usize + 4096],
        &b[rt_off as usize..rt_off as usize + 4096]
    );
}
