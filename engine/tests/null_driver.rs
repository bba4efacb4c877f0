//! The null driver's options: size, read-zeroes, latency-ns.

mod common;

use std::time::{Duration, Instant};

use common::uniq;
use engine::drivers::null::{self, NullOptions};
use engine::{Backend, IoBuf, IoThread};

#[test]
fn reads_leave_buffers_alone_unless_read_zeroes() {
    let t = IoThread::new().unwrap();
    let plain = null::open(&uniq("n"), NullOptions::default()).unwrap();
    assert_eq!(plain.len(), 1 << 30, "QEMU's default size");
    let b = Backend::new(plain, &[t.handle()]).unwrap();
    let (r, buf) = b.read_blocking(0, IoBuf::from_slice(&[7u8; 512]));
    r.unwrap();
    assert!(buf.iter().all(|&x| x == 7));
    let zeroes = NullOptions {
        size: 1 << 20,
        read_zeroes: true,
        ..Default::default()
    };
    let b = Backend::new(null::open(&uniq("z"), zeroes).unwrap(), &[t.handle()]).unwrap();
    assert_eq!(b.len(), 1 << 20);
    let (r, buf) = b.read_blocking(4096, IoBuf::from_slice(&[7u8; 512]));
    r.unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    let (r, _) = b.read_blocking(1 << 20, IoBuf::new(512));
    assert!(r.is_err(), "past the end");
}

#[test]
fn latency_delays_every_request() {
    let t = IoThread::new().unwrap();
    let slow = NullOptions {
        latency_ns: 20_000_000,
        ..Default::default()
    };
    let b = Backend::new(null::open(&uniq("s"), slow).unwrap(), &[t.handle()]).unwrap();
    let start = Instant::now();
    let (r, _) = b.read_blocking(0, IoBuf::new(512));
    r.unwrap();
    b.flush_blocking().unwrap();
    // Two requests of 20 ms each cannot finish sooner than 40 ms (a lower bound, not a timing
    // assertion on speed).
    assert!(start.elapsed() >= Duration::from_millis(40));
}
