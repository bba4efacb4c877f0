"""The job state machine through QMP, against qemu-storage-daemon and strata daemon.

base <- top (qcow2, 4 MiB, 3 MiB of data in base). A stream of top with auto-finalize and
auto-dismiss off, held by its rate limit (1 KiB/s: it copies one chunk, then waits), is
taken through the verbs in each state: the ones refused (with QEMU's texts), pause and
resume (user pauses nest with nothing; a paused job refuses a soft block-job-cancel),
set-speed to let it run to PENDING, finalize, dismiss. Then the same job again, cancelled in
PENDING (it must abort), and once more, cancelled while running. query-jobs and
query-block-jobs are recorded where their content does not depend on timing (a running
job's offset and busy flag are masked).
"""

import asyncio

from qmplib import MIB, both, main, qemu_img, qemu_io


def setup(d):
    base, top = d.path("base.qcow2"), d.path("top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", "write -P 0x44 0 3M", base)
    return {"base": base, "top": top}


async def queries(d, label, running):
    for cmd in ("query-jobs", "query-block-jobs"):
        r = await d.cmd(cmd, record=False)
        for j in r.get("return", []):
            if running:
                for k in ("offset", "busy", "current-progress"):
                    if k in j:
                        j[k] = "*"
        d.record(f"{label}: {cmd}", r)


async def start(d, job):
    await d.ok("block-stream", {"device": "top", "job-id": job, "speed": 1024,
                                "auto-finalize": False, "auto-dismiss": False},
               label=f"start {job}")
    await d.wait_status(job, "running")
    # Past its first chunk, asleep in the rate limit: its length is known by then (strata's
    # job counts it once its loop starts on the IoThread, a moment after `running`).
    await d.wait_offset(job, 512 * 1024)


async def verbs(d, ctx):
    await d.start(blockdevs=[{"driver": "qcow2", "node-name": "top",
                              "file": {"driver": "file", "filename": ctx["top"]}}])
    await start(d, "s0")
    await queries(d, "running", True)
    for cmd, args, label in [
        ("job-finalize", {"id": "s0"}, "finalize while running"),
        ("job-dismiss", {"id": "s0"}, "dismiss while running"),
        ("block-job-complete", {"device": "s0"}, "complete a stream"),
        ("job-complete", {"id": "s0"}, "job-complete a stream"),
        ("block-job-resume", {"device": "s0"}, "resume while running"),
        ("block-job-finalize", {"id": "s0"}, "block-job-finalize while running"),
        ("block-job-dismiss", {"id": "s0"}, "block-job-dismiss while running"),
    ]:
        await d.cmd(cmd, args, label=label)
    await d.ok("block-job-pause", {"device": "s0"}, label="pause")
    await d.wait_status("s0", "paused")
    await queries(d, "paused", True)
    await d.cmd("block-job-pause", {"device": "s0"}, label="pause again")
    await d.cmd("job-pause", {"id": "s0"}, label="job-pause again")
    await d.cmd("block-job-cancel", {"device": "s0"}, label="soft cancel while paused")
    await d.ok("block-job-resume", {"device": "s0"}, label="resume")
    await d.wait_status("s0", "running")
    await d.cmd("job-resume", {"id": "s0"}, label="resume again")
    await d.ok("job-pause", {"id": "s0"}, label="job-pause")
    await d.wait_status("s0", "paused")
    await d.ok("job-resume", {"id": "s0"}, label="job-resume")
    await d.wait_status("s0", "running")
    await d.ok("block-job-set-speed", {"device": "s0", "speed": 0})
    await d.wait_status("s0", "pending")
    await d.event("BLOCK_JOB_PENDING", id="s0")
    await asyncio.sleep(0.05)
    await queries(d, "pending", False)
    for cmd, args, label in [
        ("job-pause", {"id": "s0"}, "pause while pending"),
        ("job-dismiss", {"id": "s0"}, "dismiss while pending"),
        ("block-job-set-speed", {"device": "s0", "speed": 1}, "set-speed while pending"),
    ]:
        await d.cmd(cmd, args, label=label)
    await d.ok("block-job-finalize", {"id": "s0"}, label="finalize")
    await d.wait_status("s0", "concluded")
    await queries(d, "concluded", False)
    await d.cmd("job-finalize", {"id": "s0"}, label="finalize again")
    await d.cmd("block-job-pause", {"device": "s0"}, label="pause when concluded")
    await d.ok("job-dismiss", {"id": "s0"}, label="dismiss")
    await d.wait_status("s0", "null")
    await d.ok("query-jobs", label="no jobs")
    await d.graph("graph after the stream")


async def cancel_pending(d, ctx):
    """A job cancelled in PENDING aborts (QEMU's job_cancel: job_completed_txn_abort)."""
    await d.start(blockdevs=[{"driver": "qcow2", "node-name": "top",
                              "file": {"driver": "file", "filename": ctx["top"]}}])
    await start(d, "s1")
    await d.ok("block-job-set-speed", {"device": "s1", "speed": 0})
    await d.wait_status("s1", "pending")
    await d.ok("job-cancel", {"id": "s1"}, label="cancel while pending")
    await d.wait_status("s1", "concluded", timeout=10)
    await queries(d, "concluded after the cancel", False)
    await d.ok("job-dismiss", {"id": "s1"})
    await d.wait_status("s1", "null")
    await d.graph("graph after the cancelled stream")


async def cancel_running(d, ctx):
    await d.start(blockdevs=[{"driver": "qcow2", "node-name": "top",
                              "file": {"driver": "file", "filename": ctx["top"]}}])
    await start(d, "s2")
    await d.ok("block-job-cancel", {"device": "s2"}, label="cancel while running")
    await d.wait_status("s2", "concluded")
    await queries(d, "concluded after the cancel", False)
    await d.ok("block-job-dismiss", {"id": "s2"})
    await d.wait_status("s2", "null")
    await d.graph("graph after the cancelled stream")


def case(name, fn, known=None):
    async def run():
        return await both(f"jobs {name}", fn, setup, known=known)
    return run


CASES = {
    "verbs": case("verbs", verbs),
    "cancel_pending": case("cancel_pending", cancel_pending),
    "cancel_running": case("cancel_running", cancel_running),
}

if __name__ == "__main__":
    main(CASES)
