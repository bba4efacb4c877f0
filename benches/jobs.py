#!/usr/bin/env python3
"""Block jobs (issue 5): strata's offline stream/commit against qemu-storage-daemon's
block-stream/block-commit and `qemu-img commit`, on the same images, interleaved round by
round, page cache dropped before every timed run; prints markdown tables of medians.

    cargo build --release && cargo build --release --example stream_randread
    python3 benches/jobs.py --rounds 5                 # every case
    python3 benches/jobs.py --rounds 5 stream-full commit-mid randread

The chain (built once, kept in /var/tmp/strata-jobs/pristine and reused):
  base.qcow2  1 GiB, fully written (random data)
  mid.qcow2   256 MiB in 4096 scattered 64 KiB pieces
  top.qcow2   64 MiB in 1024 scattered 64 KiB pieces (some over mid's)

Every run works on fresh copies in /var/tmp/strata-jobs/work (ext4 on the virtio disk, not
tmpfs). All tools use O_DIRECT: strata `-t none` (cache.direct; its default I/O mode, the
ring on this file system), qemu-storage-daemon `cache.direct=on, aio=io_uring` on every file
node, qemu-img `-t none`.

Timing:
- strata and qemu-img: the whole process, from exec to exit (opening the chain, the job, the
  final flush, closing the images). This is an upper bound on the job's own time.
- qemu-storage-daemon (already started, the chain open, caches dropped after that): from
  sending block-stream/block-commit to the end of a `blockdev-del` of the top node sent
  right after BLOCK_JOB_COMPLETED (that closes the chain: metadata written back, flushed).
- CPU: user+sys of the strata/qemu-img process (wait4), of the daemon (/proc/PID/stat)
  over the same interval.

The guest case runs examples/stream_randread (4 KiB random reads at depth 32 on the top,
alone, then with a stream limited to 100 MiB/s) on fresh copies; `randread-paused` does the
same with the job paused as soon as it starts (what the stream's filter alone costs: its
guest reads do not copy, unlike QEMU's).
QEMU's side is not measured (qemu-storage-daemon has no guest).
"""

import argparse
import json
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(ROOT, "target", "release", "strata")
RANDREAD = os.path.join(ROOT, "target", "release", "examples", "stream_randread")
DIR = "/var/tmp/strata-jobs"
PRISTINE = os.path.join(DIR, "pristine")
WORK = os.path.join(DIR, "work")
GIB = 1 << 30
CHUNK = 64 << 10
IMAGES = ("base.qcow2", "mid.qcow2", "top.qcow2")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return r.stdout


def qemu_io_writes(img, pieces, pattern):
    """Writes 64 KiB pieces at the given offsets, in batches of qemu-io commands."""
    for i in range(0, len(pieces), 256):
        cmd = ["qemu-io", "-f", "qcow2", "-t", "none"]
        for off in pieces[i:i + 256]:
            cmd += ["-c", f"write -P {pattern} {off} {CHUNK}"]
        sh(cmd + [img])


def build_chain():
    stamp = os.path.join(PRISTINE, "done")
    if os.path.exists(stamp):
        return
    shutil.rmtree(PRISTINE, ignore_errors=True)
    os.makedirs(PRISTINE)
    raw = os.path.join(PRISTINE, "base.raw")
    print("building the chain in", PRISTINE, file=sys.stderr)
    with open(raw, "wb") as out:
        for _ in range(GIB // (1 << 20)):
            out.write(os.urandom(1 << 20))
    base = os.path.join(PRISTINE, "base.qcow2")
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base])
    os.unlink(raw)
    rng = random.Random(5)
    slots = GIB // CHUNK
    mid_pieces = sorted(s * CHUNK for s in rng.sample(range(slots), (256 << 20) // CHUNK))
    top_pieces = sorted(s * CHUNK for s in rng.sample(range(slots), (64 << 20) // CHUNK))
    for name, backing, pieces, pattern in (("mid.qcow2", "base.qcow2", mid_pieces, "0x4d"),
                                           ("top.qcow2", "mid.qcow2", top_pieces, "0x54")):
        img = os.path.join(PRISTINE, name)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", img])
        qemu_io_writes(img, pieces, pattern)
    for name in IMAGES:
        sh(["qemu-img", "check", os.path.join(PRISTINE, name)])
    open(stamp, "w").close()


def fresh(names):
    """Copies the pristine images named into WORK (the others are kept from before)."""
    os.makedirs(WORK, exist_ok=True)
    for n in names:
        dst = os.path.join(WORK, n)
        if os.path.exists(dst):
            os.unlink(dst)
        shutil.copyfile(os.path.join(PRISTINE, n), dst)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_process(cmd):
    """Runs cmd in WORK with the cache dropped first; returns (seconds, cpu seconds)."""
    drop_caches()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=WORK, capture_output=True, text=True)
    t = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return t, cpu


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.f = self.sock.makefile("rw")
        self.events = []
        self.recv()  # greeting
        self.cmd("qmp_capabilities")

    def recv(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError("qemu-storage-daemon closed the monitor")
        return json.loads(line)

    def send(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()

    def reply(self):
        while True:
            m = self.recv()
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise RuntimeError(m["error"])
            return m["return"]

    def cmd(self, name, **args):
        self.send(name, **args)
        return self.reply()

    def event(self, name):
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            self.events.append(self.recv())


def qsd_blockdev():
    def img(name, backing):
        node = {"driver": "qcow2", "node-name": name.split(".")[0],
                "cache": {"direct": True},
                "file": {"driver": "file", "filename": os.path.join(WORK, name),
                         "cache": {"direct": True}, "aio": "io_uring"}}
        node["backing"] = backing
        return node
    return img("top.qcow2", img("mid.qcow2", img("base.qcow2", None)))


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_qsd(command, args):
    """Starts qemu-storage-daemon on WORK's chain, drops the cache, times `command` to the
    end of the blockdev-del of the top node that follows its completion."""
    sock = os.path.join(WORK, "qmp.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen(["qemu-storage-daemon",
                          "--chardev", f"socket,path={sock},server=on,wait=off,id=qmp0",
                          "--monitor", "chardev=qmp0",
                          "--blockdev", json.dumps(qsd_blockdev())],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        q = Qmp(sock)
        drop_caches()
        c0 = proc_cpu(p.pid)
        t0 = time.monotonic()
        q.cmd(command, **args)
        ev = q.event("BLOCK_JOB_COMPLETED")
        if ev["data"].get("error"):
            sys.exit(f"{command} failed: {ev['data']['error']}")
        q.cmd("blockdev-del", **{"node-name": "top"})
        t = time.monotonic() - t0
        cpu = proc_cpu(p.pid) - c0
        q.send("quit")
        p.wait(timeout=30)
        return t, cpu
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def verify(kind):
    """Checks WORK's images after a run against the pristine chain."""
    top = os.path.join(WORK, "top.qcow2")
    if kind.startswith("stream"):
        sh(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
            os.path.join(PRISTINE, "top.qcow2"), top])
        sh(["qemu-img", "check", top])
    else:
        # The commit's result: mid's view (top's without top) now lives in base.
        sh(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
            os.path.join(PRISTINE, "mid.qcow2"), os.path.join(WORK, "base.qcow2")])
        sh(["qemu-img", "compare", os.path.join(PRISTINE, "top.qcow2"), top])
        for n in ("base.qcow2", "top.qcow2"):
            sh(["qemu-img", "check", os.path.join(WORK, n)])


# case: (description, copied per run, [(tool, kind, runner)])
def cases():
    s = lambda *a: (lambda: run_process([STRATA, *a]))  # noqa: E731
    qi = lambda *a: (lambda: run_process(["qemu-img", *a]))  # noqa: E731
    qsd = lambda c, **a: (lambda: run_qsd(c, a))  # noqa: E731
    return {
        "stream-full": (
            "stream of top, the whole chain (top ends standalone)",
            ["top.qcow2"],
            [("strata stream", s("stream", "-q", "-t", "none", "top.qcow2")),
             ("qsd block-stream", qsd("block-stream", **{"job-id": "j", "device": "top"}))]),
        "stream-base": (
            "stream of top with base-node = base (mid's data into top)",
            ["top.qcow2"],
            [("strata stream -b base", s("stream", "-q", "-t", "none", "-b", "base.qcow2",
                                         "top.qcow2")),
             ("qsd block-stream base-node", qsd("block-stream", **{
                 "job-id": "j", "device": "top", "base-node": "base"}))]),
        "commit-mid": (
            "commit of mid into base",
            list(IMAGES),
            [("strata commit -d", s("commit", "-q", "-d", "-t", "none", "mid.qcow2")),
             ("qsd block-commit", qsd("block-commit", **{
                 "job-id": "j", "device": "top", "top-node": "mid", "base-node": "base"})),
             ("qemu-img commit -d", qi("commit", "-q", "-d", "-t", "none", "mid.qcow2")),
             ("strata commit", s("commit", "-q", "-t", "none", "mid.qcow2")),
             ("qemu-img commit", qi("commit", "-q", "-t", "none", "mid.qcow2"))]),
    }


def median(v):
    return statistics.median(v) if v else float("nan")


def run_timed(names, rounds):
    all_cases = cases()
    rows = []
    for name in names:
        desc, copies, variants = all_cases[name]
        times = {t: [] for t, _ in variants}
        cpus = {t: [] for t, _ in variants}
        fresh(IMAGES)
        for r in range(rounds):
            # Alternate which tool goes first, so neither always runs on a "warmer" disk.
            order = variants if r % 2 == 0 else list(reversed(variants))
            for tool, run in order:
                fresh(copies)
                t, cpu = run()
                times[tool].append(t)
                cpus[tool].append(cpu)
                if r == 0:
                    verify(name)
                print(f"{name} round {r + 1}: {tool}: {t:.3f} s, cpu {cpu:.3f} s",
                      file=sys.stderr)
        rows.append((name, desc, variants, times, cpus))
    print("| case | tool | time (median) | CPU (median) | strata / this | paired | target <= 0.7x |")
    print("|---|---|---|---|---|---|---|")
    for name, desc, variants, times, cpus in rows:
        for tool, _ in variants:
            # The strata figure this tool is compared with: the same emptying behaviour.
            ref = ("strata commit" if tool in ("qemu-img commit", "strata commit")
                   else variants[0][0])
            ratio = median(times[ref]) / median(times[tool])
            paired = median([a / b for a, b in zip(times[ref], times[tool])])
            target = ""
            if not tool.startswith("strata"):
                target = "met" if paired <= 0.7 else "**missed**"
            cmp = f"{ratio:.2f}" if tool != ref else "-"
            pcmp = f"{paired:.2f}" if tool != ref else "-"
            print(f"| {name}: {desc} | {tool} | {median(times[tool]):.2f} s "
                  f"| {median(cpus[tool]):.2f} s | {cmp} | {pcmp} | {target} |")


def run_randread(rounds, seconds, speed, paused=False):
    res = []
    fresh(IMAGES)
    extra = ["--paused"] if paused else []
    for r in range(rounds):
        fresh(["top.qcow2"])
        drop_caches()
        out = subprocess.run([RANDREAD, "top.qcow2", str(seconds), speed] + extra, cwd=WORK,
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"stream_randread failed: {out.stderr}")
        v = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"randread{' (paused)' if paused else ''} round {r + 1}: {v}", file=sys.stderr)
        res.append(v)
    alone = median([v["iops_alone"] for v in res])
    during = median([v["iops_during_stream"] for v in res])
    ratio = median([v["ratio"] for v in res])
    prog = median([v["stream_progress"] for v in res]) / (1 << 20)
    finished = sum(1 for v in res if v["stream_finished"])
    phase = median([v["seconds_during"] for v in res])
    what = ("stream started and paused at once (the stream's filter alone)" if paused
            else f"stream limited to {speed}/s")
    target = "(diagnostic)" if paused else ("met" if ratio >= 0.8 else "**missed**")
    print()
    print("| case | IOPS alone | IOPS with the job | ratio (median of rounds) "
          "| job progress in the phase (median) | target >= 0.8x |")
    print("|---|---|---|---|---|---|")
    print(f"| 4k randread QD32 on top, {what} | {alone:.0f} | {during:.0f} | {ratio:.2f} "
          f"| {prog:.0f} MiB in {phase:.1f} s (ended in {finished} of {rounds} rounds) | {target} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5, help="randread phase length")
    ap.add_argument("--speed", default="100M", help="stream speed in the randread case")
    ap.add_argument("cases", nargs="*",
                    help="stream-full stream-base commit-mid randread randread-paused "
                    "(default: all)")
    a = ap.parse_args()
    for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    for b in (STRATA, RANDREAD):
        if not os.path.exists(b):
            sys.exit(f"{b} is missing: cargo build --release && "
                     "cargo build --release --example stream_randread")
    names = a.cases or ["stream-full", "stream-base", "commit-mid", "randread",
                        "randread-paused"]
    print(f"# {platform.node()} {platform.release()}, {a.rounds} rounds", file=sys.stderr)
    build_chain()
    timed = [n for n in names if not n.startswith("randread")]
    if timed:
        run_timed(timed, a.rounds)
    if "randread" in names:
        run_randread(a.rounds, a.seconds, a.speed)
    if "randread-paused" in names:
        run_randread(a.rounds, a.seconds, a.speed, paused=True)


if __name__ == "__main__":
    main()
