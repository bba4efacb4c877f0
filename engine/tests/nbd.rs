//! The NBD server against QEMU's own NBD client (qemu-io, qemu-img) as the oracle: reads and
//! writes with patterns, `qemu-img map` over `base:allocation`, read-only exports, unknown
//! exports, garbage from a client, and several clients at once.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

use common::{have_qemu, qemu_img_create, run_qemu_io, run_tool, uniq, Scratch};
use engine::nbd::proto;
use engine::nbd::{Export, NbdAddr, NbdServer};
use engine::{BackendOptions, Engine, EngineOptions};

const MIB: u64 = 1 << 20;

struct Setup {
    _e: Engine,
    server: NbdServer,
    sock: Scratch,
    img: Scratch,
    base: Scratch,
}

/// A 4 MiB qcow2 over a qcow2 base (data at 0..1M in the base, 2M..2M+64k in the top, a
/// zero cluster at 3M), served as export `name`.
fn start(tag: &str, name: &str, writable: bool) -> Setup {
    let base = Scratch::new_in("/var/tmp", &format!("{tag}-base"));
    let img = Scratch::new_in("/var/tmp", &format!("{tag}-top"));
    qemu_img_create("qcow2", base.path(), None, Some(4 * MIB));
    run_qemu_io("qcow2", base.path(), &["write -P 1 0 1M"]);
    qemu_img_create("qcow2", img.path(), Some((base.path(), "qcow2")), None);
    run_qemu_io("qcow2", img.path(), &["write -P 2 2M 64k"]);
    run_qemu_io("qcow2", img.path(), &["write -z 3M 64k"]);
    let e = Engine::new(EngineOptions {
        iothreads: 2,
        ..Default::default()
    })
    .unwrap();
    let imgs = [base, img];
    let names = vec![uniq(&format!("{tag}b")), uniq(&format!("{tag}t"))];
    common::open_chain_named(&e, &imgs, &names, false);
    let [base, img] = imgs;
    let backend = e
        .backend(
            &names[1],
            &[],
            BackendOptions {
                read_only: !writable,
                share_rw: true,
                ..Default::default()
            },
        )
        .unwrap();
    let sock = Scratch::new_in("/tmp", &format!("{tag}-sock"));
    let server = NbdServer::start(NbdAddr::Unix(sock.0.clone()), 0).unwrap();
    server
        .add_export(Export::new(
            name,
            Some("a test disk".into()),
            writable,
            backend,
        ))
        .unwrap();
    Setup {
        _e: e,
        server,
        sock,
        img,
        base,
    }
}

fn uri(s: &Setup, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", s.sock.path())
}

/// Runs qemu-io on `target` (format `fmt`) with each of `cmds` as a `-c` command, in one
/// process, without failing the test if it fails: whether it succeeded, and its output.
fn qemu_io<S: AsRef<str>>(fmt: &str, target: &str, cmds: &[S]) -> (bool, String) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c.as_ref()]);
    }
    args.push(target);
    let out = Command::new("qemu-io").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn qemu_io_reads_and_writes_through_the_export() {
    if !have_qemu() {
        return;
    }
    let s = start("nbdrw", "disk", true);
    let u = uri(&s, "disk");
    let (ok, out) = qemu_io(
        "raw",
        &u,
        &[
            "read -P 1 0 1M",
            "read -P 2 2M 64k",
            "read -P 0 3M 64k",
            "write -P 9 512k 128k",
            "read -P 9 512k 128k",
            "write -z 2M 4k",
            "read -P 0 2M 4k",
            "flush",
        ],
    );
    assert!(
        ok && !out.contains("fail") && !out.contains("error"),
        "{out}"
    );
    // Many requests in flight: aio writes, then read back.
    let (ok, out) = qemu_io(
        "raw",
        &u,
        &[
            "aio_write -P 7 0 64k",
            "aio_write -P 8 64k 64k",
            "aio_write -P 6 128k 64k",
            "aio_flush",
            "read -P 7 0 64k",
            "read -P 8 64k 64k",
            "read -P 6 128k 64k",
        ],
    );
    assert!(
        ok && !out.contains("fail") && !out.contains("error"),
        "{out}"
    );
    let Setup {
        _e,
        mut server,
        img,
        base,
        ..
    } = s;
    server.stop();
    drop(server);
    drop(_e);
    common::assert_check_clean(img.path());
    let (ok, out) = qemu_io(
        "qcow2",
        img.path(),
        &["read -P 9 512k 64k", "read -P 7 0 64k"],
    );
    assert!(ok && !out.contains("fail"), "{out}");
    drop(base);
}

#[test]
fn qemu_img_map_over_nbd_matches_the_chain() {
    if !have_qemu() {
        return;
    }
    let s = start("nbdmap", "disk", false);
    let out = run_tool(&[
        "qemu-img",
        "map",
        "--output=json",
        "-f",
        "raw",
        &uri(&s, "disk"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let extents: Vec<(u64, u64, bool, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    // Data 0..1M (base), 2M..2M+64k (top); the rest zero holes (3M..+64k a zero cluster).
    let data: Vec<(u64, u64)> = extents.iter().filter(|e| e.2).map(|e| (e.0, e.1)).collect();
    assert_eq!(data, vec![(0, MIB), (2 * MIB, 64 << 10)], "{out}");
    assert!(extents.iter().filter(|e| !e.2).all(|e| e.3), "{out}");
    let total: u64 = extents.iter().map(|e| e.1).sum();
    assert_eq!(total, 4 * MIB);
    // A read-only export refuses writes.
    let (ok, out) = qemu_io("raw", &uri(&s, "disk"), &["write -P 1 0 4k"]);
    assert!(
        !ok || out.contains("Operation not permitted") || out.contains("read-only"),
        "{out}"
    );
}

#[test]
fn unknown_exports_garbage_and_concurrent_clients() {
    if !have_qemu() {
        return;
    }
    let s = start("nbdbad", "disk", true);
    let (ok, out) = qemu_io("raw", &uri(&s, "nope"), &["read 0 4k"]);
    assert!(
        !ok || out.contains("not present") || out.contains("export"),
        "{out}"
    );

    // Garbage instead of the client flags, and an oversized option: the server hangs up.
    let mut c = UnixStream::connect(&s.sock.0).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], &proto::NBDMAGIC.to_be_bytes());
    c.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);

    let mut c = UnixStream::connect(&s.sock.0).unwrap();
    c.read_exact(&mut hello).unwrap();
    c.write_all(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    c.write_all(&proto::IHAVEOPT.to_be_bytes()).unwrap();
    c.write_all(&proto::OPT_GO.to_be_bytes()).unwrap();
    c.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    let mut reply = [0u8; 20];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[12..16], &proto::REP_ERR_TOO_BIG.to_be_bytes());
    drop(c);

    // A client that vanishes mid-request (a write header without its payload).
    let mut c = UnixStream::connect(&s.sock.0).unwrap();
    c.read_exact(&mut hello).unwrap();
    c.write_all(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    c.write_all(&proto::IHAVEOPT.to_be_bytes()).unwrap();
    c.write_all(&proto::OPT_EXPORT_NAME.to_be_bytes()).unwrap();
    c.write_all(&4u32.to_be_bytes()).unwrap();
    c.write_all(b"disk").unwrap();
    let mut info = [0u8; 10 + 124];
    c.read_exact(&mut info).unwrap();
    assert_eq!(&info[..8], &(4 * MIB).to_be_bytes());
    let req = proto::Request {
        flags: 0,
        kind: proto::CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 65536,
    };
    c.write_all(&req.encode()).unwrap();
    c.write_all(&[1u8; 100]).unwrap();
    drop(c);

    // Four clients at once, each in its own range, all fine.
    let u = uri(&s, "disk");
    let clients: Vec<_> = (0..4u64)
        .map(|i| {
            let u = u.clone();
            std::thread::spawn(move || {
                let off = (i * 256 * 1024).to_string();
                let w = format!("write -P {} {off} 256k", 0x40 + i);
                let r = format!("read -P {} {off} 256k", 0x40 + i);
                qemu_io("raw", &u, &[&w, &r])
            })
        })
        .collect();
    for c in clients {
        let (ok, out) = c.join().unwrap();
        assert!(ok && !out.contains("fail"), "{out}");
    }
    assert_eq!(s.server.exports().len(), 1);
}

/// A client writing and verifying through the export while a stream and then an active
/// commit run on the exported chain: every read matches, and the image afterwards equals the
/// flattened original with the client's writes applied.
#[test]
fn client_io_continues_while_jobs_run() {
    if !have_qemu() {
        return;
    }
    use engine::job::commit::CommitArgs;
    use engine::job::stream::StreamArgs;
    use engine::job::JobStatus;
    let imgs = common::make_chain("/var/tmp", "nbdjob", 3, 4 * MIB);
    let mut expect = common::qemu_content(imgs[2].path());
    let e = Engine::new(EngineOptions {
        iothreads: 2,
        ..Default::default()
    })
    .unwrap();
    let names: Vec<String> = (0..3).map(|i| uniq(&format!("nbdjob{i}"))).collect();
    common::open_chain_named(&e, &imgs, &names, false);
    let backend = e
        .backend(
            &names[2],
            &[],
            BackendOptions {
                share_rw: true,
                ..Default::default()
            },
        )
        .unwrap();
    let sock = Scratch::new_in("/tmp", "nbdjob-sock");
    let mut server = NbdServer::start(NbdAddr::Unix(sock.0.clone()), 0).unwrap();
    server
        .add_export(Export::new("disk", None, true, backend))
        .unwrap();
    let u = format!("nbd+unix:///disk?socket={}", sock.path());
    // The client's script: write then read back 64 KiB pieces over the first 3 MiB.
    let round = |pass: u64| -> (Vec<String>, Vec<(usize, u8)>) {
        let mut cmds = Vec::new();
        let mut writes = Vec::new();
        for i in 0..48u64 {
            let off = (i * 64 * 1024 + pass * 4096) as usize;
            let pat = (0x20 + (i + pass * 7) % 200) as u8;
            cmds.push(format!("write -P {pat} {off} 8k"));
            cmds.push(format!("read -P {pat} {off} 8k"));
            writes.push((off, pat));
        }
        (cmds, writes)
    };
    let run_client = |pass: u64| {
        let (cmds, writes) = round(pass);
        let u = u.clone();
        let h = std::thread::spawn(move || qemu_io("raw", &u, &cmds));
        (h, writes)
    };
    // During a stream of the middle image into the top.
    let mut a = StreamArgs::new(&names[2]);
    a.job.job_id = Some(uniq("nbdstream"));
    a.base_node = Some(names[0].clone());
    a.job.speed = 1 << 20;
    let job = e.stream(a).unwrap();
    let (h, writes) = run_client(0);
    let (ok, out) = h.join().unwrap();
    assert!(
        ok && !out.contains("fail") && !out.contains("Pattern verification"),
        "{out}"
    );
    // It may have finished already.
    let _ = job.set_speed(0);
    assert_eq!(job.wait().error, None);
    for (off, pat) in writes {
        expect[off..off + 8192].fill(pat);
    }
    // During an active commit of the top into the base (the export writes the top).
    let mut c = CommitArgs::new(&names[2]);
    c.job.job_id = Some(uniq("nbdcommit"));
    let job = e.commit(c).unwrap();
    let (h, writes) = run_client(1);
    assert_eq!(job.wait_for(JobStatus::Ready), JobStatus::Ready);
    let (ok, out) = h.join().unwrap();
    assert!(
        ok && !out.contains("fail") && !out.contains("Pattern verification"),
        "{out}"
    );
    for (off, pat) in writes {
        expect[off..off + 8192].fill(pat);
    }
    job.complete().unwrap();
    assert_eq!(job.wait().error, None);
    // After the pivot the export serves the base; one more pass.
    let (h, writes) = run_client(2);
    let (ok, out) = h.join().unwrap();
    assert!(
        ok && !out.contains("fail") && !out.contains("Pattern verification"),
        "{out}"
    );
    for (off, pat) in writes {
        expect[off..off + 8192].fill(pat);
    }
    server.stop();
    drop(server);
    drop(e);
    common::assert_check_clean(imgs[0].path());
    assert!(
        common::qemu_content(imgs[0].path()) == expect,
        "base holds what the client saw"
    );
}
