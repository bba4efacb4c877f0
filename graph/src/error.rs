//! The one public error of the control plane: a small kind to branch on, a message that says
//! what failed (with the node, path or argument), and the cause behind it.
//!
//! The data plane (requests) returns `std::io::Error`, as a guest sees errno values.

use std::fmt;

/// What kind of failure this is; callers branch on it, never on message text.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad argument or option.
    InvalidArgument,
    /// A node, file or job that does not exist.
    NotFound,
    /// A device named by a command does not exist (QMP's `DeviceNotFound` class).
    DeviceNotFound,
    /// Something already exists under that name.
    AlreadyExists,
    /// Another user (in this process or another one) holds a conflicting permission or lock.
    PermissionConflict,
    /// The object is in use (by a job, a parent, an export).
    Busy,
    /// A frozen edge was to be changed.
    Frozen,
    /// The image is malformed.
    CorruptImage,
    /// A feature this engine does not implement.
    Unsupported,
    /// An I/O error.
    Io,
}

/// A control-plane error.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result of the control plane.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// An I/O error with context (`message`) and the OS error as its cause.
    pub fn io(message: impl Into<String>, e: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, message).with_source(e)
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the causes.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message and every cause, joined by ": " (one line, for a CLI or a QMP reply).
    pub fn full_message(&self) -> String {
        let mut s = self.message.clone();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&os_text(e));
            cur = e.source();
        }
        s
    }
}

/// An error's text; an OS error reads as its strerror text alone, as QEMU prints it
/// ("No such file or directory", not "No such file or directory (os error 2)").
fn os_text(e: &(dyn std::error::Error + 'static)) -> String {
    let text = e.to_string();
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        if let Some(code) = io.raw_os_error() {
            let suffix = format!(" (os error {code})");
            if let Some(stripped) = text.strip_suffix(&suffix) {
                return stripped.to_string();
            }
        }
    }
    text
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.full_message())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match e.kind {
            ErrorKind::InvalidArgument => std::io::ErrorKind::InvalidInput,
            ErrorKind::NotFound => std::io::ErrorKind::NotFound,
            ErrorKind::AlreadyExists => std::io::ErrorKind::AlreadyExists,
            ErrorKind::PermissionConflict | ErrorKind::Busy => std::io::ErrorKind::ResourceBusy,
            ErrorKind::Unsupported => std::io::ErrorKind::Unsupported,
            ErrorKind::CorruptImage => std::io::ErrorKind::InvalidData,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e.full_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_message_chains_causes() {
        let e = Error::io(
            "Could not open 'x'",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.to_string(), "Could not open 'x'");
        assert!(e
            .full_message()
            .starts_with("Could not open 'x': No such file"));
    }
}
