"""blockdev-snapshot, blockdev-create and the README's example session, against
qemu-storage-daemon and strata daemon.

- readme: the README's session with small images: base <- top (qcow2, data in each) opened
  by `--blockdev`, snap.qcow2 (made by qemu-img, naming top) added with `backing: null`,
  blockdev-snapshot top -> snap, a stream of snap watched through its events, the graph
  (nested), `quit`. Afterwards snap stands alone, reads as top did, and passes check.
- create: blockdev-create of a file and then of a qcow2 image on it (each a `create` job that
  waits to be dismissed), the new image added and snapshotted onto, a commit of the overlay
  back into it, and blockdev-create's errors.
"""

import asyncio
import os

from qmplib import MIB, both, create_qcow2_chain, main, qemu_img, qemu_io


def readme_setup(d):
    base, top, snap = d.path("base.qcow2"), d.path("top.qcow2"), d.path("snap.qcow2")
    create_qcow2_chain(base, top, snap)
    qemu_io("-f", "qcow2", "-c", "write -P 0x61 0 1M", base)
    qemu_io("-f", "qcow2", "-c", "write -P 0x62 1M 1M", top)
    qemu_img("convert", "-O", "raw", top, d.path("top-before.raw"))
    return {"base": base, "top": top, "snap": snap}


async def readme(d, ctx):
    await d.start(blockdevs=[{"driver": "qcow2", "node-name": "top",
                              "file": {"driver": "file", "filename": ctx["top"]}}])
    await d.ok("blockdev-add", {"driver": "qcow2", "node-name": "snap", "backing": None,
                                "file": {"driver": "file", "filename": ctx["snap"]}})
    await d.ok("blockdev-snapshot", {"node": "top", "overlay": "snap"})
    await d.graph("graph after the snapshot", flat=False)
    await d.ok("block-stream", {"device": "snap", "job-id": "s0"})
    ev = await d.wait_completed("s0")
    assert ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"], ev
    await d.wait_job_gone("s0")
    await d.graph("graph after the stream", flat=False)
    await d.ok("quit")
    d.record("exit code after quit", await d.stop(sig=None))
    d.after.append(("snap reads as top did", lambda: qemu_img(
        "compare", "-q", "-f", "raw", "-F", "qcow2", d.path("top-before.raw"), ctx["snap"])))
    d.after.append(("snap stands alone",
                    lambda: "backing file:" not in qemu_img("info", ctx["snap"])))
    for name in ("base", "top", "snap"):
        d.after.append((f"check {name}", lambda n=name: qemu_img("check", "-q", ctx[n])))


async def run_create(d, job, options, label):
    await d.ok("blockdev-create", {"job-id": job, "options": options}, label=label)
    await d.wait_status(job, "concluded")
    jobs = await d.ok("query-jobs", label=f"{label}: the job concluded")
    assert [j["status"] for j in jobs] == ["concluded"], jobs
    await d.ok("job-dismiss", {"id": job}, label=f"{label}: dismissed")


async def create(d, ctx):
    await d.start()
    img = d.path("new.qcow2")
    await run_create(d, "create-file", {"driver": "file", "filename": img, "size": 0},
                     "create the file")
    await d.ok("blockdev-add", {"driver": "file", "node-name": "new-file", "filename": img})
    await run_create(d, "create-qcow2", {"driver": "qcow2", "file": "new-file",
                                         "size": 4 * MIB, "cluster-size": 65536},
                     "format it")
    await d.ok("blockdev-add", {"driver": "qcow2", "node-name": "new", "file": "new-file"})
    await d.graph("graph with the new image")
    # A snapshot makes its node read-only. QEMU reopens the children that inherit the
    # node's options with it, not a file node added on its own and referenced by name: that
    # one stays read-write. The rest uses an inline file node.
    ovl0 = d.path("ovl0.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", img, "-F", "qcow2", ovl0)
    await d.ok("blockdev-add", {"driver": "qcow2", "node-name": "ovl0", "backing": None,
                                "file": {"driver": "file", "filename": ovl0}})
    await d.ok("blockdev-snapshot", {"node": "new", "overlay": "ovl0"})
    ro = {n["node-name"]: n["ro"] for n in await d.ok("query-named-block-nodes", record=False)}
    d.record("ro after a snapshot: the node", ro["new"])
    d.record("ro after a snapshot: its own file node", ro["new-file"])
    for n in ("ovl0", "new", "new-file"):
        await d.ok("blockdev-del", {"node-name": n})
    await d.ok("blockdev-add", {"driver": "qcow2", "node-name": "new",
                                "file": {"driver": "file", "filename": img}})
    for label, args in [
        ("create without options", {"job-id": "x"}),
        ("create with a job id taken", {"job-id": "x", "options": {
            "driver": "file", "filename": d.path("other"), "size": 0}}),
        ("create with an unknown driver", {"job-id": "y", "options": {"driver": "nope"}}),
        ("create a qcow2 on no node", {"job-id": "z", "options": {
            "driver": "qcow2", "file": "nope", "size": MIB}}),
        ("create a file without a size", {"job-id": "w", "options": {
            "driver": "file", "filename": d.path("other2")}}),
    ]:
        r = await d.cmd("blockdev-create", args, label=label)
        if "return" in r:
            await d.wait_status(args["job-id"], "concluded")
            await asyncio.sleep(0.05)
            await d.ok("query-jobs", label=f"{label}: the job")
            await d.ok("job-dismiss", {"id": args["job-id"]}, label=f"{label}: dismissed")
    # An overlay made by qemu-img onto the new image, snapshotted, written, committed back.
    ovl = d.path("ovl.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", img, "-F", "qcow2", ovl)
    await d.ok("blockdev-add", {"driver": "qcow2", "node-name": "ovl", "backing": None,
                                "file": {"driver": "file", "filename": ovl}})
    await d.ok("blockdev-snapshot", {"node": "new", "overlay": "ovl"})
    await d.graph("graph after the snapshot", flat=False)
    await d.ok("block-commit", {"device": "ovl", "job-id": "c0"})
    ev = await d.wait_completed("c0")
    assert ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"], ev
    await d.wait_job_gone("c0")
    await d.graph("graph after the commit")
    d.after.append(("check new", lambda: qemu_img("check", "-q", img)))
    d.after.append(("new's info", lambda: {k: v for k, v in __import__("json").loads(
        qemu_img("info", "--output=json", img)).items()
        if k in ("format", "virtual-size", "cluster-size")}))
    d.after.append(("files", lambda: sorted(f for f in os.listdir(d.dir)
                                            if not f.endswith((".log", ".sock")))))


# Differences that are bugs, reported, not yet fixed: {case: {step label: why}}.
KNOWN = {}


def case(name, fn, setup=None):
    async def run():
        return await both(f"snapshot {name}", fn, setup, known=KNOWN.get(name))
    return run


CASES = {
    "readme": case("readme", readme, readme_setup),
    "create": case("create", create),
}

if __name__ == "__main__":
    main(CASES)
