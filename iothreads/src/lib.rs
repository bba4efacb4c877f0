#![warn(missing_docs)]
//! IoThreads: one OS thread, one io_uring, one single-threaded executor.
//!
//! This crate knows nothing of blocks: it runs futures and turns I/O into ring ops.
//!
//! - [`IoThread`] starts a loop on its own thread; [`IoThreadHandle`] reaches it from any
//!   thread to spawn tasks ([`IoThreadHandle::spawn_with`] builds a `!Send` future on the loop)
//!   and the [`JoinHandle`] awaits or blocks on the result from anywhere.
//! - The ops in [`op`] are futures over owned buffers ([`IoBuf`]).
//!
//! # The buffer rule
//!
//! An op takes its buffer **by value**. When the op is first polled the buffer moves into the
//! IoThread's in-flight table, and the kernel is given its address; it comes back to the caller
//! only with the completion. If the op's future is dropped while the kernel still owns the
//! buffer, the table keeps the buffer until the completion arrives and frees it then. Nothing
//! ever blocks in `Drop` (on the IoThread that must reap the completion, that would deadlock),
//! and the kernel is never handed a borrowed `&mut [u8]`.
//!
//! Ops are `!Send`: once submitted they belong to their IoThread's table. Polled off an IoThread
//! they fail with `Unsupported` and return their buffer unused.
//!
//! # Loop rules
//!
//! One `io_uring_enter` per turn submits everything queued; the loop blocks in the kernel only
//! when no task is runnable. A task woken during a turn runs in the next one, so an op that
//! completes at once never recurses into the next submission. A full SQ, or a CQ that could not
//! take another completion, parks the SQE in order until room frees; it is never dropped or
//! failed. Shutdown drops every task, cancels every op in flight, waits for their completions,
//! and joins the thread.

pub mod buf;
mod fixed;
pub mod join;
pub mod op;
mod runtime;
mod thread;
pub mod wake;

pub use buf::{BufResult, IoBuf, DEFAULT_ALIGN};
pub use join::{JoinError, JoinHandle, JoinSender};
pub use op::Fd;
pub use runtime::turn_time;
pub use thread::{
    alloc_buf, allowed_cpus, block_on_current, coop_yield, current, current_index,
    current_index_or, handle_by_index, is_busy, ops_in_flight, register_file, spawn_local,
    task_count, unregister_file, yield_now, CoopYield, IoThread, IoThreadHandle, IoThreadOptions,
    LoopStats, RingError, YieldNow, MAX_IOTHREADS,
};
