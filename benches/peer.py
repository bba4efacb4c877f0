#!/usr/bin/env python3
"""Measures strata against its peers on the same file, interleaved, and prints medians.

Each case runs `strata bench` and the peer (fio, qemu-img bench) alternately for --rounds
rounds on the same file, reads both JSON outputs (strata's uses fio's field names), and prints
one markdown table row per case: median IOPS of each, their ratio, and CPU per request
(whole-process user+sys, as fio counts it). Use it as

    cargo build --release
    python3 benches/peer.py --rounds 5 --runtime 5 shm-randread-qd32 null-qd32-1job ...
    python3 benches/peer.py --list

Files are made once (1 GiB of random data) in /dev/shm and /var/tmp and reused.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(ROOT, "target", "release", "strata")
SHM = "/dev/shm/strata-peer.img"
QCOW = "/dev/shm/strata-q.qcow2"
QTOP = "/dev/shm/strata-qtop.qcow2"
DISK_QCOW = "/var/tmp/strata-q.qcow2"
DISK = "/var/tmp/strata-peer.img"
SIZE = 1 << 30


def fio_cmd(file, rw, depth, direct, engine, runtime, jobs=1, size="1g"):
    cmd = ["fio", "--name=peer", f"--ioengine={engine}", f"--rw={rw}", "--bs=4k",
           f"--iodepth={depth}", f"--runtime={runtime}", "--time_based",
           "--output-format=json", f"--numjobs={jobs}", f"--size={size}", "--group_reporting=0"]
    if engine != "null":
        cmd += [f"--filename={file}", f"--direct={direct}"]
    return cmd


def qemu_bench_cmd(img, write, depth, count):
    cmd = ["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-d", str(depth),
           "-s", "4096", "-S", "428969984", "-c", str(count)]
    if write:
        cmd.append("-w")
    return cmd + [img]


def strata_cmd(file, rw, depth, direct, runtime, jobs=1, driver="file", extra=()):
    cmd = [STRATA, "bench", f"--rw={rw}", "--bs=4k", f"--iodepth={depth}",
           f"--runtime={runtime}", "--time_based", "--output-format=json", f"--numjobs={jobs}",
           "--size=1g", f"--driver={driver}"]
    if driver == "file":
        cmd += [f"--filename={file}", f"--direct={direct}"]
    return cmd + list(extra)


# name: (description, strata args, peer kind, peer args)
def cases(runtime):
    c = {}
    for where, f in (("shm", SHM), ("disk", DISK)):
        for rw in ("randread", "randwrite"):
            c[f"{where}-{rw}-qd32"] = (
                f"{f}, 4k {rw}, iodepth 32, direct=1, 1 job",
                strata_cmd(f, rw, 32, 1, runtime),
                "fio io_uring", fio_cmd(f, rw, 32, 1, "io_uring", runtime))
            c[f"{where}-{rw}-qd1"] = (
                f"{f}, 4k {rw}, iodepth 1, direct=1, 1 job",
                strata_cmd(f, rw, 1, 1, runtime),
                "fio psync", fio_cmd(f, rw, 1, 1, "psync", runtime))
            c[f"{where}-{rw}-qd1-uring"] = (
                f"{f}, 4k {rw}, iodepth 1, direct=1, 1 job",
                strata_cmd(f, rw, 1, 1, runtime),
                "fio io_uring", fio_cmd(f, rw, 1, 1, "io_uring", runtime))
    for jobs in (1, 2):
        c[f"null-qd32-{jobs}job"] = (
            f"null, 4k randread, iodepth 32, {jobs} job(s)",
            strata_cmd(None, "randread", 32, 0, runtime, jobs=jobs, driver="null"),
            "fio null", fio_cmd(None, "randread", 32, 0, "null", runtime, jobs=jobs))
    # qcow2 against qemu-img bench (same image, O_DIRECT, io_uring), and against raw.
    for rw, w in (("randread", False), ("randwrite", True)):
        for d, count in ((32, 300000), (1, 60000)):
            c[f"qcow2-{rw}-qd{d}"] = (
                f"{QCOW} (1 GiB, fully written), 4k {rw}, iodepth {d}, direct",
                strata_cmd(QCOW, rw, d, 1, runtime, extra=["--format=qcow2"]),
                "qemu-img bench", qemu_bench_cmd(QCOW, w, d, count))
    # The same with strata's file driver held to the ring (--aio=io_uring), as qemu-img bench
    # is: on tmpfs the default (auto) runs a request as a plain syscall when its IoThread is
    # otherwise idle, which is most of the difference above.
    for rw, w in (("randread", False), ("randwrite", True)):
        for d, count in ((32, 300000), (1, 60000)):
            c[f"qcow2-{rw}-qd{d}-ring"] = (
                f"{QCOW} (1 GiB, fully written), 4k {rw}, iodepth {d}, direct, strata on the ring",
                strata_cmd(QCOW, rw, d, 1, runtime, extra=["--format=qcow2", "--aio=io_uring"]),
                "qemu-img bench", qemu_bench_cmd(QCOW, w, d, count))
    c["qcow2-chain-randread-qd32"] = (
        f"{QTOP} (3-deep chain, data in the base), 4k randread, iodepth 32, direct",
        strata_cmd(QTOP, "randread", 32, 1, runtime, extra=["--format=qcow2"]),
        "qemu-img bench", qemu_bench_cmd(QTOP, False, 32, 300000))
    for rw in ("randread", "randwrite"):
        c[f"disk-qcow2-vs-raw-{rw}-qd32"] = (
            f"/var/tmp: qcow2 (fully written) against raw, 4k {rw}, iodepth 32, direct",
            strata_cmd(DISK_QCOW, rw, 32, 1, runtime, extra=["--format=qcow2"]),
            "strata raw", strata_cmd(DISK, rw, 32, 1, runtime))
    # The same host blocks both ways: guest [0, 512 MiB) of the qcow2 made by `qemu-img
    # convert` sits at host offset 327680 in one piece (`qemu-img map`), so strata's raw driver
    # over the qcow2 file at that offset writes exactly the blocks the qcow2 run writes. On
    # this virtual disk two files made the same way can differ by 30% in write speed with
    # where their blocks landed; this measures the qcow2 layer alone.
    for rw in ("randread", "randwrite"):
        common = [STRATA, "bench", f"--rw={rw}", "--bs=4k", "--iodepth=32",
                  f"--runtime={runtime}", "--time_based", "--output-format=json",
                  f"--filename={DISK_QCOW}", "--direct=1", "--size=512m"]
        c[f"disk-qcow2-vs-raw-sameblocks-{rw}-qd32"] = (
            f"{DISK_QCOW}: qcow2 guest [0, 512M) against raw over the same host blocks, "
            f"4k {rw}, iodepth 32, direct",
            common + ["--format=qcow2"],
            "strata raw, same blocks", common + ["--format=raw", "--offset=327680"])
    # Ring options of strata, each against the plain ring on the same file (the "peer" here is
    # strata itself with --aio=io_uring and no options).
    for where, f in (("shm", SHM), ("disk", DISK)):
        base = strata_cmd(f, "randread", 32, 1, runtime, extra=["--aio=io_uring"])
        for opt in ("--registerfiles=1", "--fixedbufs=1", "--sqthread_poll=1"):
            c[f"opt-{where}{opt.split('=')[0].replace('--', '-')}"] = (
                f"{f}, 4k randread, iodepth 32, direct=1, ring: {opt} vs none",
                base + [opt], "strata ring, no option", base)
        c[f"opt-{where}-inline"] = (
            f"{f}, 4k randread, iodepth 32, direct=1: --aio=auto vs --aio=io_uring",
            strata_cmd(f, "randread", 32, 1, runtime), "strata --aio=io_uring", base)
    return c


def make_file(path):
    if os.path.exists(path) and os.path.getsize(path) == SIZE:
        return
    with open(path, "wb") as out:
        for _ in range(SIZE // (1 << 20)):
            out.write(os.urandom(1 << 20))


def run(cmd):
    """Runs a tool; returns its JSON document (or, for qemu-img bench, an equivalent built
    from its output)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    # communicate() reaped the child: its rusage now counts in RUSAGE_CHILDREN.
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err.decode()}")
    out = out.decode()
    if cmd[0] == "qemu-img":
        # "Run completed in 1.751 seconds."
        secs = float(out.strip().splitlines()[-1].split()[3])
        count = int(cmd[cmd.index("-c") + 1])
        d = {"iops": count / secs, "total_ios": count, "runtime": secs * 1000}
        empty = {"iops": 0, "total_ios": 0, "runtime": 0}
        return {"jobs": [{"read": d, "write": empty}]}
    out = out[out.index("{"):]  # fio may print notes before the JSON
    return json.loads(out)


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def figures(cmd):
    """(IOPS, CPU seconds per request) of one run of `cmd`. CPU is measured the same way for
    every tool: the whole process, kernel workers included (fio's own usr_cpu/sys_cpu leave
    io_uring's workers out)."""
    before = children_cpu()
    doc = run(cmd)
    cpu_s = children_cpu() - before
    iops = 0.0
    ios = 0
    for j in doc["jobs"]:
        for d in ("read", "write"):
            iops += j[d]["iops"]
            ios += j[d]["total_ios"]
    return iops, (cpu_s / ios if ios else 0.0)


def fmt_iops(x):
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("cases", nargs="*")
    a = ap.parse_args()
    all_cases = cases(a.runtime)
    if a.list or not a.cases:
        for k, v in all_cases.items():
            print(f"{k:28} {v[0]} (peer: {v[2]})")
        return
    if not os.path.exists(STRATA):
        sys.exit("build first: cargo build --release")
    if shutil.which("fio") is None:
        sys.exit("fio is not installed (apt-get install fio)")
    for f in (SHM, DISK):
        make_file(f)
    for q, src in ((QCOW, SHM), (DISK_QCOW, DISK)):
        if not os.path.exists(q):
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, q], check=True)
    if not os.path.exists(QTOP):
        base, mid = "/dev/shm/strata-qbase.qcow2", "/dev/shm/strata-qmid.qcow2"
        shutil.copy(QCOW, base)
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", os.path.basename(base), "-F", "qcow2", mid], check=True)
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", os.path.basename(mid), "-F", "qcow2", QTOP], check=True)
    print(f"<!-- {platform.node()} {platform.release()} nproc={os.cpu_count()} "
          f"rounds={a.rounds} runtime={a.runtime}s -->")
    print("| case | strata IOPS | peer | peer IOPS | ratio | paired ratio | strata CPU/req | peer CPU/req | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.cases:
        desc, scmd, peer, pcmd = all_cases[name]
        s_iops, p_iops, s_cpu, p_cpu = [], [], [], []
        for _ in range(a.rounds):
            i, c = figures(scmd)
            s_iops.append(i)
            s_cpu.append(c)
            i, c = figures(pcmd)
            p_iops.append(i)
            p_cpu.append(c)
        si, pi = statistics.median(s_iops), statistics.median(p_iops)
        sc, pc = statistics.median(s_cpu), statistics.median(p_cpu)
        # Each round runs both tools back to back; the median of the per-round ratios is the
        # figure least moved by the machine's slow swings.
        paired = statistics.median(s / p for s, p in zip(s_iops, p_iops))
        print(f"| {name} | {fmt_iops(si)} | {peer} | {fmt_iops(pi)} | {si / pi:.2f} | {paired:.2f} | "
              f"{sc * 1e9:.0f} ns | {pc * 1e9:.0f} ns | {sc / pc if pc else 0:.2f} |", flush=True)
        print(f"<!-- {name}: strata {[round(x) for x in s_iops]} peer {[round(x) for x in p_iops]} -->",
              flush=True)


if __name__ == "__main__":
    main()
