//! Requests that span many qcow2 clusters: reads coalesced into one piece per host- or
//! backing-contiguous run and run concurrently, writes that allocate runs of host clusters and
//! write each run with one request. QEMU (`qemu-io`, `qemu-img`) is the oracle: the same
//! writes applied by both to copies of one image must read the same, and strata's images must
//! pass `qemu-img check` (no leaks, no errors).

mod common;

use std::process::Command;

use common::Scratch;
use common::{assert_check_clean, backend_on_two_iothreads, have_qemu, qemu_content};
use common::{qemu_img_create, qemu_img_create_with_opts, read_whole, run_qemu_io, run_tool};
use engine::image::{self, ImageOptions};
use engine::{IoBuf, Node, WriteFlags, ZeroFlags};

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    iothreads::block_on_current(Default::default(), f).expect("io_uring")
}

/// Pseudo-random bytes (xorshift), the same for the same seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A qcow2 image of `len` bytes of noise (made by `qemu-img convert`, so its clusters are
/// contiguous on the host), with `cluster` bytes per cluster.
fn noise_base(dir: &str, tag: &str, len: usize, cluster: u64, seed: u64) -> Scratch {
    let raw = Scratch::new_in(dir, &format!("{tag}raw"));
    std::fs::write(&raw.0, noise(len, seed)).unwrap();
    let img = Scratch::new_in(dir, tag);
    let opt = format!("cluster_size={cluster}");
    run_tool(&[
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &opt,
        raw.path(),
        img.path(),
    ]);
    img
}

/// An empty overlay of `size` bytes over `base`.
fn overlay(dir: &str, tag: &str, base: &Scratch, size: u64, cluster: u64) -> Scratch {
    let img = Scratch::new_in(dir, tag);
    let opt = format!("cluster_size={cluster}");
    let backing = Some((base.path(), "qcow2"));
    qemu_img_create_with_opts("qcow2", Some(&opt), img.path(), backing, Some(size));
    img
}

fn copy(src: &Scratch, dir: &str, tag: &str) -> Scratch {
    let dst = Scratch::new_in(dir, tag);
    std::fs::copy(&src.0, &dst.0).unwrap();
    dst
}

/// Runs `qemu-io` commands on `img`, in one process.
fn qemu_io(img: &Scratch, cmds: &[String]) {
    let out = run_qemu_io("qcow2", img.path(), cmds);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmds:?}:\n{out}"
    );
}

/// One step applied by both strata and QEMU.
#[derive(Debug, Clone, Copy)]
enum Step {
    Write {
        off: u64,
        len: u64,
        fill: u8,
    },
    /// Zeroes that keep the allocation (a preallocated zero cluster where it was data).
    Zero {
        off: u64,
        len: u64,
    },
}

impl Step {
    fn qemu(&self) -> String {
        match *self {
            Step::Write { off, len, fill } => format!("write -P {fill} {off} {len}"),
            Step::Zero { off, len } => format!("write -z {off} {len}"),
        }
    }
}

async fn strata_steps(node: &Node, steps: &[Step]) {
    for s in steps {
        match *s {
            Step::Write { off, len, fill } => {
                let (r, _) = node
                    .write(
                        off,
                        IoBuf::from_slice(&vec![fill; len as usize]),
                        WriteFlags::default(),
                    )
                    .await;
                r.unwrap_or_else(|e| panic!("{s:?}: {e}"));
            }
            Step::Zero { off, len } => node
                .write_zeroes(off, len, ZeroFlags::default())
                .await
                .unwrap_or_else(|e| panic!("{s:?}: {e}")),
        }
    }
}

/// Reads `[off, off + len)` through strata with one request.
async fn strata_read(node: &Node, off: u64, len: usize) -> Vec<u8> {
    let (r, b) = node.read(off, IoBuf::new(len)).await;
    r.unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
    b.to_vec()
}

/// Checks many multi-cluster reads of `path` (odd offsets and lengths, the whole image)
/// against `want`.
fn check_reads(path: &Scratch, want: &[u8]) {
    let p = path.0.clone();
    let want = want.to_vec();
    run(async move {
        let opts = ImageOptions {
            read_only: true,
            ..Default::default()
        };
        let node = image::open(&p, &opts).await.unwrap();
        let all = strata_read(&node, 0, want.len()).await;
        assert!(all == want, "a read of the whole image differs from QEMU's");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % want.len() as u64) as usize;
            let len = ((x >> 32) as usize % (700 << 10)).clamp(1, want.len() - off);
            let got = strata_read(&node, off as u64, len).await;
            if got != want[off..off + len] {
                let at = got
                    .iter()
                    .zip(&want[off..])
                    .position(|(a, b)| a != b)
                    .unwrap();
                panic!("read {off}+{len} differs from QEMU's at byte {}", off + at);
            }
        }
    });
}

/// A write spanning clusters of every kind (allocated here, unallocated over a backing file,
/// zero, preallocated zero, compressed, past the backing file's end), with partial clusters
/// at both ends, gives the image QEMU makes of the same writes; reads of every kind of run
/// agree with QEMU's.
#[test]
fn writes_across_cluster_kinds_match_qemu() {
    if !have_qemu() {
        return;
    }
    for dir in ["/dev/shm", "/var/tmp"] {
        let k = 64u64 << 10;
        let base = noise_base(dir, "mbase", 4 << 20, k, 7);
        let top = overlay(dir, "mtop", &base, 6 << 20, k);
        // The same setup through QEMU for both copies.
        let setup: Vec<String> = [
            "write -P 17 128k 192k",   // clusters 2-4: data here
            "write -z 448k 128k",      // clusters 7-8: zero clusters
            "write -c -P 34 640k 64k", // cluster 10: compressed
            "write -P 51 1M 128k",     // clusters 16-17: data, host-contiguous
            "write -c -P 68 2M 64k",   // cluster 32: compressed
            "write -P 85 2112k 64k",   // cluster 33: data
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        qemu_io(&top, &setup);
        let a = copy(&top, dir, "mA");
        let b = copy(&top, dir, "mB");
        // Before any strata write: reads through every kind of run match QEMU's.
        check_reads(&a, &qemu_content(a.path()));
        let steps = [
            // Cluster 9 partial (COW from backing), cluster 10 partial over compressed data.
            Step::Write {
                off: 600_000,
                len: 100_000,
                fill: 0xa1,
            },
            // 1 partial unallocated, 2-4 in place, 5-6 new, 7 zero (whole), 8 zero (partial).
            Step::Write {
                off: 100_000,
                len: 460_000,
                fill: 0xb2,
            },
            // Preallocated zero clusters (16-17), then a write with partial ends over them.
            Step::Zero {
                off: 1 << 20,
                len: 128 << 10,
            },
            Step::Write {
                off: (1 << 20) + 30_000,
                len: 100_000,
                fill: 0xc3,
            },
            // Compressed (32) partial head, data (33) in place, unallocated (34) partial tail.
            Step::Write {
                off: (2 << 20) + 40_000,
                len: 150_000,
                fill: 0xd4,
            },
            // Across the backing file's end (4 MiB): backing COW, then zeroes past it.
            Step::Write {
                off: (4 << 20) - 5000,
                len: 75_000,
                fill: 0xe5,
            },
            // One large write over much of the image: in place and new runs mixed.
            Step::Write {
                off: 50_000,
                len: (3 << 20) + 12_345,
                fill: 0xf6,
            },
            // A cluster-aligned multi-cluster write of new clusters only.
            Step::Write {
                off: 5 << 20,
                len: 512 << 10,
                fill: 0x17,
            },
        ];
        let p = a.0.clone();
        run(async move {
            let node = image::open(&p, &ImageOptions::default()).await.unwrap();
            strata_steps(&node, &steps).await;
            node.flush().await.unwrap();
        });
        qemu_io(&b, &steps.iter().map(Step::qemu).collect::<Vec<_>>());
        assert_check_clean(a.path());
        let want = qemu_content(b.path());
        let got = qemu_content(a.path());
        if got != want {
            let at = got.iter().zip(&want).position(|(x, y)| x != y).unwrap();
            panic!(
                "{dir}: QEMU reads strata's image differently from its own at byte {at}: {} \
                 against {}",
                got[at], want[at]
            );
        }
        check_reads(&a, &want);
    }
}

/// The same with direct I/O on a disk folder (O_DIRECT alignment through the run writes and
/// the concurrent pieces of reads).
#[test]
fn multi_cluster_requests_with_direct_io_on_disk() {
    if !have_qemu() {
        return;
    }
    let k = 64u64 << 10;
    let base = noise_base("/var/tmp", "dbase", 2 << 20, k, 9);
    let top = overlay("/var/tmp", "dtop", &base, 2 << 20, k);
    qemu_io(&top, &["write -P 3 256k 128k".to_string()]);
    let oracle = copy(&top, "/var/tmp", "doracle");
    let steps = [
        Step::Write {
            off: 4096,
            len: 1 << 20,
            fill: 0x42,
        },
        Step::Write {
            off: 1536 << 10,
            len: 256 << 10,
            fill: 0x43,
        },
    ];
    let p = top.0.clone();
    run(async move {
        let opts = ImageOptions {
            direct: true,
            ..Default::default()
        };
        let node = image::open(&p, &opts).await.unwrap();
        strata_steps(&node, &steps).await;
        node.flush().await.unwrap();
        let mut x = 77u64;
        for _ in 0..50 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (2 << 20)) & !4095;
            let len = (((x >> 32) % (600 << 10)) & !4095).clamp(4096, (2 << 20) - off);
            let (r, _) = node.read(off, IoBuf::new(len as usize)).await;
            r.unwrap();
        }
    });
    qemu_io(&oracle, &steps.iter().map(Step::qemu).collect::<Vec<_>>());
    assert_check_clean(top.path());
    let want = qemu_content(oracle.path());
    assert!(qemu_content(top.path()) == want);
    check_reads(&top, &want);
}

/// Many writers on two IoThreads write overlapping multi-cluster ranges (odd offsets and
/// lengths) into an empty overlay at once. Two writers that allocate the same cluster must
/// not both allocate it: the loser's data would vanish, and the parts of the cluster only
/// the other wrote would show the backing file again. So every byte must read as the fill of
/// some write that covered it (or the backing file's byte, if none did), strata and QEMU
/// must read the same, and the image must have no leaks.
#[test]
fn concurrent_overlapping_multi_cluster_writes_keep_every_write() {
    if !have_qemu() {
        return;
    }
    let k = 64u64 << 10;
    let size: u64 = 4 << 20;
    let base = noise_base("/dev/shm", "cbase", size as usize, k, 5);
    let top = overlay("/dev/shm", "ctop", &base, size, k);
    let (t, b) = backend_on_two_iothreads(&top.0);
    let mut hs = Vec::new();
    for (th_i, th) in t.iter().enumerate() {
        let b = b.clone();
        hs.push(th.spawn_with(move || async move {
            let mut tasks = Vec::new();
            for w in 0..8u64 {
                let b = b.clone();
                tasks.push(iothreads::spawn_local(async move {
                    let mut x = 0xdead_beef_u64 ^ ((w + 1) << 8) ^ ((th_i as u64 + 1) << 40);
                    let mut done = Vec::new();
                    for _ in 0..24 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = x % size;
                        let len = ((x >> 24) % (320 << 10)).clamp(1, size - off);
                        // Fills 1..=250, never 0: 64 distinct classes below.
                        let fill = ((x >> 48) % 250) as u8 + 1;
                        let (r, _) = b
                            .write(off, IoBuf::from_slice(&vec![fill; len as usize]))
                            .await;
                        r.unwrap();
                        done.push((off, len, fill));
                    }
                    done
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        }));
    }
    let mut writes: Vec<(u64, u64, u8)> = Vec::new();
    for h in hs {
        writes.extend(h.join().unwrap());
    }
    b.flush_blocking().unwrap();
    let got = read_whole(&t[0], &b, size);
    drop(b);
    // For every byte, the classes (fill % 64) of the writes that covered it.
    let mut classes = vec![0u64; size as usize];
    for &(off, len, fill) in &writes {
        for c in &mut classes[off as usize..(off + len) as usize] {
            *c |= 1 << (fill % 64);
        }
    }
    let backing = noise(size as usize, 5);
    let mut bad = 0usize;
    let mut first_bad = None;
    for (i, &v) in got.iter().enumerate() {
        let ok = if classes[i] == 0 {
            v == backing[i]
        } else {
            classes[i] & (1 << (v % 64)) != 0
        };
        if !ok {
            bad += 1;
            first_bad.get_or_insert(i);
        }
    }
    assert!(
        bad == 0,
        "{bad} bytes read as no write that covered them left them (first at {:?})",
        first_bad
    );
    assert_check_clean(top.path());
    assert!(
        qemu_content(top.path()) == got,
        "QEMU reads other data than strata"
    );
}

/// A multi-cluster write after a discard reuses the freed clusters, as runs: the file does not
/// grow much, and the rewritten range maps to few host extents.
#[test]
fn multi_cluster_writes_reuse_freed_clusters_as_runs() {
    if !have_qemu() {
        return;
    }
    let img = Scratch::new_in("/dev/shm", "reuse");
    qemu_img_create("qcow2", img.path(), None, Some(16 << 20));
    let p = img.0.clone();
    let len_after_first = run(async move {
        let node = image::open(&p, &ImageOptions::default()).await.unwrap();
        for i in 0..8u64 {
            let (r, _) = node
                .write(
                    i << 20,
                    IoBuf::from_slice(&vec![i as u8 + 1; 1 << 20]),
                    WriteFlags::default(),
                )
                .await;
            r.unwrap();
        }
        node.flush().await.unwrap();
        let file_len = std::fs::metadata(&p).unwrap().len();
        node.discard(0, 8 << 20).await.unwrap();
        node.flush().await.unwrap();
        // Some requests pass so the freed clusters' grace period ends.
        for _ in 0..4 {
            let (r, _) = node.read(0, IoBuf::new(4096)).await;
            r.unwrap();
            let (r, _) = node
                .write(
                    15 << 20,
                    IoBuf::from_slice(&[9u8; 512]),
                    WriteFlags::default(),
                )
                .await;
            r.unwrap();
        }
        for i in 0..8u64 {
            let (r, _) = node
                .write(
                    i << 20,
                    IoBuf::from_slice(&vec![i as u8 + 11; 1 << 20]),
                    WriteFlags::default(),
                )
                .await;
            r.unwrap();
        }
        node.flush().await.unwrap();
        file_len
    });
    assert_check_clean(img.path());
    let grown = std::fs::metadata(&img.0).unwrap().len() - len_after_first;
    assert!(
        grown <= 2 << 20,
        "the file grew by {grown} bytes although 8 MiB were free"
    );
    let mut want = vec![0u8; 16 << 20];
    for i in 0..8usize {
        want[i << 20..(i + 1) << 20].fill(i as u8 + 11);
    }
    want[15 << 20..(15 << 20) + 512].fill(9);
    assert!(qemu_content(img.path()) == want);
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", img.path()])
        .output()
        .unwrap();
    let map = String::from_utf8_lossy(&out.stdout);
    let extents = map
        .lines()
        .filter(|l| l.contains("\"data\": true") && l.contains("\"offset\""))
        .count();
    assert!(
        extents <= 12,
        "the rewritten 8 MiB map to {extents} host extents:\n{map}"
    );
}

/// Reads over an extended-L2 overlay (subclusters allocated, zero, or from the backing file,
/// mixed inside clusters, next to compressed clusters) coalesce across subclusters and
/// clusters and read what QEMU reads.
#[test]
fn extended_l2_reads_over_a_backing_file_match_qemu() {
    if !have_qemu() {
        return;
    }
    let k = 64u64 << 10;
    let base = noise_base("/dev/shm", "xbase", 2 << 20, k, 11);
    let top = Scratch::new_in("/dev/shm", "xtop");
    let opts = Some("extended_l2=on,cluster_size=65536");
    let backing = Some((base.path(), "qcow2"));
    qemu_img_create_with_opts("qcow2", opts, top.path(), backing, Some(3 << 20));
    // Subclusters are 2 KiB: pieces inside clusters, across cluster boundaries, zeroes, and
    // whole clusters (some host-contiguous).
    let setup: Vec<String> = [
        "write -P 1 4k 6k",
        "write -P 2 62k 8k",
        "write -z 100k 4k",
        "write -P 3 192k 256k",
        "write -z 520k 70k",
        "write -c -P 4 768k 64k",
        "write -P 5 1000k 2k",
        "write -P 6 2040k 100k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    qemu_io(&top, &setup);
    check_reads(&top, &qemu_content(top.path()));
}
