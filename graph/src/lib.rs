#![warn(missing_docs)]
//! The block graph: nodes with their drivers, edges with roles and permissions, the in-flight
//! counters that every request passes, drained sections, the graph lock, and transactions.
//!
//! This crate knows nothing of image formats or jobs: drivers implement [`Driver`], and the
//! engine builds nodes from them and changes the graph through its controller.

// Under loom only the lock-free pieces are built, for the model checks.
pub mod counter;
#[cfg(not(loom))]
pub mod drain;
#[cfg(not(loom))]
pub mod driver;
#[cfg(not(loom))]
pub mod edge;
#[cfg(not(loom))]
pub mod error;
pub mod lock;
#[cfg(not(loom))]
pub mod node;
#[cfg(not(loom))]
pub mod perm;
pub mod quiesce;
#[cfg(not(loom))]
pub mod txn;

#[cfg(not(loom))]
pub use drain::{drain_event, drained_begin, Drained};
#[cfg(not(loom))]
pub use driver::{
    default_child_perms, metadata_file_perms, BlockStatus, Driver, LocalBoxFuture, WriteFlags,
    ZeroFlags,
};
#[cfg(not(loom))]
pub use edge::{Edge, Parent, Role, User};
#[cfg(not(loom))]
pub use error::{Error, ErrorKind, Result};
#[cfg(not(loom))]
pub use lock::{graph_lock, GraphCell, GraphLock, ReadGuard, WriteGuard};
#[cfg(not(loom))]
pub use node::{
    all_nodes, check_node_name, find_node, set_closer, set_thread_closer, Closer, HomeCloser, Node,
    NodeStats,
};
#[cfg(not(loom))]
pub use perm::Perm;
pub use quiesce::{DrainEvent, Gate, HeldQueue, HeldQueues, WaitTurn};
#[cfg(not(loom))]
pub use txn::{mutation, Mutation, Transaction};
