//! The graph's rules: permission conflicts, frozen edges, cycles, names, reference counts,
//! reopen, and the rollback of every transaction step (each checked by failing the step
//! after it and comparing the graph with its state before).

mod common;

use std::sync::Arc;

use common::{plain_io, uniq};
use graph::{mutation, Driver, ErrorKind, Mutation, Node, Perm, Role, Transaction, User};

/// A leaf that holds nothing (reads leave buffers as they are).
struct Leaf {
    len: u64,
}

/// A filter that passes everything to its filtered child.
struct Filter;

/// A format with a file and a backing child; it only matters for permissions here.
struct Format;

impl Driver for Leaf {
    fn driver_name(&self) -> &'static str {
        "leaf"
    }
    fn length(&self, _: &Node) -> u64 {
        self.len
    }
    plain_io!();
}

impl Driver for Filter {
    fn driver_name(&self) -> &'static str {
        "filter"
    }
    fn length(&self, _: &Node) -> u64 {
        0
    }
    fn is_filter(&self) -> bool {
        true
    }
    plain_io!();
}

/// A job's own filter (QEMU's commit_top): links into it may never be frozen.
struct JobFilter;

impl Driver for JobFilter {
    fn driver_name(&self) -> &'static str {
        "job-filter"
    }
    fn length(&self, _: &Node) -> u64 {
        0
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn never_freeze(&self) -> bool {
        true
    }
    plain_io!();
}

impl Driver for Format {
    fn driver_name(&self) -> &'static str {
        "format"
    }
    fn length(&self, _: &Node) -> u64 {
        0
    }
    fn child_perms(&self, role: Role, perm: Perm, shared: Perm, ro: bool) -> (Perm, Perm) {
        match role {
            Role::File => graph::metadata_file_perms(perm, shared, ro),
            _ => graph::default_child_perms(role, perm, shared, ro),
        }
    }
    plain_io!();
}

fn leaf(tag: &str) -> Arc<Node> {
    Node::new(Some(&uniq(tag)), Box::new(Leaf { len: 1 << 20 }), false).unwrap()
}

fn format(tag: &str) -> Arc<Node> {
    Node::new(Some(&uniq(tag)), Box::new(Format), false).unwrap()
}

fn filter_over(tag: &str, below: &Arc<Node>) -> Arc<Node> {
    let f = Node::new(Some(&uniq(tag)), Box::new(Filter), false).unwrap();
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.attach_child(&f, below, Role::Filtered).unwrap();
    tx.commit().unwrap();
    f
}

struct TestUser(String);
impl User for TestUser {
    fn describe(&self) -> String {
        format!("block device '{}'", self.0)
    }
}

fn user(name: &str) -> Arc<dyn User> {
    Arc::new(TestUser(name.to_string()))
}

/// A readable picture of a node's surroundings, to compare before and after.
fn shape(nodes: &[&Arc<Node>]) -> Vec<String> {
    nodes
        .iter()
        .map(|n| {
            let kids: Vec<String> = n
                .children()
                .iter()
                .map(|e| {
                    format!(
                        "{}:{}:{:?}:{}",
                        e.name(),
                        e.child().name(),
                        e.perms(),
                        e.is_frozen()
                    )
                })
                .collect();
            let parents: Vec<String> = n
                .parents()
                .iter()
                .map(|e| format!("{}<-{}:{:?}", e.name(), e.parent().describe(), e.perms()))
                .collect();
            format!(
                "{} ro={} perms={:?} kids={kids:?} parents={parents:?}",
                n.name(),
                n.is_read_only(),
                n.cumulative_perms()
            )
        })
        .collect()
}

/// A chain `top -> (file: top_file, backing: base -> file: base_file)`.
struct Chain {
    top: Arc<Node>,
    top_file: Arc<Node>,
    base: Arc<Node>,
    base_file: Arc<Node>,
}

fn chain() -> Chain {
    let (top, top_file, base, base_file) = (format("top"), leaf("tf"), format("base"), leaf("bf"));
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.attach_child(&top, &top_file, Role::File).unwrap();
    tx.attach_child(&base, &base_file, Role::File).unwrap();
    tx.set_backing(&top, Some(&base)).unwrap();
    tx.commit().unwrap();
    Chain {
        top,
        top_file,
        base,
        base_file,
    }
}

impl Chain {
    fn all(&self) -> Vec<&Arc<Node>> {
        vec![&self.top, &self.top_file, &self.base, &self.base_file]
    }
}

#[test]
fn a_format_takes_metadata_permissions_on_its_file() {
    let c = chain();
    let (p, s) = c.top.child_edge(Role::File).unwrap().perms();
    assert_eq!(p, Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE);
    assert_eq!(s, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED);
    // The backing child is only read, and anyone may write it as far as the top cares.
    let (p, _) = c.top.child_edge(Role::Backing).unwrap().perms();
    assert_eq!(p, Perm::NONE, "nobody reads through top yet");
    let u = user("disk");
    let m = mutation();
    let mut tx = Transaction::new(&m);
    let _e = tx
        .attach_user(
            &u,
            &c.top,
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
        .unwrap();
    tx.commit().unwrap();
    let (p, _) = c.top.child_edge(Role::Backing).unwrap().perms();
    assert_eq!(p, Perm::CONSISTENT_READ);
    assert_eq!(
        c.base_file.cumulative_perms().0,
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
    );
}

#[test]
fn a_permission_conflict_names_both_users_and_changes_nothing() {
    let n = leaf("disk");
    let a = user("a");
    let b = user("b");
    let m = mutation();
    let mut tx = Transaction::new(&m);
    // A user owns its edge: it stays attached while the edge lives.
    let _ea = tx
        .attach_user(
            &a,
            &n,
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ,
        )
        .unwrap();
    tx.commit().unwrap();
    let before = shape(&[&n]);
    let mut tx = Transaction::new(&m);
    let _eb = tx
        .attach_user(&b, &n, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
        .unwrap();
    let e = tx.commit().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionConflict);
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("Permission conflict on node '{}'", n.name())),
        "{msg}"
    );
    assert!(msg.contains("permissions 'write'"), "{msg}");
    assert!(
        msg.contains("block device 'b'") && msg.contains("block device 'a'"),
        "{msg}"
    );
    assert_eq!(shape(&[&n]), before);
}

#[test]
fn freezing_a_chain_checks_as_qemu_and_is_all_or_nothing() {
    // over -> job filter -> top -> base: the links are checked for an earlier freeze first,
    // then for a node whose links may never be frozen; a refusal freezes nothing.
    let c = chain();
    let jf = Node::new(Some(&uniq("jf")), Box::new(JobFilter), false).unwrap();
    let over = format("over");
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.attach_child(&jf, &c.top, Role::Filtered).unwrap();
    tx.set_backing(&over, Some(&jf)).unwrap();
    tx.commit().unwrap();
    let into_jf = over.child_edge(Role::Backing).unwrap();
    let into_top = jf.child_edge(Role::Filtered).unwrap();
    let into_base = c.top.child_edge(Role::Backing).unwrap();
    let edges = [
        Arc::clone(&into_jf),
        Arc::clone(&into_top),
        Arc::clone(&into_base),
    ];
    let frozen = || edges.iter().map(|e| e.is_frozen()).collect::<Vec<_>>();

    let mut tx = Transaction::new(&m);
    let e = tx.freeze_chain(&edges).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Frozen);
    assert_eq!(
        e.to_string(),
        format!("Cannot freeze 'backing' link to '{}'", jf.name())
    );
    drop(tx);
    assert_eq!(frozen(), [false, false, false]);

    // Below the job filter anything may be frozen, once.
    let mut tx = Transaction::new(&m);
    tx.freeze_chain(&edges[1..]).unwrap();
    tx.commit().unwrap();
    assert_eq!(frozen(), [false, true, true]);
    let mut tx = Transaction::new(&m);
    let e = tx.freeze_chain(&edges).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Cannot change 'file' link from '{}' to '{}'",
            jf.name(),
            c.top.name()
        ),
        "an earlier freeze is found before the link into the job filter"
    );
    let e = tx.freeze(&into_jf).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Cannot freeze 'backing' link to '{}'", jf.name())
    );
    drop(tx);
    assert_eq!(frozen(), [false, true, true]);
}

#[test]
fn frozen_edges_refuse_change_with_qemus_words() {
    let c = chain();
    let other = format("other");
    let m = mutation();
    let edge = c.top.child_edge(Role::Backing).unwrap();
    let mut tx = Transaction::new(&m);
    tx.set_frozen(&edge, true);
    tx.commit().unwrap();
    let before = shape(&c.all());
    let mut tx = Transaction::new(&m);
    let e = tx.set_backing(&c.top, Some(&other)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Frozen);
    assert_eq!(
        e.to_string(),
        format!(
            "Cannot change 'backing' link from '{}' to '{}'",
            c.top.name(),
            c.base.name()
        )
    );
    let e = tx.set_backing(&c.top, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Frozen);
    drop(tx);
    assert_eq!(shape(&c.all()), before);
    let mut tx = Transaction::new(&m);
    tx.set_frozen(&edge, false);
    tx.set_backing(&c.top, Some(&other)).unwrap();
    tx.commit().unwrap();
    assert!(Arc::ptr_eq(&c.top.backing().unwrap(), &other));
}

#[test]
fn cycles_are_refused() {
    let c = chain();
    let before = shape(&c.all());
    let m = mutation();
    let mut tx = Transaction::new(&m);
    let e = tx.set_backing(&c.base, Some(&c.top)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("would create a cycle"), "{e}");
    let e = tx.set_backing(&c.top, Some(&c.top)).unwrap_err();
    assert!(e.to_string().contains("would create a cycle"));
    drop(tx);
    assert_eq!(shape(&c.all()), before);
}

#[test]
fn node_names_are_checked_and_unique() {
    let name = uniq("dup");
    // The first holder of the name, in a graph: a file child below it and a user above it.
    let a = Node::new(Some(&name), Box::new(Format), false).unwrap();
    let a_file = leaf("dupf");
    let u = user("dup");
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.attach_child(&a, &a_file, Role::File).unwrap();
    let ea = tx
        .attach_user(&u, &a, Perm::CONSISTENT_READ, Perm::ALL)
        .unwrap();
    tx.commit().unwrap();
    let before = shape(&[&a, &a_file]);
    let e = Node::new(Some(&name), Box::new(Leaf { len: 1 }), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(
        e.to_string(),
        format!("Duplicate nodes with node-name='{name}'")
    );
    // The refused node took nothing: the name still finds the first node, which is the only
    // node of that name, and the graph around it is as it was.
    let found = graph::find_node(&name).expect("the name still finds its node");
    assert!(Arc::ptr_eq(&found, &a), "the name finds the first node");
    drop(found);
    let named: Vec<Arc<Node>> = graph::all_nodes()
        .into_iter()
        .filter(|n| n.name() == name)
        .collect();
    assert_eq!(named.len(), 1);
    assert!(Arc::ptr_eq(&named[0], &a));
    drop(named);
    assert_eq!(shape(&[&a, &a_file]), before);
    let mut tx = Transaction::new(&m);
    tx.detach(&ea).unwrap();
    tx.commit().unwrap();
    drop((ea, u, a_file));
    for bad in ["1abc", "", "a b", "#block1", &"x".repeat(40)] {
        assert!(
            Node::new(Some(bad), Box::new(Leaf { len: 1 }), false).is_err(),
            "{bad}"
        );
    }
    drop(a);
    // The name is free again once the node is gone.
    Node::new(Some(&name), Box::new(Leaf { len: 1 }), false).unwrap();
    let auto = Node::new(None, Box::new(Leaf { len: 1 }), false).unwrap();
    assert!(auto.name().starts_with("#block"));
}

#[test]
fn nodes_live_while_referenced_and_go_with_the_last_reference() {
    let c = chain();
    let base_name = c.base.name().to_string();
    let weak = Arc::downgrade(&c.base);
    let Chain {
        top,
        top_file,
        base,
        base_file,
    } = c;
    drop(base);
    assert!(
        weak.upgrade().is_some(),
        "top's backing edge keeps base alive"
    );
    assert!(graph::find_node(&base_name).is_some());
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.set_backing(&top, None).unwrap();
    tx.commit().unwrap();
    assert!(
        weak.upgrade().is_none(),
        "the last reference went with the edge"
    );
    assert!(graph::find_node(&base_name).is_none());
    // base_file was held by base's edge and by our Arc only.
    assert_eq!(Arc::strong_count(&base_file), 1);
    assert!(base_file.parents().is_empty());
    drop((top, top_file));
}

#[test]
fn reopen_read_only_and_back() {
    let n = leaf("ro");
    let u = user("r");
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.set_read_only(&n, true).unwrap();
    tx.commit().unwrap();
    assert!(n.is_read_only());
    // A writer cannot attach to a read-only node.
    let mut tx = Transaction::new(&m);
    let _e = tx
        .attach_user(&u, &n, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
        .unwrap();
    let e = tx.commit().unwrap_err();
    assert!(e.to_string().contains("is read-only"), "{e}");
    assert!(n.parents().is_empty());
    // A reader can; then reopening read-write works.
    let mut tx = Transaction::new(&m);
    let _e = tx
        .attach_user(&u, &n, Perm::CONSISTENT_READ, Perm::ALL)
        .unwrap();
    tx.set_read_only(&n, false).unwrap();
    tx.commit().unwrap();
    assert!(!n.is_read_only());
}

#[test]
fn filters_are_skipped_when_looking_for_images() {
    let c = chain();
    let f1 = filter_over("cor", &c.base);
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.insert_filter(&f1, &c.base).unwrap();
    tx.commit().unwrap();
    assert!(Arc::ptr_eq(&c.top.backing().unwrap(), &f1));
    assert!(Arc::ptr_eq(&c.top.backing_chain_next().unwrap(), &c.base));
    assert!(Arc::ptr_eq(&f1.skip_filters(), &c.base));
    let mut tx = Transaction::new(&m);
    tx.drop_filter(&f1).unwrap();
    tx.commit().unwrap();
    assert!(Arc::ptr_eq(&c.top.backing().unwrap(), &c.base));
    assert!(f1.children().is_empty());
}

// ---- rollback of every step: do the step, then fail the step after it ----

/// Makes the next step fail: changing a frozen edge.
fn failing_step(tx: &mut Transaction<'_>, frozen: &Chain) {
    let e = frozen.top.child_edge(Role::Backing).unwrap();
    e_freeze(&e);
    assert!(tx.set_backing(&frozen.top, None).is_err());
}

fn e_freeze(e: &Arc<graph::Edge>) {
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.set_frozen(e, true);
    tx.commit().unwrap();
}

fn check_rollback(name: &str, step: impl FnOnce(&mut Transaction<'_>, &Chain, &Arc<Node>)) {
    let c = chain();
    let spare = format("spare");
    let frozen = chain();
    let before = shape(&[&c.top, &c.top_file, &c.base, &c.base_file, &spare]);
    {
        let m = mutation();
        // As the engine's changes do: the nodes whose children change are drained for the
        // whole transaction, its rollback included.
        let drained =
            graph::drained_begin(&[Arc::clone(&c.top), Arc::clone(&c.base), Arc::clone(&spare)]);
        let mut tx = Transaction::new(&m);
        step(&mut tx, &c, &spare);
        failing_step(&mut tx, &frozen);
        drop(tx); // not committed: everything is undone
        drained.end();
    }
    let after = shape(&[&c.top, &c.top_file, &c.base, &c.base_file, &spare]);
    assert_eq!(after, before, "rollback of {name}");
}

#[test]
fn rollback_attach_child() {
    check_rollback("attach_child", |tx, c, spare| {
        tx.attach_child(spare, &c.base, Role::Backing).unwrap();
        assert_eq!(c.base.parents().len(), 2);
    });
}

#[test]
fn rollback_attach_user() {
    check_rollback("attach_user", |tx, c, _| {
        let u = user("x");
        tx.attach_user(&u, &c.top, Perm::CONSISTENT_READ, Perm::ALL)
            .unwrap();
        assert_eq!(c.top.parents().len(), 1);
        std::mem::forget(u);
    });
}

#[test]
fn rollback_detach() {
    check_rollback("detach", |tx, c, _| {
        let e = c.top.child_edge(Role::File).unwrap();
        tx.detach(&e).unwrap();
        assert!(c.top.file().is_none());
    });
}

#[test]
fn rollback_set_child_and_set_backing() {
    check_rollback("set_backing", |tx, c, spare| {
        tx.set_backing(&c.top, Some(spare)).unwrap();
        assert!(Arc::ptr_eq(&c.top.backing().unwrap(), spare));
    });
    check_rollback("set_backing(None)", |tx, c, _| {
        tx.set_backing(&c.top, None).unwrap();
        assert!(c.top.backing().is_none());
    });
    check_rollback("set_backing(new edge)", |tx, c, spare| {
        tx.set_backing(&c.base, Some(spare)).unwrap();
    });
}

#[test]
fn rollback_replace_node() {
    check_rollback("replace_node", |tx, c, spare| {
        tx.replace_node(&c.base, spare, None).unwrap();
        assert!(Arc::ptr_eq(&c.top.backing().unwrap(), spare));
    });
}

#[test]
fn rollback_insert_and_drop_filter() {
    check_rollback("insert_filter", |tx, c, _| {
        let f = Node::new(Some(&uniq("f")), Box::new(Filter), false).unwrap();
        tx.attach_child(&f, &c.base, Role::Filtered).unwrap();
        tx.insert_filter(&f, &c.base).unwrap();
        assert!(Arc::ptr_eq(&c.top.backing().unwrap(), &f));
    });
    // A filter that is already in place, dropped then restored.
    let c = chain();
    let f = filter_over("f", &c.base);
    {
        let m = mutation();
        let mut tx = Transaction::new(&m);
        tx.insert_filter(&f, &c.base).unwrap();
        tx.commit().unwrap();
    }
    let before = shape(&[&c.top, &c.base, &f]);
    let frozen = chain();
    {
        let m = mutation();
        let mut tx = Transaction::new(&m);
        tx.drop_filter(&f).unwrap();
        assert!(Arc::ptr_eq(&c.top.backing().unwrap(), &c.base));
        failing_step(&mut tx, &frozen);
    }
    assert_eq!(shape(&[&c.top, &c.base, &f]), before);
}

#[test]
fn rollback_set_frozen_and_read_only() {
    check_rollback("set_frozen", |tx, c, _| {
        tx.set_frozen(&c.top.child_edge(Role::File).unwrap(), true);
    });
    check_rollback("set_read_only", |tx, c, _| {
        tx.set_read_only(&c.base_file, true).unwrap();
        assert!(c.base_file.is_read_only());
    });
}

#[test]
fn a_failing_permission_refresh_undoes_every_step() {
    let c = chain();
    let spare = format("spare");
    let m = mutation();
    let before = shape(&[&c.top, &c.top_file, &c.base, &c.base_file, &spare]);
    let mut tx = Transaction::new(&m);
    tx.set_backing(&c.top, Some(&spare)).unwrap();
    tx.set_read_only(&spare, true).unwrap();
    // top (a format) does not share write on its file: a user writing it conflicts.
    let hog = user("hog");
    let _e = tx
        .attach_user(&hog, &c.top_file, Perm::WRITE, Perm::ALL)
        .unwrap();
    let e = tx.commit().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionConflict);
    assert!(e.to_string().contains("unshared by node"), "{e}");
    assert_eq!(
        shape(&[&c.top, &c.top_file, &c.base, &c.base_file, &spare]),
        before
    );
}

// ---- update_perms: a user's permissions changed as a step ----

/// A committed user edge on `n`.
fn attached(u: &Arc<dyn User>, n: &Arc<Node>, perm: Perm, shared: Perm) -> Arc<graph::Edge> {
    let m = mutation();
    let mut tx = Transaction::new(&m);
    let e = tx.attach_user(u, n, perm, shared).unwrap();
    tx.commit().unwrap();
    e
}

const CR: Perm = Perm::CONSISTENT_READ;
const W: Perm = Perm::WRITE;
const WU: Perm = Perm::WRITE_UNCHANGED;

#[test]
fn update_perms_changes_what_a_user_takes_at_commit() {
    let c = chain();
    let u = user("upd");
    let e = attached(&u, &c.top, CR, Perm::ALL);
    assert_eq!(c.top.cumulative_perms(), (CR, Perm::ALL));
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.update_perms(&e, CR | W, CR | WU).unwrap();
    assert_eq!(e.perms(), (CR | W, CR | WU), "the step applies at once");
    tx.commit().unwrap();
    assert_eq!(e.perms(), (CR | W, CR | WU));
    assert_eq!(c.top.cumulative_perms(), (CR | W, CR | WU));
    // The change reaches below, as any permission refresh does: top reads its backing now.
    assert_eq!(c.top.child_edge(Role::Backing).unwrap().perms().0, CR);
    // And it binds: a second writer is refused, since the first no longer shares write.
    let v = user("upd2");
    let mut tx = Transaction::new(&m);
    let _ev = tx.attach_user(&v, &c.top, CR | W, Perm::ALL).unwrap();
    assert_eq!(
        tx.commit().unwrap_err().kind(),
        ErrorKind::PermissionConflict
    );
}

#[test]
fn rollback_update_perms() {
    let c = chain();
    let spare = format("spare");
    let u = user("upd");
    let e = attached(&u, &c.top, CR | W, CR | WU);
    let frozen = chain();
    let nodes = [&c.top, &c.top_file, &c.base, &c.base_file, &spare];
    let before = shape(&nodes);
    {
        let m = mutation();
        let mut tx = Transaction::new(&m);
        tx.update_perms(&e, CR, Perm::ALL).unwrap();
        assert_eq!(e.perms(), (CR, Perm::ALL));
        failing_step(&mut tx, &frozen);
    }
    assert_eq!(
        e.perms(),
        (CR | W, CR | WU),
        "the edge's permissions are back"
    );
    assert_eq!(shape(&nodes), before, "rollback of update_perms");
    // Nothing of the undone change is left to apply later.
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.refresh_perms();
    tx.commit().unwrap();
    assert_eq!(shape(&nodes), before);
}

#[test]
fn update_perms_conflicts_name_both_users_and_change_nothing() {
    let n = leaf("upc");
    let a = user("a");
    let b = user("b");
    let ea = attached(&a, &n, CR, Perm::ALL);
    let eb = attached(&b, &n, CR, CR | WU);
    let before = shape(&[&n]);
    let perms = (ea.perms(), eb.perms(), n.cumulative_perms());
    let m = mutation();
    // a wants to write, which b does not share.
    let mut tx = Transaction::new(&m);
    tx.update_perms(&ea, CR | W, Perm::ALL).unwrap();
    let e = tx.commit().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionConflict);
    let node = n.name();
    assert_eq!(
        e.to_string(),
        format!(
            "Permission conflict on node '{node}': permissions 'write' are both required by \
             block device 'a' (uses node '{node}' as 'root' child) and unshared by block \
             device 'b' (uses node '{node}' as 'root' child)."
        )
    );
    assert_eq!((ea.perms(), eb.perms(), n.cumulative_perms()), perms);
    assert_eq!(shape(&[&n]), before);
    // b stops sharing consistent reads, which a takes.
    let mut tx = Transaction::new(&m);
    tx.update_perms(&eb, CR, WU).unwrap();
    let e = tx.commit().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionConflict);
    assert_eq!(
        e.to_string(),
        format!(
            "Permission conflict on node '{node}': permissions 'consistent read' are both \
             required by block device 'a' (uses node '{node}' as 'root' child) and unshared by \
             block device 'b' (uses node '{node}' as 'root' child)."
        )
    );
    assert_eq!((ea.perms(), eb.perms(), n.cumulative_perms()), perms);
    assert_eq!(shape(&[&n]), before);
    // A read-only node refuses a writer as well.
    let r = leaf("upr");
    let mut tx = Transaction::new(&m);
    tx.set_read_only(&r, true).unwrap();
    tx.commit().unwrap();
    let c = user("c");
    let ec = attached(&c, &r, CR, Perm::ALL);
    let before = shape(&[&r]);
    let mut tx = Transaction::new(&m);
    tx.update_perms(&ec, CR | W, Perm::ALL).unwrap();
    let e = tx.commit().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionConflict);
    assert_eq!(
        e.to_string(),
        format!("Block node '{}' is read-only", r.name())
    );
    assert_eq!(ec.perms(), (CR, Perm::ALL));
    assert_eq!(shape(&[&r]), before);
}

#[test]
fn update_perms_refuses_a_nodes_edge() {
    // A node's edges take what its driver derives at every refresh: not settable.
    let c = chain();
    let before = shape(&c.all());
    let e = c.top.child_edge(Role::File).unwrap();
    let m = mutation();
    let mut tx = Transaction::new(&m);
    let err = tx.update_perms(&e, Perm::NONE, Perm::ALL).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        err.to_string(),
        format!(
            "Cannot set the permissions of 'file' link from '{}' to '{}': the parent's driver \
             derives them",
            c.top.name(),
            c.top_file.name()
        )
    );
    assert_eq!(shape(&c.all()), before);
    tx.commit().unwrap();
    assert_eq!(shape(&c.all()), before);
}

// ---- reopen read-write, undone ----

/// A leaf that records the reopen calls its node gets.
struct RecLeaf(Arc<std::sync::Mutex<Vec<&'static str>>>);

impl Driver for RecLeaf {
    fn driver_name(&self) -> &'static str {
        "rec-leaf"
    }
    fn length(&self, _: &Node) -> u64 {
        1 << 20
    }
    fn reopen_prepare(&self, read_only: bool) -> graph::Result<()> {
        self.0.lock().unwrap().push(if read_only {
            "prepare ro"
        } else {
            "prepare rw"
        });
        Ok(())
    }
    fn reopen_commit(&self) {
        self.0.lock().unwrap().push("commit");
    }
    fn reopen_abort(&self) {
        self.0.lock().unwrap().push("abort");
    }
    plain_io!();
}

#[test]
fn rollback_reopen_read_write() {
    // A read-only format over a read-only file, read by a user; both are reopened read-write,
    // then a later step fails.
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let top = Node::new(Some(&uniq("rtop")), Box::new(Format), true).unwrap();
    let file = Node::new(
        Some(&uniq("rfile")),
        Box::new(RecLeaf(Arc::clone(&log))),
        true,
    )
    .unwrap();
    let u = user("reader");
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.attach_child(&top, &file, Role::File).unwrap();
    let _e = tx.attach_user(&u, &top, CR, Perm::ALL).unwrap();
    tx.commit().unwrap();
    let (p, _) = top.child_edge(Role::File).unwrap().perms();
    assert_eq!(p, CR, "a read-only format only reads its file");
    let frozen = chain();
    let before = shape(&[&top, &file]);
    {
        let mut tx = Transaction::new(&m);
        tx.set_read_only(&file, false).unwrap();
        tx.set_read_only(&top, false).unwrap();
        assert!(!file.is_read_only() && !top.is_read_only());
        failing_step(&mut tx, &frozen);
    }
    assert!(file.is_read_only() && top.is_read_only());
    assert_eq!(
        shape(&[&top, &file]),
        before,
        "rollback of reopen read-write"
    );
    assert_eq!(
        *log.lock().unwrap(),
        ["prepare rw", "abort"],
        "the prepared reopen is aborted, never committed"
    );
    // The same reopen committed: the format now writes its file.
    let mut tx = Transaction::new(&m);
    tx.set_read_only(&file, false).unwrap();
    tx.set_read_only(&top, false).unwrap();
    tx.commit().unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        ["prepare rw", "abort", "prepare rw", "commit"]
    );
    assert!(file.cumulative_perms().0.contains(W));
}

// ---- frozen edges refuse replace_node, insert_filter and drop_filter ----

/// Freezes `e` in a transaction of its own.
fn frozen_edge(e: &Arc<graph::Edge>) {
    e_freeze(e);
    assert!(e.is_frozen());
}

/// Makes `child` the backing child of `parent` and freezes that edge (each committed on its
/// own).
fn attach_frozen_backing(m: &Mutation, parent: &Arc<Node>, child: &Arc<Node>) {
    let mut tx = Transaction::new(m);
    tx.attach_child(parent, child, Role::Backing).unwrap();
    tx.commit().unwrap();
    frozen_edge(&parent.child_edge(Role::Backing).unwrap());
}

/// Runs `step` in a transaction of its own: it is refused with `kind` and the text `msg`, and
/// `nodes` are as they were, right away and once the transaction is dropped (or, if `commit`,
/// committed: nothing of the step is left to commit either).
fn assert_refused_changes_nothing(
    m: &Mutation,
    nodes: &[&Arc<Node>],
    step: impl FnOnce(&mut Transaction<'_>) -> graph::Result<()>,
    kind: ErrorKind,
    msg: String,
    commit: bool,
) {
    let before = shape(nodes);
    let mut tx = Transaction::new(m);
    let e = step(&mut tx).unwrap_err();
    assert_eq!(e.kind(), kind);
    assert_eq!(e.to_string(), msg);
    assert_eq!(shape(nodes), before, "the failed step left nothing");
    if commit {
        tx.commit().unwrap();
    } else {
        drop(tx);
    }
    assert_eq!(shape(nodes), before);
}

#[test]
fn replace_node_refuses_a_frozen_edge_and_changes_nothing() {
    // base has two parents: top (free) and other (frozen), in that order, so that a step
    // that changed edges one at a time would have moved top's before meeting other's.
    let c = chain();
    let other = format("other");
    let spare = format("spare");
    let m = mutation();
    attach_frozen_backing(&m, &other, &c.base);
    let nodes = [&c.top, &c.top_file, &c.base, &c.base_file, &other, &spare];
    assert_refused_changes_nothing(
        &m,
        &nodes,
        |tx| tx.replace_node(&c.base, &spare, None),
        ErrorKind::Frozen,
        format!("Cannot change 'backing' link to '{}'", c.base.name()),
        false,
    );
}

#[test]
fn replace_node_refused_midway_changes_nothing() {
    // base's parents: top, then x; new sits above x, so pointing x's edge at new would make
    // a cycle. top's edge comes first and would be changed before the refusal is met.
    let c = chain();
    let x = format("x");
    let new = format("new");
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.attach_child(&x, &c.base, Role::Backing).unwrap();
    tx.attach_child(&new, &x, Role::Backing).unwrap();
    tx.commit().unwrap();
    let nodes = [&c.top, &c.base, &x, &new];
    let cycle = format!(
        "Making '{}' a backing child of '{}' would create a cycle",
        new.name(),
        x.name()
    );
    // Nothing of it is left to commit either.
    assert_refused_changes_nothing(
        &m,
        &nodes,
        |tx| tx.replace_node(&c.base, &new, None),
        ErrorKind::InvalidArgument,
        cycle,
        true,
    );
}

#[test]
fn insert_filter_refuses_a_frozen_edge_and_changes_nothing() {
    let c = chain();
    let f = filter_over("f", &c.base);
    let other = format("other");
    let m = mutation();
    attach_frozen_backing(&m, &other, &c.base);
    let nodes = [&c.top, &c.base, &c.base_file, &f, &other];
    assert_refused_changes_nothing(
        &m,
        &nodes,
        |tx| tx.insert_filter(&f, &c.base),
        ErrorKind::Frozen,
        format!("Cannot change 'backing' link to '{}'", c.base.name()),
        false,
    );
    assert!(Arc::ptr_eq(&c.top.backing().unwrap(), &c.base));
}

#[test]
fn drop_filter_refuses_a_frozen_edge_and_changes_nothing() {
    // top -> f -> base, and other -> f: a frozen link into the filter, then the filter's own
    // link frozen instead.
    let c = chain();
    let f = filter_over("f", &c.base);
    let other = format("other");
    let m = mutation();
    let mut tx = Transaction::new(&m);
    tx.insert_filter(&f, &c.base).unwrap();
    tx.attach_child(&other, &f, Role::Backing).unwrap();
    tx.commit().unwrap();
    assert!(Arc::ptr_eq(&c.top.backing().unwrap(), &f));
    let into_f = other.child_edge(Role::Backing).unwrap();
    let own = f.child_edge(Role::Filtered).unwrap();
    let nodes = [&c.top, &c.base, &c.base_file, &f, &other];

    frozen_edge(&into_f);
    assert_refused_changes_nothing(
        &m,
        &nodes,
        |tx| tx.drop_filter(&f),
        ErrorKind::Frozen,
        format!("Cannot change 'backing' link to '{}'", f.name()),
        false,
    );

    let mut tx = Transaction::new(&m);
    tx.set_frozen(&into_f, false);
    tx.set_frozen(&own, true);
    tx.commit().unwrap();
    let own_frozen = format!(
        "Cannot change 'file' link from '{}' to '{}'",
        f.name(),
        c.base.name()
    );
    assert_refused_changes_nothing(
        &m,
        &nodes,
        |tx| tx.drop_filter(&f),
        ErrorKind::Frozen,
        own_frozen,
        false,
    );
    assert!(Arc::ptr_eq(&c.top.backing().unwrap(), &f));
    assert!(Arc::ptr_eq(&other.backing().unwrap(), &f));
}

/// The write side's rule: the children of a node that something reaches change only inside a
/// drained section; outside one every such step is refused before it changes anything, and a
/// node nothing reaches yet (one being opened) is edited freely.
#[test]
fn reachable_nodes_change_only_while_drained() {
    let c = chain();
    let u = user("guest");
    // The user keeps its edge, as a backend does.
    let _edge = {
        let m = mutation();
        let mut tx = Transaction::new(&m);
        let e = tx
            .attach_user(&u, &c.top, Perm::CONSISTENT_READ, Perm::ALL)
            .unwrap();
        tx.commit().unwrap();
        e
    };
    let (spare, other) = (leaf("spare"), format("other"));
    let before = shape(&[&c.top, &c.top_file, &c.base, &c.base_file, &spare, &other]);
    let busy = |r: graph::Result<()>, node: &Arc<Node>| {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "Cannot change the children of '{}' outside a drained section",
                node.name()
            )
        );
    };
    {
        let m = mutation();
        let mut tx = Transaction::new(&m);
        busy(
            tx.attach_child(&c.base, &spare, Role::Backing).map(drop),
            &c.base,
        );
        busy(tx.detach(&c.base.child_edge(Role::File).unwrap()), &c.base);
        busy(tx.set_backing(&c.top, Some(&other)), &c.top);
        // The user's own edge: the node below it must be drained.
        busy(tx.replace_node(&c.top, &other, None), &c.top);
        // A node nothing reaches is free to build.
        tx.attach_child(&other, &spare, Role::File).unwrap();
        tx.commit().unwrap();
    }
    let after = shape(&[&c.top, &c.top_file, &c.base, &c.base_file]);
    assert_eq!(after[..], before[..4], "a refused step changed the graph");
    // Drained, the same steps go through.
    let m = mutation();
    let d = graph::drained_begin(std::slice::from_ref(&c.base));
    let mut tx = Transaction::new(&m);
    tx.set_backing(&c.base, Some(&other)).unwrap();
    tx.commit().unwrap();
    d.end();
    assert!(Arc::ptr_eq(&c.base.backing().unwrap(), &other));
    std::mem::forget(u);
}
