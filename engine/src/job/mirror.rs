//! mirror job (in progress).
