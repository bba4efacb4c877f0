//! block-stream: results checked with qemu-img (content, backing file, consistency), argument
//! errors with QEMU's texts, and the job's states and events.

mod common;

use common::{
    assert_all_clean, assert_backing, assert_check_clean, default_engine, have_qemu, make_chain,
    open_chain, qemu_content, uniq,
};
use engine::job::stream::StreamArgs;
use engine::job::{JobEventKind, JobStatus};

const MIB: u64 = 1 << 20;

#[test]
fn stream_whole_chain_into_top() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "sw", 4, 4 * MIB);
    let top = imgs[3].path().to_string();
    let before = qemu_content(&top);
    let e = default_engine();
    let names = open_chain(&e, &imgs, "sw");
    let events = e.jobs().subscribe();
    let mut args = StreamArgs::new(&names[3]);
    args.job.job_id = Some("stream0".into());
    let job = e.stream(args).unwrap();
    let info = job.wait();
    assert_eq!(info.error, None);
    assert_eq!(info.status, JobStatus::Null, "auto-dismissed");
    assert!(e.node(&names[3]).unwrap().backing().is_none());
    // The filter is gone: the top has no parents but the engine's hold.
    assert!(e.node(&names[3]).unwrap().parents().is_empty());
    let evs: Vec<JobEventKind> = events.try_iter().map(|e| e.kind).collect();
    let statuses: Vec<JobStatus> = evs
        .iter()
        .filter_map(|k| match k {
            JobEventKind::StatusChange { status, .. } => Some(*status),
            _ => None,
        })
        .collect();
    assert_eq!(
        statuses,
        [
            JobStatus::Created,
            JobStatus::Running,
            JobStatus::Waiting,
            JobStatus::Pending,
            JobStatus::Concluded,
            JobStatus::Null
        ]
    );
    assert!(evs.iter().any(
        |k| matches!(k, JobEventKind::Completed { id, error: None, len, offset, .. }
        if id == "stream0" && *len == 4 * MIB && *offset == 4 * MIB)
    ));
    drop(e);
    assert_backing(&top, None);
    assert_check_clean(&top);
    assert_eq!(qemu_content(&top), before);
}

#[test]
fn stream_to_a_base_rewrites_the_backing_file() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "sb", 4, 4 * MIB);
    let top = imgs[3].path().to_string();
    let before = qemu_content(&top);
    let e = default_engine();
    let names = open_chain(&e, &imgs, "sb");
    let mut args = StreamArgs::new(&names[3]);
    args.base = Some(imgs[1].path().to_string());
    let job = e.stream(args).unwrap();
    assert_eq!(job.wait().error, None);
    assert_eq!(
        e.node(&names[3]).unwrap().backing().unwrap().name(),
        names[1]
    );
    drop(e);
    assert_backing(&top, Some(imgs[1].path()));
    assert_check_clean(&top);
    assert_eq!(qemu_content(&top), before);
    // Image 2's own data is in the top now; image 1's stays below.
    let map = common::run_tool(&["qemu-img", "map", "--output=json", &top]);
    assert!(map.contains("\"depth\": 1"), "{map}");
}

#[test]
fn stream_with_bottom_and_base_node() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "sbn", 4, 4 * MIB);
    let before = qemu_content(imgs[3].path());
    let e = default_engine();
    let names = open_chain(&e, &imgs, "sbn");
    // Stream into an intermediate (read-only) image: it is reopened read-write for the job
    // and read-only after.
    let mut args = StreamArgs::new(&names[2]);
    args.bottom = Some(names[1].clone());
    args.job.job_id = Some(uniq("j"));
    e.stream(args).unwrap().wait();
    let mid = e.node(&names[2]).unwrap();
    assert!(mid.is_read_only());
    assert_eq!(mid.backing().unwrap().name(), names[0]);
    let mut args = StreamArgs::new(&names[3]);
    args.base_node = Some(names[0].clone());
    args.job.job_id = Some(uniq("j"));
    assert_eq!(e.stream(args).unwrap().wait().error, None);
    assert_eq!(
        e.node(&names[3]).unwrap().backing().unwrap().name(),
        names[0]
    );
    drop(e);
    assert_backing(imgs[2].path(), Some(imgs[0].path()));
    assert_backing(imgs[3].path(), Some(imgs[0].path()));
    assert_all_clean(&imgs);
    assert_eq!(qemu_content(imgs[3].path()), before);
}

#[test]
fn stream_argument_errors_have_qemus_texts() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "se", 3, 2 * MIB);
    let e = default_engine();
    let n = open_chain(&e, &imgs, "se");
    let err = |f: &dyn Fn(&mut StreamArgs)| {
        let mut a = StreamArgs::new(&n[2]);
        a.job.job_id = Some("x".into());
        f(&mut a);
        e.stream(a).unwrap_err().full_message()
    };
    assert_eq!(
        err(&|a| {
            a.base = Some("b".into());
            a.base_node = Some(n[0].clone());
        }),
        "'base' and 'base-node' cannot be specified at the same time"
    );
    assert_eq!(
        err(&|a| {
            a.base = Some("b".into());
            a.bottom = Some(n[1].clone());
        }),
        "'base' and 'bottom' cannot be specified at the same time"
    );
    assert_eq!(
        err(&|a| {
            a.bottom = Some(n[1].clone());
            a.base_node = Some(n[0].clone());
        }),
        "'bottom' and 'base-node' cannot be specified at the same time"
    );
    assert_eq!(
        err(&|a| a.base = Some("/nonexistent.qcow2".into())),
        "Can't find '/nonexistent.qcow2' in the backing chain"
    );
    // base-node and bottom name nodes only (QEMU's bdrv_lookup_bs(NULL, name)).
    assert_eq!(
        err(&|a| a.base_node = Some("none".into())),
        "Cannot find device='' nor node-name='none'"
    );
    assert_eq!(
        err(&|a| a.bottom = Some("none".into())),
        "Cannot find device='' nor node-name='none'"
    );
    assert_eq!(
        err(&|a| a.backing_file = Some("x.qcow2".into())),
        "backing file specified, but streaming the entire chain"
    );
    // With a bottom there is no base node either: QEMU refuses a backing file name alike.
    assert_eq!(
        err(&|a| {
            a.bottom = Some(n[1].clone());
            a.backing_file = Some("x.qcow2".into());
        }),
        "backing file specified, but streaming the entire chain"
    );
    // The device is no base of its own.
    assert_eq!(
        err(&|a| a.base_node = Some(n[2].clone())),
        format!("Node '{0}' is not a backing image of '{0}'", n[2])
    );
    assert_eq!(
        err(&|a| a.job.job_id = Some("1bad".into())),
        "Invalid job ID '1bad'"
    );
    assert_eq!(
        err(&|a| a.job.speed = -1),
        "Parameter 'speed' expects a non-negative value"
    );
    // A node that is not below the device.
    let mut a = StreamArgs::new(&n[1]);
    a.job.job_id = Some("y".into());
    a.base_node = Some(n[2].clone());
    assert_eq!(
        e.stream(a).unwrap_err().full_message(),
        format!("Node '{}' is not a backing image of '{}'", n[2], n[1])
    );
    let mut a = StreamArgs::new(&n[1]);
    a.job.job_id = Some("y".into());
    a.bottom = Some(n[2].clone());
    assert_eq!(
        e.stream(a).unwrap_err().full_message(),
        format!("Node '{}' is not in a chain starting from '{}'", n[2], n[1])
    );
    // Nothing changed: no job, no filter, edges not frozen.
    assert!(e.jobs().list().is_empty());
    for name in &n {
        let node = e.node(name).unwrap();
        assert!(node.children().iter().all(|c| !c.is_frozen()));
    }
    assert!(e.node(&n[2]).unwrap().parents().is_empty());
}

#[test]
fn job_ids_must_be_unique_and_nodes_free() {
    if !have_qemu() {
        return;
    }
    let imgs = make_chain("/var/tmp", "su", 3, 8 * MIB);
    let e = default_engine();
    let n = open_chain(&e, &imgs, "su");
    let mut a = StreamArgs::new(&n[2]);
    a.job.job_id = Some("busy".into());
    a.job.speed = 1; // crawl: the job holds its nodes for the test
    let job = e.stream(a).unwrap();
    let mut b = StreamArgs::new(&n[2]);
    b.job.job_id = Some("busy".into());
    assert_eq!(
        e.stream(b).unwrap_err().full_message(),
        "Job ID 'busy' already in use"
    );
    let mut b = StreamArgs::new(&n[2]);
    b.job.job_id = Some("other".into());
    assert_eq!(
        e.stream(b).unwrap_err().full_message(),
        format!(
            "Node '{}' is busy: block device is in use by block job: stream",
            n[2]
        )
    );
    job.cancel(true).unwrap();
    let info = job.wait();
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
    // Cancelled: the top keeps its backing file, the filter is gone, the edges thawed.
    let top = e.node(&n[2]).unwrap();
    assert_eq!(top.backing().unwrap().name(), n[1]);
    assert!(top.parents().is_empty());
    assert!(top.children().iter().all(|c| !c.is_frozen()));
}
