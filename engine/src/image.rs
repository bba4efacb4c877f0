//! Opening image files as node chains: a file node, the format node over it (probed or
//! given), and the backing chain its header names, resolved as QEMU resolves it.
//!
//! Everything here runs on an IoThread (formats read their headers through the graph).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use graph::{Error, ErrorKind, Node};
use iothreads::IoBuf;

use crate::drivers::file::{self, Aio, FileDriver, FileOptions};
use crate::drivers::qcow2::{self, Qcow2Options};
use crate::drivers::raw::{self, RawOptions};

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// No metadata.
    Raw,
    /// qcow2.
    Qcow2,
}

impl Format {
    /// The name QEMU uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a format name (`raw`, `qcow2`).
    pub fn parse(s: &str) -> Result<Format, Error> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!("Unknown driver '{s}'"),
            )),
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// The format (None: probe the file's first bytes).
    pub format: Option<Format>,
    /// Open the top image read-only (backing images are always read-only).
    pub read_only: bool,
    /// `cache.direct` for every file of the chain.
    pub direct: bool,
    /// I/O mode of every file of the chain.
    pub aio: Aio,
    /// Open the backing chain the header names (false: the top image alone).
    pub backing: bool,
    /// qcow2 options of the top image.
    pub qcow2: Qcow2Options,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            format: None,
            read_only: false,
            direct: false,
            aio: Aio::Auto,
            backing: true,
            qcow2: Qcow2Options::default(),
        }
    }
}

/// How deep a backing chain may go.
pub const MAX_CHAIN: usize = 64;

/// Guesses the format from the first bytes: the qcow2 magic, or raw.
pub async fn probe(file: &Node) -> Result<Format, Error> {
    if file.len() < 4 {
        return Ok(Format::Raw);
    }
    let (r, b) = file
        .read(0, IoBuf::new(512.min(file.len() as usize).max(4)))
        .await;
    r.map_err(|e| Error::io("Could not read the image to probe its format", e))?;
    if u32::from_be_bytes(b[0..4].try_into().expect("4")) == qcow2::header::MAGIC {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Raw)
    }
}

/// Resolves a backing file name from an image's header: absolute names as they are,
/// relative ones against the directory of the image that names them; `json:` names are
/// refused.
pub fn resolve_backing(image: &Path, name: &str) -> Result<PathBuf, Error> {
    if name.starts_with("json:") {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("Backing file name '{name}' is a json: pseudo-protocol name, which strata does not open"),
        ));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(image.parent().unwrap_or(Path::new(".")).join(p))
}

/// Opens `path` as an image chain and returns the top format node.
pub async fn open(path: &Path, opts: &ImageOptions) -> Result<Arc<Node>, Error> {
    open_at(path, opts, 0, &mut Vec::new()).await
}

fn open_at<'a>(
    path: &'a Path,
    opts: &'a ImageOptions,
    depth: usize,
    seen: &'a mut Vec<PathBuf>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Arc<Node>, Error>> + 'a>> {
    Box::pin(async move {
        if depth >= MAX_CHAIN {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Backing chain is too deep",
            ));
        }
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if seen.contains(&canon) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Backing chain of '{}' contains a loop", path.display()),
            ));
        }
        seen.push(canon);
        let read_only = opts.read_only || depth > 0;
        let fo = FileOptions {
            read_only,
            direct: opts.direct,
            aio: opts.aio,
            ..FileOptions::new(path)
        };
        let fd = FileDriver::open(&fo)?;
        let ro = fd.is_read_only();
        let file = Node::new(None, Box::new(fd), ro)?;
        let format = match (depth, opts.format) {
            (0, Some(f)) => f,
            _ => probe(&file).await?,
        };
        let node = match format {
            Format::Raw => raw::open(None, &file, RawOptions::default(), read_only)?,
            Format::Qcow2 => {
                let q = Qcow2Options {
                    read_only,
                    ..opts.qcow2.clone()
                };
                qcow2::open(None, &file, &q).await?
            }
        };
        // The file is a part of the image (a reopen of the image takes it along).
        file.set_inherits_from(&node);
        if format == Format::Qcow2 && opts.backing {
            let h = node
                .driver_as::<qcow2::Qcow2Driver>()
                .map(|d| d.info().header)
                .expect("a qcow2 node");
            if let Some(name) = h.backing_file.as_deref().filter(|n| !n.is_empty()) {
                let bpath = resolve_backing(path, name)?;
                let bformat = match h.backing_format.as_deref() {
                    Some(f) => Some(Format::parse(f)?),
                    None => None,
                };
                let bopts = ImageOptions {
                    format: bformat,
                    read_only: true,
                    ..opts.clone()
                };
                let backing = if let Some(f) = bformat {
                    let o = ImageOptions {
                        format: Some(f),
                        ..bopts
                    };
                    open_at(&bpath, &o, depth + 1, seen).await
                } else {
                    open_at(&bpath, &bopts, depth + 1, seen).await
                }
                .map_err(|e| {
                    let msg = format!("Could not open backing file '{}'", bpath.display());
                    Error::new(e.kind(), msg).with_source(e)
                })?;
                let m = graph::mutation();
                let mut tx = graph::Transaction::new(&m);
                tx.set_backing(&node, Some(&backing))?;
                tx.commit()?;
                backing.set_inherits_from(&node);
            }
        }
        Ok(node)
    })
}

/// Creates an image file of `format` at `path`: a qcow2 with `opts`, or a raw file of
/// `opts.size` bytes. Runs on an IoThread. Refuses a file that another process has locked.
pub async fn create(
    path: &Path,
    format: Format,
    opts: &qcow2::create::CreateOptions,
) -> Result<(), Error> {
    match format {
        Format::Raw => {
            if opts.backing_file.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "raw images have no backing file",
                ));
            }
            file::create_file(path, opts.size)
        }
        Format::Qcow2 => {
            opts.validate()?;
            file::create_file(path, 0)?;
            let fd = FileDriver::open(&FileOptions::new(path))?;
            let file = Node::new(None, Box::new(fd), false)?;
            // Take the image locks for the time of the creation, as a writer would.
            let user: Arc<dyn graph::User> = Arc::new(Creator);
            let edge = {
                let m = graph::mutation();
                let mut tx = graph::Transaction::new(&m);
                let e = tx.attach_user(
                    &user,
                    &file,
                    graph::Perm::CONSISTENT_READ | graph::Perm::WRITE | graph::Perm::RESIZE,
                    graph::Perm::CONSISTENT_READ,
                )?;
                tx.commit()?;
                e
            };
            let r = qcow2::create::create(&file, opts).await;
            drop(edge);
            // Closed before returning: whoever opens the new image next must find it unlocked.
            let closed = file.close_if_last().await;
            r.and(closed.map_err(|e| Error::io("closing the new image", e)))
        }
    }
}

struct Creator;

impl graph::User for Creator {
    fn describe(&self) -> String {
        "image creation".to_string()
    }
}
