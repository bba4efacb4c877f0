//! End-to-end tests of `strata bench`: the built binary run as a user runs it.
//!
//! Each test keeps to a second or two: short `--runtime`s, small files, and `--driver=null`
//! where only the engine is exercised. Nothing here asserts on timing.

mod common;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{assert_one_line_error, stderr, stdout, QemuIoHolder, TmpDir};

/// A private directory in the system temp dir, removed at drop.
fn tmp_dir(tag: &str) -> TmpDir {
    TmpDir::under(&std::env::temp_dir(), "bench", tag)
}

fn bench() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.arg("bench");
    c
}

fn run(args: &[&str]) -> Output {
    bench().args(args).output().unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", stdout(o)))
}

fn arg(k: &str, v: impl AsRef<Path>) -> String {
    format!("--{k}={}", v.as_ref().display())
}

#[test]
fn default_run_works_and_removes_its_scratch_file() {
    let dir = tmp_dir("default");
    let o = bench()
        .arg("--runtime=1")
        .env("TMPDIR", &dir.0)
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    // The header names the scratch file.
    let target = out
        .lines()
        .find_map(|l| l.strip_prefix("target: "))
        .expect("a target line")
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(target.starts_with(dir.0.to_str().unwrap()), "{target}");
    assert!(target.contains("strata-bench-"), "{target}");
    assert!(
        !Path::new(&target).exists(),
        "scratch file left behind: {target}"
    );
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
    for want in [
        "rw=randrw",
        "iodepth=32",
        "read: IOPS=",
        "write: IOPS=",
        "clat percentiles",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    assert!(out.contains("Run status group 0 (all jobs):"), "{out}");
    assert!(out.contains("cpu          : usr="), "{out}");
    assert!(out.contains("iothread iothread-"), "{out}");
}

#[test]
fn ctrl_c_stops_reports_and_removes_the_scratch_file() {
    let dir = tmp_dir("sigint");
    let mut child = bench()
        .args(["--runtime=30", "--size=16m"])
        .env("TMPDIR", &dir.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let scratch = dir.0.join(format!("strata-bench-{}.img", child.id()));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        seen.push_str(&l);
        seen.push('\n');
        if l.starts_with("Starting ") {
            break;
        }
    }
    assert!(
        scratch.exists(),
        "the scratch file should exist while running"
    );
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill only sends a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "signal {:?}", status.signal());
    let rest = rest.join("\n");
    assert!(
        rest.contains("Run status group 0"),
        "no report after Ctrl-C:\n{seen}{rest}"
    );
    assert!(!scratch.exists(), "scratch file left behind");
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

#[test]
fn bad_input_is_one_line_and_exit_1() {
    let dir = tmp_dir("bad");
    let small = dir.file("small.img", 1 << 20);
    let missing = dir.0.join("missing.img");
    let missing_arg = arg("filename", &missing);
    let small_arg = arg("filename", &small);
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[missing_arg.as_str()],
            &["missing.img", "No such file or directory"],
        ),
        (
            &["--driver=null", "--size=5000"],
            &["--size=5000", "multiple of --bs"],
        ),
        (&["--driver=null", "--iodepth", "0"], &["--iodepth=0"]),
        (
            &["--driver=null", "--rw=sideways"],
            &["sideways", "randrw", "randread"],
        ),
        (&["--driver=null", "--numjobs=0"], &["--numjobs=0"]),
        (&["--driver=null", "--size=12q"], &["--size=12q"]),
        (&["--driver=null", "--bs=abc"], &["--bs=abc"]),
        (
            &[small_arg.as_str(), "--size=2m"],
            &["--size=2m", "beyond the end"],
        ),
        (&["--driver=null", "--numjobs=65"], &["--numjobs=65", "64"]),
        (&["--verify=crc32c", "--bs=32"], &["--bs=32", "64"]),
        (&["--verify=crc32c", "--numjobs=2"], &["offset_increment"]),
        (
            &["--driver=null", "--verify=crc32c"],
            &["--verify", "--driver=file"],
        ),
        (&["--driver=bogus"], &["bogus"]),
        (&["--output-format=xml"], &["xml"]),
        (
            &["--driver=null", "--cpus_allowed=1023"],
            &["--cpus_allowed=1023", "CPU 1023 is not available"],
        ),
        (
            &["--driver=null", "--cpus_allowed=1-x"],
            &["--cpus_allowed=1-x", "'x' is not a CPU number"],
        ),
        // clap's own usage errors, reworded to one line.
        (&["--no-such-option"], &["--no-such-option"]),
        (&["--driver=null", "--bs"], &["--bs"]),
    ];
    for (args, needles) in cases {
        let o = bench().args(*args).env("TMPDIR", &dir.0).output().unwrap();
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
        assert_one_line_error(&o, "bench", needles);
    }
    assert!(
        !missing.exists(),
        "a missing --filename must not be created"
    );
    let mut left = dir.entries();
    left.sort();
    assert_eq!(left, vec!["small.img".to_string()], "files left behind");
}

#[test]
fn bs_below_direct_alignment_is_refused() {
    // A real disk folder: tmpfs may not take O_DIRECT at all.
    let base = Path::new("/var/tmp");
    let dir = if base.is_dir() {
        TmpDir::under(base, "bench", "direct")
    } else {
        tmp_dir("direct")
    };
    let f = dir.file("d.img", 1 << 20);
    let o = run(&[
        &arg("filename", &f),
        "--direct=1",
        "--bs=256",
        "--rw=randread",
    ]);
    if stderr(&o).contains("does not support O_DIRECT") {
        eprintln!("skipped: {} does not support O_DIRECT", dir.0.display());
        return;
    }
    assert_one_line_error(&o, "bench", &["--bs=256", "O_DIRECT alignment"]);
    // The scratch file of a default run is removed on this error too.
    let o = bench()
        .args(["--direct=1", "--bs=256"])
        .env("TMPDIR", &dir.0)
        .output()
        .unwrap();
    assert_one_line_error(&o, "bench", &["--bs=256", "O_DIRECT alignment"]);
    assert_eq!(dir.entries(), vec!["d.img".to_string()]);
}

#[test]
fn image_locked_by_qemu_io_is_refused() {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-io is not installed");
        return;
    }
    let dir = tmp_dir("lock");
    let f = dir.file("locked.img", 1 << 20);
    let holder = QemuIoHolder::new(&f, "raw", 100);
    let o = run(&[&arg("filename", &f), "--rw=randrw", "--runtime=1"]);
    drop(holder);
    assert_one_line_error(&o, "bench", &["lock", "locked.img"]);
}

#[test]
fn json_output_is_fio_shaped() {
    let o = run(&[
        "--driver=null",
        "--rw=randread",
        "--iodepth=4",
        "--runtime=1",
        "--output-format=json",
    ]);
    let v = json(&o);
    assert!(v["fio version"].as_str().unwrap().starts_with("strata-"));
    assert!(v["timestamp"].as_u64().unwrap() > 0);
    assert!(v["time"].is_string());
    assert_eq!(v["global options"]["rw"], "randread");
    let job = &v["jobs"][0];
    assert_eq!(job["jobname"], "job");
    assert_eq!(job["groupid"], 0);
    assert_eq!(job["error"], 0);
    // No --drain-every: no drain figures and no drain option anywhere.
    assert!(v.get("drain").is_none());
    assert!(job.get("drain").is_none());
    assert!(job["job options"].get("drain_every").is_none());
    assert_eq!(job["job options"]["rw"], "randread");
    assert_eq!(job["job options"]["iodepth"], "4");
    let read = &job["read"];
    assert!(read["iops"].as_f64().unwrap() > 0.0);
    assert!(read["total_ios"].as_u64().unwrap() > 0);
    assert!(read["io_bytes"].as_u64().unwrap() > 0);
    assert!(read["bw"].as_u64().is_some() && read["bw_bytes"].as_u64().is_some());
    assert!(read["runtime"].as_u64().unwrap() > 0);
    let p = &read["clat_ns"]["percentile"];
    for k in [
        "1.000000",
        "50.000000",
        "99.000000",
        "99.900000",
        "99.990000",
    ] {
        assert!(p[k].as_u64().is_some(), "percentile {k} missing: {p}");
    }
    assert!(read["clat_ns"]["N"].as_u64().unwrap() > 0);
    assert_eq!(read["lat_ns"]["N"], read["clat_ns"]["N"]);
    assert_eq!(read["slat_ns"]["N"], 0);
    assert_eq!(job["write"]["total_ios"], 0);
    assert_eq!(job["trim"]["total_ios"], 0);
    assert_eq!(job["sync"]["total_ios"], 0);
    assert!(job["usr_cpu"].as_f64().is_some() && job["sys_cpu"].as_f64().is_some());
    assert!(job["ctx"].as_u64().is_some());
    assert!(job["iothread"]["name"]
        .as_str()
        .unwrap()
        .starts_with("iothread-"));
}

#[test]
fn size_based_jobs_do_size_over_bs_requests() {
    for rw in ["read", "randread", "write", "randwrite", "rw"] {
        let o = run(&[
            "--driver=null",
            &format!("--rw={rw}"),
            "--size=4m",
            "--time_based=0",
            "--iodepth=8",
            "--output-format=json",
        ]);
        let v = json(&o);
        let job = &v["jobs"][0];
        let ios = job["read"]["total_ios"].as_u64().unwrap()
            + job["write"]["total_ios"].as_u64().unwrap();
        assert_eq!(ios, 1024, "{rw}");
    }
    // Both spellings of an option's value, as fio takes them.
    let o = bench()
        .args([
            "--driver", "null", "--rw", "randread", "--bs", "8k", "--size", "1m",
        ])
        .args(["--time_based=0", "--output-format", "json"])
        .output()
        .unwrap();
    let v = json(&o);
    assert_eq!(v["jobs"][0]["job options"]["bs"], "8192");
    assert_eq!(v["jobs"][0]["read"]["total_ios"], 128);
}

#[test]
fn several_null_jobs_each_on_their_iothread() {
    let o = run(&[
        "--driver=null",
        "--numjobs=2",
        "--rw=randrw",
        "--runtime=1",
        "--ramp_time=0.2",
        "--offset_increment=1g",
        "--size=1g",
        "--output-format=json",
    ]);
    let v = json(&o);
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_ne!(jobs[0]["iothread"]["name"], jobs[1]["iothread"]["name"]);
    assert_eq!(jobs[1]["job options"]["offset"], (1u64 << 30).to_string());
    for j in jobs {
        assert!(j["read"]["total_ios"].as_u64().unwrap() > 0);
        assert!(j["write"]["total_ios"].as_u64().unwrap() > 0);
    }
}

#[test]
fn verify_two_jobs_randrw_passes() {
    let dir = tmp_dir("verify2");
    let f = dir.file("v.img", 8 << 20);
    let o = run(&[
        &arg("filename", &f),
        "--numjobs=2",
        "--size=4m",
        "--offset_increment=4m",
        "--rw=randrw",
        "--verify=crc32c",
        "--iodepth=8",
        "--runtime=1",
        "--time_based",
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.matches("of written blocks checked").count(), 2, "{out}");
    assert!(!out.contains("err=84"), "{out}");
}

#[test]
fn verify_catches_a_corrupted_block() {
    let dir = tmp_dir("corrupt");
    let f = dir.file("c.img", 1 << 20);
    let o = run(&[
        &arg("filename", &f),
        "--rw=write",
        "--verify=crc32c",
        "--iodepth=4",
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).contains("256 blocks (1024KiB) read back and checked"),
        "{}",
        stdout(&o)
    );
    // A clean re-read passes.
    let o = run(&[
        &arg("filename", &f),
        "--rw=randread",
        "--verify=crc32c",
        "--iodepth=4",
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    // Flip one payload byte of the second block.
    let file = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, 4096 + 100).unwrap();
    b[0] ^= 0x5a;
    file.write_all_at(&b, 4096 + 100).unwrap();
    drop(file);
    let o = run(&[
        &arg("filename", &f),
        "--rw=read",
        "--verify=crc32c",
        "--iodepth=4",
    ]);
    assert_one_line_error(&o, "bench", &["verify", "bad crc32c at offset 4096"]);
    assert!(stdout(&o).contains("err=84"), "{}", stdout(&o));
    // JSON carries errno EILSEQ.
    let o = run(&[
        &arg("filename", &f),
        "--rw=read",
        "--verify=crc32c",
        "--output-format=json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["jobs"][0]["error"], 84);
}

/// The drain object of a `--drain-every` JSON report: at least one drain measured, with
/// fio-style percentiles, and every job carries the same object.
fn check_drain(v: &serde_json::Value, every_ms: u64) {
    let d = &v["drain"];
    assert_eq!(d["every_ms"], every_ms, "{d}");
    let count = d["count"].as_u64().unwrap();
    assert!(count > 0, "no drain measured: {d}");
    let ns = &d["drain_ns"];
    assert_eq!(ns["N"], count);
    assert!(ns["min"].as_u64().unwrap() <= ns["max"].as_u64().unwrap());
    assert!(ns["mean"].as_f64().is_some() && ns["stddev"].as_f64().is_some());
    for k in ["1.000000", "50.000000", "99.000000", "99.990000"] {
        assert!(
            ns["percentile"][k].as_u64().is_some(),
            "percentile {k} missing: {d}"
        );
    }
    assert_eq!(v["global options"]["drain_every"], every_ms.to_string());
    for j in v["jobs"].as_array().unwrap() {
        assert_eq!(&j["drain"], d);
        assert_eq!(j["job options"]["drain_every"], every_ms.to_string());
        assert_eq!(j["error"], 0, "{j}");
    }
}

#[test]
fn drain_every_on_null_jobs() {
    let o = run(&[
        "--driver=null",
        "--drain-every=5",
        "--runtime=1",
        "--time_based",
        "--iodepth=32",
        "--output-format=json",
    ]);
    let v = json(&o);
    check_drain(&v, 5);
    assert!(v["jobs"][0]["read"]["iops"].as_f64().unwrap() > 0.0);
    // Several jobs: one node each, drained in one section; the other spelling of the option.
    let o = run(&[
        "--driver=null",
        "--numjobs=2",
        "--drain_every=5",
        "--runtime=0.3",
        "--time_based",
        "--output-format=json",
    ]);
    let v = json(&o);
    check_drain(&v, 5);
    for j in v["jobs"].as_array().unwrap() {
        assert!(j["read"]["iops"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn cpus_allowed_runs_and_is_reported() {
    let o = run(&[
        "--driver=null",
        "--cpus_allowed=0",
        "--runtime=0.3",
        "--time_based",
        "--output-format=json",
    ]);
    let v = json(&o);
    assert_eq!(v["global options"]["cpus_allowed"], "0");
    assert!(v["jobs"][0]["read"]["iops"].as_f64().unwrap() > 0.0);
}

#[test]
fn drain_every_while_verifying_a_file() {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        TmpDir::under(shm, "bench", "drain")
    } else {
        tmp_dir("drain")
    };
    let f = dir.file("d.img", 8 << 20);
    let o = run(&[
        &arg("filename", &f),
        "--rw=randrw",
        "--verify=crc32c",
        "--iodepth=32",
        "--drain-every=5",
        "--runtime=1",
        "--time_based",
        "--output-format=json",
    ]);
    let v = json(&o);
    check_drain(&v, 5);
    let job = &v["jobs"][0];
    assert!(job.get("error_message").is_none(), "{job}");
    assert!(job["read"]["iops"].as_f64().unwrap() > 0.0);
    assert!(job["write"]["iops"].as_f64().unwrap() > 0.0);
    assert!(job["verify"]["total_ios"].as_u64().unwrap() > 0, "{job}");
}

#[test]
fn drain_every_normal_output_and_bad_values() {
    let o = run(&[
        "--driver=null",
        "--drain-every=5",
        "--runtime=0.5",
        "--time_based",
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let drain = out.find("  drain: every=5ms, count=").expect(&out);
    let group = out.find("Run status group 0").unwrap();
    assert!(drain < group, "{out}");
    assert!(out.contains("    drain percentiles ("), "{out}");
    for bad in ["--drain-every=0", "--drain-every=abc", "--drain-every=2.5"] {
        let o = run(&["--driver=null", bad]);
        assert_one_line_error(&o, "bench", &[bad]);
    }
    let o = run(&["--driver=null", "--drain-every", "0"]);
    assert_one_line_error(&o, "bench", &["--drain-every"]);
}
