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
