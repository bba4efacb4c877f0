//! Embedding strata's engine: open a disk, serve guest I/O on two IoThreads, grow its chain
//! with live snapshots, and merge the chain back with a stream and an active commit while the
//! guest keeps writing, watching the jobs' typed events. Every step checks the guest's data.
//!
//! ```sh
//! cargo run --example embed [DIR]    # scratch images in DIR (default: the temp dir)
//! ```
//!
//! It needs nothing but strata: the base image is made with strata's own qcow2 writer. CI
//! runs it; it exits non-zero if any check fails.

use std::path::{Path, PathBuf};

use engine::drivers::file::FileOptions;
use engine::drivers::qcow2::create::CreateOptions;
use engine::image::{self, Format};
use engine::job::commit::CommitArgs;
use engine::job::stream::StreamArgs;
use engine::job::{JobEventKind, JobEvents, JobStatus};
use engine::{
    Backend, BackendOptions, BackingSpec, ChildSpec, DriverSpec, Engine, EngineOptions, IoBuf,
    NodeSpec,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The guest's view of its disk, kept alongside to check every read.
struct Guest {
    disk: Backend,
    expect: Vec<u8>,
}

impl Guest {
    /// Writes `len` bytes of `pattern` at `off` and remembers them.
    fn write(&mut self, off: u64, len: usize, pattern: u8) -> Res<()> {
        let (r, _) = self
            .disk
            .write_blocking(off, IoBuf::from_slice(&vec![pattern; len]));
        r?;
        self.expect[off as usize..off as usize + len].fill(pattern);
        Ok(())
    }

    /// Reads the whole disk and compares it with what the guest wrote.
    fn verify(&self, when: &str) -> Res<()> {
        let (r, got) = self.disk.read_blocking(0, IoBuf::new(SIZE as usize));
        r?;
        if let Some(i) = (0..SIZE as usize).find(|&i| got[i] != self.expect[i]) {
            return Err(format!(
                "{when}: byte {i} reads {:#x}, wrote {:#x}",
                got[i], self.expect[i]
            )
            .into());
        }
        println!("  verified {} MiB {when}", SIZE / MIB);
        Ok(())
    }
}

/// A qcow2 node over `path`; `backing: None` opens the backing chain the header names.
fn qcow2_spec(name: &str, path: &Path, backing: BackingSpec) -> NodeSpec {
    NodeSpec {
        node_name: Some(name.into()),
        read_only: false,
        driver: DriverSpec::Qcow2 {
            file: ChildSpec::Spec(Box::new(NodeSpec {
                node_name: None,
                read_only: false,
                driver: DriverSpec::File(FileOptions::new(path)),
            })),
            backing,
            opts: Default::default(),
        },
    }
}

/// Prints `id`'s events as they arrive, until READY (if `ready`) or COMPLETED.
fn watch(events: &JobEvents, id: &str, ready: bool) -> Res<()> {
    loop {
        let ev = events.recv_timeout(std::time::Duration::from_secs(120))?;
        match &ev.kind {
            JobEventKind::StatusChange { id: j, status } if j == id => {
                println!("  job {j}: {}", status.as_str());
            }
            JobEventKind::Ready { id: j, .. } if j == id => {
                println!("  job {j}: READY");
                if ready {
                    return Ok(());
                }
            }
            JobEventKind::Completed {
                id: j,
                error,
                len,
                offset,
                ..
            } if j == id => {
                println!("  job {j}: COMPLETED ({offset}/{len} bytes)");
                return match error {
                    None => Ok(()),
                    Some(e) => Err(format!("job {j} failed: {e}").into()),
                };
            }
            JobEventKind::Error { id: j, .. } if j == id => {
                println!("  job {j}: ERROR {:?}", ev.kind)
            }
            _ => {}
        }
    }
}

fn run(dir: &Path) -> Res<()> {
    let base = dir.join("base.qcow2");
    let engine = Engine::new(EngineOptions {
        iothreads: 2,
        ..Default::default()
    })?;

    println!("create {} ({} MiB qcow2)", base.display(), SIZE / MIB);
    let p = base.clone();
    engine
        .iothread(0)
        .expect("IoThread 0")
        .block_on(move || async move {
            let opts = CreateOptions {
                size: SIZE,
                ..Default::default()
            };
            image::create(&p, Format::Qcow2, &opts).await
        })??;

    println!("open it and serve a guest on both IoThreads");
    engine.add_node(qcow2_spec("base", &base, BackingSpec::None))?;
    let mut guest = Guest {
        disk: engine.backend("base", &[], BackendOptions::default())?,
        expect: vec![0; SIZE as usize],
    };
    for i in 0..64 {
        guest.write(i * MIB, 256 << 10, 0xA0)?;
    }

    println!("live snapshot: base <- mid");
    engine.snapshot_file("base", &dir.join("mid.qcow2"), "mid")?;
    for i in 0..32 {
        guest.write(i * 2 * MIB + 128 * 1024, 256 << 10, 0xB0)?;
    }
    println!("live snapshot: base <- mid <- top");
    engine.snapshot_file("mid", &dir.join("top.qcow2"), "top")?;
    for i in 0..16 {
        guest.write(i * 4 * MIB + 192 * 1024, 64 << 10, 0xC0)?;
    }
    guest.verify("after two snapshots")?;

    let events = engine.jobs().subscribe();
    println!("stream mid into top (base stays the backing file), the guest writing");
    let mut s = StreamArgs::new("top");
    s.job.job_id = Some("stream0".into());
    s.base_node = Some("base".into());
    let job = engine.stream(s)?;
    for i in 0..8 {
        guest.write(i * 8 * MIB, 4096, 0xD0)?;
    }
    watch(&events, "stream0", false)?;
    job.wait();
    let top = engine.node("top")?;
    println!(
        "  top's backing is now '{}'",
        top.backing()
            .map(|b| b.name().to_string())
            .unwrap_or_default()
    );
    guest.verify("after the stream")?;

    println!("active commit of top into base, the guest writing");
    let mut c = CommitArgs::new("top");
    c.job.job_id = Some("commit0".into());
    let job = engine.commit(c)?;
    for i in 0..8 {
        guest.write(i * 8 * MIB + MIB, 4096, 0xE0)?;
    }
    watch(&events, "commit0", true)?;
    guest.write(SIZE - 4096, 4096, 0xE1)?;
    job.complete()?;
    watch(&events, "commit0", false)?;
    let info = job.wait();
    assert_eq!(info.status, JobStatus::Null);
    println!("  the guest now writes '{}'", guest.disk.root().name());
    guest.write(4096, 4096, 0xF0)?;
    guest.verify("after the active commit")?;

    drop(top);
    drop(guest);
    drop(engine);
    println!("engine closed; images flushed");
    Ok(())
}

fn main() {
    let dir: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("strata-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let r = run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = r {
        eprintln!("embed: {e}");
        std::process::exit(1);
    }
    println!("embed: all checks passed");
}
