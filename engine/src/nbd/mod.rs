//! NBD: serve any node to guests and tools over the NBD protocol (newstyle fixed handshake,
//! structured replies, `base:allocation`), as qemu-storage-daemon's NBD exports do.

pub mod proto;
pub mod server;

pub use server::{Export, NbdAddr, NbdServer};
