//! `strata daemon`: a QMP server over the engine that scripts written for
//! qemu-storage-daemon drive unchanged.
//!
//! ```text
//! strata daemon --qmp PATH [--iothreads N]
//! strata daemon --chardev socket,path=P,server=on,wait=off,id=X --monitor chardev=X \
//!               [--object iothread,id=N]... [--blockdev JSON]... \
//!               [--nbd-server addr.type=unix,addr.path=P] [--export type=nbd,id=E,node-name=N]...
//! ```
//!
//! The second form is qemu-storage-daemon's own launch syntax, so its command lines work with
//! only the program name changed. Each `--object iothread` adds an IoThread (at least one
//! runs). `--blockdev` takes the JSON form of blockdev-add's arguments and runs before the
//! socket opens. The QMP socket is created with mode 0600 and serves several clients at once.
//!
//! Shutdown (SIGTERM, SIGINT or `quit`) goes in order: jobs are cancelled, images flushed and
//! closed (which releases their locks), and the socket is removed.

pub mod args;
pub mod commands;
pub mod qmp;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args as ClapArgs;
use engine::{Engine, EngineOptions};

use commands::Monitor;

/// The command line of `strata daemon`.
#[derive(ClapArgs, Debug)]
pub struct DaemonArgs {
    /// The QMP socket to create (a UNIX socket, mode 0600)
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// IoThreads to run (default 1; `--object iothread` adds to it)
    #[arg(long, value_name = "N")]
    iothreads: Option<usize>,
    /// qemu-storage-daemon's chardev: socket,path=P,server=on,wait=off,id=X
    #[arg(long, value_name = "OPTS")]
    chardev: Vec<String>,
    /// qemu-storage-daemon's monitor: chardev=X
    #[arg(long, value_name = "OPTS")]
    monitor: Vec<String>,
    /// qemu-storage-daemon's objects: iothread,id=N
    #[arg(long, value_name = "OPTS")]
    object: Vec<String>,
    /// A node to add at start, as blockdev-add's arguments in JSON
    #[arg(long, value_name = "JSON")]
    blockdev: Vec<String>,
    /// qemu-storage-daemon's NBD server: addr.type=unix,addr.path=P[,max-connections=N]
    /// (or addr.type=inet,addr.host=H,addr.port=P)
    #[arg(long = "nbd-server", value_name = "OPTS")]
    nbd_server: Option<String>,
    /// qemu-storage-daemon's exports: type=nbd,id=X,node-name=N[,name=..][,writable=on]
    #[arg(long, value_name = "OPTS")]
    export: Vec<String>,
}

/// Turns `a.b=v,c=w` into nested JSON (`{"a": {"b": "v"}, "c": "w"}`); `on`/`off` and
/// numbers for the keys that QAPI types as booleans and integers.
fn dotted_to_json(
    s: &str,
    bools: &[&str],
    ints: &[&str],
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let mut root = serde_json::Map::new();
    for (k, v) in keyvals(s).1 {
        let value = if bools.contains(&k.as_str()) {
            Value::Bool(matches!(v.as_str(), "on" | "true" | "yes"))
        } else if ints.contains(&k.as_str()) {
            v.parse::<u64>()
                .map(Value::from)
                .unwrap_or(Value::String(v))
        } else {
            Value::String(v)
        };
        let mut map = &mut root;
        let parts: Vec<&str> = k.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            let e = map
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Default::default()));
            if !e.is_object() {
                *e = Value::Object(Default::default());
            }
            map = e.as_object_mut().expect("object");
        }
        map.insert(parts[parts.len() - 1].to_string(), value);
    }
    root
}

/// Parses `key=value,key=value` (the first item may be a bare word: the type).
fn keyvals(s: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut kind = None;
    let mut out = Vec::new();
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None if i == 0 => kind = Some(part.to_string()),
            None => out.push((part.to_string(), "on".to_string())),
        }
    }
    (kind, out)
}

fn get<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The QMP socket paths the options name.
fn sockets(args: &DaemonArgs) -> Result<Vec<PathBuf>, String> {
    let mut paths: Vec<PathBuf> = args.qmp.iter().cloned().collect();
    for m in &args.monitor {
        let (_, kv) = keyvals(m);
        let id = get(&kv, "chardev").ok_or("--monitor: 'chardev' is missing")?;
        let mode = get(&kv, "mode").unwrap_or("control");
        if mode != "control" {
            return Err(format!(
                "--monitor: mode '{mode}' is not supported (only control)"
            ));
        }
        let dev = args
            .chardev
            .iter()
            .map(|c| keyvals(c))
            .find(|(_, kv)| get(kv, "id") == Some(id))
            .ok_or_else(|| format!("chardev '{id}' not found"))?;
        if dev.0.as_deref() != Some("socket") {
            return Err(format!(
                "chardev '{id}': only 'socket' chardevs are supported"
            ));
        }
        let path = get(&dev.1, "path")
            .ok_or_else(|| format!("chardev '{id}': only UNIX sockets ('path=') are supported"))?;
        paths.push(PathBuf::from(path));
    }
    if paths.is_empty() {
        return Err("no QMP socket: give --qmp PATH or --chardev/--monitor".into());
    }
    Ok(paths)
}

/// The ids of the `--object iothread,id=X` options, in order (they are the engine's first
/// IoThreads; `--iothreads N` adds unnamed ones after them).
fn iothread_ids(args: &DaemonArgs) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    for o in &args.object {
        let (kind, kv) = keyvals(o);
        match kind.as_deref().or(get(&kv, "qom-type")) {
            Some("iothread") => {
                let id = get(&kv, "id").ok_or("--object iothread: 'id' is missing")?;
                ids.push(id.to_string());
            }
            other => {
                return Err(format!(
                    "--object: type '{}' is not supported (only iothread)",
                    other.unwrap_or("")
                ))
            }
        }
    }
    Ok(ids)
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts), so one thread can
/// take them with sigwait.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Runs `strata daemon`; returns the exit code.
pub fn main(args: DaemonArgs) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("strata daemon: {e}");
            1
        }
    }
}

fn run(args: DaemonArgs) -> Result<(), String> {
    let paths = sockets(&args)?;
    let ids = iothread_ids(&args)?;
    let iothreads = (ids.len() + args.iothreads.unwrap_or(0)).max(1);
    let sigset = block_signals();
    let engine = Engine::new(EngineOptions {
        iothreads,
        ..Default::default()
    })
    .map_err(|e| e.full_message())?;
    let (quit_tx, quit_rx) = std::sync::mpsc::sync_channel::<()>(4);
    let events = engine.jobs().subscribe();
    let monitor = Arc::new(Monitor::new(engine, quit_tx.clone()));
    for (i, id) in ids.iter().enumerate() {
        monitor.name_iothread(id, i);
    }
    for b in &args.blockdev {
        let v: serde_json::Value =
            serde_json::from_str(b).map_err(|e| format!("--blockdev: {e}"))?;
        let serde_json::Value::Object(m) = v else {
            return Err("--blockdev: expected a JSON object".into());
        };
        monitor
            .blockdev_add(m)
            .map_err(|e| format!("--blockdev: {}", e.desc))?;
    }
    if let Some(n) = &args.nbd_server {
        let a = dotted_to_json(n, &[], &["max-connections"]);
        monitor
            .launch_command("nbd-server-start", a)
            .map_err(|e| format!("--nbd-server: {}", e.desc))?;
    }
    for x in &args.export {
        let a = dotted_to_json(x, &["writable", "writethrough"], &[]);
        monitor
            .launch_command("block-export-add", a)
            .map_err(|e| format!("--export: {}", e.desc))?;
    }
    let mut listeners = Vec::new();
    for p in &paths {
        let _ = std::fs::remove_file(p);
        let l = UnixListener::bind(p).map_err(|e| format!("{}: {e}", p.display()))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        listeners.push(l);
    }
    {
        let m = Arc::clone(&monitor);
        std::thread::Builder::new()
            .name("qmp-events".into())
            .spawn(move || m.forward_events(events))
            .map_err(|e| e.to_string())?;
    }
    for l in listeners {
        let m = Arc::clone(&monitor);
        std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || qmp::serve(m, l))
            .map_err(|e| e.to_string())?;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: sigwait reads the set and writes the signal number.
            if unsafe { libc::sigwait(&sigset, &mut sig) } == 0 {
                let _ = quit_tx.try_send(());
                return;
            }
        })
        .map_err(|e| e.to_string())?;

    let _ = quit_rx.recv();
    // In order: jobs cancelled, images flushed and closed (the Engine's drop does both and
    // releases the image locks), then the sockets go.
    monitor.stop_nbd();
    monitor.engine.close_all();
    monitor.stop_added_iothreads();
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
