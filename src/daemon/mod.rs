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
//! runs). `--blockdev` takes blockdev-add's arguments, in JSON or in QEMU's keyval form
//! (`driver=qcow2,node-name=top,file.driver=file,file.filename=top.qcow2`), and runs before
//! the socket opens. The QMP socket is created with mode 0600 and serves several clients at once.
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
    /// A node to add at start, as blockdev-add's arguments (JSON, or QEMU's keyval form)
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

/// `--blockdev` in QEMU's keyval form (`driver=qcow2,node-name=top,file.driver=file,
/// file.filename=top.qcow2,backing=`), as blockdev-add's JSON: the members QAPI types as
/// booleans and integers converted as QEMU's keyval visitor converts them (`on`/`off`,
/// `yes`/`no`, `true`/`false`; decimal numbers), numbered members (`inject-error.0.event`)
/// as lists, and an empty `backing` as null (no backing file).
fn keyval_blockdev(s: &str) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    const BOOLS: &[&str] = &[
        "read-only",
        "auto-read-only",
        "force-share",
        "direct",
        "no-flush",
        "read-zeroes",
        "once",
        "immediately",
    ];
    const INTS: &[&str] = &[
        "size",
        "offset",
        "cache-size",
        "latency-ns",
        "errno",
        "sector",
        "state",
    ];
    fn convert(key: &str, v: Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut m: serde_json::Map<String, Value> = m
                    .into_iter()
                    .map(|(k, v)| (k.clone(), convert(&k, v)))
                    .collect();
                // {"0": a, "1": b} is the list [a, b].
                let numbered =
                    !m.is_empty() && (0..m.len()).all(|i| m.contains_key(&i.to_string()));
                if numbered {
                    return Value::Array(
                        (0..m.len())
                            .map(|i| m.remove(&i.to_string()).unwrap_or(Value::Null))
                            .collect(),
                    );
                }
                Value::Object(m)
            }
            Value::String(s) if BOOLS.contains(&key) => match s.as_str() {
                "on" | "yes" | "true" => Value::Bool(true),
                "off" | "no" | "false" => Value::Bool(false),
                _ => Value::String(s),
            },
            Value::String(s) if INTS.contains(&key) => s
                .parse::<u64>()
                .map(Value::from)
                .unwrap_or(Value::String(s)),
            Value::String(s) if key == "backing" && s.is_empty() => Value::Null,
            v => v,
        }
    }
    // ",," is a literal comma in a keyval value: set aside while splitting.
    dotted_to_json(&s.replace(",,", "\u{0}"), &[], &[])
        .into_iter()
        .map(|(k, v)| (k.clone(), convert(&k, unescape(v))))
        .collect()
}

/// Puts back the literal commas (",,") that keyval parsing set aside.
fn unescape(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(s.replace('\u{0}', ",")),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, unescape(v))).collect()),
        v => v,
    }
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
        let m = if b.trim_start().starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(b).map_err(|e| format!("--blockdev: {e}"))?;
            let serde_json::Value::Object(m) = v else {
                return Err("--blockdev: expected a JSON object".into());
            };
            m
        } else {
            keyval_blockdev(b)
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
        // Created 0600 from the start (no window with the umask's mode); the umask is
        // restored at once (nothing else creates files at this point of start-up).
        // SAFETY: umask only swaps the process's file-mode mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(p);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let l = bound.map_err(|e| format!("{}: {e}", p.display()))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        listeners.push(l);
    }
    // The event thread delivers until shutdown, then what the shutdown itself announced
    // (the jobs it cancelled) before it ends: clients still connected see those events, as
    // QEMU's do, before the socket closes.
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forwarder = {
        let m = Arc::clone(&monitor);
        let closing = Arc::clone(&closing);
        std::thread::Builder::new()
            .name("qmp-events".into())
            .spawn(move || m.forward_events(events, &closing))
            .map_err(|e| e.to_string())?
    };
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
    // Every event of the shutdown is queued by now: deliver them, then go on.
    closing.store(true, std::sync::atomic::Ordering::Release);
    let _ = forwarder.join();
    monitor.stop_added_iothreads();
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyval_blockdev_is_blockdev_adds_json() {
        let m = keyval_blockdev(
            "driver=qcow2,node-name=top,read-only=on,file.driver=file,\
             file.filename=/a,,b.qcow2,file.cache.direct=off,backing=",
        );
        assert_eq!(
            serde_json::Value::Object(m),
            json!({"driver": "qcow2", "node-name": "top", "read-only": true,
                   "file": {"driver": "file", "filename": "/a,b.qcow2",
                            "cache": {"direct": false}},
                   "backing": null})
        );
        let m = keyval_blockdev(
            "driver=blkdebug,node-name=d,image=f,inject-error.0.event=read_aio,\
             inject-error.0.sector=1024,inject-error.0.once=on,inject-error.1.event=write_aio",
        );
        assert_eq!(
            m["inject-error"],
            json!([{"event": "read_aio", "sector": 1024, "once": true},
                   {"event": "write_aio"}])
        );
    }
}
