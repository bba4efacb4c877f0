//! What the offline image tools (`strata create`, `strata info`) share: qemu-img's size
//! syntax, its `-o` option lists, qemu's human-readable sizes, and opening one image (file
//! and format node, without its backing chain) on the calling IoThread.

use std::path::Path;
use std::sync::Arc;

use engine::drivers::file::{FileDriver, FileOptions, Locking};
use engine::drivers::qcow2::{self, Qcow2Options};
use engine::drivers::raw::{self, RawOptions};
use engine::image::{self, Format};
use engine::{Error, Node};

/// Why a size did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional suffix.
    Malformed,
    /// Above `i64::MAX`, QEMU's limit.
    TooLarge,
}

/// Parses a size as qemu-img does (`qemu_strtosz`): a decimal number (or `0x` hex) with an
/// optional suffix `b`, `k`, `M`, `G`, `T`, `P`, `E` (any case, powers of 1024; none means
/// bytes). A fraction needs a suffix (`1.5M`); fractions of a byte are dropped.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start();
    let (digits, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (t, 10),
    };
    let int_len = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if int_len == 0 {
        return Err(SizeError::Malformed);
    }
    let int = u128::from_str_radix(&digits[..int_len], radix).map_err(|_| SizeError::TooLarge)?;
    let mut rest = &digits[int_len..];
    let mut frac: Option<(u128, u32)> = None;
    if radix == 10 {
        if let Some(f) = rest.strip_prefix('.') {
            let n = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
            if n == 0 {
                return Err(SizeError::Malformed);
            }
            // Digits past the 18th cannot change a byte count below 2^63.
            let kept = &f[..n.min(18)];
            let v: u128 = kept.parse().map_err(|_| SizeError::Malformed)?;
            frac = Some((v, kept.len() as u32));
            rest = &f[n..];
        }
    }
    let shift = match rest {
        "" => 0,
        _ if rest.len() == 1 => match rest.as_bytes()[0].to_ascii_lowercase() {
            b'b' => 0,
            b'k' => 10,
            b'm' => 20,
            b'g' => 30,
            b't' => 40,
            b'p' => 50,
            b'e' => 60,
            _ => return Err(SizeError::Malformed),
        },
        _ => return Err(SizeError::Malformed),
    };
    if frac.is_some() && shift == 0 {
        return Err(SizeError::Malformed);
    }
    let mult = 1u128 << shift;
    let mut v = int.checked_mul(mult).ok_or(SizeError::TooLarge)?;
    if let Some((f, d)) = frac {
        v += f * mult / 10u128.pow(d);
    }
    if v > i64::MAX as u128 {
        return Err(SizeError::TooLarge);
    }
    Ok(v as u64)
}

/// Splits a qemu option list (`a=1,b=x,,y,c`) into (name, value) pairs: `,,` is a literal
/// comma inside a value; a name without `=` has no value.
pub fn parse_opt_list(s: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut name = String::new();
        let mut value = None;
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            name.push(c);
            chars.next();
        }
        if chars.peek() == Some(&'=') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                if c == ',' {
                    if chars.peek() == Some(&',') {
                        chars.next();
                        v.push(',');
                        continue;
                    }
                    break;
                }
                v.push(c);
            }
            value = Some(v);
        } else {
            // A ',' (or the end) right after the name.
            chars.next();
        }
        if !name.is_empty() {
            out.push((name, value));
        }
        if chars.peek().is_none() {
            return out;
        }
    }
}

/// A size as qemu prints it (`size_to_str`): three significant digits and a binary unit,
/// switching to the next unit from 1000 up ("196 KiB", "1 GiB", "0.977 KiB").
pub fn size_to_str(v: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = v as f64 / (1000.0 / 1024.0);
    // frexp's exponent: the e with scaled = m * 2^e, 0.5 <= m < 1 (0 for 0).
    let e = if scaled < 1.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = ((e - 1).max(0) / 10).min(6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(v as f64 / div), UNITS[i])
}

/// C's `%0.3g` for values below 1000: three significant digits, trailing zeros dropped.
fn fmt_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let digits_before = if x >= 1.0 {
        x.log10().floor() as i32 + 1
    } else {
        -((-x.log10()).ceil() as i32) + 1
    };
    let decimals = (3 - digits_before).max(0) as usize;
    let s = format!("{x:.decimals$}");
    // Rounding may carry into a new digit (999.5 -> "1000"); keep three significant digits.
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    s
}

/// Opens the image at `path` alone (no backing chain), read-only, on the calling IoThread:
/// a file node and the format node over it (`format`, or probed). With `force_share` the file
/// takes no image locks (qemu-img's `-U`).
pub async fn open_one(
    path: &Path,
    format: Option<Format>,
    force_share: bool,
) -> Result<Arc<Node>, Error> {
    let fo = FileOptions {
        read_only: true,
        locking: if force_share {
            Locking::Off
        } else {
            Locking::Auto
        },
        ..FileOptions::new(path)
    };
    let file = Node::new(None, Box::new(FileDriver::open(&fo)?), true)?;
    let format = match format {
        Some(f) => f,
        None => image::probe(&file).await?,
    };
    let node = match format {
        Format::Raw => raw::open(None, &file, RawOptions::default(), true)?,
        Format::Qcow2 => {
            let q = Qcow2Options {
                read_only: true,
                ..Qcow2Options::default()
            };
            qcow2::open(None, &file, &q).await?
        }
    };
    // The file is a part of the image, as engine::image::open records it.
    file.set_inherits_from(&node);
    Ok(node)
}

/// Bytes the file at `path` occupies on disk (`st_blocks * 512`), as qemu's `actual-size`.
pub fn allocated_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_img_reads_them() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1.5M"), Ok(1_572_864));
        assert_eq!(parse_size("1.3k"), Ok(1331));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size(" 5"), Ok(5));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "1.5", "1e3", "1kb", "1KiB", "1Q", "-5", "k", "1.k"] {
            assert_eq!(parse_size(bad), Err(SizeError::Malformed), "{bad:?}");
        }
        assert_eq!(parse_size("8E"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("16E"), Err(SizeError::TooLarge));
        assert_eq!(
            parse_size("99999999999999999999999999999999999999999"),
            Err(SizeError::TooLarge)
        );
    }

    #[test]
    fn option_lists_as_qemu_splits_them() {
        let v = parse_opt_list("cluster_size=64k,lazy_refcounts,backing_file=a,,b,,c,x=");
        let want: Vec<(String, Option<String>)> = vec![
            ("cluster_size".into(), Some("64k".into())),
            ("lazy_refcounts".into(), None),
            ("backing_file".into(), Some("a,b,c".into())),
            ("x".into(), Some(String::new())),
        ];
        assert_eq!(v, want);
        assert!(parse_opt_list("").is_empty());
        assert_eq!(parse_opt_list("a=1,").len(), 1);
    }

    #[test]
    fn sizes_as_qemu_prints_them() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(200_704), "196 KiB");
        assert_eq!(size_to_str(197_120), "192 KiB");
        assert_eq!(size_to_str(1 << 20), "1 MiB");
        assert_eq!(size_to_str(1_572_864), "1.5 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(1_048_064), "1 MiB");
        assert_eq!(size_to_str(1_046_000), "0.998 MiB");
    }
}
