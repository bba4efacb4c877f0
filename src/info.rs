//! `strata info`: what `qemu-img info` shows of an image, in its human and JSON layouts.
//!
//! ```text
//! strata info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE
//! ```
//!
//! Each image is opened alone and read-only (file node and format node, no backing chain),
//! as qemu-img does; with `--backing-chain` the backing file its header names is opened next
//! (with the format the header records, else probed), down to the base. The JSON field names
//! and values are qemu-img 10's; the key order follows its output too. `-U` (`--force-share`)
//! opens the files without image locks.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use engine::drivers::file::FileDriver;
use engine::drivers::qcow2::{header, Qcow2Driver};
use engine::image::{self, Format};
use engine::Node;
use iothreads::IoThreadOptions;
use serde::Serialize;

use crate::imgcli::{self, size_to_str};

/// The command line of `strata info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Image format: qcow2 or raw [default: probed]
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// human or json [default: human]
    #[arg(long = "output", value_name = "FORMAT")]
    pub output: Option<String>,
    /// Show every image of the backing chain, top first
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// Open without taking image locks (the image may be in use)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image file
    #[arg(value_name = "FILE")]
    pub file: String,
}

/// Runs `strata info`; returns the exit code.
pub fn main(args: InfoArgs) -> i32 {
    match run(&args) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(msg) => {
            eprintln!("strata info: error: {msg}");
            1
        }
    }
}

/// qemu-img's ImageInfo, fields in the order qemu-img 10 prints them.
#[derive(Debug, Serialize)]
pub struct ImageInfo {
    children: Vec<ChildInfo>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    backing_filename_format: Option<String>,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    filename: String,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: String,
    #[serde(rename = "actual-size", skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    #[serde(rename = "format-specific", skip_serializing_if = "Option::is_none")]
    format_specific: Option<FormatSpecific>,
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    #[serde(rename = "dirty-flag")]
    dirty_flag: bool,
}

#[derive(Debug, Serialize)]
struct ChildInfo {
    name: String,
    info: ImageInfo,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
enum FormatSpecific {
    Qcow2(Qcow2Specific),
    File(Empty),
}

#[derive(Debug, Serialize)]
struct Empty {}

/// ImageInfoSpecificQCow2, in qemu-img 10's order; v2 images show only compat,
/// compression-type and refcount-bits, as QEMU does.
#[derive(Debug, Serialize)]
struct Qcow2Specific {
    compat: String,
    #[serde(rename = "compression-type")]
    compression_type: String,
    #[serde(rename = "lazy-refcounts", skip_serializing_if = "Option::is_none")]
    lazy_refcounts: Option<bool>,
    #[serde(rename = "refcount-bits")]
    refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<bool>,
    #[serde(rename = "extended-l2", skip_serializing_if = "Option::is_none")]
    extended_l2: Option<bool>,
}

/// What qemu-img calls the image's protocol child. Its length is rounded up to 512 bytes,
/// as QEMU counts lengths in sectors.
fn file_child(filename: &str, file: &Node) -> ChildInfo {
    let path = file
        .driver_as::<FileDriver>()
        .map(|d| PathBuf::from(d.path()));
    ChildInfo {
        name: "file".into(),
        info: ImageInfo {
            children: Vec::new(),
            backing_filename_format: None,
            virtual_size: file.len().next_multiple_of(512),
            filename: filename.to_string(),
            cluster_size: None,
            format: "file".into(),
            actual_size: path.as_deref().and_then(imgcli::allocated_bytes),
            format_specific: Some(FormatSpecific::File(Empty {})),
            full_backing_filename: None,
            backing_filename: None,
            dirty_flag: false,
        },
    }
}

/// The info of one open image, `filename` as the user (or the chain above it) named it.
fn describe(filename: &str, path: &Path, node: &Arc<Node>) -> ImageInfo {
    let file = node.file();
    let mut info = ImageInfo {
        children: file.iter().map(|f| file_child(filename, f)).collect(),
        backing_filename_format: None,
        virtual_size: node.len(),
        filename: filename.to_string(),
        cluster_size: None,
        format: node.driver_name().to_string(),
        actual_size: imgcli::allocated_bytes(path),
        format_specific: None,
        full_backing_filename: None,
        backing_filename: None,
        dirty_flag: false,
    };
    if let Some(q) = node.driver_as::<Qcow2Driver>() {
        let h = q.info().header;
        let v3 = h.version >= 3;
        info.cluster_size = Some(q.cluster_size());
        info.dirty_flag = h.incompatible & header::INCOMPAT_DIRTY != 0;
        info.format_specific = Some(FormatSpecific::Qcow2(Qcow2Specific {
            compat: if v3 { "1.1" } else { "0.10" }.into(),
            compression_type: match h.compression {
                header::Compression::Zlib => "zlib",
                header::Compression::Zstd => "zstd",
            }
            .into(),
            lazy_refcounts: v3.then_some(h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0),
            refcount_bits: h.refcount_bits(),
            corrupt: v3.then_some(h.incompatible & header::INCOMPAT_CORRUPT != 0),
            extended_l2: v3.then_some(h.extended_l2()),
        }));
        if let Some(b) = h.backing_file.filter(|b| !b.is_empty()) {
            info.full_backing_filename = image::resolve_backing(Path::new(filename), &b)
                .ok()
                .map(|p| p.display().to_string());
            info.backing_filename = Some(b);
            info.backing_filename_format = h.backing_format;
        }
    }
    info
}

fn run(args: &InfoArgs) -> Result<String, String> {
    let format = match args.format.as_deref() {
        Some(f) => Some(Format::parse(f).map_err(|_| format!("Unknown file format '{f}'"))?),
        None => None,
    };
    let json = match args.output.as_deref() {
        None | Some("human") => false,
        Some("json") => true,
        Some(o) => return Err(format!("--output must be human or json, not '{o}'")),
    };
    let (top, chain, force_share) = (args.file.clone(), args.backing_chain, args.force_share);
    let infos = iothreads::block_on_current(IoThreadOptions::default(), async move {
        let mut infos = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        let (mut name, mut fmt) = (top, format);
        loop {
            let path = PathBuf::from(&name);
            let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if seen.contains(&canon) {
                return Err(format!("Backing file '{name}' creates an infinite loop"));
            }
            if seen.len() >= image::MAX_CHAIN {
                return Err("Backing chain is too deep".into());
            }
            seen.push(canon);
            let node = imgcli::open_one(&path, fmt, force_share)
                .await
                .map_err(|e| e.full_message())?;
            let info = describe(&name, &path, &node);
            drop(node);
            let next = match (&info.backing_filename, &info.full_backing_filename) {
                (Some(b), None) if chain => {
                    return Err(format!(
                        "Could not open backing file '{b}' of '{name}': strata cannot resolve that name"
                    ))
                }
                (_, Some(full)) if chain => Some(full.clone()),
                _ => None,
            };
            let Some(next) = next else {
                infos.push(info);
                return Ok(infos);
            };
            fmt = match info.backing_filename_format.as_deref() {
                Some(f) => Some(Format::parse(f).map_err(|e| {
                    format!("Could not open backing file '{next}': {}", e.full_message())
                })?),
                None => None,
            };
            name = next;
            infos.push(info);
        }
    })
    .map_err(|e| e.to_string())??;
    if json {
        // Serialized from the structs, so the keys keep their order.
        return Ok(if chain {
            to_json_text(&infos)
        } else {
            to_json_text(&infos[0])
        });
    }
    let mut s = String::new();
    for (i, info) in infos.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        human(&mut s, info);
    }
    Ok(s)
}

/// JSON as qemu-img prints it: four-space indents, and empty arrays and objects opened and
/// closed on two lines.
fn to_json_text<T: Serialize>(v: &T) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuJson { level: 0 });
    if v.serialize(&mut ser).is_err() {
        return "{}\n".into();
    }
    let mut s = String::from_utf8(out).unwrap_or_default();
    s.push('\n');
    s
}

struct QemuJson {
    level: usize,
}

impl QemuJson {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b"\n")?;
        for _ in 0..self.level {
            w.write_all(b"    ")?;
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for QemuJson {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level += 1;
        w.write_all(b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level -= 1;
        self.newline(w)?;
        w.write_all(b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        Ok(())
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level += 1;
        w.write_all(b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level -= 1;
        self.newline(w)?;
        w.write_all(b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        Ok(())
    }
}

/// qemu-img's human layout (`bdrv_image_info_dump`).
fn human(s: &mut String, info: &ImageInfo) {
    let _ = writeln!(s, "image: {}", info.filename);
    let _ = writeln!(s, "file format: {}", info.format);
    let _ = writeln!(
        s,
        "virtual size: {} ({} bytes)",
        size_to_str(info.virtual_size),
        info.virtual_size
    );
    let disk = info
        .actual_size
        .map_or_else(|| "unavailable".to_string(), size_to_str);
    let _ = writeln!(s, "disk size: {disk}");
    if let Some(cs) = info.cluster_size {
        let _ = writeln!(s, "cluster_size: {cs}");
    }
    if info.dirty_flag {
        let _ = writeln!(s, "cleanly shut down: no");
    }
    if let Some(b) = &info.backing_filename {
        let _ = write!(s, "backing file: {b}");
        match &info.full_backing_filename {
            None => {
                let _ = write!(s, " (cannot determine actual path)");
            }
            Some(full) if full != b => {
                let _ = write!(s, " (actual path: {full})");
            }
            Some(_) => {}
        }
        s.push('\n');
    }
    if let Some(f) = &info.backing_filename_format {
        let _ = writeln!(s, "backing file format: {f}");
    }
    if let Some(FormatSpecific::Qcow2(q)) = &info.format_specific {
        let _ = writeln!(s, "Format specific information:");
        let _ = writeln!(s, "    compat: {}", q.compat);
        let _ = writeln!(s, "    compression type: {}", q.compression_type);
        if let Some(v) = q.lazy_refcounts {
            let _ = writeln!(s, "    lazy refcounts: {v}");
        }
        let _ = writeln!(s, "    refcount bits: {}", q.refcount_bits);
        if let Some(v) = q.corrupt {
            let _ = writeln!(s, "    corrupt: {v}");
        }
        if let Some(v) = q.extended_l2 {
            let _ = writeln!(s, "    extended l2: {v}");
        }
    }
    for c in &info.children {
        let _ = writeln!(s, "Child node '/{}':", c.name);
        let _ = writeln!(s, "    filename: {}", c.info.filename);
        let _ = writeln!(s, "    protocol type: {}", c.info.format);
        let _ = writeln!(
            s,
            "    file length: {} ({} bytes)",
            size_to_str(c.info.virtual_size),
            c.info.virtual_size
        );
        let disk = c
            .info
            .actual_size
            .map_or_else(|| "unavailable".to_string(), size_to_str);
        let _ = writeln!(s, "    disk size: {disk}");
    }
}
