#!/usr/bin/env bash
# Data plane benchmark: direct vs HAProxy vs the portal, on loopback, in one run.
#   bench/dataplane.sh            # 3 repetitions, medians and pairs (about 4 minutes; 7 took 7.5)
#   REPS=1 bench/dataplane.sh     # quicker
# Needs: redis-server, redis-tools (redis-benchmark), haproxy, python3, a Rust toolchain.
# Prints figures (Markdown; a copy goes to $TMPDIR/dbportal-bench-last-run.md); it is not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
# 20,000 idle sessions need 40,000 descriptors in one proxy; raise the soft limit as far as
# the hard limit allows (the script measures what fits and reports the per-session slope).
ulimit -n "$(ulimit -Hn)"
# Two invocations: building the example in the same one would unify dev-dependency features
# (tokio test-util, whose mocked clock costs a lock per read of the time) into the binary.
cargo build --release -q -p dbportal-portal --bin portal
cargo build --release -q -p dbportal-portal --example loadgen
exec python3 bench/dataplane.py "$@"
