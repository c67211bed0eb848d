#!/usr/bin/env python3
"""The pooling and multiplexing proxies' own work per operation, counted instead of timed:
user-space instructions (valgrind's callgrind) and system calls (strace -f -c), each proxy
with one event-loop thread, beside an anchor configured as its documentation recommends:

- pg: pooled PostgreSQL transactions, `pgbench -S -c 10` (simple and extended protocol)
  through a pool of 5 server connections in transaction mode, plaintext and with client TLS
  (TLS 1.3 to the proxy, plaintext to PostgreSQL): the portal (`pooling.mode: transaction`,
  `TOKIO_WORKER_THREADS=1`) against PgBouncer (single-threaded; `auth_type = scram-sha-256`
  with the user's SCRAM verifier from `pg_authid` in `auth_file`, `pool_mode = transaction`,
  `default_pool_size = 5`, `log_connections = 0`, `log_disconnections = 0`). The portal gets
  the same verifier in `pooling.auth.usersFile`. Logins are counted apart: per client login
  (connect, SCRAM, disconnect; with TLS the handshake too) from `pgbench -C` against the same
  run without it.
- redis: multiplexed `redis-benchmark -t get -c 50` at `-P 1` and `-P 16`: the portal
  (`pooling: {mode: multiplex}`, `TOKIO_WORKER_THREADS=1`) against nutcracker (twemproxy,
  single-threaded, one pool), each with the same number of server connections to one
  redis-server; nutcracker at `-v 4` (no per-request log lines) with its default `-v 5`
  beside it.

How: each figure is the difference between a run of N and of 5N operations divided by the
extra operations, so start-up, logins and exit drop out. The shorter run is padded with idle
time to the longer one's length, so that timers (PgBouncer's janitor, nutcracker's stats
thread, tokio's) cancel too. The portal's health probe (a full SCRAM login to PostgreSQL, a
PING to Redis) is set to `HEALTH_INTERVAL` (default 1h, with `rise: 1`: one probe at start),
since its cost follows the clock, not the operations; the "idle" rows give each proxy's
instructions per second of idle with its defaults (the portal's probe every 1 s), measured
the same way (an idle run against one 5x as long). Instruction counts cover user space only;
the kernel's TCP path is entered by the system calls counted beside them. epoll_wait counts
depend on how events batch up under strace's slowdown; reads and writes do not.
glibc picks its string functions by the CPU valgrind reports; `rep stosb`/`rep movsb` are
counted per byte there, so the script prints which ones ran and whether GLIBC_TUNABLES was
set (it passes the same environment to every contender). Loopback only; every process it
starts is stopped by PID; its temp dirs are private and removed.

    bench/counted.py                   # both sections, about 16 minutes on 2 busy cores
    MODES=pg bench/counted.py          # one section (pg or redis)
    PORTAL_BIN=/path/to/portal bench/counted.py   # another build (before/after)

Environment: MODES ("pg redis"), PORTAL_BIN (default: build the release portal under
CARGO_TARGET_DIR), PG_N (transactions per client in the short run, 200), PG_PROTOCOLS
("simple extended"), POOL (the pool size of both poolers, 5: with 10 clients half of them wait
for a connection at a time; 10: none waits), LOGIN_T (transactions per client in the login
runs, 20), REDIS_N1 and
REDIS_N16 (GETs in the short run, 10000 and 80000), REDIS_PIPELINES ("1 16"), SERVER_CONNECTIONS (redis, 4 for both),
HEALTH_INTERVAL (1h), IDLE_SECONDS (5; 0 skips the idle rows), KEEP_OUT (a directory to copy
the callgrind outputs of the longer runs into, for callgrind_annotate); to profile one part:
CONTENDERS ("portal anchor"), WIRES ("plaintext TLS"), LOGINS (1; 0 skips the login rows).

Needs (run as root; PostgreSQL and PgBouncer run as the postgres user): valgrind, strace,
PostgreSQL 15 (initdb, postgres, pgbench, psql), pgbouncer, openssl, redis-server,
redis-cli, redis-benchmark, nutcracker. Figures: bench/RESULTS.md ("Counted: pooling and
multiplexing per operation").
"""

import collections
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import dataplane as bench

PG_BIN = "/usr/lib/postgresql/15/bin"
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
NUTCRACKER = shutil.which("nutcracker") or "/usr/sbin/nutcracker"
MODES = os.environ.get("MODES", "pg redis").replace(",", " ").split()
PG_N = int(os.environ.get("PG_N", "200"))
PG_PROTOCOLS = os.environ.get("PG_PROTOCOLS", "simple extended").split()
LOGIN_T = int(os.environ.get("LOGIN_T", "20"))
REDIS_N = {1: int(os.environ.get("REDIS_N1", "10000")), 16: int(os.environ.get("REDIS_N16", "80000"))}
REDIS_PIPELINES = [int(p) for p in os.environ.get("REDIS_PIPELINES", "1 16").split()]
SERVER_CONNECTIONS = int(os.environ.get("SERVER_CONNECTIONS", "4"))
HEALTH_INTERVAL = os.environ.get("HEALTH_INTERVAL", "1h")
IDLE_SECONDS = float(os.environ.get("IDLE_SECONDS", "5"))
KEEP_OUT = os.environ.get("KEEP_OUT")
CONTENDERS = os.environ.get("CONTENDERS", "portal anchor").split()
WIRES = os.environ.get("WIRES", "plaintext TLS").split()
LOGINS = os.environ.get("LOGINS", "1") != "0"
CLIENTS, POOL, PASSWORD = 10, int(os.environ.get("POOL", "5")), "benchpw"
PG_USER = pwd.getpwnam("postgres")
# Files PostgreSQL and PgBouncer read or write (and the tools' outputs): private to the
# postgres user.
WORK = tempfile.mkdtemp(prefix="dbportal-counted-")
os.chown(WORK, PG_USER.pw_uid, PG_USER.pw_gid)
postgres = None   # the PostgreSQL server process, stopped gently at the end
serial = 0


def as_postgres():
    return dict(user=PG_USER.pw_uid, group=PG_USER.pw_gid, extra_groups=[])


def write(name, text):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, PG_USER.pw_uid, PG_USER.pw_gid)
    os.chmod(path, 0o600)
    return path


def run(args, timeout=120, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True, **kw).stdout


def first_line(args):
    p = subprocess.run(args, capture_output=True, text=True, timeout=30)
    return ((p.stdout or "") + (p.stderr or "")).strip().splitlines()[0]


# ---------------------------------------------------------------------------------------
# Contenders: each is a function (port) -> (argv, popen keywords, readiness check).

def wait_ready(proc, port, admin, what):
    """The portal is ready when its admin endpoint says so (its first health probe has run);
    the others when they listen."""
    bench.wait_port(port, proc, what, limit=180)
    if admin is None:
        return
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what} not ready")


def portal_pg(pg_port, tls, health=None):
    def make(port):
        admin = bench.free_port()
        tls_line = (f'tls: {{mode: terminate, certFile: "{WORK}/server.pem", keyFile: "{WORK}/server.key"}}'
                    if tls else "tls: {mode: disabled}")
        cfg = write(f"portal-{port}.yaml", f"""engine: postgres
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
{tls_line}
healthCheck: {{interval: {health or HEALTH_INTERVAL}, rise: 1, credentials: {{username: postgres, password: {PASSWORD}}}}}
timeouts: {{check: 60s, handshake: 60s}}
pooling: {{mode: transaction, poolSize: {POOL}, queueTimeout: 60s, auth: {{usersFile: "{WORK}/users.yaml"}}}}
backends: [{{name: pg, address: "127.0.0.1:{pg_port}"}}]
""")
        env = dict(os.environ, RUST_LOG="warn", TOKIO_WORKER_THREADS="1")
        return [bench.PORTAL, "--config", cfg], dict(env=env), admin
    return make


def pgbouncer(pg_port, tls):
    def make(port):
        tls_lines = (f"client_tls_sslmode = require\nclient_tls_cert_file = {WORK}/server.pem\n"
                     f"client_tls_key_file = {WORK}/server.key\n" if tls else "client_tls_sslmode = disable\n")
        cfg = write(f"pgbouncer-{port}.ini", f"""[databases]
bench = host=127.0.0.1 port={pg_port} dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {WORK}/userlist.txt
pool_mode = transaction
default_pool_size = {POOL}
log_connections = 0
log_disconnections = 0
logfile = {WORK}/pgbouncer-{port}.log
{tls_lines}""")
        return [PGBOUNCER, "-q", cfg], dict(as_postgres()), None
    return make


def portal_redis(redis_port, health=None):
    def make(port):
        admin = bench.free_port()
        cfg = write(f"portal-{port}.yaml", f"""engine: redis
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
tls: {{mode: disabled}}
healthCheck: {{interval: {health or HEALTH_INTERVAL}, rise: 1}}
timeouts: {{check: 60s}}
backends: [{{name: r1, address: "127.0.0.1:{redis_port}"}}]
pooling: {{mode: multiplex, serverConnections: {SERVER_CONNECTIONS}}}
""")
        env = dict(os.environ, RUST_LOG="warn", TOKIO_WORKER_THREADS="1")
        return [bench.PORTAL, "--config", cfg], dict(env=env), admin
    return make


def nutcracker(redis_port, verbosity):
    def make(port):
        cfg = write(f"nutcracker-{port}.yml", f"""bench:
  listen: 127.0.0.1:{port}
  hash: fnv1a_64
  distribution: ketama
  redis: true
  server_connections: {SERVER_CONNECTIONS}
  auto_eject_hosts: false
  timeout: 30000
  servers:
    - 127.0.0.1:{redis_port}:1
""")
        # Its stats server listens on 0.0.0.0:22222 unless told otherwise.
        return [NUTCRACKER, "-c", cfg, "-o", os.path.join(WORK, f"nutcracker-{port}.log"), "-v", str(verbosity),
                "-s", str(bench.free_port()), "-a", "127.0.0.1"], {}, None
    return make


# ---------------------------------------------------------------------------------------
# One counted run.

def under(tool, contender, load, label, pad_to=0.0):
    """Starts `contender` under `tool` ("callgrind", "strace" or None), runs `load(port)`,
    idles until `pad_to` seconds have passed since the load began, stops the proxy with
    SIGTERM and returns (what the tool counted, the load's seconds, the output file)."""
    global serial
    serial += 1
    port = bench.free_port()
    argv, kw, admin = contender(port)
    out = os.path.join(WORK, f"{serial:03d}-{tool}-{label}.out")
    if tool == "callgrind":
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + argv
    elif tool == "strace":
        argv = ["strace", "-f", "-c", "-o", out] + argv
    proc = bench.spawn(argv, label, None, stdin=subprocess.DEVNULL, **kw)
    wait_ready(proc, port, admin, label)
    began = time.time()
    load(port)
    took = time.time() - began
    if pad_to > took:
        time.sleep(pad_to - took)
    # valgrind runs the proxy in its own process; strace runs it as its child.
    target = proc.pid
    if tool == "strace":
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            target = int(f.read().split()[0])
    os.kill(target, signal.SIGTERM)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        bench.stop(proc)
        sys.exit(f"{label} did not exit on SIGTERM")
    bench.started.remove(proc)
    counted = collections.Counter()
    if tool == "callgrind":
        for path in glob.glob(out + "*"):
            with open(path) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        counted["Ir"] += int(line.split()[1])
                        break
    elif tool == "strace":
        with open(out) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
                    counted[fields[-1]] += int(fields[3])
    return counted, took, out


def per_op(contender, label, load_low, load_high, ops, strings=None):
    """{"Ir": instructions, syscall: calls} per operation: (high run - low run) / ops, the
    low run padded to the high run's length. `strings` collects the glibc string functions
    that ran in the high run."""
    result = {}
    for tool in ("callgrind", "strace"):
        high, took, out = under(tool, contender, load_high, f"{label}-high")
        low, _, _ = under(tool, contender, load_low, f"{label}-low", pad_to=took)
        for key in set(high) | set(low):
            result[key] = (high[key] - low[key]) / ops
        if tool == "callgrind":
            if strings is not None:
                for name, share in string_functions(out).items():
                    strings[name] = max(strings.get(name, 0.0), share)
            if KEEP_OUT:
                os.makedirs(KEEP_OUT, exist_ok=True)
                shutil.copy(out, os.path.join(KEEP_OUT, f"{label}.callgrind.out"))
        print(f"  {label} {tool}: done ({took:.1f} s under load)", file=sys.stderr, flush=True)
    return result


def string_functions(out):
    """{glibc memory function (its ifunc variant): share of the run's instructions}, from
    callgrind_annotate's function list."""
    text = subprocess.run(["callgrind_annotate", "--threshold=100", out], capture_output=True, text=True,
                          timeout=300).stdout
    total = re.search(r"^([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", text, re.M)
    total = int(total.group(1).replace(",", "")) if total else 0
    shares = {}
    for m in re.finditer(r"^\s*([\d,]+) \([^)]*\)\s+\S*?:(__(?:mem|wmem|rawmem)\w+)", text, re.M):
        if total:
            shares[m.group(2)] = shares.get(m.group(2), 0) + int(m.group(1).replace(",", "")) / total
    return shares


# ---------------------------------------------------------------------------------------
# Output.

def shown(x, digits):
    """x, or 0.0 where it would print as "-0.000"."""
    return 0.0 if abs(x) < 0.5 * 10 ** -digits else x


def table(title, columns, rows, extra_col=None):
    """rows: [(name, {column: {key: value}})]: a line for instructions, then one per system
    call that either of the first two columns makes at least once per 200 operations."""
    lines = [f"| {title} | " + " | ".join(columns[:2]) + f" | {columns[0]} / {columns[1]} |"
             + (f" {extra_col} |" if extra_col else ""),
             "|---|---|---|---|" + ("---|" if extra_col else "")]
    for name, work in rows:
        a, b = work.get(columns[0], {}), work.get(columns[1], {})
        c = work.get(extra_col, {}) if extra_col else None
        keys = ["Ir"] + sorted(
            (k for k in set(a) | set(b) | set(c or ()) if k != "Ir"
             and max(abs(w.get(k, 0)) for w in (a, b, c or {})) >= 0.005),
            key=lambda k: -(a.get(k, 0) + b.get(k, 0)))
        keys.append("all system calls")
        for key in keys:
            def value(w):
                if key == "all system calls":
                    return sum(v for k, v in w.items() if k != "Ir")
                return w.get(key, 0.0)
            digits = 0 if key == "Ir" else 3
            x, y = shown(value(a), digits), shown(value(b), digits)
            label = "user-space instructions" if key == "Ir" else (
                key if key == "all system calls" else f"`{key}` calls")
            # A ratio of two system call counts near zero (or below, by a stray call in the
            # shorter run) says nothing.
            ratio = f"{x / y:,.2f}" if (key == "Ir" or y >= 0.01) and y > 0 and x >= 0 else "–"
            line = f"| {label}, {name} | {x:,.{digits}f} | {y:,.{digits}f} | {ratio} |"
            if extra_col:
                line += f" {shown(value(c), digits):,.{digits}f} |"
            lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# PostgreSQL.

def start_postgres():
    global postgres
    pw = write("pw", PASSWORD + "\n")
    run([f"{PG_BIN}/initdb", "-D", f"{WORK}/data", "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pw}",
         "--no-sync"], **as_postgres())
    port = bench.free_port()
    postgres = subprocess.Popen(
        [f"{PG_BIN}/postgres", "-D", f"{WORK}/data", "-p", str(port), "-k", WORK, "-c", "listen_addresses=127.0.0.1",
         "-c", "fsync=off", "-c", "max_connections=60", "-c", "ssl=off"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "postgres.log"), "w"), **as_postgres())
    env = dict(os.environ, PGPASSWORD=PASSWORD, PGSSLMODE="disable")
    deadline = time.time() + 60
    while subprocess.run([f"{PG_BIN}/psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-XAtqc",
                          "select 1", "postgres"], env=env, capture_output=True, timeout=30).returncode:
        if time.time() > deadline or postgres.poll() is not None:
            sys.exit("PostgreSQL did not start")
        time.sleep(0.2)
    psql = [f"{PG_BIN}/psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-XAtq", "-v", "ON_ERROR_STOP=1"]
    run(psql + ["-c", f"CREATE ROLE bench LOGIN PASSWORD '{PASSWORD}'", "-c", "CREATE DATABASE bench OWNER bench",
                "postgres"], env=env)
    run([f"{PG_BIN}/pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "bench", "-i", "-s", "1", "-q", "bench"],
        env=env, timeout=300)
    verifier = run(psql + ["-c", "SELECT rolpassword FROM pg_authid WHERE rolname = 'bench'", "postgres"],
                   env=env).strip()
    if not verifier.startswith("SCRAM-SHA-256$"):
        sys.exit(f"unexpected stored secret {verifier[:20]}")
    write("userlist.txt", f'"bench" "{verifier}"\n')
    write("users.yaml", f'bench: "{verifier}"\n')
    # One certificate for both proxies, as bench/pooling.sh makes it.
    run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{WORK}/server.key.sec1"])
    run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", f"{WORK}/server.key.sec1", "-out", f"{WORK}/server.key"])
    run(["openssl", "req", "-x509", "-new", "-key", f"{WORK}/server.key", "-subj", "/CN=localhost", "-days", "2",
         "-out", f"{WORK}/server.pem"])
    for name in ("server.key", "server.pem"):
        os.chown(os.path.join(WORK, name), PG_USER.pw_uid, PG_USER.pw_gid)
        os.chmod(os.path.join(WORK, name), 0o600)
    return port


def pgbench(tls, protocol, t, connect=False):
    """A load: pgbench -S, CLIENTS clients, t transactions each (with -C a new connection
    for each), checking that all of them ran."""
    def load(port):
        env = dict(os.environ, PGPASSWORD=PASSWORD, PGSSLMODE="require" if tls else "disable")
        args = [f"{PG_BIN}/pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "bench", "-n", "-S", "-c",
                str(CLIENTS), "-j", "1", "-t", str(t), "-M", protocol] + (["-C"] if connect else []) + ["bench"]
        p = subprocess.run(args, capture_output=True, text=True, timeout=1800, env=env, cwd=WORK)
        done = re.search(r"number of transactions actually processed: (\d+)/(\d+)", p.stdout)
        if p.returncode or not done or done.group(1) != done.group(2) or int(done.group(1)) != CLIENTS * t:
            sys.exit(f"pgbench on {port} failed: {p.stdout[-400:]} {p.stderr[-400:]}")
    return load


def tls_details(port):
    """Protocol and cipher a TLS client gets from the proxy on `port` (OpenSSL's client, as
    libpq's)."""
    p = subprocess.run(["openssl", "s_client", "-starttls", "postgres", "-connect", f"127.0.0.1:{port}", "-brief"],
                       input="", capture_output=True, text=True, timeout=30)
    text = p.stdout + p.stderr
    proto = re.search(r"Protocol version: (\S+)", text)
    cipher = re.search(r"Ciphersuite: (\S+)", text)
    return f"{proto.group(1) if proto else '?'} {cipher.group(1) if cipher else '?'}"


def smoke(contender, load, label, tls):
    """Runs `contender` natively once with a short load: the configuration works, and with
    TLS, which protocol and cipher clients get."""
    port = bench.free_port()
    argv, kw, admin = contender(port)
    proc = bench.spawn(argv, label, None, stdin=subprocess.DEVNULL, **kw)
    wait_ready(proc, port, admin, label)
    load(port)
    details = tls_details(port) if tls else ""
    bench.stop(proc)
    return details


def idle_ratio(p, b):
    """p / b, unless b is too near zero for a ratio to mean anything."""
    return f"{p / b:,.0f}" if b >= 100 else "–"


def idle(contender, label):
    """Instructions per second of an idle proxy, started and stopped as in the counted runs:
    (run idling 5 IDLE_SECONDS - run idling IDLE_SECONDS) / (4 IDLE_SECONDS)."""
    high, _, _ = under("callgrind", contender, lambda port: time.sleep(5 * IDLE_SECONDS), f"{label}-idle-high")
    low, _, _ = under("callgrind", contender, lambda port: time.sleep(IDLE_SECONDS), f"{label}-idle-low")
    return (high["Ir"] - low["Ir"]) / (4 * IDLE_SECONDS)


def section_pg(setup):
    pg_port = start_postgres()
    setup.append(f"- PostgreSQL: {first_line([f'{PG_BIN}/postgres', '--version'])}, fsync off, pgbench -i -s 1; "
                 f"{first_line([f'{PG_BIN}/pgbench', '--version'])}, `-n -S -c {CLIENTS} -j 1`.")
    setup.append(f"- counts: `-t {PG_N}` and `-t {5 * PG_N}` per client ({4 * PG_N * CLIENTS:,} transactions "
                 f"apart); logins: `-t {LOGIN_T}` with and without `-C` ({(LOGIN_T - 1) * CLIENTS} logins apart).")
    setup.append(f"- PgBouncer: {first_line([PGBOUNCER, '--version'])}, single-threaded; auth_type = scram-sha-256, "
                 f"auth_file with the user's SCRAM verifier from pg_authid, pool_mode = transaction, "
                 f"default_pool_size = {POOL}, log_connections = 0, log_disconnections = 0; TLS: "
                 f"client_tls_sslmode = require, default protocols and ciphers.")
    setup.append(f"- portal: TOKIO_WORKER_THREADS=1, pooling {{mode: transaction, poolSize: {POOL}}}, "
                 f"auth.usersFile with the same SCRAM verifier; TLS: tls.mode terminate (rustls defaults), "
                 f"same certificate (P-256); healthCheck.interval {HEALTH_INTERVAL}, rise 1.")
    tables = []
    for tls in (False, True):
        wire = "TLS" if tls else "plaintext"
        if wire not in WIRES:
            continue
        contenders = {"portal": portal_pg(pg_port, tls), "PgBouncer": pgbouncer(pg_port, tls)}
        contenders = {k: v for k, v in contenders.items() if ("portal" if k == "portal" else "anchor") in CONTENDERS}
        for name, c in contenders.items():
            got = smoke(c, pgbench(tls, "simple", 5), f"{name}-smoke", tls)
            if tls:
                setup.append(f"- client TLS to {name}: {got}.")
        rows, login_rows = [], []
        for protocol in PG_PROTOCOLS:
            work = {}
            for name, c in contenders.items():
                work[name] = per_op(c, f"pg-{name}-{wire}-{protocol}", pgbench(tls, protocol, PG_N),
                                    pgbench(tls, protocol, 5 * PG_N), 4 * PG_N * CLIENTS, STRINGS[name])
            rows.append((f"{protocol}", work))
        work = {}
        for name, c in contenders.items() if LOGINS else ():
            # The same transactions, with a login each (-C) or with one login per client.
            work[name] = per_op(c, f"pg-{name}-{wire}-login", pgbench(tls, "simple", LOGIN_T),
                                pgbench(tls, "simple", LOGIN_T, connect=True), (LOGIN_T - 1) * CLIENTS)
        login_rows.append(("login", work))
        tables.append(f"#### {wire}, per transaction\n\n"
                      + table(f"pgbench -S, {CLIENTS} clients, pool {POOL}", ["portal", "PgBouncer"], rows))
        if LOGINS:
            tables.append(f"#### {wire}, per client login (connect, SCRAM, disconnect: `-C` against one login per "
                          f"client)\n\n" + table(f"pgbench -S -C, {CLIENTS} clients, pool {POOL}", ["portal", "PgBouncer"],
                                                   login_rows))
    if IDLE_SECONDS:
        p = idle(portal_pg(pg_port, False, health="1s"), "pg-portal")
        b = idle(pgbouncer(pg_port, False), "pg-PgBouncer")
        tables.append(f"#### idle, per second (defaults: the portal's health probe, a SCRAM login, every 1 s)\n\n"
                      f"| user-space instructions per idle second | portal | PgBouncer | portal / PgBouncer |\n"
                      f"|---|---|---|---|\n| idle, plaintext | {p:,.0f} | {b:,.0f} | {idle_ratio(p, b)} |")
    return tables


# ---------------------------------------------------------------------------------------
# Redis.

def redis_benchmark(pipeline, n):
    def load(port):
        p = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "50", "-n", str(n), "-P",
                            str(pipeline), "-t", "get", "-q"], capture_output=True, text=True, timeout=1800)
        if p.returncode or "GET" not in p.stdout:
            sys.exit(f"redis-benchmark on {port} failed: {p.stdout[-400:]} {p.stderr[-400:]}")
    return load


def section_redis(setup):
    _, redis_port = bench.start_redis()
    # redis-benchmark's GET asks for this key: a 3-byte value, as its SET writes.
    run(["redis-cli", "-h", "127.0.0.1", "-p", str(redis_port), "set", "key:__rand_int__", "xxx"])
    setup.append(f"- redis-server: {first_line(['redis-server', '--version'])}; "
                 f"{first_line(['redis-benchmark', '--version'])}, `-t get -c 50`.")
    setup.append(f"- counts: `-n {REDIS_N[1]}` and `-n {5 * REDIS_N[1]}` at `-P 1`, `-n {REDIS_N[16]}` and "
                 f"`-n {5 * REDIS_N[16]}` at `-P 16`.")
    setup.append(f"- nutcracker: {first_line([NUTCRACKER, '--version'])}, single-threaded (plus its stats thread), "
                 f"one pool, server_connections {SERVER_CONNECTIONS}, stats on loopback.")
    setup.append(f"- portal: TOKIO_WORKER_THREADS=1, pooling {{mode: multiplex, serverConnections: "
                 f"{SERVER_CONNECTIONS}}}, healthCheck.interval {HEALTH_INTERVAL}, rise 1.")
    contenders = {"portal": portal_redis(redis_port), "nutcracker -v 4": nutcracker(redis_port, 4),
                  "nutcracker -v 5": nutcracker(redis_port, 5)}
    contenders = {k: v for k, v in contenders.items() if ("portal" if k == "portal" else "anchor") in CONTENDERS}
    for name, c in contenders.items():
        smoke(c, redis_benchmark(1, 1000), f"{name}-smoke".replace(" ", ""), False)
    rows = []
    for pipeline in REDIS_PIPELINES:
        n = REDIS_N[pipeline]
        work = {}
        for name, c in contenders.items():
            work[name] = per_op(c, f"redis-{name.replace(' ', '')}-P{pipeline}", redis_benchmark(pipeline, n),
                                redis_benchmark(pipeline, 5 * n), 4 * n,
                                STRINGS["portal" if name == "portal" else "nutcracker"])
        rows.append((f"-P {pipeline}", work))
    tables = ["#### per GET\n\n" + table("GET, -c 50", ["portal", "nutcracker -v 4"], rows, "nutcracker -v 5")]
    if IDLE_SECONDS:
        p = idle(portal_redis(redis_port, health="1s"), "redis-portal")
        b = idle(nutcracker(redis_port, 4), "redis-nutcracker")
        tables.append(f"#### idle, per second (defaults: the portal's health probe, a PING, every 1 s)\n\n"
                      f"| user-space instructions per idle second | portal | nutcracker -v 4 | portal / nutcracker |\n"
                      f"|---|---|---|---|\n| idle | {p:,.0f} | {b:,.0f} | {idle_ratio(p, b)} |")
    return tables


STRINGS = collections.defaultdict(dict)   # contender -> {glibc memory function: largest share}


def build_portal():
    """Builds the release portal (a stale binary would measure an older path), unless
    PORTAL_BIN names one."""
    if "PORTAL_BIN" not in os.environ:
        subprocess.run(["nice", "-n", "10", "cargo", "build", "--release", "-q", "-p", "dbportal-portal", "--bin",
                        "portal"], cwd=bench.ROOT, check=True, timeout=3600)


def main():
    build_portal()
    for path in (bench.PORTAL, PGBOUNCER, NUTCRACKER):
        if not os.path.exists(path):
            sys.exit(f"missing {path}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    portal_version = first_line([bench.PORTAL, "--version"])
    if "PORTAL_BIN" not in os.environ:
        commit = subprocess.run(["git", "-C", bench.ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
        portal_version += f", release build of {commit}"
    setup = [f"Counted on {os.cpu_count()} CPUs, loopback, {started}; each proxy with one event-loop thread.",
             "",
             f"- portal: {bench.PORTAL} ({portal_version}).",
             f"- {first_line(['valgrind', '--version'])} (callgrind), {first_line(['strace', '-V'])}, "
             f"{os.confstr('CS_GNU_LIBC_VERSION')}; GLIBC_TUNABLES "
             + (f"= `{os.environ['GLIBC_TUNABLES']}` for every contender." if os.environ.get("GLIBC_TUNABLES")
                else "unset (glibc's defaults) for every contender.")]
    tables = []
    if "pg" in MODES:
        tables += section_pg(setup)
    if "redis" in MODES:
        tables += section_redis(setup)
    for name, names in sorted(STRINGS.items()):
        if names:
            setup.append(f"- glibc memory functions that ran in {name} under callgrind (largest share of a run's "
                         f"instructions): " + ", ".join(f"`{n}` {s:.1%}" for n, s in sorted(names.items())) + ".")
    print("\n".join(setup))
    print()
    print("\n\n".join(tables))


def cleanup():
    if postgres is not None and postgres.poll() is None:
        postgres.send_signal(signal.SIGINT)   # fast shutdown, by PID
        try:
            postgres.wait(timeout=60)
        except subprocess.TimeoutExpired:
            postgres.kill()
            postgres.wait()
    bench.cleanup()
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
