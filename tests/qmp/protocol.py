"""The QMP protocol and argument errors, against qemu-storage-daemon and strata daemon.

- negotiation: the greeting; commands before qmp_capabilities (CommandNotFound), bad
  `enable` lists, negotiating twice; the request shape errors, each with its `id` echoed
  (strings, numbers, objects); several requests in one write and one request over two.
- framing: JSON that does not parse (QEMU's text is "JSON parse error, " and its lexer's
  words, strata's its parser's: only the prefix is compared), non-objects, stray bytes
  before a request (the stream resynchronises), nesting too deep.
- arguments: QEMU's texts for a missing, unexpected or mistyped member, an unknown enum
  value, an unknown command, a device or node that does not exist, job verbs on no job.
- blockdev: blockdev-add in its forms (inline children, references, `backing: null`,
  read-only, cache, discard), the graph as query-named-block-nodes shows it (flat and
  nested), query-blockstats' node list, blockdev-del of a node in use and not in use,
  blockdev-snapshot and its errors; query-version and the command list.
"""

import asyncio
import json
import os

from qmplib import MIB, both, create_qcow2_chain, main, qemu_img, qemu_io


class Raw:
    """A QMP client on the bare socket, for what QMPClient will not send."""

    async def open(self, d):
        self.r, self.w = await asyncio.open_unix_connection(d.sock, limit=1 << 26)
        self.greeting = json.loads(await asyncio.wait_for(self.r.readline(), 10))
        return self

    async def send(self, data):
        self.w.write(data.encode() if isinstance(data, str) else data)
        await self.w.drain()

    async def replies(self, n=1, timeout=5.0):
        """The next n messages that are not events ('EOF' if the server hung up)."""
        out = []
        while len(out) < n:
            try:
                line = await asyncio.wait_for(self.r.readline(), timeout)
            except asyncio.TimeoutError:
                out.append("TIMEOUT")
                break
            except ConnectionResetError:
                out.append("EOF")
                break
            if not line:
                out.append("EOF")
                break
            msg = json.loads(line)
            if "event" in msg:
                continue
            out.append(msg)
        return out

    async def req(self, data, n=1):
        await self.send(data)
        return await self.replies(n)

    async def until_sync(self, data):
        """Sends `data` and a request with a fresh id; returns every reply before that
        request's, runs of identical parse errors folded into one (QEMU answers each stray
        byte, strata each stretch of bytes before a value starts: deliberate)."""
        self.n = getattr(self, "n", 0) + 1
        sync = f"sync-{self.n}"
        await self.send(data)
        await self.send(json.dumps({"execute": "query-jobs", "id": sync}) + "\n")
        out = []
        while True:
            r = await self.replies(1)
            if r[0] in ("EOF", "TIMEOUT") or r[0].get("id") == sync:
                if r[0] in ("EOF", "TIMEOUT"):
                    out.append(r[0])
                break
            r = parse_error_prefix(r)[0]
            if not (out and out[-1] == r and "JSON parse error" in json.dumps(r)):
                out.append(r)
        return out

    def close(self):
        self.w.close()


def parse_error_prefix(replies):
    """QEMU words a parse error with its lexer's terms, strata with its parser's: both
    start "JSON parse error, "; only that is compared."""
    out = []
    for r in replies:
        if isinstance(r, dict) and r.get("error", {}).get("desc", "").startswith(
                "JSON parse error, "):
            r = dict(r, error=dict(r["error"], desc="JSON parse error, ..."))
        out.append(r)
    return out


# -- negotiation ------------------------------------------------------------------------

NEGOTIATION = [
    ("before negotiation", '{"execute": "query-version", "id": "early"}\n'),
    ("enable not a list", '{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}\n'),
    ("enable a number", '{"execute": "qmp_capabilities", "arguments": {"enable": [1]}}\n'),
    ("enable unknown", '{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}}\n'),
    ("negotiate with junk", '{"execute": "qmp_capabilities", "arguments": {"x": 1}}\n'),
    ("unknown before negotiation", '{"execute": "nope", "id": 0}\n'),
    ("negotiate", '{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 5}\n'),
    ("negotiate again", '{"execute": "qmp_capabilities", "id": 6}\n'),
    ("unknown command", '{"execute": "nope", "id": 7}\n'),
    ("id string", '{"execute": "query-version", "id": "abc"}\n'),
    ("id number", '{"execute": "nope", "id": 3.5}\n'),
    ("id object", '{"execute": "nope", "id": {"a": [1, "b"]}}\n'),
    ("id null", '{"execute": "nope", "id": null}\n'),
    ("not an object", '[1, 2]\n'),
    ("string", '"query-version"\n'),
    ("number", '12\n'),
    ("no execute", '{"id": 1}\n'),
    ("execute not a string", '{"execute": 1, "id": "a"}\n'),
    ("arguments not an object", '{"execute": "nope", "arguments": [], "id": {"a": [1]}}\n'),
    ("unexpected member", '{"execute": "nope", "foo": 1, "id": 2}\n'),
    ("exec-oob without oob", '{"exec-oob": "query-version", "id": 3}\n'),
    ("arguments to query-version", '{"execute": "query-version", "arguments": {"a": 1}}\n'),
]


async def negotiation(d, ctx):
    # Raw clients only: a qemu-storage-daemon monitor serves one client at a time.
    await d.start(connect=False)
    raw = await Raw().open(d)
    d.record("greeting", raw.greeting)
    for label, msg in NEGOTIATION:
        r = await raw.req(msg)
        if label == "id string":
            r = [{"id": x.get("id"), "has return": "return" in x} for x in r]
        d.record(label, r)
    # Two requests in one write; one request in two writes.
    d.record("two in one write", await raw.req(
        '{"execute": "nope", "id": 10}{"execute": "query-jobs", "id": 11}', 2))
    await raw.send('{"execute": "nope", ')
    await asyncio.sleep(0.1)
    d.record("one in two writes", await raw.req('"id": 12}\n'))
    raw.close()
    await asyncio.sleep(0.1)
    # The next client must negotiate on its own.
    raw2 = await Raw().open(d)
    d.record("second client greeting", sorted(raw2.greeting["QMP"]))
    d.record("second client not negotiated", await raw2.req('{"execute": "query-jobs"}\n'))
    raw2.close()


# -- framing ----------------------------------------------------------------------------

async def framing(d, ctx):
    await d.start(connect=False)
    raw = await Raw().open(d)
    await raw.req('{"execute": "qmp_capabilities"}\n')
    for label, msg in [
        ("bad keyword", '{"execute": tru}\n'),
        ("closing brace", '}\n'),
        ("bare word", 'xyz\n'),
        ("stray bytes, then a request", b'\xff\xfe{"execute": "nope", "id": 9}\n'),
        ("control bytes", b'\x00\x01\x02\n'),
        ("null", 'null\n'),
        ("true", 'true\n'),
        ("string with a newline", '"a\nb"\n'),
        ("bad escape", '{"execute": "\\q"}\n'),
        ("unterminated string then more", '{"execute": "nope}\n{"execute": "nope", "id": 1}\n'),
    ]:
        d.record(label, await raw.until_sync(msg))
    d.record("still serving", await raw.req('{"execute": "query-jobs", "id": "x"}\n'))
    # 2,000 open brackets: past QEMU's nesting limit (1024). QEMU answers and goes on
    # reading; strata answers and hangs up (deliberate: what follows cannot be framed).
    r = await raw.req("[" * 2000 + "\n", 2 if d.kind == "strata" else 1)
    d.record("deep nesting", r)
    assert r[0] == {"error": {"class": "GenericError",
                              "desc": "JSON nesting depth limit exceeded"}}, r
    raw.close()
    await asyncio.sleep(0.1)
    # The daemon serves new clients afterwards.
    raw = await Raw().open(d)
    d.record("new client after", await raw.req('{"execute": "qmp_capabilities"}\n'))
    raw.close()


# -- arguments --------------------------------------------------------------------------

ARGUMENTS = [
    ("block-stream", {"device": "X"}, "device not found"),
    ("block-stream", {"device": "X", "speed": "1"}, "speed a string"),
    ("block-stream", {"device": "X", "speed": 1.5}, "speed a float"),
    ("block-stream", {"device": "X", "speed": 2 ** 64 - 1}, "speed too big"),
    ("block-stream", {"device": 1}, "device a number"),
    ("block-stream", {}, "device missing"),
    ("block-stream", {"device": "X", "x": 1}, "unexpected parameter"),
    ("block-stream", {"device": "X", "on-error": "never"}, "bad enum"),
    ("block-stream", {"device": "X", "auto-finalize": "yes"}, "bool a string"),
    ("block-commit", {"device": "X", "job-id": "j"}, "commit device not found"),
    ("block-job-set-speed", {"device": "j", "speed": 1}, "set-speed of no job"),
    ("block-job-set-speed", {"device": "j", "speed": "1"}, "set-speed speed a string"),
    ("block-job-set-speed", {"device": "j"}, "set-speed speed missing"),
    ("block-job-pause", {"device": "j"}, "pause no job"),
    ("block-job-resume", {"device": "j"}, "resume no job"),
    ("block-job-cancel", {"device": "j"}, "cancel no job"),
    ("block-job-complete", {"device": "j"}, "complete no job"),
    ("block-job-finalize", {"id": "j"}, "finalize no job"),
    ("block-job-dismiss", {"id": "j"}, "dismiss no job"),
    ("job-pause", {"id": "j"}, "job-pause no job"),
    ("job-resume", {"id": "j"}, "job-resume no job"),
    ("job-cancel", {"id": "j"}, "job-cancel no job"),
    ("job-complete", {"id": "j"}, "job-complete no job"),
    ("job-finalize", {"id": "j"}, "job-finalize no job"),
    ("job-dismiss", {"id": "j"}, "job-dismiss no job"),
    ("job-dismiss", {}, "job-dismiss id missing"),
    ("blockdev-del", {"node-name": "j"}, "del no node"),
    ("blockdev-del", {}, "del name missing"),
    ("blockdev-snapshot", {"node": "a", "overlay": "b"}, "snapshot no node"),
    ("query-named-block-nodes", {"flat": 1}, "flat a number"),
    ("query-blockstats", {"query-nodes": "yes"}, "query-nodes a string"),
    ("query-jobs", {"x": 1}, "query-jobs unexpected"),
    ("x-blockdev-set-iothread", {"node-name": "x", "iothread": "nope"},
     "set-iothread no node"),
    ("object-del", {"id": "nope"}, "object-del no object"),
    ("object-add", {"qom-type": "iothread"}, "object-add id missing"),
]


async def arguments(d, ctx):
    await d.start()
    for cmd, args, label in ARGUMENTS:
        r = await d.cmd(cmd, args, label=label)
        assert "error" in r, (label, r)
    # The texts the issue names, asserted on both.
    by = {e["label"]: e["reply"] for e in d.log if "reply" in e}
    assert by["device not found"]["error"]["desc"] == \
        "Cannot find device='X' nor node-name='X'", by["device not found"]
    assert by["unexpected parameter"]["error"]["desc"] == "Parameter 'x' is unexpected"
    assert by["speed a string"]["error"]["desc"] == \
        "Invalid parameter type for 'speed', expected: integer"
    r = await d.cmd("no-such-command", label="command not found")
    assert r["error"]["class"] == "CommandNotFound", r


# -- blockdev ---------------------------------------------------------------------------

def blockdev_setup(d):
    base, top, snap = d.path("base.qcow2"), d.path("top.qcow2"), d.path("snap.qcow2")
    create_qcow2_chain(base, top, snap)
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 1M", base)
    qemu_io("-f", "qcow2", "-c", "write -P 0xa5 1M 1M", top)
    raw = d.path("disk.raw")
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    raw2 = d.path("disk,2.raw")
    qemu_img("create", "-q", "-f", "raw", raw2, "2M")
    return {"base": base, "top": top, "snap": snap, "raw": raw, "raw2": raw2}


async def blockdev(d, ctx):
    # Launch-time nodes: JSON (a file node; a chain with an inline backing) and QEMU's
    # keyval form (booleans, numbers, nested members, a ",," in a file name).
    await d.start(blockdevs=[
        "driver=null-co,node-name=kv-null,size=1048576,read-zeroes=on",
        "driver=raw,node-name=kv-raw,read-only=on,file.driver=file,file.filename="
        + ctx["raw2"].replace(",", ",,") + ",cache.no-flush=on",
        {"driver": "file", "node-name": "raw-file", "filename": ctx["raw"],
         "cache": {"direct": False, "no-flush": True}, "discard": "unmap"},
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": ctx["top"]},
         "backing": {"driver": "qcow2", "node-name": "base",
                     "file": {"driver": "file", "filename": ctx["base"]}}},
    ])
    # The format node gets the cache options of its file node, as libvirt gives them.
    # (Known difference, not deliberate: strata shows a format node the cache flags of the
    # file node below it, QEMU the node's own open flags; they differ only when the options
    # differ between the two.)
    await d.ok("blockdev-add", {"driver": "raw", "node-name": "raw", "file": "raw-file",
                                "cache": {"direct": False, "no-flush": True}})
    await d.ok("blockdev-add", {"driver": "null-co", "node-name": "null", "size": MIB,
                                "read-zeroes": True})
    await d.ok("blockdev-add", {"driver": "qcow2", "node-name": "snap", "backing": None,
                                "file": {"driver": "file", "filename": ctx["snap"]}})
    await d.graph("graph, flat")
    await d.graph("graph, nested", flat=False)
    r = await d.ok("query-blockstats", {"query-nodes": True}, label="blockstats nodes")
    await d.cmd("query-blockstats", label="blockstats devices")
    d.record("blockstats node names", sorted(x["node-name"] for x in r
                                             if not x["node-name"].startswith("#")))
    # The counters differ (QEMU counts on BlockBackends only), the members must not.
    d.record("blockstats members", sorted({k for x in r for k in x["stats"]}))
    for label, args in [
        ("add duplicate name", {"driver": "null-co", "node-name": "null"}),
        ("add bad name", {"driver": "null-co", "node-name": "#x"}),
        ("add missing file", {"driver": "file", "node-name": "f",
                              "filename": d.path("nope")}),
        ("add unknown driver", {"driver": "nope", "node-name": "f"}),
        ("add without name", {"driver": "null-co"}),
        ("add without driver", {"node-name": "f"}),
        ("add unknown option", {"driver": "null-co", "node-name": "f", "bogus": 1}),
        ("add unknown child", {"driver": "raw", "node-name": "f", "file": "nope"}),
        ("add child a number", {"driver": "raw", "node-name": "f", "file": 1}),
        ("add file option mistyped", {"driver": "file", "node-name": "f", "filename": 1}),
        ("add nested option mistyped", {"driver": "raw", "node-name": "f",
                                        "file": {"driver": "file", "filename": 2}}),
        ("add cache mistyped", {"driver": "null-co", "node-name": "f", "cache": 1}),
        ("add bad discard", {"driver": "file", "node-name": "f", "filename": ctx["raw"],
                             "discard": "sometimes"}),
    ]:
        r = await d.cmd("blockdev-add", args, label=label)
        assert "error" in r, (label, r)
    await d.cmd("blockdev-del", {"node-name": "raw-file"}, label="del a node in use")
    await d.cmd("blockdev-del", {"node-name": "base"}, label="del a backing node")
    await d.cmd("blockdev-snapshot", {"node": "top", "overlay": "top"},
                label="snapshot onto itself")
    await d.cmd("blockdev-snapshot", {"node": "top", "overlay": "base"},
                label="snapshot onto a node with a backing file")
    await d.cmd("blockdev-snapshot", {"node": "top", "overlay": "nope"},
                label="snapshot onto no node")
    await d.ok("blockdev-snapshot", {"node": "top", "overlay": "snap"})
    await d.cmd("blockdev-snapshot", {"node": "top", "overlay": "snap"},
                label="snapshot twice")
    await d.graph("graph after snapshot", flat=False)
    await d.cmd("blockdev-del", {"node-name": "top"}, label="del a snapshotted node")
    await d.ok("blockdev-del", {"node-name": "snap"}, label="del the overlay")
    await d.ok("blockdev-del", {"node-name": "raw"})
    await d.ok("blockdev-del", {"node-name": "raw-file"})
    await d.ok("blockdev-del", {"node-name": "null"})
    await d.ok("blockdev-del", {"node-name": "kv-null"})
    await d.ok("blockdev-del", {"node-name": "kv-raw"})
    await d.graph("graph at the end")
    version = await d.ok("query-version")
    d.record("version shape", (sorted(version), sorted(version["qemu"])))
    names = {c["name"] for c in await d.ok("query-commands", record=False)}
    wanted = [
        "qmp_capabilities", "query-version", "query-commands", "quit", "blockdev-add",
        "blockdev-del", "blockdev-create", "blockdev-snapshot", "query-named-block-nodes",
        "query-blockstats", "block-stream", "block-commit", "block-job-set-speed",
        "block-job-pause", "block-job-resume", "block-job-cancel", "block-job-complete",
        "block-job-finalize", "block-job-dismiss", "job-pause", "job-resume", "job-cancel",
        "job-complete", "job-finalize", "job-dismiss", "query-block-jobs", "query-jobs",
        "object-add", "object-del", "x-blockdev-set-iothread",
    ]
    d.record("commands listed", [c for c in wanted if c in names])


async def job_id_default(d, ctx):
    """A job without job-id: QEMU's default is the BlockBackend's name, and a storage
    daemon has none, so qemu-storage-daemon refuses ("Invalid job ID ''"); strata names
    the job after the device node (deliberate: the engine API's default)."""
    await d.start(blockdevs=[
        {"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": ctx["top"]}},
    ])
    r = await d.cmd("block-stream", {"device": "top"}, label="stream without job-id")
    if "return" in r:
        await d.wait_completed("top")
        await d.wait_job_gone("top")
    await d.assert_no_jobs("no jobs at the end")


DELIBERATE = {
    "negotiation": {},
    "framing": {
        "deep nesting": "strata hangs up after a value it cannot frame (qmp.rs); QEMU "
                        "answers and goes on reading",
    },
    "job_id_default": {
        "stream without job-id": "strata's default job id is the device node's name; "
                                 "qemu-storage-daemon has no BlockBackend to take it from",
        "events of top": "the job strata runs there",
    },
}


def case(name, fn, setup=None):
    async def run():
        return await both(f"protocol {name}", fn, setup, DELIBERATE.get(name))
    return run


CASES = {
    "negotiation": case("negotiation", negotiation),
    "framing": case("framing", framing),
    "arguments": case("arguments", arguments),
    "blockdev": case("blockdev", blockdev, blockdev_setup),
    "job_id_default": case("job_id_default", job_id_default, blockdev_setup),
}

if __name__ == "__main__":
    main(CASES)
