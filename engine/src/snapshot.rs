//! Live snapshots (QMP's `blockdev-snapshot`): an overlay, an image with no backing node yet,
//! goes above the active node under all its parents in one drained transaction, and the active
//! node becomes the overlay's backing node. This is how a chain grows before a job merges it.
//!
//! The checks and their texts are QEMU's (`external_snapshot_action`): the node must not be
//! owned by a job; the overlay must be a format node that supports backing files, with no
//! backing node yet and no parent that reads it. The old node is flushed before and reopened
//! read-only after, with the files that are a part of it but not a file node of its own that
//! it references by name ([`crate::engine::reopen_image`]; a failure to reopen is only
//! logged, as in QEMU). As with
//! `blockdev-snapshot`, the overlay's header is not rewritten: it should already name the old
//! image as its backing file (as `qemu-img create -b` or [`crate::Engine::snapshot_file`]
//! write it), or the chain is whole only while the engine holds it.

use std::sync::Arc;

use graph::{Error, ErrorKind, Node, Perm, Result, Role};

use crate::controller::ChangeCtx;
use crate::drivers::qcow2::Qcow2Driver;
use crate::engine::{on_io, reopen_drained};
use crate::job::JobManager;

fn generic(msg: &str) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Checks `overlay` as QEMU does before it gets a backing node.
fn check_overlay(overlay: &Node) -> Result<()> {
    if overlay.cumulative_perms().0.contains(Perm::CONSISTENT_READ) {
        return Err(Error::new(ErrorKind::Busy, "The overlay is already in use"));
    }
    if overlay.is_filter() {
        return Err(generic("Filters cannot be used as overlays"));
    }
    if overlay.child_edge(Role::Backing).is_some() {
        return Err(generic("The overlay already has a backing image"));
    }
    if overlay.driver_as::<Qcow2Driver>().is_none() {
        return Err(generic("The overlay does not support backing images"));
    }
    Ok(())
}

/// Puts `overlay` above `active` (both looked up inside this change): see the module doc.
pub(crate) async fn append_overlay(
    ctx: &ChangeCtx,
    jobs: &JobManager,
    active: &str,
    overlay: &str,
) -> Result<()> {
    let old = crate::engine::lookup(active)?;
    let drained = ctx.drain(std::slice::from_ref(&old)).await;
    let r = append_drained(ctx, jobs, &old, overlay).await;
    drained.end();
    r
}

async fn append_drained(
    ctx: &ChangeCtx,
    jobs: &JobManager,
    old: &Arc<Node>,
    overlay: &str,
) -> Result<()> {
    jobs.check_free(old)?;
    if !old.is_read_only() {
        let n = Arc::clone(old);
        on_io(ctx, move || async move {
            n.flush()
                .await
                .map_err(|e| Error::io("An IO error has occurred", e))
        })
        .await?;
    }
    let new = crate::engine::lookup(overlay)?;
    check_overlay(&new)?;
    ctx.transaction(|tx| {
        tx.attach_child(&new, old, Role::Backing)?;
        // Every parent of the old node but the overlay's new backing edge.
        tx.replace_node(old, &new, None)
    })?;
    if let Err(e) = reopen_drained(ctx, old, true).await {
        tracing::warn!(
            "snapshot: cannot reopen '{}' read-only: {}",
            old.name(),
            e.full_message()
        );
    }
    Ok(())
}
