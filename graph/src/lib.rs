//! The block graph: nodes with their drivers, edges with roles and permissions, the in-flight
//! counters that every request passes, drained sections, the graph lock, and transactions.
//!
//! This crate knows nothing of image formats or jobs: drivers implement [`Driver`], and the
//! engine builds nodes from them and changes the graph through its controller.

pub mod counter;
pub mod drain;
pub mod driver;
pub mod edge;
pub mod error;
pub mod lock;
pub mod node;
pub mod perm;
pub mod txn;

pub use drain::{drain_event, drained_begin, Drained};
pub use driver::{
    default_child_perms, metadata_file_perms, Driver, LocalBoxFuture, WriteFlags, ZeroFlags,
};
pub use edge::{Edge, Parent, Role, User};
pub use error::{Error, ErrorKind, Result};
pub use lock::{graph_lock, GraphCell, GraphLock, ReadGuard, WriteGuard};
pub use node::{all_nodes, check_node_name, find_node, set_closer, Closer, Node, NodeStats};
pub use perm::Perm;
pub use txn::{mutation, Mutation, Transaction};
