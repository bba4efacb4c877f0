//! Drain and the controller: drained backends hold requests in order, drains wait for what is
//! in flight, drains nest, late users are held too, and the controller runs one change at a
//! time while still answering queries.

mod common;
#[path = "common/drain_util.rs"]
mod drain_util;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::uniq;
use drain_util::{join_within, run_in_order, wait_until, LocalFut};
use engine::drivers::null::{self, NullOptions};
use engine::{Backend, BackendOptions, Engine, EngineOptions, IoBuf};
use graph::{Driver, LocalBoxFuture, Node, Role, WriteFlags, ZeroFlags};
use iothreads::BufResult;
use parking_lot::Mutex;

/// A leaf that records the offsets of requests in the order they arrive, optionally delaying
/// each on the ring's timer.
struct Recorder {
    log: Mutex<Vec<u64>>,
    completed: AtomicUsize,
    delay: Duration,
}

impl Recorder {
    fn node(delay: Duration) -> (Arc<Node>, Arc<Node>) {
        let n = Node::new(
            Some(&uniq("rec")),
            Box::new(Recorder {
                log: Mutex::new(Vec::new()),
                completed: AtomicUsize::new(0),
                delay,
            }),
            false,
        )
        .unwrap();
        (n.clone(), n)
    }

    fn log(node: &Node) -> Vec<u64> {
        node.driver_as::<Recorder>().unwrap().log.lock().clone()
    }

    async fn serve(&self, offset: u64) -> io::Result<()> {
        self.log.lock().push(offset);
        if !self.delay.is_zero() {
            iothreads::op::sleep(self.delay).await?;
        }
        self.completed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Driver for Recorder {
    fn driver_name(&self) -> &'static str {
        "recorder"
    }
    fn length(&self, _: &Node) -> u64 {
        1 << 30
    }
    fn read<'a>(&'a self, _: &'a Node, off: u64, b: IoBuf) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move { (self.serve(off).await, b) })
    }
    fn write<'a>(
        &'a self,
        _: &'a Node,
        off: u64,
        b: IoBuf,
        _: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move { (self.serve(off).await, b) })
    }
    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        off: u64,
        _: u64,
        _: ZeroFlags,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(self.serve(off))
    }
    fn discard<'a>(&'a self, _: &'a Node, off: u64, _: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(self.serve(off))
    }
    fn flush<'a>(&'a self, _: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

fn engine() -> Engine {
    Engine::new(EngineOptions {
        iothreads: 2,
        ..Default::default()
    })
    .unwrap()
}

/// Starts a change that drains `node` and holds the section until `release` is dropped or
/// sent. Returns when the section is quiesced.
fn hold_drained(
    e: &Engine,
    node: &Arc<Node>,
) -> (
    iothreads::JoinSender<()>,
    iothreads::JoinHandle<graph::Result<()>>,
) {
    let (tx, rx) = iothreads::join::channel::<()>();
    let (qtx, qrx) = iothreads::join::channel::<()>();
    let n = Arc::clone(node);
    let h = e.controller().change(move |ctx| async move {
        let d = ctx.drain(&[n]).await;
        qtx.complete(());
        let _ = rx.await;
        d.end();
        Ok(())
    });
    qrx.join().unwrap();
    (tx, h)
}

#[test]
fn drained_backend_holds_new_requests_in_order() {
    let e = engine();
    let (node, _keep) = Recorder::node(Duration::ZERO);
    let t = e.iothread(1).unwrap();
    let b = Backend::with_options(
        node.clone(),
        std::slice::from_ref(&t),
        BackendOptions::default(),
    )
    .unwrap();
    let (release, change) = hold_drained(&e, &node);
    assert!(b.is_drained());
    // Submit 64 requests from the IoThread, in order; none may reach the node yet.
    let done = Arc::new(AtomicUsize::new(0));
    let (b2, d2) = (b.clone(), done.clone());
    let submitted = t
        .spawn_with(move || async move {
            let mut hs = Vec::new();
            for i in 0..64u64 {
                let (b, d) = (b2.clone(), d2.clone());
                hs.push(iothreads::spawn_local(async move {
                    let (r, _) = if i % 2 == 0 {
                        b.read(i * 512, IoBuf::new(512)).await
                    } else {
                        b.write(i * 512, IoBuf::new(512)).await
                    };
                    r.unwrap();
                    d.fetch_add(1, Ordering::SeqCst);
                }));
            }
            hs
        })
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "requests ran during the drain"
    );
    assert!(Recorder::log(&node).is_empty());
    assert_eq!(b.held_total(), 64);
    release.complete(());
    change.join().unwrap().unwrap();
    t.block_on(move || async move {
        for h in submitted {
            h.await.unwrap();
        }
    })
    .unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 64, "none lost");
    let log = Recorder::log(&node);
    let want: Vec<u64> = (0..64).map(|i| i * 512).collect();
    assert_eq!(log, want, "held requests resume in submission order");
}

#[test]
fn a_drain_waits_for_requests_in_flight() {
    let e = engine();
    let (node, _keep) = Recorder::node(Duration::from_millis(100));
    let t = e.iothread(1).unwrap();
    let b = Backend::with_options(
        node.clone(),
        std::slice::from_ref(&t),
        BackendOptions::default(),
    )
    .unwrap();
    let finished = Arc::new(AtomicBool::new(false));
    let (b2, f2) = (b.clone(), finished.clone());
    let req = t.spawn_with(move || async move {
        let (r, _) = b2.read(0, IoBuf::new(512)).await;
        r.unwrap();
        f2.store(true, Ordering::SeqCst);
    });
    while Recorder::log(&node).is_empty() {
        std::thread::yield_now();
    }
    let n = node.clone();
    let seen = e
        .controller()
        .change_blocking(move |ctx| async move {
            let d = ctx.drain(std::slice::from_ref(&n)).await;
            // Quiesced: the driver has finished the request and nothing is in flight.
            let done = n
                .driver_as::<Recorder>()
                .unwrap()
                .completed
                .load(Ordering::SeqCst);
            let seen = (done, n.in_flight());
            d.end();
            Ok(seen)
        })
        .unwrap();
    assert_eq!(seen, (1, 0));
    req.join().unwrap();
    assert!(finished.load(Ordering::SeqCst));
}

#[test]
fn drains_nest_and_overlap() {
    let e = engine();
    let node = null::open(&uniq("n"), NullOptions::default()).unwrap();
    let t = e.iothread(0).unwrap();
    let b = Backend::with_options(
        node.clone(),
        std::slice::from_ref(&t),
        BackendOptions::default(),
    )
    .unwrap();
    let d1 = {
        let _m = graph::mutation();
        graph::drained_begin(std::slice::from_ref(&node))
    };
    let d2 = {
        let _m = graph::mutation();
        graph::drained_begin(std::slice::from_ref(&node))
    };
    d1.wait_blocking();
    assert_eq!(node.quiesce_count(), 2);
    d1.end();
    assert!(b.is_drained(), "one section still holds it");
    let b2 = b.clone();
    let req = t.spawn_with(move || async move { b2.read(0, IoBuf::new(512)).await.0 });
    std::thread::sleep(Duration::from_millis(20));
    assert!(!req.is_finished());
    d2.end();
    assert!(!b.is_drained());
    req.join().unwrap().unwrap();
    assert_eq!(node.quiesce_count(), 0);
}

#[test]
fn a_user_attached_during_a_drain_is_held_until_it_ends() {
    let e = engine();
    let node = null::open(&uniq("n"), NullOptions::default()).unwrap();
    let t = e.iothread(0).unwrap();
    let (release, change) = hold_drained(&e, &node);
    let late = Backend::with_options(
        node.clone(),
        std::slice::from_ref(&t),
        BackendOptions::default(),
    )
    .unwrap();
    assert!(late.is_drained());
    let l2 = late.clone();
    let req = t.spawn_with(move || async move { l2.read(0, IoBuf::new(512)).await.0 });
    std::thread::sleep(Duration::from_millis(20));
    assert!(!req.is_finished());
    release.complete(());
    change.join().unwrap().unwrap();
    req.join().unwrap().unwrap();
    assert!(!late.is_drained());
}

#[test]
fn a_job_backend_passes_a_drain() {
    let e = engine();
    let node = null::open(&uniq("n"), NullOptions::default()).unwrap();
    let t = e.iothread(0).unwrap();
    let opts = BackendOptions {
        no_holding: true,
        share_rw: true,
        ..Default::default()
    };
    let job = Backend::with_options(node.clone(), std::slice::from_ref(&t), opts).unwrap();
    let (release, change) = hold_drained(&e, &node);
    let j2 = job.clone();
    t.block_on(move || async move { j2.read(0, IoBuf::new(512)).await.0 })
        .unwrap()
        .unwrap();
    release.complete(());
    change.join().unwrap().unwrap();
}

#[test]
fn changes_run_one_at_a_time_while_queries_are_answered() {
    let e = engine();
    let node = null::open(&uniq("n"), NullOptions::default()).unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = iothreads::join::channel::<()>();
    let (o1, n1) = (order.clone(), node.clone());
    let first = e.controller().change(move |ctx| async move {
        o1.lock().push("first: begin");
        let d = ctx.drain(&[n1]).await;
        let _ = rx.await; // waits here, drained, for the test
        o1.lock().push("first: end");
        d.end();
        Ok(())
    });
    let o2 = order.clone();
    let second = e.controller().change(move |_ctx| async move {
        o2.lock().push("second");
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(30));
    // A query is answered while the first change waits, and sees the drain in place.
    let q = node.clone();
    let quiesce = e.controller().query(move || q.quiesce_count());
    assert_eq!(quiesce, 1);
    assert_eq!(
        *order.lock(),
        vec!["first: begin"],
        "the second change must not start yet"
    );
    tx.complete(());
    first.join().unwrap().unwrap();
    second.join().unwrap().unwrap();
    assert_eq!(*order.lock(), vec!["first: begin", "first: end", "second"]);
}

#[test]
fn engine_nodes_are_added_used_and_deleted() {
    use engine::{DriverSpec, NodeSpec};
    let e = engine();
    let name = uniq("disk");
    e.add_node(NodeSpec {
        node_name: Some(name.clone()),
        read_only: false,
        driver: DriverSpec::Null(NullOptions::default()),
    })
    .unwrap();
    let dup = e.add_node(NodeSpec {
        node_name: Some(name.clone()),
        read_only: false,
        driver: DriverSpec::Null(NullOptions::default()),
    });
    assert_eq!(
        dup.unwrap_err().to_string(),
        format!("Duplicate nodes with node-name='{name}'")
    );
    let b = e.backend(&name, &[], BackendOptions::default()).unwrap();
    let err = e.del_node(&name).unwrap_err();
    assert_eq!(err.to_string(), format!("Node {name} is in use"));
    // A filter goes in above the node and the backend's requests pass through it.
    let fname = uniq("dbg");
    let filter = e
        .insert_filter(
            &name,
            NodeSpec {
                node_name: Some(fname.clone()),
                read_only: false,
                driver: DriverSpec::Blkdebug {
                    image: engine::ChildSpec::Name(name.clone()),
                    opts: Default::default(),
                },
            },
        )
        .unwrap();
    assert!(Arc::ptr_eq(&b.root(), &filter));
    let (r, _) = b.read_blocking(0, IoBuf::new(512));
    r.unwrap();
    assert_eq!(filter.stats().rd_ops, 1);
    e.drop_filter(&fname).unwrap();
    assert_eq!(b.root().name(), name);
    drop(b);
    e.del_node(&name).unwrap();
    assert!(graph::find_node(&name).is_none());
    assert_eq!(
        e.del_node(&name).unwrap_err().to_string(),
        format!("Failed to find node with node-name='{name}'")
    );
}

/// Submitter `s`'s request `i` goes to offset `(s * PER + i) * 512`.
const PER: u64 = 48;

fn offset_of(s: u64, i: u64) -> u64 {
    (s * PER + i) * 512
}

/// A read for even `i`, a write for odd.
async fn request(b: &Backend, off: u64, i: u64) -> io::Result<()> {
    if i.is_multiple_of(2) {
        b.read(off, IoBuf::new(512)).await.0
    } else {
        b.write(off, IoBuf::new(512)).await.0
    }
}

/// Submits requests `is` of submitter `s` on IoThread `t`, in order (each enters, or joins the
/// held FIFO, in its first poll); `done` counts those that complete.
fn submit_on(
    t: &iothreads::IoThreadHandle,
    b: &Backend,
    s: u64,
    is: std::ops::Range<u64>,
    done: &Arc<AtomicUsize>,
) -> Vec<iothreads::JoinHandle<io::Result<()>>> {
    let (b, done) = (b.clone(), done.clone());
    t.spawn_with(move || async move {
        is.map(|i| {
            let (b, d) = (b.clone(), done.clone());
            iothreads::spawn_local(async move {
                let r = request(&b, offset_of(s, i), i).await;
                d.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect::<Vec<_>>()
    })
    .join()
    .unwrap()
}

/// Waits until `n` requests were held or have completed, and asserts none completed: all `n`
/// are held.
fn assert_all_held(b: &Backend, done: &AtomicUsize, n: u64) {
    wait_until("the requests to be held", || {
        (b.held_total() + done.load(Ordering::SeqCst) as u64 >= n).then_some(())
    });
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "requests completed during the drain"
    );
    assert_eq!(b.held_total(), n);
}

fn join_all(hs: Vec<iothreads::JoinHandle<io::Result<()>>>) {
    for h in hs {
        join_within(h, "a held request").unwrap();
    }
}

/// Three submitters while the backend is drained: IoThread 0 and IoThread 1 (the backend's
/// own, where requests enter right away) and a plain thread (whose requests hop through
/// `route()` to one of them, where they queue with that IoThread's own). None reaches the node
/// during the drain; after it none is lost or failed, and each submitter's requests reach the
/// node in the order it submitted them.
#[test]
fn held_requests_keep_each_submitters_order_across_iothreads_and_a_plain_thread() {
    let e = engine();
    let (node, _keep) = Recorder::node(Duration::ZERO);
    let threads = e.iothreads();
    assert_eq!(threads.len(), 2);
    let b = Backend::with_options(node.clone(), &threads, BackendOptions::default()).unwrap();
    let (release, change) = hold_drained(&e, &node);
    assert!(b.is_drained());
    let done = Arc::new(AtomicUsize::new(0));
    let on_iothreads: Vec<_> = threads
        .iter()
        .enumerate()
        .map(|(s, t)| submit_on(t, &b, s as u64, 0..PER, &done))
        .collect();
    let (b3, d3) = (b.clone(), done.clone());
    let plain = std::thread::spawn(move || {
        assert_eq!(iothreads::current_index(), None, "a plain thread");
        let futs: Vec<LocalFut<io::Result<()>>> = (0..PER)
            .map(|i| {
                let (b, d) = (b3.clone(), d3.clone());
                Box::pin(async move {
                    let r = request(&b, offset_of(2, i), i).await;
                    d.fetch_add(1, Ordering::SeqCst);
                    r
                }) as LocalFut<io::Result<()>>
            })
            .collect();
        run_in_order(futs)
    });
    assert_all_held(&b, &done, 3 * PER);
    assert!(
        Recorder::log(&node).is_empty(),
        "a request reached the node"
    );
    release.complete(());
    join_within(change, "the draining change").unwrap();
    for hs in on_iothreads {
        join_all(hs);
    }
    for r in plain.join().unwrap() {
        r.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst) as u64, 3 * PER, "none lost");
    let log = Recorder::log(&node);
    assert_eq!(
        log.len() as u64,
        3 * PER,
        "each request reached the node once"
    );
    for s in 0..3 {
        let got: Vec<u64> = log
            .iter()
            .map(|o| o / 512)
            .filter(|k| k / PER == s)
            .map(|k| k % PER)
            .collect();
        let want: Vec<u64> = (0..PER).collect();
        assert_eq!(got, want, "submitter {s}'s requests out of order");
    }
    assert!(!b.is_drained());
    assert_eq!(node.quiesce_count(), 0);
}

/// Two children A (file) and B (backing) under one parent node with a backend on top, drained
/// in two overlapping sections (A, then B) on the controller and ended in the given order. The
/// parent counts both sections, the backend holds until the last one ends, requests submitted
/// during the overlap and after the first end all complete (in order) only after the last
/// end, and every quiesce count returns to zero.
fn overlapping_drains_of_two_children(end_a_first: bool) {
    let e = engine();
    let t = e.iothread(1).unwrap();
    let (an, bn) = (uniq("a"), uniq("b"));
    let (parent, a, bnode) = e
        .controller()
        .change_blocking(move |ctx| async move {
            let a = null::open(&an, NullOptions::default())?;
            let b = null::open(&bn, NullOptions::default())?;
            let (p, _) = Recorder::node(Duration::ZERO);
            ctx.transaction(|tx| {
                tx.attach_child(&p, &a, Role::File)?;
                tx.attach_child(&p, &b, Role::Backing)?;
                Ok(())
            })?;
            Ok((p, a, b))
        })
        .unwrap();
    let b = Backend::with_options(
        parent.clone(),
        std::slice::from_ref(&t),
        BackendOptions::default(),
    )
    .unwrap();
    let (both_tx, both) = iothreads::join::channel::<()>();
    let (end1_tx, end1) = iothreads::join::channel::<()>();
    let (ended1_tx, ended1) = iothreads::join::channel::<()>();
    let (end2_tx, end2) = iothreads::join::channel::<()>();
    let (a2, b2) = (a.clone(), bnode.clone());
    let change = e.controller().change(move |ctx| async move {
        let da = ctx.drain(&[a2]).await;
        let db = ctx.drain(&[b2]).await;
        both_tx.complete(());
        let _ = end1.await;
        let (first, second) = if end_a_first { (da, db) } else { (db, da) };
        first.end();
        ended1_tx.complete(());
        let _ = end2.await;
        second.end();
        Ok(())
    });
    join_within(both, "both drains");
    let counts = || {
        (
            a.quiesce_count(),
            bnode.quiesce_count(),
            parent.quiesce_count(),
        )
    };
    assert_eq!(counts(), (1, 1, 2), "(A, B, parent)");
    assert!(b.is_drained());
    let done = Arc::new(AtomicUsize::new(0));
    let mut hs = submit_on(&t, &b, 0, 0..PER, &done);
    assert_all_held(&b, &done, PER);

    end1_tx.complete(());
    join_within(ended1, "the first drain's end");
    let want = if end_a_first { (0, 1, 1) } else { (1, 0, 1) };
    assert_eq!(counts(), want, "(A, B, parent) after the first end");
    assert!(b.is_drained(), "the other section still holds the backend");
    hs.extend(submit_on(&t, &b, 0, PER..2 * PER, &done));
    assert_all_held(&b, &done, 2 * PER);
    assert!(
        Recorder::log(&parent).is_empty(),
        "a request reached the parent"
    );

    end2_tx.complete(());
    join_within(change, "the draining change").unwrap();
    join_all(hs);
    assert_eq!(done.load(Ordering::SeqCst) as u64, 2 * PER, "none lost");
    let want: Vec<u64> = (0..2 * PER).map(|i| offset_of(0, i)).collect();
    assert_eq!(
        Recorder::log(&parent),
        want,
        "held requests resume in order"
    );
    assert_eq!(counts(), (0, 0, 0));
    assert!(!b.is_drained());
}

#[test]
fn overlapping_drains_of_two_children_end_a_then_b() {
    overlapping_drains_of_two_children(true);
}

#[test]
fn overlapping_drains_of_two_children_end_b_then_a() {
    overlapping_drains_of_two_children(false);
}

/// Draining the base of a three-node chain (null <- blkdebug <- blkdebug, a backend on the
/// top) raises the quiesce count of every node above it and holds the backend two levels up:
/// requests submitted to the backend during the drain (from its IoThread and from a plain
/// thread) reach no node of the chain until the drain ends, then all of them reach the base.
#[test]
fn draining_the_base_of_a_chain_holds_the_backend_two_levels_up() {
    use engine::{ChildSpec, DriverSpec, NodeSpec};
    let e = engine();
    let p = uniq("chain");
    let (bn, mn, tn) = (format!("{p}base"), format!("{p}mid"), format!("{p}top"));
    e.add_node(NodeSpec {
        node_name: Some(bn.clone()),
        read_only: false,
        driver: DriverSpec::Null(NullOptions::default()),
    })
    .unwrap();
    for (name, below) in [(&mn, &bn), (&tn, &mn)] {
        e.add_node(NodeSpec {
            node_name: Some(name.clone()),
            read_only: false,
            driver: DriverSpec::Blkdebug {
                image: ChildSpec::Name(below.clone()),
                opts: Default::default(),
            },
        })
        .unwrap();
    }
    let t = e.iothread(1).unwrap();
    let b = e
        .backend(&tn, std::slice::from_ref(&t), BackendOptions::default())
        .unwrap();
    let (base, mid, top) = (
        e.node(&bn).unwrap(),
        e.node(&mn).unwrap(),
        e.node(&tn).unwrap(),
    );
    let ops = || {
        (
            base.stats().wr_ops + base.stats().rd_ops,
            mid.stats().wr_ops + mid.stats().rd_ops,
            top.stats().wr_ops + top.stats().rd_ops,
        )
    };
    let (release, change) = hold_drained(&e, &base);
    assert_eq!(
        (
            base.quiesce_count(),
            mid.quiesce_count(),
            top.quiesce_count()
        ),
        (1, 1, 1)
    );
    assert!(b.is_drained(), "the backend two levels up is held");
    let done = Arc::new(AtomicUsize::new(0));
    let hs = submit_on(&t, &b, 0, 0..PER, &done);
    let (b3, d3) = (b.clone(), done.clone());
    let plain = std::thread::spawn(move || {
        let (r, _) = b3.write_blocking(offset_of(1, 0), IoBuf::new(512));
        d3.fetch_add(1, Ordering::SeqCst);
        r
    });
    assert_all_held(&b, &done, PER + 1);
    assert_eq!(ops(), (0, 0, 0), "a request reached the chain");
    assert_eq!(base.in_flight() + mid.in_flight() + top.in_flight(), 0);
    release.complete(());
    join_within(change, "the draining change").unwrap();
    join_all(hs);
    plain.join().unwrap().unwrap();
    assert_eq!(done.load(Ordering::SeqCst) as u64, PER + 1);
    assert_eq!(
        ops(),
        (PER + 1, PER + 1, PER + 1),
        "(base, mid, top) requests"
    );
    assert_eq!(
        (
            base.quiesce_count(),
            mid.quiesce_count(),
            top.quiesce_count()
        ),
        (0, 0, 0)
    );
    assert!(!b.is_drained());
}

/// What the graph looks like around the nodes whose names start with `prefix`: each node's
/// driver, read-only flag, length, quiesce count and permissions, its child edges (name, role,
/// child, permissions, frozen) and its parent edges (name, role, parent, permissions).
fn shape(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = graph::all_nodes()
        .into_iter()
        .filter(|n| n.name().starts_with(prefix))
        .map(|n| {
            let kids: Vec<String> = n
                .children()
                .iter()
                .map(|e| {
                    format!(
                        "{}:{:?}->{} {:?} frozen={}",
                        e.name(),
                        e.role(),
                        e.child().name(),
                        e.perms(),
                        e.is_frozen()
                    )
                })
                .collect();
            let mut parents: Vec<String> = n
                .parents()
                .iter()
                .map(|e| {
                    format!(
                        "{}:{:?}<-{} {:?}",
                        e.name(),
                        e.role(),
                        e.parent().describe(),
                        e.perms()
                    )
                })
                .collect();
            parents.sort();
            format!(
                "{} [{}] ro={} len={} quiesce={} perms={:?} kids={kids:?} parents={parents:?}",
                n.name(),
                n.driver_name(),
                n.is_read_only(),
                n.len(),
                n.quiesce_count(),
                n.cumulative_perms()
            )
        })
        .collect();
    v.sort();
    v
}

/// Refused engine-level changes leave the graph exactly as it was: deleting a node with a node
/// parent, deleting a node with a backend parent, adding a node under a name in use (directly,
/// or as an inline child of a new node), adding a node whose options are wrong after its
/// inline child was opened, inserting a filter under a name in use, dropping a node that is
/// no filter. The name in use still finds the original node, and the graph still works.
#[test]
fn refused_graph_changes_leave_the_graph_as_it_was() {
    use engine::{ChildSpec, DriverSpec, ErrorKind, NodeSpec};
    let e = engine();
    let p = uniq("bad");
    let (base, filt, fresh, child) = (
        format!("{p}base"),
        format!("{p}filter"),
        format!("{p}new"),
        format!("{p}child"),
    );
    let null = |name: &str| NodeSpec {
        node_name: Some(name.to_string()),
        read_only: false,
        driver: DriverSpec::Null(NullOptions::default()),
    };
    let blkdebug = |name: &str, image: ChildSpec| NodeSpec {
        node_name: Some(name.to_string()),
        read_only: false,
        driver: DriverSpec::Blkdebug {
            image,
            opts: Default::default(),
        },
    };
    let base_node = e.add_node(null(&base)).unwrap();
    e.add_node(blkdebug(&filt, ChildSpec::Name(base.clone())))
        .unwrap();
    let opts = BackendOptions {
        name: Some(format!("{p}dev")),
        ..Default::default()
    };
    let b = e.backend(&filt, &[], opts).unwrap();
    let before = shape(&p);
    assert_eq!(before.len(), 2, "{before:#?}");
    let check = |what: &str, r: engine::Result<()>, kind: ErrorKind, text: &str| {
        let err = r.expect_err(what);
        assert_eq!(err.kind(), kind, "{what}: {}", err.full_message());
        assert_eq!(err.to_string(), text, "{what}");
        assert_eq!(shape(&p), before, "{what} changed the graph");
    };

    check(
        "deleting a node with a node parent",
        e.del_node(&base),
        ErrorKind::Busy,
        &format!("Block device {base} is in use"),
    );
    check(
        "deleting a node with a backend parent",
        e.del_node(&filt),
        ErrorKind::Busy,
        &format!("Node {filt} is in use"),
    );
    check(
        "adding a node under a name in use",
        e.add_node(null(&base)).map(drop),
        ErrorKind::AlreadyExists,
        &format!("Duplicate nodes with node-name='{base}'"),
    );
    assert!(
        Arc::ptr_eq(&e.node(&base).unwrap(), &base_node),
        "the name still finds the original node"
    );
    check(
        "adding a node whose inline child's name is in use",
        e.add_node(blkdebug(&fresh, ChildSpec::Spec(Box::new(null(&base)))))
            .map(drop),
        ErrorKind::AlreadyExists,
        &format!("Duplicate nodes with node-name='{base}'"),
    );
    check(
        "adding a node whose bottom is not below it, after its inline child opened",
        e.add_node(NodeSpec {
            node_name: Some(fresh.clone()),
            read_only: false,
            driver: DriverSpec::CopyOnRead {
                file: ChildSpec::Spec(Box::new(null(&child))),
                bottom: Some(filt.clone()),
            },
        })
        .map(drop),
        ErrorKind::InvalidArgument,
        &format!("Bottom node '{filt}' is not a descendant of '{child}'"),
    );
    check(
        "inserting a filter under a name in use",
        e.insert_filter(&base, blkdebug(&filt, ChildSpec::Name(base.clone())))
            .map(drop),
        ErrorKind::AlreadyExists,
        &format!("Duplicate nodes with node-name='{filt}'"),
    );
    check(
        "dropping a node that is no filter",
        e.drop_filter(&base),
        ErrorKind::InvalidArgument,
        &format!("'{base}' is not a filter"),
    );
    assert!(graph::find_node(&fresh).is_none());
    assert!(graph::find_node(&child).is_none());
    assert!(Arc::ptr_eq(&e.node(&base).unwrap(), &base_node));
    // The graph still works: a write through the backend reaches the base.
    let (r, _) = b.write_blocking(0, IoBuf::new(512));
    r.unwrap();
    assert_eq!(base_node.stats().wr_ops, 1);
}

/// Where a close ran: the IoThread's index and the OS thread.
type CloseSite = Option<(Option<usize>, std::thread::ThreadId)>;

/// A leaf whose asynchronous close records where it ran.
struct Closing {
    closed_on: Arc<Mutex<CloseSite>>,
}

impl Driver for Closing {
    fn driver_name(&self) -> &'static str {
        "closing"
    }
    fn length(&self, _: &Node) -> u64 {
        4096
    }
    fn read<'a>(&'a self, _: &'a Node, _: u64, b: IoBuf) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move { (Ok(()), b) })
    }
    fn write<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        b: IoBuf,
        _: WriteFlags,
    ) -> LocalBoxFuture<'a, BufResult<()>> {
        Box::pin(async move { (Ok(()), b) })
    }
    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        _: u64,
        _: ZeroFlags,
    ) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn discard<'a>(&'a self, _: &'a Node, _: u64, _: u64) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn flush<'a>(&'a self, _: &'a Node) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn close<'a>(&'a self) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            // Real I/O is possible here: this runs on an IoThread.
            iothreads::op::nop().await?;
            *self.closed_on.lock() =
                Some((iothreads::current_index(), std::thread::current().id()));
            Ok(())
        })
    }
}

/// A node made by this engine, whether by a change on its controller (as blockdev-add makes
/// nodes) or on one of its IoThreads other than the controller's, is closed asynchronously,
/// once its last user goes, by this engine's controller on the controller's IoThread (by
/// index and by OS thread), not where it was made nor by another engine's controller (tests
/// run several engines at once).
#[test]
fn dropping_the_last_reference_closes_the_node_on_the_controller_iothread() {
    let e = engine();
    // A newer engine: nodes that fell back to the process-wide closer would go to its
    // controller, not to `e`'s.
    let newer = engine();
    let ctl = e.controller().io_thread().clone();
    let ctl_thread = ctl
        .block_on(|| async { std::thread::current().id() })
        .unwrap();
    let other = e.iothread(1).unwrap();
    assert_ne!(other.index(), ctl.index());
    for on_controller in [true, false] {
        let closed_on = Arc::new(Mutex::new(None));
        let (c2, name) = (closed_on.clone(), uniq("closing"));
        let make = move || Node::new(Some(&name), Box::new(Closing { closed_on: c2 }), false);
        let node = if on_controller {
            e.controller()
                .change_blocking(move |_ctx| async move { make() })
                .unwrap()
        } else {
            other
                .block_on(move || async move { make() })
                .unwrap()
                .unwrap()
        };
        let b =
            Backend::with_options(node.clone(), &e.iothreads(), BackendOptions::default()).unwrap();
        drop(node);
        assert!(
            closed_on.lock().is_none(),
            "the backend still holds the node"
        );
        drop(b);
        let (index, thread) = wait_until("the node to be closed", || *closed_on.lock());
        let made = if on_controller {
            "by a change"
        } else {
            "on IoThread 1"
        };
        assert_eq!(
            index,
            Some(ctl.index()),
            "a node made {made} was closed off this engine's controller IoThread"
        );
        assert_eq!(thread, ctl_thread, "a node made {made}");
    }
    drop(newer);
}

#[test]
fn engine_qcow2_chains_are_opened_written_and_closed_cleanly() {
    use engine::drivers::qcow2::create::CreateOptions;
    use engine::image::{self, Format};
    use engine::{BackingSpec, ChildSpec, DriverSpec, NodeSpec};
    let Some(_) = common::qemu_tool("qemu-img") else {
        return;
    };
    let base = common::Scratch::new("ebase");
    let top = common::Scratch::new("etop");
    let (bp, tp) = (base.0.clone(), top.0.clone());
    iothreads::block_on_current(Default::default(), async move {
        image::create(
            &bp,
            Format::Qcow2,
            &CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let bn = bp.file_name().unwrap().to_str().unwrap().to_string();
        let o = CreateOptions {
            size: 1 << 20,
            backing_file: Some(bn),
            ..Default::default()
        };
        image::create(&tp, Format::Qcow2, &o).await.unwrap();
    })
    .unwrap();
    let e = engine();
    let name = uniq("top");
    let spec = NodeSpec {
        node_name: Some(name.clone()),
        read_only: false,
        driver: DriverSpec::Qcow2 {
            file: ChildSpec::Spec(Box::new(NodeSpec {
                node_name: None,
                read_only: false,
                driver: DriverSpec::File(engine::drivers::file::FileOptions::new(&top.0)),
            })),
            backing: BackingSpec::Default,
            opts: Default::default(),
        },
    };
    let node = e.add_node(spec).unwrap();
    assert!(
        node.backing().is_some(),
        "the header's backing file is opened"
    );
    let b = e.backend(&name, &[], BackendOptions::default()).unwrap();
    let (r, _) = b.write_blocking(4096, IoBuf::from_slice(&[7u8; 100]));
    r.unwrap();
    drop(b);
    drop(node);
    // Dropping the engine closes the image, writing its metadata back.
    drop(e);
    let out = std::process::Command::new("qemu-img")
        .args(["check", top.path()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", "read -P 7 4096 100", top.path()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
}
