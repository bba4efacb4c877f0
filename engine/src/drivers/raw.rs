//! `raw`: a format with no metadata over a protocol child, optionally a window of it
//! (`offset`, `size`), as QEMU's raw format has.

use std::io;
use std::sync::Arc;

use graph::{
    BlockStatus, Driver, Error, ErrorKind, LocalBoxFuture, Node, Role, WriteFlags, ZeroFlags,
};
use iothreads::{BufResult, IoBuf};

/// Options of a raw node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawOptions {
    /// Where the image starts in the file.
    pub offset: u64,
    /// Its length (None: to the end of the file).
    pub size: Option<u64>,
}

/// The raw driver.
#[derive(Debug)]
pub struct RawDriver {
    opts: RawOptions,
}

fn no_file() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "raw node has no file child")
}

/// Opens a raw node named `name` (None: automatic) over `file`.
pub fn open(
    name: Option<&str>,
    file: &Arc<Node>,
    opts: RawOptions,
    read_only: bool,
) -> Result<Arc<Node>, Error> {
    let flen = file.len();
    if opts.offset > flen {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("The sum of offset ({}) and size (0) has to be smaller or equal to the actual size of the containing file ({flen})", opts.offset),
        ));
    }
    if let Some(size) = opts.size {
        if opts.offset.checked_add(size).is_none_or(|e| e > flen) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "The sum of offset ({}) and size ({size}) has to be smaller or equal to the actual size of the containing file ({flen})",
                    opts.offset
                ),
            ));
        }
    }
    let node = Node::new(
        name,
        Box::new(RawDriver { opts }),
        read_only || file.is_read_only(),
    )?;
    let m = graph::mutation();
    let mut tx = graph::Transaction::new(&m);
    tx.attach_child(&node, file, Role::File)?;
    tx.commit()?;
    Ok(node)
}

impl Driver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn length(&self, node: &Node) -> u64 {
        match self.opts.size {
            Some(s) => s,
            None => node
                .file()
                .map_or(0, |f| f.len().saturating_sub(self.opts.offset)),
        }
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            match node.file() {
                Some(f) => f.read(self.opts.offset + offset, buf).await,
                None => (Err(no_file()), buf),
            }
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move {
            if let Some(size) = self.opts.size {
                if offset + buf.len() as u64 > size {
                    return (Err(io::Error::from_raw_os_error(libc::ENOSPC)), buf);
                }
            }
            match node.file() {
                Some(f) => f.write(self.opts.offset + offset, buf, flags).await,
                None => (Err(no_file()), buf),
            }
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            node.file()
                .ok_or_else(no_file)?
                .write_zeroes(self.opts.offset + offset, len, flags)
                .await
        })
    }

    fn discard<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            node.file()
                .ok_or_else(no_file)?
                .discard(self.opts.offset + offset, len)
                .await
        })
    }

    /// Grows the file child to `offset + len`, as QEMU's raw driver does; a raw node with a
    /// fixed `size` cannot be resized.
    fn truncate<'a>(&'a self, node: &'a Node, len: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            if self.opts.size.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "Cannot resize fixed-size raw disks",
                ));
            }
            let file = node.file().ok_or_else(no_file)?;
            let end = self
                .opts
                .offset
                .checked_add(len)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
            file.truncate(end).await
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move { node.file().ok_or_else(no_file)?.flush().await })
    }

    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, io::Result<(BlockStatus, u64)>> {
        Box::pin(async move { Ok((BlockStatus::Data, len)) })
    }
}
