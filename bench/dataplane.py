"""Runs the data plane benchmark (see dataplane.sh) and prints a Markdown report."""

import csv
import io
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
# Cargo puts a build for an explicit target (CARGO_BUILD_TARGET, as CI sets it) under its name.
RELEASE = os.path.join(TARGET, os.environ.get("CARGO_BUILD_TARGET", ""), "release")
PORTAL = os.environ.get("PORTAL_BIN", os.path.join(RELEASE, "portal"))
LOADGEN = os.environ.get("LOADGEN_BIN", os.path.join(RELEASE, "examples", "loadgen"))
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
REPS = int(os.environ.get("REPS", "3"))
THREADS = int(os.environ.get("THREADS", "2"))
CLIENTS = 50
IDLE_COUNTS = [2000, int(os.environ.get("IDLE_MAX", "9000"))]
BULK_SECONDS = float(os.environ.get("BULK_SECONDS", "4"))
REQUESTS = {1: int(os.environ.get("N_P1", "100000")), 16: int(os.environ.get("N_P16", "600000"))}
TICK = os.sysconf("SC_CLK_TCK")
TMP = tempfile.mkdtemp(prefix="dbportal-bench-")
started = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, limit=15):
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def spawn(args, what, port=None, **kw):
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    started.append(p)
    if port:
        wait_port(port, p, what)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)  # by PID: only processes this script started
        p.wait()
    if p in started:
        started.remove(p)


def build_portal():
    """Builds the release portal (a stale binary would measure an older data path), unless
    PORTAL_BIN names one."""
    if "PORTAL_BIN" not in os.environ:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "dbportal-portal", "--bin", "portal"],
                       cwd=ROOT, check=True)


def start_redis(*extra):
    """Starts a redis-server on a free loopback port, without persistence; returns (process, port)."""
    redis_dir = tempfile.mkdtemp(prefix="redis-", dir=TMP)
    port = free_port()
    proc = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                  "--dir", redis_dir, *extra], "redis-server", port)
    return proc, port


def start_proxy(kind, backend_port):
    port = free_port()
    if kind.startswith("haproxy"):
        cfg = os.path.join(TMP, f"haproxy-{port}.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
    nbthread {THREADS}
    maxconn 9700
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen bench
    bind 127.0.0.1:{port}
    server b0 127.0.0.1:{backend_port}
""")
        return spawn([HAPROXY, "-f", cfg, "-db"], "haproxy", port), port
    cfg = os.path.join(TMP, f"portal-{port}.yaml")
    with open(cfg, "w") as f:
        f.write(f"""engine: tcp
port: {port}
backends: [{{name: b0, address: "127.0.0.1:{backend_port}"}}]
routing: {{mode: first}}
limits: {{maxConnections: 30000}}
timeouts: {{client: 1h, server: 1h, connect: 5s}}
tls: {{mode: disabled}}
listen: "127.0.0.1:{port}"
admin: "127.0.0.1:{free_port()}"
""")
    env = dict(os.environ, RUST_LOG="warn", TOKIO_WORKER_THREADS=str(THREADS))
    return spawn([PORTAL, "--config", cfg], "portal", port, env=env), port


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def redis_benchmark(port, pipeline):
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(CLIENTS),
         "-n", str(REQUESTS[pipeline]), "-P", str(pipeline), "-t", "set,get", "--csv"],
        capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {}
    for row in csv.DictReader(io.StringIO(out)):
        rows[row["test"]] = (float(row["rps"]), float(row["p50_latency_ms"]), float(row["p99_latency_ms"]))
    return rows


def idle_rss(kind, sink_port, count):
    proxy, port = start_proxy(kind, sink_port)
    time.sleep(0.5)
    base = rss_kib(proxy.pid)
    sources = [f"127.0.0.{i}" for i in range(2, 6)]
    holder = subprocess.Popen([LOADGEN, "idle", f"127.0.0.1:{port}", str(count), *sources],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    started.append(holder)
    line = holder.stdout.readline().split()
    opened = int(line[1]) if len(line) == 2 else 0
    time.sleep(0.5)
    rss = rss_kib(proxy.pid)
    holder.stdin.close()
    holder.wait(timeout=60)
    started.remove(holder)
    stop(proxy)
    return base, rss, opened


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def pairs(base, other):
    """Compares `other`'s redis-benchmark figures [(rps, p50, p99)] with `base`'s taken in the
    same rotations: (median ratio, lowest, highest, pairs at least as fast, pairs with a p99
    at most as high)."""
    both = list(zip(base, other))
    ratios = [o[0] / b[0] for b, o in both]
    return (med(ratios), min(ratios), max(ratios), sum(o[0] >= b[0] for b, o in both),
            sum(o[2] <= b[2] for b, o in both))


def main():
    for path in (PORTAL, LOADGEN, HAPROXY):
        if not os.path.exists(path):
            sys.exit(f"missing {path}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, redis_port = start_redis("--maxclients", "1000")
    sink_port = free_port()
    spawn([LOADGEN, "sink", str(sink_port)], "sink", sink_port)

    kinds = ["direct", "haproxy", "portal"]
    # The ops phase runs every target side by side and alternates them invocation by
    # invocation (the order rotating), so that each repetition gives a pair measured within
    # seconds of each other. "haproxy-b", a second HAProxy with the same configuration, is
    # the control: its ratio to the first shows how far two identical proxies drift apart on
    # this machine.
    ops_kinds = kinds + ["haproxy-b"]
    ops = {}    # (kind, test, pipeline) -> [(rps, p50, p99)], one per repetition
    if not os.environ.get("ONLY_IDLE"):
        targets = {"direct": (None, redis_port)}
        for kind in ops_kinds[1:]:
            targets[kind] = start_proxy(kind, redis_port)
        for rep in range(REPS):
            for pipeline in (1, 16):
                order = ops_kinds[rep % 4:] + ops_kinds[:rep % 4]
                for kind in order:
                    for test, r in redis_benchmark(targets[kind][1], pipeline).items():
                        ops.setdefault((kind, test, pipeline), []).append(r)
            print(f"ops repetition {rep + 1}/{REPS} done", file=sys.stderr, flush=True)
        for proxy, _ in targets.values():
            if proxy:
                stop(proxy)
    bulk = {}   # kind -> [(gbit, cpu)]
    for rep in range(0 if os.environ.get("ONLY_IDLE") else REPS):
        order = kinds[rep % 3:] + kinds[:rep % 3]
        for kind in order:
            proxy, port = (None, sink_port) if kind == "direct" else start_proxy(kind, sink_port)
            cpu0 = cpu_seconds(proxy.pid) if proxy else 0
            gbit = float(subprocess.run([LOADGEN, "bulk", f"127.0.0.1:{port}", str(BULK_SECONDS), "1"],
                                        capture_output=True, text=True, timeout=120, check=True).stdout)
            cpu = cpu_seconds(proxy.pid) - cpu0 if proxy else 0.0
            bulk.setdefault(kind, []).append((gbit, cpu))
            if proxy:
                stop(proxy)
        print(f"bulk repetition {rep + 1}/{REPS} done", file=sys.stderr, flush=True)

    idle = {}   # (kind, count) -> [(base, rss, opened)]
    for rep in range(REPS):
        for kind in ("haproxy", "portal"):
            for count in IDLE_COUNTS:
                idle.setdefault((kind, count), []).append(idle_rss(kind, sink_port, count))

    out = []
    p = out.append
    p(f"Loopback, {os.cpu_count()} CPUs, proxies with {THREADS} worker threads, {REPS} repetitions (medians), "
      f"{time.strftime('%Y-%m-%d')}. redis-benchmark -c {CLIENTS}, SET/GET, -n {REQUESTS[1]} (P1) / {REQUESTS[16]} (P16).")
    p("")
    if not ops:
        ops = {(k, t, pl): [(float("nan"),) * 3] for k in ops_kinds for t in ("SET", "GET") for pl in (1, 16)}
        bulk = {k: [(float("nan"), float("nan"))] for k in kinds}
    p("| test | direct ops/s | HAProxy ops/s | portal ops/s | portal/HAProxy | HAProxy p50/p99 ms | portal p50/p99 ms |")
    p("|---|---|---|---|---|---|---|")
    for pipeline in (1, 16):
        for test in ("SET", "GET"):
            m = {k: ops.get((k, test, pipeline), []) for k in kinds}
            rps = {k: med([r[0] for r in v]) for k, v in m.items()}
            lat = {k: (med([r[1] for r in v]), med([r[2] for r in v])) for k, v in m.items()}
            p(f"| {test} -P {pipeline} | {rps['direct']:,.0f} | {rps['haproxy']:,.0f} | {rps['portal']:,.0f} | "
              f"{rps['portal'] / rps['haproxy']:.2f} | {lat['haproxy'][0]:.3f} / {lat['haproxy'][1]:.3f} | "
              f"{lat['portal'][0]:.3f} / {lat['portal'][1]:.3f} |")
    p("")
    p("Pairs: each repetition's portal figure against HAProxy's taken in the same rotation "
      "(median ratio, lowest–highest, and in how many pairs the portal met the target); the "
      "control compares a second HAProxy, configured identically, with the first.")
    p("")
    p("| test | portal/HAProxy ops/s | portal ≥ HAProxy | portal p99 ≤ HAProxy's | "
      "control B/A ops/s | B ≥ A | B p99 ≤ A's |")
    p("|---|---|---|---|---|---|---|")
    for pipeline in (1, 16):
        for test in ("SET", "GET"):
            cells = []
            base = ops[("haproxy", test, pipeline)]
            for other in ("portal", "haproxy-b"):
                ratio, low, high, faster, tail = pairs(base, ops[(other, test, pipeline)])
                cells += [f"{ratio:.2f} ({low:.2f}–{high:.2f})", f"{faster}/{len(base)}", f"{tail}/{len(base)}"]
            p(f"| {test} -P {pipeline} | " + " | ".join(cells) + " |")
    p("")
    p(f"Bulk, one stream, {BULK_SECONDS:.0f} s, client → proxy → sink:")
    p("")
    p("| | direct | HAProxy | portal | portal/HAProxy |")
    p("|---|---|---|---|---|")
    g = {k: med([x[0] for x in bulk[k]]) for k in kinds}
    c = {k: med([x[1] for x in bulk[k]]) for k in kinds}
    p(f"| Gbit/s | {g['direct']:.2f} | {g['haproxy']:.2f} | {g['portal']:.2f} | {g['portal'] / g['haproxy']:.2f} |")
    p(f"| proxy CPU s | – | {c['haproxy']:.2f} | {c['portal']:.2f} | {c['portal'] / c['haproxy']:.2f} |")
    gb = {k: g[k] * BULK_SECONDS / 8 for k in ("haproxy", "portal")}
    p(f"| proxy CPU s per GB | – | {c['haproxy'] / gb['haproxy']:.3f} | {c['portal'] / gb['portal']:.3f} | "
      f"{(c['portal'] / gb['portal']) / (c['haproxy'] / gb['haproxy']):.2f} |")
    p("")
    p(f"Idle sessions (client → proxy → sink), RSS of the proxy process. The open-files hard limit "
      f"here is {hard}: one proxy holding N sessions needs 2N descriptors, so the largest count "
      f"measured is {IDLE_COUNTS[-1]:,}; the 20,000 figure is extrapolated from the per-session slope "
      f"between {IDLE_COUNTS[0]:,} and {IDLE_COUNTS[-1]:,}.")
    p("")
    p("| | HAProxy | portal | portal/HAProxy |")
    p("|---|---|---|---|")
    res = {}
    for kind in ("haproxy", "portal"):
        lo = idle[(kind, IDLE_COUNTS[0])]
        hi = idle[(kind, IDLE_COUNTS[-1])]
        base = med([x[0] for x in lo + hi])
        rss_lo = med([x[1] for x in lo])
        rss_hi = med([x[1] for x in hi])
        opened = (min(x[2] for x in lo), min(x[2] for x in hi))
        slope = (rss_hi - rss_lo) / (IDLE_COUNTS[-1] - IDLE_COUNTS[0])
        res[kind] = dict(base=base, lo=rss_lo, hi=rss_hi, slope=slope, opened=opened,
                         at20k=rss_lo + slope * (20000 - IDLE_COUNTS[0]))
    h, q = res["haproxy"], res["portal"]
    p(f"| RSS at start (KiB) | {h['base']:,.0f} | {q['base']:,.0f} | |")
    p(f"| RSS with {IDLE_COUNTS[0]:,} idle (KiB) | {h['lo']:,.0f} | {q['lo']:,.0f} | {q['lo'] / h['lo']:.2f} |")
    p(f"| RSS with {IDLE_COUNTS[-1]:,} idle (KiB) | {h['hi']:,.0f} | {q['hi']:,.0f} | {q['hi'] / h['hi']:.2f} |")
    p(f"| per idle session (KiB, slope) | {h['slope']:.2f} | {q['slope']:.2f} | {q['slope'] / h['slope']:.2f} |")
    p(f"| RSS with 20,000 idle, extrapolated (MiB) | {h['at20k'] / 1024:.1f} | {q['at20k'] / 1024:.1f} | |")
    p(f"| sessions still open when measured (min) | {h['opened'][0]} / {h['opened'][1]} | {q['opened'][0]} / {q['opened'][1]} | |")
    text = "\n".join(out)
    print(text)
    with open(os.path.join(TMP, "..", "dbportal-bench-last-run.md"), "w") as f:
        f.write(text + "\n")


def cleanup():
    """Stops every process this module started (by PID) and removes its temp dir."""
    for proc in list(started):
        stop(proc)
    shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
