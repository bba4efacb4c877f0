//! Graph changes as transactions.
//!
//! A [`Transaction`] is a list of steps. Each step applies at once (pointer changes under the
//! graph lock's write side) and records how to undo itself; [`Transaction::commit`] refreshes
//! the permissions of the whole graph (checking conflicts and moving image locks) and then
//! finalises the steps. If any step or the permission refresh fails, or the transaction is
//! dropped uncommitted, every applied step is undone in reverse order: the graph is never left
//! half-changed. No step awaits; a change that needs a drain does it before the transaction.
//!
//! Every change of the graph's structure holds the process's mutation lock ([`mutation`]), so
//! two changes never interleave. The controller takes it for each synchronous part of its
//! changes; other callers (a backend attaching to its root) take it too.

use std::sync::{Arc, OnceLock};

use parking_lot::{ReentrantMutex, ReentrantMutexGuard};

use crate::edge::{Edge, Parent, Role, User};
use crate::error::{Error, ErrorKind, Result};
use crate::lock::graph_lock;
use crate::node::{all_nodes, Node};
use crate::perm::Perm;

fn mutation_lock() -> &'static ReentrantMutex<()> {
    static M: OnceLock<ReentrantMutex<()>> = OnceLock::new();
    M.get_or_init(|| ReentrantMutex::new(()))
}

/// Proof of holding the mutation lock (reentrant: one thread may take it again).
pub struct Mutation {
    _guard: ReentrantMutexGuard<'static, ()>,
}

/// Takes the mutation lock.
pub fn mutation() -> Mutation {
    Mutation {
        _guard: mutation_lock().lock(),
    }
}

type Undo = Box<dyn FnOnce()>;

/// A graph change in progress.
pub struct Transaction<'m> {
    _m: &'m Mutation,
    undo: Vec<Undo>,
    on_commit: Vec<Undo>,
    perms_dirty: bool,
    done: bool,
}

/// How a frozen-edge error names a parent: a node by its name, a user by its description.
fn parent_name(p: &Parent) -> String {
    match p.node() {
        Some(n) => n.name().to_string(),
        None => p.describe(),
    }
}

fn frozen_error(edge: &Edge) -> Error {
    Error::new(
        ErrorKind::Frozen,
        format!(
            "Cannot change '{}' link from '{}' to '{}'",
            edge.name(),
            parent_name(edge.parent()),
            edge.child().name()
        ),
    )
}

/// The rule of the graph lock's write side: a node's children change only while nothing can
/// send it requests, i.e. while a drained section covers it, or while nothing reaches it at
/// all (no parent edge and no user: a node being opened, before it is attached anywhere).
/// A change that forgot its drain fails here, before it has changed anything.
fn require_drained(node: &Node) -> Result<()> {
    let reached = || node.parents.lock().iter().any(|p| p.strong_count() > 0);
    if node.quiesce_count() > 0 || !reached() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Busy,
        format!(
            "Cannot change the children of '{}' outside a drained section",
            node.name()
        ),
    ))
}

/// Replaces a node's child list under the write side; the old list is dropped outside it.
fn edit_children(node: &Node, f: impl FnOnce(&mut Vec<Arc<Edge>>)) {
    let old = graph_lock().with_write(|w| {
        let mut v = node.children_locked(w).clone();
        f(&mut v);
        node.children.replace(w, v)
    });
    drop(old);
}

fn remove_parent_link(child: &Node, edge: &Arc<Edge>) -> Option<usize> {
    let mut ps = child.parents.lock();
    let pos = ps
        .iter()
        .position(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(edge)))?;
    ps.remove(pos);
    Some(pos)
}

fn add_parent_link(child: &Node, edge: &Arc<Edge>, pos: Option<usize>) {
    let mut ps = child.parents.lock();
    let w = Arc::downgrade(edge);
    match pos {
        Some(p) if p <= ps.len() => ps.insert(p, w),
        _ => ps.push(w),
    }
}

impl<'m> Transaction<'m> {
    /// Starts a transaction under the mutation lock.
    pub fn new(m: &'m Mutation) -> Self {
        Transaction {
            _m: m,
            undo: Vec::new(),
            on_commit: Vec::new(),
            perms_dirty: false,
            done: false,
        }
    }

    /// Adds `child` under `parent` in `role` (permissions are derived at commit).
    pub fn attach_child(
        &mut self,
        parent: &Arc<Node>,
        child: &Arc<Node>,
        role: Role,
    ) -> Result<Arc<Edge>> {
        if child.reaches(parent) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "Making '{}' a {} child of '{}' would create a cycle",
                    child.name(),
                    role.child_name(),
                    parent.name()
                ),
            ));
        }
        require_drained(parent)?;
        let edge = Edge::new(
            role.child_name(),
            role,
            Parent::Node(Arc::downgrade(parent)),
            Arc::clone(child),
            Perm::NONE,
            Perm::ALL,
        );
        edit_children(parent, |v| v.push(Arc::clone(&edge)));
        add_parent_link(child, &edge, None);
        let (p, c, e) = (Arc::clone(parent), Arc::clone(child), Arc::clone(&edge));
        self.undo.push(Box::new(move || {
            edit_children(&p, |v| v.retain(|x| !Arc::ptr_eq(x, &e)));
            remove_parent_link(&c, &e);
        }));
        self.perms_dirty = true;
        Ok(edge)
    }

    /// Attaches a user (backend, job, export) to `child`, taking `perm` and sharing `shared`.
    /// A user attached to a quiesced node is drained at once until the node's drains end.
    pub fn attach_user(
        &mut self,
        user: &Arc<dyn User>,
        child: &Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Result<Arc<Edge>> {
        let edge = Edge::new(
            "root",
            Role::Root,
            Parent::User(Arc::downgrade(user)),
            Arc::clone(child),
            perm,
            shared,
        );
        add_parent_link(child, &edge, None);
        let late = child.quiesce_count() > 0;
        if late {
            user.drained_begin();
            child.late_users.lock().push(Arc::downgrade(user));
        }
        let (c, e, u) = (Arc::clone(child), Arc::clone(&edge), Arc::clone(user));
        self.undo.push(Box::new(move || {
            remove_parent_link(&c, &e);
            if late {
                let mut lu = c.late_users.lock();
                if let Some(i) = lu.iter().position(|w| {
                    std::ptr::eq(w.as_ptr() as *const (), Arc::as_ptr(&u) as *const ())
                }) {
                    lu.remove(i);
                    drop(lu);
                    u.drained_end();
                }
            }
        }));
        self.perms_dirty = true;
        Ok(edge)
    }

    /// Removes an edge. Refused if it is frozen.
    pub fn detach(&mut self, edge: &Arc<Edge>) -> Result<()> {
        if edge.is_frozen() {
            return Err(frozen_error(edge));
        }
        let child = edge.child();
        let parent = edge.parent().node();
        if let Some(p) = &parent {
            require_drained(p)?;
        }
        let mut at = None;
        if let Some(p) = &parent {
            edit_children(p, |v| {
                if let Some(i) = v.iter().position(|x| Arc::ptr_eq(x, edge)) {
                    at = Some(i);
                    v.remove(i);
                }
            });
        }
        let ppos = remove_parent_link(&child, edge);
        let (e, c) = (Arc::clone(edge), Arc::clone(&child));
        self.undo.push(Box::new(move || {
            if let (Some(p), Some(i)) = (&parent, at) {
                edit_children(p, |v| v.insert(i.min(v.len()), Arc::clone(&e)));
            }
            add_parent_link(&c, &e, ppos);
        }));
        // The edge (and with it possibly the last reference to the child) goes at commit.
        let keep = Arc::clone(edge);
        self.on_commit.push(Box::new(move || drop(keep)));
        self.perms_dirty = true;
        Ok(())
    }

    /// Points `edge` at `new`. Refused if frozen or if it would create a cycle.
    pub fn set_child(&mut self, edge: &Arc<Edge>, new: &Arc<Node>) -> Result<()> {
        let old = edge.child();
        if Arc::ptr_eq(&old, new) {
            return Ok(());
        }
        if edge.is_frozen() {
            return Err(frozen_error(edge));
        }
        if let Some(p) = edge.parent().node() {
            if new.reaches(&p) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "Making '{}' a {} child of '{}' would create a cycle",
                        new.name(),
                        edge.name(),
                        p.name()
                    ),
                ));
            }
        }
        // A user's edge is read by the user's requests: the old child's drain stops them.
        match edge.parent().node() {
            Some(p) => require_drained(&p)?,
            None => require_drained(&old)?,
        }
        let prev = graph_lock().with_write(|w| edge.set_child(w, Arc::clone(new)));
        let ppos = remove_parent_link(&old, edge);
        add_parent_link(new, edge, None);
        let (e, o, n) = (Arc::clone(edge), Arc::clone(&old), Arc::clone(new));
        self.undo.push(Box::new(move || {
            let back = graph_lock().with_write(|w| e.set_child(w, Arc::clone(&o)));
            drop(back);
            remove_parent_link(&n, &e);
            add_parent_link(&o, &e, ppos);
        }));
        self.on_commit.push(Box::new(move || drop(prev)));
        self.perms_dirty = true;
        Ok(())
    }

    /// Makes `backing` the backing child of `node` (None removes it).
    pub fn set_backing(&mut self, node: &Arc<Node>, backing: Option<&Arc<Node>>) -> Result<()> {
        match (node.child_edge(Role::Backing), backing) {
            (Some(e), Some(b)) => self.set_child(&e, b),
            (Some(e), None) => self.detach(&e),
            (None, Some(b)) => self.attach_child(node, b, Role::Backing).map(drop),
            (None, None) => Ok(()),
        }
    }

    /// Points every parent edge of `old` at `new`, except the edges held by `new` itself and
    /// by `skip` (an inserted filter's own edge to `old`). All or nothing: a frozen edge among
    /// them is refused before any changes, with QEMU's words (`bdrv_replace_node`: "Cannot
    /// change 'backing' link to 'old'"), and any other refusal undoes the edges changed
    /// before it. (QEMU skips a parent whose edge would make a cycle and moves the rest;
    /// strata refuses the whole replace, so a change never half-happens.)
    pub fn replace_node(
        &mut self,
        old: &Arc<Node>,
        new: &Arc<Node>,
        skip: Option<&Arc<Node>>,
    ) -> Result<()> {
        if Arc::ptr_eq(old, new) {
            return Ok(());
        }
        let edges: Vec<Arc<Edge>> = old
            .parents()
            .into_iter()
            .filter(|e| match e.parent().node() {
                Some(p) => !(Arc::ptr_eq(&p, new) || skip.is_some_and(|s| Arc::ptr_eq(&p, s))),
                None => true,
            })
            .collect();
        if let Some(e) = edges.iter().find(|e| e.is_frozen()) {
            return Err(Error::new(
                ErrorKind::Frozen,
                format!("Cannot change '{}' link to '{}'", e.name(), old.name()),
            ));
        }
        self.all_or_nothing(|tx| {
            for e in &edges {
                tx.set_child(e, new)?;
            }
            Ok(())
        })
    }

    /// Puts `filter` (whose filtered child is already `below`) above `below` under all of
    /// `below`'s parents.
    pub fn insert_filter(&mut self, filter: &Arc<Node>, below: &Arc<Node>) -> Result<()> {
        match filter.filtered() {
            Some(c) if Arc::ptr_eq(&c, below) => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "'{}' is not a filter over '{}'",
                        filter.name(),
                        below.name()
                    ),
                ))
            }
        }
        self.replace_node(below, filter, Some(filter))
    }

    /// Takes `filter` out: its parents point at its child again, and its edge goes.
    pub fn drop_filter(&mut self, filter: &Arc<Node>) -> Result<()> {
        let Some(edge) = filter.child_edge(Role::Filtered) else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("'{}' is not a filter", filter.name()),
            ));
        };
        let child = edge.child();
        self.all_or_nothing(|tx| {
            tx.replace_node(filter, &child, None)?;
            tx.detach(&edge)
        })
    }

    /// Freezes an edge for a job; refused if another job froze it already, or if it leads to
    /// a node whose links may never be frozen ([`Node::never_freeze`]).
    pub fn freeze(&mut self, edge: &Arc<Edge>) -> Result<()> {
        self.freeze_chain(std::slice::from_ref(edge))
    }

    /// Freezes the edges of a chain for a job, all or none, with the checks of QEMU's
    /// `bdrv_freeze_backing_chain` in its order: first whether any edge is frozen already
    /// ("Cannot change 'backing' link from 'a' to 'b'"), then whether any leads to a node
    /// whose links may never be frozen, a job's own filter ("Cannot freeze 'backing' link to
    /// 'f'").
    pub fn freeze_chain(&mut self, edges: &[Arc<Edge>]) -> Result<()> {
        if let Some(e) = edges.iter().find(|e| e.is_frozen()) {
            return Err(frozen_error(e));
        }
        for e in edges {
            let child = e.child();
            if child.never_freeze() {
                return Err(Error::new(
                    ErrorKind::Frozen,
                    format!("Cannot freeze '{}' link to '{}'", e.name(), child.name()),
                ));
            }
        }
        for e in edges {
            self.set_frozen(e, true);
        }
        Ok(())
    }

    /// Freezes or thaws an edge.
    pub fn set_frozen(&mut self, edge: &Arc<Edge>, frozen: bool) {
        let was = edge.is_frozen();
        edge.set_frozen(frozen);
        let e = Arc::clone(edge);
        self.undo.push(Box::new(move || e.set_frozen(was)));
    }

    /// Reopens `node` read-only or read-write (moving its image locks at commit).
    pub fn set_read_only(&mut self, node: &Arc<Node>, read_only: bool) -> Result<()> {
        if node.is_read_only() == read_only {
            return Ok(());
        }
        node.driver().reopen_prepare(read_only)?;
        node.set_read_only_flag(read_only);
        let n = Arc::clone(node);
        self.undo.push(Box::new(move || {
            n.set_read_only_flag(!read_only);
            n.driver().reopen_abort();
        }));
        let n = Arc::clone(node);
        self.on_commit
            .push(Box::new(move || n.driver().reopen_commit()));
        self.perms_dirty = true;
        Ok(())
    }

    /// Changes what a user's edge takes (`perm`) and lets others take (`shared`), as QEMU's
    /// `bdrv_child_try_set_perm` does for a user's root child. The edge changes at once and
    /// goes back if the transaction does not commit; the new permissions are checked against
    /// the node's other parents at commit, by the permission refresh of the whole graph (a
    /// conflict names both users and the permission; a read-only node refuses write and
    /// resize), which also moves the image locks. A frozen edge may change its permissions
    /// (freezing keeps its child, not its permissions). Only a user's edge has permissions of
    /// its own: a node's edges take what the parent's driver derives at every refresh
    /// ([`crate::Driver::child_perms`]), so changing one is refused.
    pub fn update_perms(&mut self, edge: &Arc<Edge>, perm: Perm, shared: Perm) -> Result<()> {
        if let Parent::Node(_) = edge.parent() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "Cannot set the permissions of '{}' link from '{}' to '{}': the parent's \
                     driver derives them",
                    edge.name(),
                    parent_name(edge.parent()),
                    edge.child().name()
                ),
            ));
        }
        let old = edge.perms();
        if old == (perm, shared) {
            return Ok(());
        }
        edge.set_perms(perm, shared);
        let e = Arc::clone(edge);
        self.undo.push(Box::new(move || e.set_perms(old.0, old.1)));
        self.perms_dirty = true;
        Ok(())
    }

    /// Asks for a permission refresh at commit even if no step changed the structure.
    pub fn refresh_perms(&mut self) {
        self.perms_dirty = true;
    }

    /// Checks and applies permissions, then finalises every step. On failure everything is
    /// undone and the graph is as it was before the transaction.
    pub fn commit(mut self) -> Result<()> {
        if self.perms_dirty {
            if let Err(e) = refresh_perms() {
                self.abort();
                return Err(e);
            }
        }
        self.done = true;
        for f in std::mem::take(&mut self.on_commit) {
            f();
        }
        Ok(())
    }

    /// Runs `f` as one step made of several: if it fails, what it applied is undone at once,
    /// so the failed step leaves the graph as it was before it (the earlier steps stay).
    fn all_or_nothing(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let (undo, on_commit) = (self.undo.len(), self.on_commit.len());
        let r = f(self);
        if r.is_err() {
            while self.undo.len() > undo {
                if let Some(u) = self.undo.pop() {
                    u();
                }
            }
            self.on_commit.truncate(on_commit);
        }
        r
    }

    fn abort(&mut self) {
        self.done = true;
        while let Some(u) = self.undo.pop() {
            u();
        }
        self.on_commit.clear();
        // The structure is back; put the permissions (and image locks) back too. This only
        // reinstates a state that held before, so it does not fail in practice.
        let _ = refresh_perms();
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.abort();
        }
    }
}

/// Nodes in an order where every node comes after all its node parents.
fn topo_order(nodes: &[Arc<Node>]) -> Vec<Arc<Node>> {
    use std::collections::HashMap;
    let index: HashMap<*const Node, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (Arc::as_ptr(n), i))
        .collect();
    let mut indeg = vec![0usize; nodes.len()];
    for n in nodes {
        for e in n.children() {
            if let Some(&j) = index.get(&Arc::as_ptr(&e.child())) {
                indeg[j] += 1;
            }
        }
    }
    let mut ready: Vec<usize> = (0..nodes.len()).filter(|&i| indeg[i] == 0).collect();
    let mut out = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop() {
        out.push(Arc::clone(&nodes[i]));
        for e in nodes[i].children() {
            if let Some(&j) = index.get(&Arc::as_ptr(&e.child())) {
                indeg[j] -= 1;
                if indeg[j] == 0 {
                    ready.push(j);
                }
            }
        }
    }
    out
}

fn conflict_error(node: &Node, a: &Edge, b: &Edge, what: Perm) -> Error {
    Error::new(
        ErrorKind::PermissionConflict,
        format!(
            "Permission conflict on node '{n}': permissions '{p}' are both required by {ua} \
             (uses node '{n}' as '{ca}' child) and unshared by {ub} (uses node '{n}' as '{cb}' \
             child).",
            n = node.name(),
            p = what.names(),
            ua = a.parent().describe(),
            ca = a.name(),
            ub = b.parent().describe(),
            cb = b.name(),
        ),
    )
}

/// Recomputes every node's permissions from its parents, top down; checks conflicts and
/// read-only nodes; then applies the changes to the drivers (moving image locks). On failure
/// nothing is changed.
pub(crate) fn refresh_perms() -> Result<()> {
    let order = topo_order(&all_nodes());
    let mut edge_undo: Vec<(Arc<Edge>, (Perm, Perm))> = Vec::new();
    let restore_edges = |undo: &mut Vec<(Arc<Edge>, (Perm, Perm))>| {
        for (e, (p, s)) in undo.drain(..).rev() {
            e.set_perms(p, s);
        }
    };
    let mut wanted: Vec<(Arc<Node>, (Perm, Perm))> = Vec::new();
    for node in &order {
        let parents = node.parents();
        let mut perm = Perm::NONE;
        let mut shared = Perm::ALL;
        for e in &parents {
            let (p, s) = e.perms();
            perm |= p;
            shared = shared & s;
        }
        for a in &parents {
            for b in &parents {
                if Arc::ptr_eq(a, b) {
                    continue;
                }
                let clash = a.perms().0 & !b.perms().1;
                if !clash.is_empty() {
                    restore_edges(&mut edge_undo);
                    return Err(conflict_error(node, a, b, clash));
                }
            }
        }
        if node.is_read_only() && perm.intersects(Perm::WRITE | Perm::RESIZE) {
            restore_edges(&mut edge_undo);
            return Err(Error::new(
                ErrorKind::PermissionConflict,
                format!("Block node '{}' is read-only", node.name()),
            ));
        }
        let ro = node.is_read_only();
        for c in node.children() {
            let want = node.driver().child_perms(c.role(), perm, shared, ro);
            let old = c.perms();
            if old != want {
                edge_undo.push((Arc::clone(&c), old));
                c.set_perms(want.0, want.1);
            }
        }
        wanted.push((Arc::clone(node), (perm, shared)));
    }
    let mut applied: Vec<(Arc<Node>, (Perm, Perm))> = Vec::new();
    for (node, want) in wanted {
        let old = *node.applied.lock();
        if old == want {
            continue;
        }
        if let Err(e) = node.driver().set_perms(want.0, want.1) {
            for (n, prev) in applied.into_iter().rev() {
                let _ = n.driver().set_perms(prev.0, prev.1);
                *n.applied.lock() = prev;
            }
            restore_edges(&mut edge_undo);
            return Err(e);
        }
        *node.applied.lock() = want;
        applied.push((node, old));
    }
    Ok(())
}
