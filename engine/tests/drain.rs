//! Drain and the controller: drained backends hold requests in order, drains wait for what is
//! in flight, drains nest, late users are held too, and the controller runs one change at a
//! time while still answering queries.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::uniq;
use engine::drivers::null::{self, NullOptions};
use engine::{Backend, BackendOptions, Engine, EngineOptions, IoBuf};
use graph::{Driver, LocalBoxFuture, Node, WriteFlags, ZeroFlags};
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

/// A leaf whose asynchronous close records where it ran.
struct Closing {
    closed_on: Arc<Mutex<Option<Option<usize>>>>,
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
            *self.closed_on.lock() = Some(iothreads::current_index());
            Ok(())
        })
    }
}

#[test]
fn dropping_the_last_reference_closes_the_node_on_the_controller_iothread() {
    let e = engine();
    let closed_on = Arc::new(Mutex::new(None));
    let node = Node::new(
        Some(&uniq("closing")),
        Box::new(Closing {
            closed_on: closed_on.clone(),
        }),
        false,
    )
    .unwrap();
    let b = Backend::with_options(node.clone(), &e.iothreads(), BackendOptions::default()).unwrap();
    drop(node);
    assert!(
        closed_on.lock().is_none(),
        "the backend still holds the node"
    );
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while closed_on.lock().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the node was never closed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Closed asynchronously, on an IoThread (the newest controller's; tests run several).
    let on = closed_on.lock().unwrap();
    assert!(on.is_some(), "closed off any IoThread");
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
