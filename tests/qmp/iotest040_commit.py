"""iotest 040's commit cases against qemu-storage-daemon and strata daemon.

TestSingleDrive: backing.img (raw, iotests.create_image, 1 MiB, 0xab in its first half) <-
mid.img (qcow2, 0xef in the second half) <- test.img (qcow2), opened at launch as base, mid
and drive0. Commits of mid into base (by file name and by node name), active commits (READY,
then block-job-complete), and 040's argument errors, each answered with QEMU's class and
text; afterwards the data 040 checks (`qemu-io -c 'read -P'`) and `qemu-img check`.

TestErrorHandling: backing.img (raw, 2 MiB) <- mid.img (0x11 in the first 512 KiB) <- test.img
(0x22 there), added at run time with blockdev-add as base-file/mid-file/top-file,
base-fmt/mid-fmt/top-fmt, with a blkdebug node (`inject-error`, one read or write error on
sector 1024 of a qcow2 file, 512 of the raw one) where the case puts one. A commit job0 of
top-fmt into mid-fmt (active) or mid-fmt into base-fmt (intermediate) with on-error report,
stop (resumed on each BLOCK_JOB_ERROR, as 040's run_job does) or ignore.
"""

from qmplib import KIB, MIB, both, create_image, main, qemu_img, qemu_io

# -- TestSingleDrive ------------------------------------------------------------------

SD_LEN = 1 * MIB


def sd_setup(d):
    backing, mid, test = d.path("backing.img"), d.path("mid.img"), d.path("test.img")
    create_image(backing, SD_LEN)
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", mid)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", test)
    qemu_io("-f", "raw", "-c", "write -P 0xab 0 524288", backing)
    qemu_io("-f", "qcow2", "-c", "write -P 0xef 524288 524288", mid)
    blockdev = {"driver": "qcow2", "node-name": "drive0",
                "file": {"driver": "file", "filename": test},
                "backing": {"driver": "qcow2", "node-name": "mid",
                            "file": {"driver": "file", "filename": mid},
                            "backing": {"driver": "raw", "node-name": "base",
                                        "file": {"driver": "file", "filename": backing}}}}
    return {"backing": backing, "mid": mid, "test": test, "blockdev": blockdev}


async def sd_start(d, ctx):
    await d.start(blockdevs=[ctx["blockdev"]])
    await d.assert_no_jobs("no jobs at start")


def sd_after(d, ctx, committed):
    for name in ("backing", "mid", "test"):
        if name != "backing":
            d.after.append((f"check {name}", lambda n=name: qemu_img("check", "-q", ctx[n])))
    if committed:
        for pattern, off in (("0xab", 0), ("0xef", 524288)):
            d.after.append((f"base holds {pattern}",
                            lambda p=pattern, o=off: "verification failed" not in qemu_io(
                                "-f", "raw", "-c", f"read -P {p} {o} 524288", ctx["backing"])))


async def run_commit(d, args, need_ready):
    await d.ok("block-commit", dict(args, **{"job-id": "drive0"}))
    ready_seen = []

    ev = await d.wait_completed("drive0")
    for e in d.events:
        if e["event"] == "BLOCK_JOB_READY":
            ready_seen.append(e)
    assert ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"], ev
    assert bool(ready_seen) == need_ready, (need_ready, ready_seen)
    await d.wait_job_gone("drive0")
    await d.assert_no_jobs("no jobs at the end")
    await d.graph("final graph")


async def sd_commit(d, ctx):
    await sd_start(d, ctx)
    await run_commit(d, {"device": "drive0", "top": ctx["mid"], "base": ctx["backing"]}, False)
    sd_after(d, ctx, True)


async def sd_commit_node(d, ctx):
    await sd_start(d, ctx)
    await run_commit(d, {"device": "drive0", "top-node": "mid", "base-node": "base"}, False)
    sd_after(d, ctx, True)


async def sd_top_is_active(d, ctx):
    await sd_start(d, ctx)
    await run_commit(d, {"device": "drive0", "top": ctx["test"], "base": ctx["backing"]}, True)
    sd_after(d, ctx, True)


async def sd_top_is_default_active(d, ctx):
    await sd_start(d, ctx)
    await run_commit(d, {"device": "drive0"}, True)
    sd_after(d, ctx, True)


async def sd_errors(d, ctx):
    """040's argument errors (test_device_not_found ... test_top_node_in_wrong_chain)."""
    await sd_start(d, ctx)
    await d.ok("blockdev-add", {"driver": "null-co", "node-name": "null", "size": SD_LEN})
    b, m, t = ctx["backing"], ctx["mid"], ctx["test"]
    cases = [
        ("device not found", {"device": "nonexistent", "top": m}),
        ("top same as base", {"device": "drive0", "top": b, "base": b}),
        ("top invalid", {"device": "drive0", "top": "badfile", "base": b}),
        ("base invalid", {"device": "drive0", "top": m, "base": "badfile"}),
        ("top node invalid", {"device": "drive0", "top-node": "badfile", "base-node": "base"}),
        ("base node invalid", {"device": "drive0", "top-node": "mid", "base-node": "badfile"}),
        ("top path and node", {"device": "drive0", "top-node": "mid", "base-node": "base",
                               "top": m}),
        ("base path and node", {"device": "drive0", "top-node": "mid", "base-node": "base",
                                "base": b}),
        ("top and base reversed", {"device": "drive0", "top": b, "base": m}),
        ("top and base node reversed", {"device": "drive0", "top-node": "base",
                                        "base-node": "top"}),
        ("top node in wrong chain", {"device": "drive0", "top-node": "null",
                                     "base-node": "base"}),
        ("base node in wrong chain", {"device": "drive0", "top-node": "mid",
                                      "base-node": "null"}),
        ("negative speed", {"device": "drive0", "top": m, "speed": -1}),
        ("speed as a string", {"device": "drive0", "top": m, "speed": "1"}),
        ("unknown on-error", {"device": "drive0", "top": m, "on-error": "explode"}),
        ("unexpected parameter", {"device": "drive0", "top": m, "x": 1}),
        ("backing-file on the active layer", {"device": "drive0", "backing-file": "x"}),
    ]
    for label, args in cases:
        r = await d.cmd("block-commit", dict(args, **{"job-id": "drive0"}), label=label)
        assert "error" in r, (label, r)
    await d.assert_no_jobs("no jobs at the end")
    await d.ok("blockdev-del", {"node-name": "null"})
    await d.graph("final graph")
    sd_after(d, ctx, False)


async def sd_set_speed(d, ctx):
    """040 TestSetSpeed: the speed given to block-commit shows in query-block-jobs; the job
    (held by its rate limit: mid gets a second chunk of data, and the job waits for minutes
    after the first) is cancelled."""
    qemu_io("-f", "qcow2", "-c", "write -P 0xcd 0 512k", ctx["mid"])
    await sd_start(d, ctx)
    await d.ok("block-commit", {"device": "drive0", "top": ctx["mid"], "speed": 1024,
                                "job-id": "drive0"})
    jobs = await d.ok("query-block-jobs", record=False)
    d.record("speed", (jobs[0]["device"], jobs[0]["speed"], jobs[0]["type"]))
    # Cancelled once the first chunk is copied (the job then sleeps): the offset in
    # BLOCK_JOB_CANCELLED does not depend on timing.
    await d.wait_offset("drive0", 512 * KIB)
    await d.ok("block-job-cancel", {"device": "drive0", "force": True})
    ev = await d.wait_completed("drive0")
    assert ev["event"] == "BLOCK_JOB_CANCELLED", ev
    await d.wait_job_gone("drive0")
    await d.assert_no_jobs("no jobs at the end")
    await d.graph("final graph")
    sd_after(d, ctx, False)


# -- TestErrorHandling ----------------------------------------------------------------

EH_LEN = 2 * MIB


def eh_setup(d):
    backing, mid, test = d.path("backing.img"), d.path("mid.img"), d.path("test.img")
    create_image(backing, EH_LEN)
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", mid)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", test)
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 512k", mid)
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 0 512k", test)
    # What each image reads before the job.
    for name, path, fmt in (("backing", backing, "raw"), ("mid", mid, "qcow2"),
                            ("test", test, "qcow2")):
        qemu_img("convert", "-f", fmt, "-O", "raw", path, d.path(f"{name}-before.raw"))
    return {"backing": backing, "mid": mid, "test": test}


def blkdebug_event(event, is_raw=False):
    if event:
        return [{"event": event, "sector": 512 if is_raw else 1024, "once": True}]
    return None


async def add_block_nodes(d, ctx, base_debug=None, mid_debug=None, top_debug=None):
    for pre, path in (("base", ctx["backing"]), ("mid", ctx["mid"]), ("top", ctx["test"])):
        await d.ok("blockdev-add", {"node-name": f"{pre}-file", "driver": "file",
                                    "filename": path})
    files = {}
    for pre, dbg in (("base", base_debug), ("mid", mid_debug), ("top", top_debug)):
        if dbg:
            await d.ok("blockdev-add", {"node-name": f"{pre}-dbg", "driver": "blkdebug",
                                        "image": f"{pre}-file", "inject-error": dbg})
            files[pre] = f"{pre}-dbg"
        else:
            files[pre] = f"{pre}-file"
    await d.ok("blockdev-add", {"node-name": "base-fmt", "driver": "raw", "file": files["base"]})
    await d.ok("blockdev-add", {"node-name": "mid-fmt", "driver": "qcow2", "file": files["mid"],
                                "backing": "base-fmt"})
    await d.ok("blockdev-add", {"node-name": "top-fmt", "driver": "qcow2", "file": files["top"],
                                "backing": "mid-fmt"})


async def eh_run(d, active, on_error, error_pauses_job):
    args = {"job-id": "job0", "device": "top-fmt", "on-error": on_error,
            "top-node": "top-fmt" if active else "mid-fmt",
            "base-node": "mid-fmt" if active else "base-fmt"}
    await d.ok("block-commit", args)
    log = []
    import asyncio
    import time
    deadline = time.monotonic() + 30
    names = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "BLOCK_JOB_READY")
    while True:
        ev = None
        for i, e in enumerate(d.events):
            if i not in d._consumed and e["event"] in names \
                    and e.get("data", {}).get("device") == "job0":
                d._consumed.add(i)
                ev = e
                break
        if ev is None:
            assert time.monotonic() < deadline, f"{d.kind}: job0 hangs: {d.events}"
            await asyncio.sleep(0.01)
            continue
        log.append(ev["event"])
        if ev["event"] == "BLOCK_JOB_COMPLETED":
            break
        if ev["event"] == "BLOCK_JOB_ERROR":
            if error_pauses_job:
                await d.ok("block-job-resume", {"device": "job0"}, label="resume after error")
        elif ev["event"] == "BLOCK_JOB_READY":
            await d.ok("block-job-complete", {"device": "job0"}, label="complete on ready")
        else:
            raise AssertionError(f"Unexpected event: {ev}")
    await d.wait_job_gone("job0")
    await d.assert_no_jobs("no jobs at the end")
    await d.graph("final graph")


def eh_after(d, ctx):
    for name in ("mid", "test"):
        d.after.append((f"check {name}", lambda n=name: qemu_img("check", "-q", ctx[n])))
    for name, fmt in (("backing", "raw"), ("mid", "qcow2"), ("test", "qcow2")):
        # Which image now reads as which did before (040's compare_images).
        d.after.append((f"{name} reads as", lambda n=name, f=fmt: [
            old for old in ("backing", "mid", "test")
            if _same(d.path(f"{old}-before.raw"), ctx[n], f)]))


def _same(raw, img, fmt):
    import subprocess
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, raw, img],
                          capture_output=True).returncode == 0


def eh_case(active, fault, on_error):
    """fault: (which image, 'read_aio' or 'write_aio')."""
    where, event = fault
    pauses = on_error == "stop"

    async def scenario(d, ctx):
        await d.start()
        dbg = {f"{where}_debug": blkdebug_event(event, is_raw=(where == "base"))}
        await add_block_nodes(d, ctx, **dbg)
        await eh_run(d, active, on_error, pauses)
        eh_after(d, ctx)
    return scenario


EH_CASES = {}
for active, faults in ((True, (("top", "read_aio"), ("mid", "write_aio"))),
                       (False, (("mid", "read_aio"), ("base", "write_aio")))):
    for fault in faults:
        for on_error in ("report", "stop", "ignore"):
            kind = "active" if active else "intermediate"
            op = "read" if fault[1] == "read_aio" else "write"
            EH_CASES[f"eh_{kind}_{op}_error_{on_error}"] = eh_case(active, fault, on_error)


def case(name, fn, setup):
    async def run():
        return await both(f"040 {name}", fn, setup)
    return run


CASES = {name: case(name, fn, sd_setup) for name, fn in [
    ("commit", sd_commit), ("commit_node", sd_commit_node), ("top_is_active", sd_top_is_active),
    ("top_is_default_active", sd_top_is_default_active), ("errors", sd_errors),
    ("set_speed", sd_set_speed),
]}
CASES.update({name: case(name, fn, eh_setup) for name, fn in EH_CASES.items()})


async def error_handling():
    problems = []
    for name, fn in EH_CASES.items():
        problems += await both(f"040 {name}", fn, eh_setup)
    return problems


async def single_drive():
    problems = []
    for name in ("commit", "commit_node", "top_is_active", "top_is_default_active", "errors",
                 "set_speed"):
        problems += await CASES[name]()
    return problems


# Groups, as the Rust tests run them.
CASES["single_drive"] = single_drive
CASES["error_handling"] = error_handling

if __name__ == "__main__":
    main(CASES)
