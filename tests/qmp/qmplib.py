"""Shared harness of the QMP scenario scripts (tests/daemon_qmp.rs runs them).

Each scenario is an async function that drives one daemon through a `Daemon` object. The
harness runs it against qemu-storage-daemon and against `strata daemon`, both started with
qemu-storage-daemon's own launch syntax (only the program name differs), each in a fresh
directory with images made by qemu-img/qemu-io, and compares what was recorded:

- every command's reply (`Daemon.cmd`), in order, labelled;
- every event, grouped by job (concurrent jobs interleave differently from run to run);
- whatever the scenario records itself (`Daemon.record`: final graphs, image maps, ...).

Before comparing, both transcripts are normalised (`normalise`): timestamps dropped, the
run's directory replaced by `$DIR`, implicit node names (`#blockNNN`) made anonymous, node
lists sorted, the paused/running and standby/ready churn that drains cause in QEMU removed
from the status sequences, and the fields listed in `STRATA_OMITS` removed (strata does not
fill them, on purpose; the reasons are given there). Steps whose label is in the scenario's
`deliberate` map may differ: both sides are printed with the reason, and the scenario itself
asserts what strata must answer there.

The programs come from the environment: STRATA_BIN (the strata binary) and QSD_BIN
(qemu-storage-daemon). Scripts take the case names to run as arguments (none: all).
"""

import asyncio
import copy
import difflib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

from qemu.qmp import QMPClient

STRATA_BIN = os.environ.get("STRATA_BIN", "strata")
QSD_BIN = os.environ.get("QSD_BIN", "qemu-storage-daemon")

PROGRAMS = {
    "qemu": [QSD_BIN],
    "strata": [STRATA_BIN, "daemon"],
}

KIB = 1024
MIB = 1024 * KIB

# Fields of QEMU's replies that strata does not fill, on purpose, removed from both sides
# before comparing (path patterns: `*` is any one key or list index).
STRATA_OMITS = {
    # QEMU's greeting offers out-of-band execution; strata runs every command in band.
    "greeting/QMP/capabilities": "no out-of-band execution (no 'oob' capability)",
    "greeting/QMP/version/package": "the package string names the implementation",
    "query-version/package": "the package string names the implementation",
    # query-blockstats: QEMU accounts I/O on BlockBackends only, so every node of a
    # qemu-storage-daemon without exports shows zeroes; strata counts each node's requests,
    # which is what query-nodes is for. The per-node counters are compared in strata's own
    # checks; here only the shape (the node list) is compared.
    # (The member names are compared: `blockstats` in protocol.py.)
    "query-blockstats/*/stats": "strata counts each node's own requests (QEMU: zeroes)",
    "query-blockstats/*/parent": "strata has no separate accounting of a node's file child",
    "query-blockstats/*/driver-specific": "no file-posix discard counters",
}

# The job events, and the data member that names the job.
JOB_EVENTS = {
    "JOB_STATUS_CHANGE": "id",
    "BLOCK_JOB_PENDING": "id",
    "BLOCK_JOB_COMPLETED": "device",
    "BLOCK_JOB_CANCELLED": "device",
    "BLOCK_JOB_READY": "device",
    "BLOCK_JOB_ERROR": "device",
}


class ScenarioError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


def run(*argv, cwd=None):
    """Runs a tool; fails with its output."""
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise ScenarioError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p.stdout


def create_image(path, length):
    """iotests.create_image: each 512-byte sector holds its index (big-endian) in its first
    and last four bytes, zeroes between (struct '>l504xl')."""
    with open(path, "wb") as f:
        for i in range(length // 512):
            b = i.to_bytes(4, "big")
            f.write(b + bytes(504) + b)


def qemu_img(*args):
    return run("qemu-img", *args)


def qemu_io(*args):
    return run("qemu-io", *args)


def create_qcow2_chain(base, *overlays, size="4M"):
    """qemu-img: `base` a qcow2 image of `size`, each of `overlays` a qcow2 image over the one
    before it."""
    qemu_img("create", "-q", "-f", "qcow2", base, size)
    below = base
    for img in overlays:
        qemu_img("create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2", img)
        below = img


def three_image_chain(d, data_len):
    """base <- mid <- top (qcow2, 4 MiB) in `d`'s directory, image i holding 0x11 * (i + 1) in
    `data_len` bytes from i MiB, and top-before.raw (what top reads); returns the three paths
    and a blockdev that opens them as the nodes base, mid and top."""
    base, mid, top = d.path("base.qcow2"), d.path("mid.qcow2"), d.path("top.qcow2")
    create_qcow2_chain(base, mid, top)
    for i, img in enumerate((base, mid, top)):
        qemu_io("-f", "qcow2", "-c", f"write -P {0x11 * (i + 1)} {i}M {data_len}", img)
    qemu_img("convert", "-O", "raw", top, d.path("top-before.raw"))
    blockdev = {"driver": "qcow2", "node-name": "top",
                "file": {"driver": "file", "filename": top},
                "backing": {"driver": "qcow2", "node-name": "mid",
                            "file": {"driver": "file", "filename": mid},
                            "backing": {"driver": "qcow2", "node-name": "base",
                                        "file": {"driver": "file", "filename": base}}}}
    return base, mid, top, blockdev


def img_map(path, fmt="qcow2"):
    """`qemu-io -c map` of an image (its allocation, as iotests compare it)."""
    return qemu_io("-f", fmt, "-r", "-U", "-c", "map", path)


# ---------------------------------------------------------------------------------------
# A daemon under test
# ---------------------------------------------------------------------------------------


def file_node(path, **extra):
    d = {"driver": "file", "filename": path}
    d.update(extra)
    return d


def qcow2_node(name, path, backing=None, **extra):
    d = {"driver": "qcow2", "file": file_node(path)}
    if name is not None:
        d["node-name"] = name
    if backing is not None:
        d["backing"] = backing
    d.update(extra)
    return d


class Daemon:
    """One daemon (kind 'qemu' or 'strata') serving a scenario in directory `dir`."""

    def __init__(self, kind, dir):
        self.kind = kind
        self.dir = dir
        self.sock = os.path.join(dir, "qmp.sock")
        self.proc = None
        self.qmp = None
        self.clients = []
        self.log = []
        self.events = []
        self._consumed = set()
        self._event_task = None
        self._new_event = asyncio.Event()
        self.stderr_path = os.path.join(dir, f"{kind}.log")
        # Checks run after the daemon stopped: (label, function returning a value).
        self.after = []
        # More launch options (more monitors).
        self.extra_args = []

    def path(self, name):
        return os.path.join(self.dir, name)

    # -- process -----------------------------------------------------------------------

    def argv(self, blockdevs=(), objects=(), sock=None):
        sock = sock or self.sock
        argv = list(PROGRAMS[self.kind])
        for o in objects:
            argv += ["--object", o]
        argv += [
            "--chardev",
            f"socket,path={sock},server=on,wait=off,id=m",
            "--monitor",
            "chardev=m",
        ]
        argv += self.extra_args
        for b in blockdevs:
            argv += ["--blockdev", b if isinstance(b, str) else json.dumps(b)]
        return argv

    async def start(self, blockdevs=(), objects=(), connect=True):
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            self.argv(blockdevs, objects),
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise ScenarioError(f"{self.kind} exited at start:\n{self.output()}")
            if time.monotonic() > deadline:
                raise ScenarioError(f"{self.kind}: no socket after 20 s")
            await asyncio.sleep(0.01)
        # The socket file exists from bind(); connections are refused until listen().
        while True:
            try:
                probe = socket.socket(socket.AF_UNIX)
                probe.connect(self.sock)
                probe.close()
                break
            except ConnectionRefusedError:
                probe.close()
                if self.proc.poll() is not None:
                    raise ScenarioError(f"{self.kind} exited at start:\n{self.output()}")
                if time.monotonic() > deadline:
                    raise ScenarioError(f"{self.kind}: socket refuses connections")
                await asyncio.sleep(0.01)
        if connect:
            try:
                self.qmp = await self.connect("main")
            except Exception as e:
                await asyncio.sleep(0.2)
                if self.proc.poll() is not None:
                    raise ScenarioError(f"{self.kind} exited at start:\n{self.output()}")
                raise
            self._event_task = asyncio.create_task(self._collect_events(self.qmp))
            self.record("greeting", self.qmp.greeting._asdict())
        return self

    def output(self):
        try:
            with open(self.stderr_path) as f:
                return f.read()
        except OSError:
            return ""

    async def connect(self, name="client", negotiate=True):
        c = QMPClient(name)
        c.negotiate = negotiate
        await c.connect(self.sock)
        self.clients.append(c)
        return c

    async def _collect_events(self, client):
        async for ev in client.events:
            self.events.append(dict(ev))
            self._new_event.set()

    async def stop(self, sig=signal.SIGTERM, timeout=30):
        """Ends the daemon with `sig` (None: waits for it to end, after `quit`); returns its
        exit code."""
        if sig is None and self.proc is not None:
            # After `quit`: the clients stay connected until the daemon is gone, so they
            # receive what it announces on its way out.
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(0.1)
        for c in self.clients:
            try:
                await c.disconnect()
            except Exception:
                pass
        self.clients = []
        if self._event_task:
            self._event_task.cancel()
        if self.proc is None:
            return None
        if self.proc.poll() is None and sig is not None:
            self.proc.send_signal(sig)
        try:
            rc = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            self.proc.wait()
            raise ScenarioError(f"{self.kind} did not exit {timeout} s after {sig!r}")
        self._stderr.close()
        return rc

    # -- commands ----------------------------------------------------------------------

    async def cmd(self, name, args=None, label=None, record=True, client=None):
        """Runs a command; returns the reply ({'return': ...} or {'error': ...}, no id)."""
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        reply = await (client or self.qmp)._raw(msg)
        r = {k: v for k, v in dict(reply).items() if k != "id"}
        if record:
            self.log.append({"label": label or name, "cmd": name, "args": args, "reply": r})
        return r

    async def ok(self, name, args=None, label=None, record=True):
        """Runs a command that must succeed; returns its value."""
        r = await self.cmd(name, args, label, record)
        if "return" not in r:
            raise ScenarioError(f"{self.kind}: {name} {json.dumps(args)} failed: {r}")
        return r["return"]

    def record(self, label, value):
        """Records something the scenario observed, to compare."""
        self.log.append({"label": label, "value": value})

    # -- events ------------------------------------------------------------------------

    async def event(self, name, timeout=60, **data):
        """Waits for the next not yet consumed event `name` whose data has `data`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if i in self._consumed or ev.get("event") != name:
                    continue
                d = ev.get("data", {})
                if all(d.get(k) == v for k, v in data.items()):
                    self._consumed.add(i)
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScenarioError(
                    f"{self.kind}: no {name} {data} in {timeout} s; events:\n"
                    + "\n".join(json.dumps(e) for e in self.events)
                )
            self._new_event.clear()
            try:
                await asyncio.wait_for(self._new_event.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    async def wait_status(self, job, status, timeout=60):
        return await self.event("JOB_STATUS_CHANGE", timeout, id=job, status=status)

    async def wait_completed(self, job, timeout=60, complete_on_ready=True):
        """Waits for BLOCK_JOB_COMPLETED of `job` (completing it when it becomes ready)."""
        deadline = time.monotonic() + timeout
        ready_done = False
        while True:
            for i, ev in enumerate(self.events):
                if i in self._consumed:
                    continue
                d = ev.get("data", {})
                if d.get("device") != job:
                    continue
                if ev["event"] == "BLOCK_JOB_READY" and complete_on_ready and not ready_done:
                    self._consumed.add(i)
                    ready_done = True
                    await self.ok("block-job-complete", {"device": job}, label=f"complete {job}")
                elif ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                    self._consumed.add(i)
                    return ev
            if time.monotonic() > deadline:
                raise ScenarioError(
                    f"{self.kind}: job {job} did not complete in {timeout} s; events:\n"
                    + "\n".join(json.dumps(e) for e in self.events)
                )
            self._new_event.clear()
            try:
                await asyncio.wait_for(self._new_event.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def wait_job_gone(self, job, timeout=60):
        """Waits for `job`'s last event (status null: auto-dismissed) and until it left
        query-jobs."""
        await self.wait_status(job, "null", timeout)
        deadline = time.monotonic() + timeout
        while True:
            jobs = await self.ok("query-jobs", record=False)
            if all(j["id"] != job for j in jobs):
                return
            if time.monotonic() > deadline:
                raise ScenarioError(f"{self.kind}: job {job} still listed: {jobs}")
            await asyncio.sleep(0.02)

    async def wait_offset(self, job, offset, timeout=30):
        """Waits until query-block-jobs shows `job` at `offset` at least (a rate-limited
        job that copied its first chunk, and now sleeps)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = await self.ok("query-block-jobs", record=False)
            j = next((j for j in jobs if j["device"] == job), None)
            if j and j["offset"] >= offset:
                return j
            if time.monotonic() > deadline:
                raise ScenarioError(f"{self.kind}: job {job} not at {offset}: {jobs}")
            await asyncio.sleep(0.01)

    async def assert_no_jobs(self, label="no jobs"):
        await self.ok("query-block-jobs", label=label)

    async def graph(self, label="graph", flat=True):
        """Records query-named-block-nodes (normalised when compared)."""
        return await self.ok("query-named-block-nodes", {"flat": flat} if flat else None, label=label)


# ---------------------------------------------------------------------------------------
# Normalisation and comparison
# ---------------------------------------------------------------------------------------

IMPLICIT = re.compile(r"#block\d+")


def _json_filename(s):
    """The file a `json:{...}` pseudo-filename opens. QEMU names a node whose options
    cannot be told by a plain file name (blkdebug with inject-error, an explicit backing
    spec) with one of these; strata names every node by the file it reads (deliberate:
    strata neither makes nor opens json: names), so QEMU's is reduced to that file."""
    try:
        o = json.loads(s[len("json:"):])
    except ValueError:
        return s

    def plain(o):
        if not isinstance(o, dict):
            return None
        if isinstance(o.get("filename"), str):
            return o["filename"]
        if o.get("driver") == "null-co":
            return "null-co://"
        for key in ("file", "image"):
            r = plain(o.get(key))
            if r:
                return r
        return None

    return plain(o) or s


def _strip_paths(v, dirs):
    if isinstance(v, str):
        if v.startswith("json:{"):
            v = _json_filename(v)
        for d in dirs:
            v = v.replace(d, "$DIR")
        return IMPLICIT.sub("#block", v)
    if isinstance(v, list):
        return [_strip_paths(x, dirs) for x in v]
    if isinstance(v, dict):
        return {k: _strip_paths(x, dirs) for k, x in v.items()}
    return v


def _remove_path(v, parts):
    """Removes the member at `parts` (a list of keys, '*' for any) from v."""
    if not parts:
        return
    head, rest = parts[0], parts[1:]
    if isinstance(v, dict):
        keys = list(v.keys()) if head == "*" else [head]
        for k in keys:
            if k not in v:
                continue
            if rest:
                _remove_path(v[k], rest)
            else:
                del v[k]
    elif isinstance(v, list) and head == "*":
        for x in v:
            if rest:
                _remove_path(x, rest)


def _sort_key(x):
    name = x.get("node-name", "") if isinstance(x, dict) else ""
    return (IMPLICIT.sub("#block", name), json.dumps(x, sort_keys=True))


def _mask_image(img):
    """Sizes that depend on how the writer laid the file out (which clusters, which
    refcount blocks, what is preallocated): the file's length and allocation."""
    if not isinstance(img, dict):
        return
    if "actual-size" in img:
        img["actual-size"] = "*"
    if img.get("format") == "file" and "virtual-size" in img:
        img["virtual-size"] = "*"
    if "backing-image" in img:
        _mask_image(img["backing-image"])


def normalise_reply(cmd, args, reply, mask_sizes):
    r = copy.deepcopy(reply)
    for path in STRATA_OMITS:
        parts = path.split("/")
        if parts[0] == cmd and "return" in r:
            if len(parts) == 1:
                continue
            _remove_path({"return": r["return"]}, ["return"] + parts[1:])
    ret = r.get("return")
    if cmd == "query-named-block-nodes" and isinstance(ret, list):
        for n in ret:
            if mask_sizes:
                _mask_image(n.get("image"))
        r["return"] = sorted(ret, key=_sort_key)
    if cmd == "query-blockstats" and isinstance(ret, list):
        r["return"] = sorted(ret, key=_sort_key)
    if cmd in ("query-block-jobs", "query-jobs") and isinstance(ret, list):
        r["return"] = sorted(ret, key=_sort_key)
    return r


def churn_free(statuses):
    """A status sequence without the paused/running and standby/ready pairs that drains
    (and pauses) cause, and without the created/null pair of a job refused as it was
    created: QEMU creates the job before it checks some arguments (a negative speed) and
    announces it, strata checks them first (deliberate: no job, no events)."""
    out = []
    for s in statuses:
        if out and (out[-1], s) in (("paused", "running"), ("standby", "ready"),
                                    ("created", "null")):
            out.pop()
            continue
        out.append(s)
    return out


def job_events(events):
    """Events grouped by job: {job: [event, ...]} in arrival order, status changes folded
    into one churn-free list per job, in place of the first one."""
    per = {}
    other = []
    for ev in events:
        name = ev.get("event")
        key = JOB_EVENTS.get(name)
        data = ev.get("data", {})
        if key is None:
            other.append({"event": name, "data": data})
            continue
        per.setdefault(data.get(key), []).append({"event": name, "data": data})
    out = {}
    for job, evs in per.items():
        seq = []
        statuses = []
        for e in evs:
            if e["event"] == "JOB_STATUS_CHANGE":
                statuses.append(e["data"]["status"])
                continue
            # Which status the job had announced when this event came: the event's place
            # in the status sequence (after churn removal).
            seq.append({"after": churn_free(statuses)[-1:] or [None], **e})
        if churn_free(statuses) or seq:
            out[job] = {"statuses": churn_free(statuses), "events": seq}
    if other:
        out["(other)"] = other
    return out


def normalise(d, mask_sizes=True):
    """The comparable transcript of a daemon run: (steps, events by job)."""
    entries = []
    for e in d.log:
        if "cmd" in e:
            rep = normalise_reply(e["cmd"], e["args"], e["reply"], mask_sizes)
            entries.append({"label": e["label"], "cmd": e["cmd"], "args": e["args"], "reply": rep})
        else:
            v = copy.deepcopy(e["value"])
            if e["label"] == "greeting" and isinstance(v, dict):
                for path in STRATA_OMITS:
                    parts = path.split("/")
                    if parts[0] == "greeting":
                        _remove_path(v, parts[1:])
            entries.append({"label": e["label"], "value": v})
    dirs = [d.dir, os.path.realpath(d.dir)]
    return _strip_paths(entries, dirs), _strip_paths(job_events(d.events), dirs)


def _diff(a, b):
    ja = json.dumps(a, indent=1, sort_keys=True).splitlines()
    jb = json.dumps(b, indent=1, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(ja, jb, "qemu", "strata", lineterm="", n=4))


def compare(name, q, s, deliberate, known=None):
    """Compares the normalised transcripts; returns a list of problems. A step (or the
    events of a job, labelled 'events of JOB') named in `deliberate` may differ. One named
    in `known` is a difference that is a bug, reported and not yet fixed: it is printed,
    and fails only with STRATA_QMP_STRICT=1."""
    known = known or {}
    strict = bool(os.environ.get("STRATA_QMP_STRICT"))
    (qs, qe), (ss, se) = q, s
    problems = []
    # Align the steps by label: a step one side has and the other has not is reported
    # once, and the rest still line up.
    sm = difflib.SequenceMatcher(a=[e["label"] for e in qs], b=[e["label"] for e in ss],
                                 autojunk=False)
    pairs = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            pairs += list(zip(qs[i1:i2], ss[j1:j2]))
            continue
        extra = [("qemu only", e) for e in qs[i1:i2]] + [("strata only", e) for e in ss[j1:j2]]
        if op == "replace" and i2 - i1 == j2 - j1:
            pairs += list(zip(qs[i1:i2], ss[j1:j2]))
            continue
        labels = {e["label"] for _, e in extra}
        if labels and labels <= set(deliberate):
            print(f"  deliberate difference in steps: {sorted(labels)}")
            continue
        if labels and labels <= set(known) and not strict:
            print(f"  KNOWN DIFFERENCE (a bug, reported) in steps: {sorted(labels)}: "
                  f"{known[next(iter(labels))]}")
            continue
        problems.append(f"{name}: steps on one side only:\n" + "\n".join(
            f"  {side}: {json.dumps(e)}" for side, e in extra))
    for job in sorted(set(qe) | set(se), key=str):
        pairs.append(({"label": f"events of {job}", "value": qe.get(job)},
                      {"label": f"events of {job}", "value": se.get(job)}))
    for a, b in pairs:
        if a == b:
            continue
        label = a["label"]
        if label in deliberate and a["label"] == b["label"]:
            print(f"  deliberate difference at '{label}': {deliberate[label]}\n{_diff(a, b)}")
            continue
        if label in known and a["label"] == b["label"] and not strict:
            print(f"  KNOWN DIFFERENCE (a bug, reported) at '{label}': {known[label]}\n"
                  f"{_diff(a, b)}")
            continue
        problems.append(f"{name}: step '{label}' differs:\n{_diff(a, b)}")
    return problems


# ---------------------------------------------------------------------------------------
# Running a scenario against both
# ---------------------------------------------------------------------------------------


def workdir(tag):
    root = os.environ.get("STRATA_QMP_TMP") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", tag)
    return tempfile.mkdtemp(prefix=f"strata-qmp-{tag}-", dir=root)


async def run_one(kind, name, scenario, setup):
    d = Daemon(kind, workdir(f"{name}-{kind}"))
    ok = False
    try:
        ctx = setup(d) if setup else None
        await scenario(d, ctx)
        rc = await d.stop()
        d.record("exit code", rc)
        for label, fn in d.after:
            d.record(label, fn())
        ok = True
        return d
    finally:
        try:
            await d.stop()
        except Exception as e:
            if ok:
                raise
            print(f"  ({kind}: stop failed too: {e})")
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        if not ok:
            print(f"--- {kind} output:\n{d.output()}")
        if ok or not os.environ.get("STRATA_QMP_KEEP"):
            shutil.rmtree(d.dir, ignore_errors=True)


async def both(name, scenario, setup=None, deliberate=None, mask_sizes=True, known=None):
    """Runs `scenario` against qemu-storage-daemon, then strata; compares. Returns the
    problems found (empty: they match)."""
    t0 = time.monotonic()
    q = await run_one("qemu", name, scenario, setup)
    t1 = time.monotonic()
    s = await run_one("strata", name, scenario, setup)
    t2 = time.monotonic()
    nq, ns = normalise(q, mask_sizes), normalise(s, mask_sizes)
    if os.environ.get("STRATA_QMP_VERBOSE"):
        print(json.dumps({"qemu": nq, "strata": ns}, indent=1))
    problems = compare(name, nq, ns, deliberate or {}, known)
    print(f"{name}: qemu {t1 - t0:.1f} s, strata {t2 - t1:.1f} s, {len(q.log)} steps, "
          f"{len(q.events)}/{len(s.events)} events"
          f"{'' if problems else ', match'}")
    return problems


def main(cases):
    """Runs the named cases (argv; none: all). `cases` maps a name to a coroutine function
    returning a list of problems."""
    names = sys.argv[1:] or list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        print(f"unknown cases {unknown}; known: {list(cases)}")
        sys.exit(2)
    problems = []
    for n in names:
        try:
            problems += asyncio.run(cases[n]()) or []
        except ScenarioError as e:
            problems.append(f"{n}: {e}")
        except Exception:
            problems.append(f"{n}: {traceback.format_exc()}")
    if problems:
        print("\n\n".join(problems))
        print(f"\nFAILED: {len(problems)} problem(s)")
        sys.exit(1)
    print("ok")
