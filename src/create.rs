//! `strata create`: makes a new image, as `qemu-img create` does.
//!
//! ```text
//! strata create [-f qcow2|raw] [-b BACKING [-F FMT]] [-u] [-o OPTIONS] [-q] FILE [SIZE]
//! ```
//!
//! OPTIONS is qemu's comma list (`,,` for a comma inside a value). qcow2 takes `size`,
//! `compat` (0.10, v2, 1.1, v3), `backing_file`, `backing_fmt`, `cluster_size`,
//! `preallocation` (off, metadata, falloc, full), `lazy_refcounts`, `refcount_bits`,
//! `extended_l2` (off) and `compression_type` (zlib); raw takes `size` and `preallocation`
//! (off, falloc, full). The checks of the values are the engine's
//! ([`CreateOptions::validate`]); the image is written by [`engine::image::create`].
//!
//! With a backing file, the backing image is opened read-only, without locks (as qemu-img
//! does, so a running VM's image can be named), to learn its virtual size when SIZE is
//! missing and its format when `-F` is; `-u` skips that. A relative backing name is resolved
//! against the new image's folder and written into the header as given.
//!
//! On an error nothing is left behind where no file was before.

use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use clap::Args;
use engine::drivers::qcow2::create::{CreateOptions, Preallocation};
use engine::image::{self, Format};
use iothreads::IoThreadOptions;

use crate::imgcli::{self, SizeError};

/// The command line of `strata create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format: qcow2 or raw [default: raw]
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Backing file (qcow2), relative names resolve against FILE's folder
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the backing file [default: probed, and recorded in the header]
    #[arg(short = 'F', long = "backing-format", value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Do not open the backing file (SIZE is then required)
    #[arg(short = 'u', long = "unsafe")]
    pub unsafe_backing: bool,
    /// Format options, a comma list as qemu-img takes it (`-o help` lists them)
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Do not print the "Formatting ..." line
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The image file to create (an existing file is overwritten)
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    /// Virtual size in bytes; k, M, G, T, P, E suffixes (powers of 1024)
    #[arg(value_name = "SIZE", allow_hyphen_values = true)]
    pub size: Option<String>,
}

/// Runs `strata create`; returns the exit code.
pub fn main(args: CreateArgs) -> i32 {
    match run(&args) {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("strata create: error: {msg}");
            1
        }
    }
}

const QCOW2_OPTS: &[(&str, &str)] = &[
    ("size", "<size>            - Virtual disk size"),
    (
        "compat",
        "<str>           - Compatibility level (v2 [0.10], v3 [1.1])",
    ),
    ("backing_file", "<str>     - File name of a base image"),
    ("backing_fmt", "<str>      - Image format of the base image"),
    ("cluster_size", "<size>    - qcow2 cluster size"),
    (
        "preallocation",
        "<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    (
        "lazy_refcounts",
        "<bool (on/off)> - Postpone refcount updates",
    ),
    (
        "refcount_bits",
        "<num>    - Width of a reference count entry in bits",
    ),
    (
        "extended_l2",
        "<bool (on/off)> - Extended L2 tables (only off is supported)",
    ),
    (
        "compression_type",
        "<str> - Compression method used for image cluster compression (only zlib)",
    ),
];

const RAW_OPTS: &[(&str, &str)] = &[
    ("size", "<size>            - Virtual disk size"),
    (
        "preallocation",
        "<str>    - Preallocation mode (allowed values: off, falloc, full)",
    ),
];

/// Options qemu knows for qcow2 that strata does not implement.
const QCOW2_UNSUPPORTED: &[&str] = &["data_file", "data_file_raw", "encryption", "encrypt"];

/// The options as given, kept as strings where qemu-img prints them as given.
#[derive(Default)]
struct Given {
    size: Option<u64>,
    compat: Option<String>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    cluster_size: Option<u64>,
    preallocation: Option<String>,
    lazy_refcounts: Option<String>,
    refcount_bits: Option<u64>,
    extended_l2: Option<String>,
    compression_type: Option<String>,
}

fn size_error(s: &str, e: SizeError) -> String {
    match e {
        SizeError::Malformed => format!(
            "Invalid image size specified: '{s}' (use a number of bytes, with an optional k, M, G, T, P or E suffix)"
        ),
        SizeError::TooLarge => format!(
            "Invalid image size specified: '{s}': it must be between 0 and {}",
            i64::MAX
        ),
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

fn parse_options(format: Format, lists: &[String]) -> Result<Given, String> {
    let known: &[(&str, &str)] = match format {
        Format::Qcow2 => QCOW2_OPTS,
        Format::Raw => RAW_OPTS,
    };
    let mut g = Given::default();
    for list in lists {
        for (name, value) in imgcli::parse_opt_list(list) {
            if !known.iter().any(|(k, _)| *k == name) {
                let base = name.split('.').next().unwrap_or(&name);
                if format == Format::Qcow2 && QCOW2_UNSUPPORTED.contains(&base) {
                    return Err(format!("Parameter '{name}' is not supported by strata"));
                }
                return Err(format!("Invalid parameter '{name}'"));
            }
            // A bare name is a boolean switched on, as in qemu's option lists.
            let v = value.unwrap_or_else(|| "on".to_string());
            let size_opt = |v: &str| {
                imgcli::parse_size(v).map_err(|_| {
                    format!(
                        "Parameter '{name}' expects a non-negative number below 2^63 \
                         (optional suffix k, M, G, T, P or E)"
                    )
                })
            };
            match name.as_str() {
                "size" => g.size = Some(size_opt(&v)?),
                "cluster_size" => g.cluster_size = Some(size_opt(&v)?),
                "refcount_bits" => {
                    g.refcount_bits = Some(
                        v.parse()
                            .map_err(|_| format!("Parameter '{name}' expects a number"))?,
                    )
                }
                "compat" => g.compat = Some(v),
                "backing_file" => g.backing_file = Some(v),
                "backing_fmt" => g.backing_fmt = Some(v),
                "preallocation" => g.preallocation = Some(v),
                "lazy_refcounts" => g.lazy_refcounts = Some(v),
                "extended_l2" => g.extended_l2 = Some(v),
                "compression_type" => g.compression_type = Some(v),
                _ => unreachable!("listed above"),
            }
        }
    }
    Ok(g)
}

fn print_help(format: Format) {
    let list = match format {
        Format::Qcow2 => QCOW2_OPTS,
        Format::Raw => RAW_OPTS,
    };
    println!("Supported options:");
    for (k, d) in list {
        println!("  {k}={d}");
    }
}

fn preallocation(format: Format, v: Option<&str>) -> Result<Preallocation, String> {
    Ok(match v {
        None | Some("off") => Preallocation::Off,
        Some("metadata") if format == Format::Qcow2 => Preallocation::Metadata,
        Some("metadata") => return Err("Unsupported preallocation mode: metadata".into()),
        // falloc allocates the data clusters without writing them; full writes zeroes into
        // them. A reader sees the same image, so qcow2 falloc is made as full.
        Some("falloc") | Some("full") => Preallocation::Full,
        Some(o) => {
            return Err(format!(
                "Parameter 'preallocation' does not accept value '{o}'"
            ))
        }
    })
}

fn run(args: &CreateArgs) -> Result<(), String> {
    let fmt_name = args.format.as_deref().unwrap_or("raw");
    let format = Format::parse(fmt_name).map_err(|_| {
        format!("Unknown file format '{fmt_name}' (strata creates qcow2 and raw images)")
    })?;
    if args
        .options
        .iter()
        .any(|l| imgcli::parse_opt_list(l).iter().any(|(k, _)| k == "help"))
    {
        print_help(format);
        return Ok(());
    }
    let Some(file) = &args.file else {
        return Err("Expecting image file name (see 'strata create --help')".into());
    };
    let fail = |m: String| format!("{file}: {m}");
    let size_arg = match &args.size {
        Some(s) => Some(imgcli::parse_size(s).map_err(|e| size_error(s, e))?),
        None => None,
    };
    let mut g = parse_options(format, &args.options).map_err(fail)?;
    if size_arg.is_some() && g.size.is_some() {
        return Err(fail("The image size must be specified only once".into()));
    }
    if let Some(s) = size_arg {
        g.size = Some(s);
    }
    if let Some(b) = &args.backing {
        g.backing_file = Some(b.clone());
    }
    if let Some(f) = &args.backing_format {
        g.backing_fmt = Some(f.clone());
    }
    if format == Format::Raw && (g.backing_file.is_some() || g.backing_fmt.is_some()) {
        return Err(fail(
            "Backing file not supported for file format 'raw'".into(),
        ));
    }
    if g.backing_file.is_none() && g.backing_fmt.is_some() {
        return Err(fail(
            "Backing format cannot be used without backing file".into(),
        ));
    }
    let prealloc = preallocation(format, g.preallocation.as_deref()).map_err(fail)?;
    let version = match g.compat.as_deref() {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(o) => {
            return Err(fail(format!(
                "Parameter 'compat' does not accept value '{o}' (valid: 0.10, v2, 1.1, v3)"
            )))
        }
    };
    let lazy_refcounts = match g.lazy_refcounts.as_deref() {
        Some(v) => parse_bool("lazy_refcounts", v).map_err(fail)?,
        None => false,
    };
    if let Some(v) = g.extended_l2.as_deref() {
        if parse_bool("extended_l2", v).map_err(fail)? {
            return Err(fail(
                "extended_l2=on: strata does not create images with extended L2 entries".into(),
            ));
        }
    }
    match g.compression_type.as_deref() {
        None | Some("zlib") => {}
        Some("zstd") => {
            return Err(fail(
                "compression_type=zstd: strata creates zlib images only".into(),
            ))
        }
        Some(o) => {
            return Err(fail(format!(
                "Parameter 'compression_type' does not accept value '{o}'"
            )))
        }
    }
    let backing_fmt = match g.backing_fmt.as_deref() {
        Some(f) => {
            Some(Format::parse(f).map_err(|_| fail(format!("Unknown backing file format '{f}'")))?)
        }
        None => None,
    };

    let path = PathBuf::from(file);
    let existed = std::fs::symlink_metadata(&path).is_ok();
    let mut opts = CreateOptions {
        size: g.size.unwrap_or(0),
        cluster_size: g.cluster_size.unwrap_or(65536),
        refcount_bits: g
            .refcount_bits
            .map_or(16, |b| u32::try_from(b).unwrap_or(u32::MAX)),
        version,
        backing_file: g.backing_file.clone(),
        backing_format: g.backing_fmt.clone(),
        preallocation: prealloc,
        lazy_refcounts,
    };
    let size_known = g.size.is_some();
    let open_backing = g.backing_file.is_some() && !args.unsafe_backing;
    if !size_known && !open_backing {
        return Err(fail("Image creation needs a size parameter".into()));
    }
    let job_opts = opts.clone();
    let job_path = path.clone();
    let result = iothreads::block_on_current(IoThreadOptions::default(), async move {
        let mut opts = job_opts;
        if open_backing {
            let name = opts.backing_file.clone().expect("a backing file");
            let bpath = image::resolve_backing(&job_path, &name).map_err(|e| e.full_message())?;
            // As qemu-img: the backing image alone, read-only, sharing everything.
            let node = imgcli::open_one(&bpath, backing_fmt, true)
                .await
                .map_err(|e| format!("{}; Could not open backing image", e.full_message()))?;
            if !size_known {
                opts.size = node.len();
            }
            if opts.backing_format.is_none() {
                opts.backing_format = Some(node.driver_name().to_string());
            }
        }
        Ok::<_, String>(opts)
    })
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .map_err(fail)?;
    opts = result;
    if let Some(f) = &opts.backing_format {
        g.backing_fmt = Some(f.clone());
    }
    g.size = Some(opts.size);
    if format == Format::Qcow2 {
        opts.validate().map_err(|e| fail(e.full_message()))?;
    }
    if !args.quiet {
        println!("{}", formatting_line(file, format, &g, &opts));
    }

    let r = write_image(&path, format, &opts);
    if r.is_err() && !existed {
        let _ = std::fs::remove_file(&path);
    }
    r.map_err(fail)
}

/// qemu-img's "Formatting ..." line: the options in qemu's order, defaults included, values
/// as given where qemu prints them as given.
fn formatting_line(file: &str, format: Format, g: &Given, o: &CreateOptions) -> String {
    let mut s = format!("Formatting '{file}', fmt={}", format.name());
    match format {
        Format::Raw => {
            let _ = write!(s, " size={}", o.size);
            if let Some(p) = &g.preallocation {
                let _ = write!(s, " preallocation={p}");
            }
        }
        Format::Qcow2 => {
            let _ = write!(
                s,
                " cluster_size={} extended_l2={}",
                o.cluster_size,
                g.extended_l2.as_deref().unwrap_or("off")
            );
            if let Some(p) = &g.preallocation {
                let _ = write!(s, " preallocation={p}");
            }
            let _ = write!(
                s,
                " compression_type={} size={}",
                g.compression_type.as_deref().unwrap_or("zlib"),
                o.size
            );
            if let Some(c) = &g.compat {
                let _ = write!(s, " compat={c}");
            }
            if let Some(b) = &o.backing_file {
                let _ = write!(s, " backing_file={b}");
            }
            if let Some(b) = &g.backing_fmt {
                let _ = write!(s, " backing_fmt={b}");
            }
            let _ = write!(
                s,
                " lazy_refcounts={} refcount_bits={}",
                g.lazy_refcounts.as_deref().unwrap_or("off"),
                g.refcount_bits.unwrap_or(16)
            );
        }
    }
    s
}

/// Writes the image on an IoThread of its own (the calling thread, for the time it takes).
fn write_image(path: &Path, format: Format, opts: &CreateOptions) -> Result<(), String> {
    let (p, o) = (path.to_path_buf(), opts.clone());
    iothreads::block_on_current(IoThreadOptions::default(), async move {
        image::create(&p, format, &o)
            .await
            .map_err(|e| e.full_message())
    })
    .map_err(|e| e.to_string())??;
    if format == Format::Raw && opts.preallocation == Preallocation::Full && opts.size > 0 {
        preallocate_raw(path, opts.size)?;
    }
    Ok(())
}

/// Allocates every block of a new raw file (it reads as zeroes, as it did).
fn preallocate_raw(path: &Path, size: u64) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("Could not open '{}': {e}", path.display()))?;
    // SAFETY: fallocate takes only integers; the descriptor is open for writing.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    // No fallocate on this file system: write the zeroes.
    use std::os::unix::fs::FileExt;
    let chunk = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off)
            .map_err(|e| format!("Could not preallocate '{}': {e}", path.display()))?;
        off += n as u64;
    }
    Ok(())
}
