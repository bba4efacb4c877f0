//! The QMP commands `strata daemon` implements, with QEMU's argument names, defaults, reply
//! shapes and error texts, each mapped onto the engine's typed API. Commands run one at a
//! time under the monitor lock, as in QEMU's monitor.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use engine::drivers::blkdebug::{BlkdebugOptions, ErrorRule, IoType};
use engine::drivers::file::{Aio, Discard, FileDriver, FileOptions, Locking};
use engine::drivers::null::NullOptions;
use engine::drivers::qcow2::Qcow2Driver;
use engine::drivers::raw::RawOptions;
use engine::job::commit::CommitArgs;
use engine::job::create::{CreateArgs, CreateTarget};
use engine::job::stream::StreamArgs;
use engine::job::{IoOp, Job, JobEvent, JobEventKind, JobInfo, JobOptions, JobType, OnError};
use engine::nbd::{NbdAddr, NbdServer};
use engine::{BackingSpec, ChildSpec, DriverSpec, Engine, Node, NodeSpec};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};

use super::args::Args;
use super::qmp::{event, ClientOut, Handler, QmpError};

/// Every command, as query-commands lists them.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "blockdev-snapshot",
    "query-named-block-nodes",
    "query-blockstats",
    "block-stream",
    "block-commit",
    "block-job-set-speed",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "query-block-jobs",
    "query-jobs",
    "blockdev-create",
    "object-add",
    "object-del",
    "x-blockdev-set-iothread",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
];

/// QEMU 10's BlockdevDriver values: a name outside them is refused with the enum's text.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

/// The monitor: the engine and the clients that receive events.
pub struct Monitor {
    /// The engine the commands drive.
    pub engine: Engine,
    /// One command at a time.
    lock: Mutex<()>,
    clients: Mutex<Vec<Arc<ClientOut>>>,
    /// Set by `quit`; the daemon's main thread waits for it.
    pub quit: std::sync::mpsc::SyncSender<()>,
    /// IoThread objects by id.
    iothreads: Mutex<std::collections::BTreeMap<String, IoThreadObject>>,
    /// The NBD server, if started, and its exports by id.
    nbd: Mutex<Option<NbdState>>,
}

struct NbdState {
    server: NbdServer,
    /// Export id -> (NBD name, node name).
    exports: std::collections::BTreeMap<String, (String, String)>,
}

/// An `iothread` object: one of the engine's own (from the command line) or one added later.
enum IoThreadObject {
    Engine(usize),
    Added(engine::IoThread),
}

impl IoThreadObject {
    fn handle(&self, e: &Engine) -> Option<engine::IoThreadHandle> {
        match self {
            IoThreadObject::Engine(i) => e.iothread(*i),
            IoThreadObject::Added(t) => Some(t.handle()),
        }
    }
}

impl Monitor {
    /// A monitor over `engine`; `quit` is signalled by the `quit` command.
    pub fn new(engine: Engine, quit: std::sync::mpsc::SyncSender<()>) -> Monitor {
        Monitor {
            engine,
            lock: Mutex::new(()),
            clients: Mutex::new(Vec::new()),
            quit,
            iothreads: Mutex::new(std::collections::BTreeMap::new()),
            nbd: Mutex::new(None),
        }
    }

    /// Runs a command given on the command line (`--nbd-server`, `--export`) as its QMP form.
    pub fn launch_command(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        self.execute(name, args)
    }

    /// Stops the NBD server (clients disconnected, exports released).
    pub fn stop_nbd(&self) {
        if let Some(mut st) = self.nbd.lock().take() {
            st.server.stop();
        }
    }

    /// Names the engine's IoThread `index` (an `--object iothread,id=X` on the command line).
    pub fn name_iothread(&self, id: &str, index: usize) {
        self.iothreads
            .lock()
            .insert(id.to_string(), IoThreadObject::Engine(index));
    }

    /// Shuts down the IoThreads added with object-add.
    pub fn stop_added_iothreads(&self) {
        let all = std::mem::take(&mut *self.iothreads.lock());
        for (_, o) in all {
            if let IoThreadObject::Added(t) = o {
                t.shutdown();
            }
        }
    }

    /// Sends an event to every negotiated client; forgets the dead ones.
    pub fn broadcast(&self, msg: &Value) {
        let clients: Vec<Arc<ClientOut>> = {
            let mut c = self.clients.lock();
            c.retain(|c| !c.dead.load(Ordering::Acquire));
            c.clone()
        };
        for c in clients {
            if c.negotiated.load(Ordering::Acquire) {
                c.send(msg);
            }
        }
    }

    /// Turns job events into QMP events, until the engine goes or `closing` is set and no
    /// event is left (so the events of the shutdown itself, the jobs it cancels, still
    /// reach the clients before the daemon exits).
    pub fn forward_events(&self, events: engine::job::JobEvents, closing: &AtomicBool) {
        loop {
            match events.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(ev) => {
                    for msg in qmp_events(&ev) {
                        self.broadcast(&msg);
                    }
                }
                Err(e) if e.is_timeout() => {
                    if closing.load(Ordering::Acquire) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Runs a blockdev-add given as JSON (QMP, or the `--blockdev` launch option).
    pub fn blockdev_add(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let _g = self.lock.lock();
        self.cmd_blockdev_add(Args::new(args))
    }
}

/// The QMP events of one job event.
pub fn qmp_events(ev: &JobEvent) -> Vec<Value> {
    let at = ev.at;
    // Create jobs are not block jobs: only their status changes are events.
    let block_job = |kind: &JobType| *kind != JobType::Create;
    match &ev.kind {
        JobEventKind::Ready { kind, .. }
        | JobEventKind::Pending { kind, .. }
        | JobEventKind::Completed { kind, .. }
        | JobEventKind::Cancelled { kind, .. }
            if !block_job(kind) =>
        {
            return Vec::new()
        }
        _ => {}
    }
    let one = |name: &str, data: Value| vec![event(name, data, at)];
    match &ev.kind {
        JobEventKind::StatusChange { id, status } => one(
            "JOB_STATUS_CHANGE",
            json!({"status": status.as_str(), "id": id}),
        ),
        JobEventKind::Ready {
            id,
            kind,
            len,
            offset,
            speed,
        } => one(
            "BLOCK_JOB_READY",
            json!({"device": id, "len": len, "offset": offset, "speed": speed,
                   "type": kind.as_str()}),
        ),
        JobEventKind::Pending { id, kind } => one(
            "BLOCK_JOB_PENDING",
            json!({"type": kind.as_str(), "id": id}),
        ),
        JobEventKind::Completed {
            id,
            kind,
            len,
            offset,
            speed,
            error,
        } => {
            let mut data = json!({"device": id, "len": len, "offset": offset, "speed": speed,
                                  "type": kind.as_str()});
            if let Some(e) = error {
                data["error"] = json!(e);
            }
            one("BLOCK_JOB_COMPLETED", data)
        }
        JobEventKind::Cancelled {
            id,
            kind,
            len,
            offset,
            speed,
        } => one(
            "BLOCK_JOB_CANCELLED",
            json!({"device": id, "len": len, "offset": offset, "speed": speed,
                   "type": kind.as_str()}),
        ),
        JobEventKind::Error {
            id,
            operation,
            action,
        } => one(
            "BLOCK_JOB_ERROR",
            json!({"device": id, "operation": match operation {
                IoOp::Read => "read",
                IoOp::Write => "write",
            }, "action": action.as_str()}),
        ),
    }
}

impl Handler for Monitor {
    fn greeting(&self) -> Value {
        json!({"version": version(), "capabilities": []})
    }

    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        let _g = self.lock.lock();
        let a = Args::new(args);
        match name {
            "query-version" => {
                a.finish()?;
                Ok(version())
            }
            "query-commands" => {
                a.finish()?;
                Ok(Value::Array(
                    COMMANDS.iter().map(|c| json!({"name": c})).collect(),
                ))
            }
            "quit" => {
                a.finish()?;
                let _ = self.quit.try_send(());
                Ok(json!({}))
            }
            "blockdev-add" => self.cmd_blockdev_add(a),
            "blockdev-del" => self.cmd_blockdev_del(a),
            "blockdev-snapshot" => self.cmd_blockdev_snapshot(a),
            "query-named-block-nodes" => self.cmd_query_named_block_nodes(a),
            "query-blockstats" => self.cmd_query_blockstats(a),
            "block-stream" => self.cmd_block_stream(a),
            "block-commit" => self.cmd_block_commit(a),
            "block-job-set-speed" => {
                let mut a = a;
                let device = a.str("device")?;
                let speed = a.int("speed")?;
                a.finish()?;
                block_job(&self.engine, &device)?.set_speed(speed)?;
                Ok(json!({}))
            }
            "block-job-pause" => self.block_job_verb(a, "device", |j| j.user_pause()),
            "block-job-resume" => self.block_job_verb(a, "device", |j| j.user_resume()),
            "block-job-complete" => self.block_job_verb(a, "device", |j| j.complete()),
            "block-job-finalize" => self.block_job_verb(a, "id", |j| j.finalize()),
            "block-job-dismiss" => self.block_job_verb(a, "id", |j| j.dismiss()),
            "block-job-cancel" => {
                let mut a = a;
                let device = a.str("device")?;
                let force = a.opt_bool("force")?.unwrap_or(false);
                a.finish()?;
                let job = block_job(&self.engine, &device)?;
                if job.info().paused && !force && user_paused(&job) {
                    return Err(QmpError::generic(format!(
                        "The block job for device '{device}' is currently paused"
                    )));
                }
                job.cancel(force)?;
                Ok(json!({}))
            }
            "job-pause" => self.job_verb(a, |j| j.user_pause()),
            "job-resume" => self.job_verb(a, |j| j.user_resume()),
            "job-complete" => self.job_verb(a, |j| j.complete()),
            "job-finalize" => self.job_verb(a, |j| j.finalize()),
            "job-dismiss" => self.job_verb(a, |j| j.dismiss()),
            "job-cancel" => self.job_verb(a, |j| j.cancel(true)),
            "blockdev-create" => self.cmd_blockdev_create(a),
            "object-add" => self.cmd_object_add(a),
            "object-del" => self.cmd_object_del(a),
            "x-blockdev-set-iothread" => self.cmd_set_iothread(a),
            "nbd-server-start" => self.cmd_nbd_server_start(a),
            "nbd-server-stop" => {
                a.finish()?;
                match self.nbd.lock().take() {
                    Some(mut st) => {
                        st.server.stop();
                        Ok(json!({}))
                    }
                    None => Err(QmpError::generic("NBD server not running")),
                }
            }
            "block-export-add" => self.cmd_block_export_add(a),
            "block-export-del" => self.cmd_block_export_del(a),
            "query-block-exports" => {
                a.finish()?;
                let nbd = self.nbd.lock();
                let list: Vec<Value> = nbd
                    .iter()
                    .flat_map(|st| st.exports.iter())
                    .map(|(id, (_, node))| {
                        json!({"type": "nbd", "id": id, "node-name": node, "shutting-down": false})
                    })
                    .collect();
                Ok(Value::Array(list))
            }
            "query-block-jobs" => {
                a.finish()?;
                Ok(Value::Array(
                    self.engine
                        .jobs()
                        .list()
                        .iter()
                        .filter(|j| j.kind() != JobType::Create)
                        .map(|j| block_job_info(&j.info()))
                        .collect(),
                ))
            }
            "query-jobs" => {
                a.finish()?;
                Ok(Value::Array(
                    self.engine
                        .jobs()
                        .list()
                        .iter()
                        .map(|j| job_info(&j.info()))
                        .collect(),
                ))
            }
            "qmp_capabilities" => unreachable!("handled by the server"),
            other => Err(QmpError::with_class(
                "CommandNotFound",
                format!("The command {other} has not been found"),
            )),
        }
    }

    fn add_client(&self, c: Arc<ClientOut>) {
        self.clients.lock().push(c);
    }
}

/// The version strata's QMP dialect follows (QEMU's, whose commands and texts it speaks),
/// with strata's own version as the package.
fn version() -> Value {
    json!({"qemu": {"major": 10, "minor": 0, "micro": 2},
           "package": format!("strata {}", env!("CARGO_PKG_VERSION"))})
}

fn user_paused(job: &Job) -> bool {
    job.info().paused && job.info().io_status == engine::job::IoStatus::Ok
}

/// A block job by id (QEMU's find_block_job: DeviceNotActive).
fn block_job(e: &Engine, id: &str) -> Result<Arc<Job>, QmpError> {
    e.jobs()
        .get(id)
        .map_err(|_| QmpError::with_class("DeviceNotActive", format!("Block job '{id}' not found")))
}

fn block_job_info(i: &JobInfo) -> Value {
    let mut v = json!({
        "auto-finalize": i.auto_finalize,
        "io-status": i.io_status.as_str(),
        "device": i.id,
        "auto-dismiss": i.auto_dismiss,
        "busy": i.busy,
        "len": i.total_progress,
        "offset": i.current_progress,
        "status": i.status.as_str(),
        "paused": i.paused,
        "speed": i.speed,
        "ready": i.ready,
        "type": i.kind.as_str(),
    });
    if let Some(e) = &i.error {
        v["error"] = json!(e);
    }
    v
}

fn job_info(i: &JobInfo) -> Value {
    let mut v = json!({
        "current-progress": i.current_progress,
        "status": i.status.as_str(),
        "total-progress": i.total_progress,
        "type": i.kind.as_str(),
        "id": i.id,
    });
    if let Some(e) = &i.error {
        v["error"] = json!(e);
    }
    v
}

const ON_ERROR: &[(&str, OnError)] = &[
    ("report", OnError::Report),
    ("ignore", OnError::Ignore),
    ("stop", OnError::Stop),
    ("enospc", OnError::Enospc),
];

impl Monitor {
    fn block_job_verb(
        &self,
        mut a: Args,
        key: &str,
        f: impl FnOnce(&Arc<Job>) -> engine::Result<()>,
    ) -> Result<Value, QmpError> {
        let id = a.str(key)?;
        a.finish()?;
        f(&block_job(&self.engine, &id)?)?;
        Ok(json!({}))
    }

    fn job_verb(
        &self,
        mut a: Args,
        f: impl FnOnce(&Arc<Job>) -> engine::Result<()>,
    ) -> Result<Value, QmpError> {
        let id = a.str("id")?;
        a.finish()?;
        let job = self
            .engine
            .jobs()
            .get(&id)
            .map_err(|_| QmpError::generic("Job not found"))?;
        f(&job)?;
        Ok(json!({}))
    }

    fn cmd_block_stream(&self, mut a: Args) -> Result<Value, QmpError> {
        let device = a.str("device")?;
        let mut s = StreamArgs::new(&device);
        s.job.job_id = a.opt_str("job-id")?;
        s.base = a.opt_str("base")?;
        s.base_node = a.opt_str("base-node")?;
        s.backing_file = a.opt_str("backing-file")?;
        let _mask = a.opt_bool("backing-mask-protocol")?;
        s.bottom = a.opt_str("bottom")?;
        job_options(&mut a, &mut s.job)?;
        a.finish()?;
        self.engine.stream(s)?;
        Ok(json!({}))
    }

    fn cmd_block_commit(&self, mut a: Args) -> Result<Value, QmpError> {
        let device = a.str("device")?;
        let mut c = CommitArgs::new(&device);
        c.job.job_id = a.opt_str("job-id")?;
        c.base_node = a.opt_str("base-node")?;
        c.base = a.opt_str("base")?;
        c.top_node = a.opt_str("top-node")?;
        c.top = a.opt_str("top")?;
        c.backing_file = a.opt_str("backing-file")?;
        let _mask = a.opt_bool("backing-mask-protocol")?;
        job_options(&mut a, &mut c.job)?;
        a.finish()?;
        self.engine.commit(c)?;
        Ok(json!({}))
    }

    fn cmd_blockdev_create(&self, mut a: Args) -> Result<Value, QmpError> {
        let job_id = a.str("job-id")?;
        let mut o = a
            .object("options")?
            .ok_or_else(|| QmpError::generic("Parameter 'options' is missing"))?;
        let driver = o.str("driver")?;
        let target = match driver.as_str() {
            "file" => {
                let filename = PathBuf::from(o.str("filename")?);
                let size = o
                    .opt_size("size")?
                    .ok_or_else(|| QmpError::generic("Parameter 'options.size' is missing"))?;
                if let Some(p) = o.opt_str("preallocation")? {
                    if p != "off" {
                        return Err(QmpError::generic(format!(
                            "Unsupported preallocation mode '{p}'"
                        )));
                    }
                }
                let _nocow = o.opt_bool("nocow")?;
                CreateTarget::File { filename, size }
            }
            "qcow2" => {
                use engine::drivers::qcow2::create::{CreateOptions, Preallocation};
                let file = match o.take("file") {
                    Some(Value::String(s)) => s,
                    Some(_) => {
                        return Err(QmpError::generic(
                            "blockdev-create: 'file' must name an existing node",
                        ))
                    }
                    None => return Err(QmpError::generic("Parameter 'options.file' is missing")),
                };
                let mut c = CreateOptions {
                    size: o
                        .opt_size("size")?
                        .ok_or_else(|| QmpError::generic("Parameter 'options.size' is missing"))?,
                    ..Default::default()
                };
                if let Some(v) = o.opt_enum("version", &[("v2", 2u32), ("v3", 3)])? {
                    c.version = v;
                }
                c.backing_file = o.opt_str("backing-file")?;
                c.backing_format = o.opt_str("backing-fmt")?;
                if let Some(cs) = o.opt_size("cluster-size")? {
                    c.cluster_size = cs;
                }
                if let Some(rb) = o.opt_size("refcount-bits")? {
                    c.refcount_bits = rb as u32;
                }
                if let Some(l) = o.opt_bool("lazy-refcounts")? {
                    c.lazy_refcounts = l;
                }
                if let Some(p) = o.opt_enum(
                    "preallocation",
                    &[
                        ("off", Preallocation::Off),
                        ("metadata", Preallocation::Metadata),
                        ("full", Preallocation::Full),
                    ],
                )? {
                    c.preallocation = p;
                }
                if let Some(ct) = o.opt_str("compression-type")? {
                    if ct != "zlib" {
                        return Err(QmpError::generic(format!(
                            "compression-type {ct}: strata creates zlib images only"
                        )));
                    }
                }
                if o.opt_bool("extended-l2")? == Some(true) {
                    return Err(QmpError::generic(
                        "extended-l2: strata does not create images with extended L2 entries",
                    ));
                }
                for unsupported in ["data-file", "data-file-raw", "encrypt"] {
                    if o.has(unsupported) {
                        return Err(QmpError::generic(format!(
                            "blockdev-create: qcow2 '{unsupported}' is not supported"
                        )));
                    }
                }
                CreateTarget::Qcow2 { file, opts: c }
            }
            other if QEMU_DRIVERS.contains(&other) => {
                return Err(QmpError::generic(format!(
                    "Driver '{other}' does not support blockdev-create"
                )))
            }
            // Not a BlockdevDriver at all: QEMU's enum text.
            other => {
                return Err(QmpError::generic(format!(
                    "Parameter 'driver' does not accept value '{other}'"
                )))
            }
        };
        o.finish()?;
        a.finish()?;
        self.engine.create_image(CreateArgs { job_id, target })?;
        Ok(json!({}))
    }

    fn cmd_object_add(&self, mut a: Args) -> Result<Value, QmpError> {
        let qom_type = a.str("qom-type")?;
        let id = a.str("id")?;
        if qom_type != "iothread" {
            return Err(QmpError::generic(format!(
                "Invalid parameter 'qom-type': strata supports only 'iothread' objects, not '{qom_type}'"
            )));
        }
        for k in ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"] {
            let _ = a.opt_int(k)?;
        }
        a.finish()?;
        if engine::job::check_job_id(&id).is_err() {
            return Err(QmpError::generic(format!("Invalid object ID '{id}'")));
        }
        let mut objs = self.iothreads.lock();
        if objs.contains_key(&id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let t = self.engine.new_iothread(&id)?;
        objs.insert(id, IoThreadObject::Added(t));
        Ok(json!({}))
    }

    fn cmd_object_del(&self, mut a: Args) -> Result<Value, QmpError> {
        let id = a.str("id")?;
        a.finish()?;
        let mut objs = self.iothreads.lock();
        let Some(o) = objs.get(&id) else {
            return Err(QmpError::generic(format!("object '{id}' not found")));
        };
        let in_use = o
            .handle(&self.engine)
            .is_some_and(|h| self.engine.iothread_in_use(h.index()));
        if in_use || matches!(o, IoThreadObject::Engine(_)) {
            return Err(QmpError::generic(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        if let Some(IoThreadObject::Added(t)) = objs.remove(&id) {
            t.shutdown();
        }
        Ok(json!({}))
    }

    fn cmd_set_iothread(&self, mut a: Args) -> Result<Value, QmpError> {
        let node = a.str("node-name")?;
        let id = match a.take("iothread") {
            None => return Err(QmpError::generic("Parameter 'iothread' is missing")),
            Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id),
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'iothread', expected: StrOrNull",
                ))
            }
        };
        let force = a.opt_bool("force")?.unwrap_or(false);
        a.finish()?;
        // QEMU's order: the node, then the iothread.
        if graph::find_node(&node).is_none() {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{node}'"
            )));
        }
        let io = match id {
            None => None,
            Some(id) => Some(
                self.iothreads
                    .lock()
                    .get(&id)
                    .and_then(|o| o.handle(&self.engine))
                    .ok_or_else(|| QmpError::generic(format!("Cannot find iothread {id}")))?,
            ),
        };
        self.engine.set_node_iothread(&node, io, force)?;
        Ok(json!({}))
    }

    fn cmd_nbd_server_start(&self, mut a: Args) -> Result<Value, QmpError> {
        let mut addr = a
            .object("addr")?
            .ok_or_else(|| QmpError::generic("Parameter 'addr' is missing"))?;
        let kind = addr.str("type")?;
        // QMP's nbd-server-start nests the address under 'data' (SocketAddressLegacy);
        // the --nbd-server option gives it flat.
        let mut fields = match addr.object("data")? {
            Some(d) => d,
            None => addr,
        };
        let nbd_addr = match kind.as_str() {
            "unix" => NbdAddr::Unix(PathBuf::from(fields.str("path")?)),
            "inet" => {
                let host = fields.str("host")?;
                let port = fields.str("port")?;
                let port: u16 = port.parse().map_err(|_| {
                    QmpError::generic(format!(
                        "Parameter 'port' expects a port number, not '{port}'"
                    ))
                })?;
                for k in ["numeric", "to", "ipv4", "ipv6", "keep-alive"] {
                    let _ = fields.take(k);
                }
                NbdAddr::Inet(host, port)
            }
            other => {
                return Err(QmpError::generic(format!(
                    "NBD server address type '{other}' is not supported (unix, inet)"
                )))
            }
        };
        fields.finish()?;
        let max = a.opt_size("max-connections")?.unwrap_or(0);
        if a.has("tls-creds") || a.has("tls-authz") {
            return Err(QmpError::generic("TLS is not supported by this NBD server"));
        }
        a.finish()?;
        let mut nbd = self.nbd.lock();
        if nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let server = NbdServer::start(nbd_addr, max.min(u32::MAX as u64) as u32)?;
        *nbd = Some(NbdState {
            server,
            exports: std::collections::BTreeMap::new(),
        });
        Ok(json!({}))
    }

    fn cmd_block_export_add(&self, mut a: Args) -> Result<Value, QmpError> {
        let kind = a.str("type")?;
        let id = a.str("id")?;
        let node = a.str("node-name")?;
        let writable = a.opt_bool("writable")?.unwrap_or(false);
        let _writethrough = a.opt_bool("writethrough")?;
        let _iothread = a.opt_str("iothread")?;
        let _fixed = a.opt_bool("fixed-iothread")?;
        let name = a.opt_str("name")?.unwrap_or_else(|| node.clone());
        let description = a.opt_str("description")?;
        for k in ["bitmaps", "allocation-depth"] {
            if a.has(k) {
                return Err(QmpError::generic(format!(
                    "block-export-add: '{k}' is not supported"
                )));
            }
        }
        a.finish()?;
        if kind != "nbd" {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{kind}'"
            )));
        }
        let mut nbd = self.nbd.lock();
        let Some(st) = nbd.as_mut() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        if st.exports.contains_key(&id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        if st.exports.values().any(|(n, _)| *n == name) {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        if name.len() > 4096 {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        let backend = self.engine.backend(
            &node,
            &[],
            engine::BackendOptions {
                name: Some(format!("export '{id}'")),
                read_only: !writable,
                share_rw: true,
                ..Default::default()
            },
        )?;
        st.server.add_export(engine::nbd::Export::new(
            &name,
            description,
            writable,
            backend,
        ))?;
        st.exports.insert(id, (name, node));
        Ok(json!({}))
    }

    fn cmd_block_export_del(&self, mut a: Args) -> Result<Value, QmpError> {
        let id = a.str("id")?;
        let hard = a
            .opt_enum("mode", &[("safe", false), ("hard", true)])?
            .unwrap_or(false);
        a.finish()?;
        let mut nbd = self.nbd.lock();
        let Some(st) = nbd.as_mut() else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        let Some((name, _)) = st.exports.get(&id).cloned() else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        st.server.remove_export(&name, hard).map_err(|_| {
            QmpError::generic(format!(
                "export '{id}' still in use (use mode='hard' to force client disconnect)"
            ))
        })?;
        st.exports.remove(&id);
        drop(nbd);
        self.broadcast(&event(
            "BLOCK_EXPORT_DELETED",
            json!({"id": id}),
            std::time::SystemTime::now(),
        ));
        Ok(json!({}))
    }

    fn cmd_blockdev_snapshot(&self, mut a: Args) -> Result<Value, QmpError> {
        let node = a.str("node")?;
        let overlay = a.str("overlay")?;
        a.finish()?;
        // QEMU's op blockers on the node (not the overlay): a node that is another's
        // backing node, or that a job owns, takes no snapshot.
        if let Some(n) = graph::find_node(&node) {
            self.op_blocked(&n)?;
        }
        self.engine.snapshot(&node, &overlay)?;
        Ok(json!({}))
    }

    fn cmd_blockdev_del(&self, mut a: Args) -> Result<Value, QmpError> {
        let name = a.str("node-name")?;
        a.finish()?;
        // QEMU's order: a node a device (backend, export) uses, then the op blockers.
        if let Some(n) = graph::find_node(&name) {
            if !n.parents().iter().any(|e| e.role() == graph::Role::Root) {
                self.op_blocked(&n)?;
            }
        }
        self.engine.del_node(&name)?;
        Ok(json!({}))
    }

    /// QEMU's op blockers, in the order it adds them: the backing edge's ("Node 'base' is
    /// busy: node is used as backing hd of 'top'"), then a job's ("... is in use by block
    /// job: stream").
    fn op_blocked(&self, n: &Arc<Node>) -> Result<(), QmpError> {
        for e in n.parents() {
            if e.role() == graph::Role::Backing {
                if let Some(p) = e.parent().node() {
                    return Err(QmpError::generic(format!(
                        "Node '{}' is busy: node is used as backing hd of '{}'",
                        n.name(),
                        p.name()
                    )));
                }
            }
        }
        self.engine.jobs().check_free(n)?;
        Ok(())
    }

    fn cmd_blockdev_add(&self, mut a: Args) -> Result<Value, QmpError> {
        if !a.has("node-name") {
            if !a.has("driver") {
                return Err(QmpError::generic("Parameter 'driver' is missing"));
            }
            return Err(QmpError::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let spec = node_spec(&mut a, &Inherited::default())?;
        a.finish()?;
        self.engine.add_node(spec)?;
        Ok(json!({}))
    }

    /// Waits for the graph changes already queued, and the closes of the nodes they let go
    /// (a change starts only once those have ended), so a query after a job's last event
    /// shows the graph the job left, as QEMU's does.
    fn settle(&self) {
        let _ = self
            .engine
            .controller()
            .change_blocking(|_ctx| async move { Ok(()) });
    }

    fn cmd_query_named_block_nodes(&self, mut a: Args) -> Result<Value, QmpError> {
        let flat = a.opt_bool("flat")?.unwrap_or(false);
        a.finish()?;
        self.settle();
        let mut nodes = graph::all_nodes();
        nodes.sort_by(|x, y| x.name().cmp(y.name()));
        Ok(Value::Array(
            nodes.iter().map(|n| block_device_info(n, flat)).collect(),
        ))
    }

    fn cmd_query_blockstats(&self, mut a: Args) -> Result<Value, QmpError> {
        let query_nodes = a.opt_bool("query-nodes")?.unwrap_or(false);
        a.finish()?;
        self.settle();
        if !query_nodes {
            // No devices: only nodes have statistics here.
            return Ok(json!([]));
        }
        let mut nodes = graph::all_nodes();
        nodes.sort_by(|x, y| x.name().cmp(y.name()));
        Ok(Value::Array(
            nodes
                .iter()
                .map(|n| {
                    let s = n.stats();
                    // Every member BlockDeviceStats requires (clients such as libvirt read
                    // them); what strata does not count is 0.
                    json!({
                        "node-name": n.name(),
                        "stats": {
                            "rd_operations": s.rd_ops,
                            "rd_bytes": s.rd_bytes,
                            "wr_operations": s.wr_ops,
                            "wr_bytes": s.wr_bytes,
                            "flush_operations": s.flush_ops,
                            "unmap_operations": s.discard_ops,
                            "failed_rd_operations": 0,
                            "failed_wr_operations": s.failed_ops,
                            "rd_total_time_ns": s.rd_total_time_ns,
                            "wr_total_time_ns": s.wr_total_time_ns,
                            "flush_total_time_ns": s.flush_total_time_ns,
                            "unmap_bytes": 0, "unmap_total_time_ns": 0, "unmap_merged": 0,
                            "zone_append_bytes": 0, "zone_append_operations": 0,
                            "zone_append_total_time_ns": 0, "zone_append_merged": 0,
                            "wr_highest_offset": 0, "rd_merged": 0, "wr_merged": 0,
                            "failed_flush_operations": 0, "failed_unmap_operations": 0,
                            "failed_zone_append_operations": 0,
                            "invalid_rd_operations": 0, "invalid_wr_operations": 0,
                            "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
                            "invalid_zone_append_operations": 0,
                            "account_invalid": false, "account_failed": false,
                            "timed_stats": [],
                        }
                    })
                })
                .collect(),
        ))
    }
}

/// What an inline child takes from its parent unless it says otherwise (QEMU's option
/// inheritance for `read-only`, `cache.*`).
#[derive(Default, Clone)]
struct Inherited {
    read_only: bool,
    direct: Option<bool>,
    no_flush: Option<bool>,
}

/// A child given as a node name or an inline spec.
fn child(a: &mut Args, key: &str, inh: &Inherited) -> Result<Option<ChildSpec>, QmpError> {
    match a.take(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(ChildSpec::Name(s))),
        Some(Value::Object(m)) => {
            let mut sub = a.nested(key, m);
            let spec = node_spec(&mut sub, inh)?;
            sub.finish()?;
            Ok(Some(ChildSpec::Spec(Box::new(spec))))
        }
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{key}', expected: BlockdevRef"
        ))),
    }
}

fn required_child(a: &mut Args, key: &str, inh: &Inherited) -> Result<ChildSpec, QmpError> {
    child(a, key, inh)?.ok_or_else(|| QmpError::generic(format!("Parameter '{key}' is missing")))
}

/// BlockdevOptions as a node spec.
fn node_spec(a: &mut Args, parent: &Inherited) -> Result<NodeSpec, QmpError> {
    let driver = a.str("driver")?;
    let node_name = a.opt_str("node-name")?;
    let read_only = a.opt_bool("read-only")?.unwrap_or(parent.read_only);
    let auto_read_only = a.opt_bool("auto-read-only")?.unwrap_or(false);
    let mut inh = Inherited {
        read_only,
        ..parent.clone()
    };
    if let Some(mut c) = a.object("cache")? {
        if let Some(d) = c.opt_bool("direct")? {
            inh.direct = Some(d);
        }
        if let Some(n) = c.opt_bool("no-flush")? {
            inh.no_flush = Some(n);
        }
        c.finish()?;
    }
    let discard = a.opt_enum(
        "discard",
        &[
            ("ignore", Discard::Ignore),
            ("off", Discard::Ignore),
            ("unmap", Discard::Unmap),
            ("on", Discard::Unmap),
        ],
    )?;
    let _detect_zeroes = a.opt_enum("detect-zeroes", &[("off", ())])?;
    let _force_share = a.opt_bool("force-share")?;
    let driver = match driver.as_str() {
        "file" | "host_device" => {
            let filename = a.str("filename")?;
            let mut o = FileOptions::new(PathBuf::from(filename));
            o.read_only = read_only;
            o.auto_read_only = auto_read_only;
            o.direct = inh.direct.unwrap_or(false);
            o.no_flush = inh.no_flush.unwrap_or(false);
            o.discard = discard.unwrap_or_default();
            if let Some(aio) = a.opt_enum(
                "aio",
                &[
                    ("threads", Aio::Inline),
                    ("native", Aio::IoUring),
                    ("io_uring", Aio::IoUring),
                ],
            )? {
                o.aio = aio;
            }
            if let Some(l) = a.opt_enum(
                "locking",
                &[
                    ("auto", Locking::Auto),
                    ("on", Locking::On),
                    ("off", Locking::Off),
                ],
            )? {
                o.locking = l;
            }
            DriverSpec::File(o)
        }
        "null-co" => {
            let mut o = NullOptions::default();
            if let Some(s) = a.opt_size("size")? {
                o.size = s;
            }
            if let Some(z) = a.opt_bool("read-zeroes")? {
                o.read_zeroes = z;
            }
            if let Some(l) = a.opt_size("latency-ns")? {
                o.latency_ns = l;
            }
            DriverSpec::Null(o)
        }
        "raw" => {
            let file = required_child(a, "file", &inh)?;
            let opts = RawOptions {
                offset: a.opt_size("offset")?.unwrap_or(0),
                size: a.opt_size("size")?,
            };
            DriverSpec::Raw { file, opts }
        }
        "qcow2" => {
            let file = required_child(a, "file", &inh)?;
            let backing_inh = Inherited {
                read_only: true,
                ..inh.clone()
            };
            let backing = match a.take("backing") {
                None => BackingSpec::Default,
                Some(Value::Null) => BackingSpec::None,
                Some(Value::String(s)) => BackingSpec::Node(ChildSpec::Name(s)),
                Some(Value::Object(m)) => {
                    let mut sub = a.nested("backing", m);
                    let spec = node_spec(&mut sub, &backing_inh)?;
                    sub.finish()?;
                    BackingSpec::Node(ChildSpec::Spec(Box::new(spec)))
                }
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
                    ))
                }
            };
            let mut opts = engine::drivers::qcow2::Qcow2Options {
                read_only,
                ..Default::default()
            };
            if let Some(c) = a.opt_size("cache-size")? {
                opts.cache_size = c;
            }
            DriverSpec::Qcow2 {
                file,
                backing,
                opts,
            }
        }
        "copy-on-read" => {
            let file = required_child(a, "file", &inh)?;
            let bottom = a.opt_str("bottom")?;
            DriverSpec::CopyOnRead { file, bottom }
        }
        "blkdebug" => {
            let image = required_child(a, "image", &inh)?;
            let mut opts = BlkdebugOptions::default();
            if let Some(v) = a.take("inject-error") {
                opts.inject_error = inject_errors(v)?;
            }
            if a.has("config") {
                return Err(QmpError::generic(
                    "blkdebug: 'config' files are not supported; use 'inject-error'",
                ));
            }
            DriverSpec::Blkdebug { image, opts }
        }
        other => {
            return Err(QmpError::generic(format!(
                "Parameter 'driver' does not accept value '{other}'"
            )))
        }
    };
    Ok(NodeSpec {
        node_name,
        read_only,
        driver,
    })
}

/// blkdebug's `inject-error` list (event, errno, sector, once; `immediately` accepted).
fn inject_errors(v: Value) -> Result<Vec<ErrorRule>, QmpError> {
    let Value::Array(items) = v else {
        return Err(QmpError::generic(
            "Invalid parameter type for 'inject-error', expected: array",
        ));
    };
    let mut rules = Vec::new();
    for item in items {
        let Value::Object(m) = item else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'inject-error[0]', expected: object",
            ));
        };
        let mut r = Args::new(m);
        let event = r.str("event")?;
        let iotype = match event.as_str() {
            "read_aio" => IoType::Read,
            "write_aio" => IoType::Write,
            "flush_to_disk" | "flush_to_os" => IoType::Flush,
            "pwritev_zero" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            e => {
                return Err(QmpError::generic(format!(
                    "Parameter 'event' does not accept value '{e}'"
                )))
            }
        };
        let errno = r.opt_int("errno")?.unwrap_or(libc::EIO as i64) as i32;
        let sector = r.opt_int("sector")?;
        let once = r.opt_bool("once")?.unwrap_or(false);
        let _immediately = r.opt_bool("immediately")?;
        let _state = r.opt_int("state")?;
        let _iotype = r.take("iotype");
        r.finish()?;
        rules.push(ErrorRule {
            iotype,
            errno,
            range: sector.filter(|&s| s >= 0).map(|s| (s as u64 * 512, 512)),
            once,
        });
    }
    Ok(rules)
}

/// The file name QEMU shows for a node.
fn node_filename(n: &Arc<Node>) -> String {
    if n.driver_name() == "null-co" {
        return "null-co://".into();
    }
    engine::job::chain::image_filename(n).unwrap_or_default()
}

/// ImageInfo, recursive over the chain as QEMU walks it (the backing child, or a filter's
/// filtered child). A file node's length is counted in 512-byte sectors, as QEMU counts it.
fn image_info(n: &Arc<Node>) -> Value {
    let is_file = n.driver_as::<FileDriver>().is_some();
    let filename = node_filename(n);
    let mut v = json!({
        "virtual-size": if is_file { n.len().next_multiple_of(512) } else { n.len() },
        "filename": filename,
        "format": n.driver_name(),
    });
    // QEMU shows the dirty flag where bdrv_get_info answers (not null-co).
    if n.driver_name() != "null-co" {
        v["dirty-flag"] = json!(false);
    }
    if let Some(size) = actual_size(n) {
        v["actual-size"] = json!(size);
    }
    if is_file {
        v["format-specific"] = json!({"type": "file", "data": {}});
    }
    if let Some(q) = n.driver_as::<Qcow2Driver>() {
        v["cluster-size"] = json!(q.cluster_size());
        let h = q.info().header;
        let mut data = json!({
            "compat": if h.version >= 3 { "1.1" } else { "0.10" },
            "compression-type": match h.compression {
                engine::drivers::qcow2::header::Compression::Zlib => "zlib",
                engine::drivers::qcow2::header::Compression::Zstd => "zstd",
            },
            "refcount-bits": h.refcount_bits(),
        });
        if h.version >= 3 {
            use engine::drivers::qcow2::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT};
            data["lazy-refcounts"] = json!(h.compatible & COMPAT_LAZY_REFCOUNTS != 0);
            data["corrupt"] = json!(h.incompatible & INCOMPAT_CORRUPT != 0);
            data["extended-l2"] = json!(h.extended_l2());
        }
        v["format-specific"] = json!({"type": "qcow2", "data": data});
        if let (Some(b), fmt) = q.backing_name() {
            let full = engine::image::resolve_backing(std::path::Path::new(&filename), &b)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| b.clone());
            v["backing-filename"] = json!(b);
            v["full-backing-filename"] = json!(full);
            if let Some(f) = fmt {
                v["backing-filename-format"] = json!(f);
            }
        }
    }
    if let Some(b) = n.filter_or_cow_child() {
        v["backing-image"] = image_info(&b);
    }
    v
}

/// The file node under `n` (itself if it is one), past filters.
fn file_node(n: &Arc<Node>) -> Option<Arc<Node>> {
    let f = n.skip_filters();
    if f.driver_as::<FileDriver>().is_some() {
        return Some(f);
    }
    let c = f.file()?.skip_filters();
    c.driver_as::<FileDriver>().is_some().then_some(c)
}

/// The space the node's files take, as QEMU's bdrv_get_allocated_file_size counts it: a
/// file's allocation; 0 for null-co, none for blkdebug (a protocol); a filter's filtered
/// child; a format's file child.
fn actual_size(n: &Arc<Node>) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    if let Some(f) = n.driver_as::<FileDriver>() {
        return std::fs::metadata(f.path()).ok().map(|m| m.blocks() * 512);
    }
    match n.driver_name() {
        "null-co" => Some(0),
        "blkdebug" => None,
        _ if n.is_filter() => actual_size(&n.filter_or_cow_child()?),
        _ => actual_size(&n.file()?),
    }
}

/// BlockDeviceInfo, as query-named-block-nodes shows a node.
fn block_device_info(n: &Arc<Node>, flat: bool) -> Value {
    // QEMU counts the depth only in the nested form (flat stops at the node itself).
    let mut depth = 0;
    let mut b = if flat { None } else { n.filter_or_cow_child() };
    while let Some(x) = b {
        depth += 1;
        b = x.filter_or_cow_child();
    }
    let cache = file_node(n)
        .and_then(|f| f.driver_as::<FileDriver>().map(|d| d.cache_mode()))
        .unwrap_or((false, false));
    let mut image = image_info(n);
    if flat {
        if let Value::Object(m) = &mut image {
            m.remove("backing-image");
        }
    }
    let mut v = json!({
        "iops_rd": 0, "detect_zeroes": "off", "iops": 0, "iops_wr": 0,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "write_threshold": 0,
        "encrypted": false,
        "ro": n.is_read_only(),
        "drv": n.driver_name(),
        "node-name": n.name(),
        "backing_file_depth": depth,
        "file": node_filename(n),
        "active": true,
        "cache": {"writeback": true, "direct": cache.0, "no-flush": cache.1},
        "image": image,
    });
    // Only while the node has a backing node (QEMU: not for `backing: null`).
    if let (Some(q), true) = (n.driver_as::<Qcow2Driver>(), n.backing().is_some()) {
        if let (Some(bf), _) = q.backing_name() {
            v["backing_file"] = json!(bf);
        }
    }
    v
}

/// The job arguments block-stream and block-commit share after their own (`speed` to
/// `auto-dismiss`, in the schema's order, so the first bad one is the one QEMU names).
fn job_options(a: &mut Args, job: &mut JobOptions) -> Result<(), QmpError> {
    if let Some(v) = a.opt_int("speed")? {
        job.speed = v;
    }
    if let Some(v) = a.opt_enum("on-error", ON_ERROR)? {
        job.on_error = v;
    }
    job.filter_node_name = a.opt_str("filter-node-name")?;
    if let Some(v) = a.opt_bool("auto-finalize")? {
        job.auto_finalize = v;
    }
    if let Some(v) = a.opt_bool("auto-dismiss")? {
        job.auto_dismiss = v;
    }
    Ok(())
}
