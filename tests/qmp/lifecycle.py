"""Start, clients and shutdown, against qemu-storage-daemon and strata daemon.

- sigterm, sigint, quit: a chain base <- mid <- top (qcow2, 4 MiB, data in each) is open,
  a stream of top (rate-limited, so it is running) and guest-less writes are in flight, then
  the daemon is told to go. Compared: the exit code, whether the socket is gone, what the
  images look like afterwards (`qemu-img check`, the chain `qemu-img info` shows, opened
  without -U, which needs the image locks released) and that top reads as before.
- two_monitors: the daemon serves two monitors (two --chardev/--monitor pairs); a client
  on each receives the same events.
- strata alone: the socket's mode is 0600; two clients on one socket both receive every
  event (qemu-storage-daemon serves one client per monitor at a time), and the second
  keeps working when the first goes.
"""

import asyncio
import json
import os
import signal
import stat

from qmplib import MIB, Daemon, both, main, qemu_img, run_one, three_image_chain, workdir


def setup(d):
    base, mid, top, blockdev = three_image_chain(d, "1M")
    return {"imgs": {"base": base, "mid": mid, "top": top}, "blockdev": blockdev}


def images_after(d, ctx):
    """The checks after the daemon is gone, recorded."""
    d.record("socket left behind", os.path.exists(d.sock))
    for name, img in ctx["imgs"].items():
        d.record(f"check {name}", qemu_img("check", "-q", img))
        # Without -U: fails if a lock were still held.
        info = json.loads(qemu_img("info", "--output=json", img))
        d.record(f"info {name}", {k: info.get(k) for k in
                                  ("format", "virtual-size", "backing-filename", "dirty-flag")})
    d.record("top reads as before", qemu_img(
        "compare", "-q", "-f", "raw", "-F", "qcow2", d.path("top-before.raw"),
        ctx["imgs"]["top"]))


def shutdown_by(how):
    async def scenario(d, ctx):
        await d.start(blockdevs=[ctx["blockdev"]])
        # A job that is running when the daemon is told to go (1 KiB/s: it copies one
        # chunk, then waits).
        await d.ok("block-stream", {"device": "top", "job-id": "s0", "base-node": "base",
                                    "speed": 1024})
        await d.wait_status("s0", "running")
        await d.wait_offset("s0", 512 * 1024)
        if how == "quit":
            await d.ok("quit")
            rc = await d.stop(sig=None)
        else:
            rc = await d.stop(sig=how)
        d.record("exit code after " + str(how), rc)
        images_after(d, ctx)
    return scenario


async def stream_seen_by(d, c2):
    """Streams top to its end while the client `c2` collects events; returns the events (name
    and data) the first client saw and those `c2` saw."""
    second = []

    async def collect():
        async for ev in c2.events:
            second.append({"event": ev["event"], "data": ev["data"]})
    task = asyncio.create_task(collect())
    await d.ok("block-stream", {"device": "top", "job-id": "s0"})
    await d.wait_completed("s0")
    await d.wait_status("s0", "null")
    for _ in range(100):
        if len(second) >= len(d.events):
            break
        await asyncio.sleep(0.02)
    task.cancel()
    first = [{"event": e["event"], "data": e["data"]} for e in d.events]
    return first, second


async def two_monitors(d, ctx):
    sock2 = d.path("qmp2.sock")
    argv_extra = ["--chardev", f"socket,path={sock2},server=on,wait=off,id=m2",
                  "--monitor", "chardev=m2"]
    d.extra_args = argv_extra
    await d.start(blockdevs=[ctx["blockdev"]])
    from qemu.qmp import QMPClient
    c2 = QMPClient("second")
    await c2.connect(sock2)
    d.clients.append(c2)
    first, second = await stream_seen_by(d, c2)
    # The second client saw what the first saw.
    assert first == second, (first, second)
    d.record("second monitor's events", [e["event"] for e in second])
    await d.ok("query-jobs", label="first monitor after")
    d.record("second monitor after", await c2.execute("query-jobs"))


CASES_BOTH = {
    "sigterm": shutdown_by(signal.SIGTERM),
    "sigint": shutdown_by(signal.SIGINT),
    "quit": shutdown_by("quit"),
    "two_monitors": two_monitors,
}


# -- strata alone ---------------------------------------------------------------------


async def strata_clients(d, ctx):
    await d.start(blockdevs=[ctx["blockdev"]])
    mode = stat.S_IMODE(os.stat(d.sock).st_mode)
    assert stat.S_ISSOCK(os.stat(d.sock).st_mode)
    assert mode == 0o600, oct(mode)
    # A second client on the same socket, at the same time.
    c2 = await d.connect("second")
    first, second = await stream_seen_by(d, c2)
    assert first and first == second, (first, second)
    # The first client goes; the second one still works, and a third can come.
    await d.qmp.disconnect()
    d.clients.remove(d.qmp)
    assert await c2.execute("query-jobs") == []
    c3 = await d.connect("third")
    assert await c3.execute("query-version")
    # A client that negotiates and never reads does not stop the others.
    r, w = await asyncio.open_unix_connection(d.sock)
    w.write(b'{"execute": "qmp_capabilities"}\n')
    await w.drain()
    assert (await c2.execute("query-block-jobs")) == []
    w.close()
    print(f"strata clients: socket mode {oct(mode)}, {len(first)} events to both clients")


async def strata_alone(fn, name):
    d = await run_one("strata", name, fn, setup)
    return []


def strata_case(fn, name):
    async def run():
        return await strata_alone(fn, name)
    return run


def case(name, fn):
    async def run():
        return await both(f"lifecycle {name}", fn, setup)
    return run


CASES = {name: case(name, fn) for name, fn in CASES_BOTH.items()}
CASES["strata_clients"] = strata_case(strata_clients, "strata_clients")

if __name__ == "__main__":
    main(CASES)
