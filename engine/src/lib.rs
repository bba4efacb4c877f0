//! strata's embeddable block engine: drivers, backends, and (as they arrive) the controller,
//! block jobs and exports. An embedder links this crate alone and drives it with typed calls.

pub mod backend;
pub mod drivers;

pub use backend::Backend;
pub use graph::{Error, ErrorKind, Node, Perm, WriteFlags, ZeroFlags};
pub use iothreads::{IoBuf, IoThread, IoThreadHandle, IoThreadOptions};
