//! `strata daemon` driven by QEMU's own Python QMP library (`qemu.qmp`), against
//! qemu-storage-daemon in the same run: the scripts in tests/qmp/ run each scenario on both
//! daemons, started with qemu-storage-daemon's launch syntax (only the program name
//! differs), and compare the replies, the events and the graphs once normalised, except the
//! differences they name as deliberate (tests/qmp/qmplib.py has the rules). Some scenarios
//! run against strata alone: the IoThread moves (qemu-storage-daemon 10.0.2 aborts on
//! them), the socket's mode and several clients on one socket, and the fuzzing.
//!
//! This file builds nothing: each test runs one script (with a case name) and fails with the
//! script's output. The Python is `$STRATA_QMP_PYTHON` (CI's virtualenv, made by `.ci/run`),
//! else `target/qmp-venv/bin/python` if it is there, else `python3` if it can import
//! `qemu.qmp`; without one, or without qemu-storage-daemon, qemu-img and qemu-io, the tests
//! print why and pass. The long fuzz run (10,000 messages) is ignored by default:
//! `cargo test --test daemon_qmp -- --ignored`.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one script may run before it is killed (with the daemons it started).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp")
}

fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn imports_qmp(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import qemu.qmp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Python to run the scripts with, or why there is none.
fn python() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("STRATA_QMP_PYTHON") {
        let p = PathBuf::from(p);
        return if imports_qmp(&p) {
            Ok(p)
        } else {
            Err(format!(
                "STRATA_QMP_PYTHON={} cannot import qemu.qmp",
                p.display()
            ))
        };
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/qmp-venv/bin/python");
    if venv.is_file() && imports_qmp(&venv) {
        return Ok(venv);
    }
    match on_path("python3") {
        Some(p) if imports_qmp(&p) => Ok(p),
        Some(_) => Err(
            "python3 cannot import qemu.qmp (pip install qemu.qmp, or set \
                        STRATA_QMP_PYTHON; .ci/run makes target/qmp-venv)"
                .into(),
        ),
        None => Err("no python3".into()),
    }
}

/// Runs `script` with `args` against both daemons; fails with its output. Skips (printing
/// why) where the Python library or QEMU's tools are missing.
fn run(script: &str, args: &[&str]) {
    run_with(script, args, true)
}

/// Runs a script that drives strata alone (qemu-storage-daemon is not needed).
fn run_strata_alone(script: &str, args: &[&str]) {
    run_with(script, args, false)
}

fn run_with(script: &str, args: &[&str], needs_qsd: bool) {
    let py = match python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("skipping {script} {args:?}: {why}");
            return;
        }
    };
    let qsd = on_path("qemu-storage-daemon");
    if needs_qsd && qsd.is_none() {
        eprintln!("skipping {script} {args:?}: qemu-storage-daemon is not installed");
        return;
    }
    let qsd = qsd.unwrap_or_else(|| PathBuf::from("qemu-storage-daemon"));
    for tool in ["qemu-img", "qemu-io"] {
        if on_path(tool).is_none() {
            eprintln!("skipping {script} {args:?}: {tool} is not installed");
            return;
        }
    }
    let start = Instant::now();
    let mut child = Command::new(&py)
        .arg(scripts().join(script))
        .args(args)
        .current_dir(scripts())
        .env("STRATA_BIN", env!("CARGO_BIN_EXE_strata"))
        .env("QSD_BIN", &qsd)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills the daemons it started too.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    // Drain both pipes on threads, so a chatty script never blocks on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the script") {
            break Some(s);
        }
        if start.elapsed() > SCRIPT_TIMEOUT {
            // SAFETY: kill(2) with the negated pid of the group this child leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let took = start.elapsed().as_secs_f64();
    match status {
        Some(s) if s.success() => {
            println!("{script} {args:?}: ok in {took:.1} s\n{stdout}");
        }
        Some(s) => panic!("{script} {args:?} failed ({s}) in {took:.1} s:\n{stdout}\n{stderr}"),
        None => panic!(
            "{script} {args:?} killed after {} s:\n{stdout}\n{stderr}",
            SCRIPT_TIMEOUT.as_secs()
        ),
    }
}

// iotest 030, TestParallelOps.

#[test]
fn iotest030_stream_parallel() {
    run("iotest030_parallel.py", &["stream_parallel"]);
}

#[test]
fn iotest030_overlapping_1() {
    run("iotest030_parallel.py", &["overlapping_1"]);
}

#[test]
fn iotest030_overlapping_2() {
    run("iotest030_parallel.py", &["overlapping_2"]);
}

#[test]
fn iotest030_overlapping_3() {
    run("iotest030_parallel.py", &["overlapping_3"]);
}

#[test]
fn iotest030_overlapping_4() {
    run("iotest030_parallel.py", &["overlapping_4"]);
}

#[test]
fn iotest030_overlapping_5() {
    run("iotest030_parallel.py", &["overlapping_5"]);
}

#[test]
fn iotest030_stream_commit_1() {
    run("iotest030_parallel.py", &["stream_commit_1"]);
}

#[test]
fn iotest030_stream_commit_2() {
    run("iotest030_parallel.py", &["stream_commit_2"]);
}

#[test]
fn iotest030_stream_base_node_name() {
    run("iotest030_parallel.py", &["stream_base_node_name"]);
}

// iotest 030, TestEIO, TestENOSPC, TestSetSpeed (blkdebug `inject-error`).

#[test]
fn iotest030_eio_report() {
    run("iotest030_errors.py", &["eio_report"]);
}

#[test]
fn iotest030_eio_ignore() {
    run("iotest030_errors.py", &["eio_ignore"]);
}

#[test]
fn iotest030_eio_stop() {
    run("iotest030_errors.py", &["eio_stop"]);
}

#[test]
fn iotest030_eio_enospc() {
    run("iotest030_errors.py", &["eio_enospc"]);
}

#[test]
fn iotest030_enospc_enospc() {
    run("iotest030_errors.py", &["enospc_enospc"]);
}

#[test]
fn iotest030_set_speed() {
    run("iotest030_errors.py", &["set_speed"]);
}

// iotest 040.

#[test]
fn iotest040_single_drive() {
    run("iotest040_commit.py", &["single_drive"]);
}

#[test]
fn iotest040_error_handling() {
    run("iotest040_commit.py", &["error_handling"]);
}

// The job state machine: verbs in each state, finalize, dismiss, cancel.

#[test]
fn jobs_verbs_in_each_state() {
    run("jobs.py", &["verbs"]);
}

#[test]
fn jobs_cancel_while_pending() {
    run("jobs.py", &["cancel_pending"]);
}

#[test]
fn jobs_cancel_while_running() {
    run("jobs.py", &["cancel_running"]);
}

// The protocol, arguments and blockdev commands.

#[test]
fn protocol_negotiation_and_ids() {
    run("protocol.py", &["negotiation"]);
}

#[test]
fn protocol_framing() {
    run("protocol.py", &["framing"]);
}

#[test]
fn protocol_argument_errors() {
    run("protocol.py", &["arguments"]);
}

#[test]
fn protocol_blockdev_commands() {
    run("protocol.py", &["blockdev"]);
}

#[test]
fn protocol_job_id_default() {
    run("protocol.py", &["job_id_default"]);
}

// Snapshots, blockdev-create, the README's session.

#[test]
fn snapshot_readme_session() {
    run("snapshot.py", &["readme"]);
}

#[test]
fn snapshot_blockdev_create() {
    run("snapshot.py", &["create"]);
}

// Start, clients, shutdown.

#[test]
fn lifecycle_sigterm() {
    run("lifecycle.py", &["sigterm"]);
}

#[test]
fn lifecycle_sigint() {
    run("lifecycle.py", &["sigint"]);
}

#[test]
fn lifecycle_quit() {
    run("lifecycle.py", &["quit"]);
}

#[test]
fn lifecycle_two_monitors() {
    run("lifecycle.py", &["two_monitors"]);
}

#[test]
fn lifecycle_strata_socket_and_clients() {
    run_strata_alone("lifecycle.py", &["strata_clients"]);
}

// strata alone.

#[test]
fn iothread_moves_with_jobs() {
    run_strata_alone("iothread.py", &["strata"]);
}

#[test]
fn fuzz_2000_messages() {
    run_strata_alone("fuzz.py", &["2000"]);
}

#[test]
#[ignore = "the long run: 10,000 messages"]
fn fuzz_10000_messages() {
    run_strata_alone("fuzz.py", &["10000"]);
}
