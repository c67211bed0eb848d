#!/usr/bin/env python3
"""The proxies' own work per request, counted instead of timed: user-space instructions
(valgrind's callgrind, the same count whatever else the machine is doing) and system calls
(strace -c), for HAProxy and the portal (2 threads each, configured as in bench/dataplane.py)
in front of one redis-server, under redis-benchmark SET -c 50 at pipelines 1 and 16.

Each figure is the difference between a run of N and of 5N requests, divided by 4N, so the
proxy's start and exit drop out. Instruction counts cover user space only (the kernel's TCP
path, most of a proxy's CPU time, is not counted; the system calls that enter it are). The
number of epoll_wait calls depends on how events batch up, so it is timing-dependent; the
reads and writes are not. Loopback only; every process it starts is stopped by PID.

    bench/instructions.py

Needs valgrind and strace. Builds the release portal first unless PORTAL_BIN names one.
Figures: bench/RESULTS.md ("Work per request").
"""

import collections
import glob
import os
import signal
import subprocess

import dataplane as bench

COUNTS = {1: 5_000, 16: 80_000}
CALLS = ("sendto", "recvfrom", "epoll_wait")


def run_under(tool, kind, redis_port, pipeline, requests):
    """Starts `kind` under `tool` ("callgrind" or "strace"), sends `requests` SETs through it,
    stops it with SIGTERM and returns what the tool counted: {"Ir": n} or {syscall: n}."""
    out = os.path.join(bench.TMP, f"{tool}-{kind}-{pipeline}-{requests}.out")
    if tool == "callgrind":
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    else:
        wrap = ["strace", "-f", "-c", "-o", out]
    spawn = bench.spawn
    # Wrap the proxy's command line; the wrapped process is slow to listen, so wait longer.
    bench.spawn = lambda args, what, port=None, **kw: spawn(wrap + args, what, None, **kw)
    try:
        proxy, port = bench.start_proxy(kind, redis_port)
    finally:
        bench.spawn = spawn
    bench.wait_port(port, proxy, kind, limit=120)
    subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "50", "-n", str(requests),
                    "-P", str(pipeline), "-t", "set", "-q"], capture_output=True, timeout=600, check=True)
    # valgrind runs the proxy in its own process; strace runs it as its child.
    target = proxy.pid
    if tool == "strace":
        with open(f"/proc/{proxy.pid}/task/{proxy.pid}/children") as f:
            target = int(f.read().split()[0])
    os.kill(target, signal.SIGTERM)
    proxy.wait(timeout=120)
    bench.started.remove(proxy)
    counted = collections.Counter()
    if tool == "callgrind":
        for path in glob.glob(out + "*"):
            with open(path) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        counted["Ir"] += int(line.split()[1])
                        break
    else:
        with open(out) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and fields[-1] in CALLS and fields[3].isdigit():
                    counted[fields[-1]] += int(fields[3])
    return counted


def per_request(tool, kind, redis_port, pipeline):
    n = COUNTS[pipeline]
    low = run_under(tool, kind, redis_port, pipeline, n)
    high = run_under(tool, kind, redis_port, pipeline, 5 * n)
    return {key: (high[key] - low[key]) / (4 * n) for key in high}


def main():
    bench.build_portal()
    _, redis_port = bench.start_redis()
    print("| SET -c 50, per request | HAProxy | portal | portal / HAProxy |")
    print("|---|---|---|---|")
    for pipeline in (1, 16):
        work = {kind: {**per_request("callgrind", kind, redis_port, pipeline),
                       **per_request("strace", kind, redis_port, pipeline)}
                for kind in ("haproxy", "portal")}
        for key in ("Ir",) + CALLS:
            h, p = work["haproxy"].get(key, 0.0), work["portal"].get(key, 0.0)
            name = "user-space instructions" if key == "Ir" else f"`{key}` calls"
            ratio = f"{p / h:.2f}" if h else "–"
            digits = 0 if key == "Ir" else 3
            print(f"| {name}, pipeline {pipeline} | {h:,.{digits}f} | {p:,.{digits}f} | {ratio} |", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        bench.cleanup()
