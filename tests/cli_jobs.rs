//! End-to-end tests of the offline block-job tools (`strata stream`, `strata commit`), with
//! `qemu-img` and `qemu-io` as the independent oracles: the chains are built by QEMU, a
//! flattened copy is taken before the job, and afterwards the image must read the same
//! (`qemu-img compare`), show the expected chain (`qemu-img info --backing-chain`) and pass
//! `qemu-img check`.
//!
//! Tests print a reason and return where qemu-img or qemu-io is absent. The images live in
//! /var/tmp (a disk, so the `-t none` runs use O_DIRECT for real) and are small.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{assert_one_line_error, ok, stderr, stdout, QemuIoHolder, TmpDir};
use serde_json::Value;

/// A private directory on disk (/var/tmp where there is one), removed at drop.
fn tmp_dir(tag: &str) -> TmpDir {
    let root = if Path::new("/var/tmp").is_dir() {
        PathBuf::from("/var/tmp")
    } else {
        std::env::temp_dir()
    };
    TmpDir::under(&root, "jobs", tag)
}

fn run_in(dir: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn strata_in(dir: &Path, args: &[&str]) -> Output {
    run_in(dir, env!("CARGO_BIN_EXE_strata"), args)
}

/// Runs qemu-img (or qemu-io) in `dir` and checks it succeeded.
fn q(dir: &Path, prog: &str, args: &[&str]) -> Output {
    let o = run_in(dir, prog, args);
    ok(&o, &format!("{prog} {args:?}"));
    o
}

/// `qemu-img create -q -f qcow2 [-o OPTS] [-b BACKING -F qcow2] FILE [SIZE]` in `dir`.
fn create_qcow2(
    dir: &Path,
    opts: Option<&str>,
    backing: Option<&str>,
    file: &str,
    size: Option<&str>,
) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(o) = opts {
        args.extend(["-o", o]);
    }
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.push(file);
    args.extend(size);
    q(dir, "qemu-img", &args);
}

/// qemu-io in `dir` on `file` (its format probed), with each of `cmds` as a `-c` command.
fn qemu_io(dir: &Path, file: &str, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    q(dir, "qemu-io", &args);
}

/// Whether qemu-img and qemu-io are installed (else a printed reason).
fn have_qemu() -> bool {
    for tool in ["qemu-img", "qemu-io"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("skipped: {tool} is not installed");
            return false;
        }
    }
    true
}

/// `qemu-img check`: exit 0, no errors, no leaks.
fn check_clean(dir: &Path, file: &str) {
    let o = run_in(dir, "qemu-img", &["check", "--output=json", file]);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("qemu-img check {file}: {}{}", stdout(&o), stderr(&o)));
    assert_eq!(o.status.code(), Some(0), "qemu-img check {file}: {v}");
    assert_eq!(v["check-errors"], 0, "{file}: {v}");
    assert!(v.get("leaks").is_none(), "{file}: {v}");
    assert!(v.get("corruptions").is_none(), "{file}: {v}");
}

/// `qemu-img compare A B` says they read the same.
fn assert_same(dir: &Path, a: &str, b: &str) {
    let o = run_in(dir, "qemu-img", &["compare", a, b]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img compare {a} {b}: {}{}",
        stdout(&o),
        stderr(&o)
    );
}

/// The chain as `qemu-img info --backing-chain` shows it: (filename, backing-filename) per
/// image, top first.
fn chain(dir: &Path, top: &str) -> Vec<(String, Option<String>)> {
    let o = q(
        dir,
        "qemu-img",
        &["info", "--backing-chain", "--output=json", top],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["filename"].as_str().unwrap().to_string(),
                i["backing-filename"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn virtual_size(dir: &Path, file: &str) -> u64 {
    let o = q(dir, "qemu-img", &["info", "--output=json", file]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Bytes of `file` that `file` itself maps (allocated in it, data or zeroes), per
/// `qemu-img map`: depth 0 entries that are present.
fn own_bytes(dir: &Path, file: &str) -> u64 {
    let o = q(dir, "qemu-img", &["map", "--output=json", file]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// Builds base <- mid <- top in `dir` (16 MiB; mid with 4 KiB clusters; data, zeroes and
/// partial clusters at every level, overlapping) and `flat.raw`, what top reads.
/// `compat` is the qcow2 compat level of all three.
fn build_chain(dir: &Path, compat: &str) {
    let c = format!("compat={compat}");
    create_qcow2(dir, Some(&c), None, "base.qcow2", Some("16M"));
    qemu_io(
        dir,
        "base.qcow2",
        &["write -P 0x11 0 8M", "write -P 0x12 12M 1M"],
    );
    let mid_opts = format!("{c},cluster_size=4k");
    create_qcow2(dir, Some(&mid_opts), Some("base.qcow2"), "mid.qcow2", None);
    let mut mid_cmds = vec![
        "write -P 0x21 1M 2M",
        "write -P 0x22 7M 6000",
        "write -P 0x23 14M 512k",
    ];
    if compat != "0.10" {
        mid_cmds.push("write -z 9M 64k");
    }
    qemu_io(dir, "mid.qcow2", &mid_cmds);
    create_qcow2(dir, Some(&c), Some("mid.qcow2"), "top.qcow2", None);
    let mut top_cmds = vec![
        "write -P 0x31 2M 64k",
        "write -P 0x32 5M 4k",
        "write -P 0x33 15M 1M",
    ];
    if compat != "0.10" {
        top_cmds.push("write -z 12M 128k");
    }
    qemu_io(dir, "top.qcow2", &top_cmds);
    q(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "flat.raw"],
    );
    q(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "mid.qcow2", "flat-mid.raw"],
    );
}

#[test]
fn stream_whole_chain_makes_top_standalone() {
    if !have_qemu() {
        return;
    }
    for (compat, cache) in [("1.1", "writeback"), ("1.1", "none"), ("0.10", "writeback")] {
        let dir = tmp_dir("stream-all");
        let d = &dir.0;
        build_chain(d, compat);
        let o = strata_in(d, &["stream", "-t", cache, "top.qcow2"]);
        ok(&o, "strata stream");
        assert_eq!(stdout(&o), "", "stream prints nothing");
        assert_same(d, "flat.raw", "top.qcow2");
        assert_eq!(chain(d, "top.qcow2"), vec![("top.qcow2".into(), None)]);
        check_clean(d, "top.qcow2");
        // The images below were only read.
        assert_same(d, "flat-mid.raw", "mid.qcow2");
        check_clean(d, "mid.qcow2");
        check_clean(d, "base.qcow2");
    }
}

#[test]
fn stream_with_base_keeps_it_as_backing() {
    if !have_qemu() {
        return;
    }
    let dir = tmp_dir("stream-base");
    let d = &dir.0;
    build_chain(d, "1.1");
    let o = strata_in(d, &["stream", "-q", "--base", "base.qcow2", "top.qcow2"]);
    ok(&o, "strata stream --base");
    assert_same(d, "flat.raw", "top.qcow2");
    assert_eq!(
        chain(d, "top.qcow2"),
        vec![
            ("top.qcow2".into(), Some("base.qcow2".into())),
            ("base.qcow2".into(), None)
        ]
    );
    check_clean(d, "top.qcow2");
    check_clean(d, "base.qcow2");
    // Only what lay between top and base was copied: base's own data stays in base.
    assert!(own_bytes(d, "top.qcow2") < 8 << 20);

    // The base named by the image's own backing name is its backing file already: nothing
    // to copy, the chain stays.
    let dir = tmp_dir("stream-base-direct");
    let d = &dir.0;
    build_chain(d, "1.1");
    let before = own_bytes(d, "top.qcow2");
    ok(
        &strata_in(d, &["stream", "-b", "mid.qcow2", "top.qcow2"]),
        "strata stream -b mid",
    );
    assert_eq!(own_bytes(d, "top.qcow2"), before);
    assert_eq!(chain(d, "top.qcow2").len(), 3);
    assert_same(d, "flat.raw", "top.qcow2");
    check_clean(d, "top.qcow2");
}

#[test]
fn stream_names_the_base_as_seen_from_the_image() {
    if !have_qemu() {
        return;
    }
    // top.qcow2 -> sub/mid.qcow2 -> base.qcow2 (in sub/, named relative to mid).
    let dir = tmp_dir("stream-names");
    let d = &dir.0;
    fs::create_dir(dir.path("sub")).unwrap();
    let sub = dir.path("sub");
    create_qcow2(&sub, None, None, "base.qcow2", Some("4M"));
    qemu_io(&sub, "base.qcow2", &["write -P 7 0 4M"]);
    create_qcow2(&sub, None, Some("base.qcow2"), "mid.qcow2", None);
    qemu_io(&sub, "mid.qcow2", &["write -P 8 1M 1M"]);
    create_qcow2(d, None, Some("sub/mid.qcow2"), "top.qcow2", None);
    qemu_io(d, "top.qcow2", &["write -P 9 3M 64k"]);
    q(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "flat.raw"],
    );
    // Run from elsewhere with absolute paths: the header gets base's name relative to top.
    let top = dir.path("top.qcow2");
    let base = dir.path("sub/base.qcow2");
    let o = strata_in(
        Path::new("/"),
        &[
            "stream",
            "-b",
            base.to_str().unwrap(),
            top.to_str().unwrap(),
        ],
    );
    ok(&o, "strata stream from /");
    let c = chain(d, "top.qcow2");
    assert_eq!(c[0].1.as_deref(), Some("sub/base.qcow2"), "{c:?}");
    assert_eq!(c.len(), 2);
    assert_same(d, "flat.raw", "top.qcow2");
    check_clean(d, "top.qcow2");
}

#[test]
fn commit_into_the_backing_file_empties_the_image() {
    if !have_qemu() {
        return;
    }
    for (compat, cache) in [("1.1", "writeback"), ("1.1", "none"), ("0.10", "none")] {
        let dir = tmp_dir("commit");
        let d = &dir.0;
        build_chain(d, compat);
        let base_before = fs::read(dir.path("base.qcow2")).unwrap();
        let o = strata_in(d, &["commit", "-t", cache, "top.qcow2"]);
        ok(&o, "strata commit");
        assert_eq!(stdout(&o), "Image committed.\n");
        // mid now reads what top read; top is an empty overlay of it; base is untouched.
        assert_same(d, "flat.raw", "mid.qcow2");
        assert_same(d, "flat.raw", "top.qcow2");
        assert_eq!(own_bytes(d, "top.qcow2"), 0, "{compat} {cache}");
        assert_eq!(chain(d, "top.qcow2").len(), 3);
        assert_eq!(fs::read(dir.path("base.qcow2")).unwrap(), base_before);
        for f in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
            check_clean(d, f);
        }
    }
}

#[test]
fn commit_drop_keeps_the_image_and_base_drops_the_images_between() {
    if !have_qemu() {
        return;
    }
    // -d: top keeps its data.
    let dir = tmp_dir("commit-d");
    let d = &dir.0;
    build_chain(d, "1.1");
    let top_before = own_bytes(d, "top.qcow2");
    ok(
        &strata_in(d, &["commit", "-q", "-d", "top.qcow2"]),
        "commit -d",
    );
    assert_eq!(own_bytes(d, "top.qcow2"), top_before);
    assert_same(d, "flat.raw", "mid.qcow2");
    assert_same(d, "flat.raw", "top.qcow2");
    check_clean(d, "top.qcow2");
    check_clean(d, "mid.qcow2");

    // --base further down: base gets top's and mid's data, top names base and is emptied.
    for drop in [false, true] {
        let dir = tmp_dir("commit-base");
        let d = &dir.0;
        build_chain(d, "1.1");
        let mut args = vec!["commit", "-t", "none", "-b", "base.qcow2"];
        if drop {
            args.push("--drop");
        }
        args.push("top.qcow2");
        let o = strata_in(d, &args);
        ok(&o, "strata commit -b base");
        assert_same(d, "flat.raw", "base.qcow2");
        assert_same(d, "flat.raw", "top.qcow2");
        assert_eq!(
            chain(d, "top.qcow2"),
            vec![
                ("top.qcow2".into(), Some("base.qcow2".into())),
                ("base.qcow2".into(), None)
            ]
        );
        assert_eq!(own_bytes(d, "top.qcow2") == 0, !drop);
        check_clean(d, "top.qcow2");
        check_clean(d, "base.qcow2");
    }
}

#[test]
fn commit_grows_a_smaller_base() {
    if !have_qemu() {
        return;
    }
    let dir = tmp_dir("commit-grow");
    let d = &dir.0;
    create_qcow2(d, None, None, "base.qcow2", Some("4M"));
    qemu_io(d, "base.qcow2", &["write -P 1 0 4M"]);
    create_qcow2(d, None, Some("base.qcow2"), "top.qcow2", Some("8M"));
    qemu_io(d, "top.qcow2", &["write -P 2 3M 2M", "write -P 3 7M 64k"]);
    q(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "flat.raw"],
    );
    ok(&strata_in(d, &["commit", "-q", "top.qcow2"]), "commit");
    assert_eq!(virtual_size(d, "base.qcow2"), 8 << 20);
    assert_same(d, "flat.raw", "base.qcow2");
    assert_same(d, "flat.raw", "top.qcow2");
    check_clean(d, "base.qcow2");
    check_clean(d, "top.qcow2");
}

#[test]
fn speed_limit_and_progress_lines() {
    if !have_qemu() {
        return;
    }
    let dir = tmp_dir("speed");
    let d = &dir.0;
    build_chain(d, "1.1");
    // stderr is a pipe here: -p prints one line per percent, ending at 100.
    let o = strata_in(d, &["stream", "-p", "--speed", "64M", "top.qcow2"]);
    ok(&o, "stream -p --speed");
    let err = stderr(&o);
    assert!(err.trim_end().ends_with("(100.00/100%)"), "{err}");
    assert_same(d, "flat.raw", "top.qcow2");
    check_clean(d, "top.qcow2");
    // Without -p and off a terminal: nothing on stderr.
    let dir = tmp_dir("speed-commit");
    let d = &dir.0;
    build_chain(d, "1.1");
    let o = strata_in(d, &["commit", "-r", "32M", "top.qcow2"]);
    ok(&o, "commit -r");
    assert_eq!(stderr(&o), "");
    assert_same(d, "flat.raw", "top.qcow2");
}

#[test]
fn errors_are_one_line_and_leave_the_images_alone() {
    if !have_qemu() {
        return;
    }
    let dir = tmp_dir("errors");
    let d = &dir.0;
    build_chain(d, "1.1");
    create_qcow2(d, None, None, "alone.qcow2", Some("1M"));
    File::create(dir.path("r.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let files = [
        "top.qcow2",
        "mid.qcow2",
        "base.qcow2",
        "alone.qcow2",
        "r.img",
    ];
    let snapshot = || -> Vec<Vec<u8>> {
        files
            .iter()
            .map(|f| fs::read(dir.path(f)).unwrap())
            .collect()
    };
    let before = snapshot();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["stream", "-b", "flat.raw", "top.qcow2"],
            &["'flat.raw' is not in the backing chain of 'top.qcow2'"],
        ),
        (
            &["commit", "-b", "alone.qcow2", "top.qcow2"],
            &["'alone.qcow2' is not in the backing chain of 'top.qcow2'"],
        ),
        (
            &["commit", "--base", "top.qcow2", "top.qcow2"],
            &["'top.qcow2'", "itself"],
        ),
        (
            &["stream", "-b", "base.qcow2", "alone.qcow2"],
            &["'base.qcow2' is not in the backing chain of 'alone.qcow2'"],
        ),
        (
            &["commit", "alone.qcow2"],
            &["'alone.qcow2' has no backing file"],
        ),
        (&["stream", "r.img"], &["'r.img'", "raw"]),
        (&["commit", "r.img"], &["'r.img'", "raw"]),
        (
            &["stream", "-f", "qcow2", "r.img"],
            &["not in qcow2 format"],
        ),
        (
            &["commit", "missing.qcow2"],
            &["Could not open 'missing.qcow2'"],
        ),
        (
            &["stream", "-t", "unsafe", "top.qcow2"],
            &["Invalid cache option", "unsafe"],
        ),
        (
            &["commit", "-r", "fast", "top.qcow2"],
            &["Invalid rate limit", "fast"],
        ),
        (&["stream", "-f", "vmdk", "top.qcow2"], &["vmdk"]),
        (&["commit"], &["<FILE>"]),
        (&["stream", "--bogus", "top.qcow2"], &["--bogus"]),
    ];
    for (args, needles) in cases {
        let o = strata_in(d, args);
        assert_one_line_error(&o, args[0], needles);
    }
    assert!(snapshot() == before, "an error changed an image");

    // An image another process writes is refused, whichever image of the chain it is.
    let holder = QemuIoHolder::new(&dir.path("top.qcow2"), "qcow2", 101);
    let s = strata_in(d, &["stream", "top.qcow2"]);
    let c = strata_in(d, &["commit", "top.qcow2"]);
    drop(holder);
    assert_one_line_error(&s, "stream", &["lock", "top.qcow2"]);
    assert_one_line_error(&c, "commit", &["lock", "top.qcow2"]);
    let holder = QemuIoHolder::new(&dir.path("base.qcow2"), "qcow2", 101);
    let c = strata_in(d, &["commit", "-b", "base.qcow2", "top.qcow2"]);
    drop(holder);
    assert_one_line_error(&c, "commit", &["lock", "base.qcow2"]);
    assert!(snapshot() == before, "a refused job changed an image");
    for f in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
        check_clean(d, f);
    }
}
