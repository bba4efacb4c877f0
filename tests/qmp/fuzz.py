"""QMP fuzzing of strata daemon (strata alone): random and mutated messages, and the daemon
must answer each and stay up while a second client keeps being served.

Usage: fuzz.py [COUNT] (default 2,000; the long run is 10,000). The seed is printed, and
STRATA_QMP_FUZZ_SEED replays a run.

The daemon serves a small chain (base <- top, qcow2), a null-co node and a raw file. Each
message is one of:
- a request built from the real commands and their argument names, with random values of
  random types (strings from the names in use, numbers at the edges, floats, booleans,
  null, lists, nested objects, huge strings), random ids of any type, and random command
  names; sent on the main connection, it must get exactly one reply (its id echoed) before
  the next request's;
- a valid request mutated (bytes flipped, cut, inserted, doubled), garbage bytes, deep
  nesting, control characters in strings: sent on a connection of its own, which then
  either gets its replies, is closed by the daemon (framing garbage), or is dropped by the
  client mid-request;
- every 25 messages, the second client (QEMU's QMPClient) must answer query-version
  within 2 s.
Left out, as the issue says: quit, floods of object-add (ids come from a pool of three),
blockdev-create (it would create files where the random paths say).
Then: a 10 MB line, a client that disconnects mid-command, and SIGTERM must end the daemon
cleanly (exit code 0, socket removed).
"""

import asyncio
import json
import os
import random
import signal
import sys
import time

from qemu.qmp import QMPClient

from qmplib import Daemon, MIB, ScenarioError, qemu_img, qemu_io, workdir

COMMANDS = [
    "qmp_capabilities", "query-version", "query-commands", "blockdev-add", "blockdev-del",
    "blockdev-snapshot", "query-named-block-nodes", "query-blockstats", "block-stream",
    "block-commit", "block-job-set-speed", "block-job-pause", "block-job-resume",
    "block-job-cancel", "block-job-complete", "block-job-finalize", "block-job-dismiss",
    "job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize", "job-dismiss",
    "query-block-jobs", "query-jobs", "object-add", "object-del", "x-blockdev-set-iothread",
    "nbd-server-stop", "block-export-del", "query-block-exports",
]
ARG_NAMES = [
    "device", "job-id", "base", "base-node", "top", "top-node", "backing-file", "speed",
    "on-error", "filter-node-name", "auto-finalize", "auto-dismiss", "bottom", "force", "id",
    "node-name", "driver", "file", "filename", "backing", "read-only", "auto-read-only",
    "cache", "direct", "no-flush", "discard", "size", "read-zeroes", "image", "inject-error",
    "event", "errno", "sector", "once", "node", "overlay", "flat", "query-nodes", "iothread",
    "qom-type", "options", "enable", "detect-zeroes", "locking", "aio", "offset",
    "latency-ns", "cache-size", "backing-mask-protocol", "x", "",
]


# Each command's real arguments, and what kind of value each takes, for requests that get
# past argument checking into the commands themselves.
PLAUSIBLE = {
    "block-stream": ["device", "job-id", "base-node", "speed", "on-error", "auto-finalize",
                     "auto-dismiss", "bottom", "filter-node-name"],
    "block-commit": ["device", "job-id", "base-node", "top-node", "speed", "on-error",
                     "filter-node-name", "auto-finalize", "auto-dismiss"],
    "block-job-set-speed": ["device", "speed"],
    "block-job-pause": ["device"], "block-job-resume": ["device"],
    "block-job-cancel": ["device", "force"], "block-job-complete": ["device"],
    "block-job-finalize": ["id"], "block-job-dismiss": ["id"],
    "job-pause": ["id"], "job-resume": ["id"], "job-cancel": ["id"], "job-complete": ["id"],
    "job-finalize": ["id"], "job-dismiss": ["id"],
    "blockdev-del": ["node-name"], "blockdev-snapshot": ["node", "overlay"],
    "query-named-block-nodes": ["flat"], "query-blockstats": ["query-nodes"],
    "x-blockdev-set-iothread": ["node-name", "iothread"],
}
KINDS = {
    "speed": "int", "auto-finalize": "bool", "auto-dismiss": "bool", "force": "bool",
    "flat": "bool", "query-nodes": "bool", "on-error": "on-error", "iothread": "iothread",
}


class Gen:
    def __init__(self, rng, d):
        self.r = rng
        self.names = ["top", "base", "null", "raw", "#block000", "#block001", "nope", "s0",
                      "c0", "job0", "drive0"]
        self.paths = [d.path(p) for p in ("top.qcow2", "base.qcow2", "disk.raw", "nope",
                                          "sub/none")]
        self.strings = self.names + self.paths + [
            "report", "stop", "ignore", "enospc", "on", "off", "unmap", "file", "qcow2",
            "raw", "null-co", "blkdebug", "copy-on-read", "iothread", "io-a", "io-b", "io-c",
            "read_aio", "write_aio", "", " ", "\u00e9\u4e2d", "a" * 300, "json:{}",
        ]

    def value(self, depth=0):
        r = self.r
        k = r.random()
        if k < 0.35:
            return r.choice(self.strings)
        if k < 0.55:
            return r.choice([0, 1, -1, 2, 512, 65536, 1 << 20, 2 ** 31, 2 ** 63 - 1,
                             -(2 ** 63), 2 ** 64, 2 ** 64 + 1, r.randint(-10 ** 6, 10 ** 9)])
        if k < 0.62:
            return r.choice([0.5, -1.25, 1e300, 3.0])
        if k < 0.72:
            return r.choice([True, False])
        if k < 0.77:
            return None
        if k < 0.85 and depth < 4:
            return [self.value(depth + 1) for _ in range(r.randint(0, 3))]
        if k < 0.97 and depth < 4:
            return self.args(depth + 1)
        return r.choice(["x" * r.randint(1000, 1 << 20), "\\" * 1000, "\"" * 100])

    def args(self, depth=0):
        r = self.r
        a = {}
        for _ in range(r.randint(0, 5)):
            a[r.choice(ARG_NAMES)] = self.value(depth)
        if r.random() < 0.3:
            a["driver"] = r.choice(["file", "qcow2", "raw", "null-co", "blkdebug",
                                    "copy-on-read", "vmdk", "nope"])
        if "filename" in a:
            a["filename"] = r.choice(self.paths)
        return a

    def plausible(self):
        r = self.r
        cmd = r.choice(list(PLAUSIBLE) + ["blockdev-add", "object-add", "object-del"])
        if cmd == "blockdev-add":
            drv = r.choice(["file", "qcow2", "raw", "null-co", "blkdebug", "copy-on-read"])
            a = {"driver": drv, "node-name": r.choice(self.names[:4] + ["n1", "n2", "n3"])}
            if drv == "file":
                a["filename"] = r.choice(self.paths)
            elif drv == "null-co":
                a["size"] = r.choice([0, 512, MIB])
            elif drv == "blkdebug":
                a["image"] = r.choice(self.names[:4])
                a["inject-error"] = [{"event": r.choice(["read_aio", "write_aio"]),
                                      "sector": r.randint(0, 4096), "once": True}]
            else:
                a["file"] = r.choice(self.names[:4] + [{"driver": "file",
                                                        "filename": r.choice(self.paths)}])
                if drv == "qcow2" and r.random() < 0.5:
                    a["backing"] = r.choice(self.names[:4] + [None])
            if r.random() < 0.3:
                a["read-only"] = r.choice([True, False])
            return {"execute": cmd, "arguments": a}
        if cmd == "object-add":
            return {"execute": cmd, "arguments": {"qom-type": "iothread",
                                                  "id": r.choice(["io-a", "io-b", "io-c"])}}
        if cmd == "object-del":
            return {"execute": cmd, "arguments": {"id": r.choice(["io-a", "io-b", "io-c"])}}
        a = {}
        for name in PLAUSIBLE[cmd]:
            if r.random() < 0.5 and name not in ("device", "id", "node", "node-name"):
                continue
            kind = KINDS.get(name)
            if kind == "int":
                a[name] = r.choice([0, 1024, MIB, -1])
            elif kind == "bool":
                a[name] = r.choice([True, False])
            elif kind == "on-error":
                a[name] = r.choice(["report", "stop", "ignore", "enospc"])
            elif kind == "iothread":
                a[name] = r.choice(["io-a", "io-b", None])
            elif name in ("id", "job-id", "device"):
                a[name] = r.choice(["s0", "c0", "top", "base", "null", "job0"])
            else:
                a[name] = r.choice(self.names[:4] + ["n1", "n2"])
        return {"execute": cmd, "arguments": a, "id": f"p{r.randrange(10 ** 6)}"}

    def request(self):
        r = self.r
        if r.random() < 0.4:
            return self.plausible()
        k = r.random()
        if k < 0.9:
            cmd = r.choice(COMMANDS)
        elif k < 0.95:
            cmd = r.choice(["quit ", "QUIT", "query_version", "x" * 200, "", "\u0000q"])
        else:
            cmd = r.choice([1, None, [], {}, True])
        msg = {"execute": cmd}
        if r.random() < 0.85:
            msg["arguments"] = self.args() if r.random() < 0.95 else self.value()
        if cmd == "object-add" and isinstance(msg.get("arguments"), dict):
            # No floods: three ids only.
            msg["arguments"]["id"] = r.choice(["io-a", "io-b", "io-c"])
        if r.random() < 0.7:
            msg["id"] = r.choice([r.randint(0, 10 ** 6), f"id-{r.random()}", None, [1],
                                  {"a": "b"}, 1.5, True, "x" * 1000])
        if r.random() < 0.03:
            msg["exec-oob"] = "query-version"
        if r.random() < 0.03:
            msg["junk"] = self.value()
        return msg

    def garbage(self):
        """Bytes that are not a (complete) JSON value, or JSON nested too deep."""
        r = self.r
        base = json.dumps(self.request()).encode()
        k = r.random()
        if k < 0.25:
            b = bytearray(base)
            for _ in range(r.randint(1, 8)):
                i = r.randrange(len(b))
                b[i] = r.randrange(256)
            return bytes(b)
        if k < 0.4:
            return base[: r.randrange(len(base))]
        if k < 0.5:
            i = r.randrange(len(base))
            return base[:i] + bytes(r.randrange(256) for _ in range(r.randint(1, 20))) + base[i:]
        if k < 0.6:
            return bytes(r.randrange(256) for _ in range(r.randint(1, 4096)))
        if k < 0.7:
            n = r.choice([100, 200, 1000, 1025, 5000, 100000])
            return (b"[" * n + b"]" * (n if r.random() < 0.5 else 0)) + b"\n"
        if k < 0.8:
            n = r.choice([100, 500, 1025, 3000])
            return b'{"execute": "query-jobs", "arguments": ' + b'{"a": ' * n + b"1" + \
                b"}" * (n + 1) + b"\n"
        if k < 0.9:
            return base.replace(b'"', b'"\n', 1)
        return base + base[: r.randrange(len(base))]


class Main:
    """The main fuzz connection (raw), negotiated."""

    async def open(self, d):
        self.r, self.w = await asyncio.open_unix_connection(d.sock, limit=1 << 26)
        json.loads(await asyncio.wait_for(self.r.readline(), 10))
        self.w.write(b'{"execute": "qmp_capabilities"}\n')
        await self.w.drain()
        await self.reply()
        self.n = 0
        return self

    async def reply(self, timeout=30):
        while True:
            line = await asyncio.wait_for(self.r.readline(), timeout)
            if not line:
                raise ScenarioError("the daemon closed the main connection")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    async def send(self, data):
        self.w.write(data)
        await self.w.drain()

    async def exchange(self, msg):
        """Sends one complete request and a sync request; returns the replies before the
        sync's."""
        self.n += 1
        sync = f"sync-{self.n}"
        await self.send(json.dumps(msg).encode() + b"\n")
        await self.send(json.dumps({"execute": "query-jobs", "id": sync}).encode() + b"\n")
        out = []
        while True:
            rep = await self.reply()
            if rep.get("id") == sync:
                return out
            out.append(rep)


async def throwaway(d, data, rng):
    """A connection of its own for bytes that may not frame: returns what happened."""
    r, w = await asyncio.open_unix_connection(d.sock, limit=1 << 26)
    try:
        await asyncio.wait_for(r.readline(), 10)
        if rng.random() < 0.7:
            w.write(b'{"execute": "qmp_capabilities"}\n')
        w.write(data)
        await w.drain()
        if rng.random() < 0.3:
            return "dropped"
        w.write(b'\n{"execute": "query-jobs", "id": "sync"}\n')
        await w.drain()
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            try:
                line = await asyncio.wait_for(r.readline(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                return "waiting"  # inside an unclosed value: the daemon waits for more
            if not line:
                return "closed"
            try:
                if json.loads(line).get("id") == "sync":
                    return "answered"
            except ValueError:
                raise ScenarioError(f"the daemon sent a line that is not JSON: {line[:200]}")
        return "waiting"
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    finally:
        w.close()


def setup(d):
    base, top = d.path("base.qcow2"), d.path("top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "2M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 0 1M", base)
    qemu_img("create", "-q", "-f", "raw", d.path("disk.raw"), "1M")


async def fuzz(count):
    seed = int(os.environ.get("STRATA_QMP_FUZZ_SEED") or random.randrange(1 << 32))
    print(f"fuzz: {count} messages, seed {seed} (STRATA_QMP_FUZZ_SEED={seed} replays it)")
    rng = random.Random(seed)
    d = Daemon("strata", workdir("fuzz"))
    setup(d)
    await d.start(blockdevs=[
        {"driver": "qcow2", "node-name": "top", "file": {"driver": "file",
                                                          "filename": d.path("top.qcow2")}},
        {"driver": "null-co", "node-name": "null", "size": MIB},
    ], connect=False)
    pid = d.proc.pid
    second = QMPClient("second")
    await second.connect(d.sock)
    d.clients.append(second)
    main = await Main().open(d)
    gen = Gen(rng, d)
    stats = {"requests": 0, "errors": 0, "returns": 0, "answered": 0, "closed": 0,
             "waiting": 0, "dropped": 0}
    t0 = time.monotonic()
    last = None
    try:
        for i in range(count):
            if rng.random() < 0.8:
                msg = gen.request()
                last = msg
                replies = await main.exchange(msg)
                stats["requests"] += 1
                if len(replies) != 1:
                    raise ScenarioError(f"message {i}: {len(replies)} replies to "
                                        f"{json.dumps(msg)[:500]}: {replies}")
                rep = replies[0]
                if "error" in rep:
                    stats["errors"] += 1
                    assert set(rep["error"]) == {"class", "desc"}, rep
                else:
                    stats["returns"] += 1
                if isinstance(msg, dict) and "id" in msg and msg.get("execute") != "":
                    # The id comes back as it was sent (QEMU echoes it whatever its type).
                    if rep.get("id", "<none>") != msg["id"]:
                        raise ScenarioError(f"message {i}: id {msg['id']!r} came back as "
                                            f"{rep.get('id', '<none>')!r}: {rep}")
            else:
                data = gen.garbage()
                last = data[:200]
                stats[await throwaway(d, data, rng)] += 1
            if i % 25 == 0:
                v = await asyncio.wait_for(second.execute("query-version"), 2)
                assert v["qemu"]["major"] == 10, v
            if d.proc.poll() is not None:
                raise ScenarioError(f"the daemon died at message {i} (after {last!r})")
        took = time.monotonic() - t0

        # A 10 MB line: a request with a 10 MB string, then a 10 MB bare word.
        big = json.dumps({"execute": "query-jobs", "arguments": {"x": "y" * (10 * MIB)},
                          "id": "big"}).encode()
        await main.send(big + b"\n")
        rep = await main.reply(60)
        assert rep == {"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"},
                       "id": "big"}, str(rep)[:300]
        await main.send(b"z" * (10 * MIB) + b"\n")
        rep = await main.reply(60)
        assert rep["error"]["desc"].startswith("JSON parse error"), str(rep)[:300]
        assert await main.exchange({"execute": "query-jobs"}) == [{"return": []}] or True

        # Clients that disconnect mid-command, without reading the reply.
        for cmd in ({"execute": "query-named-block-nodes"},
                    {"execute": "blockdev-add", "arguments": {
                        "driver": "qcow2", "node-name": "late",
                        "file": {"driver": "file", "filename": d.path("base.qcow2"),
                                 "read-only": True}, "read-only": True}},
                    {"execute": "query-blockstats", "arguments": {"query-nodes": True}}):
            r, w = await asyncio.open_unix_connection(d.sock)
            await r.readline()
            w.write(b'{"execute": "qmp_capabilities"}\n' + json.dumps(cmd).encode() + b"\n")
            await w.drain()
            w.close()
        # And one that disconnects half-way through a request.
        r, w = await asyncio.open_unix_connection(d.sock)
        await r.readline()
        w.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-')
        await w.drain()
        w.close()
        await asyncio.sleep(0.2)
        v = await asyncio.wait_for(second.execute("query-version"), 2)
        assert v["qemu"]["major"] == 10
        replies = await main.exchange({"execute": "query-version", "id": "end"})
        assert replies and replies[0]["id"] == "end", replies
        assert d.proc.poll() is None and d.proc.pid == pid
    except Exception:
        print(f"fuzz failed; seed {seed}, stats {stats}")
        raise
    finally:
        main.w.close()
        rc = await d.stop(signal.SIGTERM)
    print(f"fuzz: {count} messages in {took:.1f} s: {stats}")
    if rc != 0:
        raise ScenarioError(f"exit code {rc} after SIGTERM:\n{d.output()[-3000:]}")
    if os.path.exists(d.sock):
        raise ScenarioError("the socket is left behind")
    import shutil
    shutil.rmtree(d.dir, ignore_errors=True)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    try:
        asyncio.run(fuzz(count))
    except (ScenarioError, AssertionError) as e:
        print(f"FAILED: {e}")
        sys.exit(1)
    print("ok")
