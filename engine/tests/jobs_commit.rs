//! block-commit, intermediate and active: results checked with qemu-img (content, backing
//! files, consistency), QEMU's argument errors, READY / complete / cancel semantics, and guest
//! writes during an active commit.

mod common;

use std::sync::Arc;

use common::{
    assert_all_clean, assert_backing, assert_check_clean, default_engine, have_qemu, make_chain,
    open_chain, qemu_content, qemu_img_create, run_qemu_io, uniq,
};
use engine::job::commit::CommitArgs;
use engine::job::{JobEventKind, JobStatus};
use engine::{BackendOptions, ErrorKind, IoBuf};

const MIB: u64 = 1 << 20;

#[test]
fn intermediate_commit_cuts_the_images_out() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "ci", 4, 4 * MIB);
    let before = qemu_content(imgs[3].path());
    let mid = qemu_content(imgs[2].path());
    let e = default_engine();
    let n = open_chain(&e, &imgs, "ci");
    let mut a = CommitArgs::new(&n[3]);
    a.top_node = Some(n[2].clone());
    a.base_node = Some(n[0].clone());
    let job = e.commit(a).unwrap();
    let info = job.wait();
    assert_eq!(info.error, None);
    let top = e.node(&n[3]).unwrap();
    assert_eq!(top.backing().unwrap().name(), n[0]);
    assert!(!top.is_read_only());
    assert!(
        e.node(&n[0]).unwrap().is_read_only(),
        "base reopened read-only"
    );
    assert!(e.node(&n[2]).unwrap().parents().is_empty(), "top cut out");
    drop(top);
    drop(e);
    assert_backing(imgs[3].path(), Some(imgs[0].path()));
    assert_all_clean(&imgs);
    assert_eq!(qemu_content(imgs[3].path()), before);
    // Base reads as image 2's chain did: images 1 and 2 went into it.
    assert_eq!(qemu_content(imgs[0].path()), mid);
}

#[test]
fn commit_by_file_names() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "cf", 3, 2 * MIB);
    let before = qemu_content(imgs[2].path());
    let e = default_engine();
    let n = open_chain(&e, &imgs, "cf");
    let mut a = CommitArgs::new(&n[2]);
    a.top = Some(imgs[1].path().to_string());
    a.base = Some(imgs[0].path().to_string());
    a.backing_file = Some(imgs[0].path().to_string());
    assert_eq!(e.commit(a).unwrap().wait().error, None);
    drop(e);
    assert_backing(imgs[2].path(), Some(imgs[0].path()));
    assert_eq!(qemu_content(imgs[2].path()), before);
}

#[test]
fn commit_argument_errors_have_qemus_texts() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "ce", 3, 2 * MIB);
    let e = default_engine();
    let n = open_chain(&e, &imgs, "ce");
    let err = |f: &dyn Fn(&mut CommitArgs)| {
        let mut a = CommitArgs::new(&n[2]);
        a.job.job_id = Some("c".into());
        f(&mut a);
        e.commit(a).unwrap_err()
    };
    let missing = err(&|a| a.device = "nope".into());
    assert_eq!(missing.kind(), ErrorKind::DeviceNotFound);
    assert_eq!(missing.full_message(), "Device 'nope' not found");
    let msg = |f: &dyn Fn(&mut CommitArgs)| err(f).full_message();
    assert_eq!(
        msg(&|a| {
            a.top = Some("x".into());
            a.top_node = Some(n[1].clone());
        }),
        "'top-node' and 'top' are mutually exclusive"
    );
    assert_eq!(
        msg(&|a| a.top = Some("/no/such.qcow2".into())),
        "Top image file /no/such.qcow2 not found"
    );
    assert_eq!(
        msg(&|a| {
            a.base = Some("x".into());
            a.base_node = Some(n[0].clone());
        }),
        "'base-node' and 'base' are mutually exclusive"
    );
    assert_eq!(
        msg(&|a| {
            a.top_node = Some(n[1].clone());
            a.base_node = Some(n[2].clone());
        }),
        format!("'{}' is not in this backing file chain", n[2])
    );
    assert_eq!(
        msg(&|a| a.base = Some("/no/base.qcow2".into())),
        "Can't find '/no/base.qcow2' in the backing chain"
    );
    assert_eq!(
        msg(&|a| {
            a.top_node = Some(n[0].clone());
        }),
        "There is no backimg image"
    );
    assert_eq!(
        msg(&|a| {
            a.top_node = Some(n[1].clone());
            a.base_node = Some(n[1].clone());
        }),
        "cannot commit an image into itself"
    );
    assert_eq!(
        msg(&|a| a.backing_file = Some("x".into())),
        "'backing-file' specified, but 'top' is the active layer"
    );
    // The device must be a root node (QEMU's qmp_get_root_bs): the middle image has the top
    // image above it.
    assert_eq!(msg(&|a| a.device = n[1].clone()), "Need a root block node");
    assert!(e.jobs().list().is_empty());
    for name in &n {
        let node = e.node(name).unwrap();
        assert!(node.children().iter().all(|c| !c.is_frozen()));
        assert!(
            node.parents().iter().all(|p| p.parent().node().is_some()),
            "no job edges left"
        );
    }
}

/// Writes `pattern` at `off` through the backend.
fn write(b: &engine::Backend, off: u64, len: usize, pattern: u8) {
    let (r, _) = b.write_blocking(off, IoBuf::from_slice(&vec![pattern; len]));
    r.unwrap();
}

#[test]
fn active_commit_ready_complete_pivots_the_guest_to_base() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "ca", 3, 4 * MIB);
    let e = default_engine();
    let n = open_chain(&e, &imgs, "ca");
    let guest = e.backend(&n[2], &[], BackendOptions::default()).unwrap();
    let events = e.jobs().subscribe();
    let mut a = CommitArgs::new(&n[2]);
    a.job.job_id = Some(uniq("active"));
    let job = e.commit(a).unwrap();
    // Guest writes while the job copies.
    for i in 0..32u64 {
        write(&guest, i * 96 * 1024, 4096, 0xA0 + (i % 16) as u8);
    }
    assert_eq!(job.wait_for(JobStatus::Ready), JobStatus::Ready);
    for i in 0..16u64 {
        write(&guest, 3 * MIB + i * 8192, 4096, 0xEE);
    }
    // What the guest sees now is what base must hold after the pivot.
    let (r, expect) = guest.read_blocking(0, IoBuf::new(4 * MIB as usize));
    r.unwrap();
    job.complete().unwrap();
    let info = job.wait();
    assert_eq!(info.error, None, "{info:?}");
    assert_eq!(guest.root().name(), n[0], "the guest now uses base");
    assert!(!guest.root().is_read_only());
    let (r, got) = guest.read_blocking(0, IoBuf::new(4 * MIB as usize));
    r.unwrap();
    assert!(got[..] == expect[..]);
    let kinds: Vec<JobEventKind> = events.try_iter().map(|e| e.kind).collect();
    assert!(kinds
        .iter()
        .any(|k| matches!(k, JobEventKind::Ready { .. })));
    assert!(kinds
        .iter()
        .any(|k| matches!(k, JobEventKind::Completed { error: None, .. })));
    drop(guest);
    drop(e);
    assert_check_clean(imgs[0].path());
    assert_eq!(qemu_content(imgs[0].path()), &expect[..]);
}

#[test]
fn active_commit_soft_cancel_after_ready_keeps_both_chains() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "cc", 3, 4 * MIB);
    let e = default_engine();
    let n = open_chain(&e, &imgs, "cc");
    let guest = e.backend(&n[2], &[], BackendOptions::default()).unwrap();
    let events = e.jobs().subscribe();
    let mut a = CommitArgs::new(&n[2]);
    a.job.job_id = Some(uniq("soft"));
    let job = e.commit(a).unwrap();
    assert_eq!(job.wait_for(JobStatus::Ready), JobStatus::Ready);
    write(&guest, MIB, 8192, 0x5A);
    let (r, at_cancel) = guest.read_blocking(0, IoBuf::new(4 * MIB as usize));
    r.unwrap();
    job.cancel(false).unwrap();
    let info = job.wait();
    assert_eq!(info.error, None);
    let kinds: Vec<JobEventKind> = events.try_iter().map(|e| e.kind).collect();
    assert!(kinds
        .iter()
        .any(|k| matches!(k, JobEventKind::Completed { error: None, .. })));
    assert!(!kinds
        .iter()
        .any(|k| matches!(k, JobEventKind::Cancelled { .. })));
    assert_eq!(guest.root().name(), n[2], "no pivot");
    assert!(e.node(&n[0]).unwrap().is_read_only());
    drop(guest);
    drop(e);
    assert_all_clean(&imgs);
    // Both chains valid: the top chain reads as at the cancel, and base is a copy of it.
    assert_eq!(qemu_content(imgs[2].path()), &at_cancel[..]);
    assert_eq!(qemu_content(imgs[0].path()), &at_cancel[..]);
}

#[test]
fn active_commit_force_cancel_leaves_the_chain_as_it_was() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "cx", 3, 8 * MIB);
    let before = qemu_content(imgs[2].path());
    let e = default_engine();
    let n = open_chain(&e, &imgs, "cx");
    let mut a = CommitArgs::new(&n[2]);
    a.job.job_id = Some(uniq("force"));
    a.job.speed = 1;
    let job = e.commit(a).unwrap();
    // Refused: complete before READY.
    assert_eq!(
        job.complete().unwrap_err().full_message(),
        format!(
            "Job '{}' in state 'running' cannot accept command verb 'complete'",
            job.id()
        )
    );
    job.cancel(true).unwrap();
    let info = job.wait();
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
    let top = e.node(&n[2]).unwrap();
    assert!(top.parents().is_empty(), "the filter is gone");
    assert_eq!(top.backing().unwrap().name(), n[1]);
    drop(top);
    drop(e);
    assert_eq!(qemu_content(imgs[2].path()), before);
    assert_all_clean(&imgs);
}

#[test]
fn job_verbs_follow_the_state_table() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "cv", 2, 8 * MIB);
    let e = default_engine();
    let n = open_chain(&e, &imgs, "cv");
    let mut a = CommitArgs::new(&n[1]);
    a.job.job_id = Some(uniq("verbs"));
    a.job.speed = 64 * 1024;
    a.job.auto_finalize = false;
    a.job.auto_dismiss = false;
    let job = e.commit(a).unwrap();
    assert_eq!(
        job.user_resume().unwrap_err().full_message(),
        "Can't resume a job that was not paused"
    );
    job.user_pause().unwrap();
    assert_eq!(
        job.user_pause().unwrap_err().full_message(),
        "Job is already paused"
    );
    assert_eq!(job.wait_for(JobStatus::Paused), JobStatus::Paused);
    assert!(job.info().paused);
    job.user_resume().unwrap();
    assert_eq!(
        job.set_speed(-1).unwrap_err().full_message(),
        "Parameter 'speed' expects a non-negative value"
    );
    job.set_speed(0).unwrap();
    assert_eq!(job.wait_for(JobStatus::Ready), JobStatus::Ready);
    assert_eq!(
        job.finalize().unwrap_err().full_message(),
        format!(
            "Job '{}' in state 'ready' cannot accept command verb 'finalize'",
            job.id()
        )
    );
    job.complete().unwrap();
    assert_eq!(job.wait_for(JobStatus::Pending), JobStatus::Pending);
    assert_eq!(
        job.dismiss().unwrap_err().full_message(),
        format!(
            "Job '{}' in state 'pending' cannot accept command verb 'dismiss'",
            job.id()
        )
    );
    job.finalize().unwrap();
    assert_eq!(job.wait().status, JobStatus::Concluded);
    assert!(e.jobs().get(job.id()).is_ok());
    job.dismiss().unwrap();
    assert!(e.jobs().get(job.id()).is_err());
    let _ = Arc::clone(&job);
}

/// A chain whose base (1 MiB) is shorter than the images above it (4 MiB), with data above
/// the base's end in the middle image and a stretch above the base's end left unallocated
/// everywhere (it must read as zeroes after the commit, as before it).
fn short_base_chain(tag: &str) -> Vec<common::Scratch> {
    let imgs: Vec<common::Scratch> = (0..3)
        .map(|i| common::Scratch::new_in("/var/tmp", &format!("{tag}{i}")))
        .collect();
    qemu_img_create("qcow2", imgs[0].path(), None, Some(MIB));
    for i in 1..3 {
        let backing = Some((imgs[i - 1].path(), "qcow2"));
        qemu_img_create("qcow2", imgs[i].path(), backing, Some(4 * MIB));
    }
    let io = |img: &common::Scratch, cmd: &str| {
        run_qemu_io("qcow2", img.path(), &[cmd]);
    };
    io(&imgs[0], "write -P 1 0 1M");
    io(&imgs[1], "write -P 2 512k 1M");
    io(&imgs[1], "write -P 3 3M 256k");
    io(&imgs[2], "write -P 4 2M 64k");
    imgs
}

#[test]
fn intermediate_commit_grows_a_shorter_base_first() {
    if !have_qemu() {
        return;
    }
    let imgs = short_base_chain("cg");
    let before = qemu_content(imgs[2].path());
    let mid = qemu_content(imgs[1].path());
    let e = default_engine();
    let n = open_chain(&e, &imgs, "cg");
    let mut a = CommitArgs::new(&n[2]);
    a.top_node = Some(n[1].clone());
    a.base_node = Some(n[0].clone());
    assert_eq!(e.commit(a).unwrap().wait().error, None);
    assert_eq!(e.node(&n[0]).unwrap().len(), 4 * MIB, "base grown");
    drop(e);
    for i in [&imgs[0], &imgs[2]] {
        assert_check_clean(i.path());
    }
    assert_eq!(qemu_content(imgs[2].path()), before);
    assert_eq!(qemu_content(imgs[0].path()), mid);
}

#[test]
fn active_commit_grows_a_shorter_base_first() {
    if !have_qemu() {
        return;
    }
    let imgs = short_base_chain("cag");
    let before = qemu_content(imgs[2].path());
    let e = default_engine();
    let n = open_chain(&e, &imgs, "cag");
    let guest = e.backend(&n[2], &[], BackendOptions::default()).unwrap();
    let mut a = CommitArgs::new(&n[2]);
    a.job.job_id = Some(uniq("activegrow"));
    let job = e.commit(a).unwrap();
    assert_eq!(job.wait_for(JobStatus::Ready), JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait().error, None);
    assert_eq!(guest.root().name(), n[0]);
    assert_eq!(guest.root().len(), 4 * MIB, "base grown");
    drop(guest);
    drop(e);
    assert_check_clean(imgs[0].path());
    assert_eq!(qemu_content(imgs[0].path()), before);
}

#[test]
fn reopen_goes_through_a_filter_to_the_file() {
    if !have_qemu() {
        return;
    }
    use engine::drivers::blkdebug::BlkdebugOptions;
    use engine::drivers::file::FileOptions;
    use engine::{BackingSpec, ChildSpec, DriverSpec, NodeSpec};
    let imgs = make_chain("/var/tmp", "rf", 1, MIB);
    let e = default_engine();
    let name = uniq("rf");
    let file = NodeSpec {
        node_name: None,
        read_only: true,
        driver: DriverSpec::File(FileOptions::new(imgs[0].path())),
    };
    let dbg = NodeSpec {
        node_name: None,
        read_only: true,
        driver: DriverSpec::Blkdebug {
            image: ChildSpec::Spec(Box::new(file)),
            opts: BlkdebugOptions::default(),
        },
    };
    e.add_node(NodeSpec {
        node_name: Some(name.clone()),
        read_only: true,
        driver: DriverSpec::Qcow2 {
            file: ChildSpec::Spec(Box::new(dbg)),
            backing: BackingSpec::None,
            opts: Default::default(),
        },
    })
    .unwrap();
    let files = |n: &engine::Node| {
        let d = n.file().unwrap();
        let f = d.filtered().unwrap();
        (d.is_read_only(), f.is_read_only())
    };
    let node = e.node(&name).unwrap();
    assert_eq!(files(&node), (true, true));
    e.reopen(&name, false).unwrap();
    assert!(!node.is_read_only());
    assert_eq!(
        files(&node),
        (false, false),
        "filter and file reopened read-write"
    );
    let g = e.backend(&name, &[], BackendOptions::default()).unwrap();
    write(&g, 0, 4096, 0x5A);
    drop(g);
    e.reopen(&name, true).unwrap();
    assert_eq!(files(&node), (true, true));
}

/// An image that grew while writable is cut back to its end when reopened read-only (a
/// commit's base, a snapshot's old active layer), not only when closed: a read-only node can
/// no longer cut its file, and the preallocated tail would stay for good.
#[test]
fn reopening_read_only_cuts_the_preallocated_tail() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "rt", 2, 32 * MIB);
    let e = default_engine();
    let n = open_chain(&e, &imgs, "rt");
    let g = e.backend(&n[1], &[], BackendOptions::default()).unwrap();
    for i in 0..16u64 {
        let (r, _) = g.write_blocking(i * MIB, IoBuf::from_slice(&vec![7u8; MIB as usize]));
        r.unwrap();
    }
    g.flush_blocking().unwrap();
    let grown = std::fs::metadata(imgs[1].path()).unwrap().len();
    drop(g);
    e.reopen(&n[1], true).unwrap();
    let end = common::qemu_image_end(imgs[1].path());
    assert!(
        grown > end,
        "preallocated while writable ({grown} <= {end})"
    );
    assert_eq!(std::fs::metadata(imgs[1].path()).unwrap().len(), end);
    drop(e);
    assert_check_clean(imgs[1].path());
}
