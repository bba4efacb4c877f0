//! Live snapshots (blockdev-snapshot and blockdev-snapshot-sync): the overlay goes above the
//! active node under all its parents at once, guest I/O carries on in the overlay, QEMU's
//! refusals with QEMU's texts, and a snapshot refused while a job owns the node. Images are
//! checked with qemu-img.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{
    assert_backing, assert_check_clean, file_spec, have_qemu, make_chain, open_chain, qemu_content,
    qemu_img_create, uniq, Scratch,
};
use engine::drivers::file::FileOptions;
use engine::job::stream::StreamArgs;
use engine::job::JobStatus;
use engine::{
    BackendOptions, BackingSpec, ChildSpec, DriverSpec, Engine, EngineOptions, ErrorKind, IoBuf,
    NodeSpec,
};

const MIB: u64 = 1 << 20;

fn engine(iothreads: usize) -> Engine {
    Engine::new(EngineOptions {
        iothreads,
        ..Default::default()
    })
    .unwrap()
}

/// Adds `path` as a qcow2 node named `name` with the given backing spec.
fn add_qcow2(e: &Engine, name: &str, path: &str, backing: BackingSpec) -> engine::Result<()> {
    e.add_node(NodeSpec {
        node_name: Some(name.to_string()),
        read_only: false,
        driver: DriverSpec::Qcow2 {
            file: file_spec(path, false),
            backing,
            opts: Default::default(),
        },
    })
    .map(drop)
}

fn write(b: &engine::Backend, off: u64, len: usize, pattern: u8) {
    let (r, _) = b.write_blocking(off, IoBuf::from_slice(&vec![pattern; len]));
    r.unwrap();
}

#[test]
fn blockdev_snapshot_moves_the_guest_to_the_overlay() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "sn", 2, 4 * MIB);
    let e = engine(1);
    let n = open_chain(&e, &imgs, "sn");
    let guest = e.backend(&n[1], &[], BackendOptions::default()).unwrap();
    write(&guest, 0, 64 << 10, 0x11);
    let before = {
        let (r, b) = guest.read_blocking(0, IoBuf::new(4 * MIB as usize));
        r.unwrap();
        b[..].to_vec()
    };
    // The overlay names the active image as its backing file, as libvirt creates it.
    let ov = Scratch::new_in("/var/tmp", "sn-ov");
    qemu_img_create("qcow2", ov.path(), Some((imgs[1].path(), "qcow2")), None);
    let ovn = uniq("sn-overlay");
    add_qcow2(&e, &ovn, ov.path(), BackingSpec::None).unwrap();
    e.snapshot(&n[1], &ovn).unwrap();

    assert_eq!(guest.root().name(), ovn, "the guest writes the overlay now");
    let ovnode = e.node(&ovn).unwrap();
    assert_eq!(ovnode.backing().unwrap().name(), n[1]);
    assert!(
        e.node(&n[1]).unwrap().is_read_only(),
        "old active node read-only"
    );
    let (r, got) = guest.read_blocking(0, IoBuf::new(4 * MIB as usize));
    r.unwrap();
    assert!(got[..] == before[..], "the guest sees the same disk");
    write(&guest, MIB, 4096, 0x22);
    drop((guest, ovnode));
    drop(e);

    let mut expect = before.clone();
    expect[MIB as usize..MIB as usize + 4096].fill(0x22);
    assert_eq!(qemu_content(ov.path()), expect);
    assert_eq!(
        qemu_content(imgs[1].path()),
        before,
        "the old image is unchanged"
    );
    assert_backing(ov.path(), Some(imgs[1].path()));
    for p in [ov.path(), imgs[0].path(), imgs[1].path()] {
        assert_check_clean(p);
    }
}

#[test]
fn snapshot_file_creates_the_overlay_and_guest_io_never_stops() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "sf", 2, 4 * MIB);
    let e = engine(2);
    let n = open_chain(&e, &imgs, "sf");
    let guest = Arc::new(e.backend(&n[1], &[], BackendOptions::default()).unwrap());
    // Two writers, one per IoThread's worth of requests, each in its own slice; every write
    // is read back at once.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (g, stop) = (Arc::clone(&guest), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = 0u64;
                let mut last = Vec::new();
                while !stop.load(Ordering::Relaxed) || i < 8 {
                    let off = 2 * MIB + w * MIB + (i % 128) * 8192;
                    let pat = (1 + w as u8) * 0x30 + (i % 16) as u8;
                    write(&g, off, 8192, pat);
                    let (r, b) = g.read_blocking(off, IoBuf::new(8192));
                    r.unwrap();
                    assert!(b.iter().all(|&x| x == pat), "read back at {off}");
                    last.push((off, pat));
                    i += 1;
                }
                last
            })
        })
        .collect();
    let ov = Scratch::new_in("/var/tmp", "sf-ov");
    let ovn = uniq("sf-overlay");
    let node = e.snapshot_file(&n[1], &ov.0, &ovn).unwrap();
    assert_eq!(node.name(), ovn);
    stop.store(true, Ordering::Relaxed);
    let writes: Vec<(u64, u8)> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert_eq!(guest.root().name(), ovn);
    let (r, now) = guest.read_blocking(0, IoBuf::new(4 * MIB as usize));
    r.unwrap();
    // Each writer's last write to an offset is what the disk holds there now.
    let mut last = std::collections::HashMap::new();
    for (off, pat) in &writes {
        last.insert(*off, *pat);
    }
    for (off, pat) in &last {
        let at = *off as usize;
        assert!(now[at..at + 8192].iter().all(|b| b == pat), "offset {off}");
    }
    drop(guest);
    drop(node);
    drop(e);
    assert_backing(ov.path(), Some(imgs[1].path()));
    assert_eq!(qemu_content(ov.path()), &now[..]);
    assert!(!writes.is_empty());
    for p in [ov.path(), imgs[0].path(), imgs[1].path()] {
        assert_check_clean(p);
    }
    // A second snapshot onto an existing file is refused and leaves the file alone.
    let e = engine(1);
    let n = open_chain(&e, &imgs, "sf2");
    let size = std::fs::metadata(&ov.0).unwrap().len();
    let err = e.snapshot_file(&n[1], &ov.0, &uniq("again")).unwrap_err();
    assert!(
        err.full_message().contains("the file exists"),
        "{}",
        err.full_message()
    );
    assert_eq!(std::fs::metadata(&ov.0).unwrap().len(), size);
}

#[test]
fn snapshot_refusals_have_qemus_texts() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "sr", 2, 2 * MIB);
    let e = engine(1);
    let n = open_chain(&e, &imgs, "sr");
    let msg = |node: &str, overlay: &str| e.snapshot(node, overlay).unwrap_err().full_message();

    assert_eq!(
        msg("nope", &n[1]),
        "Cannot find device='nope' nor node-name='nope'"
    );
    let ov = Scratch::new_in("/var/tmp", "sr-ov");
    qemu_img_create("qcow2", ov.path(), None, Some(2 * MIB));
    assert_eq!(
        msg(&n[1], "nope"),
        "Cannot find device='nope' nor node-name='nope'"
    );

    // An overlay with a backing node already.
    let with_backing = uniq("sr-wb");
    add_qcow2(
        &e,
        &with_backing,
        ov.path(),
        BackingSpec::Node(ChildSpec::Name(n[0].clone())),
    )
    .unwrap();
    assert_eq!(
        msg(&n[1], &with_backing),
        "The overlay already has a backing image"
    );
    e.del_node(&with_backing).unwrap();

    // An overlay a guest reads.
    let busy = uniq("sr-busy");
    add_qcow2(&e, &busy, ov.path(), BackingSpec::None).unwrap();
    let g = e.backend(&busy, &[], BackendOptions::default()).unwrap();
    assert_eq!(msg(&n[1], &busy), "The overlay is already in use");
    drop(g);

    // A cycle: the node onto itself.
    let err = e.snapshot(&busy, &busy).unwrap_err();
    assert_eq!(
        err.full_message(),
        format!("Making '{busy}' a backing child of '{busy}' would create a cycle")
    );
    e.del_node(&busy).unwrap();

    // A protocol node cannot have a backing file.
    let raw = uniq("sr-file");
    e.add_node(NodeSpec {
        node_name: Some(raw.clone()),
        read_only: false,
        driver: DriverSpec::File(FileOptions::new(ov.path())),
    })
    .unwrap();
    assert_eq!(
        msg(&n[1], &raw),
        "The overlay does not support backing images"
    );

    // Nothing changed.
    let top = e.node(&n[1]).unwrap();
    assert!(!top.is_read_only());
    assert_eq!(top.backing().unwrap().name(), n[0]);
}

#[test]
fn snapshot_of_a_node_a_job_owns_is_refused() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "sj", 3, 4 * MIB);
    let e = engine(1);
    let n = open_chain(&e, &imgs, "sj");
    let ov = Scratch::new_in("/var/tmp", "sj-ov");
    qemu_img_create("qcow2", ov.path(), None, Some(4 * MIB));
    let ovn = uniq("sj-overlay");
    add_qcow2(&e, &ovn, ov.path(), BackingSpec::None).unwrap();
    let mut a = StreamArgs::new(&n[2]);
    a.job.job_id = Some(uniq("sj-stream"));
    a.job.speed = 1;
    let job = e.stream(a).unwrap();
    assert_eq!(job.wait_for(JobStatus::Running), JobStatus::Running);
    let err = e.snapshot(&n[2], &ovn).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert_eq!(
        err.full_message(),
        format!(
            "Node '{}' is busy: block device is in use by block job: stream",
            n[2]
        )
    );
    job.set_speed(0).unwrap();
    assert_eq!(job.wait().error, None);
    // Once the job is gone the snapshot goes ahead, and the grown chain can be merged again.
    e.snapshot(&n[2], &ovn).unwrap();
    assert_eq!(e.node(&ovn).unwrap().backing().unwrap().name(), n[2]);
}

/// A snapshot reopens the old node read-only with the files that are a part of it (given
/// inline), not with a file node added on its own and referenced by name: as QEMU's reopen
/// queue takes only the children that inherit from the node, that one stays read-write.
/// Streaming into such a node later reopens it read-write again, its file unchanged.
#[test]
fn snapshot_reopens_only_the_files_that_are_part_of_the_node() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "sf", 2, 2 * MIB);
    let e = engine(1);
    // inline: a qcow2 node over an inline file; named: over a file node of its own.
    let inline = uniq("sf-inline");
    add_qcow2(&e, &inline, imgs[0].path(), BackingSpec::None).unwrap();
    let file = uniq("sf-file");
    e.add_node(NodeSpec {
        node_name: Some(file.clone()),
        read_only: false,
        driver: DriverSpec::File(FileOptions::new(imgs[1].path())),
    })
    .unwrap();
    let named = uniq("sf-named");
    e.add_node(NodeSpec {
        node_name: Some(named.clone()),
        read_only: false,
        driver: DriverSpec::Qcow2 {
            file: ChildSpec::Name(file.clone()),
            backing: BackingSpec::None,
            opts: Default::default(),
        },
    })
    .unwrap();
    let ro = |name: &str| {
        let n = e.node(name).unwrap();
        (n.is_read_only(), n.file().unwrap().is_read_only())
    };
    assert_eq!(ro(&inline), (false, false));
    assert_eq!(ro(&named), (false, false));
    let inline_file = e.node(&inline).unwrap().file().unwrap();
    assert_eq!(
        inline_file.inherits_from().map(|p| p.name().to_string()),
        Some(inline.clone())
    );
    assert!(e.node(&file).unwrap().inherits_from().is_none());

    let mut overlays = Vec::new();
    for (node, tag) in [(&inline, "sf-ov-inline"), (&named, "sf-ov-named")] {
        let ov = Scratch::new_in("/var/tmp", tag);
        qemu_img_create("qcow2", ov.path(), None, Some(2 * MIB));
        let ovn = uniq(tag);
        add_qcow2(&e, &ovn, ov.path(), BackingSpec::None).unwrap();
        e.snapshot(node, &ovn).unwrap();
        overlays.push((ov, ovn));
    }
    assert_eq!(
        ro(&inline),
        (true, true),
        "the inline file goes read-only too"
    );
    assert_eq!(
        ro(&named),
        (true, false),
        "the file node of its own stays read-write"
    );

    // A reopen of the old node read-write and back (as a job that writes it does) leaves its
    // file node alone too; a stream into the overlay then runs as usual.
    e.reopen(&named, false).unwrap();
    assert_eq!(ro(&named), (false, false));
    e.reopen(&named, true).unwrap();
    assert_eq!(ro(&named), (true, false));
    let mut a = StreamArgs::new(&overlays[1].1);
    a.job.job_id = Some(uniq("sf-stream"));
    assert_eq!(e.stream(a).unwrap().wait().error, None);
    drop(e);
    for (ov, _) in &overlays {
        assert_check_clean(ov.path());
    }
}
