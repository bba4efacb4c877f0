//! Walking backing chains the way QEMU's job commands name their nodes: by file name
//! (`base`, `top`) or node name (`base-node`, `top-node`, `bottom`), skipping filters.

use std::path::Path;
use std::sync::Arc;

use graph::Node;

/// The file an image was opened from: the filename of the first node with one, looking through
/// filters and then the `file` child (a qcow2 node's file), and through filters below that
/// (a format over blkdebug over its file: the name written into an overlay's header must be
/// the file's, or the overlay would lose its backing file).
pub fn image_filename(node: &Arc<Node>) -> Option<String> {
    let n = node.skip_filters();
    if let Some(f) = n.driver().filename() {
        return Some(f.to_string());
    }
    n.file()
        .map(|f| f.skip_filters())
        .and_then(|f| f.driver().filename().map(str::to_string))
}

/// The format a backing file string should name for `node`: its driver, with protocol nodes
/// (a bare file) written as `raw`, as `backing-mask-protocol` does in QEMU.
pub fn image_format(node: &Arc<Node>) -> &'static str {
    match node.skip_filters().driver_name() {
        "file" | "host_device" => "raw",
        d => d,
    }
}

/// The backing file name `overlay`'s header records, if it is a qcow2 image.
fn header_backing(overlay: &Node) -> Option<String> {
    overlay
        .driver_as::<crate::drivers::qcow2::Qcow2Driver>()
        .and_then(|d| d.backing_name().0)
}

fn same_file(a: &str, b: &str, relative_to: Option<&str>) -> bool {
    if a == b {
        return true;
    }
    let resolve = |p: &str| {
        let p = Path::new(p);
        let p = match (
            p.is_relative(),
            relative_to.and_then(|r| Path::new(r).parent()),
        ) {
            (true, Some(dir)) => dir.join(p),
            _ => p.to_path_buf(),
        };
        p.canonicalize().ok()
    };
    matches!((resolve(a), resolve(b)), (Some(x), Some(y)) if x == y)
}

/// QEMU's `bdrv_find_backing_image`: the image below `top` (not `top` itself) that `name`
/// names, either as the backing file string of the image above it or as its file name.
pub fn find_backing_image(top: &Arc<Node>, name: &str) -> Option<Arc<Node>> {
    let mut cur = top.skip_filters();
    let top_file = image_filename(top);
    while let Some(next) = cur.backing_chain_next() {
        let by_header = header_backing(&cur)
            .is_some_and(|h| h == name || same_file(&h, name, image_filename(&cur).as_deref()));
        let by_file =
            image_filename(&next).is_some_and(|f| same_file(&f, name, top_file.as_deref()));
        if by_header || by_file {
            return Some(next);
        }
        cur = next;
    }
    None
}

/// QEMU's `bdrv_chain_contains`: whether `node` is `top` or lies in its filter-or-COW chain.
pub fn chain_contains(top: &Arc<Node>, node: &Arc<Node>) -> bool {
    let mut cur = Some(Arc::clone(top));
    while let Some(c) = cur {
        if Arc::ptr_eq(&c, node) {
            return true;
        }
        cur = c.filter_or_cow_child();
    }
    false
}

/// QEMU's `bdrv_find_overlay`: the image in `active`'s chain (filters skipped) whose next
/// image is `node`.
pub fn find_overlay(active: &Arc<Node>, node: &Arc<Node>) -> Option<Arc<Node>> {
    let node = node.skip_filters();
    let mut cur = active.skip_filters();
    loop {
        let next = cur.backing_chain_next()?;
        if Arc::ptr_eq(&next, &node) {
            return Some(cur);
        }
        cur = next;
    }
}

/// QEMU's `bdrv_find_base`: the last image of `top`'s chain.
pub fn find_base(top: &Arc<Node>) -> Option<Arc<Node>> {
    let mut cur = top.skip_filters();
    let mut found = None;
    while let Some(next) = cur.backing_chain_next() {
        found = Some(Arc::clone(&next));
        cur = next;
    }
    found
}

/// The nodes from `from` down the filter-or-COW chain, stopping before `end` (None: the
/// chain's end).
pub fn chain_until(from: Option<Arc<Node>>, end: Option<&Arc<Node>>) -> Vec<Arc<Node>> {
    let mut v = Vec::new();
    let mut cur = from;
    while let Some(c) = cur {
        if end.is_some_and(|e| Arc::ptr_eq(e, &c)) {
            break;
        }
        cur = c.filter_or_cow_child();
        v.push(c);
    }
    v
}

/// The edge from `node` to its filter-or-COW child.
pub fn filter_or_cow_edge(node: &Node) -> Option<Arc<graph::Edge>> {
    node.child_edge(if node.is_filter() {
        graph::Role::Filtered
    } else {
        graph::Role::Backing
    })
}
