//! Runs a fixed number of 4 KiB reads at depth 32 through a backend into a null node (or, with
//! a third argument, a file read with plain syscalls), all on the calling thread (made an
//! IoThread for the run), for instruction counts under callgrind:
//!
//! ```sh
//! cargo build --release --example request_cost
//! valgrind --tool=callgrind target/release/examples/request_cost 200000 32 [FILE]
//! ```
//!
//! Run it with two request counts and divide the difference in instructions by the difference
//! in requests: that is the per-request cost, free of start-up. BENCHMARKS.md compares builds
//! with and without the graph lock's read side (`--features bench-no-graph-lock`).

use engine::drivers::file::{self, Aio, FileOptions};
use engine::drivers::null::{self, NullOptions};
use engine::{Backend, IoBuf};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let depth: u64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(32);
    let path = std::env::args().nth(3);
    let done = iothreads::block_on_current(Default::default(), async move {
        let node = match path {
            Some(p) => {
                let o = FileOptions {
                    read_only: true,
                    aio: Aio::Inline,
                    ..FileOptions::new(p)
                };
                file::open("cost", &o).expect("file node")
            }
            None => null::open("cost", NullOptions::default()).expect("null node"),
        };
        let me = iothreads::current().expect("on an IoThread");
        let backend = Backend::new(node, &[me]).expect("backend");
        let mut tasks = Vec::new();
        for w in 0..depth {
            let b = backend.clone();
            let count = n / depth + u64::from(w < n % depth);
            tasks.push(iothreads::spawn_local(async move {
                let mut buf = IoBuf::new(4096);
                for i in 0..count {
                    let (r, back) = b.read(((i * depth + w) % 4096) * 4096, buf).await;
                    r.expect("null read");
                    buf = back;
                }
                count
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        total
    })
    .expect("io_uring");
    println!("{done} requests");
}
