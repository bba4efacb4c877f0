//! block-commit, ported from QEMU's iotest 040: TestSingleDrive (and TestActiveZeroLengthImage,
//! the same with empty images), TestRelativePaths, TestSetSpeed, TestReopenOverlay and
//! TestCommitWithFilters (blkdebug filters without rules stand in for 040's throttle filters),
//! plus commits into a base smaller than top (QEMU grows the base first). 040's
//! TestErrorHandling is in `jobs_errors.rs`.
//!
//! 040's guest device is a backend here, QMP commands are engine calls and QMP events job
//! events. Each test asserts what 040 asserts: the BLOCK_JOB_READY / COMPLETED events (no
//! error, offset = len), QEMU's error texts for bad arguments, which nodes are left in the
//! graph, and the data read back with qemu-io; and then some: the backing file names written
//! into the headers, and `qemu-img check`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{
    assert_all_clean, assert_backing, assert_check_clean, create_image, default_engine, file_spec,
    have_qemu, next_event, qemu_backing, qemu_content, qemu_img_create, run_qemu_io, run_tool,
    uniq, Scratch,
};
use crossbeam_channel::Receiver;
use engine::drivers::null::NullOptions;
use engine::job::commit::CommitArgs;
use engine::job::{Job, JobEvent, JobEventKind, JobStatus, JobType};
use engine::{BackendOptions, BackingSpec, ChildSpec, DriverSpec, Engine, ErrorKind, NodeSpec};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// 040's `qemu_io('-c', 'read -P ...').find("verification failed") == -1`.
fn assert_pattern(fmt: &str, path: &str, pattern: u8, off: u64, len: u64) {
    let out = run_qemu_io(fmt, path, &[format!("read -P {pattern:#x} {off} {len}")]);
    assert!(
        !out.contains("verification failed"),
        "{path}: pattern {pattern:#x} at {off}+{len}: {out}"
    );
}

fn qcow2_spec(name: &str, path: &str, read_only: bool, backing: BackingSpec) -> NodeSpec {
    NodeSpec {
        node_name: Some(name.to_string()),
        read_only,
        driver: DriverSpec::Qcow2 {
            file: file_spec(path, read_only),
            backing,
            opts: Default::default(),
        },
    }
}

fn raw_spec(name: &str, path: &str, read_only: bool) -> NodeSpec {
    NodeSpec {
        node_name: Some(name.to_string()),
        read_only,
        driver: DriverSpec::Raw {
            file: file_spec(path, read_only),
            opts: Default::default(),
        },
    }
}

/// A blkdebug node without rules: a plain filter (040 uses throttle filters).
fn filter_spec(name: &str, child: NodeSpec) -> NodeSpec {
    NodeSpec {
        node_name: Some(name.to_string()),
        read_only: false,
        driver: DriverSpec::Blkdebug {
            image: ChildSpec::Spec(Box::new(child)),
            opts: Default::default(),
        },
    }
}

fn backing_spec(spec: NodeSpec) -> BackingSpec {
    BackingSpec::Node(ChildSpec::Spec(Box::new(spec)))
}

/// Whether a node of that name is still open (040's `node_info(name) is not None`).
fn node_exists(name: &str) -> bool {
    engine::engine::lookup(name).is_ok()
}

/// 040's wait_for_complete: until BLOCK_JOB_COMPLETED (no error, type commit, offset = len);
/// BLOCK_JOB_READY is answered with block-job-complete, and required if `need_ready`.
/// Returns the completion's len.
fn wait_for_complete(rx: &Receiver<JobEvent>, job: &Arc<Job>, need_ready: bool) -> u64 {
    let mut ready = false;
    loop {
        match next_event(rx) {
            JobEventKind::Completed {
                id,
                kind,
                len,
                offset,
                error,
                ..
            } => {
                assert_eq!(error, None);
                assert_eq!(kind, JobType::Commit);
                assert_eq!(id, job.id());
                assert_eq!(offset, len);
                if need_ready {
                    assert!(
                        ready,
                        "Expecting BLOCK_JOB_READY before BLOCK_JOB_COMPLETED"
                    );
                }
                assert_eq!(job.wait().status, JobStatus::Null);
                return len;
            }
            JobEventKind::Ready { id, kind, .. } => {
                ready = true;
                assert_eq!(kind, JobType::Commit);
                assert_eq!(id, job.id());
                job.complete().unwrap();
            }
            ev @ (JobEventKind::Error { .. } | JobEventKind::Cancelled { .. }) => {
                panic!("unexpected event {ev:?}")
            }
            _ => {}
        }
    }
}

/// Commits with `a`, waits for completion (040's run_commit_test); returns the len.
fn run_commit(e: &Engine, a: CommitArgs, need_ready: bool) -> u64 {
    assert!(e.jobs().list().is_empty());
    let rx = e.jobs().subscribe();
    let job = e.commit(a).unwrap();
    let len = wait_for_complete(&rx, &job, need_ready);
    assert!(e.jobs().list().is_empty());
    len
}

/// That no job, frozen edge or job filter is left after a refused command.
fn assert_untouched(e: &Engine, names: &[&str]) {
    assert!(e.jobs().list().is_empty());
    for n in names {
        let node = e.node(n).unwrap();
        assert!(node.children().iter().all(|c| !c.is_frozen()), "{n}");
        for p in node.parents() {
            if let Some(parent) = p.parent().node() {
                assert!(
                    !matches!(parent.driver_name(), "commit" | "mirror_top"),
                    "a job filter is left above {n}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// TestSingleDrive, TestActiveZeroLengthImage
// ---------------------------------------------------------------------------------------

/// 040 TestSingleDrive's images: backing (raw, create_image, 0xab in [0, 512 KiB)) <- mid
/// (qcow2, 0xef in [512 KiB, 1 MiB)) <- test (qcow2).
struct SingleDrive {
    backing: Scratch,
    mid: Scratch,
    test: Scratch,
    len: u64,
}

/// Node names of the drive: top, mid, base.
struct Names {
    top: String,
    mid: String,
    base: String,
}

fn single_drive_images(tag: &str, len: u64) -> SingleDrive {
    let backing = Scratch::new_in("/var/tmp", &format!("{tag}-backing"));
    let mid = Scratch::new_in("/var/tmp", &format!("{tag}-mid"));
    let test = Scratch::new_in("/var/tmp", &format!("{tag}-test"));
    create_image(backing.path(), len);
    qemu_img_create("qcow2", mid.path(), Some((backing.path(), "raw")), None);
    qemu_img_create("qcow2", test.path(), Some((mid.path(), "qcow2")), None);
    if len > 0 {
        // (With empty images QEMU's writes fail and its test goes on; here they are skipped.)
        run_qemu_io("raw", backing.path(), &["write -P 0xab 0 524288"]);
        run_qemu_io("qcow2", mid.path(), &["write -P 0xef 524288 524288"]);
    }
    SingleDrive {
        backing,
        mid,
        test,
        len,
    }
}

impl SingleDrive {
    /// The drive: `test` with `node-name=top,backing.node-name=mid,backing.backing.node-name=
    /// base` (backing files read-only), one node tree, so images cut out close.
    fn open(&self, e: &Engine) -> Names {
        let n = Names {
            top: uniq("top"),
            mid: uniq("mid"),
            base: uniq("base"),
        };
        e.add_node(qcow2_spec(
            &n.top,
            self.test.path(),
            false,
            backing_spec(qcow2_spec(
                &n.mid,
                self.mid.path(),
                true,
                backing_spec(raw_spec(&n.base, self.backing.path(), true)),
            )),
        ))
        .unwrap();
        n
    }

    /// What 040 reads back from the base after mid (and top) went into it.
    fn assert_base_data(&self) {
        if self.len == 0 {
            assert_eq!(std::fs::metadata(self.backing.path()).unwrap().len(), 0);
            return;
        }
        assert_pattern("raw", self.backing.path(), 0xab, 0, 524288);
        assert_pattern("raw", self.backing.path(), 0xef, 524288, 524288);
    }
}

/// 040 test_commit / test_commit_node: mid goes into base; top's backing is base in the graph
/// and in its header; mid is closed; base is read-only again.
fn commit_mid_into_base(tag: &str, len: u64, by_node_name: bool) {
    let imgs = single_drive_images(tag, len);
    let before = qemu_content(imgs.test.path());
    let e = default_engine();
    let n = imgs.open(&e);
    let mut a = CommitArgs::new(&n.top);
    if by_node_name {
        a.top_node = Some(n.mid.clone());
        a.base_node = Some(n.base.clone());
    } else {
        a.top = Some(imgs.mid.path().to_string());
        a.base = Some(imgs.backing.path().to_string());
    }
    assert_eq!(run_commit(&e, a, false), len, "len is the top's length");
    let top = e.node(&n.top).unwrap();
    let base = top.backing().unwrap();
    assert_eq!(base.name(), n.base);
    assert!(base.is_read_only(), "base reopened read-only");
    assert!(!node_exists(&n.mid), "mid is cut out and closed");
    drop((top, base));
    drop(e);
    imgs.assert_base_data();
    assert_backing(imgs.test.path(), Some(imgs.backing.path()));
    assert_check_clean(imgs.test.path());
    assert_eq!(qemu_content(imgs.test.path()), before);
}

/// 040 test_top_is_active / test_top_is_default_active: an active commit, which needs
/// BLOCK_JOB_READY and block-job-complete; the device then uses base.
fn commit_active(tag: &str, len: u64, name_top: bool) {
    let imgs = single_drive_images(tag, len);
    let before = qemu_content(imgs.test.path());
    let e = default_engine();
    let n = imgs.open(&e);
    let device = e.backend(&n.top, &[], BackendOptions::default()).unwrap();
    let mut a = CommitArgs::new(&n.top);
    if name_top {
        a.top = Some(imgs.test.path().to_string());
        a.base = Some(imgs.backing.path().to_string());
    }
    run_commit(&e, a, true);
    assert_eq!(device.root().name(), n.base, "the device uses base now");
    assert!(!device.root().is_read_only());
    // top (blockdev-add'ed, so still referenced) is out of use: it can be deleted, which
    // closes mid below it, as the device's move closes them in QEMU's test.
    e.del_node(&n.top).unwrap();
    assert!(!node_exists(&n.top));
    assert!(!node_exists(&n.mid), "mid is cut out and closed");
    drop(device);
    drop(e);
    imgs.assert_base_data();
    assert_eq!(qemu_content(imgs.backing.path()), before);
}

#[test]
fn single_drive_commit() {
    if have_qemu() {
        commit_mid_into_base("sd-commit", 2 * MIB, false);
    }
}

#[test]
fn single_drive_commit_node() {
    if have_qemu() {
        commit_mid_into_base("sd-node", 2 * MIB, true);
    }
}

#[test]
fn single_drive_top_is_active() {
    if have_qemu() {
        commit_active("sd-active", 2 * MIB, true);
    }
}

#[test]
fn single_drive_top_is_default_active() {
    if have_qemu() {
        commit_active("sd-default", 2 * MIB, false);
    }
}

/// TestActiveZeroLengthImage: TestSingleDrive's commits with empty images (offset = len = 0).
#[test]
fn zero_length_images() {
    if !have_qemu() {
        return;
    }
    commit_mid_into_base("z-commit", 0, false);
    commit_mid_into_base("z-node", 0, true);
    commit_active("z-active", 0, true);
    commit_active("z-default", 0, false);
}

/// TestSingleDrive's argument errors, with QEMU's texts (and TestActiveZeroLengthImage's:
/// the same with empty images).
#[test]
fn single_drive_argument_errors() {
    if !have_qemu() {
        return;
    }
    for len in [2 * MIB, 0] {
        let imgs = single_drive_images("sd-err", len);
        let e = default_engine();
        let n = imgs.open(&e);
        let (mid, backing) = (imgs.mid.path(), imgs.backing.path());
        let err = |f: &dyn Fn(&mut CommitArgs)| {
            let mut a = CommitArgs::new(&n.top);
            f(&mut a);
            e.commit(a).unwrap_err()
        };
        let msg = |f: &dyn Fn(&mut CommitArgs)| err(f).full_message();
        // test_device_not_found
        let nf = err(&|a| {
            a.device = "nonexistent".into();
            a.top = Some(mid.into());
        });
        assert_eq!(nf.kind(), ErrorKind::DeviceNotFound);
        assert_eq!(nf.full_message(), "Device 'nonexistent' not found");
        // test_top_same_base
        assert_eq!(
            msg(&|a| {
                a.top = Some(backing.into());
                a.base = Some(backing.into());
            }),
            format!("Can't find '{backing}' in the backing chain")
        );
        // test_top_invalid
        assert_eq!(
            msg(&|a| {
                a.top = Some("badfile".into());
                a.base = Some(backing.into());
            }),
            "Top image file badfile not found"
        );
        // test_base_invalid
        assert_eq!(
            msg(&|a| {
                a.top = Some(mid.into());
                a.base = Some("badfile".into());
            }),
            "Can't find 'badfile' in the backing chain"
        );
        // test_top_node_invalid
        assert_eq!(
            msg(&|a| {
                a.top_node = Some("badfile".into());
                a.base_node = Some(n.base.clone());
            }),
            "Cannot find device='' nor node-name='badfile'"
        );
        // test_base_node_invalid
        assert_eq!(
            msg(&|a| {
                a.top_node = Some(n.mid.clone());
                a.base_node = Some("badfile".into());
            }),
            "Cannot find device='' nor node-name='badfile'"
        );
        // test_top_path_and_node
        assert_eq!(
            msg(&|a| {
                a.top_node = Some(n.mid.clone());
                a.base_node = Some(n.base.clone());
                a.top = Some(mid.into());
            }),
            "'top-node' and 'top' are mutually exclusive"
        );
        // test_base_path_and_node
        assert_eq!(
            msg(&|a| {
                a.top_node = Some(n.mid.clone());
                a.base_node = Some(n.base.clone());
                a.base = Some(backing.into());
            }),
            "'base-node' and 'base' are mutually exclusive"
        );
        // test_top_and_base_reversed
        assert_eq!(
            msg(&|a| {
                a.top = Some(backing.into());
                a.base = Some(mid.into());
            }),
            format!("Can't find '{mid}' in the backing chain")
        );
        // test_top_and_base_node_reversed
        assert_eq!(
            msg(&|a| {
                a.top_node = Some(n.base.clone());
                a.base_node = Some(n.top.clone());
            }),
            format!("'{}' is not in this backing file chain", n.top)
        );
        // test_top_node_in_wrong_chain
        let null = uniq("null");
        e.add_node(NodeSpec {
            node_name: Some(null.clone()),
            read_only: false,
            driver: DriverSpec::Null(NullOptions {
                size: len,
                read_zeroes: false,
                latency_ns: 0,
            }),
        })
        .unwrap();
        assert_eq!(
            msg(&|a| {
                a.top_node = Some(null.clone());
                a.base_node = Some(n.base.clone());
            }),
            format!("'{null}' is not in this backing file chain")
        );
        // And: base = top (qmp_block_commit's "Do not allow attempts to commit an image into
        // itself"), and no base below the last image.
        assert_eq!(
            msg(&|a| {
                a.top_node = Some(n.mid.clone());
                a.base_node = Some(n.mid.clone());
            }),
            "cannot commit an image into itself"
        );
        assert_eq!(
            msg(&|a| a.top_node = Some(n.base.clone())),
            "There is no backimg image"
        );
        assert_untouched(&e, &[&n.top, &n.mid, &n.base]);
        assert_eq!(e.node(&n.top).unwrap().backing().unwrap().name(), n.mid);
    }
}

// ---------------------------------------------------------------------------------------
// TestRelativePaths
// ---------------------------------------------------------------------------------------

/// A scratch folder removed (with its content) on drop.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 040 TestRelativePaths: dir1/backing.img <- dir2/mid.img <- dir2/dir3/test.img, the
/// backing file names relative ("../dir1/backing.img", "../mid.img"); the drive is test.img
/// with its chain opened from the headers.
struct RelativePaths {
    _dir: ScratchDir,
    test_img: String,
    backing_abs: String,
}

const REL_MID: &str = "../mid.img";
const REL_BACKING: &str = "../dir1/backing.img";

fn relative_paths(tag: &str) -> RelativePaths {
    let root = Scratch::new_in("/var/tmp", tag).0.clone();
    for d in ["dir1", "dir2", "dir2/dir3"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let dir = ScratchDir(root.clone());
    let s = |p: &str| root.join(p).to_str().unwrap().to_string();
    let (backing_abs, mid_abs, test_img) = (
        s("dir1/backing.img"),
        s("dir2/mid.img"),
        s("dir2/dir3/test.img"),
    );
    create_image(&backing_abs, MIB);
    qemu_img_create("qcow2", &mid_abs, Some((&backing_abs, "raw")), None);
    qemu_img_create("qcow2", &test_img, Some((&mid_abs, "qcow2")), None);
    run_tool(&[
        "qemu-img",
        "rebase",
        "-u",
        "-b",
        REL_BACKING,
        "-F",
        "raw",
        &mid_abs,
    ]);
    run_tool(&[
        "qemu-img", "rebase", "-u", "-b", REL_MID, "-F", "qcow2", &test_img,
    ]);
    run_qemu_io("raw", &backing_abs, &["write -P 0xab 0 524288"]);
    run_qemu_io("qcow2", &mid_abs, &["write -P 0xef 524288 524288"]);
    RelativePaths {
        _dir: dir,
        test_img,
        backing_abs,
    }
}

impl RelativePaths {
    fn open(&self, e: &Engine) -> String {
        let top = uniq("rel-top");
        e.add_node(qcow2_spec(
            &top,
            &self.test_img,
            false,
            BackingSpec::Default,
        ))
        .unwrap();
        top
    }

    fn assert_base_data(&self) {
        assert_pattern("raw", &self.backing_abs, 0xab, 0, 524288);
        assert_pattern("raw", &self.backing_abs, 0xef, 524288, 524288);
    }
}

/// TestRelativePaths.test_commit: top and base named by their relative backing file names.
#[test]
fn relative_paths_commit() {
    if !have_qemu() {
        return;
    }
    let r = relative_paths("rel-commit");
    let before = qemu_content(&r.test_img);
    let e = default_engine();
    let top = r.open(&e);
    let mut a = CommitArgs::new(&top);
    a.top = Some(REL_MID.into());
    a.base = Some(REL_BACKING.into());
    assert_eq!(run_commit(&e, a, false), MIB);
    drop(e);
    r.assert_base_data();
    // The header names the base: a name that resolves to it from test.img's folder.
    let name = qemu_backing(&r.test_img).expect("a backing file");
    let resolved = Path::new(&r.test_img).parent().unwrap().join(&name);
    assert_eq!(
        resolved.canonicalize().unwrap(),
        Path::new(&r.backing_abs).canonicalize().unwrap(),
        "{name}"
    );
    assert_check_clean(&r.test_img);
    assert_eq!(qemu_content(&r.test_img), before);
}

/// TestRelativePaths.test_top_is_active: top by its (absolute) file name, base by its
/// relative backing file name.
#[test]
fn relative_paths_top_is_active() {
    if !have_qemu() {
        return;
    }
    let r = relative_paths("rel-active");
    let before = qemu_content(&r.test_img);
    let e = default_engine();
    let top = r.open(&e);
    let device = e.backend(&top, &[], BackendOptions::default()).unwrap();
    let mut a = CommitArgs::new(&top);
    a.top = Some(r.test_img.clone());
    a.base = Some(REL_BACKING.into());
    run_commit(&e, a, true);
    assert_ne!(device.root().name(), top, "the device moved to base");
    drop(device);
    drop(e);
    r.assert_base_data();
    assert_eq!(qemu_content(&r.backing_abs), before);
}

/// TestRelativePaths' argument errors: relative names in QEMU's texts.
#[test]
fn relative_paths_argument_errors() {
    if !have_qemu() {
        return;
    }
    let r = relative_paths("rel-err");
    let e = default_engine();
    let top = r.open(&e);
    let msg = |f: &dyn Fn(&mut CommitArgs)| {
        let mut a = CommitArgs::new(&top);
        f(&mut a);
        e.commit(a).unwrap_err()
    };
    // test_device_not_found
    let nf = msg(&|a| {
        a.device = "nonexistent".into();
        a.top = Some(REL_MID.into());
    });
    assert_eq!(nf.kind(), ErrorKind::DeviceNotFound);
    let msg = |f: &dyn Fn(&mut CommitArgs)| msg(f).full_message();
    // test_top_same_base
    assert_eq!(
        msg(&|a| {
            a.top = Some(REL_MID.into());
            a.base = Some(REL_MID.into());
        }),
        format!("Can't find '{REL_MID}' in the backing chain")
    );
    // test_top_invalid
    assert_eq!(
        msg(&|a| {
            a.top = Some("badfile".into());
            a.base = Some(REL_BACKING.into());
        }),
        "Top image file badfile not found"
    );
    // test_base_invalid
    assert_eq!(
        msg(&|a| {
            a.top = Some(REL_MID.into());
            a.base = Some("badfile".into());
        }),
        "Can't find 'badfile' in the backing chain"
    );
    // test_top_and_base_reversed
    assert_eq!(
        msg(&|a| {
            a.top = Some(REL_BACKING.into());
            a.base = Some(REL_MID.into());
        }),
        format!("Can't find '{REL_MID}' in the backing chain")
    );
    assert_untouched(&e, &[&top]);
}

// ---------------------------------------------------------------------------------------
// TestSetSpeed
// ---------------------------------------------------------------------------------------

/// 040 TestSetSpeed: the speed given to block-commit shows in query-block-jobs, set-speed
/// changes it, a negative speed is refused with QEMU's text, and a cancel leaves the chain as
/// it was (BLOCK_JOB_CANCELLED). QEMU holds the job with a blkdebug breakpoint; here mid holds
/// 8 MiB to copy at 1 MiB/s and the test pauses the job at once, then waits for it to park.
#[test]
fn set_speed() {
    if !have_qemu() {
        return;
    }
    let len = 80 * MIB;
    let backing = Scratch::new_in("/var/tmp", "speed-backing");
    let mid = Scratch::new_in("/var/tmp", "speed-mid");
    let test = Scratch::new_in("/var/tmp", "speed-test");
    qemu_img_create("raw", backing.path(), None, Some(len));
    qemu_img_create("qcow2", mid.path(), Some((backing.path(), "raw")), None);
    qemu_img_create("qcow2", test.path(), Some((mid.path(), "qcow2")), None);
    run_qemu_io("qcow2", test.path(), &["write -P 0x1 0 512"]);
    run_qemu_io("qcow2", mid.path(), &["write -P 0xef 524288 8M"]);
    let before = qemu_content(test.path());
    let e = default_engine();
    let (top, mid_n, base) = (uniq("sp-top"), uniq("sp-mid"), uniq("sp-base"));
    e.add_node(qcow2_spec(
        &top,
        test.path(),
        false,
        backing_spec(qcow2_spec(
            &mid_n,
            mid.path(),
            true,
            backing_spec(raw_spec(&base, backing.path(), true)),
        )),
    ))
    .unwrap();
    const NEGATIVE: &str = "Parameter 'speed' expects a non-negative value";
    let mut a = CommitArgs::new(&top);
    a.top = Some(mid.path().to_string());
    a.job.speed = -1;
    assert_eq!(e.commit(a).unwrap_err().full_message(), NEGATIVE);
    assert_untouched(&e, &[&top, &mid_n, &base]);

    let rx = e.jobs().subscribe();
    let mut a = CommitArgs::new(&top);
    a.top = Some(mid.path().to_string());
    a.job.speed = MIB as i64;
    let job = e.commit(a).unwrap();
    job.user_pause().unwrap();
    // Ensure the speed we set was accepted.
    let info = job.info();
    assert_eq!(info.device, top);
    assert_eq!(info.id, top, "the job id defaults to the device");
    assert_eq!(info.speed, MIB);
    assert_eq!(job.wait_for(JobStatus::Paused), JobStatus::Paused);
    assert_eq!(job.set_speed(-1).unwrap_err().full_message(), NEGATIVE);
    job.set_speed(2 * MIB as i64).unwrap();
    assert_eq!(job.info().speed, 2 * MIB);
    // cancel_and_wait(resume=True)
    job.cancel(true).unwrap();
    assert_eq!(job.wait().error.as_deref(), Some("Operation canceled"));
    let seen: Vec<JobEventKind> = rx.try_iter().map(|e| e.kind).collect();
    let cancelled: Vec<&JobEventKind> = seen
        .iter()
        .filter(|k| matches!(k, JobEventKind::Cancelled { .. }))
        .collect();
    match cancelled[..] {
        [JobEventKind::Cancelled {
            id,
            kind,
            len: l,
            offset,
            speed,
        }] => {
            assert_eq!(id, &top);
            assert_eq!(*kind, JobType::Commit);
            assert_eq!(*l, len);
            assert!(*offset < len);
            assert_eq!(*speed, 2 * MIB);
        }
        _ => panic!("one BLOCK_JOB_CANCELLED expected: {seen:?}"),
    }
    assert!(!seen
        .iter()
        .any(|k| matches!(k, JobEventKind::Completed { .. })));
    assert_untouched(&e, &[&top, &mid_n, &base]);
    let t = e.node(&top).unwrap();
    assert_eq!(t.backing().unwrap().name(), mid_n);
    assert!(e.node(&base).unwrap().is_read_only());
    drop(t);
    drop(e);
    assert_backing(test.path(), Some(mid.path()));
    assert_check_clean(test.path());
    assert_check_clean(mid.path());
    assert_eq!(qemu_content(test.path()), before);
}

// ---------------------------------------------------------------------------------------
// TestReopenOverlay
// ---------------------------------------------------------------------------------------

/// 040 TestReopenOverlay: 0.img (raw) <- 1.img <- 2.img <- 3.img, the drive on 3.img; a
/// commit of 1.img into 0.img must reopen the read-only overlay 2.img read-write to write its
/// new backing file name, and read-only again after.
#[test]
fn reopen_overlay() {
    if !have_qemu() {
        return;
    }
    let imgs: Vec<Scratch> = (0..4)
        .map(|i| Scratch::new_in("/var/tmp", &format!("ro{i}")))
        .collect();
    create_image(imgs[0].path(), MIB);
    qemu_img_create("qcow2", imgs[1].path(), Some((imgs[0].path(), "raw")), None);
    qemu_img_create(
        "qcow2",
        imgs[2].path(),
        Some((imgs[1].path(), "qcow2")),
        None,
    );
    qemu_img_create(
        "qcow2",
        imgs[3].path(),
        Some((imgs[2].path(), "qcow2")),
        None,
    );
    run_qemu_io("qcow2", imgs[1].path(), &["write -P 0xab 0 128K"]);
    let before = qemu_content(imgs[3].path());
    let e = default_engine();
    let top = uniq("ro-top");
    e.add_node(qcow2_spec(
        &top,
        imgs[3].path(),
        false,
        BackingSpec::Default,
    ))
    .unwrap();
    let mut a = CommitArgs::new(&top);
    a.top = Some(imgs[1].path().to_string());
    a.base = Some(imgs[0].path().to_string());
    assert_eq!(run_commit(&e, a, false), MIB);
    let overlay = e.node(&top).unwrap().backing().unwrap();
    assert!(overlay.is_read_only(), "the overlay is read-only again");
    let base = overlay.backing().unwrap();
    assert!(base.is_read_only(), "base is read-only again");
    assert_eq!(base.driver_name(), "raw");
    drop((overlay, base));
    drop(e);
    assert_backing(imgs[2].path(), Some(imgs[0].path()));
    assert_backing(imgs[3].path(), Some(imgs[2].path()));
    assert_all_clean(&imgs[1..]);
    assert_pattern("raw", imgs[0].path(), 0xab, 0, 128 * KIB);
    assert_eq!(qemu_content(imgs[3].path()), before);
}

// ---------------------------------------------------------------------------------------
// TestCommitWithFilters
// ---------------------------------------------------------------------------------------

/// 040 TestCommitWithFilters: four 64 MiB qcow2 images without backing files in their
/// headers, image i holding pattern i + 1 in [i MiB, (i + 1) MiB), assembled by one
/// blockdev-add as top-filter -> cow-3 -> cow-2 -> cow-1 -> bottom-filter -> cow-0.
struct WithFilters {
    imgs: Vec<Scratch>,
    /// Which image holds pattern i + 1 after the test (040's pattern_files).
    pattern_files: Vec<usize>,
    top_filter: String,
    bottom_filter: String,
    cow: Vec<String>,
}

fn with_filters(tag: &str, e: &Engine) -> WithFilters {
    let imgs: Vec<Scratch> = (0..4)
        .map(|i| Scratch::new_in("/var/tmp", &format!("{tag}{i}")))
        .collect();
    for (i, img) in imgs.iter().enumerate() {
        qemu_img_create("qcow2", img.path(), None, Some(64 * MIB));
        run_qemu_io(
            "qcow2",
            img.path(),
            &[format!("write -P {} {i}M 1M", i + 1)],
        );
    }
    let cow: Vec<String> = (0..4).map(|i| uniq(&format!("cow-{i}"))).collect();
    let (top_filter, bottom_filter) = (uniq("top-filter"), uniq("bottom-filter"));
    let q = |i: usize, backing: BackingSpec| qcow2_spec(&cow[i], imgs[i].path(), false, backing);
    let cow0 = q(0, BackingSpec::None);
    let cow1 = q(1, backing_spec(filter_spec(&bottom_filter, cow0)));
    let cow2 = q(2, backing_spec(cow1));
    let cow3 = q(3, backing_spec(cow2));
    e.add_node(filter_spec(&top_filter, cow3)).unwrap();
    WithFilters {
        imgs,
        pattern_files: vec![0, 1, 2, 3],
        top_filter,
        bottom_filter,
        cow,
    }
}

impl WithFilters {
    fn args(&self) -> CommitArgs {
        let mut a = CommitArgs::new(&self.top_filter);
        a.job.job_id = Some("commit".into());
        a
    }

    /// 040's tearDown: each pattern reads back from the image that holds it now.
    fn check(&self) {
        for (index, &f) in self.pattern_files.iter().enumerate() {
            let path = self.imgs[f].path();
            let out = run_qemu_io(
                "qcow2",
                path,
                &[format!("read -P {} {index}M 1M", index + 1)],
            );
            assert!(
                !out.contains("Pattern verification failed"),
                "pattern {} in {path}: {out}",
                index + 1
            );
            assert_check_clean(path);
        }
    }
}

#[test]
fn filterless_commit() {
    if !have_qemu() {
        return;
    }
    let e = default_engine();
    let mut f = with_filters("wf-less", &e);
    let mut a = f.args();
    a.top_node = Some(f.cow[2].clone());
    a.base_node = Some(f.cow[1].clone());
    run_commit(&e, a, false);
    assert!(node_exists(&f.cow[3]));
    assert!(!node_exists(&f.cow[2]));
    assert!(node_exists(&f.cow[1]));
    assert!(node_exists(&f.bottom_filter));
    assert_eq!(
        e.node(&f.cow[3]).unwrap().backing().unwrap().name(),
        f.cow[1]
    );
    drop(e);
    // 2 has been committed into 1.
    f.pattern_files[2] = 1;
    f.check();
    assert_backing(f.imgs[3].path(), Some(f.imgs[1].path()));
}

#[test]
fn commit_through_filter() {
    if !have_qemu() {
        return;
    }
    let e = default_engine();
    let mut f = with_filters("wf-through", &e);
    let mut a = f.args();
    a.top_node = Some(f.cow[1].clone());
    a.base_node = Some(f.cow[0].clone());
    run_commit(&e, a, false);
    assert!(node_exists(&f.cow[2]));
    assert!(!node_exists(&f.cow[1]));
    assert!(!node_exists(&f.bottom_filter));
    assert!(node_exists(&f.cow[0]));
    assert_eq!(
        e.node(&f.cow[2]).unwrap().backing().unwrap().name(),
        f.cow[0]
    );
    drop(e);
    // 1 has been committed into 0.
    f.pattern_files[1] = 0;
    f.check();
}

/// test_filtered_active_commit_with_filter: top is the device, a filter: the device moves
/// to base, the filter and cow-3 go.
#[test]
fn filtered_active_commit_with_filter() {
    if !have_qemu() {
        return;
    }
    let e = default_engine();
    let mut f = with_filters("wf-with", &e);
    // A device, so the job finds a parent to point at base.
    let device = e
        .backend(&f.top_filter, &[], BackendOptions::default())
        .unwrap();
    // Releasing top-filter does not work while the device uses it.
    assert_eq!(
        e.del_node(&f.top_filter).unwrap_err().full_message(),
        format!("Node {} is in use", f.top_filter)
    );
    let mut a = f.args();
    a.base_node = Some(f.cow[2].clone());
    run_commit(&e, a, true);
    e.del_node(&f.top_filter).unwrap();
    assert!(!node_exists(&f.top_filter));
    assert!(!node_exists(&f.cow[3]));
    assert!(node_exists(&f.cow[2]));
    // The device is connected to cow-2 now.
    assert_eq!(device.root().name(), f.cow[2]);
    drop(device);
    drop(e);
    // 3 has been committed into 2.
    f.pattern_files[3] = 2;
    f.check();
}

/// test_filtered_active_commit_without_filter: top is the image below the device's filter,
/// which makes it an active commit (QEMU compares the nodes with filters skipped); the filter
/// stays and now sits on cow-2.
#[test]
fn filtered_active_commit_without_filter() {
    if !have_qemu() {
        return;
    }
    let e = default_engine();
    let mut f = with_filters("wf-without", &e);
    let mut a = f.args();
    a.top_node = Some(f.cow[3].clone());
    a.base_node = Some(f.cow[2].clone());
    run_commit(&e, a, true);
    assert!(node_exists(&f.top_filter));
    assert!(!node_exists(&f.cow[3]));
    assert!(node_exists(&f.cow[2]));
    let tf = e.node(&f.top_filter).unwrap();
    assert_eq!(tf.filtered().unwrap().name(), f.cow[2]);
    drop(tf);
    drop(e);
    // 3 has been committed into 2.
    f.pattern_files[3] = 2;
    f.check();
}

// ---------------------------------------------------------------------------------------
// A base smaller than top
// ---------------------------------------------------------------------------------------

/// base (raw, 1 MiB) <- mid (qcow2, 2 MiB, data across and above base's end) <- top (qcow2,
/// 2 MiB, data above base's end).
fn short_raw_base(tag: &str) -> [Scratch; 3] {
    let base = Scratch::new_in("/var/tmp", &format!("{tag}-base"));
    let mid = Scratch::new_in("/var/tmp", &format!("{tag}-mid"));
    let top = Scratch::new_in("/var/tmp", &format!("{tag}-top"));
    create_image(base.path(), MIB);
    qemu_img_create(
        "qcow2",
        mid.path(),
        Some((base.path(), "raw")),
        Some(2 * MIB),
    );
    qemu_img_create(
        "qcow2",
        top.path(),
        Some((mid.path(), "qcow2")),
        Some(2 * MIB),
    );
    run_qemu_io("qcow2", mid.path(), &["write -P 0xef 512K 1M"]);
    run_qemu_io("qcow2", top.path(), &["write -P 0x22 1792K 64K"]);
    [base, mid, top]
}

/// The chain, base and mid read-only (as backing files open) or read-write (as blockdev-add
/// opens nodes).
fn open_short_raw_base(e: &Engine, imgs: &[Scratch; 3], read_only: bool) -> Names {
    let n = Names {
        top: uniq("short-top"),
        mid: uniq("short-mid"),
        base: uniq("short-base"),
    };
    e.add_node(qcow2_spec(
        &n.top,
        imgs[2].path(),
        false,
        backing_spec(qcow2_spec(
            &n.mid,
            imgs[1].path(),
            read_only,
            backing_spec(raw_spec(&n.base, imgs[0].path(), read_only)),
        )),
    ))
    .unwrap();
    n
}

/// An intermediate commit into a raw base half the size of mid: the base grows to 2 MiB
/// first (QEMU's commit_run truncates it), and reads as mid did (zeroes where nothing was).
fn commit_into_smaller_base(tag: &str, read_only: bool) {
    let imgs = short_raw_base(tag);
    let before = qemu_content(imgs[2].path());
    let mid = qemu_content(imgs[1].path());
    let e = default_engine();
    let n = open_short_raw_base(&e, &imgs, read_only);
    let mut a = CommitArgs::new(&n.top);
    a.top_node = Some(n.mid.clone());
    assert_eq!(run_commit(&e, a, false), 2 * MIB);
    assert_eq!(e.node(&n.base).unwrap().len(), 2 * MIB, "base grown");
    drop(e);
    assert_eq!(std::fs::metadata(imgs[0].path()).unwrap().len(), 2 * MIB);
    assert_eq!(std::fs::read(imgs[0].path()).unwrap(), mid);
    assert_backing(imgs[2].path(), Some(imgs[0].path()));
    assert_check_clean(imgs[2].path());
    assert_eq!(qemu_content(imgs[2].path()), before);
}

/// The same with an active commit of the whole chain into the raw base.
fn active_commit_into_smaller_base(tag: &str, read_only: bool) {
    let imgs = short_raw_base(tag);
    let before = qemu_content(imgs[2].path());
    let e = default_engine();
    let n = open_short_raw_base(&e, &imgs, read_only);
    let device = e.backend(&n.top, &[], BackendOptions::default()).unwrap();
    run_commit(&e, CommitArgs::new(&n.top), true);
    assert_eq!(device.root().name(), n.base);
    assert_eq!(device.root().len(), 2 * MIB, "base grown");
    drop(device);
    drop(e);
    assert_eq!(std::fs::read(imgs[0].path()).unwrap(), before);
}

#[test]
fn commit_grows_a_smaller_base() {
    if have_qemu() {
        commit_into_smaller_base("short-i", false);
    }
}

#[test]
fn active_commit_grows_a_smaller_base() {
    if have_qemu() {
        active_commit_into_smaller_base("short-a", false);
    }
}

/// The base opened read-only (as a backing file), so the job reopens it read-write first.
#[test]
fn commit_grows_a_smaller_read_only_base() {
    if have_qemu() {
        commit_into_smaller_base("short-iro", true);
    }
}

#[test]
fn active_commit_grows_a_smaller_read_only_base() {
    if have_qemu() {
        active_commit_into_smaller_base("short-aro", true);
    }
}
