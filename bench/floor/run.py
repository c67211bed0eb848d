#!/usr/bin/env python3
"""The floor beside the portal and PgBouncer, counted as `bench/counted.py` counts (its
PostgreSQL, its pgbench loads, its difference of two runs): user-space instructions and
system calls per pooled transaction, `pgbench -S -M simple -c 10` through a pool of 5,
plaintext, each proxy on one event-loop thread. The floors are transaction poolers with
nothing but an idle list and a wait queue: on tokio with a task per client as the portal
runs (src/main.rs), on one mio event loop calling each socket's handler as PgBouncer runs
(src/bin/floor-loop.rs), and the tokio floor's async code polled by an executor of its own
on a mio poller nested in tokio (src/bin/floor-exec.rs). The portal's figure less the tokio
floor's is what the portal's own per-transaction work costs; the tokio floor's less the
loop's, the runtime's; the tokio floor's less the executor floor's, what the task scheduler
and I/O driver cost per socket event beyond polling the same futures.

    bench/floor/run.py                  # builds the floor and the release portal first
    PORTAL_BIN=... bench/floor/run.py   # a portal built already

Needs what `bench/counted.py` needs, and cargo. The floor is built into
$HOME/.cache/dbportal/floor-target.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import counted  # noqa: E402

TARGET = os.path.join(os.path.expanduser("~"), ".cache", "dbportal", "floor-target")


def floor_pg(binary, pg_port):
    def make(port):
        return ([os.path.join(TARGET, "release", binary), str(port), str(pg_port), counted.PASSWORD,
                 str(counted.POOL)], {}, None)
    return make


def main():
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGO_")}
    subprocess.run(["cargo", "build", "--release", "-q", "--manifest-path", os.path.join(HERE, "Cargo.toml")],
                   env=dict(env, CARGO_TARGET_DIR=TARGET), check=True, timeout=3600)
    counted.build_portal()
    pg_port = counted.start_postgres()
    contenders = {"loop floor": floor_pg("floor-loop", pg_port), "exec floor": floor_pg("floor-exec", pg_port),
                  "tokio floor": floor_pg("dbportal-floor", pg_port),
                  "portal": counted.portal_pg(pg_port, False), "PgBouncer": counted.pgbouncer(pg_port, False)}
    n, clients = counted.PG_N, counted.CLIENTS
    work = {name: counted.per_op(c, f"floor-{name.replace(' ', '-')}", counted.pgbench(False, "simple", n),
                                 counted.pgbench(False, "simple", 5 * n), 4 * n * clients)
            for name, c in contenders.items()}
    print(f"pgbench -S -M simple, {clients} clients, pool {counted.POOL}, plaintext, "
          f"{4 * n * clients:,} transactions apart; portal {counted.first_line([counted.bench.PORTAL, '--version'])}")
    print()
    names = list(contenders)
    print("| per transaction | " + " | ".join(names) + " | " + " | ".join(f"{x} / PgBouncer" for x in names[:-1]) + " |")
    print("|---" * (2 * len(names)) + "|")
    for key, label in (("Ir", "user-space instructions"), (None, "all system calls")):
        def get(name):
            w = work[name]
            return w.get(key, 0) if key else sum(v for k, v in w.items() if k != "Ir")
        digits = 0 if key else 2
        values = [get(x) for x in names]
        print(f"| {label} | " + " | ".join(f"{v:,.{digits}f}" for v in values) + " | "
              + " | ".join(f"{v / values[-1]:.2f}" for v in values[:-1]) + " |")

if __name__ == "__main__":
    try:
        main()
    finally:
        counted.cleanup()
