"""iotest 030's TestEIO, TestENOSPC and TestSetSpeed against qemu-storage-daemon and strata.

test.img (qcow2) over backing.img (raw, iotests.create_image, 2 MiB), the backing file read
through blkdebug with a one-shot error (`inject-error`, blockdev-add's form of 030's config
file) on the first read covering sector 1024 (512 KiB: stream's second chunk). The top is
drive0; the backing nodes are `base` (raw) and `dbg` (blkdebug). Each case records the
replies, the events per job, and, when the job stops on the error, query-block-jobs as the
job sits paused; after the daemon has stopped, `qemu-img check` and, where the stream
succeeded, `qemu-img compare` of the top with its old backing file.
"""

from qmplib import KIB, MIB, both, create_image, main, qemu_img

IMAGE_LEN = 2 * MIB
STREAM_BUFFER_SIZE = 512 * KIB
EIO, ENOSPC = 5, 28


def setup_with(errno):
    def setup(d):
        backing, test = d.path("backing.img"), d.path("test.img")
        create_image(backing, IMAGE_LEN)
        qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", test)
        rule = {"event": "read_aio", "errno": errno, "sector": STREAM_BUFFER_SIZE // 512,
                "once": True, "immediately": False}
        # Separate nodes, referenced by name: QEMU does not take an inline backing spec
        # together with the backing file name in the header ("Can't specify 'file' and
        # 'filename' options at the same time").
        blockdevs = [
            {"driver": "blkdebug", "node-name": "dbg",
             "image": {"driver": "file", "filename": backing}, "inject-error": [rule]},
            {"driver": "raw", "node-name": "base", "file": "dbg"},
            {"driver": "qcow2", "node-name": "drive0",
             "file": {"driver": "file", "filename": test}, "backing": "base"},
        ]
        return {"backing": backing, "test": test, "blockdevs": blockdevs}
    return setup


def after_checks(d, ctx, streamed):
    d.after.append(("check test.img", lambda: qemu_img("check", "-q", ctx["test"])))
    if streamed:
        d.after.append(("test.img reads as backing.img",
                        lambda: qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw",
                                         ctx["test"], ctx["backing"])))
        d.after.append(("test.img stands alone",
                        lambda: "backing file:" not in qemu_img("info", ctx["test"])))


async def run_to_end(d, on_error_event=None):
    """030's loop: until BLOCK_JOB_COMPLETED; `on_error_event` runs on BLOCK_JOB_ERROR."""
    ev = None
    while True:
        err_or_done = await first_of(d, ["BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED"], "drive0")
        if err_or_done["event"] == "BLOCK_JOB_COMPLETED":
            return err_or_done
        ev = err_or_done
        assert ev["data"]["operation"] == "read", ev
        if on_error_event:
            await on_error_event()


async def first_of(d, names, device):
    import asyncio
    import time
    deadline = time.monotonic() + 60
    while True:
        for i, ev in enumerate(d.events):
            if i not in d._consumed and ev["event"] in names \
                    and ev.get("data", {}).get("device") == device:
                d._consumed.add(i)
                return ev
        if time.monotonic() > deadline:
            raise AssertionError(f"{d.kind}: none of {names} came; events: {d.events}")
        await asyncio.sleep(0.01)


async def start(d, ctx):
    await d.start(blockdevs=ctx["blockdevs"])
    await d.assert_no_jobs("no jobs at start")


async def stream(d, on_error):
    args = {"device": "drive0", "job-id": "drive0"}
    if on_error:
        args["on-error"] = on_error
    await d.ok("block-stream", args)


async def eio_report(d, ctx):
    await start(d, ctx)
    await stream(d, None)
    ev = await run_to_end(d)
    assert ev["data"].get("error") == "Input/output error", ev
    assert ev["data"]["offset"] == STREAM_BUFFER_SIZE and ev["data"]["len"] == IMAGE_LEN, ev
    await d.wait_job_gone("drive0")
    await d.assert_no_jobs("no jobs at the end")
    await d.graph("final graph")
    after_checks(d, ctx, streamed=False)


async def eio_ignore(d, ctx):
    await start(d, ctx)
    await stream(d, "ignore")
    ev = await run_to_end(d)
    assert ev["data"].get("error") == "Input/output error", ev
    assert ev["data"]["offset"] == IMAGE_LEN and ev["data"]["len"] == IMAGE_LEN, ev
    await d.wait_job_gone("drive0")
    await d.assert_no_jobs("no jobs at the end")
    await d.graph("final graph")
    after_checks(d, ctx, streamed=False)


def stop_then_resume(d, io_status):
    async def on_error():
        # Parked visibly before the query (030 waits for the status change when needed).
        await d.wait_status("drive0", "paused")
        jobs = await d.ok("query-block-jobs", label="query while stopped")
        j = jobs[0]
        assert (j["status"], j["offset"], j["io-status"], j["paused"]) == \
            ("paused", STREAM_BUFFER_SIZE, io_status, True), j
        await d.ok("block-job-resume", {"device": "drive0"})
        jobs = await d.ok("query-block-jobs", record=False)
        if jobs:
            assert jobs[0]["status"] in ("running", "pending", "aborting", "concluded"), jobs
            assert jobs[0]["io-status"] == "ok", jobs
    return on_error


async def eio_stop(d, ctx):
    await start(d, ctx)
    await stream(d, "stop")
    ev = await run_to_end(d, stop_then_resume(d, "failed"))
    assert "error" not in ev["data"], ev
    assert ev["data"]["offset"] == IMAGE_LEN and ev["data"]["len"] == IMAGE_LEN, ev
    await d.wait_job_gone("drive0")
    await d.assert_no_jobs("no jobs at the end")
    await d.graph("final graph")
    after_checks(d, ctx, streamed=True)


async def eio_enospc(d, ctx):
    await start(d, ctx)
    await stream(d, "enospc")
    ev = await run_to_end(d)
    assert ev["data"].get("error") == "Input/output error", ev
    assert ev["data"]["offset"] == STREAM_BUFFER_SIZE, ev
    await d.wait_job_gone("drive0")
    await d.assert_no_jobs("no jobs at the end")
    after_checks(d, ctx, streamed=False)


async def enospc_enospc(d, ctx):
    await start(d, ctx)
    await stream(d, "enospc")
    ev = await run_to_end(d, stop_then_resume(d, "nospace"))
    assert "error" not in ev["data"], ev
    assert ev["data"]["offset"] == IMAGE_LEN, ev
    await d.wait_job_gone("drive0")
    await d.assert_no_jobs("no jobs at the end")
    await d.graph("final graph")
    after_checks(d, ctx, streamed=True)


async def set_speed(d, ctx):
    """030 TestSetSpeed: the speed a job starts with and the one set-speed sets show in
    query-block-jobs; a negative speed is refused. The job is held by its rate limit (the
    first chunk passes, the next would wait for minutes) instead of a blkdebug breakpoint,
    then cancelled."""
    await start(d, ctx)
    await d.cmd("block-stream", {"device": "drive0", "job-id": "drive0", "speed": -1},
                label="negative speed at start")
    await d.assert_no_jobs("no job after the refusal")
    await d.ok("block-stream", {"device": "drive0", "job-id": "drive0", "speed": 1024})
    jobs = await d.ok("query-block-jobs", record=False)
    d.record("speed at start", jobs[0]["speed"])
    await d.cmd("block-job-set-speed", {"device": "drive0", "speed": -1},
                label="negative set-speed")
    await d.ok("block-job-set-speed", {"device": "drive0", "speed": 2048})
    jobs = await d.ok("query-block-jobs", record=False)
    d.record("speed after set-speed", jobs[0]["speed"])
    await d.cmd("block-job-set-speed", {"device": "nope", "speed": 1},
                label="set-speed of no job")
    await d.cmd("block-job-set-speed", {"device": "drive0", "speed": "fast"},
                label="set-speed with a string")
    # Cancelled once the first chunk is copied (the job then sleeps), so the offset in
    # BLOCK_JOB_CANCELLED does not depend on timing.
    await d.wait_offset("drive0", STREAM_BUFFER_SIZE)
    await d.ok("block-job-cancel", {"device": "drive0"})
    ev = await d.wait_completed("drive0")
    assert ev["event"] == "BLOCK_JOB_CANCELLED", ev
    await d.wait_job_gone("drive0")
    await d.assert_no_jobs("no jobs at the end")
    await d.graph("final graph")
    after_checks(d, ctx, streamed=False)


DELIBERATE = {}


def case(fn, errno):
    async def run():
        return await both(f"030 {fn.__name__}", fn, setup_with(errno),
                          DELIBERATE.get(fn.__name__))
    return run


CASES = {
    "eio_report": case(eio_report, EIO),
    "eio_ignore": case(eio_ignore, EIO),
    "eio_stop": case(eio_stop, EIO),
    "eio_enospc": case(eio_enospc, EIO),
    "enospc_enospc": case(enospc_enospc, ENOSPC),
    "set_speed": case(set_speed, EIO),
}

if __name__ == "__main__":
    main(CASES)
