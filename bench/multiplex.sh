#!/usr/bin/env bash
# Redis multiplexing benchmark: direct vs HAProxy (L4) vs nutcracker (twemproxy, twice: the
# second is the control) vs the portal (one event-loop thread unless THREADS says otherwise)
# with pooling.mode multiplex, redis-benchmark GET/SET, 1,000 and 5,000 clients, pipeline 1
# and 16, in one run (the contenders alternate in each repetition).
#   bench/multiplex.sh                 # 2 repetitions (about 6 minutes on 2 cores)
#   REPS=1 bench/multiplex.sh          # quicker
#   SCENARIOS=get:1000:1 bench/multiplex.sh
# Needs: redis-server, redis-tools, haproxy, nutcracker, python3, a Rust toolchain.
# Prints figures (Markdown; a copy goes to $TMPDIR/dbportal-bench-multiplex-last-run.md); it
# is not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
# 5,000 clients: redis-benchmark, the proxies and redis-server each hold that many sockets
# (proxies twice): raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p dbportal-portal --bin portal
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
exec python3 bench/multiplex.py "$@"
