//! Closing in place: `image::create` and `Node::close_if_last` return with the image's file
//! closed and its locks released. Its own test binary, because the test holds the engine's
//! controller (where dropped nodes are closed) and would stall other tests' closes.

mod common;

use common::Scratch;
use engine::drivers::qcow2::create::CreateOptions;
use engine::image::{self, Format, ImageOptions};

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    iothreads::block_on_current(Default::default(), f).expect("io_uring")
}

/// `image::create` returns with the new image closed and unlocked: opening it for writing at
/// once, in the same task, always works (the creation's node used to be closed later, on the
/// IoThread, so an open right after could meet its write lock). Likewise `close_if_last` on an
/// opened image releases its file before the next creation over it.
#[test]
fn an_image_opens_for_writing_the_moment_create_returns() {
    // An engine installs the process's closer, which closes dropped nodes on its controller
    // thread; a change that holds the controller keeps any such close from running meanwhile.
    let engine = engine::Engine::new(Default::default()).unwrap();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let holder = engine.controller().change(move |_| async move {
        let _ = held.recv();
        Ok(())
    });
    let img = Scratch::new("reopen");
    let p = img.0.clone();
    run(async move {
        for round in 0..50 {
            image::create(
                &p,
                Format::Qcow2,
                &CreateOptions {
                    size: 1 << 20,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let node = image::open(&p, &ImageOptions::default())
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            node.flush().await.unwrap();
            node.close_if_last().await.unwrap();
        }
    });
    release.send(()).unwrap();
    holder.join().unwrap().unwrap();
}

/// A process spawned by another thread shares, until it execs, every open file description of
/// ours: image locks still on a descriptor that `create` closes would outlive the close. So
/// create releases them explicitly, and creating then opening stays clean while children
/// are spawned all the time.
#[test]
fn create_leaves_no_lock_behind_in_a_forked_child() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let spawner = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut c) = std::process::Command::new("true").spawn() {
                    let _ = c.wait();
                }
            }
        })
    };
    let img = Scratch::new("forked");
    let p = img.0.clone();
    let r = std::panic::catch_unwind(move || {
        run(async move {
            for round in 0..300 {
                let format = if round % 2 == 0 {
                    Format::Raw
                } else {
                    Format::Qcow2
                };
                image::create(
                    &p,
                    format,
                    &CreateOptions {
                        size: 1 << 20,
                        ..Default::default()
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("round {round}: create: {e}"));
                let node = image::open(&p, &ImageOptions::default())
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: open: {e}"));
                node.close_if_last().await.unwrap();
            }
        })
    });
    stop.store(true, Ordering::Relaxed);
    spawner.join().unwrap();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}
