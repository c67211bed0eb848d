#!/bin/sh
# Failover benchmark: the portal (default settings) against HAProxy (the KeyDB documentation's
# tcp-check, inter 1s) in front of a Redis primary and replica on loopback. Needs redis-server
# and, for the comparison, /usr/sbin/haproxy. Prints the date, the machine's load and a table;
# ROUNDS=n overrides the 10 rounds. The portal under test is the release build.
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p dbportal-portal --bin portal --example failover_bench
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); cores: $(nproc); load before: $(uptime | sed 's/.*load average: //')"
PORTAL_BIN="$(pwd)/target/release/portal" target/release/examples/failover_bench
echo "load after: $(uptime | sed 's/.*load average: //')"
