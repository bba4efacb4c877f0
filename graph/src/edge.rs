//! Edges: a parent's use of a child node, with a role, the permissions the parent takes and
//! shares, and a frozen flag.
//!
//! Every parent holds its edges as `Arc<Edge>`: a node holds its children's edges, and a
//! *user* (a backend, a job, an export) holds the edge to the node it uses. The child keeps a
//! weak list of its parent edges. Replacing a node under all its parents swaps the child
//! pointer of each of those edges (under the graph lock's write side), which is how a front end
//! keeps its identity while the graph below it changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::lock::{graph_lock, GraphCell, ReadGuard, WriteGuard};
use crate::node::Node;
use crate::perm::Perm;

/// What a child is to its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The protocol under a format (a qcow2 node's file).
    File,
    /// The copy-on-write source of a format node.
    Backing,
    /// A filter's only child.
    Filtered,
    /// The node a user (backend, job, export) works on.
    Root,
}

impl Role {
    /// QEMU's child name for the role.
    pub fn child_name(self) -> &'static str {
        match self {
            Role::File => "file",
            Role::Backing => "backing",
            Role::Filtered => "file",
            Role::Root => "root",
        }
    }
}

/// A user of nodes that is not itself a node: a backend, a block job, an export.
///
/// Drain tells users to stop sending requests and waits until they are quiet.
pub trait User: Send + Sync + 'static {
    /// How errors name this user: "block device 'disk0'", "block job 'job0'".
    fn describe(&self) -> String;

    /// Stop sending new requests (counted: calls nest).
    fn drained_begin(&self) {}

    /// Undo one `drained_begin`; when the count reaches zero, resume (releasing held
    /// requests in order).
    fn drained_end(&self) {}

    /// Whether no request of this user is in flight (a paused job, an idle backend).
    fn is_quiet(&self) -> bool {
        true
    }
}

/// Who holds an edge.
#[derive(Clone)]
pub enum Parent {
    /// A node (the edge is one of its children).
    Node(Weak<Node>),
    /// A user.
    User(Weak<dyn User>),
}

impl Parent {
    /// The parent as error messages name it (QEMU: "node 'x'", "block device 'y'").
    pub fn describe(&self) -> String {
        match self {
            Parent::Node(n) => match n.upgrade() {
                Some(n) => format!("node '{}'", n.name()),
                None => "a node being closed".to_string(),
            },
            Parent::User(u) => match u.upgrade() {
                Some(u) => u.describe(),
                None => "a user being removed".to_string(),
            },
        }
    }

    /// The parent node, if the parent is a node that still exists.
    pub fn node(&self) -> Option<Arc<Node>> {
        match self {
            Parent::Node(n) => n.upgrade(),
            Parent::User(_) => None,
        }
    }

    /// The parent user, if it is one that still exists.
    pub fn user(&self) -> Option<Arc<dyn User>> {
        match self {
            Parent::User(u) => u.upgrade(),
            Parent::Node(_) => None,
        }
    }
}

/// A parent's use of a child.
pub struct Edge {
    name: String,
    role: Role,
    parent: Parent,
    child: GraphCell<Arc<Node>>,
    /// (perm, shared): what the parent takes and what it lets others take.
    perms: Mutex<(Perm, Perm)>,
    frozen: AtomicBool,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p, s) = self.perms();
        f.debug_struct("Edge")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("parent", &self.parent.describe())
            .field("child", &self.child_locked_name())
            .field("perm", &p)
            .field("shared", &s)
            .field("frozen", &self.is_frozen())
            .finish()
    }
}

impl Edge {
    pub(crate) fn new(
        name: impl Into<String>,
        role: Role,
        parent: Parent,
        child: Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Arc<Edge> {
        Arc::new(Edge {
            name: name.into(),
            role,
            parent,
            child: GraphCell::new(child),
            perms: Mutex::new((perm, shared)),
            frozen: AtomicBool::new(false),
        })
    }

    /// The child name ("file", "backing", "root").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Who holds the edge.
    pub fn parent(&self) -> &Parent {
        &self.parent
    }

    /// The child, read under a read section (the I/O path).
    #[inline]
    pub fn child_in<'g>(&'g self, g: &'g ReadGuard<'_>) -> &'g Arc<Node> {
        self.child.read(g)
    }

    /// The child, cloned out of a short read section.
    #[inline]
    pub fn child(&self) -> Arc<Node> {
        let g = graph_lock().read();
        Arc::clone(self.child.read(&g))
    }

    /// [`Self::child`] for a caller on IoThread `t` (see [`crate::lock::GraphLock::read_on`]).
    #[cfg(not(loom))]
    #[inline]
    pub fn child_on(&self, t: usize) -> Arc<Node> {
        let g = graph_lock().read_on(t);
        Arc::clone(self.child.read(&g))
    }

    fn child_locked_name(&self) -> String {
        self.child().name().to_string()
    }

    /// Points the edge at another child (write side held). Returns the old child.
    pub(crate) fn set_child(&self, w: &WriteGuard<'_>, child: Arc<Node>) -> Arc<Node> {
        self.child.replace(w, child)
    }

    /// (perm, shared).
    pub fn perms(&self) -> (Perm, Perm) {
        *self.perms.lock()
    }

    pub(crate) fn set_perms(&self, perm: Perm, shared: Perm) {
        *self.perms.lock() = (perm, shared);
    }

    /// Whether changing or removing the edge is refused.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    pub(crate) fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Release);
    }

    /// How errors name the use: "node 'top' (uses node 'base' as 'backing' child)".
    pub fn describe_use(&self) -> String {
        format!(
            "{} (uses node '{}' as '{}' child)",
            self.parent.describe(),
            self.child().name(),
            self.name
        )
    }
}
