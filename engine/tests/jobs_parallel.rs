//! QEMU iotest 030's TestParallelOps on the engine API: a 9-image chain (img-0 raw,
//! img-1..8 qcow2, 16 MiB) with data in the odd images; parallel streams, the refusals of
//! overlapping jobs, stream plus commit, and the base-node errors. qemu-img and qemu-io are
//! the oracles for the images afterwards.

mod common;

use std::sync::Arc;

use common::{
    assert_all_clean, assert_backing, default_engine, have_qemu, open_chain_named, qemu_content,
    qemu_img_create, qemu_io_map, run_qemu_io, run_tool, uniq, Scratch,
};
use engine::job::commit::CommitArgs;
use engine::job::stream::StreamArgs;
use engine::job::{Job, JobStatus};
use engine::{Engine, ErrorKind};

const MIB: u64 = 1 << 20;
const NUM_OPS: usize = 4;
const NUM_IMGS: usize = NUM_OPS * 2 + 1;
const IMAGE_LEN: u64 = NUM_OPS as u64 * 4 * MIB;

/// The chain and an engine with it open as node0..node8 (node8 is the active layer,
/// "drive0").
struct Chain {
    imgs: Vec<Scratch>,
    names: Vec<String>,
    e: Engine,
}

/// Builds the images as 030's setUp does.
fn make_images(dir: &str) -> Vec<Scratch> {
    let mut imgs = Vec::new();
    let base = Scratch::new_in(dir, "par0").with_pattern(IMAGE_LEN as usize);
    imgs.push(base);
    for i in 1..NUM_IMGS {
        let s = Scratch::new_in(dir, &format!("par{i}"));
        let fmt = if i == 1 { "raw" } else { "qcow2" };
        qemu_img_create("qcow2", s.path(), Some((imgs[i - 1].path(), fmt)), None);
        imgs.push(s);
    }
    // Data in the odd images, alternating 2 and 4 MiB so jobs finish out of order.
    let odd: Vec<usize> = (0..NUM_IMGS).rev().filter(|x| x % 2 == 1).collect();
    for (i, &idx) in odd.iter().enumerate() {
        let mb = 2 + 2 * (i % 2);
        let cmd = format!("write -P 0xFF {}M {}M", i * 4, mb);
        run_qemu_io("qcow2", imgs[idx].path(), &[cmd]);
    }
    imgs
}

impl Chain {
    fn new() -> Option<Chain> {
        if !have_qemu() {
            return None;
        }
        let imgs = make_images("/var/tmp");
        Some(Chain::open(imgs))
    }

    fn open(imgs: Vec<Scratch>) -> Chain {
        let p = uniq("p");
        let names: Vec<String> = (0..NUM_IMGS).map(|i| format!("{p}node{i}")).collect();
        let e = default_engine();
        open_chain_named(&e, &imgs, &names, true);
        Chain { imgs, names, e }
    }

    fn node(&self, i: usize) -> &str {
        &self.names[i]
    }

    fn img(&self, i: usize) -> &str {
        self.imgs[i].path()
    }

    fn drive0(&self) -> &str {
        self.node(NUM_IMGS - 1)
    }

    fn stream(&self, f: impl FnOnce(&mut StreamArgs)) -> engine::Result<Arc<Job>> {
        let mut a = StreamArgs::new("");
        f(&mut a);
        self.e.stream(a)
    }

    fn commit(&self, f: impl FnOnce(&mut CommitArgs)) -> engine::Result<Arc<Job>> {
        let mut a = CommitArgs::new(self.drive0());
        f(&mut a);
        self.e.commit(a)
    }

    /// Closes the engine (flushing everything) and hands back the images.
    fn close(self) -> Vec<Scratch> {
        assert!(self.e.jobs().list().is_empty(), "no active block jobs");
        drop(self.e);
        self.imgs
    }
}

fn assert_busy(r: engine::Result<Arc<Job>>) {
    let e = r.expect_err("the job should be refused");
    assert_eq!(e.kind(), ErrorKind::Busy, "{}", e.full_message());
    assert!(
        e.full_message()
            .contains("is busy: block device is in use by block job"),
        "{}",
        e.full_message()
    );
}

fn ok(job: &Arc<Job>) {
    let info = job.wait();
    assert_eq!(info.error, None, "job {}", info.id);
}

/// `qemu-img check` of every qcow2 image (all but the raw base).
fn check_all(imgs: &[Scratch]) {
    assert_all_clean(&imgs[1..]);
}

#[test]
fn stream_parallel() {
    let Some(c) = Chain::new() else { return };
    for i in (2..NUM_IMGS).step_by(2) {
        assert_ne!(
            qemu_io_map(c.img(i)),
            qemu_io_map(c.img(i - 1)),
            "maps differ before"
        );
    }
    let before = qemu_content(c.img(NUM_IMGS - 1));
    let mut jobs = Vec::new();
    for i in (2..NUM_IMGS).step_by(2) {
        let (dev, bottom) = (c.node(i).to_string(), c.node(i - 1).to_string());
        jobs.push(
            c.stream(|a| {
                a.device = dev;
                a.job.job_id = Some(format!("stream-node{i}"));
                a.bottom = Some(bottom);
                a.job.speed = 1024 * 1024;
            })
            .unwrap(),
        );
    }
    for j in &jobs {
        ok(j);
    }
    let imgs = c.close();
    for i in (2..NUM_IMGS).step_by(2) {
        assert_eq!(
            qemu_io_map(imgs[i].path()),
            qemu_io_map(imgs[i - 1].path()),
            "maps match after"
        );
    }
    check_all(&imgs);
    assert_eq!(qemu_content(imgs[NUM_IMGS - 1].path()), before);
}

#[test]
fn overlapping_1() {
    let Some(c) = Chain::new() else { return };
    let img1 = c.img(1).to_string();
    let stream = c
        .stream(|a| {
            a.device = c.node(4).into();
            a.job.job_id = Some("stream-node4".into());
            a.base = Some(img1);
            a.job.speed = 1024 * 1024;
        })
        .unwrap();
    assert_busy(c.stream(|a| {
        a.device = c.node(5).into();
        a.job.job_id = Some("stream-node5".into());
        a.base = Some(c.img(2).into());
    }));
    assert_busy(c.stream(|a| {
        a.device = c.node(3).into();
        a.job.job_id = Some("stream-node3".into());
        a.base = Some(c.img(2).into());
    }));
    assert_busy(c.stream(|a| {
        a.device = c.node(4).into();
        a.job.job_id = Some("stream-node4-v2".into());
    }));
    // block-commit fails too if it touches nodes the stream job uses.
    assert_busy(c.commit(|a| {
        a.base = Some(c.img(4).into());
        a.job.job_id = Some("commit-node4".into());
    }));
    assert_busy(c.commit(|a| {
        a.base = Some(c.img(1).into());
        a.top = Some(c.img(3).into());
        a.job.job_id = Some("commit-node1".into());
    }));
    // This one needs to rewrite node2's backing file, and node2 is the stream's.
    assert_busy(c.commit(|a| {
        a.base = Some(c.img(0).into());
        a.top = Some(c.img(1).into());
        a.job.job_id = Some("commit-node0".into());
    }));
    stream.set_speed(0).unwrap();
    ok(&stream);
    check_all(&c.close());
}

#[test]
fn overlapping_2() {
    let Some(c) = Chain::new() else { return };
    let before = qemu_content(c.img(NUM_IMGS - 1));
    let commit = c
        .commit(|a| {
            a.top = Some(c.img(5).into());
            a.base = Some(c.img(3).into());
            a.job.job_id = Some("commit-node3".into());
            a.job.speed = 1024 * 1024;
        })
        .unwrap();
    let s = |dev: usize, base: Option<usize>, id: &str| {
        c.stream(|a| {
            a.device = c.node(dev).into();
            a.base = base.map(|b| c.img(b).to_string());
            a.job.job_id = Some(id.into());
        })
    };
    // As QEMU's op blockers: the first node from the device down that the commit owns is
    // named. The commit owns node5 down to node3, but not its filter (between node6, top's
    // overlay, and node5).
    let busy = |r: engine::Result<Arc<Job>>, node: usize| {
        let e = r.expect_err("the job should be refused");
        assert_eq!(e.kind(), ErrorKind::Busy, "{}", e.full_message());
        assert_eq!(
            e.full_message(),
            format!(
                "Node '{}' is busy: block device is in use by block job: commit",
                c.node(node)
            )
        );
    };
    busy(s(3, None, "stream-node3"), 3);
    busy(s(6, Some(2), "stream-node6"), 5);
    busy(s(4, Some(2), "stream-node4"), 4);
    busy(s(6, Some(4), "stream-node6-v2"), 5);
    // node7 down to node6 are free, but the stream would freeze node6's link into the filter.
    let filter = c.e.node(c.node(6)).unwrap().backing().unwrap();
    assert_eq!(filter.driver_name(), "commit");
    let err = s(7, Some(5), "stream-node6-v3").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Frozen);
    assert_eq!(
        err.full_message(),
        format!("Cannot freeze 'backing' link to '{}'", filter.name())
    );
    drop(filter);
    // The commit owns the active layer even though it does not write it.
    busy(s(8, Some(5), "stream-drive0"), NUM_IMGS - 1);
    commit.set_speed(0).unwrap();
    ok(&commit);
    let e = &c.e;
    assert_eq!(
        e.node(c.node(6)).unwrap().backing().unwrap().name(),
        c.node(3)
    );
    let imgs = c.close();
    assert_backing(imgs[6].path(), Some(imgs[3].path()));
    check_all(&imgs);
    assert_eq!(qemu_content(imgs[NUM_IMGS - 1].path()), before);
}

#[test]
fn overlapping_3() {
    let Some(c) = Chain::new() else { return };
    let before = qemu_content(c.img(NUM_IMGS - 1));
    let commit = c
        .commit(|a| {
            a.base = Some(c.img(3).into());
            a.job.job_id = Some("commit-drive0".into());
            a.job.speed = 1024 * 1024;
        })
        .unwrap();
    assert_busy(c.stream(|a| {
        a.device = c.node(5).into();
        a.base = Some(c.img(3).into());
        a.job.job_id = Some("stream-node6".into());
    }));
    commit.set_speed(0).unwrap();
    assert_eq!(commit.wait_for(JobStatus::Ready), JobStatus::Ready);
    commit.complete().unwrap();
    ok(&commit);
    let imgs = c.close();
    check_all(&imgs);
    assert_eq!(qemu_content(imgs[3].path()), before);
}

#[test]
fn overlapping_4_stream_base_is_the_commit_top_refused() {
    let Some(c) = Chain::new() else { return };
    let filter = uniq("commit-filter");
    let commit = c
        .commit(|a| {
            a.top = Some(c.img(2).into());
            a.base = Some(c.img(0).into());
            a.job.filter_node_name = Some(filter.clone());
            a.job.speed = 1024 * 1024;
        })
        .unwrap();
    // The stream's chain ends at the commit's filter (between node3 and node2): the commit
    // does not own it, but no job may freeze a link into it (QEMU's never_freeze).
    let err = c
        .stream(|a| {
            a.device = c.node(4).into();
            a.base_node = Some(c.node(2).into());
            a.job.job_id = Some("node4".into());
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Frozen);
    assert_eq!(
        err.full_message(),
        format!("Cannot freeze 'backing' link to '{filter}'")
    );
    // Nothing changed: node4 is still read-only, no job; its links are not left frozen (the
    // commit below changes node3's link into the filter when it completes).
    assert!(c.e.node(c.node(4)).unwrap().is_read_only());
    assert!(c.e.jobs().list().iter().all(|j| j.id() != "node4"));
    commit.set_speed(0).unwrap();
    ok(&commit);
    assert_eq!(
        c.e.node(c.node(3)).unwrap().backing().unwrap().name(),
        c.node(0)
    );
    check_all(&c.close());
}

/// 030's overlapping_5: the stream's base is the commit's filter node. The stream does not
/// depend on its base, so both finish, in whichever order, and node4's backing is node0.
fn overlapping_5_on(c: Chain, delays: Option<&mut dyn FnMut() -> u64>) -> Vec<Scratch> {
    let before = qemu_content(c.img(NUM_IMGS - 1));
    let filter = uniq("commit-filter");
    let commit = c
        .commit(|a| {
            a.top_node = Some(c.node(2).into());
            a.base_node = Some(c.node(0).into());
            a.job.filter_node_name = Some(filter.clone());
            a.job.speed = 1024 * 1024;
        })
        .unwrap();
    let stream = c
        .stream(|a| {
            a.device = c.node(4).into();
            a.base_node = Some(filter.clone());
            a.job.job_id = Some(uniq("node4"));
        })
        .unwrap();
    if let Some(d) = delays {
        c.e.jobs().set_completion_delay(commit.id(), d());
        c.e.jobs().set_completion_delay(stream.id(), d());
    }
    commit.set_speed(0).unwrap();
    ok(&commit);
    ok(&stream);
    let e = &c.e;
    assert_eq!(
        e.node(c.node(4)).unwrap().backing().unwrap().name(),
        c.node(0)
    );
    assert_eq!(
        e.node(c.node(3)).unwrap().backing().unwrap().name(),
        c.node(0)
    );
    assert!(c.e.node(&filter).is_err(), "the commit filter is gone");
    let imgs = c.close();
    assert_backing(imgs[4].path(), Some(imgs[0].path()));
    assert_eq!(qemu_content(imgs[NUM_IMGS - 1].path()), before);
    imgs
}

#[test]
fn overlapping_5() {
    let Some(c) = Chain::new() else { return };
    let imgs = overlapping_5_on(c, None);
    check_all(&imgs);
}

fn stream_commit(slow: bool) {
    let Some(c) = Chain::new() else { return };
    let before = qemu_content(c.img(NUM_IMGS - 1));
    let speed = if slow { 1024 * 1024 } else { 0 };
    let stream = c
        .stream(|a| {
            a.device = c.node(2).into();
            a.base_node = Some(c.node(0).into());
            a.job.job_id = Some("node2".into());
            a.job.speed = speed;
        })
        .unwrap();
    let commit = c
        .commit(|a| {
            a.base = Some(c.img(3).into());
            a.job.job_id = Some("drive0".into());
            a.job.speed = speed;
        })
        .unwrap();
    if slow {
        stream.set_speed(0).unwrap();
        commit.set_speed(0).unwrap();
    }
    assert_eq!(commit.wait_for(JobStatus::Ready), JobStatus::Ready);
    commit.complete().unwrap();
    ok(&commit);
    ok(&stream);
    assert_eq!(
        c.e.node(c.node(2)).unwrap().backing().unwrap().name(),
        c.node(0)
    );
    let imgs = c.close();
    check_all(&imgs);
    assert_eq!(qemu_content(imgs[3].path()), before);
}

#[test]
fn stream_commit_1() {
    stream_commit(false);
}

#[test]
fn stream_commit_2() {
    stream_commit(true);
}

#[test]
fn stream_base_node_name() {
    let Some(c) = Chain::new() else { return };
    assert_ne!(qemu_io_map(c.img(4)), qemu_io_map(c.img(3)));
    let s = |base: Option<usize>, base_node: Option<&str>| {
        c.stream(|a| {
            a.device = c.node(4).into();
            a.base = base.map(|b| c.img(b).to_string());
            a.base_node = base_node.map(str::to_string);
            a.job.job_id = Some("stream".into());
        })
    };
    // The base node does not exist (looked up as a node only).
    assert_eq!(
        s(None, Some("none")).unwrap_err().full_message(),
        "Cannot find device='' nor node-name='none'"
    );
    // The base node is not a backing file of the top node.
    assert_eq!(
        s(None, Some(c.node(6))).unwrap_err().full_message(),
        format!(
            "Node '{}' is not a backing image of '{}'",
            c.node(6),
            c.node(4)
        )
    );
    // The base node is the top node.
    assert_eq!(
        s(None, Some(c.node(4))).unwrap_err().full_message(),
        format!("Node '{0}' is not a backing image of '{0}'", c.node(4))
    );
    // 'base' and 'base-node' at once.
    assert_eq!(
        s(Some(2), Some(c.node(2))).unwrap_err().full_message(),
        "'base' and 'base-node' cannot be specified at the same time"
    );
    ok(&s(None, Some(c.node(2))).unwrap());
    let imgs = c.close();
    assert_eq!(qemu_io_map(imgs[4].path()), qemu_io_map(imgs[3].path()));
    check_all(&imgs);
}

/// overlapping_5 with random delays before each job's completion, so the two completions
/// run in every order and at every distance: `rounds` rounds on copies of one chain.
fn overlapping_5_rounds(rounds: usize) {
    if !have_qemu() {
        return;
    }
    let template = make_images("/var/tmp");
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % 20_000
    };
    for _ in 0..rounds {
        let imgs: Vec<Scratch> = template
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let s = Scratch::new_in("/var/tmp", &format!("o5r{i}"));
                std::fs::copy(&t.0, &s.0).unwrap();
                s
            })
            .collect();
        // Each copy's backing file names must point at the copies.
        for i in 1..NUM_IMGS {
            let fmt = if i == 1 { "raw" } else { "qcow2" };
            run_tool(&[
                "qemu-img",
                "rebase",
                "-u",
                "-b",
                imgs[i - 1].path(),
                "-F",
                fmt,
                imgs[i].path(),
            ]);
        }
        let c = Chain::open(imgs);
        let mut d = &mut rnd;
        overlapping_5_on(c, Some(&mut d));
    }
}

#[test]
fn overlapping_5_random_delays() {
    overlapping_5_rounds(200);
}

#[test]
#[ignore = "stress: 10,000 rounds (minutes); run with --ignored"]
fn overlapping_5_random_delays_stress() {
    overlapping_5_rounds(10_000);
}
