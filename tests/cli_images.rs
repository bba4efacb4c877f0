//! End-to-end tests of the offline image tools (`strata create`, `strata info`) and of
//! `strata bench` on qcow2 images, with `qemu-img` as the independent oracle: images strata
//! makes must pass `qemu-img check` and read back in `qemu-img info` as they were asked for;
//! what `strata info` shows of images qemu-img made must equal what `qemu-img info` shows.
//!
//! Tests that need qemu-img (or qemu-io) print a reason and return where it is absent. Each
//! keeps to a second or two: small images, `--runtime=1`.

mod common;

use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Output};

use common::{assert_one_line_error, ok, stderr, stdout, QemuIoHolder, TmpDir};
use serde_json::Value;

/// A private directory in the system temp dir, removed at drop.
fn tmp_dir(tag: &str) -> TmpDir {
    TmpDir::under(&std::env::temp_dir(), "images", tag)
}

fn strata_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn qemu_img_in(dir: &Path, args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// `qemu-img info --output=json` of `file` in `dir`.
fn qemu_img_info(dir: &Path, file: &str) -> Value {
    json(
        &qemu_img_in(dir, &["info", "--output=json", file]),
        "qemu-img info",
    )
}

fn json(o: &Output, what: &str) -> Value {
    ok(o, what);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{what}: bad JSON ({e}): {}", stdout(o)))
}

/// qemu-img's major version, or None (with a printed reason) where it is not installed.
fn qemu_img() -> Option<u32> {
    let out = match Command::new("qemu-img").arg("--version").output() {
        Ok(o) if o.status.success() => o,
        _ => {
            eprintln!("skipped: qemu-img is not installed");
            return None;
        }
    };
    let text = stdout(&out);
    let v = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    Some(v)
}

fn have_qemu_io() -> bool {
    let ok = Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: qemu-io is not installed");
    }
    ok
}

/// `qemu-img check`: exit 0 and no errors or leaks; returns its JSON.
fn check_clean(dir: &Path, file: &str) -> Value {
    let o = qemu_img_in(dir, &["check", "--output=json", file]);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("qemu-img check {file}: {}{}", stdout(&o), stderr(&o)));
    assert_eq!(o.status.code(), Some(0), "qemu-img check {file}: {v}");
    assert_eq!(v["check-errors"], 0, "{file}: {v}");
    assert!(v.get("leaks").is_none(), "{file}: {v}");
    v
}

/// The "Formatting ..." line with the file name taken out.
fn formatting_line(o: &Output, file: &str) -> String {
    stdout(o)
        .lines()
        .find(|l| l.starts_with("Formatting "))
        .unwrap_or_else(|| panic!("no Formatting line: {}", stdout(o)))
        .replace(&format!("'{file}'"), "'FILE'")
}

#[test]
fn create_qcow2_option_sets_pass_qemu_img_check() {
    let Some(major) = qemu_img() else { return };
    let dir = tmp_dir("create");
    // (options, size, cluster size, refcount bits, compat, lazy refcounts, preallocated)
    let sets: &[(&str, &str, u64, u64, &str, bool, bool)] = &[
        ("", "1G", 65536, 16, "1.1", false, false),
        ("cluster_size=512", "16M", 512, 16, "1.1", false, false),
        (
            "cluster_size=64k,refcount_bits=1",
            "64M",
            65536,
            1,
            "1.1",
            false,
            false,
        ),
        (
            "cluster_size=2M,refcount_bits=64",
            "1G",
            2 << 20,
            64,
            "1.1",
            false,
            false,
        ),
        ("compat=0.10", "1G", 65536, 16, "0.10", false, false),
        (
            "compat=v2,cluster_size=4k",
            "32M",
            4096,
            16,
            "0.10",
            false,
            false,
        ),
        ("lazy_refcounts=on", "1G", 65536, 16, "1.1", true, false),
        (
            "preallocation=metadata",
            "64M",
            65536,
            16,
            "1.1",
            false,
            true,
        ),
        (
            "preallocation=metadata,compat=0.10",
            "16M",
            65536,
            16,
            "0.10",
            false,
            true,
        ),
        (
            "preallocation=metadata,cluster_size=512,refcount_bits=4",
            "8M",
            512,
            4,
            "1.1",
            false,
            true,
        ),
        (
            "preallocation=full,cluster_size=2M",
            "8M",
            2 << 20,
            16,
            "1.1",
            false,
            true,
        ),
        (
            "preallocation=full,refcount_bits=8",
            "4M",
            65536,
            8,
            "1.1",
            false,
            true,
        ),
    ];
    for (i, &(opts, size, cs, rb, compat, lazy, prealloc)) in sets.iter().enumerate() {
        let (mine, theirs) = (format!("s{i}.qcow2"), format!("q{i}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let what = format!("strata create -o {opts}");
        let o = strata_in(&dir.0, &[&args[..], &[&mine, size]].concat());
        ok(&o, &what);
        assert!(stderr(&o).is_empty(), "{what}: {}", stderr(&o));
        let c = check_clean(&dir.0, &mine);
        if prealloc {
            assert_eq!(c["allocated-clusters"], c["total-clusters"], "{what}: {c}");
        } else {
            // qemu-img leaves the count out when it is zero.
            assert!(
                c.get("allocated-clusters").is_none_or(|a| a == 0),
                "{what}: {c}"
            );
        }
        let v = qemu_img_info(&dir.0, &mine);
        let want_size = match size {
            "1G" => 1u64 << 30,
            s => s.trim_end_matches('M').parse::<u64>().unwrap() << 20,
        };
        assert_eq!(v["virtual-size"], want_size, "{what}: {v}");
        assert_eq!(v["format"], "qcow2", "{what}");
        assert_eq!(v["cluster-size"], cs, "{what}: {v}");
        assert_eq!(v["dirty-flag"], false, "{what}");
        let d = &v["format-specific"]["data"];
        assert_eq!(d["compat"], compat, "{what}: {d}");
        assert_eq!(d["refcount-bits"], rb, "{what}: {d}");
        if compat == "1.1" {
            assert_eq!(d["lazy-refcounts"], lazy, "{what}: {d}");
            assert_eq!(d["corrupt"], false, "{what}: {d}");
            assert_eq!(d["extended-l2"], false, "{what}: {d}");
        }
        assert_eq!(d["compression-type"], "zlib", "{what}: {d}");
        // The line printed is qemu-img's for the same command.
        if major == 10 {
            let mut qargs = vec!["create", "-f", "qcow2"];
            if !opts.is_empty() {
                qargs.extend(["-o", opts]);
            }
            let q = qemu_img_in(&dir.0, &[&qargs[..], &[&theirs, size]].concat());
            ok(&q, "qemu-img create");
            assert_eq!(
                formatting_line(&o, &mine),
                formatting_line(&q, &theirs),
                "{what}"
            );
            let _ = fs::remove_file(dir.path(&theirs));
        }
        let _ = fs::remove_file(dir.path(&mine));
    }
}

#[test]
fn create_raw() {
    let has_qemu = qemu_img();
    let dir = tmp_dir("raw");
    let o = strata_in(&dir.0, &["create", "-f", "raw", "r.img", "1.5M"]);
    ok(&o, "create raw");
    assert_eq!(
        stdout(&o).trim_end(),
        "Formatting 'r.img', fmt=raw size=1572864"
    );
    assert_eq!(fs::metadata(dir.path("r.img")).unwrap().len(), 1_572_864);
    // The default format is raw, as qemu-img's.
    let o = strata_in(&dir.0, &["create", "d.img", "64k"]);
    ok(&o, "create default");
    assert_eq!(
        stdout(&o).trim_end(),
        "Formatting 'd.img', fmt=raw size=65536"
    );
    let o = strata_in(
        &dir.0,
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "p.img",
            "1M",
        ],
    );
    ok(&o, "create raw preallocated");
    assert!(stdout(&o).contains("fmt=raw size=1048576 preallocation=full"));
    {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(dir.path("p.img")).unwrap();
        assert_eq!(m.len(), 1 << 20);
        assert!(m.blocks() * 512 >= 1 << 20, "not allocated: {m:?}");
    }
    if has_qemu.is_some() {
        let v = qemu_img_info(&dir.0, "r.img");
        assert_eq!(v["format"], "raw");
        assert_eq!(v["virtual-size"], 1_572_864);
    }
}

#[test]
fn create_with_relative_backing_takes_its_size() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tmp_dir("backing");
    fs::create_dir(dir.path("sub")).unwrap();
    ok(
        &qemu_img_in(
            &dir.0,
            &["create", "-q", "-f", "qcow2", "base.qcow2", "48M"],
        ),
        "qemu-img create",
    );
    // Run from elsewhere: the name resolves against the new image's folder.
    let elsewhere = tmp_dir("cwd");
    let top = dir.path("sub/top.qcow2");
    let o = strata_in(
        &elsewhere.0,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    ok(&o, "create with -b");
    assert!(
        stdout(&o).contains("size=50331648 backing_file=../base.qcow2 backing_fmt=qcow2"),
        "{}",
        stdout(&o)
    );
    check_clean(&dir.0, "sub/top.qcow2");
    let v = qemu_img_info(&dir.0, "sub/top.qcow2");
    assert_eq!(v["virtual-size"], 48 << 20);
    assert_eq!(v["backing-filename"], "../base.qcow2");
    assert_eq!(v["full-backing-filename"], "sub/../base.qcow2");
    assert_eq!(v["backing-filename-format"], "qcow2");
    // qemu-img reads the chain.
    let v = json(
        &qemu_img_in(
            &dir.0,
            &["info", "--output=json", "--backing-chain", "sub/top.qcow2"],
        ),
        "qemu-img info --backing-chain",
    );
    assert_eq!(v.as_array().unwrap().len(), 2);

    // Without -F the backing format is probed and recorded; a given size wins.
    let o = strata_in(
        &dir.0,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "over.qcow2",
            "64M",
        ],
    );
    ok(&o, "create with -b, no -F");
    check_clean(&dir.0, "over.qcow2");
    let v = qemu_img_info(&dir.0, "over.qcow2");
    assert_eq!(v["virtual-size"], 64 << 20);
    assert_eq!(v["backing-filename-format"], "qcow2");

    // A raw backing file, given with -o.
    ok(
        &strata_in(&dir.0, &["create", "-q", "-f", "raw", "base.raw", "3M"]),
        "create raw",
    );
    let o = strata_in(
        &dir.0,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=base.raw,backing_fmt=raw,cluster_size=4k",
            "r.qcow2",
        ],
    );
    ok(&o, "create over raw");
    check_clean(&dir.0, "r.qcow2");
    let v = qemu_img_info(&dir.0, "r.qcow2");
    assert_eq!(v["virtual-size"], 3 << 20);
    assert_eq!(v["backing-filename-format"], "raw");
    assert_eq!(v["cluster-size"], 4096);
}

#[test]
fn create_errors_are_one_line_and_leave_nothing() {
    let dir = tmp_dir("errors");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["-f", "vmdk", "x.img", "1M"],
            &["Unknown file format 'vmdk'"],
        ),
        (
            &["-f", "qcow2", "-o", "bogus=1", "x.img", "1M"],
            &["Invalid parameter 'bogus'"],
        ),
        (
            &["-f", "raw", "-o", "cluster_size=4k", "x.img", "1M"],
            &["Invalid parameter 'cluster_size'"],
        ),
        (
            &["-f", "qcow2", "-o", "cluster_size=1000", "x.img", "1M"],
            &["Cluster size must be a power of two between 512 and 2048k"],
        ),
        (
            &["-f", "qcow2", "-o", "cluster_size=4M", "x.img", "1M"],
            &["Cluster size must be a power of two"],
        ),
        (
            &["-f", "qcow2", "-o", "refcount_bits=3", "x.img", "1M"],
            &["Refcount width must be a power of two"],
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,refcount_bits=1",
                "x.img",
                "1M",
            ],
            &["compatibility level 1.1"],
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,lazy_refcounts=on",
                "x.img",
                "1M",
            ],
            &["Lazy refcounts only supported with compatibility level 1.1"],
        ),
        (
            &["-f", "qcow2", "-o", "compat=1.2", "x.img", "1M"],
            &["compat", "'1.2'"],
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "preallocation=sometimes",
                "x.img",
                "1M",
            ],
            &["preallocation", "'sometimes'"],
        ),
        (
            &["-f", "qcow2", "-o", "lazy_refcounts=maybe", "x.img", "1M"],
            &["lazy_refcounts", "'on' or 'off'"],
        ),
        (
            &["-f", "qcow2", "x.img"],
            &["Image creation needs a size parameter"],
        ),
        (
            &["-f", "qcow2", "x.img", "12Q"],
            &["Invalid image size specified: '12Q'"],
        ),
        (
            &["-f", "qcow2", "-o", "size=1M", "x.img", "2M"],
            &["only once"],
        ),
        (
            &["-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "x.img"],
            &["Could not open", "missing.qcow2", "backing"],
        ),
        (
            &["-f", "qcow2", "-F", "qcow2", "x.img", "1M"],
            &["Backing format cannot be used without backing file"],
        ),
        (
            &["-f", "raw", "-b", "base.img", "x.img", "1M"],
            &["Backing file not supported for file format 'raw'"],
        ),
        (
            &["-f", "qcow2", "-o", "cluster_size=512", "x.img", "4E"],
            &["too large"],
        ),
    ];
    for (args, needles) in cases {
        let o = strata_in(&dir.0, &[&["create"][..], args].concat());
        assert_one_line_error(&o, "create", needles);
        assert!(!dir.path("x.img").exists(), "{args:?} left x.img behind");
    }

    // A file qemu-io has open is refused, and left as it was.
    if !have_qemu_io() {
        return;
    }
    let locked = dir.path("locked.img");
    File::create(&locked).unwrap().set_len(1 << 20).unwrap();
    let holder = QemuIoHolder::new(&locked, "raw", 100);
    let o = strata_in(&dir.0, &["create", "-f", "qcow2", "locked.img", "1M"]);
    drop(holder);
    assert_one_line_error(&o, "create", &["lock", "locked.img"]);
    assert_eq!(fs::metadata(&locked).unwrap().len(), 1 << 20);
}

/// The fields of `qemu-img info --output=json` that must agree.
const FIELDS: &[&str] = &[
    "virtual-size",
    "cluster-size",
    "format",
    "filename",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
];
const QCOW2_FIELDS: &[&str] = &[
    "compat",
    "refcount-bits",
    "lazy-refcounts",
    "corrupt",
    "extended-l2",
    "compression-type",
];

fn assert_same_info(mine: &Value, theirs: &Value, what: &str) {
    for f in FIELDS {
        assert_eq!(mine.get(*f), theirs.get(*f), "{what}: field {f}");
    }
    let (a, b) = (
        &mine["format-specific"]["data"],
        &theirs["format-specific"]["data"],
    );
    for f in QCOW2_FIELDS {
        assert_eq!(a.get(*f), b.get(*f), "{what}: format-specific {f}");
    }
    assert_eq!(
        mine["format-specific"]["type"], theirs["format-specific"]["type"],
        "{what}"
    );
}

#[test]
fn info_agrees_with_qemu_img() {
    let Some(major) = qemu_img() else { return };
    let dir = tmp_dir("info");
    let q = |args: &[&str]| ok(&qemu_img_in(&dir.0, args), &format!("qemu-img {args:?}"));
    fs::create_dir(dir.path("sub")).unwrap();
    q(&["create", "-q", "-f", "raw", "data.raw", "4M"]);
    // Some data to compress: qemu-img writes a pattern into the raw file.
    fs::write(dir.path("data.raw"), vec![0x5au8; 1 << 20]).unwrap();
    File::options()
        .write(true)
        .open(dir.path("data.raw"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    q(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "data.raw",
        "compressed.qcow2",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "8M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,refcount_bits=1,cluster_size=4k",
        "v3.qcow2",
        "8M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "l2.qcow2",
        "8M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../compressed.qcow2",
        "-F",
        "qcow2",
        "sub/mid.qcow2",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "sub/mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    // A backing file named without a format in the header (qemu-img 10 refuses to make
    // one; strata's -u does).
    ok(
        &strata_in(
            &dir.0,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "v2.qcow2",
                "nofmt.qcow2",
                "8M",
            ],
        ),
        "strata create -u",
    );
    let images = [
        "data.raw",
        "compressed.qcow2",
        "v2.qcow2",
        "v3.qcow2",
        "l2.qcow2",
        "sub/mid.qcow2",
        "top.qcow2",
        "nofmt.qcow2",
    ];
    for img in images {
        let mine = json(
            &strata_in(&dir.0, &["info", "--output", "json", img]),
            &format!("strata info {img}"),
        );
        let theirs = json(
            &qemu_img_in(&dir.0, &["info", "--output=json", img]),
            &format!("qemu-img info {img}"),
        );
        assert_same_info(&mine, &theirs, img);
        let mine = json(
            &strata_in(&dir.0, &["info", "--output=json", "--backing-chain", img]),
            &format!("strata info --backing-chain {img}"),
        );
        let theirs = json(
            &qemu_img_in(&dir.0, &["info", "--output=json", "--backing-chain", img]),
            &format!("qemu-img info --backing-chain {img}"),
        );
        let (a, b) = (mine.as_array().unwrap(), theirs.as_array().unwrap());
        assert_eq!(a.len(), b.len(), "{img}: chain length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_same_info(x, y, &format!("{img} chain entry {i}"));
        }
        // The human layout is qemu-img 10's, line for line.
        if major == 10 {
            for chain in [false, true] {
                let mut args = vec!["info"];
                if chain {
                    args.push("--backing-chain");
                }
                args.push(img);
                let mine = strata_in(&dir.0, &args);
                let theirs = qemu_img_in(&dir.0, &args);
                ok(&mine, "strata info");
                assert_eq!(stdout(&mine), stdout(&theirs), "{args:?}");
            }
        }
    }
    // The chain is listed top-down.
    let v = json(
        &strata_in(
            &dir.0,
            &["info", "--output=json", "--backing-chain", "top.qcow2"],
        ),
        "strata info",
    );
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["filename"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["top.qcow2", "sub/mid.qcow2", "sub/../compressed.qcow2"]
    );
    // -f is honoured: a qcow2 file read as raw.
    let v = json(
        &strata_in(&dir.0, &["info", "-f", "raw", "--output=json", "v2.qcow2"]),
        "strata info -f raw",
    );
    assert_eq!(v["format"], "raw");
}

#[test]
fn info_force_share_and_errors() {
    let dir = tmp_dir("info-errors");
    let o = strata_in(&dir.0, &["info", "missing.qcow2"]);
    assert_one_line_error(&o, "info", &["Could not open 'missing.qcow2'"]);
    File::create(dir.path("r.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let o = strata_in(&dir.0, &["info", "--output=xml", "r.img"]);
    assert_one_line_error(&o, "info", &["xml"]);
    let o = strata_in(&dir.0, &["info", "-f", "vmdk", "r.img"]);
    assert_one_line_error(&o, "info", &["vmdk"]);
    let o = strata_in(&dir.0, &["info", "-f", "qcow2", "r.img"]);
    assert_one_line_error(&o, "info", &["not in qcow2 format"]);
    if qemu_img().is_none() || !have_qemu_io() {
        return;
    }
    ok(
        &qemu_img_in(&dir.0, &["create", "-q", "-f", "qcow2", "busy.qcow2", "4M"]),
        "qemu-img create",
    );
    let holder = QemuIoHolder::new(&dir.path("busy.qcow2"), "qcow2", 100);
    // As qemu-img: an image another process writes is refused without -U.
    let refused = strata_in(&dir.0, &["info", "busy.qcow2"]);
    let shared = strata_in(&dir.0, &["info", "-U", "--output=json", "busy.qcow2"]);
    let long = strata_in(&dir.0, &["info", "--force-share", "busy.qcow2"]);
    drop(holder);
    assert_one_line_error(&refused, "info", &["lock", "busy.qcow2"]);
    let v = json(&shared, "strata info -U");
    assert_eq!(v["virtual-size"], 4 << 20);
    ok(&long, "strata info --force-share");
    assert!(stdout(&long).starts_with("image: busy.qcow2\n"));
}

fn bench_in(dir: &Path, args: &[&str]) -> Output {
    strata_in(dir, &[&["bench"][..], args].concat())
}

#[test]
fn bench_on_a_qcow2_image_and_a_chain() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tmp_dir("bench");
    let q = |args: &[&str]| ok(&qemu_img_in(&dir.0, args), &format!("qemu-img {args:?}"));
    q(&["create", "-q", "-f", "qcow2", "img.qcow2", "64M"]);
    let o = bench_in(
        &dir.0,
        &[
            "--filename=img.qcow2",
            "--rw=randrw",
            "--verify=crc32c",
            "--runtime=1",
            "--time_based",
            "--iodepth=8",
        ],
    );
    ok(&o, "bench randrw on qcow2");
    let out = stdout(&o);
    assert!(out.contains("target: img.qcow2 (qcow2)"), "{out}");
    assert!(out.contains("write: IOPS="), "{out}");
    check_clean(&dir.0, "img.qcow2");

    // A 2-deep chain: a base with data, an empty top; read through the top.
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    let o = bench_in(
        &dir.0,
        &[
            "--filename=base.qcow2",
            "--format=qcow2",
            "--rw=write",
            "--bs=64k",
            "--size=16M",
            "--iodepth=4",
        ],
    );
    ok(&o, "bench write on base");
    check_clean(&dir.0, "base.qcow2");
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    let o = bench_in(
        &dir.0,
        &[
            "--filename=top.qcow2",
            "--rw=randread",
            "--runtime=1",
            "--time_based",
            "--iodepth=4",
            "--output-format=json",
        ],
    );
    let v = json(&o, "bench randread on a chain");
    assert_eq!(v["jobs"][0]["error"], 0);
    assert!(v["jobs"][0]["read"]["total_ios"].as_u64().unwrap() > 0);
    assert_eq!(v["jobs"][0]["job options"]["format"], "qcow2");
    assert_eq!(v["strata"]["image"], "qcow2, backing chain of 2 images");
    check_clean(&dir.0, "top.qcow2");
    check_clean(&dir.0, "base.qcow2");
    // The data written into the base reads the same through the top.
    let c = qemu_img_in(&dir.0, &["compare", "top.qcow2", "base.qcow2"]);
    ok(&c, "qemu-img compare");

    // A raw file given as qcow2 is refused in one line.
    File::create(dir.path("plain.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let o = bench_in(&dir.0, &["--filename=plain.raw", "--format=qcow2"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("strata bench: error: ") && err.contains("not in qcow2 format"),
        "{err}"
    );
    // And a probed raw file runs as raw.
    let o = bench_in(&dir.0, &["--filename=plain.raw", "--rw=randread"]);
    ok(&o, "bench on raw");
    assert!(
        stdout(&o).contains("target: plain.raw (raw)"),
        "{}",
        stdout(&o)
    );
}

/// Two jobs writing one qcow2 image at once, each on its own IoThread and its own slice, with
/// every block checked: the jobs share the image's metadata (L2 tables, refcount blocks, the
/// cluster allocator), so both allocate clusters concurrently. Small clusters make it
/// metadata-heavy. Then QEMU finds the image clean and reads what strata's last pass wrote.
#[test]
fn two_jobs_write_one_qcow2_with_verify_and_qemu_img_check_is_clean() {
    if qemu_img().is_none() {
        return;
    }
    let dir = tmp_dir("two-jobs");
    for (name, cs) in [("c4k.qcow2", "4096"), ("c64k.qcow2", "65536")] {
        ok(
            &qemu_img_in(
                &dir.0,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("cluster_size={cs}"),
                    name,
                    "32M",
                ],
            ),
            "qemu-img create",
        );
        let o = bench_in(
            &dir.0,
            &[
                &format!("--filename={name}"),
                "--format=qcow2",
                "--numjobs=2",
                "--size=16m",
                "--offset_increment=16m",
                "--rw=randwrite",
                "--verify=crc32c",
                "--iodepth=16",
                "--runtime=1",
                "--time_based",
                "--output-format=json",
            ],
        );
        let v = json(&o, "bench: two jobs of randwrite with verify");
        let jobs = v["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 2, "{v}");
        assert_ne!(
            jobs[0]["iothread"]["name"], jobs[1]["iothread"]["name"],
            "each job on its own IoThread"
        );
        for j in jobs {
            assert_eq!(j["error"], 0, "{name}: {j}");
            let written = j["write"]["total_ios"].as_u64().unwrap();
            assert!(written > 0, "{j}");
            assert!(
                j["verify"]["total_ios"].as_u64().unwrap() > 0,
                "{name}: nothing was read back and checked: {j}"
            );
        }
        let c = check_clean(&dir.0, name);
        assert!(
            c["allocated-clusters"].as_u64().unwrap() > 0,
            "{name}: the jobs allocated nothing? {c}"
        );
        // A second pass over the written image: strata reads back its own verify headers.
        let o = bench_in(
            &dir.0,
            &[
                &format!("--filename={name}"),
                "--numjobs=2",
                "--size=16m",
                "--offset_increment=16m",
                "--rw=randread",
                "--runtime=1",
                "--time_based",
            ],
        );
        ok(&o, "bench: randread of the written image");
    }
}
