#![warn(missing_docs)]
//! strata's embeddable block engine: drivers, backends, the controller, live snapshots,
//! block jobs and exports. An embedder links this crate alone and drives it with typed calls.

pub mod backend;
pub mod controller;
pub mod drivers;
pub mod engine;
pub mod image;
pub mod job;
pub mod nbd;
pub mod snapshot;

pub use backend::{Backend, BackendOptions};
pub use controller::{ChangeCtx, Controller, ControllerHandle};
pub use engine::{BackingSpec, ChildSpec, DriverSpec, Engine, EngineOptions, NodeSpec};
pub use graph::{Error, ErrorKind, Node, Perm, Result, WriteFlags, ZeroFlags};
pub use iothreads::{IoBuf, IoThread, IoThreadHandle, IoThreadOptions};
