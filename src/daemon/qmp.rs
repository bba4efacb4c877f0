//! The QMP wire protocol: framing JSON values out of a byte stream, checking a request's
//! shape, replies, errors and events, and the server that serves many clients at once.
//!
//! - Each client has a thread that reads and frames its requests; a command runs under the
//!   monitor lock (one at a time, as QEMU's monitor runs them), and its reply goes back to
//!   that client alone, with the request's `id` echoed.
//! - Events go to every client that has finished capabilities negotiation, from one event
//!   thread. A client that stops reading gets a write timeout and is dropped; it never holds
//!   up the others.
//! - Bad input never takes the daemon down: a value that is not valid JSON gets QEMU's
//!   "JSON parse error" reply and the stream resynchronises at the next top-level value; a
//!   value over [`MAX_MESSAGE`] bytes or nested deeper than [`MAX_NESTING`] gets an error
//!   reply and the connection is closed (what follows cannot be framed reliably).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::{json, Map, Value};

/// The largest request accepted (QEMU's limit on one token is 64 MiB).
pub const MAX_MESSAGE: usize = 64 << 20;
/// The deepest nesting accepted (QEMU's limit).
pub const MAX_NESTING: usize = 1024;
/// How long a write to a client may block before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A QMP error: its class and text.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpError {
    /// `GenericError`, `CommandNotFound`, `DeviceNotFound`, `DeviceNotActive`, ...
    pub class: &'static str,
    /// The human-readable text.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// An error of `class`.
    pub fn with_class(class: &'static str, desc: impl Into<String>) -> QmpError {
        QmpError {
            class,
            desc: desc.into(),
        }
    }
}

impl From<engine::Error> for QmpError {
    fn from(e: engine::Error) -> QmpError {
        let class = match e.kind() {
            engine::ErrorKind::DeviceNotFound => "DeviceNotFound",
            _ => "GenericError",
        };
        QmpError::with_class(class, e.full_message())
    }
}

/// QMP's timestamp member.
pub fn timestamp(at: SystemTime) -> Value {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({"seconds": d.as_secs(), "microseconds": d.subsec_micros()})
}

/// An event message.
pub fn event(name: &str, data: Value, at: SystemTime) -> Value {
    json!({"event": name, "data": data, "timestamp": timestamp(at)})
}

/// What framing found in the stream.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// One complete top-level JSON text (not yet parsed).
    Value(Vec<u8>),
    /// A value too large or too deeply nested: answer and close.
    TooLarge(&'static str),
}

/// Splits a byte stream into top-level JSON values without parsing them: it tracks strings,
/// escapes and bracket depth, so a value is complete when its outermost bracket closes (or a
/// bare scalar ends at whitespace or a bracket).
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    scalar: bool,
}

impl Framer {
    /// Feeds bytes; returns the frames they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.scalar {
                if b.is_ascii_whitespace() || matches!(b, b'{' | b'[' | b'}' | b']') {
                    out.push(Frame::Value(std::mem::take(&mut self.buf)));
                    self.scalar = false;
                    if b.is_ascii_whitespace() {
                        continue;
                    }
                } else {
                    self.buf.push(b);
                    if self.buf.len() > MAX_MESSAGE {
                        out.push(Frame::TooLarge("JSON token size limit exceeded"));
                        return out;
                    }
                    continue;
                }
            }
            if self.depth == 0 && !self.in_string {
                match b {
                    b'{' | b'[' => {
                        self.buf.clear();
                        self.buf.push(b);
                        self.depth = 1;
                    }
                    b'"' => {
                        // A bare string at top level: framed whole, then refused.
                        self.buf.clear();
                        self.buf.push(b);
                        self.in_string = true;
                    }
                    b'}' | b']' => out.push(Frame::Value(vec![b])),
                    _ if b.is_ascii_whitespace() => {}
                    _ => {
                        self.buf.clear();
                        self.buf.push(b);
                        self.scalar = true;
                    }
                }
                continue;
            }
            self.buf.push(b);
            if self.buf.len() > MAX_MESSAGE {
                out.push(Frame::TooLarge("JSON token size limit exceeded"));
                return out;
            }
            if self.in_string {
                if b < 0x20 {
                    // A raw control character (a newline in an unterminated string) cannot
                    // be in a JSON string: the value ends here, as a parse error, and framing
                    // starts afresh, as QEMU's lexer does. Otherwise one stray quote would
                    // swallow every request after it.
                    out.push(Frame::Value(std::mem::take(&mut self.buf)));
                    self.depth = 0;
                    self.in_string = false;
                    self.escape = false;
                    continue;
                }
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        out.push(Frame::Value(std::mem::take(&mut self.buf)));
                    }
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > MAX_NESTING {
                        out.push(Frame::TooLarge("JSON nesting depth limit exceeded"));
                        return out;
                    }
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        out.push(Frame::Value(std::mem::take(&mut self.buf)));
                    }
                }
                _ => {}
            }
        }
        out
    }
}

/// A checked request.
#[derive(Debug)]
pub struct Request {
    /// The command name.
    pub execute: String,
    /// Its arguments (empty if absent).
    pub arguments: Map<String, Value>,
    /// The `id` to echo.
    pub id: Option<Value>,
}

/// Parses and checks one framed value as QEMU's dispatcher does. On error, returns the reply
/// (with the `id` if one could be read).
pub fn parse_request(text: &[u8]) -> Result<Request, (QmpError, Option<Value>)> {
    let v: Value = parse_json(text).map_err(|e| (QmpError::generic(e), None))?;
    let Value::Object(mut m) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = m.remove("id");
    let fail = |msg: String, id: &Option<Value>| Err((QmpError::generic(msg), id.clone()));
    let execute = match m.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into(), &id),
        None => {
            if m.contains_key("exec-oob") {
                return fail("QMP input member 'exec-oob' is unexpected".into(), &id);
            }
            return fail("QMP input lacks member 'execute'".into(), &id);
        }
    };
    let arguments = match m.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), &id),
    };
    if let Some(k) = m.keys().next() {
        return fail(format!("QMP input member '{k}' is unexpected"), &id);
    }
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// Parses a framed value (serde_json refuses nesting past 128 levels with a parse error).
fn parse_json(text: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(text).map_err(|e| format!("JSON parse error, {e}"))
}

/// Stack size of a client thread.
pub const CLIENT_STACK: usize = 4 << 20;

/// A reply.
pub fn reply(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(v) => {
            m.insert("return".into(), v);
        }
        Err(e) => {
            m.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
        }
    }
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// A client's write side, shared by its reader thread (replies) and the event thread.
pub struct ClientOut {
    stream: Mutex<UnixStream>,
    /// Capabilities negotiated: events flow.
    pub negotiated: std::sync::atomic::AtomicBool,
    /// Gone (a write failed or timed out).
    pub dead: std::sync::atomic::AtomicBool,
}

impl ClientOut {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> std::io::Result<ClientOut> {
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(ClientOut {
            stream: Mutex::new(stream),
            negotiated: Default::default(),
            dead: Default::default(),
        })
    }

    /// Sends one message (a line of JSON); marks the client dead on failure.
    pub fn send(&self, msg: &Value) -> bool {
        self.send_inner(msg, false)
    }

    /// Sends the reply that completes negotiation: the client is marked negotiated under
    /// the write lock, before the reply goes out, so an event raised once the client has
    /// the reply (by a command it then sends on another connection) reaches it, and none
    /// comes before the reply (QEMU's Python library expects the reply first).
    pub fn send_negotiated(&self, msg: &Value) -> bool {
        self.send_inner(msg, true)
    }

    fn send_inner(&self, msg: &Value, negotiated: bool) -> bool {
        use std::sync::atomic::Ordering;
        if self.dead.load(Ordering::Acquire) {
            return false;
        }
        let mut line = serde_json::to_vec(msg).unwrap_or_default();
        line.extend_from_slice(b"\r\n");
        let ok = {
            let mut stream = self.stream.lock();
            if negotiated {
                self.negotiated.store(true, Ordering::Release);
            }
            stream.write_all(&line).is_ok()
        };
        if !ok {
            self.dead.store(true, Ordering::Release);
            let _ = self.stream.lock().shutdown(std::net::Shutdown::Both);
        }
        ok
    }
}

/// What the server asks of the daemon.
pub trait Handler: Send + Sync + 'static {
    /// The greeting's `QMP` member.
    fn greeting(&self) -> Value;
    /// Runs one command (after negotiation).
    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError>;
    /// Registers a client for events.
    fn add_client(&self, c: Arc<ClientOut>);
}

/// Serves one connection until it closes.
pub fn serve_client<H: Handler>(h: Arc<H>, stream: UnixStream) {
    use std::sync::atomic::Ordering;
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let Ok(out) = ClientOut::new(stream) else {
        return;
    };
    let out = Arc::new(out);
    h.add_client(Arc::clone(&out));
    if !out.send(&json!({"QMP": h.greeting()})) {
        return;
    }
    let mut reader = read_half;
    let mut framer = Framer::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for frame in framer.push(&buf[..n]) {
            let text = match frame {
                Frame::Value(t) => t,
                Frame::TooLarge(why) => {
                    out.send(&reply(Err(QmpError::generic(why)), None));
                    out.dead.store(true, Ordering::Release);
                    let _ = reader.shutdown(std::net::Shutdown::Both);
                    return;
                }
            };
            let req = match parse_request(&text) {
                Ok(r) => r,
                Err((e, id)) => {
                    out.send(&reply(Err(e), id));
                    continue;
                }
            };
            let negotiated = out.negotiated.load(Ordering::Acquire);
            let result = match (req.execute.as_str(), negotiated) {
                ("qmp_capabilities", false) => negotiate(req.arguments),
                ("qmp_capabilities", true) => Err(QmpError::with_class(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                )),
                (_, false) => Err(QmpError::with_class(
                    "CommandNotFound",
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                )),
                (name, true) => h.execute(name, req.arguments),
            };
            let negotiating = result.is_ok() && req.execute == "qmp_capabilities";
            let msg = reply(result, req.id);
            let sent = if negotiating {
                out.send_negotiated(&msg)
            } else {
                out.send(&msg)
            };
            if !sent {
                return;
            }
        }
        if out.dead.load(Ordering::Acquire) {
            break;
        }
    }
    out.dead.store(true, Ordering::Release);
}

/// `qmp_capabilities`: no capability is offered, so only an empty `enable` is accepted.
fn negotiate(args: Map<String, Value>) -> Result<Value, QmpError> {
    let mut a = super::args::Args::new(args);
    if let Some(v) = a.take("enable") {
        let Value::Array(caps) = v else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        // QEMU's checks in its order: each item must be a string naming a QMPCapability
        // (its enum visitor's text, 'null' included), then none may be unavailable.
        for (i, c) in caps.iter().enumerate() {
            match c.as_str() {
                None => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for 'enable[{i}]', expected: string"
                    )))
                }
                Some("oob") => {}
                Some(other) => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'null' does not accept value '{other}'"
                    )))
                }
            }
        }
        if !caps.is_empty() {
            return Err(QmpError::generic("Capability 'oob' not available"));
        }
    }
    a.finish()?;
    Ok(json!({}))
}

/// Accepts connections on `listener` until the process ends, one thread per client.
pub fn serve<H: Handler>(h: Arc<H>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let h = Arc::clone(&h);
        let _ = std::thread::Builder::new()
            .name("qmp-client".into())
            .stack_size(CLIENT_STACK)
            .spawn(move || serve_client(h, stream));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &str) -> Vec<String> {
        Framer::default()
            .push(input.as_bytes())
            .into_iter()
            .map(|f| match f {
                Frame::Value(v) => String::from_utf8(v).unwrap(),
                Frame::TooLarge(w) => format!("!{w}"),
            })
            .collect()
    }

    #[test]
    fn framing_splits_values_across_strings_escapes_and_lines() {
        assert_eq!(
            frames("{\"a\": \"}\\\"{\"}\n{\"b\": [1, {\"c\": 2}]} 12 \"s\" ["),
            vec![
                "{\"a\": \"}\\\"{\"}",
                "{\"b\": [1, {\"c\": 2}]}",
                "12",
                "\"s\""
            ]
        );
        let mut f = Framer::default();
        assert!(f.push(b"{\"exec").is_empty());
        assert_eq!(f.push(b"ute\": 1}").len(), 1);
    }

    #[test]
    fn a_control_character_in_a_string_ends_the_value() {
        // An unterminated string: the newline ends it (an error), the next request frames.
        assert_eq!(
            frames("{\"execute\": \"nope}\n{\"execute\": \"x\", \"id\": 1}\n"),
            vec!["{\"execute\": \"nope}\n", "{\"execute\": \"x\", \"id\": 1}"]
        );
        assert!(parse_request(b"{\"execute\": \"nope}\n").is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = "[".repeat(MAX_NESTING + 1);
        assert_eq!(
            frames(&deep),
            vec!["!JSON nesting depth limit exceeded".to_string()]
        );
    }

    #[test]
    fn request_shape_errors_have_qemus_texts() {
        let err = |s: &str| parse_request(s.as_bytes()).unwrap_err().0.desc;
        assert_eq!(err("[1]"), "QMP input must be a JSON object");
        assert_eq!(err("{\"id\": 1}"), "QMP input lacks member 'execute'");
        assert_eq!(
            err("{\"execute\": 1}"),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            err("{\"execute\": \"x\", \"arguments\": 1}"),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            err("{\"execute\": \"x\", \"foo\": 1}"),
            "QMP input member 'foo' is unexpected"
        );
        assert!(err("{\"execute\": tru}").starts_with("JSON parse error"));
        let (_, id) = parse_request(b"{\"execute\": 1, \"id\": \"a\"}").unwrap_err();
        assert_eq!(id, Some(json!("a")));
    }
}
