"""Redis multiplexing benchmark: redis-benchmark GET and SET with 1,000 and 5,000 clients,
pipeline 1 and 16, against one redis-server direct, through HAProxy (plain L4), through
nutcracker (twemproxy) and through the portal multiplexing (`pooling.mode: multiplex`). The
contenders run side by side in one run, alternating in each repetition. Prints Markdown:
ops/s, p99, server connections seen by redis-server, proxy CPU seconds per 1,000 ops and
redis-server's own CPU seconds per 1,000 ops (both from /proc/<pid>/stat), and the ratios
portal/nutcracker, portal/HAProxy and portal/direct.

Run through bench/multiplex.sh (it builds the portal and raises the open-files limit).
Environment: REPS (default 2), REQUESTS (default 200000; pipelined runs use 4x),
SCENARIOS (e.g. "get:1000:1,set:5000:16"), THREADS (the portal's event-loop threads,
default 1, as many as nutcracker's), PORTAL_BIN (default: the release build), IDLE (e.g.
"5000": then, at each count, the RSS per idle client of the portal and of nutcracker, each
client having sent one PING; MODES= skips the timed runs). A second
nutcracker, configured as the first, runs beside them as the control: its ratio to the first
is what two identical proxies look like in the same minutes."""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
PORTAL = Path(os.environ.get("PORTAL_BIN") or next(
    (p for p in (TARGET / os.environ.get("CARGO_BUILD_TARGET", "-") / "release" / "portal",
                 TARGET / "release" / "portal") if p.exists()),
    TARGET / "release" / "portal"))
THREADS = os.environ.get("THREADS", "1")
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_port(port: int, within: float = 10.0) -> None:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=10).stdout.strip()


class Contenders:
    def __init__(self, work: Path):
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.redis_port = free_port()
        self.redis = self.spawn(["redis-server", "--port", str(self.redis_port), "--bind",
                                 "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--maxclients", "15000", "--dir", str(work)])
        wait_port(self.redis_port)
        self.ports = {"direct": self.redis_port}
        self.pids = {"direct": None}

        port = free_port()
        cfg = work / "haproxy.cfg"
        cfg.write_text(f"""global
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen redis
  bind 127.0.0.1:{port}
  maxconn 9000
  server r1 127.0.0.1:{self.redis_port}
""")
        self.ports["haproxy"] = port
        self.pids["haproxy"] = self.spawn(["haproxy", "-f", str(cfg), "-db"]).pid

        for name in ("nutcracker", "nutcracker2"):
            port = free_port()
            cfg = work / f"{name}.yml"
            cfg.write_text(f"""bench:
  listen: 127.0.0.1:{port}
  hash: fnv1a_64
  distribution: ketama
  redis: true
  server_connections: 4
  auto_eject_hosts: false
  timeout: 30000
  servers:
    - 127.0.0.1:{self.redis_port}:1
""")
            self.ports[name] = port
            # Verbosity 4 (notice): the default, 5, runs per-request logging code for lines it
            # never writes; production setups run at 4 or below.
            # Each on a stats port of its own (the default, 22222, takes one instance).
            self.pids[name] = self.spawn(["/usr/sbin/nutcracker", "-c", str(cfg), "-v", "4",
                                          "-s", str(free_port()),
                                          "-o", str(work / f"{name}.log")]).pid

        port, admin = free_port(), free_port()
        cfg = work / "portal.yaml"
        cfg.write_text(f"""engine: redis
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
tls: {{mode: disabled}}
limits: {{maxConnections: 15000, maxNegotiating: 15000, maxNegotiatingPerClient: 0}}
backends: [{{name: r1, address: "127.0.0.1:{self.redis_port}"}}]
pooling: {{mode: multiplex, serverConnections: 4}}
""")
        self.ports["portal"] = port
        self.pids["portal"] = self.spawn([str(PORTAL), "--config", str(cfg),
                                          "--log-level", "warn"],
                                         {**os.environ, "TOKIO_WORKER_THREADS": THREADS}).pid
        for name, p in self.ports.items():
            wait_port(p)
        time.sleep(1.5)  # the portal's first probes

    def spawn(self, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, env=env)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def server_connections(port: int, owner: str, stop: threading.Event, seen: list[int]) -> None:
    """Most connections to redis-server held by `owner` during the run (`pid=<n>,` of the
    proxy, or the benchmark's name when direct), from `ss`: the other proxies' idle
    connections to the same server are not counted."""
    while not stop.is_set():
        out = subprocess.run(["ss", "-Htnp", "state", "established", "dst",
                              f"127.0.0.1:{port}"], capture_output=True, text=True).stdout
        seen.append(sum(1 for line in out.splitlines() if owner in line))
        stop.wait(0.25)


def bench_one(c: Contenders, who: str, test: str, clients: int, pipeline: int,
              requests: int) -> dict:
    port = c.ports[who]
    pid = c.pids[who]
    stop = threading.Event()
    seen: list[int] = []
    owner = f"pid={pid}," if pid else '"redis-benchmark"'
    poller = threading.Thread(target=server_connections,
                              args=(c.redis_port, owner, stop, seen))
    proxy0 = cpu_seconds(pid) if pid else 0.0
    redis0 = cpu_seconds(c.redis.pid)
    poller.start()
    run = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-t", test, "-n", str(requests), "-c",
         str(clients), "-P", str(pipeline), "--csv"],
        capture_output=True, text=True, timeout=600)
    stop.set()
    poller.join()
    proxy = (cpu_seconds(pid) - proxy0) if pid else 0.0
    redis = cpu_seconds(c.redis.pid) - redis0
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    if run.returncode != 0 or not rows:
        raise RuntimeError(f"{who} {test} -c {clients} -P {pipeline}: {run.stderr[-500:]}")
    row = rows[0]
    return {
        "ops": float(row["rps"]),
        "p99": float(row["p99_latency_ms"]),
        "conns": max(seen) if seen else -1,
        "proxy_cpu": proxy / (requests / 1000),
        "redis_cpu": redis / (requests / 1000),
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def idle_rss(c: Contenders, who: str, counts: list[int]) -> dict[int, float]:
    """KiB of RSS per idle client, at each of `counts`: that many clients that sent one PING
    each and wait, against the contender's RSS with 50 such clients (its buffers and pools
    warmed), taken once before the first count (a later count's clients would reuse memory
    the earlier ones freed)."""
    def ping(s: socket.socket) -> None:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        got = b""
        while not got.endswith(b"\r\n"):
            chunk = s.recv(64)
            if not chunk:
                raise RuntimeError(f"{who} closed an idle client")
            got += chunk

    def connect(n: int) -> list[socket.socket]:
        socks = []
        try:
            for i in range(n):
                socks.append(socket.create_connection(("127.0.0.1", c.ports[who])))
                try:
                    ping(socks[-1])
                except OSError as e:
                    raise RuntimeError(f"{who}: idle client {i + 1} of {n}: {e}") from e
        except BaseException:
            for s in socks:
                s.close()
            raise
        return socks

    pid = c.pids[who]
    warm = connect(50)
    per_client = {}
    try:
        time.sleep(1)
        base = rss_kib(pid)
        for n in counts:
            socks = connect(n)
            time.sleep(2)
            per_client[n] = (rss_kib(pid) - base) / n
            for s in socks:
                s.close()
            time.sleep(1)
    finally:
        for s in warm:
            s.close()
    return per_client


def main() -> None:
    reps = int(os.environ.get("REPS", "2"))
    base = int(os.environ.get("REQUESTS", "200000"))
    scenarios = [tuple(s.split(":")) for s in os.environ.get(
        "SCENARIOS",
        "get:1000:1,set:1000:1,get:1000:16,set:1000:16,"
        "get:5000:1,set:5000:1,get:5000:16,set:5000:16").split(",")]
    if os.environ.get("MODES", "timed") == "":
        scenarios = []
    idle_counts = [int(n) for n in os.environ.get("IDLE", "").split()]
    idle: dict[int, dict[str, float]] = {}
    order = ["direct", "haproxy", "nutcracker", "nutcracker2", "portal"]
    work = Path(tempfile.mkdtemp(prefix="dbportal-bench-mux-"))
    try:
        c = Contenders(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    results: dict[tuple, dict[str, list[dict]]] = {}
    try:
        for rep in range(reps):
            for test, clients, pipeline in scenarios:
                clients, pipeline = int(clients), int(pipeline)
                requests = base * (4 if pipeline > 1 else 1)
                # Alternate: each repetition starts with another contender.
                turn = order[rep % len(order):] + order[:rep % len(order)]
                for who in turn:
                    r = bench_one(c, who, test, clients, pipeline, requests)
                    results.setdefault((test, clients, pipeline), {}).setdefault(
                        who, []).append(r)
                    print(f"rep {rep + 1} {test} -c {clients} -P {pipeline} {who}: "
                          f"{r['ops']:.0f} ops/s p99 {r['p99']:.2f} ms conns {r['conns']}",
                          file=sys.stderr, flush=True)
        if idle_counts:
            by_who = {who: idle_rss(c, who, idle_counts) for who in ("portal", "nutcracker")}
            idle = {n: {who: v[n] for who, v in by_who.items()} for n in idle_counts}
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()[0]

    def med(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    out = [f"## Run of {started} ({reps} repetitions, load average {load0:.1f} → {load1:.1f})",
           "",
           "redis-benchmark -n {n} (pipelined: 4×), medians of the repetitions. CPU: seconds per "
           "1,000 ops from /proc/<pid>/stat (proxy: the proxy process; redis: redis-server). "
           "conns: most connections to redis-server the contender held during the run (ss). "
           "The portal on {t} event-loop thread(s) ({p}); nutcracker 0.5 at -v 4, twice "
           "(nutcracker2: the control).".format(n=base, t=THREADS, p=PORTAL),
           "",
           "| test | clients | -P | contender | ops/s | p99 ms | conns | proxy CPU s/1k ops "
           "| redis CPU s/1k ops |",
           "|---|---|---|---|---|---|---|---|---|"]
    ratios = ["", "| test | clients | -P | portal/nutcracker ops | control nutcracker2/nutcracker "
              "ops | portal/HAProxy ops | portal/direct ops | portal/nutcracker proxy CPU | "
              "control proxy CPU | portal/direct redis CPU | per repetition portal/nutcracker "
              "ops |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (test, clients, pipeline), by in results.items():
        for who in order:
            rs = by[who]
            out.append(f"| {test.upper()} | {clients} | {pipeline} | {who} | "
                       f"{med(rs, 'ops'):,.0f} | {med(rs, 'p99'):.2f} | "
                       f"{max(r['conns'] for r in rs)} | {med(rs, 'proxy_cpu'):.4f} | "
                       f"{med(rs, 'redis_cpu'):.4f} |")
        p, n, n2, h, d = (by[w] for w in
                          ("portal", "nutcracker", "nutcracker2", "haproxy", "direct"))
        per_rep = ", ".join(f"{a['ops'] / b['ops']:.2f}" for a, b in zip(p, n))
        ratios.append(
            f"| {test.upper()} | {clients} | {pipeline} | {med(p, 'ops') / med(n, 'ops'):.2f} | "
            f"{med(n2, 'ops') / med(n, 'ops'):.2f} | "
            f"{med(p, 'ops') / med(h, 'ops'):.2f} | {med(p, 'ops') / med(d, 'ops'):.2f} | "
            f"{med(p, 'proxy_cpu') / med(n, 'proxy_cpu'):.2f} | "
            f"{med(n2, 'proxy_cpu') / med(n, 'proxy_cpu'):.2f} | "
            f"{med(p, 'redis_cpu') / med(d, 'redis_cpu'):.2f} | {per_rep} |")
    if idle:
        ratios += ["", "| idle clients (one PING each) | portal KiB per client | nutcracker KiB per "
                   "client |", "|---|---|---|"]
        ratios += [f"| {n} | {v['portal']:.2f} | {v['nutcracker']:.2f} |" for n, v in idle.items()]
    text = "\n".join(out + ratios) + "\n"
    print(text)
    Path(tempfile.gettempdir(), "dbportal-bench-multiplex-last-run.md").write_text(text)


if __name__ == "__main__":
    main()
