//! Block drivers: protocols (`file`, `null-co`), formats (`raw`, `qcow2`) and filters
//! (`blkdebug`).

pub mod blkdebug;
pub mod cor;
pub mod file;
pub mod null;
pub mod qcow2;
pub mod raw;
