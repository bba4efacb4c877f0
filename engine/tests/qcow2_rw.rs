//! qcow2 writes under stress: two IoThreads allocating in one image, refcount-table growth,
//! zeroes and discard (checked against `qemu-img map`), O_DIRECT on a disk folder, and
//! hostile images that must give errors, never panics.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{assert_check_clean as check_clean, backend_on_two_iothreads, qemu_content};
use common::{qemu_image_end, qemu_tool, read_whole, Scratch};
use engine::drivers::qcow2::create::CreateOptions;
use engine::image::{self, Format, ImageOptions};
use engine::{IoBuf, Node, WriteFlags, ZeroFlags};

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    iothreads::block_on_current(Default::default(), f).expect("io_uring")
}

fn create_at(path: &Path, o: CreateOptions) {
    let p = path.to_path_buf();
    run(async move { image::create(&p, Format::Qcow2, &o).await.unwrap() });
}

#[test]
fn two_iothreads_allocating_in_one_image_stay_consistent() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    let img = Scratch::new("two");
    let size: u64 = 32 << 20;
    create_at(
        &img.0,
        CreateOptions {
            size,
            cluster_size: 65536,
            ..Default::default()
        },
    );
    let (t, b) = backend_on_two_iothreads(&img.0);
    // Each IoThread owns half the disk; 16 tasks each write 4 KiB pieces at random offsets
    // (many to the same clusters at once), then read everything back.
    let mut hs = Vec::new();
    for (k, th) in t.iter().enumerate() {
        let b = b.clone();
        hs.push(th.spawn_with(move || async move {
            let half = size / 2;
            let base = k as u64 * half;
            let mut tasks = Vec::new();
            for w in 0..16u64 {
                let b = b.clone();
                tasks.push(iothreads::spawn_local(async move {
                    let mut x = 0x1234_5678u64 ^ (w + 1) ^ ((k as u64) << 32);
                    let mut written = Vec::new();
                    for _ in 0..200 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Offsets in this task's stripes of 4 KiB (stripe = w mod 16).
                        let block = (x % (half / 4096 / 16)) * 16 + w;
                        let off = base + block * 4096;
                        let fill = (x >> 8) as u8 | 1;
                        let (r, _) = b.write(off, IoBuf::from_slice(&[fill; 4096])).await;
                        r.unwrap();
                        written.push((off, fill));
                    }
                    written
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        }));
    }
    let mut written: Vec<(u64, u8)> = Vec::new();
    for h in hs {
        written.extend(h.join().unwrap());
    }
    b.flush_blocking().unwrap();
    let mut expect = vec![0u8; size as usize];
    for (off, fill) in &written {
        expect[*off as usize..*off as usize + 4096].fill(*fill);
    }
    let got = read_whole(&t[0], &b, size);
    assert!(got == expect, "strata reads other data than it wrote");
    drop(b);
    check_clean(img.path());
    assert!(qemu_content(img.path()) == expect, "QEMU reads other data");
}

#[test]
fn the_refcount_table_grows_when_the_image_outgrows_it() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters (32 KiB),
    // and the first refcount table (one cluster, 64 entries) covers 2 MiB of file.
    let img = Scratch::new("grow");
    let size: u64 = 8 << 20;
    create_at(
        &img.0,
        CreateOptions {
            size,
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    );
    let p = img.0.clone();
    let expect = run(async move {
        let node = image::open(&p, &ImageOptions::default()).await.unwrap();
        let mut expect = vec![0u8; size as usize];
        for i in 0..(6u64 << 20) / 4096 {
            let off = i * 4096;
            let data = vec![(i % 250) as u8 + 1; 4096];
            let (r, _) = node
                .write(off, IoBuf::from_slice(&data), WriteFlags::default())
                .await;
            r.unwrap();
            expect[off as usize..off as usize + 4096].copy_from_slice(&data);
            if i % 200 == 0 {
                node.flush().await.unwrap();
            }
        }
        node.flush().await.unwrap();
        expect
    });
    check_clean(img.path());
    assert!(qemu_content(img.path()) == expect);
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", img.path()])
        .output()
        .unwrap();
    assert!(out.status.success());
}

fn map(path: &str) -> String {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn zeroes_and_discard_read_as_zeroes_and_free_clusters() {
    if qemu_tool("qemu-img").is_none() || qemu_tool("qemu-io").is_none() {
        return;
    }
    for version in [3u32, 2] {
        let base = Scratch::new("zbase");
        let out = Command::new("qemu-img")
            .args(["create", "-f", "qcow2", base.path(), "4M"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x77 0 4M", base.path()])
            .output()
            .unwrap();
        assert!(out.status.success());
        let img = Scratch::new("z");
        let bn = base.0.file_name().unwrap().to_str().unwrap().to_string();
        create_at(
            &img.0,
            CreateOptions {
                size: 4 << 20,
                version,
                backing_file: Some(bn),
                backing_format: Some("qcow2".into()),
                ..Default::default()
            },
        );
        let p = img.0.clone();
        run(async move {
            let node = image::open(&p, &ImageOptions::default()).await.unwrap();
            let (r, _) = node
                .write(
                    0,
                    IoBuf::from_slice(&vec![1u8; 1 << 20]),
                    WriteFlags::default(),
                )
                .await;
            r.unwrap();
            // Whole clusters, written and not: zero clusters on v3 (they hide the backing
            // file), explicit zeroes on v2.
            node.write_zeroes(
                65536,
                131072,
                ZeroFlags {
                    may_unmap: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            node.write_zeroes(2 << 20, 65536, ZeroFlags::default())
                .await
                .unwrap();
            // A partial cluster: written zeroes.
            node.write_zeroes(300_000, 1000, ZeroFlags::default())
                .await
                .unwrap();
            // Discard: the cluster no longer shows its data (v3: zeroes; v2: the backing
            // file's data shows through, as QEMU's v2 discard does).
            node.discard(512 << 10, 65536).await.unwrap();
            node.flush().await.unwrap();
        });
        check_clean(img.path());
        let got = qemu_content(img.path());
        let mut want = vec![0x77u8; 4 << 20];
        want[..1 << 20].fill(1);
        want[65536..196608].fill(0);
        want[2 << 20..(2 << 20) + 65536].fill(0);
        want[300_000..301_000].fill(0);
        if version == 3 {
            want[512 << 10..(512 << 10) + 65536].fill(0);
        } else {
            want[512 << 10..(512 << 10) + 65536].fill(0x77);
        }
        assert!(got == want, "v{version}: contents after zeroes and discard");
        if version == 3 {
            assert!(
                map(img.path()).contains("\"zero\": true"),
                "zero clusters show in qemu-img map"
            );
        }
    }
}

#[test]
fn direct_io_on_a_disk_folder_handles_small_metadata_writes() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    // ext4 with O_DIRECT refuses unaligned I/O: the L1 entry and header writes (smaller than
    // a block) must be padded by the file driver, or this fails where tmpfs passes.
    let img = Scratch::new_in("/var/tmp", "direct");
    create_at(
        &img.0,
        CreateOptions {
            size: 16 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    );
    let p = img.0.clone();
    let expect = run(async move {
        let o = ImageOptions {
            direct: true,
            ..Default::default()
        };
        let node = match image::open(&p, &o).await {
            Ok(n) => n,
            Err(e) if e.kind() == engine::ErrorKind::Unsupported => {
                eprintln!("skipping: no O_DIRECT on /var/tmp: {e}");
                return None;
            }
            Err(e) => panic!("{e:?}"),
        };
        let mut expect = vec![0u8; 16 << 20];
        for (i, off) in [0u64, 5000, 1 << 20, (9 << 20) + 3, (16 << 20) - 700]
            .iter()
            .enumerate()
        {
            let len = 700usize.min(((16 << 20) - off) as usize);
            let data = vec![i as u8 + 1; len];
            let (r, _) = node
                .write(*off, IoBuf::from_slice(&data), WriteFlags::default())
                .await;
            r.unwrap();
            expect[*off as usize..*off as usize + len].copy_from_slice(&data);
        }
        node.flush().await.unwrap();
        Some(expect)
    });
    let Some(expect) = expect else { return };
    check_clean(img.path());
    assert!(qemu_content(img.path()) == expect);
}

#[test]
fn an_image_marked_corrupt_or_with_unknown_features_is_refused_for_writing() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    let img = Scratch::new("bits");
    create_at(
        &img.0,
        CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    );
    let set_incompat = |bits: u64| {
        let mut b = std::fs::read(&img.0).unwrap();
        b[72..80].copy_from_slice(&bits.to_be_bytes());
        std::fs::write(&img.0, b).unwrap();
    };
    let open = |ro: bool| {
        let p = img.0.clone();
        run(async move {
            image::open(
                &p,
                &ImageOptions {
                    read_only: ro,
                    ..Default::default()
                },
            )
            .await
            .map(|_| ())
        })
    };
    set_incompat(1 << 1);
    let e = open(false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "qcow2: Image is corrupt; cannot be opened read/write"
    );
    open(true).unwrap();
    set_incompat(1 << 9);
    let e = open(true).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Unsupported qcow2 feature(s): unknown feature 9"),
        "{e}"
    );
    set_incompat(1 << 0);
    assert!(open(false).unwrap_err().to_string().contains("dirty"));
    open(true).unwrap();
    set_incompat(0);
    open(false).unwrap();
}

#[test]
fn backing_file_names_resolve_like_qemu_and_json_is_refused() {
    let dir = Scratch::new("dir");
    std::fs::create_dir_all(&dir.0).unwrap();
    let base = dir.0.join("base.qcow2");
    let top = dir.0.join("top.qcow2");
    create_at(
        &base,
        CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    );
    create_at(
        &top,
        CreateOptions {
            size: 1 << 20,
            backing_file: Some("base.qcow2".into()),
            ..Default::default()
        },
    );
    let p = top.clone();
    let depth = run(async move {
        let n = image::open(
            &p,
            &ImageOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut d = 0;
        let mut cur: Option<Arc<Node>> = Some(n);
        while let Some(c) = cur {
            d += 1;
            cur = c.backing();
        }
        d
    });
    assert_eq!(depth, 2);
    let json = dir.0.join("json.qcow2");
    create_at(
        &json,
        CreateOptions {
            size: 1 << 20,
            backing_file: Some("json:{\"driver\":\"null-co\"}".into()),
            ..Default::default()
        },
    );
    let p = json.clone();
    let e = run(async move {
        image::open(
            &p,
            &ImageOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .await
        .map(|_| ())
    });
    assert!(e.unwrap_err().full_message().contains("json:"));
    let _ = std::fs::remove_dir_all(&dir.0);
}

#[test]
fn an_image_with_internal_snapshots_opens_read_only_only() {
    if qemu_tool("qemu-img").is_none() || qemu_tool("qemu-io").is_none() {
        return;
    }
    let img = Scratch::new("snaps");
    common::run_tool(&["qemu-img", "create", "-q", "-f", "qcow2", img.path(), "4M"]);
    common::run_tool(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 1 0 1M",
        img.path(),
    ]);
    common::run_tool(&["qemu-img", "snapshot", "-c", "s1", img.path()]);
    let open = |ro: bool| {
        let p = img.0.clone();
        run(async move {
            image::open(
                &p,
                &ImageOptions {
                    read_only: ro,
                    ..Default::default()
                },
            )
            .await
            .map(|_| ())
        })
    };
    let e = open(false).unwrap_err();
    assert!(e.to_string().contains("internal snapshot"), "{e}");
    open(true).unwrap();
    // Nothing was written: the snapshot still reads as taken.
    common::run_tool(&["qemu-img", "snapshot", "-a", "s1", img.path()]);
    let out = common::run_tool(&["qemu-io", "-f", "qcow2", "-c", "read -P 1 0 1M", img.path()]);
    assert!(!out.contains("fail"), "{out}");
    check_clean(img.path());
}

/// A growing image is preallocated ahead of its allocations while open (so data writes land
/// inside the file), and the tail is cut at close: the file then ends where QEMU's check says
/// the image ends, and the image is clean with the data in place.
#[test]
fn growth_is_preallocated_while_open_and_cut_at_close() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    let img = Scratch::new_in("/var/tmp", "grow");
    create_at(
        &img.0,
        CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    );
    let p = img.0.clone();
    let path = img.0.clone();
    let (while_open, data) = run(async move {
        let node = image::open(&p, &ImageOptions::default()).await.unwrap();
        let data: Vec<u8> = (0..(8usize << 20)).map(|i| (i * 7 % 253) as u8).collect();
        for off in (0..data.len()).step_by(256 << 10) {
            let (r, _) = node
                .write(
                    off as u64,
                    IoBuf::from_slice(&data[off..off + (256 << 10)]),
                    WriteFlags::default(),
                )
                .await;
            r.unwrap();
        }
        node.flush().await.unwrap();
        let while_open = std::fs::metadata(&path).unwrap().len();
        node.close_if_last().await.unwrap();
        (while_open, data)
    });
    let end = qemu_image_end(img.path());
    assert!(
        while_open > end,
        "while open the file reaches past the image's end ({while_open} <= {end})"
    );
    assert_eq!(
        std::fs::metadata(&img.0).unwrap().len(),
        end,
        "after close the file ends where the image does"
    );
    check_clean(img.path());
    assert_eq!(&qemu_content(img.path())[..data.len()], &data[..]);
}
