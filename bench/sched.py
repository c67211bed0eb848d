#!/usr/bin/env python3
"""Scheduling look at the data plane: HAProxy and the portal (2 threads each, configured as
in bench/dataplane.py) in front of one redis-server, alternated REPS times (default 3) with
redis-benchmark SET -c 50 at pipeline P (default 1); per run: ops/s, p50/p99, the proxy's CPU
per request, and voluntary / involuntary context switches per 1,000 requests of the proxy
(all its threads) and of redis-server. Loopback only; every process it starts is stopped by
PID at the end.

    bench/sched.py [P] [REPS]

Builds the release portal first (a stale binary would measure an older data path), unless
PORTAL_BIN names one.

Figures: bench/RESULTS.md ("Scheduling").
"""

import csv
import glob
import io
import subprocess
import sys

import dataplane as bench


def switches(pid):
    """(voluntary, involuntary) context switches of all threads of `pid`."""
    voluntary = involuntary = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        with open(path) as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary


def main():
    bench.build_portal()
    pipeline = sys.argv[1] if len(sys.argv) > 1 else "1"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    requests = 300_000 if pipeline == "1" else 2_000_000
    redis, redis_port = bench.start_redis()
    proxies = {kind: bench.start_proxy(kind, redis_port) for kind in ("haproxy", "portal")}
    per_k = 1000 / requests
    for rep in range(reps):
        for kind, (proxy, port) in proxies.items():
            cpu0, own0, redis0 = bench.cpu_seconds(proxy.pid), switches(proxy.pid), switches(redis.pid)
            out = subprocess.run(
                ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "50", "-n", str(requests),
                 "-P", pipeline, "-t", "set", "--csv"],
                capture_output=True, text=True, timeout=120, check=True).stdout
            row = next(csv.DictReader(io.StringIO(out)))
            cpu1, own1, redis1 = bench.cpu_seconds(proxy.pid), switches(proxy.pid), switches(redis.pid)
            print(f"{rep} {kind:8} rps {float(row['rps']):>9,.0f} p50 {row['p50_latency_ms']} "
                  f"p99 {row['p99_latency_ms']} cpu/req {(cpu1 - cpu0) / requests * 1e6:.2f}us "
                  f"vol/1k {(own1[0] - own0[0]) * per_k:.1f} invol/1k {(own1[1] - own0[1]) * per_k:.1f} "
                  f"redis vol/1k {(redis1[0] - redis0[0]) * per_k:.1f} "
                  f"invol/1k {(redis1[1] - redis0[1]) * per_k:.1f}", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        bench.cleanup()
