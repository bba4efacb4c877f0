//! Block-job error handling, ported from QEMU's iotests: 030's TestEIO, TestENOSPC and
//! TestSetSpeed (block-stream reading a backing file through the fault-injection filter) and
//! 040's TestErrorHandling (block-commit, intermediate and active, with read errors in the
//! image copied from and write errors in the image copied into), for every `on-error` policy.
//!
//! Each test asserts what QEMU's test asserts: the BLOCK_JOB_ERROR events (operation, action),
//! the BLOCK_JOB_COMPLETED event (error text, offset, len), the job's paused flag, offset and
//! io-status as `query-block-jobs` shows them when the error event arrives, and the images
//! afterwards (read with qemu-img as the oracle). The status sequence (JOB_STATUS_CHANGE) is
//! asserted too where it is deterministic.

mod common;

use std::sync::Arc;

use common::{
    assert_backing, assert_check_clean, create_image, default_engine, file_spec, have_qemu,
    next_event, qemu_allocated, qemu_content, qemu_img_create, run_qemu_io, uniq, Scratch,
};
use crossbeam_channel::Receiver;
use engine::drivers::blkdebug::{BlkdebugOptions, ErrorRule, IoType};
use engine::drivers::file::FileOptions;
use engine::job::commit::CommitArgs;
use engine::job::stream::StreamArgs;
use engine::job::{
    ErrorAction, IoOp, IoStatus, Job, JobEvent, JobEventKind, JobStatus, JobType, OnError,
};
use engine::{BackingSpec, ChildSpec, DriverSpec, Engine, NodeSpec};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// iotest 030's TestErrors.image_len.
const IMAGE_LEN: u64 = 2 * MIB;
/// iotest 030's STREAM_BUFFER_SIZE (block/stream.c's chunk); the error is injected at this
/// offset of the backing file (`sector = STREAM_BUFFER_SIZE / 512`).
const STREAM_BUFFER_SIZE: u64 = 512 * KIB;

/// A blkdebug `inject-error` rule as QEMU's tests write it: `errno` on the first request of
/// type `iotype` that covers byte `offset` (`sector = offset / 512`), `once = on`.
fn rule(iotype: IoType, errno: i32, offset: u64) -> ErrorRule {
    ErrorRule {
        iotype,
        errno,
        range: Some((offset, 1)),
        once: true,
    }
}

/// `path` through a blkdebug node with `rules` (none: the plain file).
fn file_through_blkdebug(path: &str, rules: Vec<ErrorRule>) -> ChildSpec {
    if rules.is_empty() {
        return file_spec(path, false);
    }
    ChildSpec::Spec(Box::new(NodeSpec {
        node_name: None,
        read_only: false,
        driver: DriverSpec::Blkdebug {
            image: file_spec(path, false),
            opts: BlkdebugOptions {
                inject_error: rules,
                latency_ns: 0,
            },
        },
    }))
}

/// The statuses announced in `events` for job `id`.
fn statuses(events: &[JobEventKind], id: &str) -> Vec<JobStatus> {
    events
        .iter()
        .filter_map(|k| match k {
            JobEventKind::StatusChange { id: i, status } if i == id => Some(*status),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// iotest 030: TestEIO, TestENOSPC
// ---------------------------------------------------------------------------------------

/// 030's TestErrors setup: a raw backing file made by `create_image`, opened through a
/// blkdebug node that fails the first read covering offset 512 KiB with `errno`, under a
/// qcow2 top image (QEMU's `backing_file=blkdebug:conf:backing.img,backing_fmt=raw`).
struct StreamErrors {
    backing: Scratch,
    top: Scratch,
    e: Engine,
    top_name: String,
}

fn stream_errors(tag: &str, errno: i32) -> StreamErrors {
    let backing = Scratch::new_in("/var/tmp", &format!("{tag}-backing"));
    create_image(backing.path(), IMAGE_LEN);
    let top = Scratch::new_in("/var/tmp", &format!("{tag}-test"));
    qemu_img_create("qcow2", top.path(), Some((backing.path(), "raw")), None);
    let e = default_engine();
    let base_name = uniq(&format!("{tag}-base"));
    let top_name = uniq(&format!("{tag}-top"));
    e.add_node(NodeSpec {
        node_name: Some(base_name.clone()),
        read_only: true,
        driver: DriverSpec::Raw {
            file: file_through_blkdebug(
                backing.path(),
                vec![rule(IoType::Read, errno, STREAM_BUFFER_SIZE)],
            ),
            opts: Default::default(),
        },
    })
    .unwrap();
    e.add_node(NodeSpec {
        node_name: Some(top_name.clone()),
        read_only: false,
        driver: DriverSpec::Qcow2 {
            file: file_spec(top.path(), false),
            backing: BackingSpec::Node(ChildSpec::Name(base_name)),
            opts: Default::default(),
        },
    })
    .unwrap();
    StreamErrors {
        backing,
        top,
        e,
        top_name,
    }
}

impl StreamErrors {
    fn start(&self, on_error: OnError, rx: &Receiver<JobEvent>) -> Arc<Job> {
        // Drain anything earlier (nothing is expected).
        while rx.try_recv().is_ok() {}
        let mut a = StreamArgs::new(&self.top_name);
        a.job.on_error = on_error;
        self.e.stream(a).unwrap()
    }

    fn completed(&self, len: u64, offset: u64, error: Option<&str>) -> JobEventKind {
        JobEventKind::Completed {
            id: self.top_name.clone(),
            kind: JobType::Stream,
            len,
            offset,
            speed: 0,
            error: error.map(str::to_string),
        }
    }

    fn error(&self, action: ErrorAction) -> JobEventKind {
        JobEventKind::Error {
            id: self.top_name.clone(),
            operation: IoOp::Read,
            action,
        }
    }

    /// After a failed stream: the top keeps its backing file, in the graph and on disk, and
    /// the chain reads as before.
    fn assert_failed_and_intact(self) {
        let StreamErrors {
            backing,
            top,
            e,
            top_name,
        } = self;
        let t = e.node(&top_name).unwrap();
        assert!(
            t.backing().is_some(),
            "a failed stream keeps the backing file"
        );
        assert!(t.parents().is_empty(), "the copy-on-read filter is gone");
        assert!(t.children().iter().all(|c| !c.is_frozen()));
        assert!(e.jobs().list().is_empty());
        drop(t);
        drop(e);
        assert_backing(top.path(), Some(backing.path()));
        assert_check_clean(top.path());
        assert_eq!(
            qemu_content(top.path()),
            std::fs::read(backing.path()).unwrap()
        );
    }

    /// After a successful stream: the top stands alone and holds the backing file's data.
    fn assert_streamed(self) {
        let StreamErrors {
            backing,
            top,
            e,
            top_name,
        } = self;
        let t = e.node(&top_name).unwrap();
        assert!(t.backing().is_none());
        assert!(t.parents().is_empty(), "the copy-on-read filter is gone");
        assert!(e.jobs().list().is_empty());
        drop(t);
        drop(e);
        assert_backing(top.path(), None);
        assert_check_clean(top.path());
        assert_eq!(qemu_allocated(top.path(), 0, IMAGE_LEN), IMAGE_LEN);
        assert_eq!(
            qemu_content(top.path()),
            std::fs::read(backing.path()).unwrap()
        );
    }
}

/// Runs until BLOCK_JOB_COMPLETED; returns every event seen. `on_error_event` is called
/// with the job when BLOCK_JOB_ERROR arrives (the test's query and resume).
fn run_to_completion(
    rx: &Receiver<JobEvent>,
    job: &Arc<Job>,
    mut on_error_event: impl FnMut(&Arc<Job>),
) -> Vec<JobEventKind> {
    let mut seen = Vec::new();
    loop {
        let ev = next_event(rx);
        let done = matches!(ev, JobEventKind::Completed { .. });
        if matches!(ev, JobEventKind::Error { .. }) {
            on_error_event(job);
        }
        seen.push(ev);
        if done {
            break;
        }
    }
    // The rest (concluded, null) follows the completion in the same change.
    let info = job.wait();
    assert_eq!(info.status, JobStatus::Null, "auto-dismissed");
    seen.extend(rx.try_iter().map(|e| e.kind));
    seen
}

/// The events that are not status changes.
fn job_events(seen: &[JobEventKind]) -> Vec<JobEventKind> {
    seen.iter()
        .filter(|k| !matches!(k, JobEventKind::StatusChange { .. }))
        .cloned()
        .collect()
}

/// 030 TestEIO.test_report: the read error at 512 KiB fails the job; it reports the error
/// with offset 512 KiB (the chunk before it) and len 2 MiB.
#[test]
fn eio_report() {
    if !have_qemu() {
        return;
    }
    let s = stream_errors("eio-report", libc::EIO);
    let rx = s.e.jobs().subscribe();
    let job = s.start(OnError::Report, &rx);
    let seen = run_to_completion(&rx, &job, |_| {});
    assert_eq!(
        job_events(&seen),
        [
            s.error(ErrorAction::Report),
            s.completed(IMAGE_LEN, STREAM_BUFFER_SIZE, Some("Input/output error")),
        ]
    );
    assert_eq!(
        statuses(&seen, &s.top_name),
        [
            JobStatus::Created,
            JobStatus::Running,
            JobStatus::Aborting,
            JobStatus::Concluded,
            JobStatus::Null
        ]
    );
    assert_eq!(job.info().error.as_deref(), Some("Input/output error"));
    s.assert_failed_and_intact();
}

/// 030 TestEIO.test_ignore: the job goes on past the error (not paused when the error event
/// arrives), skips the chunk, and fails at the end with offset = len.
#[test]
fn eio_ignore() {
    if !have_qemu() {
        return;
    }
    let s = stream_errors("eio-ignore", libc::EIO);
    let rx = s.e.jobs().subscribe();
    let job = s.start(OnError::Ignore, &rx);
    let seen = run_to_completion(&rx, &job, |j| {
        let info = j.info();
        assert!(!info.paused, "{info:?}");
        assert_eq!(info.io_status, IoStatus::Ok);
    });
    assert_eq!(
        job_events(&seen),
        [
            s.error(ErrorAction::Ignore),
            s.completed(IMAGE_LEN, IMAGE_LEN, Some("Input/output error")),
        ]
    );
    assert_eq!(
        statuses(&seen, &s.top_name),
        [
            JobStatus::Created,
            JobStatus::Running,
            JobStatus::Aborting,
            JobStatus::Concluded,
            JobStatus::Null
        ]
    );
    // Everything but the failed chunk was copied into the top, which keeps its backing file.
    let StreamErrors {
        backing,
        top: top_scratch,
        e,
        top_name,
    } = s;
    assert!(e.node(&top_name).unwrap().backing().is_some());
    assert!(e.node(&top_name).unwrap().parents().is_empty());
    // Close the images before qemu-io looks at them.
    drop(e);
    let top = top_scratch.path().to_string();
    assert_eq!(
        qemu_allocated(&top, 0, STREAM_BUFFER_SIZE),
        STREAM_BUFFER_SIZE
    );
    assert_eq!(
        qemu_allocated(&top, STREAM_BUFFER_SIZE, STREAM_BUFFER_SIZE),
        0
    );
    assert_eq!(
        qemu_allocated(
            &top,
            2 * STREAM_BUFFER_SIZE,
            IMAGE_LEN - 2 * STREAM_BUFFER_SIZE
        ),
        IMAGE_LEN - 2 * STREAM_BUFFER_SIZE
    );
    assert_backing(&top, Some(backing.path()));
    assert_check_clean(&top);
    assert_eq!(qemu_content(&top), std::fs::read(backing.path()).unwrap());
    drop(top_scratch);
}

/// The checks of 030's test_stop / TestENOSPC.test_enospc when BLOCK_JOB_ERROR arrives:
/// paused, offset 512 KiB, io-status `expect`; after block-job-resume: not paused, io-status
/// ok.
fn stop_then_resume(j: &Arc<Job>, expect: IoStatus) {
    let info = j.info();
    assert!(info.paused, "paused when the error event arrives: {info:?}");
    assert_eq!(info.current_progress, STREAM_BUFFER_SIZE);
    assert_eq!(info.io_status, expect);
    // Parked at its pause point, visibly (JOB_STATUS_CHANGE paused).
    assert_eq!(j.wait_for(JobStatus::Paused), JobStatus::Paused);
    j.user_resume().unwrap();
    let info = j.info();
    assert!(!info.paused, "{info:?}");
    assert_eq!(info.io_status, IoStatus::Ok);
}

const STOPPED_AND_RESUMED: [JobStatus; 8] = [
    JobStatus::Created,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Running,
    JobStatus::Waiting,
    JobStatus::Pending,
    JobStatus::Concluded,
    JobStatus::Null,
];

/// 030 TestEIO.test_stop: the job pauses at the error with io-status failed; resumed, it
/// retries the chunk (the fault fired once) and completes without error, offset = len.
#[test]
fn eio_stop() {
    if !have_qemu() {
        return;
    }
    let s = stream_errors("eio-stop", libc::EIO);
    let rx = s.e.jobs().subscribe();
    let job = s.start(OnError::Stop, &rx);
    let seen = run_to_completion(&rx, &job, |j| stop_then_resume(j, IoStatus::Failed));
    assert_eq!(
        job_events(&seen),
        [
            s.error(ErrorAction::Stop),
            s.completed(IMAGE_LEN, IMAGE_LEN, None),
        ]
    );
    assert_eq!(statuses(&seen, &s.top_name), STOPPED_AND_RESUMED);
    s.assert_streamed();
}

/// 030 TestEIO.test_enospc: with on-error=enospc an EIO is reported (as with report).
#[test]
fn eio_with_enospc_policy_reports() {
    if !have_qemu() {
        return;
    }
    let s = stream_errors("eio-enospc", libc::EIO);
    let rx = s.e.jobs().subscribe();
    let job = s.start(OnError::Enospc, &rx);
    let seen = run_to_completion(&rx, &job, |_| {});
    assert_eq!(
        job_events(&seen),
        [
            s.error(ErrorAction::Report),
            s.completed(IMAGE_LEN, STREAM_BUFFER_SIZE, Some("Input/output error")),
        ]
    );
    s.assert_failed_and_intact();
}

/// 030 TestENOSPC.test_enospc: with on-error=enospc an ENOSPC stops the job with io-status
/// nospace; resumed, it completes without error.
#[test]
fn enospc_stops_and_resumes() {
    if !have_qemu() {
        return;
    }
    let s = stream_errors("enospc", libc::ENOSPC);
    let rx = s.e.jobs().subscribe();
    let job = s.start(OnError::Enospc, &rx);
    let seen = run_to_completion(&rx, &job, |j| {
        assert_eq!(
            j.info().io_status.as_str(),
            "nospace",
            "QEMU's io-status name"
        );
        stop_then_resume(j, IoStatus::Nospc)
    });
    assert_eq!(
        job_events(&seen),
        [
            s.error(ErrorAction::Stop),
            s.completed(IMAGE_LEN, IMAGE_LEN, None),
        ]
    );
    assert_eq!(statuses(&seen, &s.top_name), STOPPED_AND_RESUMED);
    s.assert_streamed();
}

/// The other policies with ENOSPC (block_job_error_action's table): report fails with
/// "No space left on device" at 512 KiB, ignore fails at the end, stop pauses with
/// io-status nospace whatever the policy that stopped it.
#[test]
fn enospc_with_report_ignore_and_stop() {
    if !have_qemu() {
        return;
    }
    const NOSPC: &str = "No space left on device";
    // report
    let s = stream_errors("enospc-report", libc::ENOSPC);
    let rx = s.e.jobs().subscribe();
    let job = s.start(OnError::Report, &rx);
    let seen = run_to_completion(&rx, &job, |_| {});
    assert_eq!(
        job_events(&seen),
        [
            s.error(ErrorAction::Report),
            s.completed(IMAGE_LEN, STREAM_BUFFER_SIZE, Some(NOSPC)),
        ]
    );
    s.assert_failed_and_intact();
    // ignore
    let s = stream_errors("enospc-ignore", libc::ENOSPC);
    let rx = s.e.jobs().subscribe();
    let job = s.start(OnError::Ignore, &rx);
    let seen = run_to_completion(&rx, &job, |j| assert!(!j.info().paused));
    assert_eq!(
        job_events(&seen),
        [
            s.error(ErrorAction::Ignore),
            s.completed(IMAGE_LEN, IMAGE_LEN, Some(NOSPC)),
        ]
    );
    s.assert_failed_and_intact();
    // stop
    let s = stream_errors("enospc-stop", libc::ENOSPC);
    let rx = s.e.jobs().subscribe();
    let job = s.start(OnError::Stop, &rx);
    let seen = run_to_completion(&rx, &job, |j| stop_then_resume(j, IoStatus::Nospc));
    assert_eq!(
        job_events(&seen),
        [
            s.error(ErrorAction::Stop),
            s.completed(IMAGE_LEN, IMAGE_LEN, None),
        ]
    );
    s.assert_streamed();
}

/// A user cancel of a job stopped on an error: it ends as cancelled (no retry), with the
/// offset where it stopped, and the chain is left as it was.
#[test]
fn cancel_while_stopped_on_error() {
    if !have_qemu() {
        return;
    }
    let s = stream_errors("eio-cancel", libc::EIO);
    let rx = s.e.jobs().subscribe();
    let job = s.start(OnError::Stop, &rx);
    loop {
        if let JobEventKind::Error { action, .. } = next_event(&rx) {
            assert_eq!(action, ErrorAction::Stop);
            break;
        }
    }
    assert_eq!(job.wait_for(JobStatus::Paused), JobStatus::Paused);
    job.cancel(true).unwrap();
    let info = job.wait();
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
    let seen: Vec<JobEventKind> = rx.try_iter().map(|e| e.kind).collect();
    assert!(
        seen.contains(&JobEventKind::Cancelled {
            id: s.top_name.clone(),
            kind: JobType::Stream,
            len: IMAGE_LEN,
            offset: STREAM_BUFFER_SIZE,
            speed: 0,
        }),
        "{seen:?}"
    );
    s.assert_failed_and_intact();
}

// ---------------------------------------------------------------------------------------
// iotest 030: TestSetSpeed
// ---------------------------------------------------------------------------------------

/// 030 TestSetSpeed: the speed a job starts with (0 by default, or the one given) and the
/// one block-job-set-speed sets show in query-block-jobs; a negative speed is refused with
/// QEMU's text, at creation (no job is left) and by set-speed. QEMU holds the job with a
/// blkdebug breakpoint; here each request of the backing file takes 50 ms (the job could not
/// finish in under 3 s) and the test pauses the job at once, then waits for it to park.
#[test]
fn stream_set_speed() {
    if !have_qemu() {
        return;
    }
    let len = 80 * MIB;
    let backing = Scratch::new_in("/var/tmp", "ss-backing");
    qemu_img_create("raw", backing.path(), None, Some(len));
    run_qemu_io("raw", backing.path(), &["write -P 0x1 0 32M"]);
    let top = Scratch::new_in("/var/tmp", "ss-test");
    qemu_img_create("qcow2", top.path(), Some((backing.path(), "raw")), None);
    run_qemu_io("qcow2", top.path(), &["write -P 0x1 32M 32M"]);
    let e = default_engine();
    let base_name = uniq("ss-base");
    let top_name = uniq("ss-top");
    e.add_node(NodeSpec {
        node_name: Some(base_name.clone()),
        read_only: true,
        driver: DriverSpec::Raw {
            file: ChildSpec::Spec(Box::new(NodeSpec {
                node_name: None,
                read_only: true,
                driver: DriverSpec::Blkdebug {
                    image: file_spec(backing.path(), false),
                    opts: BlkdebugOptions {
                        inject_error: vec![],
                        latency_ns: 50_000_000,
                    },
                },
            })),
            opts: Default::default(),
        },
    })
    .unwrap();
    e.add_node(NodeSpec {
        node_name: Some(top_name.clone()),
        read_only: false,
        driver: DriverSpec::Qcow2 {
            file: file_spec(top.path(), false),
            backing: BackingSpec::Node(ChildSpec::Name(base_name)),
            opts: Default::default(),
        },
    })
    .unwrap();
    let rx = e.jobs().subscribe();
    const NEGATIVE: &str = "Parameter 'speed' expects a non-negative value";

    // test_set_speed_invalid: refused at creation, no job left.
    let mut a = StreamArgs::new(&top_name);
    a.job.speed = -1;
    assert_eq!(e.stream(a).unwrap_err().full_message(), NEGATIVE);
    assert!(e.jobs().list().is_empty());
    assert!(e.node(&top_name).unwrap().parents().is_empty());

    let cancel_and_wait = |job: &Arc<Job>, speed: u64| {
        job.cancel(true).unwrap();
        assert_eq!(job.wait().error.as_deref(), Some("Operation canceled"));
        let seen: Vec<JobEventKind> = rx.try_iter().map(|e| e.kind).collect();
        let cancelled = seen
            .iter()
            .find(|k| matches!(k, JobEventKind::Cancelled { .. }))
            .unwrap_or_else(|| panic!("no BLOCK_JOB_CANCELLED: {seen:?}"));
        match cancelled {
            JobEventKind::Cancelled {
                id,
                kind,
                len: l,
                offset,
                speed: s,
            } => {
                assert_eq!(id, &top_name);
                assert_eq!(*kind, JobType::Stream);
                assert_eq!(*l, len);
                assert!(*offset < len);
                assert_eq!(*s, speed);
            }
            _ => unreachable!(),
        }
        assert!(e.jobs().list().is_empty());
        assert!(e.node(&top_name).unwrap().backing().is_some());
    };

    // test_set_speed: the default is 0; set-speed changes it.
    let job = e.stream(StreamArgs::new(&top_name)).unwrap();
    job.user_pause().unwrap();
    assert_eq!(job.info().speed, 0);
    assert_eq!(job.info().device, top_name);
    assert_eq!(job.wait_for(JobStatus::Paused), JobStatus::Paused);
    job.set_speed(8 * MIB as i64).unwrap();
    assert_eq!(job.info().speed, 8 * MIB);
    // test_set_speed_invalid: a negative speed is refused and changes nothing.
    assert_eq!(job.set_speed(-1).unwrap_err().full_message(), NEGATIVE);
    assert_eq!(job.info().speed, 8 * MIB);
    cancel_and_wait(&job, 8 * MIB);

    // The speed given to block-stream.
    let mut a = StreamArgs::new(&top_name);
    a.job.speed = 4 * MIB as i64;
    let job = e.stream(a).unwrap();
    job.user_pause().unwrap();
    assert_eq!(job.info().speed, 4 * MIB);
    assert_eq!(job.wait_for(JobStatus::Paused), JobStatus::Paused);
    cancel_and_wait(&job, 4 * MIB);

    // set-speed on a job that is gone: the job verb table refuses it, before the value.
    assert_eq!(
        job.set_speed(-1).unwrap_err().full_message(),
        format!("Job '{top_name}' in state 'null' cannot accept command verb 'set-speed'")
    );
}

// ---------------------------------------------------------------------------------------
// iotest 040: TestErrorHandling
// ---------------------------------------------------------------------------------------

/// 040 TestErrorHandling.image_len.
const EH_LEN: u64 = 2 * MIB;
/// The job id 040 uses.
const JOB: &str = "job0";

/// 040 TestErrorHandling's images: base (raw, create_image, 2 MiB) <- mid (qcow2, 0x11 in
/// the first 512 KiB) <- top (qcow2, 0x22 in the first 512 KiB).
struct EhImages {
    base: Scratch,
    mid: Scratch,
    top: Scratch,
}

fn eh_images(tag: &str) -> EhImages {
    let base = Scratch::new_in("/var/tmp", &format!("{tag}-backing"));
    create_image(base.path(), EH_LEN);
    let mid = Scratch::new_in("/var/tmp", &format!("{tag}-mid"));
    qemu_img_create("qcow2", mid.path(), Some((base.path(), "raw")), None);
    let top = Scratch::new_in("/var/tmp", &format!("{tag}-test"));
    qemu_img_create("qcow2", top.path(), Some((mid.path(), "qcow2")), None);
    run_qemu_io("qcow2", mid.path(), &["write -P 0x11 0 512k"]);
    run_qemu_io("qcow2", top.path(), &["write -P 0x22 0 512k"]);
    EhImages { base, mid, top }
}

/// Where an error is injected (040's blkdebug_event: sector 1024 of a qcow2 file, i.e. inside
/// the data clusters of the first 512 KiB; sector 512 of the raw base).
#[derive(Clone, Copy, Default)]
struct Faults {
    top: Option<IoType>,
    mid: Option<IoType>,
    base: Option<IoType>,
}

fn eh_rules(t: Option<IoType>, is_raw: bool) -> Vec<ErrorRule> {
    let sector = if is_raw { 512 } else { 1024 };
    t.map(|t| rule(t, libc::EIO, sector * 512))
        .into_iter()
        .collect()
}

/// 040's add_block_nodes: base-fmt (raw), mid-fmt and top-fmt (qcow2), each over its file,
/// through a blkdebug node where `faults` says; all read-write, as blockdev-add opens them.
/// Returns the names of top-fmt, mid-fmt and base-fmt.
fn eh_nodes(e: &Engine, imgs: &EhImages, faults: Faults) -> [String; 3] {
    let names = [uniq("top-fmt"), uniq("mid-fmt"), uniq("base-fmt")];
    e.add_node(NodeSpec {
        node_name: Some(names[2].clone()),
        read_only: false,
        driver: DriverSpec::Raw {
            file: file_through_blkdebug(imgs.base.path(), eh_rules(faults.base, true)),
            opts: Default::default(),
        },
    })
    .unwrap();
    e.add_node(NodeSpec {
        node_name: Some(names[1].clone()),
        read_only: false,
        driver: DriverSpec::Qcow2 {
            file: file_through_blkdebug(imgs.mid.path(), eh_rules(faults.mid, false)),
            backing: BackingSpec::Node(ChildSpec::Name(names[2].clone())),
            opts: Default::default(),
        },
    })
    .unwrap();
    e.add_node(NodeSpec {
        node_name: Some(names[0].clone()),
        read_only: false,
        driver: DriverSpec::Qcow2 {
            file: file_through_blkdebug(imgs.top.path(), eh_rules(faults.top, false)),
            backing: BackingSpec::Node(ChildSpec::Name(names[1].clone())),
            opts: Default::default(),
        },
    })
    .unwrap();
    names
}

fn eh_error(op: IoOp, action: ErrorAction) -> JobEventKind {
    JobEventKind::Error {
        id: JOB.into(),
        operation: op,
        action,
    }
}

fn eh_ready() -> JobEventKind {
    JobEventKind::Ready {
        id: JOB.into(),
        kind: JobType::Commit,
        len: 512 * KIB,
        offset: 512 * KIB,
        speed: 0,
    }
}

fn eh_completed(errmsg: Option<&str>, active: bool) -> JobEventKind {
    let max_len = if active { 512 * KIB } else { EH_LEN };
    JobEventKind::Completed {
        id: JOB.into(),
        kind: JobType::Commit,
        len: max_len,
        offset: if errmsg.is_some() { 0 } else { max_len },
        speed: 0,
        error: errmsg.map(str::to_string),
    }
}

/// 040's prepare_and_start_job + run_job: commits top-fmt into mid-fmt (active) or mid-fmt
/// into base-fmt (intermediate) with `on_error`; resumes the job on each error event when
/// `error_pauses_job`, completes it on READY; returns the job's events other than status
/// changes, and the images (closed).
fn eh_run(
    tag: &str,
    on_error: OnError,
    active: bool,
    faults: Faults,
    error_pauses_job: bool,
) -> (Vec<JobEventKind>, EhImages) {
    let imgs = eh_images(tag);
    let e = default_engine();
    let [top, mid, base] = eh_nodes(&e, &imgs, faults);
    let rx = e.jobs().subscribe();
    let mut a = CommitArgs::new(&top);
    a.job.job_id = Some(JOB.into());
    a.top_node = Some(if active { top.clone() } else { mid.clone() });
    a.base_node = Some(if active { mid.clone() } else { base.clone() });
    a.job.on_error = on_error;
    let job = e.commit(a).unwrap();
    let mut log = Vec::new();
    loop {
        let ev = next_event(&rx);
        match &ev {
            JobEventKind::StatusChange { .. } | JobEventKind::Pending { .. } => continue,
            JobEventKind::Completed { .. } => {
                log.push(ev);
                break;
            }
            JobEventKind::Error { .. } => {
                if error_pauses_job {
                    job.user_resume().unwrap();
                }
            }
            JobEventKind::Ready { .. } => job.complete().unwrap(),
            JobEventKind::Cancelled { .. } => panic!("Unexpected event: {ev:?}"),
        }
        log.push(ev);
    }
    job.wait();
    // The graph afterwards: on success the images above base are cut out.
    let ok = job.info().error.is_none();
    let top_node = e.node(&top).unwrap();
    if active {
        if ok {
            assert!(top_node.parents().is_empty(), "no filter left");
        } else {
            assert_eq!(top_node.backing().unwrap().name(), mid);
        }
    } else {
        let expect = if ok { &base } else { &mid };
        assert_eq!(top_node.backing().unwrap().name(), *expect);
    }
    for n in [&top, &mid, &base] {
        let node = e.node(n).unwrap();
        assert!(node.children().iter().all(|c| !c.is_frozen()), "{n}");
    }
    assert!(e.jobs().list().is_empty());
    drop(top_node);
    drop(e);
    (log, imgs)
}

/// qemu-img compare: whether the two images read the same (040's compare_images).
fn same_content(a: &str, b: &str) -> bool {
    qemu_content(a) == qemu_content(b)
}

fn active(
    tag: &str,
    on_error: OnError,
    faults: Faults,
    pauses: bool,
) -> (Vec<JobEventKind>, EhImages) {
    eh_run(tag, on_error, true, faults, pauses)
}

fn intermediate(
    tag: &str,
    on_error: OnError,
    faults: Faults,
    pauses: bool,
) -> (Vec<JobEventKind>, EhImages) {
    eh_run(tag, on_error, false, faults, pauses)
}

const TOP_READ: Faults = Faults {
    top: Some(IoType::Read),
    mid: None,
    base: None,
};
const MID_READ: Faults = Faults {
    top: None,
    mid: Some(IoType::Read),
    base: None,
};
const MID_WRITE: Faults = Faults {
    top: None,
    mid: Some(IoType::Write),
    base: None,
};
const BASE_WRITE: Faults = Faults {
    top: None,
    mid: None,
    base: Some(IoType::Write),
};

#[test]
fn commit_active_read_error_report() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = active("ehar", OnError::Report, TOP_READ, false);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Read, ErrorAction::Report),
            eh_completed(Some("Input/output error"), true)
        ]
    );
    assert!(
        !same_content(imgs.top.path(), imgs.mid.path()),
        "target image matches source after error"
    );
    assert_check_clean(imgs.mid.path());
    assert_check_clean(imgs.top.path());
}

#[test]
fn commit_active_read_error_stop() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = active("ehas", OnError::Stop, TOP_READ, true);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Read, ErrorAction::Stop),
            eh_ready(),
            eh_completed(None, true)
        ]
    );
    assert!(
        same_content(imgs.top.path(), imgs.mid.path()),
        "target image does not match source after commit"
    );
    assert_check_clean(imgs.mid.path());
}

#[test]
fn commit_active_read_error_ignore() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = active("ehai", OnError::Ignore, TOP_READ, false);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Read, ErrorAction::Ignore),
            eh_ready(),
            eh_completed(None, true)
        ]
    );
    // For commit, 'ignore' actually means retry, so this succeeds.
    assert!(same_content(imgs.top.path(), imgs.mid.path()));
    assert_check_clean(imgs.mid.path());
}

#[test]
fn commit_active_write_error_report() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = active("ehawr", OnError::Report, MID_WRITE, false);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Write, ErrorAction::Report),
            eh_completed(Some("Input/output error"), true)
        ]
    );
    assert!(!same_content(imgs.top.path(), imgs.mid.path()));
    assert_check_clean(imgs.mid.path());
}

#[test]
fn commit_active_write_error_stop() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = active("ehaws", OnError::Stop, MID_WRITE, true);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Write, ErrorAction::Stop),
            eh_ready(),
            eh_completed(None, true)
        ]
    );
    assert!(same_content(imgs.top.path(), imgs.mid.path()));
    assert_check_clean(imgs.mid.path());
}

#[test]
fn commit_active_write_error_ignore() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = active("ehawi", OnError::Ignore, MID_WRITE, false);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Write, ErrorAction::Ignore),
            eh_ready(),
            eh_completed(None, true)
        ]
    );
    assert!(same_content(imgs.top.path(), imgs.mid.path()));
    assert_check_clean(imgs.mid.path());
}

/// After an intermediate commit that succeeded, the overlay's header names the base.
fn assert_overlay_points_at_base(imgs: &EhImages) {
    assert_backing(imgs.top.path(), Some(imgs.base.path()));
    assert_check_clean(imgs.top.path());
    assert_check_clean(imgs.mid.path());
}

/// After an intermediate commit that failed, the overlay's header still names mid.
fn assert_overlay_points_at_mid(imgs: &EhImages) {
    assert_backing(imgs.top.path(), Some(imgs.mid.path()));
    assert_check_clean(imgs.top.path());
    assert_check_clean(imgs.mid.path());
}

#[test]
fn commit_intermediate_read_error_report() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = intermediate("ehir", OnError::Report, MID_READ, false);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Read, ErrorAction::Report),
            eh_completed(Some("Input/output error"), false)
        ]
    );
    assert!(
        !same_content(imgs.mid.path(), imgs.base.path()),
        "target image matches source after error"
    );
    assert_overlay_points_at_mid(&imgs);
}

#[test]
fn commit_intermediate_read_error_stop() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = intermediate("ehis", OnError::Stop, MID_READ, true);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Read, ErrorAction::Stop),
            eh_completed(None, false)
        ]
    );
    assert!(
        same_content(imgs.mid.path(), imgs.base.path()),
        "target image does not match source after commit"
    );
    assert_overlay_points_at_base(&imgs);
}

#[test]
fn commit_intermediate_read_error_ignore() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = intermediate("ehii", OnError::Ignore, MID_READ, false);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Read, ErrorAction::Ignore),
            eh_completed(None, false)
        ]
    );
    // For commit, 'ignore' actually means retry, so this succeeds.
    assert!(same_content(imgs.mid.path(), imgs.base.path()));
    assert_overlay_points_at_base(&imgs);
}

#[test]
fn commit_intermediate_write_error_report() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = intermediate("ehiwr", OnError::Report, BASE_WRITE, false);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Write, ErrorAction::Report),
            eh_completed(Some("Input/output error"), false)
        ]
    );
    assert!(!same_content(imgs.mid.path(), imgs.base.path()));
    assert_overlay_points_at_mid(&imgs);
}

#[test]
fn commit_intermediate_write_error_stop() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = intermediate("ehiws", OnError::Stop, BASE_WRITE, true);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Write, ErrorAction::Stop),
            eh_completed(None, false)
        ]
    );
    assert!(same_content(imgs.mid.path(), imgs.base.path()));
    assert_overlay_points_at_base(&imgs);
}

#[test]
fn commit_intermediate_write_error_ignore() {
    if !have_qemu() {
        return;
    }
    let (log, imgs) = intermediate("ehiwi", OnError::Ignore, BASE_WRITE, false);
    assert_eq!(
        log,
        [
            eh_error(IoOp::Write, ErrorAction::Ignore),
            eh_completed(None, false)
        ]
    );
    assert!(same_content(imgs.mid.path(), imgs.base.path()));
    assert_overlay_points_at_base(&imgs);
}

/// blockdev-create of a qcow2 image: as in QEMU (`qcow2_co_create`), the command only
/// creates the job; the node it names, the options and the node's mode are checked by the
/// job, in that order, and a failure concludes the job with the error in its info (progress
/// 1 of 1), after the states created, running, aborting, concluded, and null once dismissed.
#[test]
fn create_job_checks_its_target_in_the_job() {
    use engine::drivers::qcow2::create::CreateOptions;
    use engine::job::create::{CreateArgs, CreateTarget};

    let e = default_engine();
    let rx = e.jobs().subscribe();
    let img = Scratch::new("create-target").with_pattern(0);
    let add_file = |name: &str, read_only: bool| {
        e.add_node(NodeSpec {
            node_name: Some(name.to_string()),
            read_only,
            driver: DriverSpec::File(FileOptions::new(img.path())),
        })
        .unwrap();
    };
    let (ro, rw, missing) = (uniq("create-ro"), uniq("create-rw"), uniq("create-nope"));
    add_file(&ro, true);
    add_file(&rw, false);
    let create = |file: &str, cluster_size: u64| {
        let id = uniq("create");
        let job = e
            .create_image(CreateArgs {
                job_id: id.clone(),
                target: CreateTarget::Qcow2 {
                    file: file.to_string(),
                    opts: CreateOptions {
                        size: MIB,
                        cluster_size,
                        ..Default::default()
                    },
                },
            })
            .expect("the command only creates the job");
        let info = job.wait();
        assert_eq!(info.status, JobStatus::Concluded);
        assert_eq!(info.kind, JobType::Create);
        assert_eq!((info.current_progress, info.total_progress), (1, 1));
        job.dismiss().unwrap();
        let mut seen = Vec::new();
        loop {
            let k = next_event(&rx);
            let done = matches!(&k, JobEventKind::StatusChange { id: i, status: JobStatus::Null } if *i == id);
            seen.push(k);
            if done {
                break;
            }
        }
        assert_eq!(
            statuses(&seen, &id),
            [
                JobStatus::Created,
                JobStatus::Running,
                JobStatus::Aborting,
                JobStatus::Concluded,
                JobStatus::Null
            ]
        );
        info.error.expect("the job failed")
    };
    // The node is looked up first (even with invalid options), as a device or a node.
    assert_eq!(
        create(&missing, 1000),
        format!("Cannot find device='{missing}' nor node-name='{missing}'")
    );
    assert_eq!(
        create(&rw, 1000),
        "Cluster size must be a power of two between 512 and 2048k"
    );
    assert_eq!(create(&ro, 65536), "Block node is read-only");
    assert!(e.jobs().list().is_empty());
    assert_eq!(
        std::fs::metadata(img.path()).unwrap().len(),
        0,
        "nothing was written"
    );
}
