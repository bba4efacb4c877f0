//! commit job (in progress).
