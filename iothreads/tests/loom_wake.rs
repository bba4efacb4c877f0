//! Model check of the sleep/wake handshake (run with `RUSTFLAGS="--cfg loom"`): whatever the
//! interleaving, a loop that goes to sleep with work queued has been sent a wake.

#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use iothreads::wake::SleepFlag;

#[test]
fn no_lost_wakeup() {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(|| {
        let flag = Arc::new(SleepFlag::new());
        let queue = Arc::new(AtomicUsize::new(0));
        let eventfd = Arc::new(AtomicUsize::new(0));
        let injectors: Vec<_> = (0..2)
            .map(|_| {
                let (flag, queue, eventfd) = (flag.clone(), queue.clone(), eventfd.clone());
                thread::spawn(move || {
                    queue.fetch_add(1, Ordering::Relaxed);
                    if flag.must_wake() {
                        eventfd.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        // The loop: announce, look once more, sleep if nothing is there.
        flag.announce();
        let sleeps = queue.load(Ordering::Relaxed) < 2;
        for i in injectors {
            i.join().unwrap();
        }
        if sleeps {
            // It went to sleep missing some work: a wake must have been sent.
            let seen_all = queue.load(Ordering::Relaxed) == 2;
            assert!(seen_all);
            assert!(eventfd.load(Ordering::Relaxed) >= 1, "lost wakeup");
        }
        flag.clear();
    });
}
