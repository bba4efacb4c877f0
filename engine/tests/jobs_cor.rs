//! Copy-on-read: the stream job's filter serves guest reads straight from below (no copy; the
//! job copies everything itself), while a `copy-on-read` node added as such copies on every
//! read, as QEMU's does. Allocation in the top is checked with `qemu-io -c alloc` once the
//! engine has closed the images; content with `qemu-img convert`.

mod common;

use common::{assert_backing, assert_check_clean, default_engine, have_qemu, make_chain};
use common::{open_chain, qemu_allocated, qemu_backing, qemu_content, run_qemu_io, uniq, Scratch};
use engine::job::stream::StreamArgs;
use engine::job::JobStatus;
use engine::{BackendOptions, ChildSpec, DriverSpec, Engine, IoBuf, NodeSpec};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
/// Where the base holds data no image above shadows: the guest reads here.
const FAR: u64 = 12 * MIB;
const FAR_LEN: u64 = 4 * MIB;

/// A 3-image chain (see `make_chain`) whose base also holds `[FAR, FAR + FAR_LEN)`; returns
/// the images and the chain's content as QEMU reads it.
fn chain(tag: &str) -> (Vec<Scratch>, Vec<u8>) {
    let imgs = make_chain("/var/tmp", tag, 3, SIZE);
    let cmd = format!("write -P 0x5a {FAR} {FAR_LEN}");
    run_qemu_io("qcow2", imgs[0].path(), &[cmd]);
    let content = qemu_content(imgs[2].path());
    (imgs, content)
}

/// Reads `[off, off + len)` through `b` in 256 KiB requests and checks it against `expected`.
fn read_and_check(b: &engine::Backend, off: u64, len: u64, expected: &[u8]) {
    let step = 256 * 1024;
    let mut o = off;
    while o < off + len {
        let (r, buf) = b.read_blocking(o, IoBuf::new(step as usize));
        r.unwrap();
        assert!(
            buf[..] == expected[o as usize..(o + step) as usize],
            "the data read at {o}"
        );
        o += step;
    }
}

/// Starts a stream of the whole chain into the top, at 1 byte/s and paused at once, with the
/// guest's backend (made before, so the filter goes above it).
fn paused_stream(e: &Engine, top: &str) -> (engine::Backend, std::sync::Arc<engine::job::Job>) {
    let b = e.backend(top, &[], BackendOptions::default()).unwrap();
    let mut a = StreamArgs::new(top);
    a.job.job_id = Some(uniq("corstream"));
    a.job.speed = 1;
    let job = e.stream(a).unwrap();
    job.user_pause().unwrap();
    assert_eq!(job.wait_for(JobStatus::Paused), JobStatus::Paused);
    assert_eq!(
        b.root().driver_name(),
        "copy-on-read",
        "the guest reads through the filter"
    );
    (b, job)
}

/// A guest read during a stream is served from below and allocates nothing in the top: after
/// the job is cancelled, the range read is still not in the top.
#[test]
fn guest_reads_during_a_stream_do_not_copy() {
    if !have_qemu() {
        return;
    }
    let (imgs, expected) = chain("corsr");
    let top = imgs[2].path().to_string();
    assert_eq!(qemu_allocated(&top, FAR, FAR_LEN), 0);
    let e = default_engine();
    let names = open_chain(&e, &imgs, "corsr");
    let (b, job) = paused_stream(&e, &names[2]);
    read_and_check(&b, FAR, FAR_LEN, &expected);
    job.cancel(true).unwrap();
    let info = job.wait();
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
    assert_eq!(b.root().name(), names[2], "the filter is gone");
    // The top's block status in the engine, then on disk.
    let st = e
        .iothread(0)
        .unwrap()
        .block_on({
            let n = e.node(&names[2]).unwrap();
            move || async move { n.block_status(FAR, FAR_LEN).await }
        })
        .unwrap()
        .unwrap();
    assert_eq!(st.0, graph::BlockStatus::Unallocated, "{st:?}");
    drop(b);
    drop(e);
    assert_eq!(qemu_allocated(&top, FAR, FAR_LEN), 0, "a guest read copied");
    assert!(qemu_backing(&top).is_some());
    assert_eq!(qemu_content(&top), expected);
    assert_check_clean(&top);
}

/// Guest reads leave hints; the job, resumed, copies the hinted clusters and everything else:
/// the top ends standalone with the chain's content.
#[test]
fn a_stream_after_guest_reads_copies_everything() {
    if !have_qemu() {
        return;
    }
    let (imgs, expected) = chain("corsh");
    let top = imgs[2].path().to_string();
    let e = default_engine();
    let names = open_chain(&e, &imgs, "corsh");
    let (b, job) = paused_stream(&e, &names[2]);
    read_and_check(&b, FAR, FAR_LEN, &expected);
    read_and_check(&b, 0, MIB, &expected);
    job.set_speed(0).unwrap();
    job.user_resume().unwrap();
    let info = job.wait();
    assert_eq!(info.error, None, "{info:?}");
    assert_eq!(info.current_progress, SIZE);
    read_and_check(&b, 0, SIZE, &expected);
    drop(b);
    drop(e);
    assert_backing(&top, None);
    assert_eq!(qemu_content(&top), expected);
    assert_check_clean(&top);
}

/// A `copy-on-read` node added as such copies what a read finds below into its child, and
/// nothing it does not read.
#[test]
fn a_copy_on_read_node_copies_on_reads() {
    if !have_qemu() {
        return;
    }
    let (imgs, expected) = chain("corn");
    let top = imgs[2].path().to_string();
    let e = default_engine();
    let names = open_chain(&e, &imgs, "corn");
    let cor = uniq("corn-cor");
    e.add_node(NodeSpec {
        node_name: Some(cor.clone()),
        read_only: false,
        driver: DriverSpec::CopyOnRead {
            file: ChildSpec::Name(names[2].clone()),
            bottom: None,
        },
    })
    .unwrap();
    let b = e.backend(&cor, &[], BackendOptions::default()).unwrap();
    read_and_check(&b, FAR, MIB, &expected);
    drop(b);
    drop(e);
    assert_eq!(
        qemu_allocated(&top, FAR, MIB),
        MIB,
        "the read was copied into the top"
    );
    assert_eq!(qemu_allocated(&top, FAR + MIB, FAR_LEN - MIB), 0);
    assert!(qemu_backing(&top).is_some());
    assert_eq!(qemu_content(&top), expected);
    assert_check_clean(&top);
}
