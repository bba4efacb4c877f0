//! The block graph: nodes with their drivers, edges with roles and permissions, the in-flight
//! counters that every request passes, drained sections, and the graph lock.
//!
//! This crate knows nothing of image formats or jobs: drivers implement [`Driver`], and the
//! engine builds nodes from them.

pub mod counter;
pub mod driver;
pub mod error;
pub mod node;
pub mod perm;

pub use driver::{Driver, LocalBoxFuture, WriteFlags, ZeroFlags};
pub use error::{Error, ErrorKind, Result};
pub use node::Node;
pub use perm::Perm;
