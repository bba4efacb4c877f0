//! The NBD server: a listener (UNIX socket or TCP on loopback), exports over nodes, and one
//! connection handler per client.
//!
//! A connection has two threads of its own and borrows the export's IoThreads:
//! - the **reader** runs the handshake (newstyle fixed: option haggling, then GO or
//!   EXPORT_NAME), then reads request headers and write payloads and hands each request to an
//!   IoThread as a task on the export's [`Backend`]; it never waits for a request to finish,
//!   only for the number in flight to drop below [`MAX_IN_FLIGHT`];
//! - the **writer** sends replies in the order requests complete (out of order with respect
//!   to their arrival), each reply whole.
//!
//! The backend is drained like any other: during a graph change a client's requests are held,
//! not failed. Bad input gets the protocol's answer (an error reply, or for a malformed
//! request header a closed connection) and never affects other clients.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use graph::{Error, ErrorKind, Result, WriteFlags, ZeroFlags};
use iothreads::op::Fd;
use iothreads::IoBuf;
use parking_lot::Mutex;

use super::proto::*;
use crate::backend::Backend;

/// Requests a connection may have in flight at once.
pub const MAX_IN_FLIGHT: u64 = 64;
/// Bytes read from a client socket at a time.
const RECV_BUF: usize = 256 << 10;
/// Pieces (replies) sent in one gathered send at most.
const WRITE_BATCH: usize = 64;
/// The headers of replies without data are gathered into one send buffer of this size.
const SEND_BUF: usize = 256 << 10;
/// Read buffers for up to this many bytes of data are pooled for reuse.
const POOL_DATA: usize = 16 << 10;
/// Read buffers kept per connection for reuse (a read takes one of its exact size).
const POOL_MAX: usize = 64;
/// Room before a read's data for its reply header, so header and data go out as one piece
/// with no copy. A whole page, so the data stays aligned for O_DIRECT.
const HEADROOM: usize = 4096;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A UNIX socket at this path.
    Unix(PathBuf),
    /// TCP on this host and port (loopback addresses only).
    Inet(String, u16),
}

/// An export: a name clients ask for, and the backend that serves it.
pub struct Export {
    /// The name clients give.
    pub name: String,
    /// Shown by NBD_OPT_LIST and INFO.
    pub description: Option<String>,
    /// Writes allowed.
    pub writable: bool,
    /// The front end over the exported node.
    pub backend: Backend,
    /// Connections using it now.
    connections: AtomicU32,
    /// Set when the export is removed: its connections end.
    gone: AtomicBool,
    /// Its clients' sockets (connection id, socket), to hang up on a hard removal.
    clients: Mutex<Vec<(u64, Stream)>>,
}

impl Export {
    /// An export of `backend` (take a read-only backend for a read-only export).
    pub fn new(
        name: &str,
        description: Option<String>,
        writable: bool,
        backend: Backend,
    ) -> Export {
        Export {
            name: name.to_string(),
            description,
            writable,
            backend,
            connections: AtomicU32::new(0),
            gone: AtomicBool::new(false),
            clients: Mutex::new(Vec::new()),
        }
    }

    /// Clients connected to it now.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    fn flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
        if self.writable {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        } else {
            f |= TFLAG_READ_ONLY;
        }
        // Every connection goes through the same node: they see one another's writes.
        f | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_DF
    }
}

struct Shared {
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    max_connections: u32,
    connections: AtomicU32,
    stopping: AtomicBool,
    /// Open client sockets, to shut down on stop.
    sockets: Mutex<Vec<(u64, Stream)>>,
    next_id: AtomicU64,
}

/// A running NBD server.
pub struct NbdServer {
    shared: Arc<Shared>,
    addr: NbdAddr,
    listener: Option<Listener>,
    accept: Option<std::thread::JoinHandle<()>>,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A client socket of either kind.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn is_loopback(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "::1" | "[::1]")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

impl NbdServer {
    /// Starts listening on `addr`; `max_connections` 0 means no limit.
    pub fn start(addr: NbdAddr, max_connections: u32) -> Result<NbdServer> {
        let listener = match &addr {
            NbdAddr::Unix(p) => {
                let l = UnixListener::bind(p).map_err(|e| {
                    Error::io(format!("Failed to bind socket to {}", p.display()), e)
                })?;
                Listener::Unix(l)
            }
            NbdAddr::Inet(host, port) => {
                if !is_loopback(host) {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("NBD over TCP listens on loopback addresses only, not '{host}' (no TLS yet)"),
                    ));
                }
                let h = host.trim_start_matches('[').trim_end_matches(']');
                let l = TcpListener::bind((h, *port))
                    .map_err(|e| Error::io(format!("Failed to bind socket to {h}:{port}"), e))?;
                Listener::Tcp(l)
            }
        };
        let shared = Arc::new(Shared {
            exports: Mutex::new(BTreeMap::new()),
            max_connections,
            connections: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        });
        let l2 = match &listener {
            Listener::Unix(l) => Listener::Unix(
                l.try_clone()
                    .map_err(|e| Error::io("cannot clone the listener", e))?,
            ),
            Listener::Tcp(l) => Listener::Tcp(
                l.try_clone()
                    .map_err(|e| Error::io("cannot clone the listener", e))?,
            ),
        };
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(s, l2))
            .map_err(|e| Error::io("cannot start the NBD listener thread", e))?;
        Ok(NbdServer {
            shared,
            addr,
            listener: Some(listener),
            accept: Some(accept),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> &NbdAddr {
        &self.addr
    }

    /// The TCP port it listens on (useful with port 0).
    pub fn local_port(&self) -> Option<u16> {
        match &self.listener {
            Some(Listener::Tcp(l)) => l.local_addr().ok().map(|a| a.port()),
            _ => None,
        }
    }

    /// Adds an export; its name must be new.
    pub fn add_export(&self, export: Export) -> Result<Arc<Export>> {
        let mut ex = self.shared.exports.lock();
        if ex.contains_key(&export.name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("Block export id '{}' is already in use", export.name),
            ));
        }
        let e = Arc::new(export);
        ex.insert(e.name.clone(), Arc::clone(&e));
        Ok(e)
    }

    /// Removes an export. With `hard`, its clients are disconnected; otherwise it is refused
    /// while any is connected.
    pub fn remove_export(&self, name: &str, hard: bool) -> Result<Arc<Export>> {
        let mut ex = self.shared.exports.lock();
        let Some(e) = ex.get(name).cloned() else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("Export '{name}' is not found"),
            ));
        };
        if !hard && e.connections() > 0 {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("export '{name}' still in use"),
            ));
        }
        e.gone.store(true, Ordering::Release);
        ex.remove(name);
        for (_, c) in e.clients.lock().drain(..) {
            c.shutdown();
        }
        Ok(e)
    }

    /// The exports, by name.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.shared.exports.lock().values().cloned().collect()
    }

    /// Clients connected now.
    pub fn connections(&self) -> u32 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Stops listening and disconnects every client.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        // Wake the accept loop with a connection of our own, then join it.
        match &self.addr {
            NbdAddr::Unix(p) => {
                let _ = UnixStream::connect(p);
            }
            NbdAddr::Inet(_, _) => {
                if let Some(port) = self.local_port() {
                    let _ = TcpStream::connect(("127.0.0.1", port));
                }
            }
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.listener = None;
        if let NbdAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
        for (_, s) in self.shared.sockets.lock().drain(..) {
            s.shutdown();
        }
        for e in self.shared.exports.lock().values() {
            e.gone.store(true, Ordering::Release);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop();
        }
    }
}

fn accept_loop(shared: Arc<Shared>, l: Listener) {
    loop {
        let s = match &l {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok(s) = s else { continue };
        let n = shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
        if shared.max_connections > 0 && n > shared.max_connections {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            s.shutdown();
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = s.try_clone() {
            shared.sockets.lock().push((id, c));
        }
        let sh = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || {
                let _ = serve(&sh, s, id);
                sh.sockets.lock().retain(|(i, _)| *i != id);
                sh.connections.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// What the handshake agreed.
struct Session {
    export: Arc<Export>,
    structured: bool,
    base_allocation: bool,
}

fn read_u32(s: &mut Stream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut Stream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Serves one client: handshake, then transmission.
fn serve(shared: &Arc<Shared>, mut s: Stream, id: u64) -> io::Result<()> {
    let Some(sess) = handshake(shared, &mut s)? else {
        return Ok(());
    };
    let export = &sess.export;
    export.connections.fetch_add(1, Ordering::AcqRel);
    if let Ok(c) = s.try_clone() {
        export.clients.lock().push((id, c));
    }
    // Removed while the handshake ran: hang up at once.
    if export.gone.load(Ordering::Acquire) {
        s.shutdown();
    }
    let export = Arc::clone(export);
    let r = transmission(sess, s);
    export.clients.lock().retain(|(i, _)| *i != id);
    export.connections.fetch_sub(1, Ordering::AcqRel);
    r
}

fn handshake(shared: &Shared, s: &mut Stream) -> io::Result<Option<Session>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let cflags = read_u32(s)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid("unknown client flags"));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut meta: Option<(String, bool)> = None;
    loop {
        if read_u64(s)? != IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        let opt = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION {
            // Too long to read: say so and hang up (the rest cannot be skipped cheaply).
            s.write_all(&option_reply(opt, REP_ERR_TOO_BIG, b"option too long"))?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let reply_err = |s: &mut Stream, kind: u32, msg: &str| {
            s.write_all(&option_reply(opt, kind, msg.as_bytes()))
        };
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = shared.exports.lock().get(&name).cloned() else {
                    // No way to report an error here: hang up, as the protocol says.
                    return Ok(None);
                };
                let mut r = Vec::with_capacity(10 + 124);
                r.extend_from_slice(&export.backend.len().to_be_bytes());
                r.extend_from_slice(&export.flags().to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&r)?;
                let base_allocation = meta.as_ref().is_some_and(|(n, b)| *b && *n == name);
                return Ok(Some(Session {
                    export,
                    structured,
                    base_allocation,
                }));
            }
            OPT_ABORT => {
                let _ = s.write_all(&option_reply(opt, REP_ACK, &[]));
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(s, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let exports: Vec<Arc<Export>> = shared.exports.lock().values().cloned().collect();
                for e in exports {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    if let Some(desc) = &e.description {
                        d.extend_from_slice(desc.as_bytes());
                    }
                    s.write_all(&option_reply(opt, REP_SERVER, &d))?;
                }
                s.write_all(&option_reply(opt, REP_ACK, &[]))?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(s, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else if structured {
                    reply_err(s, REP_ERR_INVALID, "structured replies already negotiated")?;
                } else {
                    structured = true;
                    s.write_all(&option_reply(opt, REP_ACK, &[]))?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if !structured {
                    reply_err(s, REP_ERR_INVALID, "structured replies are not negotiated")?;
                    continue;
                }
                let mut c = Cursor::new(&data);
                let parsed = (|| {
                    let name = c.string()?;
                    let n = c.u32()?;
                    let mut queries = Vec::new();
                    for _ in 0..n {
                        queries.push(c.string()?);
                    }
                    c.done().then_some((name, queries))
                })();
                let Some((name, queries)) = parsed else {
                    reply_err(s, REP_ERR_INVALID, "malformed meta context request")?;
                    continue;
                };
                if !shared.exports.lock().contains_key(&name) {
                    reply_err(s, REP_ERR_UNKNOWN, &format!("export '{name}' not present"))?;
                    continue;
                }
                let wants = queries.is_empty() && !set
                    || queries
                        .iter()
                        .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"));
                if wants {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    s.write_all(&option_reply(opt, REP_META_CONTEXT, &d))?;
                }
                if set {
                    meta = Some((name, wants));
                }
                s.write_all(&option_reply(opt, REP_ACK, &[]))?;
            }
            OPT_INFO | OPT_GO => {
                let mut c = Cursor::new(&data);
                let parsed = (|| {
                    let name = c.string()?;
                    let n = c.u16()?;
                    let mut infos = Vec::new();
                    for _ in 0..n {
                        infos.push(c.u16()?);
                    }
                    c.done().then_some((name, infos))
                })();
                let Some((name, infos)) = parsed else {
                    reply_err(s, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request")?;
                    continue;
                };
                let Some(export) = shared.exports.lock().get(&name).cloned() else {
                    reply_err(s, REP_ERR_UNKNOWN, &format!("export '{name}' not present"))?;
                    continue;
                };
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&export.backend.len().to_be_bytes());
                d.extend_from_slice(&export.flags().to_be_bytes());
                s.write_all(&option_reply(opt, REP_INFO, &d))?;
                if infos.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    s.write_all(&option_reply(opt, REP_INFO, &d))?;
                }
                if infos.contains(&INFO_DESCRIPTION) {
                    if let Some(desc) = &export.description {
                        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(desc.as_bytes());
                        s.write_all(&option_reply(opt, REP_INFO, &d))?;
                    }
                }
                // Block sizes always (as QEMU sends them); the minimum is 1 unless the
                // client said it honours constraints.
                let align = export.backend.root().driver().request_alignment().max(1);
                let min = if infos.contains(&INFO_BLOCK_SIZE) {
                    align
                } else {
                    1
                };
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&min.to_be_bytes());
                d.extend_from_slice(&align.max(4096).to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                s.write_all(&option_reply(opt, REP_INFO, &d))?;
                s.write_all(&option_reply(opt, REP_ACK, &[]))?;
                if opt == OPT_GO {
                    let base_allocation = meta.as_ref().is_some_and(|(n, b)| *b && *n == name);
                    return Ok(Some(Session {
                        export,
                        structured,
                        base_allocation,
                    }));
                }
            }
            OPT_STARTTLS => reply_err(s, REP_ERR_POLICY, "TLS is not supported")?,
            _ => reply_err(s, REP_ERR_UNSUP, "option not supported")?,
        }
    }
}

/// A reply on its way out: header bytes and, for reads, the data.
struct Reply {
    head: Vec<u8>,
    data: Option<IoBuf>,
}

/// The state a connection's tasks share on its IoThread.
#[derive(Default)]
struct Conn {
    replies: RefCell<VecDeque<Reply>>,
    in_flight: Cell<u64>,
    /// The reader has stopped (EOF, DISC, error, or the export went).
    reader_done: Cell<bool>,
    /// A write to the client failed: nothing more is sent.
    broken: Cell<bool>,
    writer: Cell<Option<Waker>>,
    reader: Cell<Option<Waker>>,
    /// Read buffers whose replies have been copied out, for the next reads.
    pool: RefCell<Vec<IoBuf>>,
}

impl Conn {
    /// A buffer of `len` bytes for a read: a pooled one of that size, or a new one. Its
    /// content is whatever the read leaves there (a read fills it or fails).
    /// The buffer has [`HEADROOM`] bytes before its window for the reply header.
    fn read_buf(&self, len: usize) -> IoBuf {
        let mut pool = self.pool.borrow_mut();
        let mut b = match pool.iter().rposition(|b| b.capacity() == HEADROOM + len) {
            Some(i) => pool.swap_remove(i),
            None => IoBuf::new(HEADROOM + len),
        };
        b.set_window(HEADROOM..HEADROOM + len);
        b
    }

    /// Takes back a read buffer once its reply is sent.
    fn recycle(&self, b: IoBuf) {
        let mut pool = self.pool.borrow_mut();
        if pool.len() < POOL_MAX && b.capacity() <= HEADROOM + POOL_DATA {
            pool.push(b);
        }
    }

    fn push(&self, r: Reply) {
        self.replies.borrow_mut().push_back(r);
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    fn finish_one(&self) {
        self.in_flight.set(self.in_flight.get() - 1);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

/// Serves the transmission phase on one of the export's IoThreads: a reader task parses
/// requests from the socket and starts a task per request; a writer task sends replies as
/// they complete, many per send. Nothing crosses a thread per request.
fn transmission(sess: Session, s: Stream) -> io::Result<()> {
    let threads = sess.export.backend.threads();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = threads[(NEXT.fetch_add(1, Ordering::Relaxed) as usize) % threads.len()].clone();
    let fd = match &s {
        Stream::Unix(u) => u.as_raw_fd(),
        Stream::Tcp(t) => t.as_raw_fd(),
    };
    let r = t.block_on(move || async move {
        let conn = Rc::new(Conn::default());
        let writer = iothreads::spawn_local(write_loop(fd, Rc::clone(&conn)));
        let r = read_loop(&sess, fd, &conn).await;
        conn.reader_done.set(true);
        if let Some(w) = conn.writer.take() {
            w.wake();
        }
        let _ = writer.await;
        r
    });
    drop(s);
    r.map_err(io::Error::other)?
}

async fn read_loop(sess: &Session, fd: RawFd, conn: &Rc<Conn>) -> io::Result<()> {
    let export = &sess.export;
    let mut pending: Vec<u8> = Vec::with_capacity(RECV_BUF);
    let mut at = 0usize;
    let mut rbuf = IoBuf::new(RECV_BUF);
    loop {
        // Parse every complete request in hand.
        loop {
            if export.gone.load(Ordering::Acquire) || conn.broken.get() {
                return Ok(());
            }
            let avail = &pending[at..];
            if avail.len() < REQUEST_LEN {
                break;
            }
            let hdr: &[u8; REQUEST_LEN] = avail[..REQUEST_LEN].try_into().unwrap();
            let Some(req) = Request::decode(hdr) else {
                return Err(invalid("bad request magic"));
            };
            let payload = if req.kind == CMD_WRITE {
                if req.length > MAX_PAYLOAD {
                    conn.push(error_reply(
                        sess,
                        req.cookie,
                        EOVERFLOW,
                        "write payload too large",
                    ));
                    return Ok(());
                }
                if avail.len() < REQUEST_LEN + req.length as usize {
                    break;
                }
                Some(IoBuf::from_slice(
                    &avail[REQUEST_LEN..REQUEST_LEN + req.length as usize],
                ))
            } else {
                None
            };
            at += REQUEST_LEN + payload.as_ref().map_or(0, |p| p.len());
            if req.kind == CMD_DISC {
                return Ok(());
            }
            // Back-pressure: at most MAX_IN_FLIGHT requests at once.
            std::future::poll_fn(|cx| {
                if conn.in_flight.get() < MAX_IN_FLIGHT {
                    Poll::Ready(())
                } else {
                    conn.reader.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            start_request(sess, conn, req, payload);
        }
        // Compact, then read more.
        if at > 0 {
            pending.drain(..at);
            at = 0;
        }
        let (r, b) = iothreads::op::read_at(Fd::Raw(fd), 0, rbuf).await;
        rbuf = b;
        match r {
            Ok(0) => return Ok(()),
            Ok(n) => pending.extend_from_slice(&rbuf[..n]),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => {}
            Err(_) => return Ok(()),
        }
    }
}

/// Sends replies as they come: whatever is ready (up to [`WRITE_BATCH`] pieces) goes out in
/// one gathered send ([`send_all`]): the headers of replies without data gathered in one send buffer, and each
/// read's data with its header written in front of it (no copy).
async fn write_loop(fd: RawFd, conn: Rc<Conn>) {
    // The send buffer, back from each send for the next.
    let mut spare: Option<IoBuf> = None;
    loop {
        let ready = std::future::poll_fn(|cx| {
            if !conn.replies.borrow().is_empty() {
                return Poll::Ready(true);
            }
            if conn.reader_done.get() && conn.in_flight.get() == 0 {
                return Poll::Ready(false);
            }
            conn.writer.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        if !ready {
            return;
        }
        let mut fill = 0usize;
        let mut data = Vec::new();
        let mut out = {
            let q = conn.replies.borrow();
            let first = q.front().expect("a reply is ready");
            // A header larger than the buffer (a long block-status list) gets one of its own.
            match spare.take() {
                Some(b) if first.head.len() <= b.capacity() => b.unslice(),
                _ => IoBuf::new(first.head.len().max(SEND_BUF)),
            }
        };
        {
            let cap = out.capacity();
            let mut q = conn.replies.borrow_mut();
            while let Some(r) = q.front() {
                if data.len() + usize::from(fill > 0) == WRITE_BATCH
                    || (fill > 0 && fill + r.head.len() > cap)
                {
                    break;
                }
                let r = q.pop_front().expect("looked at");
                // Replies may go in any order (the client matches cookies): headers alone
                // are gathered in the send buffer, read data (its header in front of it)
                // goes as pieces of its own.
                out[fill..fill + r.head.len()].copy_from_slice(&r.head);
                fill += r.head.len();
                data.extend(r.data);
            }
        }
        if conn.broken.get() {
            continue;
        }
        out.set_window(0..fill);
        let mut bufs = Vec::with_capacity(1 + data.len());
        if fill > 0 {
            bufs.push(out);
        } else {
            spare = Some(out);
        }
        bufs.extend(data);
        let (ok, sent) = send_all(fd, bufs).await;
        for b in sent {
            if b.capacity() >= SEND_BUF {
                spare = Some(b);
            } else {
                conn.recycle(b);
            }
        }
        if !ok {
            conn.broken.set(true);
            // SAFETY: shutdown only changes the socket's state; the fd stays open.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

/// Writes every buffer to the socket, resuming after short writes. Returns whether all
/// went out, and the buffers that did (in order), for reuse. What the socket takes at once
/// goes with a plain non-blocking `sendmsg` (a UNIX socket nearly always has the room), so a
/// batch costs one syscall and no ring round trip; the rest waits on the ring.
async fn send_all(fd: RawFd, mut bufs: Vec<IoBuf>) -> (bool, Vec<IoBuf>) {
    let mut sent = Vec::with_capacity(bufs.len());
    match send_now(fd, &bufs) {
        Ok(n) => bufs = advance(bufs, n, &mut sent),
        Err(_) => return (false, sent),
    }
    while !bufs.is_empty() {
        let (r, back) = iothreads::op::writev_at(Fd::Raw(fd), 0, bufs).await;
        bufs = back;
        let n = match r {
            Ok(0) => return (false, sent),
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => 0,
            Err(_) => return (false, sent),
        };
        bufs = advance(bufs, n, &mut sent);
    }
    (true, sent)
}

/// Moves the buffers of the first `n` bytes from `bufs` to `sent`, trimming a partly written
/// one; returns what is left to send.
fn advance(bufs: Vec<IoBuf>, mut n: usize, sent: &mut Vec<IoBuf>) -> Vec<IoBuf> {
    let mut keep = Vec::with_capacity(bufs.len());
    for mut b in bufs {
        if n >= b.len() {
            n -= b.len();
            sent.push(b);
            continue;
        }
        if n > 0 {
            let w = b.window();
            b.set_window(w.start + n..w.end);
            n = 0;
        }
        keep.push(b);
    }
    keep
}

/// Sends what the socket takes now, without blocking: the bytes sent (0 if it would block).
fn send_now(fd: RawFd, bufs: &[IoBuf]) -> io::Result<usize> {
    const MAX_IOV: usize = 128;
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_IOV];
    let n = bufs.len().min(MAX_IOV);
    for (v, b) in iov.iter_mut().zip(bufs) {
        v.iov_base = b.as_ptr() as *mut libc::c_void;
        v.iov_len = b.len();
    }
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n;
    loop {
        // SAFETY: the iovecs point into buffers borrowed for the call, and sendmsg only reads
        // them; MSG_DONTWAIT keeps it from blocking, MSG_NOSIGNAL from raising SIGPIPE.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// Starts one request as a task of its own; its reply goes to the writer.
fn start_request(sess: &Session, conn: &Rc<Conn>, req: Request, payload: Option<IoBuf>) {
    let export = &sess.export;
    let error = |code: u32, msg: &str| error_reply(sess, req.cookie, code, msg);
    let size = export.backend.len();
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= size);
    let structured = sess.structured;
    let cookie = req.cookie;
    let reply_now = |r: Reply| conn.push(r);
    match req.kind {
        CMD_WRITE => {
            if !export.writable {
                return reply_now(error(EPERM, "export is read-only"));
            }
            if !in_range {
                return reply_now(error(ENOSPC, "write past the end of the export"));
            }
            let flags = WriteFlags {
                fua: req.flags & CMD_FLAG_FUA != 0,
            };
            let b = export.backend.clone();
            let buf = payload.expect("a write has its payload");
            run(conn, structured, cookie, async move {
                let (r, _) = b.write_with(req.offset, buf, flags).await;
                r.map(|_| None)
            });
        }
        CMD_READ => {
            if req.length > MAX_PAYLOAD {
                return reply_now(error(EINVAL, "read request too large"));
            }
            if !in_range {
                return reply_now(error(EINVAL, "read past the end of the export"));
            }
            let b = export.backend.clone();
            let buf = conn.read_buf(req.length as usize);
            run(conn, structured, cookie, async move {
                let (r, buf) = b.read(req.offset, buf).await;
                r.map(|_| Some((req.offset, buf)))
            });
        }
        CMD_FLUSH => {
            let b = export.backend.clone();
            run(conn, structured, cookie, async move {
                b.flush().await.map(|_| None)
            });
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            if !export.writable {
                return reply_now(error(EPERM, "export is read-only"));
            }
            if !in_range {
                return reply_now(error(ENOSPC, "request past the end of the export"));
            }
            let b = export.backend.clone();
            let fua = req.flags & CMD_FLAG_FUA != 0;
            let (off, len) = (req.offset, u64::from(req.length));
            if req.kind == CMD_TRIM {
                run(conn, structured, cookie, async move {
                    b.discard(off, len).await?;
                    if fua {
                        b.flush().await?;
                    }
                    Ok(None)
                });
            } else {
                let flags = ZeroFlags {
                    may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                    no_fallback: req.flags & CMD_FLAG_FAST_ZERO != 0,
                    fua,
                };
                run(conn, structured, cookie, async move {
                    b.write_zeroes(off, len, flags).await.map(|_| None)
                });
            }
        }
        CMD_CACHE => {
            if !in_range {
                return reply_now(error(EINVAL, "request past the end of the export"));
            }
            reply_now(ok_reply(sess, cookie));
        }
        CMD_BLOCK_STATUS => {
            if !sess.structured || !sess.base_allocation {
                return reply_now(error(EINVAL, "no metadata context was negotiated"));
            }
            if !in_range || req.length == 0 {
                return reply_now(error(EINVAL, "block status past the end of the export"));
            }
            let b = export.backend.clone();
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            conn.in_flight.set(conn.in_flight.get() + 1);
            let c = Rc::clone(conn);
            drop(iothreads::spawn_local(async move {
                let r = block_status(&b, req.offset, u64::from(req.length), one).await;
                let reply = match r {
                    Ok(extents) => status_reply(cookie, &extents),
                    Err(e) => {
                        structured_error(cookie, errno_to_nbd(e.raw_os_error()), &e.to_string())
                    }
                };
                c.push(reply);
                c.finish_one();
            }));
        }
        _ => reply_now(error(EINVAL, "unknown command")),
    }
}

/// Runs a request's future as a task; turns its result into the reply.
fn run<F>(conn: &Rc<Conn>, structured: bool, cookie: u64, fut: F)
where
    F: std::future::Future<Output = io::Result<Option<(u64, IoBuf)>>> + 'static,
{
    conn.in_flight.set(conn.in_flight.get() + 1);
    let c = Rc::clone(conn);
    drop(iothreads::spawn_local(async move {
        let reply = match fut.await {
            Ok(None) => done_reply(structured, cookie),
            Ok(Some((offset, buf))) => {
                let mut head = [0u8; 28];
                let n = if structured {
                    head[..20].copy_from_slice(&chunk_header(
                        cookie,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        8 + buf.len() as u32,
                    ));
                    head[20..28].copy_from_slice(&offset.to_be_bytes());
                    28
                } else {
                    head[..16].copy_from_slice(&simple_reply(cookie, 0));
                    16
                };
                Reply {
                    head: Vec::new(),
                    data: Some(prepend(buf, &head[..n])),
                }
            }
            Err(e) => {
                let code = errno_to_nbd(e.raw_os_error());
                if structured {
                    structured_error(cookie, code, &e.to_string())
                } else {
                    Reply {
                        head: simple_reply(cookie, code).to_vec(),
                        data: None,
                    }
                }
            }
        };
        c.push(reply);
        c.finish_one();
    }));
}

/// Writes `head` into the room just before `buf`'s window (a read buffer from
/// [`Conn::read_buf`]) and widens the window over it.
fn prepend(mut buf: IoBuf, head: &[u8]) -> IoBuf {
    let w = buf.window();
    debug_assert!(
        w.start >= head.len(),
        "a read buffer has room for its header"
    );
    let start = w.start - head.len();
    buf.set_window(start..w.end);
    buf[..head.len()].copy_from_slice(head);
    buf
}

fn done_reply(structured: bool, cookie: u64) -> Reply {
    if structured {
        Reply {
            head: chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).to_vec(),
            data: None,
        }
    } else {
        Reply {
            head: simple_reply(cookie, 0).to_vec(),
            data: None,
        }
    }
}

/// The extents of `[offset, offset + len)` for base:allocation (one with `one`).
async fn block_status(
    b: &Backend,
    offset: u64,
    len: u64,
    one: bool,
) -> io::Result<Vec<(u32, u32)>> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let (a, n) = b
            .allocation(at, (end - at).min(u32::MAX as u64 & !511))
            .await?;
        let flags = if a.data { 0 } else { STATE_HOLE } | if a.zero { STATE_ZERO } else { 0 };
        let n = n.min(u32::MAX as u64) as u32;
        match out.last_mut() {
            Some((l, f)) if *f == flags && l.checked_add(n).is_some() => *l += n,
            _ => out.push((n, flags)),
        }
        at += u64::from(n);
        if one || out.len() >= 1 << 16 {
            break;
        }
    }
    if one {
        out.truncate(1);
    }
    Ok(out)
}

fn status_reply(cookie: u64, extents: &[(u32, u32)]) -> Reply {
    let len = 4 + 8 * extents.len() as u32;
    let mut head = Vec::with_capacity(20 + len as usize);
    head.extend_from_slice(&chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        len,
    ));
    head.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (l, f) in extents {
        head.extend_from_slice(&l.to_be_bytes());
        head.extend_from_slice(&f.to_be_bytes());
    }
    Reply { head, data: None }
}

fn structured_error(cookie: u64, code: u32, msg: &str) -> Reply {
    Reply {
        head: error_chunk(cookie, code, msg),
        data: None,
    }
}

fn error_reply(sess: &Session, cookie: u64, code: u32, msg: &str) -> Reply {
    if sess.structured {
        structured_error(cookie, code, msg)
    } else {
        Reply {
            head: simple_reply(cookie, code).to_vec(),
            data: None,
        }
    }
}

fn ok_reply(sess: &Session, cookie: u64) -> Reply {
    done_reply(sess.structured, cookie)
}
