//! The engine an embedder holds: IoThreads, the controller, and the nodes the user added.
//!
//! Every method that changes the graph runs as a change on the controller, so changes never
//! interleave. Nodes added with [`Engine::add_node`] are owned by the engine (as QEMU's monitor
//! owns blockdev-add'ed nodes) until [`Engine::del_node`]; nodes created inline as children
//! live as long as their parents.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use graph::{Error, ErrorKind, Node, Result, Role, Transaction};
use iothreads::{IoThread, IoThreadHandle, IoThreadOptions};
use parking_lot::Mutex;

use crate::backend::{Backend, BackendOptions};
use crate::controller::{ChangeCtx, Controller};
use crate::drivers::blkdebug::{BlkdebugDriver, BlkdebugOptions};
use crate::drivers::file::{FileDriver, FileOptions};
use crate::drivers::null::{NullDriver, NullOptions};
use crate::drivers::qcow2::{self, Qcow2Options};
use crate::drivers::raw::{self, RawOptions};
use crate::image;
use crate::job::commit::CommitArgs;
use crate::job::create::CreateArgs;
use crate::job::stream::StreamArgs;
use crate::job::{Job, JobManager};

/// A child given by node-name or as a spec of its own (QMP's "reference or inline").
///
/// As in QEMU, a child given inline is a part of its parent ([`Node::inherits_from`]): a
/// reopen of the parent read-only or read-write (a snapshot, a job that writes the image)
/// takes it along. A child referenced by name is a node on its own and keeps its mode.
#[derive(Debug, Clone)]
pub enum ChildSpec {
    /// An existing node.
    Name(String),
    /// A new node, created with its parent.
    Spec(Box<NodeSpec>),
}

impl ChildSpec {
    /// Whether the child is opened with its parent (inline), not referenced by name.
    pub fn is_inline(&self) -> bool {
        matches!(self, ChildSpec::Spec(_))
    }
}

/// Where a format node's backing node comes from.
#[derive(Debug, Clone, Default)]
pub enum BackingSpec {
    /// The backing file the image's header names, opened read-only (QEMU's default).
    #[default]
    Default,
    /// No backing node (QMP's `"backing": null`).
    None,
    /// This node.
    Node(ChildSpec),
}

/// Which driver, with its options.
#[derive(Debug, Clone)]
pub enum DriverSpec {
    /// `file`.
    File(FileOptions),
    /// `null-co`.
    Null(NullOptions),
    /// `raw` over `file`.
    Raw {
        /// The protocol child.
        file: ChildSpec,
        /// Options.
        opts: RawOptions,
    },
    /// `qcow2` over `file`.
    Qcow2 {
        /// The protocol child.
        file: ChildSpec,
        /// The backing node.
        backing: BackingSpec,
        /// Options.
        opts: Qcow2Options,
    },
    /// `copy-on-read` over `file`: reads of data below `file` (down to `bottom`, a node
    /// name) are copied into `file`.
    CopyOnRead {
        /// The filtered child.
        file: ChildSpec,
        /// The lowest node whose data is copied (None: all of the chain).
        bottom: Option<String>,
    },
    /// `blkdebug` over `image`.
    Blkdebug {
        /// The filtered child.
        image: ChildSpec,
        /// Options.
        opts: BlkdebugOptions,
    },
}

/// What to open.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The node-name (None: an automatic `#blockNNN`).
    pub node_name: Option<String>,
    /// Open read-only.
    pub read_only: bool,
    /// The driver.
    pub driver: DriverSpec,
}

/// How many IoThreads to start, and how.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// IoThreads (at least one; the first also serves the controller's I/O).
    pub iothreads: usize,
    /// Ring options of every IoThread.
    pub iothread_options: IoThreadOptions,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            iothreads: 1,
            iothread_options: IoThreadOptions::default(),
        }
    }
}

/// The engine.
pub struct Engine {
    // Field order is drop order: the controller stops (finishing closes on an IoThread)
    // before the IoThreads do.
    jobs: JobManager,
    controller: Controller,
    owned: Arc<Mutex<BTreeMap<String, Arc<Node>>>>,
    iothreads: Vec<IoThread>,
    /// IoThreads nodes were moved to (x-blockdev-set-iothread): jobs on them run there.
    homes: Mutex<BTreeMap<String, IoThreadHandle>>,
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("Cannot find device='{name}' nor node-name='{name}'"),
    )
}

/// Looks a node up by name (engine-owned or any live node), as QEMU looks up a name that
/// may be a device or a node (`bdrv_lookup_bs(name, name)`: a job's `device`, a node a
/// blockdev's option references): the error names both.
pub fn lookup(name: &str) -> Result<Arc<Node>> {
    graph::find_node(name).ok_or_else(|| not_found(name))
}

/// Looks a node up by node name only, as QEMU does for the job arguments that name nodes
/// (`bdrv_lookup_bs(NULL, name)`: `base-node`, `top-node`, `bottom`): the error names no
/// device, "Cannot find device='' nor node-name='x'".
pub fn lookup_node(name: &str) -> Result<Arc<Node>> {
    graph::find_node(name).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("Cannot find device='' nor node-name='{name}'"),
        )
    })
}

/// Runs an I/O-doing open on the controller's IoThread.
pub(crate) async fn on_io<T, F, Fut>(ctx: &ChangeCtx, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>> + 'static,
{
    ctx.io_thread().spawn_with(f).await.map_err(|e| {
        Error::new(
            ErrorKind::Busy,
            format!("the controller's IoThread stopped: {e}"),
        )
    })?
}

/// Opens `spec` (and its inline children) inside a change.
fn open_spec<'a>(
    ctx: &'a ChangeCtx,
    spec: &'a NodeSpec,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Arc<Node>>> + 'a>> {
    Box::pin(async move {
        if let Some(n) = &spec.node_name {
            graph::check_node_name(n)?;
            if graph::find_node(n).is_some() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("Duplicate nodes with node-name='{n}'"),
                ));
            }
        }
        let name = spec.node_name.clone();
        match &spec.driver {
            DriverSpec::File(o) => {
                let o = FileOptions {
                    read_only: spec.read_only || o.read_only,
                    ..o.clone()
                };
                let d = FileDriver::open(&o)?;
                let ro = d.is_read_only();
                Node::new(name.as_deref(), Box::new(d), ro)
            }
            DriverSpec::Null(o) => Node::new(
                name.as_deref(),
                Box::new(NullDriver::new(o.clone())),
                spec.read_only,
            ),
            DriverSpec::Blkdebug { image, opts } => {
                let child = child_node(ctx, image).await?;
                let node = Node::new(
                    name.as_deref(),
                    Box::new(BlkdebugDriver::new(opts.clone())),
                    spec.read_only,
                )?;
                ctx.transaction(|tx| tx.attach_child(&node, &child, Role::Filtered).map(drop))?;
                inherit(image, &child, &node);
                Ok(node)
            }
            DriverSpec::CopyOnRead { file, bottom } => {
                let child = child_node(ctx, file).await?;
                let bottom = bottom.as_deref().map(lookup).transpose()?;
                if let Some(b) = &bottom {
                    if !Arc::ptr_eq(b, &child) && !child.reaches(b) {
                        return Err(Error::new(
                            ErrorKind::InvalidArgument,
                            format!(
                                "Bottom node '{}' is not a descendant of '{}'",
                                b.name(),
                                child.name()
                            ),
                        ));
                    }
                }
                let opts = crate::drivers::cor::CorOptions {
                    bottom,
                    ..Default::default()
                };
                let node = crate::drivers::cor::open(name.as_deref(), &child, opts)?;
                inherit(file, &child, &node);
                Ok(node)
            }
            DriverSpec::Raw { file: f, opts } => {
                let file = child_node(ctx, f).await?;
                let node = raw::open(name.as_deref(), &file, opts.clone(), spec.read_only)?;
                inherit(f, &file, &node);
                Ok(node)
            }
            DriverSpec::Qcow2 {
                file: f,
                backing,
                opts,
            } => {
                let file = child_node(ctx, f).await?;
                let o = Qcow2Options {
                    read_only: spec.read_only || opts.read_only,
                    ..opts.clone()
                };
                let f2 = Arc::clone(&file);
                let node = on_io(ctx, move || async move {
                    qcow2::open(name.as_deref(), &f2, &o).await
                })
                .await?;
                inherit(f, &file, &node);
                // A backing node opened for this node (inline, or the one its header names)
                // is a part of it as in QEMU, though a reopen leaves backing nodes as they are.
                let below = match backing {
                    BackingSpec::None => None,
                    BackingSpec::Node(c) => Some((child_node(ctx, c).await?, c.is_inline())),
                    BackingSpec::Default => {
                        default_backing(ctx, &node, &file).await?.map(|b| (b, true))
                    }
                };
                if let Some((b, inline)) = below {
                    ctx.transaction(|tx| tx.set_backing(&node, Some(&b)))?;
                    if inline {
                        b.set_inherits_from(&node);
                    }
                }
                Ok(node)
            }
        }
    })
}

/// Opens the backing chain a qcow2 node's header names, read-only, relative names resolved
/// against the image's folder.
async fn default_backing(
    ctx: &ChangeCtx,
    node: &Arc<Node>,
    file: &Arc<Node>,
) -> Result<Option<Arc<Node>>> {
    let h = node
        .driver_as::<qcow2::Qcow2Driver>()
        .map(|d| d.info().header)
        .expect("qcow2");
    let Some(name) = h.backing_file.filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let image_path = file.driver().filename().unwrap_or(".").to_string();
    let path = image::resolve_backing(std::path::Path::new(&image_path), &name)?;
    let format = h
        .backing_format
        .as_deref()
        .map(image::Format::parse)
        .transpose()?;
    let opts = image::ImageOptions {
        format,
        read_only: true,
        ..Default::default()
    };
    let p = path.clone();
    let b = on_io(ctx, move || async move { image::open(&p, &opts).await })
        .await
        .map_err(|e| {
            Error::new(
                e.kind(),
                format!("Could not open backing file '{}'", path.display()),
            )
            .with_source(e)
        })?;
    Ok(Some(b))
}

async fn child_node(ctx: &ChangeCtx, c: &ChildSpec) -> Result<Arc<Node>> {
    match c {
        ChildSpec::Name(n) => lookup(n),
        ChildSpec::Spec(s) => open_spec(ctx, s).await,
    }
}

/// Records `child`, opened for `parent` from `spec`, as a part of `parent` if the spec gave it
/// inline (QEMU's `inherits_from`; a node referenced by name stays on its own).
fn inherit(spec: &ChildSpec, child: &Node, parent: &Arc<Node>) {
    if spec.is_inline() {
        child.set_inherits_from(parent);
    }
}

impl Engine {
    /// Starts IoThreads and the controller.
    pub fn new(opts: EngineOptions) -> Result<Engine> {
        let n = opts.iothreads.max(1);
        let mut iothreads = Vec::with_capacity(n);
        for i in 0..n {
            let o = IoThreadOptions {
                name: Some(format!("iothread{i}")),
                ..opts.iothread_options.clone()
            };
            iothreads.push(IoThread::with_options(o).map_err(|e| {
                let msg = e.to_string();
                Error::new(ErrorKind::Unsupported, msg).with_source(e)
            })?);
        }
        let controller = Controller::start(iothreads[0].handle())?;
        // Nodes opened on these threads close through this engine's controller, even with
        // several engines in one process.
        for t in &iothreads {
            let closer = controller.closer();
            let _ = t
                .handle()
                .block_on(move || async move { graph::set_thread_closer(Some(closer)) });
        }
        Ok(Engine {
            jobs: JobManager::new(controller.handle()),
            controller,
            owned: Arc::new(Mutex::new(BTreeMap::new())),
            iothreads,
            homes: Mutex::new(BTreeMap::new()),
        })
    }

    /// The block jobs.
    pub fn jobs(&self) -> &JobManager {
        &self.jobs
    }

    /// Starts a `block-stream` job (on IoThread 0).
    pub fn stream(&self, args: StreamArgs) -> Result<Arc<Job>> {
        let io = self.job_thread(&args.device);
        crate::job::stream::start(&self.jobs, io, args)
    }

    /// Starts a `block-commit` job (on IoThread 0): intermediate, or active when top is the
    /// device.
    pub fn commit(&self, args: CommitArgs) -> Result<Arc<Job>> {
        let io = self.job_thread(&args.device);
        crate::job::commit::start(&self.jobs, io, args)
    }

    /// The IoThread a job on `device` runs on: the one the node was moved to, else IoThread 0.
    fn job_thread(&self, device: &str) -> IoThreadHandle {
        self.homes
            .lock()
            .get(device)
            .cloned()
            .unwrap_or_else(|| self.iothreads[0].handle())
    }

    /// Starts another IoThread for this engine (QMP's `object-add iothread`): nodes opened on
    /// it close through this engine. The caller owns it, and shuts it down when done.
    pub fn new_iothread(&self, name: &str) -> Result<IoThread> {
        let t = IoThread::with_options(IoThreadOptions {
            name: Some(name.to_string()),
            ..Default::default()
        })
        .map_err(|e| Error::new(ErrorKind::Unsupported, e.to_string()))?;
        let closer = self.controller.closer();
        let _ = t
            .handle()
            .block_on(move || async move { graph::set_thread_closer(Some(closer)) });
        Ok(t)
    }

    /// Moves `node` to IoThread `io` (None: back to the default), as QMP's
    /// `x-blockdev-set-iothread` does. strata's nodes take requests from any IoThread, so
    /// what moves is where jobs started on the node run. A node a user attached to (a guest
    /// backend, an export) is refused unless `force`, with QEMU's text.
    pub fn set_node_iothread(
        &self,
        node: &str,
        io: Option<IoThreadHandle>,
        force: bool,
    ) -> Result<()> {
        let n = lookup(node)?;
        if n.parents().iter().any(|e| e.parent().node().is_some()) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Node {node} is not a root node"),
            ));
        }
        if !force && n.parents().iter().any(|e| e.role() == Role::Root) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "Node {node} is associated with a BlockBackend and could be in use (use \
                     force=true to override this check)"
                ),
            ));
        }
        let mut homes = self.homes.lock();
        match io {
            Some(h) => homes.insert(node.to_string(), h),
            None => homes.remove(node),
        };
        Ok(())
    }

    /// Whether a node was moved to IoThread `index` (it cannot go while one is).
    pub fn iothread_in_use(&self, index: usize) -> bool {
        self.homes.lock().values().any(|h| h.index() == index)
    }

    /// Starts a `blockdev-create` job (on IoThread 0): see [`crate::job::create`].
    pub fn create_image(&self, args: CreateArgs) -> Result<Arc<Job>> {
        crate::job::create::start(&self.jobs, self.iothreads[0].handle(), args)
    }

    /// The controller.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// IoThread `i`.
    pub fn iothread(&self, i: usize) -> Option<IoThreadHandle> {
        self.iothreads.get(i).map(|t| t.handle())
    }

    /// Every IoThread.
    pub fn iothreads(&self) -> Vec<IoThreadHandle> {
        self.iothreads.iter().map(|t| t.handle()).collect()
    }

    /// Opens a node and keeps it (QMP's blockdev-add).
    pub fn add_node(&self, spec: NodeSpec) -> Result<Arc<Node>> {
        let owned = Arc::clone(&self.owned);
        self.controller.change_blocking(move |ctx| async move {
            let node = open_spec(&ctx, &spec).await?;
            owned
                .lock()
                .insert(node.name().to_string(), Arc::clone(&node));
            Ok(node)
        })
    }

    /// Releases a node added with [`Engine::add_node`] (QMP's blockdev-del). Refused while
    /// anything else uses it.
    pub fn del_node(&self, name: &str) -> Result<()> {
        let owned = Arc::clone(&self.owned);
        let name = name.to_string();
        self.controller.change_blocking(move |_ctx| async move {
            let mut map = owned.lock();
            let Some(node) = map.get(&name) else {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("Failed to find node with node-name='{name}'"),
                ));
            };
            let parents = node.parents();
            if parents.iter().any(|e| e.role() == Role::Root) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("Node {name} is in use"),
                ));
            }
            if !parents.is_empty() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("Block device {name} is in use"),
                ));
            }
            map.remove(&name);
            Ok(())
        })
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Result<Arc<Node>> {
        lookup(name)
    }

    /// A backend over the named node, served by `threads` (all IoThreads if empty).
    pub fn backend(
        &self,
        node: &str,
        threads: &[IoThreadHandle],
        opts: BackendOptions,
    ) -> Result<Backend> {
        let root = lookup(node)?;
        let threads = if threads.is_empty() {
            self.iothreads()
        } else {
            threads.to_vec()
        };
        Backend::with_options(root, &threads, opts)
    }

    /// Drains `node` (and everything above it), runs `f` on the drained graph, ends the drain.
    pub fn with_drained<R: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce(&ChangeCtx, &Arc<Node>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let name = node.to_string();
        self.controller.change_blocking(move |ctx| async move {
            let node = lookup(&name)?;
            let drained = ctx.drain(std::slice::from_ref(&node)).await;
            let r = f(&ctx, &node);
            drained.end();
            r
        })
    }

    /// Makes `backing` the backing node of `node` (None: no backing), after draining `node`.
    pub fn set_backing(&self, node: &str, backing: Option<&str>) -> Result<()> {
        let backing = backing.map(str::to_string);
        self.with_drained(node, move |ctx, n| {
            // Looked up now, after the drain, inside the change.
            let b = backing.as_deref().map(lookup).transpose()?;
            ctx.transaction(|tx| tx.set_backing(n, b.as_ref()))
        })
    }

    /// Opens `filter` (a filter spec whose child is `below`) and puts it above `below` under
    /// all of `below`'s parents.
    pub fn insert_filter(&self, below: &str, filter: NodeSpec) -> Result<Arc<Node>> {
        let owned = Arc::clone(&self.owned);
        let name = below.to_string();
        self.controller.change_blocking(move |ctx| async move {
            let below = lookup(&name)?;
            let f = open_spec(&ctx, &filter).await?;
            let drained = ctx.drain(std::slice::from_ref(&below)).await;
            let r = ctx.transaction(|tx| tx.insert_filter(&f, &below));
            drained.end();
            r?;
            if filter.node_name.is_some() {
                owned.lock().insert(f.name().to_string(), Arc::clone(&f));
            }
            Ok(f)
        })
    }

    /// Takes a filter out of the graph: its parents point at its child again.
    pub fn drop_filter(&self, filter: &str) -> Result<()> {
        let owned = Arc::clone(&self.owned);
        let name = filter.to_string();
        self.controller.change_blocking(move |ctx| async move {
            let f = lookup(&name)?;
            let drained = ctx.drain(std::slice::from_ref(&f)).await;
            let r = ctx.transaction(|tx| tx.drop_filter(&f));
            drained.end();
            r?;
            owned.lock().remove(&name);
            Ok(())
        })
    }

    /// Takes a live snapshot (QMP's `blockdev-snapshot`): `overlay`, a qcow2 node added with
    /// no backing node, goes above `node` under all of `node`'s parents atomically, with
    /// `node` as its backing node; `node` is then read-only. See [`crate::snapshot`].
    pub fn snapshot(&self, node: &str, overlay: &str) -> Result<()> {
        let jobs = self.jobs.clone();
        let (node, overlay) = (node.to_string(), overlay.to_string());
        self.controller.change_blocking(move |ctx| async move {
            crate::snapshot::append_overlay(&ctx, &jobs, &node, &overlay).await
        })
    }

    /// Creates a qcow2 image at `path` whose backing file is `node`'s image (its file name
    /// and format, and its size), opens it as a node named `overlay_name`, and takes a live
    /// snapshot onto it (QMP's `blockdev-snapshot-sync`). An existing file at `path` is
    /// refused, not overwritten; if the snapshot fails, the new file is removed.
    pub fn snapshot_file(&self, node: &str, path: &Path, overlay_name: &str) -> Result<Arc<Node>> {
        let jobs = self.jobs.clone();
        let owned = Arc::clone(&self.owned);
        let (node, path, name) = (
            node.to_string(),
            path.to_path_buf(),
            overlay_name.to_string(),
        );
        self.controller.change_blocking(move |ctx| async move {
            if graph::find_node(&name).is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "New overlay node-name already in use",
                ));
            }
            if path.exists() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("Could not create '{}': the file exists", path.display()),
                ));
            }
            let old = lookup(&node)?;
            let backing = crate::job::chain::image_filename(&old).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("Node '{node}' has no file name to use as a backing file"),
                )
            })?;
            let opts = qcow2::create::CreateOptions {
                size: old.len(),
                backing_file: Some(backing),
                backing_format: Some(crate::job::chain::image_format(&old).to_string()),
                ..Default::default()
            };
            let p = path.clone();
            on_io(&ctx, move || async move {
                image::create(&p, image::Format::Qcow2, &opts).await
            })
            .await?;
            let spec = NodeSpec {
                node_name: Some(name.clone()),
                read_only: false,
                driver: DriverSpec::Qcow2 {
                    file: ChildSpec::Spec(Box::new(NodeSpec {
                        node_name: None,
                        read_only: false,
                        driver: DriverSpec::File(FileOptions::new(&path)),
                    })),
                    backing: BackingSpec::None,
                    opts: Qcow2Options::default(),
                },
            };
            let r = async {
                let overlay = open_spec(&ctx, &spec).await?;
                crate::snapshot::append_overlay(&ctx, &jobs, &node, &name).await?;
                Ok(overlay)
            }
            .await;
            match r {
                Ok(overlay) => {
                    owned.lock().insert(name, Arc::clone(&overlay));
                    Ok(overlay)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    Err(e)
                }
            }
        })
    }

    /// Flushes every node the engine owns (QEMU's `bdrv_flush_all`).
    pub fn flush_all(&self) -> Result<()> {
        let nodes: Vec<Arc<Node>> = self.owned.lock().values().cloned().collect();
        let io = self.controller.io_thread().clone();
        io.block_on(move || async move {
            for n in nodes {
                n.flush()
                    .await
                    .map_err(|e| Error::io(format!("Failed to flush node '{}'", n.name()), e))?;
            }
            Ok(())
        })
        .map_err(|e| {
            Error::new(
                ErrorKind::Busy,
                format!("the controller's IoThread stopped: {e}"),
            )
        })?
    }

    /// Reopens a node (and the files under it) read-only or read-write, moving its image
    /// locks without a window. Giving up write access flushes the drained node first.
    pub fn reopen(&self, node: &str, read_only: bool) -> Result<()> {
        let name = node.to_string();
        self.controller.change_blocking(move |ctx| async move {
            let node = lookup(&name)?;
            let drained = ctx.drain(std::slice::from_ref(&node)).await;
            let r = reopen_drained(&ctx, &node, read_only).await;
            drained.end();
            r
        })
    }
}

/// Reopens `node` and the files under it that are a part of it (its `file` children, and a
/// filter's filtered child, that were opened with it, recursively: a qcow2 over blkdebug
/// over a file, all given inline, reopens all three) in `tx`: files first when gaining write
/// access, last when giving it up. As QEMU's reopen queue (`bdrv_reopen_queue_child`) takes
/// only the children that inherit from the node, a child opened on its own and referenced by
/// name ([`Node::inherits_from`] is not `node`) keeps its mode: a file node added with
/// blockdev-add stays read-write under a qcow2 node that a snapshot made read-only.
pub fn reopen_image(tx: &mut Transaction<'_>, node: &Arc<Node>, read_only: bool) -> Result<()> {
    let is_filter = node.is_filter();
    let files: Vec<Arc<Node>> = node
        .children()
        .iter()
        .filter(|e| e.role() == Role::File || (is_filter && e.role() == Role::Filtered))
        .map(|e| e.child())
        .filter(|c| c.inherits_from().is_some_and(|p| Arc::ptr_eq(&p, node)))
        .collect();
    if !read_only {
        for f in &files {
            reopen_image(tx, f, false)?;
        }
    }
    tx.set_read_only(node, read_only)?;
    if read_only {
        for f in &files {
            reopen_image(tx, f, true)?;
        }
    }
    Ok(())
}

/// Reopens a drained `node` (flushing it first when it gives up write access) in a change.
pub async fn reopen_drained(ctx: &ChangeCtx, node: &Arc<Node>, read_only: bool) -> Result<()> {
    if node.is_read_only() == read_only {
        return Ok(());
    }
    if read_only {
        let n = Arc::clone(node);
        on_io(ctx, move || async move {
            n.flush()
                .await
                .map_err(|e| Error::io(format!("Failed to flush node '{}'", n.name()), e))?;
            // A failure here costs only space (a preallocated tail stays): not a reason to
            // keep the node writable.
            let _ = n.prepare_read_only().await;
            Ok(())
        })
        .await?;
    }
    ctx.transaction(|tx| reopen_image(tx, node, read_only))
}

impl Engine {
    /// Cancels every job, flushes every owned node, and lets go of them: when it returns,
    /// every node no one else holds is closed and its image locks are released (a daemon's
    /// orderly shutdown). The engine stays usable.
    pub fn close_all(&self) {
        self.jobs.cancel_all_sync();
        let _ = self.flush_all();
        let owned = std::mem::take(&mut *self.owned.lock());
        drop(owned);
        // A change starts only once every pending close has ended: an empty one is the wait.
        let _ = self
            .controller
            .change_blocking(|_ctx| async move { Ok(()) });
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Let go of the owned nodes while the controller still runs, so their closes run
        // before the IoThreads stop.
        self.close_all();
    }
}
