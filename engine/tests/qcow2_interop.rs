//! qcow2 against QEMU, both ways: images strata writes pass `qemu-img check` and read back
//! through `qemu-img convert` as strata wrote them; images qemu-img and qemu-io make read in
//! strata as QEMU reads them. QEMU is the oracle throughout.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{qemu_tool, Scratch};
use engine::drivers::qcow2::create::{CreateOptions, Preallocation};
use engine::image::{self, Format, ImageOptions};
use engine::{IoBuf, Node, WriteFlags};

/// Runs `f`'s future with the calling thread made an IoThread.
fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    iothreads::block_on_current(Default::default(), f).expect("io_uring")
}

fn qemu(args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run qemu tool");
    out
}

fn check_clean(path: &str) {
    let out = qemu(&["qemu-img", "check", path]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu-img check {path} failed:\n{text}"
    );
    assert!(
        text.contains("No errors were found"),
        "qemu-img check {path}:\n{text}"
    );
}

/// The image's guest content as QEMU reads it.
fn qemu_content(path: &str) -> Vec<u8> {
    let raw = Scratch::new("conv");
    let out = qemu(&["qemu-img", "convert", "-O", "raw", path, raw.path()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&raw.0).unwrap()
}

async fn read_all(node: &Arc<Node>) -> Vec<u8> {
    let len = node.len() as usize;
    let mut out = vec![0u8; len];
    let chunk = 1 << 20;
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        let (r, b) = node.read(off as u64, IoBuf::new(n)).await;
        r.unwrap();
        out[off..off + n].copy_from_slice(&b);
        off += n;
    }
    out
}

async fn write(node: &Node, off: u64, data: &[u8]) {
    let (r, _) = node
        .write(off, IoBuf::from_slice(data), WriteFlags::default())
        .await;
    r.unwrap();
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn create(path: &Path, o: CreateOptions) {
    image::create(path, Format::Qcow2, &o).await.unwrap();
}

/// Writes a set of pieces (aligned, unaligned, cluster-straddling) and returns the expected
/// guest content.
async fn scribble(node: &Arc<Node>, base: Vec<u8>, cs: u64, seed: u64) -> Vec<u8> {
    let mut expect = base;
    let size = expect.len() as u64;
    let pieces = [
        (0u64, 4096usize),
        (cs - 100, 300),
        (3 * cs + 17, 1000),
        (size / 2, 2 * cs as usize + 5),
        (size - 512, 512),
        (5 * cs, cs as usize),
    ];
    for (i, (off, len)) in pieces.iter().enumerate() {
        let off = (*off).min(size - *len as u64);
        let data = pattern(seed + i as u64, *len);
        write(node, off, &data).await;
        expect[off as usize..off as usize + len].copy_from_slice(&data);
    }
    expect
}

#[test]
fn strata_images_pass_qemu_img_check_and_read_back_in_qemu() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    let cases: Vec<(u64, u32, u32)> = vec![
        (65536, 16, 3),
        (512, 16, 3),
        (4096, 1, 3),
        (2 << 20, 64, 3),
        (65536, 16, 2),
        (1024, 8, 3),
    ];
    for (cs, rb, version) in cases {
        let img = Scratch::new("w");
        let size: u64 = 8 << 20;
        let p = img.0.clone();
        let expect = run(async move {
            create(
                &p,
                CreateOptions {
                    size,
                    cluster_size: cs,
                    refcount_bits: rb,
                    version,
                    ..Default::default()
                },
            )
            .await;
            let node = image::open(&p, &ImageOptions::default()).await.unwrap();
            let expect = scribble(&node, vec![0u8; size as usize], cs, cs + u64::from(rb)).await;
            assert_eq!(
                read_all(&node).await,
                expect,
                "strata reads back what it wrote"
            );
            node.flush().await.unwrap();
            expect
        });
        check_clean(img.path());
        assert!(
            qemu_content(img.path()) == expect,
            "cluster {cs} refcount {rb} v{version}: QEMU reads other data"
        );
    }
}

#[test]
fn qemu_made_images_read_the_same_in_strata() {
    if qemu_tool("qemu-img").is_none() || qemu_tool("qemu-io").is_none() {
        return;
    }
    for (cs, extra) in [
        ("65536", vec![]),
        ("512", vec![]),
        ("2M", vec![]),
        ("65536", vec!["-o", "compat=0.10"]),
        ("65536", vec!["-o", "refcount_bits=1"]),
        ("65536", vec!["-o", "lazy_refcounts=on"]),
        ("65536", vec!["-o", "extended_l2=on"]),
    ] {
        let img = Scratch::new("q");
        let cs_opt = format!("cluster_size={cs}");
        let mut args = vec!["qemu-img", "create", "-f", "qcow2", "-o", &cs_opt];
        args.extend(extra.iter().copied());
        args.extend([img.path(), "8M"]);
        let out = qemu(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (i, (off, len)) in [
            (0u64, "4k"),
            (100_000, "3000"),
            (5_000_000, "200k"),
            (8_000_000, "1k"),
        ]
        .iter()
        .enumerate()
        {
            let cmd = format!("write -P {} {off} {len}", 0x11 * (i + 1));
            let out = qemu(&["qemu-io", "-f", "qcow2", "-c", &cmd, img.path()]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = qemu(&[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -z 6000000 128k",
            img.path(),
        ]);
        assert!(out.status.success());
        let want = qemu_content(img.path());
        let p = img.0.clone();
        let got = run(async move {
            let o = ImageOptions {
                read_only: true,
                ..Default::default()
            };
            let node = image::open(&p, &o).await.unwrap();
            read_all(&node).await
        });
        assert!(
            got == want,
            "cluster {cs} {extra:?}: strata reads other data than QEMU"
        );
    }
}

#[test]
fn compressed_images_read_the_same() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    for ctype in ["zlib", "zstd"] {
        let src = Scratch::new("src");
        let data: Vec<u8> = (0..(4usize << 20)).map(|i| ((i / 7) % 251) as u8).collect();
        std::fs::write(&src.0, &data).unwrap();
        let img = Scratch::new("c");
        let o = format!("compression_type={ctype}");
        let out = qemu(&[
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &o,
            src.path(),
            img.path(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let p = img.0.clone();
        let got = run(async move {
            let node = image::open(
                &p,
                &ImageOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            read_all(&node).await
        });
        assert!(got == data, "{ctype}: compressed clusters read differently");
        // Writing over compressed clusters copies them out first.
        let p = img.0.clone();
        let mut expect = data.clone();
        run(async move {
            let node = image::open(&p, &ImageOptions::default()).await.unwrap();
            write(&node, 70_000, &[0xEE; 1000]).await;
            node.flush().await.unwrap();
        });
        expect[70_000..71_000].fill(0xEE);
        check_clean(img.path());
        assert!(
            qemu_content(img.path()) == expect,
            "{ctype}: write over a compressed cluster"
        );
    }
}

#[test]
fn backing_chains_read_through_and_copy_on_write() {
    if qemu_tool("qemu-img").is_none() || qemu_tool("qemu-io").is_none() {
        return;
    }
    let base = Scratch::new("base");
    let out = qemu(&["qemu-img", "create", "-f", "qcow2", base.path(), "4M"]);
    assert!(out.status.success());
    let out = qemu(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 0 4M",
        base.path(),
    ]);
    assert!(out.status.success());
    let top = Scratch::new("top");
    let base_name = base.0.file_name().unwrap().to_str().unwrap().to_string();
    let (tp, bn) = (top.0.clone(), base_name.clone());
    // A relative backing name, resolved against the overlay's folder; the overlay is larger
    // than the backing file (reads past its end are zeroes).
    run(async move {
        let o = CreateOptions {
            size: 6 << 20,
            backing_file: Some(bn),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        };
        create(&tp, o).await;
        let node = image::open(&tp, &ImageOptions::default()).await.unwrap();
        assert!(node.backing().is_some());
        write(&node, 1000, &[1u8; 10]).await; // partial cluster: COW from backing
        write(&node, (4 << 20) + 5, &[2u8; 10]).await; // past the backing file's end
        node.flush().await.unwrap();
    });
    check_clean(top.path());
    let got = qemu_content(top.path());
    let mut want = vec![0x5au8; 6 << 20];
    want[4 << 20..].fill(0);
    want[1000..1010].fill(1);
    want[(4 << 20) + 5..(4 << 20) + 15].fill(2);
    assert!(got == want, "the overlay reads differently in QEMU");
    let info = qemu(&["qemu-img", "info", "--output=json", top.path()]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains(&format!("\"backing-filename\": \"{base_name}\"")),
        "{text}"
    );
}

#[test]
fn preallocated_images_pass_check() {
    if qemu_tool("qemu-img").is_none() {
        return;
    }
    for (prealloc, version) in [
        (Preallocation::Metadata, 3),
        (Preallocation::Full, 3),
        (Preallocation::Metadata, 2),
    ] {
        let img = Scratch::new("pre");
        let p = img.0.clone();
        run(async move {
            let o = CreateOptions {
                size: 16 << 20,
                preallocation: prealloc,
                version,
                ..Default::default()
            };
            create(&p, o).await;
            let node = image::open(&p, &ImageOptions::default()).await.unwrap();
            write(&node, 77777, &[9u8; 5000]).await;
            node.flush().await.unwrap();
        });
        check_clean(img.path());
        let mut want = vec![0u8; 16 << 20];
        want[77777..82777].fill(9);
        assert!(qemu_content(img.path()) == want, "{prealloc:?} v{version}");
    }
}
