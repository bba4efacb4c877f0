//! Block drivers: protocols (`file`, `null-co`) and, later, formats and filters.

pub mod blkdebug;
pub mod file;
pub mod null;
