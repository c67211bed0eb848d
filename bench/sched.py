#!/usr/bin/env python3
"""Scheduling look at the data plane: HAProxy and the portal (2 threads each) in front of one
redis-server, alternated REPS times (default 3) with redis-benchmark SET -c 50 at pipeline P
(default 1); per run: ops/s, p50/p99, the proxy's CPU per request, and voluntary /
involuntary context switches per 1,000 requests of the proxy (all its threads) and of
redis-server. Loopback only; every process it starts is killed by PID at the end.

    bench/sched.py [P] [REPS]        PORTAL=target/release/portal by default

Figures: bench/RESULTS.md ("Scheduling").
"""
import csv
import glob
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

TMP = tempfile.mkdtemp()
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def wait_port(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError: time.sleep(0.05)
def ctx(pid):
    v = n = 0
    for st in glob.glob(f"/proc/{pid}/task/*/status"):
        for line in open(st):
            if line.startswith("voluntary_ctxt_switches"): v += int(line.split()[1])
            if line.startswith("nonvoluntary_ctxt_switches"): n += int(line.split()[1])
    return v, n
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100
rport = free_port()
redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
wait_port(rport)
hport, pport = free_port(), free_port()
open(f"{TMP}/h.cfg", "w").write(f"""global
    nbthread 2
    maxconn 9700
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen bench
    bind 127.0.0.1:{hport}
    server b0 127.0.0.1:{rport}
""")
open(f"{TMP}/p.yaml", "w").write(f"""engine: tcp
port: {pport}
backends: [{{name: b0, address: "127.0.0.1:{rport}"}}]
routing: {{mode: first}}
timeouts: {{client: 1h, server: 1h, connect: 5s}}
tls: {{mode: disabled}}
listen: "127.0.0.1:{pport}"
admin: "127.0.0.1:{free_port()}"
""")
env = dict(os.environ, RUST_LOG="warn", TOKIO_WORKER_THREADS="2")
procs = {"haproxy": (subprocess.Popen(["haproxy", "-f", f"{TMP}/h.cfg", "-db"]), hport),
         "portal": (subprocess.Popen([os.environ.get("PORTAL", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "portal")), "--config", f"{TMP}/p.yaml"], env=env), pport)}
for _, port in procs.values(): wait_port(port)
P = sys.argv[1] if len(sys.argv) > 1 else "1"
N = "300000" if P == "1" else "2000000"
try:
    for rep in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
        for kind, (p, port) in procs.items():
            c0, v0, r0 = cpu(p.pid), ctx(p.pid), ctx(redis.pid)
            out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-n", N, "-P", P, "-t", "set", "--csv"], capture_output=True, text=True, timeout=120).stdout
            row = list(csv.DictReader(io.StringIO(out)))[0]
            c1, v1, r1 = cpu(p.pid), ctx(p.pid), ctx(redis.pid)
            n = int(N)
            print(f"{rep} {kind:8} rps {float(row['rps']):>9,.0f} p50 {row['p50_latency_ms']} p99 {row['p99_latency_ms']} cpu/req {(c1-c0)/n*1e6:.2f}us vol/1k {(v1[0]-v0[0])/n*1000:.1f} invol/1k {(v1[1]-v0[1])/n*1000:.1f} redis vol/1k {(r1[0]-r0[0])/n*1000:.1f} invol/1k {(r1[1]-r0[1])/n*1000:.1f}", flush=True)
finally:
    for p, _ in procs.values():
        p.kill()
        p.wait()
    redis.kill()
    redis.wait()
    shutil.rmtree(TMP, ignore_errors=True)
