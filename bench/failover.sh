#!/bin/sh
# Failover benchmark: the portal (default settings) against HAProxy (the KeyDB documentation's
# tcp-check, inter 1s) in front of a Redis primary and replica on loopback. Needs redis-server
# and, for the comparison, /usr/sbin/haproxy. Prints a table; ROUNDS=n overrides the 10 rounds.
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p dbportal-portal --bin portal --example failover_bench
PORTAL_BIN="$(pwd)/target/release/portal" exec target/release/examples/failover_bench
