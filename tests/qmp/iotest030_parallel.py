"""iotest 030's TestParallelOps against qemu-storage-daemon and strata daemon.

A chain of nine images, img-0 (raw, iotests.create_image) <- img-1 <- ... <- img-8
(qcow2), opened at launch with `--blockdev` as node0 ... node7 and drive0 (030 names the top
node node8 under a BlockBackend drive0; a storage daemon has no BlockBackend, so the top
node carries that name, and the error texts that name it read the same; for the same reason
the jobs that 030 leaves to the BlockBackend's default job id are given `job-id: drive0`:
qemu-storage-daemon refuses a job without one, "Invalid job ID ''"). img-7, img-5, img-3
and img-1 hold 0xff in 2 or 4 MiB, at 0, 4, 8 and 12 MiB. Each case runs 030's steps, with
030's error texts asserted on both daemons, then records the final graph; after the daemon
has stopped, the image maps that 030 compares, and `qemu-img check` of every image.
"""

import json

from qmplib import KIB, MIB, both, create_image, img_map, main, qemu_img, qemu_io

NUM_OPS = 4
NUM_IMGS = NUM_OPS * 2 + 1
IMAGE_LEN = NUM_OPS * 4 * MIB


def node_name(i):
    return "drive0" if i == NUM_IMGS - 1 else f"node{i}"


def setup(d):
    imgs = [d.path(f"img-{i}.img") for i in range(NUM_IMGS)]
    create_image(imgs[0], IMAGE_LEN)
    for i in range(1, NUM_IMGS):
        qemu_img("create", "-q", "-f", "qcow2", "-b", imgs[i - 1],
                 "-F", "raw" if i == 1 else "qcow2", imgs[i])
    odd = [x for x in reversed(range(NUM_IMGS)) if x % 2 == 1]
    for i, idx in enumerate(odd):
        num_mb = 2 + 2 * (i % 2)
        qemu_io("-f", "qcow2", "-c", f"write -P 0xFF {i * 4}M {num_mb}M", imgs[idx])
    # What the top reads now: every job below must leave it reading the same.
    qemu_img("convert", "-O", "raw", imgs[-1], d.path("top-before.raw"))
    # The chain as one nested blockdev, as 030's add_drive with backing.*.node-name.
    spec = {"driver": "raw", "node-name": "node0",
            "file": {"driver": "file", "filename": imgs[0]}}
    for i in range(1, NUM_IMGS):
        spec = {"driver": "qcow2", "node-name": node_name(i),
                "file": {"driver": "file", "filename": imgs[i]}, "backing": spec}
    return {"imgs": imgs, "blockdev": spec}


def check_images(d, imgs):
    for i, img in enumerate(imgs[1:], 1):
        d.after.append((f"check img-{i}", lambda img=img: qemu_img("check", "-q", img)))
    d.after.append(("drive0 reads as before",
                    lambda: qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2",
                                     d.path("top-before.raw"), imgs[-1])))


def maps_after(d, imgs, pairs, what):
    for a, b in pairs:
        d.after.append((f"{what}: map img-{a} == img-{b}",
                        lambda a=a, b=b: img_map(imgs[a]) == img_map(imgs[b])))


async def start(d, ctx):
    await d.start(blockdevs=[ctx["blockdev"]])
    await d.assert_no_jobs("no jobs at start")


async def expect_error(d, cmd, args, desc, label):
    r = await d.cmd(cmd, args, label=label)
    if d.kind == "strata" and label in KNOWN_STEPS and "error" in r:
        return  # compared (and reported) as a known difference
    if r.get("error", {}).get("desc") != desc:
        raise AssertionError(f"{d.kind}: {label}: expected error {desc!r}, got {r}")


async def finish(d, ctx, *jobs):
    await d.assert_no_jobs("no jobs at the end")
    await d.graph("final graph")
    check_images(d, ctx["imgs"])


# -- the cases ------------------------------------------------------------------------


async def stream_parallel(d, ctx):
    imgs = ctx["imgs"]
    await start(d, ctx)
    for i in range(2, NUM_IMGS, 2):
        d.record(f"before: map img-{i} != img-{i - 1}",
                 img_map(imgs[i]) != img_map(imgs[i - 1]))
    pending = []
    for i in range(2, NUM_IMGS, 2):
        job = f"stream-node{i}"
        pending.append(job)
        await d.ok("block-stream", {"device": node_name(i), "job-id": job,
                                    "bottom": f"node{i - 1}", "speed": 1024})
    for job in reversed(pending):
        await d.ok("block-job-set-speed", {"device": job, "speed": 0})
    for job in pending:
        ev = await d.wait_completed(job)
        assert "error" not in ev["data"], ev
    for job in pending:
        await d.wait_job_gone(job)
    await finish(d, ctx)
    maps_after(d, imgs, [(i, i - 1) for i in range(2, NUM_IMGS, 2)], "after")


async def overlapping_1(d, ctx):
    imgs = ctx["imgs"]
    await start(d, ctx)
    await d.ok("block-stream", {"device": "node4", "job-id": "stream-node4", "base": imgs[1],
                                "filter-node-name": "stream-filter", "speed": MIB})
    await expect_error(d, "block-stream", {"device": "node5", "job-id": "stream-node5",
                                           "base": imgs[2]},
                       "Node 'stream-filter' is busy: block device is in use by block job: stream",
                       "stream node5")
    await expect_error(d, "block-stream", {"device": "node3", "job-id": "stream-node3",
                                           "base": imgs[2]},
                       "Node 'node3' is busy: block device is in use by block job: stream",
                       "stream node3")
    await expect_error(d, "block-stream", {"device": "node4", "job-id": "stream-node4-v2"},
                       "Node 'node4' is busy: block device is in use by block job: stream",
                       "stream node4 again")
    await expect_error(d, "block-commit", {"device": "drive0", "base": imgs[4],
                                           "job-id": "commit-node4"},
                       "Node 'stream-filter' is busy: block device is in use by block job: stream",
                       "commit into node4")
    await expect_error(d, "block-commit", {"device": "drive0", "base": imgs[1], "top": imgs[3],
                                           "job-id": "commit-node1"},
                       "Node 'node3' is busy: block device is in use by block job: stream",
                       "commit node3 into node1")
    await expect_error(d, "block-commit", {"device": "drive0", "base": imgs[0], "top": imgs[1],
                                           "job-id": "commit-node0"},
                       "Node 'node2' is busy: block device is in use by block job: stream",
                       "commit node1 into node0")
    await d.ok("block-job-set-speed", {"device": "stream-node4", "speed": 0})
    await d.wait_completed("stream-node4")
    await d.wait_job_gone("stream-node4")
    await finish(d, ctx)


async def overlapping_2(d, ctx):
    imgs = ctx["imgs"]
    await start(d, ctx)
    await d.ok("block-commit", {"device": "drive0", "top": imgs[5], "base": imgs[3],
                                "job-id": "commit-node3", "speed": MIB})
    busy = "Node '{}' is busy: block device is in use by block job: commit"
    await expect_error(d, "block-stream", {"device": "node3", "job-id": "stream-node3"},
                       busy.format("node3"), "stream node3")
    await expect_error(d, "block-stream", {"device": "node6", "base": imgs[2],
                                           "job-id": "stream-node6"},
                       busy.format("node5"), "stream node6 from node2")
    await expect_error(d, "block-stream", {"device": "node4", "base": imgs[2],
                                           "job-id": "stream-node4"},
                       busy.format("node4"), "stream node4")
    await expect_error(d, "block-stream", {"device": "node6", "base": imgs[4],
                                           "job-id": "stream-node6-v2"},
                       busy.format("node5"), "stream node6 from node4")
    await expect_error(d, "block-stream", {"device": "drive0", "base": imgs[5],
                                           "job-id": "stream-drive0"},
                       busy.format("drive0"), "stream drive0")
    await d.ok("block-job-set-speed", {"device": "commit-node3", "speed": 0})
    await d.wait_completed("commit-node3")
    await d.wait_job_gone("commit-node3")
    await finish(d, ctx)


async def overlapping_3(d, ctx):
    imgs = ctx["imgs"]
    await start(d, ctx)
    await d.ok("block-commit", {"device": "drive0", "base": imgs[3], "job-id": "commit-drive0",
                                "speed": MIB})
    await expect_error(d, "block-stream", {"device": "node5", "base": imgs[3],
                                           "job-id": "stream-node6"},
                       "Node 'node5' is busy: block device is in use by block job: commit",
                       "stream node5")
    await d.ok("block-job-set-speed", {"device": "commit-drive0", "speed": 0})
    ev = await d.event("BLOCK_JOB_READY", device="commit-drive0")
    assert ev["data"]["type"] == "commit" and "error" not in ev["data"], ev
    await d.ok("block-job-complete", {"device": "commit-drive0"})
    await d.wait_completed("commit-drive0")
    await d.wait_job_gone("commit-drive0")
    await finish(d, ctx)


async def overlapping_4(d, ctx):
    imgs = ctx["imgs"]
    await start(d, ctx)
    await d.ok("block-commit", {"device": "drive0", "top": imgs[2], "base": imgs[0],
                                "filter-node-name": "commit-filter", "speed": MIB,
                                "job-id": "drive0"})
    await expect_error(d, "block-stream", {"device": "node4", "base-node": "node2",
                                           "job-id": "node4"},
                       "Cannot freeze 'backing' link to 'commit-filter'",
                       "stream node4 onto node2")
    await d.ok("block-job-set-speed", {"device": "drive0", "speed": 0})
    await d.wait_completed("drive0")
    await d.wait_job_gone("drive0")
    await finish(d, ctx)


async def overlapping_5(d, ctx):
    imgs = ctx["imgs"]
    await start(d, ctx)
    await d.ok("block-commit", {"device": "drive0", "top-node": "node2", "base-node": "node0",
                                "filter-node-name": "commit-filter", "speed": MIB,
                                "job-id": "drive0"})
    await d.ok("block-stream", {"device": "node4", "base-node": "commit-filter",
                                "job-id": "node4"})
    await d.ok("block-job-set-speed", {"device": "drive0", "speed": 0})
    for job in ("drive0", "node4"):
        ev = await d.wait_completed(job)
        assert "error" not in ev["data"], ev
        await d.wait_job_gone(job)
    nodes = await d.graph("final graph (nested)", flat=False)
    node4 = next(n for n in nodes if n["node-name"] == "node4")
    assert node4["image"]["backing-image"]["filename"] == imgs[0], node4
    await finish(d, ctx)


async def stream_commit_1(d, ctx):
    imgs = ctx["imgs"]
    await start(d, ctx)
    await d.ok("block-stream", {"device": "node2", "base-node": "node0", "job-id": "node2"})
    await d.ok("block-commit", {"device": "drive0", "base": imgs[3], "job-id": "drive0"})
    for job in ("node2", "drive0"):
        ev = await d.wait_completed(job)
        assert "error" not in ev["data"], ev
        await d.wait_job_gone(job)
    await finish(d, ctx)


async def stream_commit_2(d, ctx):
    imgs = ctx["imgs"]
    await start(d, ctx)
    await d.ok("block-stream", {"device": "node4", "base-node": "node0", "job-id": "node4",
                                "speed": MIB})
    await d.ok("block-commit", {"device": "drive0", "base": imgs[5], "speed": MIB,
                                "job-id": "drive0"})
    for job in ("drive0", "node4"):
        await d.ok("block-job-set-speed", {"device": job, "speed": 0})
    for job in ("node4", "drive0"):
        ev = await d.wait_completed(job)
        assert "error" not in ev["data"], ev
        await d.wait_job_gone(job)
    await finish(d, ctx)


async def stream_base_node_name(d, ctx):
    imgs = ctx["imgs"]
    await start(d, ctx)
    d.record("before: map img-4 != img-3", img_map(imgs[4]) != img_map(imgs[3]))
    await expect_error(d, "block-stream", {"device": "node4", "base-node": "none",
                                           "job-id": "stream"},
                       "Cannot find device='' nor node-name='none'", "base node missing")
    await expect_error(d, "block-stream", {"device": "node4", "base-node": "node6",
                                           "job-id": "stream"},
                       "Node 'node6' is not a backing image of 'node4'", "base node above")
    await expect_error(d, "block-stream", {"device": "node4", "base-node": "node4",
                                           "job-id": "stream"},
                       "Node 'node4' is not a backing image of 'node4'", "base node is top")
    await expect_error(d, "block-stream", {"device": "node4", "base": imgs[2],
                                           "base-node": "node2", "job-id": "stream"},
                       "'base' and 'base-node' cannot be specified at the same time",
                       "base and base-node")
    await d.ok("block-stream", {"device": "node4", "base-node": "node2", "job-id": "stream"})
    await d.wait_completed("stream")
    await d.wait_job_gone("stream")
    await finish(d, ctx)
    maps_after(d, imgs, [(4, 3)], "after")


DELIBERATE = {}

# Differences that are bugs, reported, not yet fixed: {case: {step label: why}}.
KNOWN = {}
KNOWN_STEPS = {label for steps in KNOWN.values() for label in steps}


def case(fn):
    async def run():
        return await both(f"030 {fn.__name__}", fn, setup, DELIBERATE.get(fn.__name__),
                          known=KNOWN.get(fn.__name__))
    return run


CASES = {f.__name__: case(f) for f in [
    stream_parallel, overlapping_1, overlapping_2, overlapping_3, overlapping_4,
    overlapping_5, stream_commit_1, stream_commit_2, stream_base_node_name,
]}

if __name__ == "__main__":
    main(CASES)
