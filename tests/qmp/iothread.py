"""IoThreads: `--object iothread`, object-add/del and x-blockdev-set-iothread, with jobs on
the moved nodes. Against strata alone: qemu-storage-daemon 10.0.2 aborts on a block-stream
of a node moved to an iothread with x-blockdev-set-iothread.

A chain base <- mid <- top (qcow2, 4 MiB, data in each) opened at launch with an IoThread
io0 given on the command line. top is moved to an IoThread added at run time (io1) and a
stream runs on it; then to io0 and an active commit runs; then back to the main loop, and
io1 is deleted. Each job must complete without error, the events must follow QEMU's status
sequence, and afterwards top must read as before and every image pass `qemu-img check`.
"""

from qmplib import main, qemu_img, run_one, three_image_chain


def setup(d):
    base, mid, top, blockdev = three_image_chain(d, "1536k")
    return {"imgs": (base, mid, top), "blockdev": blockdev}


def statuses(d, job):
    return [e["data"]["status"] for e in d.events
            if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job]


async def scenario(d, ctx):
    base, mid, top = ctx["imgs"]
    await d.start(blockdevs=[ctx["blockdev"]], objects=["iothread,id=io0"])
    await d.ok("object-add", {"qom-type": "iothread", "id": "io1"})
    r = await d.cmd("x-blockdev-set-iothread", {"node-name": "top", "iothread": "nope"})
    assert r["error"]["desc"] == "Cannot find iothread nope", r
    await d.ok("x-blockdev-set-iothread", {"node-name": "top", "iothread": "io1"})

    # A stream of mid into top, on io1.
    await d.ok("block-stream", {"device": "top", "job-id": "s0", "base-node": "base"})
    ev = await d.wait_completed("s0")
    assert ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"], ev
    await d.wait_job_gone("s0")
    assert statuses(d, "s0")[:2] == ["created", "running"], statuses(d, "s0")
    assert statuses(d, "s0")[-4:] == ["waiting", "pending", "concluded", "null"]
    nodes = {n["node-name"]: n for n in await d.ok("query-named-block-nodes")}
    assert "mid" not in nodes, sorted(nodes)
    assert nodes["top"]["image"]["backing-image"]["filename"] == base, nodes["top"]

    # An active commit of top into base, on io0 (a command-line IoThread).
    await d.ok("x-blockdev-set-iothread", {"node-name": "top", "iothread": "io0"})
    await d.ok("block-commit", {"device": "top", "job-id": "c0"})
    ev = await d.wait_completed("c0")
    assert ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"], ev
    await d.wait_job_gone("c0")
    assert "ready" in statuses(d, "c0"), statuses(d, "c0")
    nodes = {n["node-name"]: n for n in await d.ok("query-named-block-nodes")}
    assert "base" in nodes, sorted(nodes)

    # Back to the main loop; io1 goes.
    await d.ok("x-blockdev-set-iothread", {"node-name": "top", "iothread": None})
    await d.ok("object-del", {"id": "io1"})
    r = await d.cmd("object-del", {"id": "io1"})
    assert r["error"]["desc"] == "object 'io1' not found", r
    assert await d.ok("query-block-jobs") == []
    d.after.append(("base reads as top did", lambda: qemu_img(
        "compare", "-q", "-f", "raw", "-F", "qcow2", d.path("top-before.raw"), base)))
    for img in (base, mid, top):
        d.after.append((f"check {img}", lambda img=img: qemu_img("check", "-q", img)))


async def strata():
    d = await run_one("strata", "iothread", scenario, setup)
    print(f"iothread: {len(d.events)} events, after: "
          f"{[e['value'] for e in d.log if e['label'].startswith(('base', 'check'))]}")
    return []


CASES = {"strata": strata}

if __name__ == "__main__":
    main(CASES)
