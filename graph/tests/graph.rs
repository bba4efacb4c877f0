//! The graph's rules: permission conflicts, frozen edges, cycles, names, reference counts,
//! reopen, and the rollback of every transaction step (each checked by failing the step
//! after it and comparing the graph with its state before).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use graph::{
    mutation, Driver, ErrorKind, LocalBoxFuture, Node, Perm, Role, Transaction, User, WriteFlags,
    ZeroFlags,
};
use iothreads::{BufResult, IoBuf};

/// A leaf that holds nothing (reads leave buffers as they are).
struct Leaf {
    len: u64,
}

/// A filter that passes everything to its filtered child.
struct Filter;

/// A format with a file and a backing child; it only matters for permissions here.
struct Format;

fn ready<T: 'static>(v: T) -> LocalBoxFuture<'static, T> {
    Box::pin(async move { v })
}

macro_rules! plain_io {
    () => {
        fn read<'a>(&'a self, _: &'a Node, _: u64, b: IoBuf) -> LocalBoxFuture<'a, BufResult<()>> {
            ready((Ok(()), b))
        }
        fn write<'a>(
            &'a self,
            _: &'a Node,
            _: u64,
            b: IoBuf,
            _: WriteFlags,
        ) -> LocalBoxFuture<'a, BufResult<()>> {
            ready((Ok(()), b))
        }
        fn write_zeroes<'a>(
            &'a self,
            _: &'a Node,
            _: u64,
            _: u64,
            _: ZeroFlags,
        ) -> LocalBoxFuture<'a, io::Result<()>> {
            ready(Ok(()))
        }
        fn discard<'a>(
            &'a self,
            _: &'a Node,
            _: u64,
            _: u64,
        ) -> LocalBoxFuture<'a, io::Result<()>> {
            ready(Ok(()))
        }
        fn flush<'a>(&'a self, _: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
            ready(Ok(()))
        }
    };
}

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

fn uniq(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{tag}{}", N.fetch_add(1, Ordering::Relaxed))
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
                .map(|e| format!("{}<-{}", e.name(), e.parent().describe()))
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
    let a = Node::new(Some(&name), Box::new(Leaf { len: 1 }), false).unwrap();
    let e = Node::new(Some(&name), Box::new(Leaf { len: 1 }), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(
        e.to_string(),
        format!("Duplicate nodes with node-name='{name}'")
    );
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
        let mut tx = Transaction::new(&m);
        step(&mut tx, &c, &spare);
        failing_step(&mut tx, &frozen);
        drop(tx); // not committed: everything is undone
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
