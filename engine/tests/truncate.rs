//! Growing nodes (`Node::truncate`), as a commit job grows a base image smaller than its top:
//! qcow2 images of several cluster sizes and versions, with the L1 table grown in place, moved
//! to new clusters, or left as it is, checked by `qemu-img check`, `qemu-img info` and
//! `qemu-io`; writes in flight while the L1 table moves; a backing file longer than the old
//! size, which must not show through; raw and file nodes; and the refusals (shrinking,
//! read-only nodes, fixed-size raw, unaligned qcow2 sizes).

mod common;

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{assert_check_clean, have_qemu, pattern_at, qemu_img_create_with_opts, run_tool};
use common::{qemu_tool, uniq, Scratch};
use engine::drivers::file::{self, FileOptions};
use engine::drivers::raw::{self, RawOptions};
use engine::image::{self, ImageOptions};
use engine::{Backend, IoBuf, IoThread, Node, WriteFlags};

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    iothreads::block_on_current(Default::default(), f).expect("io_uring")
}

/// `qemu-img create -f qcow2` with a cluster size and compat level.
fn qemu_create(path: &str, cluster: u64, compat: &str, size: u64, backing: Option<&str>) {
    let o = format!("cluster_size={cluster},compat={compat}");
    let backing = backing.map(|b| (b, "qcow2"));
    qemu_img_create_with_opts("qcow2", Some(&o), path, backing, Some(size));
}

/// Runs qemu-io commands on a qcow2 image (read-only unless `write`), failing on any
/// pattern mismatch or error.
fn qemu_io(path: &str, write: bool, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    if !write {
        c.arg("-r");
    }
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(path).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} {path}:\n{text}"
    );
}

/// The virtual size `qemu-img info` reports (the image's own: the last one, after the
/// children's).
fn qemu_virtual_size(path: &str) -> u64 {
    let out = run_tool(&["qemu-img", "info", "--output=json", path]);
    let key = "\"virtual-size\": ";
    let i = out.rfind(key).expect("virtual-size") + key.len();
    let digits: String = out[i..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap()
}

/// The header's (l1_size, l1_table_offset).
fn l1_fields(path: &str) -> (u32, u64) {
    let b = std::fs::read(path).unwrap();
    (
        u32::from_be_bytes(b[36..40].try_into().unwrap()),
        u64::from_be_bytes(b[40..48].try_into().unwrap()),
    )
}

async fn write(node: &Node, off: u64, fill: u8, len: usize) {
    let (r, _) = node
        .write(
            off,
            IoBuf::from_slice(&vec![fill; len]),
            WriteFlags::default(),
        )
        .await;
    r.unwrap_or_else(|e| panic!("write of {len} bytes at {off}: {e}"));
}

async fn assert_reads(node: &Node, off: u64, fill: u8, len: usize) {
    let (r, b) = node.read(off, IoBuf::new(len)).await;
    r.unwrap();
    assert!(
        b.iter().all(|&x| x == fill),
        "strata reads other than {fill:#x} at {off}+{len}"
    );
}

/// What the L1 table should do on growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L1 {
    /// Long enough already: only the header's size changes.
    Unchanged,
    /// Grows inside the clusters it has.
    InPlace,
    /// Moves to new clusters.
    Moved,
}

struct Case {
    cluster: u64,
    compat: &'static str,
    old: u64,
    new: u64,
    l1: L1,
}

const K: u64 = 1024;
const M: u64 = 1 << 20;
const G: u64 = 1 << 30;

/// Grows one qcow2 image and checks it with strata and QEMU: data QEMU wrote before, data
/// strata wrote (not yet written back) just before the growth, data written after it in the
/// old range, just past the old end and near the new end; zeroes in the new range.
fn grow_case(dir: &str, c: &Case, direct: bool) {
    let img = Scratch::new_in(dir, "grow");
    qemu_create(img.path(), c.cluster, c.compat, c.old, None);
    let (l1_before, l1_off_before) = l1_fields(img.path());
    let (old, new) = (c.old, c.new);
    qemu_io(
        img.path(),
        true,
        &[
            "write -P 0x11 0 4096".into(),
            format!("write -P 0x12 {} 4096", old - 4096),
        ],
    );
    let p = img.0.clone();
    let opened = run(async move {
        let o = ImageOptions {
            direct,
            ..Default::default()
        };
        let node = match image::open(&p, &o).await {
            Ok(n) => n,
            Err(e) if direct && e.kind() == engine::ErrorKind::Unsupported => {
                eprintln!("skipping: no O_DIRECT in {}: {e}", p.display());
                return false;
            }
            Err(e) => panic!("{e:?}"),
        };
        // Mapped in a cached table, its L1 entry perhaps not yet on disk, as the table grows.
        write(&node, old / 2, 0x21, 4096).await;
        node.truncate(new).await.unwrap();
        assert_eq!(node.len(), new);
        write(&node, new - 4096, 0x31, 4096).await;
        write(&node, old, 0x32, 4096).await;
        write(&node, 4096, 0x22, 4096).await;
        node.flush().await.unwrap();
        assert_reads(&node, 0, 0x11, 4096).await;
        assert_reads(&node, 4096, 0x22, 4096).await;
        assert_reads(&node, old / 2, 0x21, 4096).await;
        assert_reads(&node, old - 4096, 0x12, 4096).await;
        assert_reads(&node, old, 0x32, 4096).await;
        assert_reads(&node, old + 4096, 0, 4096).await;
        assert_reads(&node, new - 8192, 0, 4096).await;
        assert_reads(&node, new - 4096, 0x31, 4096).await;
        true
    });
    if !opened {
        return;
    }
    assert_check_clean(img.path());
    assert_eq!(qemu_virtual_size(img.path()), new, "{}", img.path());
    let (l1_after, l1_off_after) = l1_fields(img.path());
    match c.l1 {
        L1::Unchanged => assert_eq!((l1_after, l1_off_after), (l1_before, l1_off_before)),
        L1::InPlace => {
            assert!(l1_after > l1_before);
            assert_eq!(l1_off_after, l1_off_before, "the L1 table stays");
        }
        L1::Moved => {
            assert!(l1_after > l1_before);
            assert_ne!(l1_off_after, l1_off_before, "the L1 table moves");
        }
    }
    qemu_io(
        img.path(),
        false,
        &[
            "read -P 0x11 0 4096".into(),
            "read -P 0x22 4096 4096".into(),
            format!("read -P 0x21 {} 4096", old / 2),
            format!("read -P 0x12 {} 4096", old - 4096),
            format!("read -P 0x32 {old} 4096"),
            format!("read -P 0 {} 4096", old + 4096),
            format!("read -P 0 {} 4096", new - 8192),
            format!("read -P 0x31 {} 4096", new - 4096),
        ],
    );
    // strata reopens the grown image at its new size.
    let p = img.0.clone();
    run(async move {
        let o = ImageOptions {
            read_only: true,
            direct,
            ..Default::default()
        };
        let node = image::open(&p, &o).await.unwrap();
        assert_eq!(node.len(), new);
        assert_reads(&node, new - 4096, 0x31, 4096).await;
    });
}

#[test]
fn qcow2_grows_with_the_l1_table_unchanged_in_place_or_moved() {
    if !have_qemu() {
        return;
    }
    let dir = std::env::temp_dir();
    let cases = [
        // 64 KiB clusters: one L1 cluster (8192 entries) covers 4 TiB, so 100 GiB grows the
        // table in place, 5 TiB moves it; 300 MiB needs no more L1 entries.
        Case {
            cluster: 64 * K,
            compat: "1.1",
            old: M,
            new: 100 * G,
            l1: L1::InPlace,
        },
        Case {
            cluster: 64 * K,
            compat: "1.1",
            old: M,
            new: 5 << 40,
            l1: L1::Moved,
        },
        Case {
            cluster: 64 * K,
            compat: "1.1",
            old: M,
            new: 300 * M,
            l1: L1::Unchanged,
        },
        // 512-byte clusters: an L1 cluster covers only 2 MiB.
        Case {
            cluster: 512,
            compat: "1.1",
            old: M,
            new: 64 * M,
            l1: L1::Moved,
        },
        Case {
            cluster: 512,
            compat: "0.10",
            old: 3 * M,
            new: 5 * M + 512,
            l1: L1::Moved,
        },
        // 4 KiB clusters: one L1 cluster (512 entries) covers exactly 1 GiB.
        Case {
            cluster: 4 * K,
            compat: "1.1",
            old: 16 * M,
            new: G,
            l1: L1::InPlace,
        },
        Case {
            cluster: 4 * K,
            compat: "0.10",
            old: 16 * M,
            new: 10 * G,
            l1: L1::Moved,
        },
        // An old size that is not a whole number of clusters, version 2.
        Case {
            cluster: 64 * K,
            compat: "0.10",
            old: 1000 * 512,
            new: 500 * M,
            l1: L1::Unchanged,
        },
        Case {
            cluster: 64 * K,
            compat: "1.1",
            old: 1000 * 512,
            new: 600 * M,
            l1: L1::InPlace,
        },
    ];
    for c in &cases {
        eprintln!(
            "cluster {} compat {} {} -> {} ({:?})",
            c.cluster, c.compat, c.old, c.new, c.l1
        );
        grow_case(dir.to_str().unwrap(), c, false);
    }
}

#[test]
fn qcow2_grows_with_direct_io_on_a_disk_folder() {
    if !have_qemu() {
        return;
    }
    // The L1 zeroes and header writes are smaller than a block: padded under O_DIRECT.
    for c in [
        Case {
            cluster: 512,
            compat: "1.1",
            old: M,
            new: 64 * M,
            l1: L1::Moved,
        },
        Case {
            cluster: 4 * K,
            compat: "1.1",
            old: 16 * M,
            new: G,
            l1: L1::InPlace,
        },
    ] {
        grow_case("/var/tmp", &c, true);
    }
}

#[test]
fn growing_in_place_clears_whatever_the_l1_cluster_held_past_its_entries() {
    if !have_qemu() {
        return;
    }
    // Nothing promises that the rest of the L1 table's last cluster is zero (QEMU writes
    // only the entries when it moves a table into a reused cluster): fill it with entries
    // that point at the header cluster. Counted as L1 entries, they would be errors.
    let img = Scratch::new("stale");
    qemu_create(img.path(), 4 * K, "1.1", 16 * M, None);
    let (l1_size, l1_off) = l1_fields(img.path());
    assert_eq!(l1_size, 8);
    let mut b = std::fs::read(&img.0).unwrap();
    b.resize(b.len().max(l1_off as usize + 4096), 0);
    for i in l1_size as usize..512 {
        let at = l1_off as usize + i * 8;
        b[at..at + 8].copy_from_slice(&(1u64 << 63).to_be_bytes());
    }
    std::fs::write(&img.0, b).unwrap();
    assert_check_clean(img.path());
    let p = img.0.clone();
    run(async move {
        let node = image::open(&p, &ImageOptions::default()).await.unwrap();
        node.truncate(G).await.unwrap();
        assert_reads(&node, 512 * M, 0, 4096).await;
        write(&node, G - 4096, 0x5a, 4096).await;
        node.flush().await.unwrap();
    });
    assert_check_clean(img.path());
    assert_eq!(l1_fields(img.path()), (512, l1_off), "grown in place");
    qemu_io(
        img.path(),
        false,
        &[
            format!("read -P 0 {} 4096", 512 * M),
            format!("read -P 0x5a {} 4096", G - 4096),
        ],
    );
}

#[test]
fn writes_in_flight_while_the_l1_table_moves_stay_mapped() {
    if !have_qemu() {
        return;
    }
    // 512-byte clusters: every 32 KiB of guest data needs its own L2 table, so the writers
    // keep adding L1 entries while the table is copied and switched.
    let img = Scratch::new("inflight");
    let (old, new) = (8 * M, 64 * M);
    qemu_create(img.path(), 512, "1.1", old, None);
    let (_, l1_off_before) = l1_fields(img.path());
    let p = img.0.clone();
    let expect = run(async move {
        let node = image::open(&p, &ImageOptions::default()).await.unwrap();
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let n = Arc::clone(&node);
            tasks.push(iothreads::spawn_local(async move {
                let mut done = Vec::new();
                for i in 0..32u64 {
                    // Task w writes every 8th 32 KiB stripe, 4 KiB into it.
                    let off = (i * 8 + w) * 32 * K + 4 * K;
                    let fill = (w * 32 + i) as u8 | 1;
                    write(&n, off, fill, 4096).await;
                    done.push((off, fill));
                }
                done
            }));
        }
        node.truncate(new).await.unwrap();
        let mut expect = vec![0u8; new as usize];
        for t in tasks {
            for (off, fill) in t.await.unwrap() {
                expect[off as usize..off as usize + 4096].fill(fill);
            }
        }
        for (i, off) in [old, old + 40 * K, 30 * M, new - 4096].iter().enumerate() {
            let fill = 0xa0 + i as u8;
            write(&node, *off, fill, 4096).await;
            expect[*off as usize..*off as usize + 4096].fill(fill);
        }
        node.flush().await.unwrap();
        expect
    });
    assert_check_clean(img.path());
    assert_ne!(l1_fields(img.path()).1, l1_off_before, "the L1 table moved");
    assert_eq!(qemu_virtual_size(img.path()), new);
    assert!(
        common::qemu_content(img.path()) == expect,
        "QEMU reads other data"
    );
}

#[test]
fn a_longer_backing_file_does_not_show_through_the_grown_range() {
    if !have_qemu() {
        return;
    }
    for compat in ["1.1", "0.10"] {
        let base = Scratch::new("lbase");
        qemu_create(base.path(), 64 * K, compat, 4 * M, None);
        qemu_io(base.path(), true, &["write -P 0x77 0 4M".into()]);
        let top = Scratch::new("ltop");
        // An old size that ends inside a cluster: its tail is zeroed by an explicit write.
        let old = M + 3 * 512;
        qemu_create(top.path(), 64 * K, compat, old, Some(base.path()));
        qemu_io(top.path(), true, &["write -P 0x55 0 64k".into()]);
        let new = 8 * M;
        let p = top.0.clone();
        run(async move {
            let node = image::open(&p, &ImageOptions::default()).await.unwrap();
            assert_eq!(node.backing().unwrap().len(), 4 * M);
            node.truncate(new).await.unwrap();
            assert_eq!(node.len(), new);
            assert_reads(&node, 0, 0x55, 64 * K as usize).await;
            assert_reads(&node, 64 * K, 0x77, (old - 64 * K) as usize).await;
            assert_reads(&node, old, 0, (new - old) as usize).await;
            node.flush().await.unwrap();
        });
        assert_check_clean(top.path());
        assert_eq!(qemu_virtual_size(top.path()), new);
        qemu_io(
            top.path(),
            false,
            &[
                "read -P 0x55 0 64k".into(),
                format!("read -P 0x77 {} {}", 64 * K, old - 64 * K),
                format!("read -P 0 {old} {}", new - old),
            ],
        );
    }
}

#[test]
fn file_and_raw_nodes_grow_and_the_front_end_sees_it() {
    let f = Scratch::new("file").with_pattern(10_000);
    let t = IoThread::new().unwrap();
    let node = file::open(&uniq("tf"), &FileOptions::new(&f.0)).unwrap();
    let b = Backend::new(Arc::clone(&node), &[t.handle()]).unwrap();
    let (r, _) = b.write_blocking(M - 512, IoBuf::from_slice(&[9u8; 512]));
    assert!(r.is_err(), "past the end before growing");
    let n = Arc::clone(&node);
    t.block_on(move || async move { n.truncate(M).await })
        .unwrap()
        .unwrap();
    assert_eq!(node.len(), M);
    assert_eq!(b.len(), M);
    assert_eq!(std::fs::metadata(&f.0).unwrap().len(), M);
    let (r, _) = b.write_blocking(M - 512, IoBuf::from_slice(&[9u8; 512]));
    r.unwrap();
    let (r, got) = b.read_blocking(0, IoBuf::new(M as usize));
    r.unwrap();
    assert!(
        (0..10_000).all(|i| got[i] == pattern_at(i)),
        "old data kept"
    );
    assert!(got[10_000..(M - 512) as usize].iter().all(|&x| x == 0));
    assert!(got[(M - 512) as usize..].iter().all(|&x| x == 9));
    drop(b);

    // raw over a file: the file grows to the raw length; with an offset, to offset + length.
    let f2 = Scratch::new("raw").with_pattern(8192);
    let file2 = file::open(&uniq("tf"), &FileOptions::new(&f2.0)).unwrap();
    let rawn = raw::open(None, &file2, RawOptions::default(), false).unwrap();
    let f3 = Scratch::new("rawoff").with_pattern(8192);
    let file3 = file::open(&uniq("tf"), &FileOptions::new(&f3.0)).unwrap();
    let opts = RawOptions {
        offset: 4096,
        size: None,
    };
    let rawoff = raw::open(None, &file3, opts, false).unwrap();
    let (r1, r2) = (Arc::clone(&rawn), Arc::clone(&rawoff));
    t.block_on(move || async move {
        r1.truncate(2 * M).await.unwrap();
        r2.truncate(M).await.unwrap();
        write(&r1, 2 * M - 4096, 0x44, 4096).await;
        write(&r2, M - 4096, 0x45, 4096).await;
        r1.flush().await.unwrap();
        r2.flush().await.unwrap();
    })
    .unwrap();
    assert_eq!(rawn.len(), 2 * M);
    assert_eq!(file2.len(), 2 * M);
    assert_eq!(rawoff.len(), M);
    assert_eq!(file3.len(), M + 4096);
    let d2 = std::fs::read(&f2.0).unwrap();
    assert_eq!(d2.len() as u64, 2 * M);
    assert!((0..8192).all(|i| d2[i] == pattern_at(i)));
    assert!(d2[8192..(2 * M - 4096) as usize].iter().all(|&x| x == 0));
    assert!(d2[(2 * M - 4096) as usize..].iter().all(|&x| x == 0x44));
    let d3 = std::fs::read(&f3.0).unwrap();
    assert_eq!(d3.len() as u64, M + 4096);
    assert!(d3[M as usize..].iter().all(|&x| x == 0x45));
}

#[test]
fn a_file_node_with_direct_io_grows() {
    let f = Scratch::new_in("/var/tmp", "dfile").with_pattern(8192);
    let mut o = FileOptions::new(&f.0);
    o.direct = true;
    let node = match file::open(&uniq("td"), &o) {
        Ok(n) => n,
        Err(e) if e.kind() == engine::ErrorKind::Unsupported => {
            eprintln!("skipping: no O_DIRECT on /var/tmp: {e}");
            return;
        }
        Err(e) => panic!("{e:?}"),
    };
    let n = Arc::clone(&node);
    run(async move {
        n.truncate(M).await.unwrap();
        // Unaligned: a padded write next to the new end must not cut the file back.
        write(&n, M - 700, 0x66, 700).await;
        n.flush().await.unwrap();
    });
    assert_eq!(node.len(), M);
    let d = std::fs::read(&f.0).unwrap();
    assert_eq!(d.len() as u64, M);
    assert!(d[(M - 700) as usize..].iter().all(|&x| x == 0x66));
    assert!(d[8192..(M - 700) as usize].iter().all(|&x| x == 0));
}

fn is_einval(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidInput
}

#[test]
fn shrinking_fixed_size_raw_and_unaligned_qcow2_sizes_are_refused() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    let img = Scratch::new("shrink");
    qemu_create(img.path(), 64 * K, "1.1", 4 * M, None);
    let before = std::fs::read(&img.0).unwrap();
    let p = img.0.clone();
    run(async move {
        let node = image::open(&p, &ImageOptions::default()).await.unwrap();
        let e = node.truncate(2 * M).await.unwrap_err();
        assert!(is_einval(&e), "{e}");
        let e = node.truncate(8 * M + 100).await.unwrap_err();
        assert!(is_einval(&e), "{e}");
        node.truncate(4 * M).await.unwrap();
        assert_eq!(node.len(), 4 * M);
        node.flush().await.unwrap();
    });
    assert_eq!(
        std::fs::read(&img.0).unwrap(),
        before,
        "the image is unchanged"
    );
    assert_eq!(qemu_virtual_size(img.path()), 4 * M);

    let f = Scratch::new("fshrink").with_pattern(8192);
    let fnode = file::open(&uniq("ts"), &FileOptions::new(&f.0)).unwrap();
    let rawn = raw::open(None, &fnode, RawOptions::default(), false).unwrap();
    let f2 = Scratch::new("fixed").with_pattern(8192);
    let fnode2 = file::open(&uniq("ts"), &FileOptions::new(&f2.0)).unwrap();
    let opts = RawOptions {
        offset: 0,
        size: Some(4096),
    };
    let fixed = raw::open(None, &fnode2, opts, false).unwrap();
    let (a, b, c) = (Arc::clone(&fnode), Arc::clone(&rawn), Arc::clone(&fixed));
    run(async move {
        assert!(is_einval(&a.truncate(4096).await.unwrap_err()));
        assert!(is_einval(&b.truncate(4096).await.unwrap_err()));
        a.truncate(8192).await.unwrap();
        b.truncate(8192).await.unwrap();
        let e = c.truncate(M).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
    });
    assert_eq!(fnode.len(), 8192);
    assert_eq!(fixed.len(), 4096);
    assert_eq!(std::fs::metadata(&f.0).unwrap().len(), 8192);
    assert_eq!(std::fs::metadata(&f2.0).unwrap().len(), 8192);
}

#[test]
fn read_only_nodes_refuse_to_grow_as_they_refuse_writes() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    let img = Scratch::new("ro");
    qemu_create(img.path(), 64 * K, "1.1", 4 * M, None);
    let f = Scratch::new("rofile").with_pattern(8192);
    let p = img.0.clone();
    let fp = f.0.clone();
    run(async move {
        let o = ImageOptions {
            read_only: true,
            ..Default::default()
        };
        let q = image::open(&p, &o).await.unwrap();
        let mut fo = FileOptions::new(&fp);
        fo.read_only = true;
        let fnode = file::open(&uniq("tr"), &fo).unwrap();
        let rawn = raw::open(None, &fnode, RawOptions::default(), true).unwrap();
        for n in [&q, &fnode, &rawn] {
            let e = n.truncate(8 * M).await.unwrap_err();
            let (we, _) = n
                .write(0, IoBuf::from_slice(&[1u8; 512]), WriteFlags::default())
                .await;
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert_eq!(e.kind(), we.unwrap_err().kind());
        }
        assert_eq!(q.len(), 4 * M);
        assert_eq!(fnode.len(), 8192);
    });
    assert_eq!(qemu_virtual_size(img.path()), 4 * M);
    assert_eq!(std::fs::metadata(Path::new(&f.0)).unwrap().len(), 8192);
}
