#!/usr/bin/env python3
"""NBD export speed: strata daemon against qemu-storage-daemon, same image, interleaved.

4k random reads at depth 32 with `qemu-img bench` on the export's NBD URI (a UNIX socket),
for (a) a qcow2 chain top whose data lives in the base, in /dev/shm, and (b) null-co. Each
round starts the server, runs the client, reads the server's CPU time from /proc, and stops
it. Prints medians of IOPS and of IOPS per server CPU-second, and their ratios.

    cargo build --release
    python3 benches/nbd.py [--rounds 5] [--count 300000]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(ROOT, "target", "release", "strata")
TICK = os.sysconf("SC_CLK_TCK")


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_chain(d):
    base, mid, top = (os.path.join(d, n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, "1G")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1G", base)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    return top


def server_cmd(prog, d, blockdev):
    return prog + [
        "--chardev", f"socket,path={d}/qmp.sock,server=on,wait=off,id=m",
        "--monitor", "chardev=m",
        "--blockdev", json.dumps(blockdev),
        "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
        "--export", "type=nbd,id=e0,node-name=n",
    ]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def one_run(prog, d, blockdev, count):
    for s in ("qmp.sock", "nbd.sock"):
        try:
            os.unlink(os.path.join(d, s))
        except FileNotFoundError:
            pass
    p = subprocess.Popen(server_cmd(prog, d, blockdev), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(os.path.join(d, "nbd.sock")):
            break
        time.sleep(0.05)
    uri = f"nbd+unix:///n?socket={d}/nbd.sock"
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "bench", "-f", "raw", "-t", "none", "-d", "32", "-s", "4096",
                    "-S", "428969984", "-c", str(count), uri],
                   check=True, stdout=subprocess.DEVNULL)
    secs = time.monotonic() - t0
    cpu = cpu_seconds(p.pid)
    p.terminate()
    p.wait()
    return count / secs, count / max(cpu, 1e-3)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--count", type=int, default=300000)
    args = ap.parse_args()
    if not os.path.exists(STRATA):
        sys.exit("build first: cargo build --release")
    d = tempfile.mkdtemp(prefix="strata-nbd-", dir="/dev/shm")
    try:
        top = make_chain(d)
        cases = {
            "qcow2 chain top (data in the base), /dev/shm": {
                "driver": "qcow2", "node-name": "n",
                "file": {"driver": "file", "filename": top, "cache": {"direct": False}}},
            "null-co": {"driver": "null-co", "node-name": "n", "size": 1 << 30},
        }
        progs = {"strata": [STRATA, "daemon"], "qsd": ["qemu-storage-daemon"]}
        print("| case | strata IOPS | qsd IOPS | ratio | strata IOPS/CPU-s | qsd IOPS/CPU-s | ratio |")
        print("|---|---|---|---|---|---|---|")
        for name, bd in cases.items():
            res = {k: [] for k in progs}
            for _ in range(args.rounds):
                for k, prog in progs.items():
                    res[k].append(one_run(prog, d, bd, args.count))
            med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
                   for k, v in res.items()}
            s, q = med["strata"], med["qsd"]
            print(f"| {name} | {s[0]/1e3:.1f}k | {q[0]/1e3:.1f}k | {s[0]/q[0]:.2f} | "
                  f"{s[1]/1e3:.0f}k | {q[1]/1e3:.0f}k | {s[1]/q[1]:.2f} |")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
